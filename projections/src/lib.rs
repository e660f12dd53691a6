//! Projector workers: they read the log and build the read models (Postgres, Redis), with the
//! checkpoint committed in the same transaction as the rows it covers.

pub mod archive;
pub mod audit;
pub mod cache;
pub mod metering;
pub mod metrics;
pub mod oversight;
pub mod postgres;
pub mod rebuild;
pub mod runner;
pub mod runtime;
pub mod set_aside;
pub mod trace_context;
pub mod whole;

pub use runner::{ApplyReport, ProjectionError, Projector};
