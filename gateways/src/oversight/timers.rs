//! Durable timers: deadlines are part of each request's events, so the timer of every pending
//! request is rebuilt from the log when a replica starts, and an overdue one fires at once.
//! Every replica runs this loop; the append expects the aggregate's last sequence, so when
//! several fire the same deadline exactly one event is stored.
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use creto_domain::oversight::request;
use creto_streams::{EventLog, LogError};
use tokio::sync::watch;

use super::fold::OversightView;
use super::metrics;
use super::service::{count_transitions, request_append};

/// Longest sleep between checks, so a deadline added by another replica is seen in time.
const MAX_SLEEP: Duration = Duration::from_millis(250);
/// Pause after the log refused to store a timeout for a reason other than a conflict.
const FAILED_WRITE_PAUSE: Duration = Duration::from_secs(1);

pub async fn run(
    log: Arc<dyn EventLog>,
    view: Arc<OversightView>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changed = view.subscribe();
    loop {
        let now = Utc::now();
        // Every due deadline in one pipelined batch: thousands of requests may time out in
        // the same second.
        let mut fired = Vec::new();
        let mut appends = Vec::new();
        for (tenant, id) in view.due(now) {
            let Some(agg) = view.get(&tenant, &id) else {
                continue;
            };
            let events = request::on_deadline(&agg, now);
            let [event] = events.as_slice() else {
                continue;
            };
            appends.push(request_append(&view, &tenant, &id, agg.view.version, event));
            fired.push((agg, event.clone()));
        }
        if !appends.is_empty() {
            let results = log.append_batch(appends).await;
            let mut failed = false;
            for ((agg, event), result) in fired.iter().zip(results) {
                match result {
                    Ok(a) => {
                        count_transitions(agg, std::slice::from_ref(event), &[a.sequence()]);
                        metrics::TIMEOUTS
                            .with_label_values(&[&agg.view.policy_id])
                            .inc();
                    }
                    // Someone answered or another replica fired first.
                    Err(LogError::Conflict { .. }) => {}
                    Err(e) => {
                        failed = true;
                        tracing::warn!(error = %e, request = %agg.view.request_id, "timer could not fire; retrying")
                    }
                }
            }
            if let Err(e) = view.catch_up().await {
                tracing::warn!(error = %e, "oversight catch-up after timers failed");
                tokio::time::sleep(MAX_SLEEP).await;
            } else if failed {
                // The log refuses writes but still reads (full, over its limits, denied): the
                // due deadlines are still due, and firing them again at once would spin.
                tokio::select! {
                    _ = tokio::time::sleep(FAILED_WRITE_PAUSE) => {}
                    _ = shutdown.changed() => return,
                }
            }
            continue;
        }
        let sleep = view
            .next_deadline()
            .map(|d| (d - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = changed.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}
