//! Versioned plans and their charges.
//!
//! A plan version is immutable once published: a price change is a new version, and a
//! subscription moves to it from a date (see [`super::period`]). Issued invoices name the
//! exact version they were priced with.
use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, DurationRound, Months, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::money::Currency;
use super::PricingError;

/// Names one version of one plan.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PlanRef {
    pub id: String,
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub version: u32,
    pub currency: Currency,
    pub charges: Vec<Charge>,
    /// Minimum commitment per billing cycle for the whole plan: when the charges add up to
    /// less, the invoice tops them up to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<Decimal>,
    /// What the flat fees and minimums are for. Versions stored before plans had an interval
    /// have none in their JSON and keep the meaning they were published with.
    #[serde(default = "BillingInterval::per_invoice")]
    pub billing_interval: BillingInterval,
}

/// The stretch of time a plan's flat fees and minimums pay for: calendar cycles in UTC (hours,
/// days from midnight, weeks from Monday, months from the 1st, years from January 1). An
/// invoice pays the share of the cycle it covers (a 1-day invoice of a monthly plan pays 1/31
/// of the fee in January, and January's daily invoices add up to the fee), and may not cross
/// from one cycle into the next: tiers and packages count one cycle's usage at most, and no
/// anchor drifts from month to month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingInterval {
    Hour,
    Day,
    Week,
    Month,
    Year,
    /// Fees and minimums per invoice, whatever its period: only plan versions defined before
    /// billing intervals, whose bills must not change meaning. PutPlan does not accept it.
    PerInvoice,
}

impl BillingInterval {
    fn per_invoice() -> BillingInterval {
        BillingInterval::PerInvoice
    }

    /// The cycle holding `t`, `[start, end)`; `None` for [`Self::PerInvoice`], whose cycle is
    /// the invoice period itself, or at the ends of time.
    pub fn cycle_holding(self, t: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let day = t.duration_trunc(TimeDelta::days(1)).ok()?;
        let (start, end) = match self {
            BillingInterval::Hour => {
                let start = t.duration_trunc(TimeDelta::hours(1)).ok()?;
                (start, start.checked_add_signed(TimeDelta::hours(1))?)
            }
            BillingInterval::Day => (day, day.checked_add_signed(TimeDelta::days(1))?),
            BillingInterval::Week => {
                let monday = day.checked_sub_signed(TimeDelta::days(i64::from(
                    t.weekday().num_days_from_monday(),
                )))?;
                (monday, monday.checked_add_signed(TimeDelta::weeks(1))?)
            }
            BillingInterval::Month => {
                let first = day.with_day(1)?;
                (first, first.checked_add_months(Months::new(1))?)
            }
            BillingInterval::Year => {
                let first = day.with_day(1)?.with_month(1)?;
                (first, first.checked_add_months(Months::new(12))?)
            }
            BillingInterval::PerInvoice => return None,
        };
        Some((start, end))
    }

    /// "a month", "the invoice period": what one fee pays for, in descriptions and errors.
    pub fn describe(self) -> &'static str {
        match self {
            BillingInterval::Hour => "an hour",
            BillingInterval::Day => "a day",
            BillingInterval::Week => "a week",
            BillingInterval::Month => "a month",
            BillingInterval::Year => "a year",
            BillingInterval::PerInvoice => "the invoice period",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Unique within the plan; invoice lines name it.
    pub id: String,
    /// The meter (or event type) whose usage this charge bills. Required for every model but
    /// `Flat`, where it is only a label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    pub model: ChargeModel,
    /// Minimum per billing cycle for this charge alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<Decimal>,
}

/// How a quantity of usage becomes an amount. Serialized with a `type` tag:
/// `{"type": "per_unit", "unit_price": "0.002"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChargeModel {
    /// A fixed amount per billing cycle, whatever the usage (prorated for part of one).
    Flat { amount: Decimal },
    /// Every unit at the same price.
    PerUnit { unit_price: Decimal },
    /// Each unit at the price of the tier it falls in (the first 1,000 at one price, the next
    /// at another...), plus the flat fee of every tier that some usage reaches.
    Graduated { tiers: Vec<Tier> },
    /// All units at the price of the one tier the total falls in, plus that tier's flat fee.
    Volume { tiers: Vec<Tier> },
    /// `package_price` per started block of `package_size` units: 1 to 100 units of a
    /// 100-unit package cost one package, 101 cost two, 0 cost nothing.
    Package {
        package_size: Decimal,
        package_price: Decimal,
    },
}

