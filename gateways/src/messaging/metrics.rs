//! Messaging's metrics, with the runbook's names (section 7). The `sender_id` and
//! `recipient_id` labels are `<tenant>/<agent>` (validated ids, never free text), so the same
//! agent name in two tenants stays two series.
use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGaugeVec,
};

pub static SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "messaging_messages_sent_total",
        "Send calls by sender and outcome (accepted, duplicate, or the reason refused)",
        &["sender_id", "status"]
    )
    .unwrap()
});
pub static RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "messaging_messages_received_total",
        "Messages delivered to a recipient for the first time",
        &["recipient_id"]
    )
    .unwrap()
});
/// The server never encrypts: this times its cryptographic checks of an envelope (decoding
/// the suite and verifying the Ed25519 signature over header, stanzas and ciphertext).
pub static ENCRYPTION_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "messaging_encryption_duration_seconds",
        "Time the server spends on an envelope's cryptographic checks, by suite",
        &["algorithm"],
        vec![0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01]
    )
    .unwrap()
});
pub static DELIVERY_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "messaging_delivery_duration_seconds",
        "From storing a message to handing it to its recipient (delivered, redelivered, expired)",
        &["status"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 60.0]
    )
    .unwrap()
});
pub static QUEUE_DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "messaging_queue_depth",
        "Messages handed to a connected recipient and not yet acknowledged, per replica (the series goes when the recipient disconnects)",
        &["recipient_id"]
    )
    .unwrap()
});
pub static SIGNATURE_VERIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "messaging_signature_verification_total",
        "Envelope signature checks by outcome (valid, invalid)",
        &["status"]
    )
    .unwrap()
});

/// Registers every series family so /metrics lists them before the first message.
pub fn register() {
    LazyLock::force(&SENT);
    LazyLock::force(&RECEIVED);
    LazyLock::force(&ENCRYPTION_SECONDS);
    LazyLock::force(&DELIVERY_SECONDS);
    LazyLock::force(&QUEUE_DEPTH);
    LazyLock::force(&SIGNATURE_VERIFICATIONS);
}

/// The label value of an agent: `<tenant>/<agent>`.
pub fn agent_label(tenant: &str, agent: &str) -> String {
    format!("{tenant}/{agent}")
}
