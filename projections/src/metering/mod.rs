//! The metering projector and read models: raw accepted events, `usage_hourly`,
//! `usage_daily`, meters in Postgres; current-period counters in Redis.

pub mod counters;
pub mod decode;
pub mod projector;
pub mod query;

pub use decode::{decode, Decoded};
pub use projector::MeteringProjector;
