//! Messaging's gRPC service: `creto.enablement.messaging.v1.MessagingService`.
//!
//! Subjects on the MESSAGING stream (tenant and agent ids are validated subject tokens):
//! - `messaging.keys.<tenant>.<agent>`: key registered / revoked (the directory);
//! - `messaging.msg.<tenant>.<recipient>.<sender>`: sealed envelopes, one subject per pair so
//!   the per-pair sequence is enforced with the log's expected-last-sequence check;
//! - `messaging.ack.<tenant>.<recipient>`: the recipient's acknowledged cursor;
//! - `messaging.expired.<tenant>.<recipient>`: messages that expired before delivery.

pub mod client;
pub mod delivery;
pub mod directory;
pub mod metrics;
pub mod replay_guard;
pub mod service;

pub use service::MessagingGateway;
