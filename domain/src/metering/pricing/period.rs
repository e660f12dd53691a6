//! A billing period priced against a subscription's plan history.
//!
//! A subscription attaches plan versions from dates ([`PlanAssignment`]). Over a billing period
//! `[start, end)` the history cuts the period into [`Segment`]s, one per plan version in force.
//! The projection asks [`segments`] for them, sums each meter's usage inside each segment, and
//! hands that back to [`price_period`] as [`SegmentUsage`]: usage is never prorated, it is
//! billed by the plan that was in force when it happened.
//!
//! Proration: flat fees and minimums pay for one *cycle* of the plan's billing interval
//! ([`BillingInterval`]: UTC calendar hours, days, weeks, months, years). A segment pays the
//! share of its cycle it covers, `share = seconds in segment / seconds in cycle` (counted to
//! the microsecond, divided in `Decimal`), and the prorated amount is
//! `round_half_up(amount × share)` in the currency's minor unit. A period that is exactly one
//! cycle, on one plan, has a share of exactly 1 and bills the list prices; a 1-day period of a
//! monthly plan pays 1/31 of the fee in January. A segment may not cross into its plan's next
//! cycle: its tiers would count more than one cycle's usage. A subscription that starts
//! mid-period has no segment before its first assignment, so it pays only for the time it had
//! a plan. Plans from before billing intervals ([`BillingInterval::PerInvoice`]) have the
//! period itself as their cycle.
//!
//! Minimums apply per segment, with the plan version in force: a charge's minimum (prorated) is
//! compared with that charge's line, and the plan's minimum (prorated) with the segment's lines
//! plus the charge minimum top-ups. Whatever falls short becomes a minimum adjustment.
use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use super::money::Currency;
use super::plan::{validate_catalog, BillingInterval, Charge, ChargeModel, Plan, PlanRef};
use super::tiers::{price_charge, ChargePrice};
use super::{mul, sum, PricingError};
use crate::metering::invoice::{InvoiceLine, MinimumAdjustment};

/// A half-open time range `[start, end)`: a billing period or a segment of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Period {
    /// A period that ends after it starts.
    pub fn new(start: DateTime<Utc>, end: DateTime<Utc>) -> Result<Period, PricingError> {
        let period = Period { start, end };
        period.check()?;
        Ok(period)
    }

    fn check(&self) -> Result<(), PricingError> {
        if self.end <= self.start {
            return Err(PricingError::EmptyPeriod {
                start: self.start,
                end: self.end,
            });
        }
        Ok(())
    }

    fn micros(&self) -> Result<Decimal, PricingError> {
        (self.end - self.start)
            .num_microseconds()
            .map(Decimal::from)
            .ok_or(PricingError::Overflow)
    }

    /// The share of `whole` this period covers, exactly 1 when they are equal.
    pub fn share_of(&self, whole: &Period) -> Result<Decimal, PricingError> {
        self.micros()?
            .checked_div(whole.micros()?)
            .ok_or(PricingError::Overflow)
    }

    /// `amount × share`, multiplied before dividing: the share itself is cut at 28 digits
    /// (1/30 is 0.0333…3), and 49.95 × that is 1.66499…, which rounds to 1.66 instead of the
    /// 1.67 that 49.95 / 30 = 1.665 rounds to.
    pub fn prorate(&self, amount: Decimal, whole: &Period) -> Result<Decimal, PricingError> {
        let (part, whole_micros) = (self.micros()?, whole.micros()?);
        match amount.checked_mul(part) {
            Some(product) => product
                .checked_div(whole_micros)
                .ok_or(PricingError::Overflow),
            // Too large to multiply first: the share's last digit no longer shows anyway.
            None => mul(amount, self.share_of(whole)?),
        }
    }
}

/// From `effective_from` on (until the next assignment), the subscription is billed on `plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAssignment {
    pub plan: PlanRef,
    pub effective_from: DateTime<Utc>,
}

/// A stretch of a billing period during which one plan version was in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub plan: PlanRef,
    pub period: Period,
}

