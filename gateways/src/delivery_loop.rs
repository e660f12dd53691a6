//! The loop shared by the gateways' background deliverers (oversight notifications, quota
//! threshold webhooks): a durable consumer opened and read until shutdown, riding out log
//! outages instead of ending.
use std::sync::Arc;
use std::time::Duration;

use creto_streams::{ConsumerSpec, Delivery, DurableConsumer, EventLog};
use tokio::sync::watch;

/// Opens `spec` on `stream`, retrying every 2 s while the log is unavailable; None at shutdown.
/// `what` names the deliverer in the logs.
pub async fn open(
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

/// The next deliveries (up to 16, waiting up to 500 ms); after a failed fetch, waits a second
/// and answers none. None at shutdown.
pub async fn next(
    consumer: &mut Box<dyn DurableConsumer>,
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<Delivery>> {
    let fetched = tokio::select! {
        d = consumer.fetch(16, Duration::from_millis(500)) => d,
        _ = shutdown.changed() => return None,
    };
    match fetched {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "{what} fetch failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some(Vec::new())
        }
    }
}