/// One tier of a graduated or volume charge. It covers the quantities above the previous
/// tier's `up_to` (0 for the first) up to and including its own `up_to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// Inclusive upper bound; `None` is unbounded and only the last tier may (and must) be.
    pub up_to: Option<Decimal>,
    pub unit_price: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat_fee: Option<Decimal>,
}

impl Tier {
    pub fn fee(&self) -> Decimal {
        self.flat_fee.unwrap_or(Decimal::ZERO)
    }
}

/// What is wrong with a plan, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the plan id is empty")]
    EmptyId,
    #[error("the version must be 1 or more")]
    ZeroVersion,
    #[error("the plan minimum {0} is negative")]
    NegativeMinimum(Decimal),
    #[error("a charge has an empty id")]
    EmptyChargeId,
    #[error("charge id {0:?} appears more than once")]
    DuplicateChargeId(String),
    #[error("charge {charge:?}: {error}")]
    Charge { charge: String, error: ChargeError },
}

/// What is wrong with one charge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeError {
    #[error("a usage-based charge needs the meter it bills")]
    MissingMeter,
    #[error("{what} {value} is negative")]
    Negative { what: &'static str, value: Decimal },
    #[error("needs at least one tier")]
    NoTiers,
    #[error("tiers[{tier}].up_to must be greater than the previous tier's (or than 0)")]
    TierNotIncreasing { tier: usize },
    #[error("tiers[{tier}] is unbounded (no up_to) but is not the last tier")]
    UnboundedTierNotLast { tier: usize },
    #[error("the last tier must be unbounded (no up_to) so every quantity has a price")]
    LastTierBounded,
    #[error("package_size must be greater than 0, got {0}")]
    PackageSizeNotPositive(Decimal),
}

impl Plan {
    pub fn plan_ref(&self) -> PlanRef {
        PlanRef {
            id: self.id.clone(),
            version: self.version,
        }
    }

    /// Checks everything the engine relies on, so pricing never meets an ambiguous plan.
    pub fn validate(&self) -> Result<(), PricingError> {
        self.check().map_err(|error| PricingError::InvalidPlan {
            plan: self.plan_ref(),
            error,
        })
    }

    fn check(&self) -> Result<(), PlanError> {
        if self.id.is_empty() {
            return Err(PlanError::EmptyId);
        }
        if self.version == 0 {
            return Err(PlanError::ZeroVersion);
        }
        if let Some(m) = self.minimum.filter(|m| *m < Decimal::ZERO) {
            return Err(PlanError::NegativeMinimum(m));
        }
        let mut ids = BTreeSet::new();
        for charge in &self.charges {
            if charge.id.is_empty() {
                return Err(PlanError::EmptyChargeId);
            }
            if !ids.insert(charge.id.as_str()) {
                return Err(PlanError::DuplicateChargeId(charge.id.clone()));
            }
            charge.check().map_err(|error| PlanError::Charge {
                charge: charge.id.clone(),
                error,
            })?;
        }
        Ok(())
    }
}

/// Checks every plan and that no (id, version) is defined twice: an assignment must name
/// exactly one price list.
pub fn validate_catalog(plans: &[Plan]) -> Result<(), PricingError> {
    let mut seen = BTreeSet::new();
    for plan in plans {
        plan.validate()?;
        if !seen.insert(plan.plan_ref()) {
            return Err(PricingError::DuplicatePlanVersion(plan.plan_ref()));
        }
    }
    Ok(())
}

impl Charge {
    fn check(&self) -> Result<(), ChargeError> {
        let has_meter = self.meter.as_deref().is_some_and(|m| !m.is_empty());
        if self.model.is_usage_based() && !has_meter {
            return Err(ChargeError::MissingMeter);
        }
        if let Some(m) = self.minimum {
            non_negative("minimum", m)?;
        }
        self.model.check()
    }
}

