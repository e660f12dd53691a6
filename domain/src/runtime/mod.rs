//! Runtime: sandboxes for agent code. The pure parts: the lifecycle and its events, the egress
//! policy every connection attempt is checked against, and the attestation statement.

pub mod attestation;
pub mod egress;
pub mod sandbox;
