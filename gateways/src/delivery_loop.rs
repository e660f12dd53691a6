//! The loop shared by the gateways' background deliverers (oversight notifications, quota
//! threshold webhooks): a durable consumer opened and read until shutdown, riding out log
//! outages instead of ending.
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use creto_streams::{ConsumerSpec, Delivery, DurableConsumer, EventLog, ReplayFrom};
use tokio::sync::watch;

/// Failed fetches in a row after which the consumer is opened again: it may be gone (deleted
/// by hand, its stream recreated), and fetching from it would fail for ever.
const REOPEN_AFTER_FAILURES: u32 = 5;

/// A durable consumer of one deliverer.
pub struct Deliverer {
    log: Arc<dyn EventLog>,
    stream: String,
    spec: ConsumerSpec,
    /// Names the deliverer in the logs.
    what: &'static str,
    consumer: Box<dyn DurableConsumer>,
    failures: u32,
    /// When the current run of failed fetches began.
    failing_since: Option<DateTime<Utc>>,
}

impl Deliverer {
    /// Opens `spec` on `stream`, retrying every 2 s while the log is unavailable; None at
    /// shutdown.
    pub async fn open(
        log: Arc<dyn EventLog>,
        stream: String,
        spec: ConsumerSpec,
        what: &'static str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Deliverer> {
        let consumer = open(&log, &stream, &spec, what, shutdown).await?;
        Some(Deliverer {
            log,
            stream,
            spec,
            what,
            consumer,
            failures: 0,
            failing_since: None,
        })
    }

    /// The next deliveries (up to 16, waiting up to 500 ms); after a failed fetch, waits a
    /// second and answers none, and after [`REOPEN_AFTER_FAILURES`] in a row opens the
    /// consumer again. None at shutdown.
    pub async fn next(&mut self, shutdown: &mut watch::Receiver<bool>) -> Option<Vec<Delivery>> {
        let fetched = tokio::select! {
            d = self.consumer.fetch(16, Duration::from_millis(500)) => d,
            _ = shutdown.changed() => return None,
        };
        match fetched {
            Ok(d) => {
                self.failures = 0;
                self.failing_since = None;
                Some(d)
            }
            Err(e) => {
                let what = self.what;
                tracing::warn!(error = %e, "{what} fetch failed; retrying");
                self.failures += 1;
                let since = *self.failing_since.get_or_insert_with(Utc::now);
                if self.failures >= REOPEN_AFTER_FAILURES {
                    tracing::warn!("{what}: opening its consumer again");
                    // An existing consumer is bound as it is; one that is gone is made again
                    // from shortly before the failures began, not from its first start (which
                    // announced, or re-sent, everything since then again).
                    let spec = ConsumerSpec {
                        start: ReplayFrom::Time(since - chrono::Duration::seconds(1)),
                        ..self.spec.clone()
                    };
                    self.consumer = open(&self.log, &self.stream, &spec, what, shutdown).await?;
                    self.failures = 0;
                    self.failing_since = None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return None,
                }
                Some(Vec::new())
            }
        }
    }
}

async fn open(
    log: &Arc<dyn EventLog>,
    stream: &str,
    spec: &ConsumerSpec,
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Box<dyn DurableConsumer>> {
    loop {
        match log.consumer(stream, spec.clone()).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "{what} cannot open its consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => return None,
                }
            }
        }
    }
}
