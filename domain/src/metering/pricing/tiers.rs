//! The price of one charge for one quantity over one whole period, exact (not yet rounded).
//!
//! Rounding to the currency's minor unit happens once, on the invoice line (see
//! [`super::money`]); everything here is exact so that a tier breakdown adds up to the
//! unrounded line amount digit for digit.
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::plan::{ChargeModel, Tier};
use super::{add, mul, sum, PricingError};

/// How much of the quantity one tier priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierLine {
    /// Index into the charge's tiers, from 0.
    pub tier: usize,
    /// The tier covers quantities above `from` up to and including `to` (`None`: no limit).
    pub from: Decimal,
    pub to: Option<Decimal>,
    /// Units priced at this tier's price: the slice of the quantity inside the tier
    /// (graduated), or the whole quantity (volume).
    pub units: Decimal,
    pub unit_price: Decimal,
    pub flat_fee: Decimal,
    /// `units × unit_price + flat_fee`, exact.
    pub amount: Decimal,
}

/// What a charge costs for a quantity, before proration and rounding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargePrice {
    /// Exact amount; the sum of `tiers` amounts for tiered models.
    pub amount: Decimal,
    /// The tiers that priced some usage, in tier order (empty for the other models).
    pub tiers: Vec<TierLine>,
    /// Packages billed, for the package model.
    pub packages: Option<Decimal>,
}

impl ChargePrice {
    fn plain(amount: Decimal) -> ChargePrice {
        ChargePrice {
            amount,
            tiers: Vec::new(),
            packages: None,
        }
    }
}

/// Prices `quantity` (≥ 0) of a charge for one whole period. `Flat` ignores the quantity; no
/// usage costs nothing in every other model, tier flat fees included (a fee that must be paid
/// regardless of usage is a `Flat` charge or a minimum).
pub fn price_charge(model: &ChargeModel, quantity: Decimal) -> Result<ChargePrice, PricingError> {
    model.check().map_err(PricingError::InvalidCharge)?;
    if quantity < Decimal::ZERO {
        return Err(PricingError::NegativeQuantity(quantity));
    }
    match model {
        ChargeModel::Flat { amount } => Ok(ChargePrice::plain(*amount)),
        ChargeModel::PerUnit { unit_price } => Ok(ChargePrice::plain(mul(quantity, *unit_price)?)),
        ChargeModel::Graduated { tiers } => graduated(tiers, quantity),
        ChargeModel::Volume { tiers } => volume(tiers, quantity),
        ChargeModel::Package {
            package_size,
            package_price,
        } => package(*package_size, *package_price, quantity),
    }
}

/// Each tier with the bound it starts above: 0 for the first, the previous `up_to` after.
fn with_lower_bounds(tiers: &[Tier]) -> impl Iterator<Item = (usize, Decimal, &Tier)> {
    let lowers =
        std::iter::once(Decimal::ZERO).chain(tiers.iter().map(|t| t.up_to.unwrap_or(Decimal::MAX)));
    tiers
        .iter()
        .zip(lowers)
        .enumerate()
        .map(|(i, (tier, from))| (i, from, tier))
}

fn tier_line(
    index: usize,
    from: Decimal,
    tier: &Tier,
    units: Decimal,
) -> Result<TierLine, PricingError> {
    Ok(TierLine {
        tier: index,
        from,
        to: tier.up_to,
        units,
        unit_price: tier.unit_price,
        flat_fee: tier.fee(),
        amount: add(mul(units, tier.unit_price)?, tier.fee())?,
    })
}

/// Slices the quantity across the tiers it reaches: with tiers up to 100 and up to 1,000, a
/// quantity of 250 is 100 units in tier 0 and 150 in tier 1.
fn graduated(tiers: &[Tier], quantity: Decimal) -> Result<ChargePrice, PricingError> {
    let lines = with_lower_bounds(tiers)
        .take_while(|&(_, from, _)| quantity > from)
        .map(|(i, from, tier)| {
            let top = tier.up_to.map_or(quantity, |up_to| quantity.min(up_to));
            tier_line(i, from, tier, top - from)
        })
        .collect::<Result<Vec<_>, _>>()?;
    tiered(lines)
}

/// The whole quantity at the price of the first tier whose `up_to` is at least the quantity
/// (bounds are inclusive: exactly 100 units is in the "up to 100" tier).
fn volume(tiers: &[Tier], quantity: Decimal) -> Result<ChargePrice, PricingError> {
    if quantity.is_zero() {
        return tiered(Vec::new());
    }
    let (i, from, tier) = with_lower_bounds(tiers)
        .find(|(_, _, t)| t.up_to.is_none_or(|up_to| quantity <= up_to))
        .expect("a validated tier list ends unbounded");
    tiered(vec![tier_line(i, from, tier, quantity)?])
}

fn tiered(lines: Vec<TierLine>) -> Result<ChargePrice, PricingError> {
    Ok(ChargePrice {
        amount: sum(lines.iter().map(|l| l.amount))?,
        tiers: lines,
        packages: None,
    })
}

