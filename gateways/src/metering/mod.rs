//! Metering's gRPC service: `creto.enablement.metering.v1.MeteringService`.

pub mod service;

pub use service::MeteringGateway;
