//! Exact quantities for quotas: integer micro-units.
//!
//! An `i128` count of millionths rather than `rust_decimal::Decimal`: the check adds and
//! compares a handful of them on every call, and integer arithmetic on a `Copy` value is as
//! cheap as it gets. Six decimals cover fractional meters (GPU-seconds, dollars of spend);
//! conversions to and from `Decimal` are exact, for the pricing engine.
use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Neg, Sub, SubAssign};
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A quantity in micro-units (10⁻⁶). Arithmetic saturates instead of wrapping; validated
/// inputs stay below [`Quantity::MAX`], so sums of them never get near `i128`'s range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(i128);

/// Why a number is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("must be a finite number, got {0}")]
    NotFinite(String),
    #[error("must be at most 10^21 in magnitude, got {0}")]
    TooLarge(String),
    #[error("may have at most 6 decimals, got {0}")]
    TooPrecise(String),
    #[error("is not a decimal number: {0:?}")]
    Malformed(String),
}

const PER_UNIT: i128 = 1_000_000;

impl Quantity {
    pub const ZERO: Quantity = Quantity(0);
    /// Decimals kept.
    pub const SCALE: u32 = 6;
    /// The largest magnitude accepted from outside: 10^21 units, so that sums of millions of
    /// them still fit a `Decimal` (96-bit mantissa) exactly.
    pub const MAX: Quantity = Quantity(1_000_000_000_000_000_000_000 * PER_UNIT);

    pub const fn from_micros(micros: i128) -> Quantity {
        Quantity(micros)
    }

    pub const fn units(units: i64) -> Quantity {
        Quantity(units as i128 * PER_UNIT)
    }

    pub const fn micros(self) -> i128 {
        self.0
    }

    /// From a float (usage events carry JSON numbers), rounded to the nearest micro-unit.
    pub fn from_f64(x: f64) -> Result<Quantity, QuantityError> {
        if !x.is_finite() {
            return Err(QuantityError::NotFinite(x.to_string()));
        }
        let micros = (x * PER_UNIT as f64).round();
        if micros.abs() > Quantity::MAX.0 as f64 {
            return Err(QuantityError::TooLarge(x.to_string()));
        }
        Ok(Quantity(micros as i128))
    }

    pub fn to_f64(self) -> f64 {
        self.0 as f64 / PER_UNIT as f64
    }

    /// Exact: refuses more than six decimals rather than rounding them away.
    pub fn from_decimal(d: Decimal) -> Result<Quantity, QuantityError> {
        let d = d.normalize();
        if d.scale() > Self::SCALE {
            return Err(QuantityError::TooPrecise(d.to_string()));
        }
        let micros = d.mantissa() * 10i128.pow(Self::SCALE - d.scale());
        if micros.abs() > Quantity::MAX.0 {
            return Err(QuantityError::TooLarge(d.to_string()));
        }
        Ok(Quantity(micros))
    }

    /// Exact; fails only past a `Decimal`'s range (±7.9 × 10^22 units), which sums of
    /// validated quantities do not reach.
    pub fn to_decimal(self) -> Result<Decimal, QuantityError> {
        Decimal::try_from_i128_with_scale(self.0, Self::SCALE)
            .map(|d| d.normalize())
            .map_err(|_| QuantityError::TooLarge(self.to_string()))
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Itself, or zero when negative.
    pub fn floor_zero(self) -> Quantity {
        Quantity(self.0.max(0))
    }
}

impl Add for Quantity {
    type Output = Quantity;
    fn add(self, rhs: Quantity) -> Quantity {
        Quantity(self.0.saturating_add(rhs.0))
    }
}

impl Sub for Quantity {
    type Output = Quantity;
    fn sub(self, rhs: Quantity) -> Quantity {
        Quantity(self.0.saturating_sub(rhs.0))
    }
}

impl Neg for Quantity {
    type Output = Quantity;
    fn neg(self) -> Quantity {
        Quantity(self.0.saturating_neg())
    }
}

impl AddAssign for Quantity {
    fn add_assign(&mut self, rhs: Quantity) {
        *self = *self + rhs;
    }
}

impl SubAssign for Quantity {
    fn sub_assign(&mut self, rhs: Quantity) {
        *self = *self - rhs;
    }
}

impl Sum for Quantity {
    fn sum<I: Iterator<Item = Quantity>>(iter: I) -> Quantity {
        iter.fold(Quantity::ZERO, Add::add)
    }
}

/// Plain decimal notation without trailing zeros: "12.5", "-0.000001", "3".
impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let whole = self.0.unsigned_abs() / PER_UNIT as u128;
        let fraction = self.0.unsigned_abs() % PER_UNIT as u128;
        if fraction == 0 {
            return write!(f, "{sign}{whole}");
        }
        let digits = format!("{fraction:06}");
        write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Quantity, QuantityError> {
        let d = Decimal::from_str_exact(s.trim())
            .map_err(|_| QuantityError::Malformed(s.to_string()))?;
        Quantity::from_decimal(d)
    }
}

/// Written as a decimal string ("12.5"), so no reader rounds it through a float.
impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from a decimal string (exact) or a JSON number (rounded to micro-units).
impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Quantity, D::Error> {
        d.deserialize_any(QuantityVisitor)
    }
}

struct QuantityVisitor;

impl de::Visitor<'_> for QuantityVisitor {
    type Value = Quantity;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a decimal number or a decimal string with at most 6 decimals")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Quantity, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Quantity, E> {
        Ok(Quantity::units(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Quantity, E> {
        Ok(Quantity(v as i128 * PER_UNIT))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Quantity, E> {
        Quantity::from_f64(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_text_round_trips_exactly() {
        for s in [
            "0",
            "1",
            "0.000001",
            "12.5",
            "-3.25",
            "-0.000001",
            "1000000000000000000000",
        ] {
            let q: Quantity = s.parse().unwrap();
            assert_eq!(q.to_string(), s);
        }
        assert_eq!("0.1".parse::<Quantity>().unwrap().micros(), 100_000);
    }

    #[test]
    fn converts_to_decimal_exactly() {
        let q: Quantity = "123.000450".parse().unwrap();
        assert_eq!(q.to_decimal().unwrap().to_string(), "123.00045");
        assert_eq!(Quantity::from_decimal(q.to_decimal().unwrap()), Ok(q));
        assert!(Quantity::from_micros(i128::MAX).to_decimal().is_err());
    }

    #[test]
    fn refuses_what_it_cannot_hold_exactly() {
        assert!(matches!(
            "0.0000001".parse::<Quantity>(),
            Err(QuantityError::TooPrecise(_))
        ));
        assert!(matches!(
            "1e3".parse::<Quantity>(),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            Quantity::from_f64(f64::NAN),
            Err(QuantityError::NotFinite(_))
        ));
        assert!(matches!(
            Quantity::from_f64(1e22),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn serde_writes_strings_and_reads_numbers_too() {
        let q: Quantity = serde_json::from_str("2.5").unwrap();
        assert_eq!(q, Quantity::from_micros(2_500_000));
        assert_eq!(serde_json::to_string(&q).unwrap(), r#""2.5""#);
        assert_eq!(serde_json::from_str::<Quantity>(r#""2.5""#).unwrap(), q);
        assert_eq!(
            serde_json::from_str::<Quantity>("7").unwrap(),
            Quantity::units(7)
        );
        let err = serde_json::from_str::<Quantity>(r#""ten""#).unwrap_err();
        assert!(err.to_string().contains("not a decimal number"), "{err}");
    }
}