/// Usage per meter (slug or event type, as the charges name it) summed over one segment.
/// A meter absent from the map had no usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentUsage {
    pub period: Period,
    pub usage: BTreeMap<String, Decimal>,
}

/// Lines and minimum adjustments of a period, every amount rounded; see
/// [`crate::metering::invoice::compute_invoice`] for the totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedPeriod {
    pub currency: Currency,
    pub lines: Vec<InvoiceLine>,
    pub minimum_adjustments: Vec<MinimumAdjustment>,
}

/// Cuts `period` by the plan history, in time order. Assignments may come in any order; two
/// naming different plans from the same instant are an error (which one would be active?),
/// exact duplicates count once. Consecutive assignments of the same version merge into one
/// segment, so re-attaching a plan does not split its flat fee in two roundings.
pub fn segments(
    assignments: &[PlanAssignment],
    period: Period,
) -> Result<Vec<Segment>, PricingError> {
    period.check()?;
    let history = sorted_history(assignments)?;
    let mut out: Vec<Segment> = Vec::new();
    for (i, assignment) in history.iter().enumerate() {
        let until = history
            .get(i + 1)
            .map_or(period.end, |next| next.effective_from);
        let start = assignment.effective_from.max(period.start);
        let end = until.min(period.end);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.plan == assignment.plan => last.period.end = end,
            _ => out.push(Segment {
                plan: assignment.plan.clone(),
                period: Period { start, end },
            }),
        }
    }
    if out.is_empty() {
        return Err(PricingError::NoPlanInPeriod {
            start: period.start,
            end: period.end,
        });
    }
    Ok(out)
}

fn sorted_history(assignments: &[PlanAssignment]) -> Result<Vec<&PlanAssignment>, PricingError> {
    let mut history: Vec<&PlanAssignment> = assignments.iter().collect();
    history.sort_by(|a, b| (a.effective_from, &a.plan).cmp(&(b.effective_from, &b.plan)));
    history.dedup();
    if let Some(pair) = history
        .windows(2)
        .find(|w| w[0].effective_from == w[1].effective_from)
    {
        return Err(PricingError::DuplicateEffectiveFrom(pair[0].effective_from));
    }
    Ok(history)
}

/// Prices `period` for a subscription: one line per charge per segment (zero-usage lines
/// included, so an invoice always shows every charge), in time order and then in the plan's
/// charge order (part of the immutable plan version), followed by minimum adjustments in the
/// same order. `usage` must hold exactly the segments [`segments`] returns.
pub fn price_period(
    plans: &[Plan],
    assignments: &[PlanAssignment],
    period: Period,
    usage: &[SegmentUsage],
) -> Result<PricedPeriod, PricingError> {
    validate_catalog(plans)?;
    let segments = segments(assignments, period)?;
    let usage = usage_by_segment(&segments, usage)?;
    let mut priced: Option<PricedPeriod> = None;
    for (segment, usage) in segments.iter().zip(usage) {
        let plan = plans
            .iter()
            .find(|p| p.id == segment.plan.id && p.version == segment.plan.version)
            .ok_or_else(|| PricingError::UnknownPlan(segment.plan.clone()))?;
        let out = priced.get_or_insert_with(|| PricedPeriod {
            currency: plan.currency,
            lines: Vec::new(),
            minimum_adjustments: Vec::new(),
        });
        if plan.currency != out.currency {
            return Err(PricingError::CurrencyMismatch {
                expected: out.currency,
                found: plan.currency,
            });
        }
        let cycle = cycle(plan, segment.period, period)?;
        let context = SegmentContext {
            plan,
            period: segment.period,
            cycle,
            share: segment.period.share_of(&cycle)?,
            partial: segment.period != period,
        };
        context.price(usage, out)?;
    }
    Ok(priced.expect("segments() returns at least one segment"))
}