impl ChargeModel {
    /// Whether the amount depends on a meter's usage (everything but `Flat`).
    pub fn is_usage_based(&self) -> bool {
        !matches!(self, ChargeModel::Flat { .. })
    }

    /// The model's name as serialized, for descriptions.
    pub fn name(&self) -> &'static str {
        match self {
            ChargeModel::Flat { .. } => "flat",
            ChargeModel::PerUnit { .. } => "per_unit",
            ChargeModel::Graduated { .. } => "graduated",
            ChargeModel::Volume { .. } => "volume",
            ChargeModel::Package { .. } => "package",
        }
    }

    pub(crate) fn check(&self) -> Result<(), ChargeError> {
        match self {
            ChargeModel::Flat { amount } => non_negative("amount", *amount),
            ChargeModel::PerUnit { unit_price } => non_negative("unit_price", *unit_price),
            ChargeModel::Graduated { tiers } | ChargeModel::Volume { tiers } => check_tiers(tiers),
            ChargeModel::Package {
                package_size,
                package_price,
            } => {
                if *package_size <= Decimal::ZERO {
                    return Err(ChargeError::PackageSizeNotPositive(*package_size));
                }
                non_negative("package_price", *package_price)
            }
        }
    }
}

/// Bounds strictly increasing from 0, only the last unbounded, prices and fees ≥ 0: then every
/// quantity ≥ 0 falls in exactly one tier.
fn check_tiers(tiers: &[Tier]) -> Result<(), ChargeError> {
    let last = tiers.len().checked_sub(1).ok_or(ChargeError::NoTiers)?;
    let mut previous = Decimal::ZERO;
    for (i, tier) in tiers.iter().enumerate() {
        non_negative("unit_price", tier.unit_price)?;
        non_negative("flat_fee", tier.fee())?;
        match tier.up_to {
            None if i != last => return Err(ChargeError::UnboundedTierNotLast { tier: i }),
            Some(_) if i == last => return Err(ChargeError::LastTierBounded),
            Some(up_to) if up_to <= previous => {
                return Err(ChargeError::TierNotIncreasing { tier: i })
            }
            Some(up_to) => previous = up_to,
            None => {}
        }
    }
    Ok(())
}

