//! The oversight read model in PostgreSQL (`migrations/0003_oversight.sql`): approval
//! requests with their current state and folded aggregate, the audit trail of every decision,
//! policies and notification outcomes, projected from the OVERSIGHT stream.
//!
//! The state logic is the domain's ([`creto_domain::oversight::Aggregate::apply`]): the
//! projector only loads the stored aggregate, folds the next event in and writes the result.
//! Enumerations are stored by the names below.

pub mod projector;
pub mod query;

use creto_schemas::oversight::v1::{Channel, Decision, Priority, State};

pub use creto_domain::oversight::request::state_name;
pub use projector::{decode, rebuild, Decoded, OversightProjector, PRODUCT};
pub use query::{get_request, list_policies, list_requests};

/// The read-model tables, in the order a rebuild empties them.
pub const TABLES: &[&str] = &[
    "oversight_requests",
    "oversight_audit",
    "oversight_policies",
    "oversight_notifications",
];

/// `low`, `normal`, `high`, `critical`; `none` for unspecified or unknown values.
pub fn priority_name(p: i32) -> &'static str {
    match Priority::try_from(p) {
        Ok(Priority::Low) => "low",
        Ok(Priority::Normal) => "normal",
        Ok(Priority::High) => "high",
        Ok(Priority::Critical) => "critical",
        Ok(Priority::Unspecified) | Err(_) => "none",
    }
}

/// `approve`, `deny`; `None` for unspecified or unknown values.
pub fn decision_name(d: i32) -> Option<&'static str> {
    match Decision::try_from(d) {
        Ok(Decision::Approve) => Some("approve"),
        Ok(Decision::Deny) => Some("deny"),
        Ok(Decision::Unspecified) | Err(_) => None,
    }
}

/// `slack`, `email`, `webhook`, `web` (the approval page); `None` for unspecified or unknown
/// values.
pub fn channel_name(c: i32) -> Option<&'static str> {
    match Channel::try_from(c) {
        Ok(Channel::Slack) => Some("slack"),
        Ok(Channel::Email) => Some("email"),
        Ok(Channel::Webhook) => Some("webhook"),
        Ok(Channel::Web) => Some("web"),
        Ok(Channel::Unspecified) | Err(_) => None,
    }
}

/// The stored name of a state (`none` for unknown values).
pub fn state_name_of(s: i32) -> &'static str {
    state_name(State::try_from(s).unwrap_or(State::Unspecified))
}
