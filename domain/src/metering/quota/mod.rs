//! Quotas (entitlements): what a subscription may use of a meter, and the check that answers
//! "may it use this much more, now?" in well under two microseconds.
//!
//! Modelled on OpenMeter's entitlements. Each is keyed by (subscription id, meter slug or event
//! type or feature name) and is one of:
//! - **metered**: a limit per usage period, hard (deny past it) or soft (allow and flag), with
//!   threshold percentages that raise `QuotaThresholdReached` once per period, and grants;
//! - **boolean**: a feature switched on or off;
//! - **static**: a configuration value handed back as is.
//!
//! Every change is a command that becomes an event ([`QuotaEvent`]); [`QuotaBook`] is the
//! in-memory projection of those events and of usage, and answers [`QuotaBook::check`].
//!
//! # The rules
//! - **Periods** ([`Period`]): hour, day, month rolling from an anchor, or calendar month from
//!   an anchor day at local midnight, in an IANA time zone; see [`period_bounds`].
//! - **Usage** counts in the period its event time falls in. The book keeps the counter of the
//!   current period only: usage of an earlier period (a late event inside the ingest's grace
//!   window) is billed in its own period but does not count against the current quota.
//! - **Grants** raise the allowance of every period in which they are live
//!   (`effective_from <= t < expires_at`, and before a void): `remaining = limit + live grants −
//!   used`, never below zero. Usage burns the base limit first, then grants by priority (lower
//!   number first), then earliest expiry, then grant id; that order decides each grant's
//!   balance ([`MeteredQuota::grant_balances`]) but not `remaining`. When a grant expires or is
//!   voided, what it covered is not kept: the period's usage then counts against the base limit
//!   and the grants still live, so an expiring grant can put a subscription over its limit. A
//!   grant is a temporary raise of the limit, not a prepaid balance; its amount applies afresh
//!   in every period it overlaps (give a one-off top-up an expiry at the period's end). This
//!   keeps `remaining` a function of sums only, so late events, replays and corrections in any
//!   order give the same answer.
//! - **Limits** deny exactly past the boundary: with `used + quantity == limit + grants` a hard
//!   quota still allows, one micro-unit more and it denies.
//! - **Quantities** are exact: integer micro-units ([`Quantity`]).

mod book;
mod event;
mod key;
mod period;
mod quantity;
mod threshold;

pub use book::{Applied, CheckResult, Entitlement, Grant, MeteredQuota, QuotaBook};
pub use event::{
    ConfigSet, FeatureSet, GrantAdded, GrantVoided, QuotaError, QuotaEvent, QuotaRemoved, QuotaSet,
};
pub use period::{period_bounds, resolve, Period, PeriodKind};
pub use quantity::{Quantity, QuantityError};
pub use threshold::{QuotaThresholdReached, Thresholds};
