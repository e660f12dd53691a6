//! Runtime product: sandboxes where agents run code. The backend isolates; the engine runs a
//! replica's sandboxes and warm pool and records every step; the view folds the events for
//! queries and gauges; the service is the gRPC API.

pub mod backend;
pub mod config;
pub mod egress_budget;
pub mod engine;
pub mod metrics;
pub mod service;
pub mod view;

pub use service::RuntimeGateway;