fn non_negative(what: &'static str, value: Decimal) -> Result<(), ChargeError> {
    if value < Decimal::ZERO {
        return Err(ChargeError::Negative { what, value });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tier(up_to: Option<&str>, price: &str) -> Tier {
        Tier {
            up_to: up_to.map(d),
            unit_price: d(price),
            flat_fee: None,
        }
    }

    fn plan(charges: Vec<Charge>) -> Plan {
        Plan {
            id: "pro".into(),
            version: 1,
            currency: Currency::parse("USD").unwrap(),
            billing_interval: BillingInterval::Month,
            charges,
            minimum: None,
        }
    }

    fn charge(id: &str, model: ChargeModel) -> Charge {
        Charge {
            id: id.into(),
            meter: Some("tokens".into()),
            model,
            minimum: None,
        }
    }

    fn charge_error(p: &Plan) -> ChargeError {
        match p.validate() {
            Err(PricingError::InvalidPlan {
                error: PlanError::Charge { error, .. },
                ..
            }) => error,
            other => panic!("expected a charge error, got {other:?}"),
        }
    }

    fn tiered(tiers: Vec<Tier>) -> Plan {
        plan(vec![charge("c", ChargeModel::Graduated { tiers })])
    }

    #[test]
    fn a_well_formed_plan_validates() {
        let p = plan(vec![
            charge("base", ChargeModel::Flat { amount: d("10") }),
            charge(
                "tokens",
                ChargeModel::Graduated {
                    tiers: vec![tier(Some("1000"), "0.01"), tier(None, "0.005")],
                },
            ),
        ]);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn tiers_must_increase_strictly_and_end_unbounded() {
        assert_eq!(charge_error(&tiered(vec![])), ChargeError::NoTiers);
        assert_eq!(
            charge_error(&tiered(vec![tier(Some("0"), "1"), tier(None, "1")])),
            ChargeError::TierNotIncreasing { tier: 0 }
        );
        assert_eq!(
            charge_error(&tiered(vec![
                tier(Some("10"), "1"),
                tier(Some("10"), "1"),
                tier(None, "1")
            ])),
            ChargeError::TierNotIncreasing { tier: 1 }
        );
        assert_eq!(
            charge_error(&tiered(vec![tier(Some("10"), "1")])),
            ChargeError::LastTierBounded
        );
        assert_eq!(
            charge_error(&tiered(vec![tier(None, "1"), tier(None, "1")])),
            ChargeError::UnboundedTierNotLast { tier: 0 }
        );
    }

    #[test]
    fn prices_fees_and_minimums_must_not_be_negative() {
        assert_eq!(
            charge_error(&tiered(vec![tier(None, "-0.01")])),
            ChargeError::Negative {
                what: "unit_price",
                value: d("-0.01")
            }
        );
        let mut with_fee = tier(None, "1");
        with_fee.flat_fee = Some(d("-1"));
        assert!(matches!(
            charge_error(&tiered(vec![with_fee])),
            ChargeError::Negative {
                what: "flat_fee",
                ..
            }
        ));
        let mut c = charge("c", ChargeModel::PerUnit { unit_price: d("1") });
        c.minimum = Some(d("-5"));
        assert!(matches!(
            charge_error(&plan(vec![c])),
            ChargeError::Negative {
                what: "minimum",
                ..
            }
        ));
        let mut p = plan(vec![]);
        p.minimum = Some(d("-1"));
        assert!(matches!(
            p.validate(),
            Err(PricingError::InvalidPlan {
                error: PlanError::NegativeMinimum(_),
                ..
            })
        ));
        // -0 is zero, not negative.
        assert_eq!(
            plan(vec![charge(
                "c",
                ChargeModel::PerUnit {
                    unit_price: d("-0")
                }
            )])
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn package_size_must_be_positive() {
        let p = plan(vec![charge(
            "c",
            ChargeModel::Package {
                package_size: d("0"),
                package_price: d("1"),
            },
        )]);
        assert_eq!(
            charge_error(&p),
            ChargeError::PackageSizeNotPositive(d("0"))
        );
    }

    #[test]
    fn charge_ids_are_unique_and_usage_charges_name_a_meter() {
        let flat = |id: &str| charge(id, ChargeModel::Flat { amount: d("1") });
        assert!(matches!(
            plan(vec![flat("a"), flat("a")]).validate(),
            Err(PricingError::InvalidPlan {
                error: PlanError::DuplicateChargeId(_),
                ..
            })
        ));
        let mut c = charge("c", ChargeModel::PerUnit { unit_price: d("1") });
        c.meter = None;
        assert_eq!(charge_error(&plan(vec![c])), ChargeError::MissingMeter);
        // A flat fee needs no meter.
        let mut f = flat("f");
        f.meter = None;
        assert_eq!(plan(vec![f]).validate(), Ok(()));
    }

    #[test]
    fn a_catalog_defines_each_version_once() {
        let p = plan(vec![]);
        let mut v2 = p.clone();
        v2.version = 2;
        assert_eq!(validate_catalog(&[p.clone(), v2]), Ok(()));
        assert_eq!(
            validate_catalog(&[p.clone(), p.clone()]),
            Err(PricingError::DuplicatePlanVersion(p.plan_ref()))
        );
    }

    #[test]
    fn the_error_message_says_where_and_what() {
        let err = tiered(vec![tier(Some("10"), "1")]).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "plan pro v1: charge \"c\": the last tier must be unbounded (no up_to) so every \
             quantity has a price"
        );
    }

    #[test]
    fn models_serialize_with_a_type_tag_and_decimals_as_strings() {
        let m = ChargeModel::PerUnit {
            unit_price: d("0.002"),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"per_unit","unit_price":"0.002"}"#
        );
        let back: ChargeModel =
            serde_json::from_str(r#"{"type":"per_unit","unit_price":"0.002"}"#).unwrap();
        assert_eq!(back, m);
    }
}
