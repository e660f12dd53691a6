//! Gateways: the tonic services of each product, their HTTP metrics and health endpoints, and
//! the `enablement` command line that runs and operates the platform.

pub mod audit;
pub mod auth;
pub mod backfill;
pub mod cli;
pub mod config;
pub mod delivery_loop;
pub mod grpc_metrics;
pub mod http_server;
pub mod log_status;
pub mod messaging;
pub mod metering;
pub mod oversight;
pub mod platform;
pub mod replay;
pub mod runtime;
pub mod server;
pub mod status;
pub mod telemetry;
