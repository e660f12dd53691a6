//! Metering: usage events, meters, windows.

pub mod event;
pub mod invoice;
pub mod meter;
pub mod pricing;
pub mod quota;
pub mod reference;
pub mod window;

pub use event::{IngestLimits, Invalid, InvalidReason, RawUsageEvent, UsageRecord};
pub use meter::{Aggregation, Meter, MeterError};
pub use window::Window;
