//! The events quota commands become, and the rules a command must pass to become one.
//!
//! A command carries the same fields as the event it becomes: [`QuotaEvent::validate`] holds
//! the rules on the fields alone, [`QuotaBook::admit`](super::QuotaBook::admit) adds those
//! that depend on the current state (a grant needs a metered quota, grant ids are unique).
//! Events in the log are facts: applying one never fails.
use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::period::Period;
use super::quantity::Quantity;
use crate::metering::event::{is_event_type, is_token};

/// Every change to a subscription's entitlements. Serialized with its name as `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum QuotaEvent {
    QuotaSet(QuotaSet),
    QuotaRemoved(QuotaRemoved),
    FeatureSet(FeatureSet),
    ConfigSet(ConfigSet),
    GrantAdded(GrantAdded),
    GrantVoided(GrantVoided),
}

/// Set or change a metered quota. Changing only the limit, hardness or thresholds keeps the
/// period's usage; changing the period starts a new one at the change. Replaces a boolean or
/// static entitlement under the same key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaSet {
    pub subscription_id: String,
    /// A meter slug or an event type.
    pub meter: String,
    pub limit: Quantity,
    pub period: Period,
    /// Deny past the limit; otherwise allow and flag.
    pub hard: bool,
    /// Percentages of the allowance that raise `QuotaThresholdReached`, ascending, 1..=100.
    #[serde(default)]
    pub thresholds_pct: Vec<u8>,
}

/// Remove whatever entitlement (metered, boolean or static) is under the key, with its grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaRemoved {
    pub subscription_id: String,
    /// The meter or feature.
    pub meter: String,
}

/// A boolean entitlement: a feature on or off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSet {
    pub subscription_id: String,
    pub feature: String,
    pub enabled: bool,
}

/// A static entitlement: a configuration value returned as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSet {
    pub subscription_id: String,
    pub feature: String,
    pub value: Value,
}

/// Extra allowance on a metered quota while live: from `effective_from` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantAdded {
    pub subscription_id: String,
    pub meter: String,
    pub grant_id: String,
    pub amount: Quantity,
    /// Lower numbers are consumed first.
    #[serde(default)]
    pub priority: u8,
    pub effective_from: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Ends a grant from the time the void is recorded; the grant stays in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantVoided {
    pub subscription_id: String,
    pub meter: String,
    pub grant_id: String,
}

/// Why a quota command is refused, in words an API caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("`{field}` {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("subscription {subscription_id:?} has no metered quota on {meter:?}: set one before adding or voiding grants")]
    NoQuota {
        subscription_id: String,
        meter: String,
    },
    #[error("subscription {subscription_id:?} has no entitlement on {meter:?}")]
    NotFound {
        subscription_id: String,
        meter: String,
    },
    #[error("grant {grant_id:?} already exists on this quota: grant ids are never reused")]
    DuplicateGrant { grant_id: String },
    #[error("grant {grant_id:?} does not exist on this quota")]
    UnknownGrant { grant_id: String },
    #[error("grant {grant_id:?} is already voided")]
    AlreadyVoided { grant_id: String },
}

fn invalid(field: &'static str, detail: impl Into<String>) -> QuotaError {
    QuotaError::Invalid {
        field,
        detail: detail.into(),
    }
}

/// Largest static value, as JSON text: entitlements are read on hot paths, not a config store.
pub const MAX_CONFIG_BYTES: usize = 4096;
/// Earliest and latest years an anchor or grant time may have: beyond them is a typo, and
/// period arithmetic stays far from chrono's range.
const YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;

impl QuotaEvent {
    /// The subscription and the meter or feature the event is about.
    pub fn key(&self) -> (&str, &str) {
        match self {
            QuotaEvent::QuotaSet(e) => (&e.subscription_id, &e.meter),
            QuotaEvent::QuotaRemoved(e) => (&e.subscription_id, &e.meter),
            QuotaEvent::FeatureSet(e) => (&e.subscription_id, &e.feature),
            QuotaEvent::ConfigSet(e) => (&e.subscription_id, &e.feature),
            QuotaEvent::GrantAdded(e) => (&e.subscription_id, &e.meter),
            QuotaEvent::GrantVoided(e) => (&e.subscription_id, &e.meter),
        }
    }

