//! Threshold percentages of a quota and the crossings that raise `QuotaThresholdReached`.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::quantity::Quantity;

/// A set of percentages in 1..=100, as bits of a `u128`: a quota carries it by value and the
/// crossing test allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Thresholds(u128);

impl Thresholds {
    pub const NONE: Thresholds = Thresholds(0);

    /// From percentages already validated (1..=100); anything else is ignored.
    pub fn from_pcts(pcts: &[u8]) -> Thresholds {
        Thresholds(
            pcts.iter()
                .filter(|p| (1..=100).contains(*p))
                .fold(0, |bits, p| bits | 1 << p),
        )
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, pct: u8) -> bool {
        pct <= 100 && self.0 & (1 << pct) != 0
    }

    /// The percentages, ascending.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (1..=100u8).filter(move |p| self.contains(*p))
    }

    pub fn to_vec(self) -> Vec<u8> {
        self.iter().collect()
    }

    /// The percentages that `used` reaches of `allowance` now but `before` did not. Reached
    /// means `used >= pct% of allowance` (exact: `used * 100 >= pct * allowance`) and some
    /// usage at all, so a quota of zero reaches every threshold with its first unit, not
    /// with none.
    pub fn crossed(self, allowance: Quantity, before: Quantity, used: Quantity) -> Thresholds {
        if self.is_empty() || used <= before {
            return Thresholds::NONE;
        }
        let crossed = self
            .iter()
            .filter(|p| reached(*p, allowance, used) && !reached(*p, allowance, before))
            .fold(0, |bits, p| bits | 1u128 << p);
        Thresholds(crossed)
    }
}

/// Whether `used` has reached `pct` percent of `allowance`.
fn reached(pct: u8, allowance: Quantity, used: Quantity) -> bool {
    used > Quantity::ZERO
        && used.micros().saturating_mul(100) >= i128::from(pct).saturating_mul(allowance.micros())
}

/// A quota's usage reached one of its threshold percentages in a period. Raised at most once
/// per (subscription, meter, period start, pct): [`QuotaThresholdReached::dedupe_id`] is the
/// message id that makes publishing it idempotent across restarts and replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaThresholdReached {
    pub subscription_id: String,
    pub meter: String,
    pub period_start: DateTime<Utc>,
    pub pct: u8,
    /// Usage of the period when it was crossed, and the limit plus live grants it was a
    /// percentage of: context for the webhook's reader.
    pub used: Quantity,
    pub allowance: Quantity,
}

impl QuotaThresholdReached {
    /// `quota-threshold:{subscription}:{meter}:{period start, unix seconds}:{pct}`. Unambiguous
    /// although a meter may contain `:`: the subscription id cannot, and the last two fields
    /// are numbers.
    pub fn dedupe_id(&self) -> String {
        format!(
            "quota-threshold:{}:{}:{}:{}",
            self.subscription_id,
            self.meter,
            self.period_start.timestamp(),
            self.pct
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(units: i64) -> Quantity {
        Quantity::units(units)
    }

    #[test]
    fn crossings_are_the_newly_reached_percentages() {
        let t = Thresholds::from_pcts(&[50, 80, 100]);
        assert_eq!(t.crossed(q(200), q(0), q(99)).to_vec(), Vec::<u8>::new());
        assert_eq!(t.crossed(q(200), q(99), q(100)).to_vec(), vec![50]);
        assert_eq!(t.crossed(q(200), q(100), q(250)).to_vec(), vec![80, 100]);
        assert!(t.crossed(q(200), q(250), q(260)).is_empty());
    }

    #[test]
    fn a_zero_quota_is_reached_by_its_first_unit() {
        let t = Thresholds::from_pcts(&[80, 100]);
        assert!(t.crossed(q(0), q(0), q(0)).is_empty());
        assert_eq!(
            t.crossed(q(0), q(0), Quantity::from_micros(1)).to_vec(),
            vec![80, 100]
        );
    }
}
