//! Pure domain logic of the four products: commands, events, validation and the math that
//! decides outcomes. No I/O and no async here, so every rule can be tested in isolation and a
//! replay decides exactly as the live path did.

pub mod messaging;
pub mod metering;
pub mod oversight;
pub mod runtime;
pub mod text;