/// The cycle `plan`'s fees in `segment` pay for: the one holding the segment's start, which
/// the segment must not leave; the whole period for a per-invoice plan.
fn cycle(plan: &Plan, segment: Period, whole: Period) -> Result<Period, PricingError> {
    let interval = plan.billing_interval;
    if interval == BillingInterval::PerInvoice {
        return Ok(whole);
    }
    let (start, end) = interval
        .cycle_holding(segment.start)
        .ok_or(PricingError::Overflow)?;
    if segment.end > end {
        return Err(PricingError::CrossesBillingCycle {
            plan: plan.plan_ref(),
            interval,
            boundary: end,
        });
    }
    Ok(Period { start, end })
}

/// Matches the caller's usage to the segments one to one, in segment order.
fn usage_by_segment<'a>(
    segments: &[Segment],
    usage: &'a [SegmentUsage],
) -> Result<Vec<&'a BTreeMap<String, Decimal>>, PricingError> {
    if let Some(extra) = usage
        .iter()
        .find(|u| !segments.iter().any(|s| s.period == u.period))
    {
        return Err(PricingError::UnexpectedUsage {
            start: extra.period.start,
            end: extra.period.end,
        });
    }
    segments
        .iter()
        .map(|s| {
            let mut matching = usage.iter().filter(|u| u.period == s.period);
            match (matching.next(), matching.next()) {
                (Some(u), None) => Ok(&u.usage),
                (None, _) => Err(PricingError::MissingUsage {
                    start: s.period.start,
                    end: s.period.end,
                }),
                // Twice the same segment: which one is right? Refuse rather than pick.
                (Some(_), Some(_)) => Err(PricingError::UnexpectedUsage {
                    start: s.period.start,
                    end: s.period.end,
                }),
            }
        })
        .collect()
}

/// One segment being priced: its plan, its time range and its share of the plan's cycle.
struct SegmentContext<'a> {
    plan: &'a Plan,
    period: Period,
    /// The billing cycle the plan's fees pay for, holding the segment.
    cycle: Period,
    share: Decimal,
    /// Whether the segment is shorter than the period (descriptions then say when).
    partial: bool,
}

