//! The metering projector and read models: raw accepted events, `usage_hourly`,
//! `usage_daily`, meters in Postgres; current-period counters in Redis.

pub mod batch;
pub mod billing;
pub mod counters;
pub mod decode;
pub mod embedded;
pub mod projector;
pub mod query;
pub mod quotas;
pub mod read_model;

pub use decode::{decode, Decoded};
pub use projector::MeteringProjector;
pub use read_model::{MeteringReadModel, PgReadModel};
