//! Quotas (entitlements) on `MeteringService`: `SetQuota`, `RemoveQuota`, `AddGrant`,
//! `VoidGrant`, `SetEntitlement`, `GetQuota` and `CheckQuota`.
//!
//! - Every change is a command: the domain's [`QuotaBook::admit`] against this replica's book
//!   (caught up with the log first), then a [`QuotaEvent`] appended to
//!   `metering.quotas.<tenant>.<subscription>` with the subject's expected last sequence (a
//!   concurrent change on another replica makes the append conflict; the command is retried
//!   on the fresher book), then applied to this replica's book before answering
//!   (read-your-writes: [`book_view::QuotaView::catch_up_to`] the appended sequence).
//! - [`book_view::QuotaView`] is the in-memory projection: one [`QuotaBook`] per tenant (so
//!   tenants never see each other's subscriptions), kept current by a tail of the METERING
//!   stream on every replica. Usage events count against the quota keyed by the event's
//!   `type`, with the event's `data.quantity` (default 1), in the period of the event's
//!   `time`; corrections (void, amend) count as the difference at the original event's time.
//! - A replica answers CheckQuota only once warm (UNAVAILABLE before): it has replayed the
//!   stream up to where it stood when the replica started. The tail writes each
//!   (tenant, subscription, event type, period start) counter to the cache (Redis, or the
//!   in-process cache when embedded) with the stream sequence it reflects (see
//!   [`book_view`]).
//! - Thresholds: a crossing is appended once per (quota, period, percentage) on a subject of
//!   its own with expected sequence 0 (`creto_projections::metering::quotas`), then delivered
//!   to the signed webhook by [`webhook`] from a durable consumer.
//! - A subscription without a quota on an event type: CheckQuota answers NOT_FOUND (nothing is
//!   enforced; the caller decides, typically allowing). A boolean or static entitlement under
//!   that name is read with GetQuota; CheckQuota on it is FAILED_PRECONDITION.
//!
//! [`QuotaBook`]: creto_domain::metering::quota::QuotaBook
//! [`QuotaBook::admit`]: creto_domain::metering::quota::QuotaBook::admit
//! [`QuotaEvent`]: creto_domain::metering::quota::QuotaEvent
pub mod book_view;
pub mod service;
pub mod webhook;

use std::sync::{Arc, LazyLock};

use creto_projections::metering::quotas::QuotasProjector;
use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};

pub use book_view::QuotaView;

use crate::platform::Platform;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// CheckQuota's own time (the book's check, not the gRPC call), by `allow`, `deny` or `soft`.
/// Buckets from 100 ns: the alert QuotaCheckSlow needs boundaries below 10 µs.
pub static QUOTA_CHECK_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let h = register_histogram_vec!(
        "metering_quota_check_duration_seconds",
        "Quota check latency (in-memory book), by action: allow, deny or soft",
        &["action"],
        vec![1e-7, 2.5e-7, 5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 2.5e-5, 1e-4, 1e-3, 1e-2]
    )
    .unwrap();
    for action in ["allow", "deny", "soft"] {
        h.with_label_values(&[action]);
    }
    h
});

/// Checks that found the quota exceeded (denied, or allowed only because it is soft).
pub static QUOTA_EXCEEDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "metering_quota_exceeded_total",
        "Quota checks past the limit (denied or soft), by subscription and event type",
        &["subscription_id", "event_type"]
    )
    .unwrap()
});

/// This replica's quota view (not yet following the stream: [`spawn`] starts its tail).
pub fn start(platform: &Platform) -> Arc<QuotaView> {
    register();
    let s = &platform.settings;
    Arc::new(QuotaView::new(
        platform.log.clone(),
        platform.catalog.clone(),
        s.limits,
        Some((platform.cache.clone(), s.redis_prefix())),
        s.metrics_subscription_label_limit,
    ))
}

/// The background tasks of quotas: on a gateway replica the book's tail and the threshold
/// webhook (when configured); on a projector replica with PostgreSQL the `quotas` projector.
pub fn spawn(
    platform: &Arc<Platform>,
    view: Arc<QuotaView>,
    gateways: bool,
    projectors: bool,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) {
    if gateways {
        tasks.spawn(view.tail(shutdown.clone()));
        let stream = platform.catalog.stream(creto_streams::METERING);
        if let Some(config) = webhook::WebhookConfig::for_stream(&stream) {
            tasks.spawn(webhook::run(
                platform.log.clone(),
                platform.catalog.clone(),
                config,
                shutdown.clone(),
            ));
        }
    }
    if let Some(pool) = platform.pool().filter(|_| projectors) {
        let projector = Arc::new(
            QuotasProjector::new(pool.clone(), platform.catalog.clone())
                .parking_in(platform.log.clone()),
        );
        tasks.spawn(crate::server::supervise_projector(
            platform.clone(),
            projector,
            shutdown.clone(),
        ));
    }
}

/// Registers the metrics so they are served from the start.
pub fn register() {
    LazyLock::force(&QUOTA_CHECK_SECONDS);
    LazyLock::force(&QUOTA_EXCEEDED);
}
