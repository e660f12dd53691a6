//! Metering's gRPC service: `creto.enablement.metering.v1.MeteringService`.

pub mod ingest;
pub mod service;

pub use service::MeteringGateway;