    /// The rules on the fields alone.
    pub fn validate(&self) -> Result<(), QuotaError> {
        let (subscription_id, key) = self.key();
        check_key(subscription_id, key, self.key_field())?;
        match self {
            QuotaEvent::QuotaSet(e) => e.validate(),
            QuotaEvent::ConfigSet(e) => check_config(&e.value),
            QuotaEvent::GrantAdded(e) => e.validate(),
            QuotaEvent::GrantVoided(e) => check_grant_id(&e.grant_id),
            QuotaEvent::QuotaRemoved(_) | QuotaEvent::FeatureSet(_) => Ok(()),
        }
    }

    fn key_field(&self) -> &'static str {
        match self {
            QuotaEvent::FeatureSet(_) | QuotaEvent::ConfigSet(_) => "feature",
            _ => "meter",
        }
    }
}

impl QuotaSet {
    fn validate(&self) -> Result<(), QuotaError> {
        check_amount("limit", self.limit, true)?;
        check_time("period.anchor", self.period.anchor)?;
        check_thresholds(&self.thresholds_pct)
    }
}

impl GrantAdded {
    fn validate(&self) -> Result<(), QuotaError> {
        check_grant_id(&self.grant_id)?;
        check_amount("amount", self.amount, false)?;
        check_time("effective_from", self.effective_from)?;
        if let Some(expires_at) = self.expires_at {
            check_time("expires_at", expires_at)?;
            if expires_at <= self.effective_from {
                return Err(invalid(
                    "expires_at",
                    format!(
                        "must be after effective_from ({}), got {expires_at}",
                        self.effective_from
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn check_key(subscription_id: &str, key: &str, field: &'static str) -> Result<(), QuotaError> {
    if !is_token(subscription_id) {
        return Err(invalid(
            "subscription_id",
            format!(
                "must be 1-128 characters of letters, digits, _ and -, got {subscription_id:?}"
            ),
        ));
    }
    if !is_event_type(key) {
        return Err(invalid(
            field,
            format!("must be a meter slug or event type (1-128 characters of letters, digits and . _ - / :), got {key:?}"),
        ));
    }
    Ok(())
}

fn check_amount(field: &'static str, q: Quantity, zero_ok: bool) -> Result<(), QuotaError> {
    if q.is_negative() || (!zero_ok && q == Quantity::ZERO) {
        let bound = if zero_ok { ">= 0" } else { "> 0" };
        return Err(invalid(field, format!("must be {bound}, got {q}")));
    }
    if q > Quantity::MAX {
        return Err(invalid(field, format!("must be at most 10^21, got {q}")));
    }
    Ok(())
}

fn check_time(field: &'static str, t: DateTime<Utc>) -> Result<(), QuotaError> {
    if !YEARS.contains(&t.year()) {
        return Err(invalid(
            field,
            format!(
                "must be between the years {} and {}, got {t}",
                YEARS.start(),
                YEARS.end()
            ),
        ));
    }
    Ok(())
}

fn check_thresholds(pcts: &[u8]) -> Result<(), QuotaError> {
    if let Some(bad) = pcts.iter().find(|p| !(1..=100).contains(*p)) {
        return Err(invalid(
            "thresholds_pct",
            format!("must be percentages from 1 to 100, got {bad}"),
        ));
    }
    if pcts.windows(2).any(|w| w[0] >= w[1]) {
        return Err(invalid(
            "thresholds_pct",
            format!("must be ascending without repeats, got {pcts:?}"),
        ));
    }
    Ok(())
}

fn check_grant_id(id: &str) -> Result<(), QuotaError> {
    if !is_token(id) {
        return Err(invalid(
            "grant_id",
            format!("must be 1-128 characters of letters, digits, _ and -, got {id:?}"),
        ));
    }
    Ok(())
}

fn check_config(value: &Value) -> Result<(), QuotaError> {
    let size = value.to_string().len();
    if size > MAX_CONFIG_BYTES {
        return Err(invalid(
            "value",
            format!("is {size} bytes of JSON, the limit is {MAX_CONFIG_BYTES}"),
        ));
    }
    Ok(())
}
