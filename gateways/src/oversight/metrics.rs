//! Oversight's metrics, with the runbook's names (section 7).
use std::sync::LazyLock;

use prometheus::{register_int_counter_vec, register_int_gauge_vec, IntCounterVec, IntGaugeVec};

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "oversight_requests_total",
        "Approval requests created, by agent and policy (\"none\": no policy matched)",
        &["agent_id", "policy_id"]
    )
    .unwrap()
});
pub static RESPONSES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "oversight_responses_total",
        "Approver responses recorded, by decision (approved, denied) and channel",
        &["decision", "channel"]
    )
    .unwrap()
});
pub static PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "oversight_pending_requests",
        "Requests waiting for a decision, by priority",
        &["priority"]
    )
    .unwrap()
});
pub static TIMEOUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "oversight_timeout_total",
        "Deadlines that passed without a decision (timed out or escalated), by policy",
        &["policy_id"]
    )
    .unwrap()
});
pub static TRANSITIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "oversight_state_transitions_total",
        "State transitions of approval requests",
        &["from_state", "to_state"]
    )
    .unwrap()
});

pub fn register() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&RESPONSES);
    LazyLock::force(&PENDING);
    LazyLock::force(&TIMEOUTS);
    LazyLock::force(&TRANSITIONS);
    LazyLock::force(&super::notify::NOTIFICATION_SECONDS);
}