impl SegmentContext<'_> {
    fn price(
        &self,
        usage: &BTreeMap<String, Decimal>,
        out: &mut PricedPeriod,
    ) -> Result<(), PricingError> {
        let currency = self.plan.currency;
        let mut segment_total = Vec::new();
        let mut adjustments = Vec::new();
        for charge in &self.plan.charges {
            let line = self.line(charge, usage)?;
            if let Some(minimum) = charge.minimum {
                adjustments.extend(self.minimum(Some(charge), minimum, line.amount)?);
            }
            segment_total.push(line.amount);
            out.lines.push(line);
        }
        // The plan's commitment counts the charges' own minimums as charged.
        segment_total.extend(adjustments.iter().map(|a| a.amount));
        if let Some(minimum) = self.plan.minimum {
            let charged = currency.round(sum(segment_total)?);
            adjustments.extend(self.minimum(None, minimum, charged)?);
        }
        out.minimum_adjustments.extend(adjustments);
        Ok(())
    }

    fn line(
        &self,
        charge: &Charge,
        usage: &BTreeMap<String, Decimal>,
    ) -> Result<InvoiceLine, PricingError> {
        let quantity = self.quantity(charge, usage)?;
        let price = price_charge(&charge.model, quantity)?;
        // Flat fees are per billing cycle, so a segment pays its share; usage is already
        // the segment's own and is priced as is.
        let (amount, proration) = match charge.model {
            ChargeModel::Flat { .. } if self.period != self.cycle => (
                self.period.prorate(price.amount, &self.cycle)?,
                Some(self.share),
            ),
            _ => (price.amount, None),
        };
        Ok(InvoiceLine {
            charge_id: charge.id.clone(),
            meter: charge.meter.clone(),
            plan_id: self.plan.id.clone(),
            plan_version: self.plan.version,
            segment: self.period,
            description: self.describe(charge, quantity, &price, proration),
            quantity,
            proration,
            tier_breakdown: price.tiers,
            amount: self.plan.currency.round(amount),
        })
    }

    /// The usage a charge bills in this segment; a flat fee counts as one.
    fn quantity(
        &self,
        charge: &Charge,
        usage: &BTreeMap<String, Decimal>,
    ) -> Result<Decimal, PricingError> {
        let Some(meter) = charge
            .meter
            .as_ref()
            .filter(|_| charge.model.is_usage_based())
        else {
            return Ok(Decimal::ONE);
        };
        let quantity = usage.get(meter).copied().unwrap_or(Decimal::ZERO);
        if quantity < Decimal::ZERO {
            return Err(PricingError::NegativeUsage {
                meter: meter.clone(),
                quantity,
            });
        }
        Ok(quantity)
    }

    /// The top-up that brings `charged` to the prorated `minimum`, if it falls short.
    fn minimum(
        &self,
        charge: Option<&Charge>,
        minimum: Decimal,
        charged: Decimal,
    ) -> Result<Option<MinimumAdjustment>, PricingError> {
        let currency = self.plan.currency;
        let prorated = currency.round(self.period.prorate(minimum, &self.cycle)?);
        if charged >= prorated {
            return Ok(None);
        }
        let whose = charge.map_or_else(|| "plan".to_string(), |c| format!("{} charge", c.id));
        Ok(Some(MinimumAdjustment {
            plan_id: self.plan.id.clone(),
            plan_version: self.plan.version,
            segment: self.period,
            charge_id: charge.map(|c| c.id.clone()),
            minimum: prorated,
            charged,
            amount: currency.round(prorated - charged),
            description: format!(
                "Minimum of the {whose}: {prorated} {currency}{}, charged {charged}",
                self.when()
            ),
        }))
    }

    fn describe(
        &self,
        charge: &Charge,
        quantity: Decimal,
        price: &ChargePrice,
        proration: Option<Decimal>,
    ) -> String {
        let what = match (&charge.model, proration) {
            (ChargeModel::Flat { .. }, None) => "flat fee".to_string(),
            (ChargeModel::Flat { .. }, Some(share)) => {
                let percent = (share * Decimal::ONE_HUNDRED)
                    .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
                let of = match self.plan.billing_interval {
                    BillingInterval::PerInvoice => "the period",
                    interval => interval.describe(),
                };
                format!("flat fee, prorated to {percent}% of {of}")
            }
            (ChargeModel::PerUnit { unit_price }, _) => {
                format!("{quantity} units × {unit_price}")
            }
            (ChargeModel::Graduated { .. }, _) => {
                format!(
                    "{quantity} units, graduated over {} tiers",
                    price.tiers.len()
                )
            }
            (ChargeModel::Volume { .. }, _) => match price.tiers.first() {
                Some(t) => format!("{quantity} units at the volume price of tiers[{}]", t.tier),
                None => format!("{quantity} units"),
            },
            (ChargeModel::Package { package_size, .. }, _) => format!(
                "{quantity} units in {} packages of {package_size}",
                price.packages.unwrap_or_default()
            ),
        };
        let meter = charge
            .meter
            .as_deref()
            .map_or_else(String::new, |m| format!(" ({m})"));
        format!("{}{meter}: {what}{}", charge.id, self.when())
    }

    /// `", 2026-01-01T00:00:00Z to 2026-01-16T00:00:00Z"` for a partial segment, else nothing.
    fn when(&self) -> String {
        if !self.partial {
            return String::new();
        }
        let at = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        format!(", {} to {}", at(self.period.start), at(self.period.end))
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono::TimeZone;

    use super::*;

    #[test]
    fn prorating_multiplies_before_it_divides() {
        let at = |d| Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).unwrap();
        let whole =
            Period::new(at(1), Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()).unwrap();
        let day = Period::new(at(1), at(2)).unwrap();
        let fee = Decimal::from_str("49.95").unwrap();
        // 49.95 / 30 = 1.665, half-up 1.67 (49.95 × 0.0333…3 was 1.66499…, 1.66).
        let prorated = day.prorate(fee, &whole).unwrap();
        assert_eq!(
            prorated.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero),
            Decimal::from_str("1.67").unwrap()
        );
        assert_eq!(whole.prorate(fee, &whole).unwrap(), fee);
    }
}
