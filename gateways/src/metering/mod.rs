//! Metering's gRPC service: `creto.enablement.metering.v1.MeteringService`.

pub mod billing;
pub mod ingest;
pub mod quota;
pub mod service;

pub use service::MeteringGateway;
