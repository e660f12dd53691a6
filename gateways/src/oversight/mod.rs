//! Oversight's gRPC service: `creto.enablement.oversight.v1.OversightService`.
//!
//! Subjects on the OVERSIGHT stream (tenant and ids are validated subject tokens):
//! - `oversight.policies.<tenant>.<policy_id>`: policy defined (each version);
//! - `oversight.requests.<tenant>.<request_id>`: the request aggregate's events;
//! - `oversight.notifications.<tenant>.<request_id>`: the outcome of each notification.

pub mod fold;
pub mod metrics;
pub mod notifications;
pub mod notify;
pub mod page;
pub mod service;
pub mod timers;

pub use service::OversightGateway;
