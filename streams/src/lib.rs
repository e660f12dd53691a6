//! The durable log of the platform.
//!
//! Every fact is an event on a stream declared in [`catalog`]. Writers use [`EventLog::append`]
//! (idempotent by event id, optionally guarded by the expected last sequence of the subject);
//! readers replay in order ([`EventLog::replay`]) or consume durably with acks, naks and dead
//! letters ([`EventLog::consumer`]). Nothing here leaks a JetStream type: the JetStream adapter
//! lives in [`jetstream`], the embedded one beside it implements the same trait.

pub mod catalog;
pub mod conformance;
pub mod deadletter;
pub mod embedded;
pub mod envelope;
pub mod headers;
pub mod jetstream;
pub mod log;
pub mod subject;

pub use catalog::{Catalog, StreamSpec, DEADLETTERS, MESSAGING, METERING, OVERSIGHT, RUNTIME};
pub use headers::Headers;
pub use log::*;