/// Started packages: ⌈quantity / size⌉. Division may be inexact (1 / 3), so the quotient is
/// only a first guess, corrected by multiplying back: exact whatever the digits.
fn package(size: Decimal, price: Decimal, quantity: Decimal) -> Result<ChargePrice, PricingError> {
    let mut packages = quantity
        .checked_div(size)
        .ok_or(PricingError::Overflow)?
        .floor();
    if mul(packages, size)? < quantity {
        packages += Decimal::ONE;
    }
    Ok(ChargePrice {
        amount: mul(packages, price)?,
        tiers: Vec::new(),
        packages: Some(packages),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tier(up_to: Option<&str>, price: &str, fee: Option<&str>) -> Tier {
        Tier {
            up_to: up_to.map(d),
            unit_price: d(price),
            flat_fee: fee.map(d),
        }
    }

    /// 0–100 at 0.10 with a 5.00 fee, 100–1,000 at 0.05, above at 0.01 with a 2.00 fee.
    fn three_tiers() -> Vec<Tier> {
        vec![
            tier(Some("100"), "0.10", Some("5")),
            tier(Some("1000"), "0.05", None),
            tier(None, "0.01", Some("2")),
        ]
    }

    fn price(model: &ChargeModel, q: &str) -> ChargePrice {
        price_charge(model, d(q)).unwrap()
    }

    #[test]
    fn graduated_prices_each_slice_at_its_tier() {
        let m = ChargeModel::Graduated {
            tiers: three_tiers(),
        };
        // 1,500 units: 100 × 0.10 + 5 = 15.00; 900 × 0.05 = 45.00; 500 × 0.01 + 2 = 7.00.
        // Total 67.00.
        let p = price(&m, "1500");
        assert_eq!(p.amount, d("67"));
        let slices: Vec<_> = p
            .tiers
            .iter()
            .map(|t| (t.tier, t.from, t.units, t.amount))
            .collect();
        assert_eq!(
            slices,
            vec![
                (0, d("0"), d("100"), d("15")),
                (1, d("100"), d("900"), d("45")),
                (2, d("1000"), d("500"), d("7")),
            ]
        );
        // Exactly on a bound stays in the lower tier: 100 units = 100 × 0.10 + 5 = 15.00.
        let p = price(&m, "100");
        assert_eq!((p.amount, p.tiers.len()), (d("15"), 1));
        // 100.5 units reach tier 1 for 0.5 units: 15 + 0.5 × 0.05 = 15.025.
        assert_eq!(price(&m, "100.5").amount, d("15.025"));
        // No usage, no tier reached, no fee.
        let p = price(&m, "0");
        assert_eq!((p.amount, p.tiers.len()), (d("0"), 0));
    }

    #[test]
    fn volume_prices_everything_at_the_tier_of_the_total() {
        let m = ChargeModel::Volume {
            tiers: three_tiers(),
        };
        // 1,500 units are in tier 2: 1,500 × 0.01 + 2 = 17.00.
        let p = price(&m, "1500");
        assert_eq!(p.amount, d("17"));
        assert_eq!((p.tiers[0].tier, p.tiers[0].units), (2, d("1500")));
        // 1,000 is in tier 1 (inclusive bound): 1,000 × 0.05 = 50.00; 1,001 drops to 12.01.
        assert_eq!(price(&m, "1000").amount, d("50"));
        assert_eq!(price(&m, "1001").amount, d("12.01"));
        // 1 unit: 0.10 + 5 = 5.10. Zero: nothing.
        assert_eq!(price(&m, "1").amount, d("5.1"));
        assert_eq!(price(&m, "0").amount, d("0"));
    }

    #[test]
    fn package_rounds_up_to_started_packages() {
        let m = ChargeModel::Package {
            package_size: d("100"),
            package_price: d("2.50"),
        };
        // 0 → 0 packages; 1 and 100 → 1 (2.50); 101 → 2 (5.00); 250.5 → 3 (7.50).
        for (q, packages, amount) in [
            ("0", "0", "0"),
            ("1", "1", "2.5"),
            ("100", "1", "2.5"),
            ("101", "2", "5"),
            ("250.5", "3", "7.5"),
        ] {
            let p = price(&m, q);
            assert_eq!(
                (p.packages, p.amount),
                (Some(d(packages)), d(amount)),
                "{q}"
            );
        }
        // A package of 3 where 1/3 is not exact in decimal: 10 units → ⌈3.33…⌉ = 4 packages.
        let thirds = ChargeModel::Package {
            package_size: d("3"),
            package_price: d("1"),
        };
        assert_eq!(price(&thirds, "10").packages, Some(d("4")));
        assert_eq!(price(&thirds, "9").packages, Some(d("3")));
    }

    #[test]
    fn per_unit_and_flat() {
        let m = ChargeModel::PerUnit {
            unit_price: d("0.0004"),
        };
        // 12,345 × 0.0004 = 4.938, exact before rounding.
        assert_eq!(price(&m, "12345").amount, d("4.938"));
        let f = ChargeModel::Flat { amount: d("49") };
        assert_eq!(price(&f, "0").amount, d("49"));
        assert_eq!(price(&f, "1000000").amount, d("49"));
    }

    #[test]
    fn refuses_invalid_models_negative_quantities_and_overflow() {
        let bad = ChargeModel::Volume { tiers: vec![] };
        assert!(matches!(
            price_charge(&bad, d("1")),
            Err(PricingError::InvalidCharge(_))
        ));
        let m = ChargeModel::PerUnit { unit_price: d("1") };
        assert_eq!(
            price_charge(&m, d("-1")),
            Err(PricingError::NegativeQuantity(d("-1")))
        );
        let huge = ChargeModel::PerUnit {
            unit_price: Decimal::MAX,
        };
        assert_eq!(price_charge(&huge, d("2")), Err(PricingError::Overflow));
    }
}
