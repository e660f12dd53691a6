//! Prometheus metrics shared by projectors and gateways, with the runbook's names.
//! Each product adds its own beside these; `ops/metrics-contract.txt` lists what alerts use.
use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGaugeVec,
};

pub static PROJECTOR_APPLIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "enablement_projector_applied_total",
        "Events applied by a projector",
        &["product"]
    )
    .unwrap()
});
pub static PROJECTOR_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "enablement_projector_lag_events",
        "Events in the stream not yet applied by the projector",
        &["product"]
    )
    .unwrap()
});
pub static PROJECTOR_BATCH_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "enablement_projector_batch_duration_seconds",
        "Time to apply one batch, commit included",
        &["product"],
        vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
    )
    .unwrap()
});
pub static DEADLETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "enablement_deadletters_total",
        "Events parked in the dead letters",
        &["stream", "reason"]
    )
    .unwrap()
});
pub static STREAM_MESSAGES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "enablement_stream_messages",
        "Messages in a stream",
        &["stream"]
    )
    .unwrap()
});
/// How long the oldest event the audit exporter holds has waited to reach the archive (0:
/// none waits). The archive is what disaster recovery restores: past the export's max age
/// (60 s by default) events are at risk.
pub static AUDIT_UNARCHIVED_SECONDS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "enablement_audit_unarchived_seconds",
        "Seconds the oldest event read by the audit exporter has waited for the archive",
        &["stream"]
    )
    .unwrap()
});
pub static CONSUMER_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "enablement_stream_consumer_pending",
        "Messages not yet delivered to a durable consumer (lag)",
        &["stream", "consumer"]
    )
    .unwrap()
});

pub static METERING_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "metering_events_total",
        "Usage events accepted (each counted once)",
        &["subscription_id", "event_type"]
    )
    .unwrap()
});
pub static METERING_INVALID: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "metering_events_invalid_total",
        "Usage events rejected, by reason",
        &["reason"]
    )
    .unwrap()
});
pub static METERING_AGGREGATION_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "metering_aggregation_duration_seconds",
        "Time to aggregate usage (projector batches and queries)",
        &["aggregation_type"],
        vec![0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .unwrap()
});
pub static METERING_POSTGRES_QUERIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "metering_postgres_queries_total",
        "PostgreSQL queries",
        &["query_type", "status"]
    )
    .unwrap()
});
pub static METERING_REDIS_OPERATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "metering_redis_operations_total",
        "Redis operations",
        &["operation", "status"]
    )
    .unwrap()
});
pub static METERING_INVOICE_GENERATION: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = register_int_counter_vec!(
        "metering_invoice_generation_total",
        "GenerateInvoice outcomes: draft, issued or failed",
        &["status"]
    )
    .unwrap();
    for status in ["draft", "issued", "failed"] {
        c.with_label_values(&[status]);
    }
    c
});
/// Bounds the cardinality of per-subscription labels: the first `limit` distinct values keep
/// their own series, the rest are counted under `other`.
pub struct LabelBudget {
    limit: usize,
    seen: Mutex<HashSet<String>>,
}

impl LabelBudget {
    pub fn new(limit: usize) -> Self {
        LabelBudget {
            limit,
            seen: Mutex::new(HashSet::new()),
        }
    }

    pub fn label<'a>(&self, value: &'a str) -> &'a str {
        let mut seen = self.seen.lock().unwrap();
        if seen.contains(value) {
            return value;
        }
        if seen.len() < self.limit {
            seen.insert(value.to_string());
            return value;
        }
        "other"
    }
}

pub fn status(ok: bool) -> &'static str {
    if ok {
        "success"
    } else {
        "error"
    }
}
