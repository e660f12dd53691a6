//! The pricing engine: plans made of charges per meter, and what a period of usage costs.
//!
//! - [`money`]: currencies and the rounding rule (half-up, once per invoice line).
//! - [`plan`]: versioned plans, charges and their models (flat, per unit, graduated, volume,
//!   package), with validation.
//! - [`tiers`]: the price of one charge for one quantity, with its tier breakdown.
//! - [`period`]: a subscription's plan history cut into segments over a billing period, flat
//!   fees and minimums prorated by the share of their billing cycle, usage priced per
//!   segment.
//!
//! Pure and deterministic: the same plans, assignments and usage always give the same lines in
//! the same order, so a replay or a second `GenerateInvoice` reproduces an invoice exactly.
pub mod money;
pub mod period;
pub mod plan;
pub mod tiers;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

pub use money::Currency;
pub use period::{
    price_period, segments, Period, PlanAssignment, PricedPeriod, Segment, SegmentUsage,
};
pub use plan::{
    validate_catalog, BillingInterval, Charge, ChargeError, ChargeModel, Plan, PlanError, PlanRef,
    Tier,
};
pub use tiers::{price_charge, ChargePrice, TierLine};

/// Why a plan, a plan history or a usage input cannot be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error(
        "unknown currency {0:?}: expected an upper-case ISO 4217 code such as USD, EUR or JPY"
    )]
    UnknownCurrency(String),
    #[error("plan {} v{}: {error}", plan.id, plan.version)]
    InvalidPlan { plan: PlanRef, error: PlanError },
    #[error("plan {} v{} is defined more than once", .0.id, .0.version)]
    DuplicatePlanVersion(PlanRef),
    #[error("plan {} v{} is assigned but not defined", .0.id, .0.version)]
    UnknownPlan(PlanRef),
    #[error("two plan assignments take effect at the same instant {0}: only one can be active")]
    DuplicateEffectiveFrom(DateTime<Utc>),
    #[error("period {start} .. {end} is empty: its end must be after its start")]
    EmptyPeriod {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
    #[error(
        "plan {} v{} bills its fees by {} (UTC calendar cycles), and this period crosses into a new cycle at {boundary}: end the invoice there and generate one invoice per cycle",
        plan.id, plan.version, interval.describe()
    )]
    CrossesBillingCycle {
        plan: PlanRef,
        interval: BillingInterval,
        boundary: DateTime<Utc>,
    },
    #[error("no plan is assigned at any time in the period {start} .. {end}")]
    NoPlanInPeriod {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
    #[error("plans in one period must share a currency: found {found} after {expected}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    #[error("usage for segment {start} .. {end} is missing")]
    MissingUsage {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
    #[error("usage was given for {start} .. {end}, which is not a segment of the period")]
    UnexpectedUsage {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
    #[error("usage of {meter:?} is negative ({quantity})")]
    NegativeUsage { meter: String, quantity: Decimal },
    #[error("invalid charge: {0}")]
    InvalidCharge(ChargeError),
    #[error("a quantity cannot be negative ({0})")]
    NegativeQuantity(Decimal),
    #[error("amount out of range for exact decimal arithmetic")]
    Overflow,
}

/// `a × b`, an error instead of a panic when the result does not fit: a hostile or mistaken
/// quantity must not take down the projection that prices it.
pub(crate) fn mul(a: Decimal, b: Decimal) -> Result<Decimal, PricingError> {
    a.checked_mul(b).ok_or(PricingError::Overflow)
}

/// `a + b`, checked like [`mul`].
pub(crate) fn add(a: Decimal, b: Decimal) -> Result<Decimal, PricingError> {
    a.checked_add(b).ok_or(PricingError::Overflow)
}

/// Sum of amounts, checked like [`mul`].
pub(crate) fn sum(amounts: impl IntoIterator<Item = Decimal>) -> Result<Decimal, PricingError> {
    amounts.into_iter().try_fold(Decimal::ZERO, add)
}
