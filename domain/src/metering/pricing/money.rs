//! Currencies and the one rounding rule of the pricing engine.
//!
//! Amounts are `rust_decimal::Decimal`: exact base-10 arithmetic, so 0.1 + 0.2 is 0.3 and a
//! replayed invoice comes out to the same digits. An amount is meaningless without its
//! currency, and the currency decides how many decimals an amount on an invoice may have
//! (its ISO 4217 minor unit: 2 for USD, 0 for JPY, 3 for KWD).
//!
//! Rounding rule: **half-up** (midpoint away from zero; every amount here is ≥ 0, so this is
//! the schoolbook "5 rounds up"), as Stripe and Lago do, rather than banker's rounding.
//! Rounding happens exactly once per invoice line (a charge's line, or a minimum adjustment), to
//! the currency's minor unit; tier breakdowns stay exact, and subtotal and total are sums of
//! already rounded lines, so an invoice always adds up to the cent as printed.
use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{de, Deserialize, Deserializer, Serialize};

use super::PricingError;

/// An ISO 4217 currency this engine knows the minor unit of. Unknown codes are refused rather
/// than guessed: a wrong exponent would misprice every invoice in that currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
}

/// (code, minor-unit exponent), from ISO 4217. Sorted by code.
const CURRENCIES: &[(&str, u32)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PLN", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

impl Currency {
    /// Looks up an upper-case ISO 4217 code (`"USD"`); anything else is an error.
    pub fn parse(code: &str) -> Result<Currency, PricingError> {
        CURRENCIES
            .binary_search_by(|(c, _)| (*c).cmp(code))
            .map(|i| Currency {
                code: CURRENCIES[i].0,
                minor_units: CURRENCIES[i].1,
            })
            .map_err(|_| PricingError::UnknownCurrency(code.to_string()))
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Decimals of the smallest unit: 2 for USD (cents), 0 for JPY, 3 for KWD (fils).
    pub fn minor_units(&self) -> u32 {
        self.minor_units
    }

    /// Rounds half-up to the minor unit and sets the scale to it, so `5` prints as `5.00` in
    /// USD and the stored JSON of an invoice shows every amount the same way.
    pub fn round(&self, amount: Decimal) -> Decimal {
        let mut rounded =
            amount.round_dp_with_strategy(self.minor_units, RoundingStrategy::MidpointAwayFromZero);
        rounded.rescale(self.minor_units);
        rounded
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

/// By hand rather than derived: the code is a `&'static str` from the table, which a derived
/// impl would want to borrow from the input.
impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::parse(&code).map_err(de::Error::custom)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.code.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn table_is_sorted_so_binary_search_works() {
        assert!(CURRENCIES.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn known_codes_carry_their_exponent_and_unknown_ones_are_refused() {
        assert_eq!(Currency::parse("USD").unwrap().minor_units(), 2);
        assert_eq!(Currency::parse("JPY").unwrap().minor_units(), 0);
        assert_eq!(Currency::parse("KWD").unwrap().minor_units(), 3);
        assert_eq!(
            Currency::parse("usd"),
            Err(PricingError::UnknownCurrency("usd".into()))
        );
        assert!(Currency::parse("XXX").is_err());
    }

    #[test]
    fn rounds_half_up_to_the_minor_unit() {
        let usd = Currency::parse("USD").unwrap();
        // 0.125 is a midpoint: half-up gives 0.13 (banker's would give 0.12).
        assert_eq!(usd.round(d("0.125")).to_string(), "0.13");
        assert_eq!(usd.round(d("0.135")).to_string(), "0.14");
        assert_eq!(usd.round(d("0.1249999")).to_string(), "0.12");
        assert_eq!(usd.round(d("5")).to_string(), "5.00");
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(jpy.round(d("100.5")).to_string(), "101");
        let kwd = Currency::parse("KWD").unwrap();
        assert_eq!(kwd.round(d("1.0005")).to_string(), "1.001");
    }

    #[test]
    fn serializes_as_its_code_and_validates_on_the_way_in() {
        let usd = Currency::parse("USD").unwrap();
        assert_eq!(serde_json::to_string(&usd).unwrap(), "\"USD\"");
        assert_eq!(serde_json::from_str::<Currency>("\"USD\"").unwrap(), usd);
        assert!(serde_json::from_str::<Currency>("\"ABC\"").is_err());
    }
}
