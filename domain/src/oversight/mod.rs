//! Oversight: human approval of agent actions. Policies decide which actions need approval,
//! from whom and what happens on timeout; each request is an aggregate folded from its events,
//! and every command is decided here, without I/O, so a replay decides as the live path did.

pub mod policy;
pub mod request;

pub use request::{Aggregate, Refusal};
