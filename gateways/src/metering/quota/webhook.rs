//! Delivers each `QuotaThresholdReached` to a signed webhook, from a durable consumer of
//! `metering.thresholds.>`: a crossing is acknowledged only after the receiver answered 2xx,
//! so a crash or a receiver that is down delays a delivery but never loses it, and one that
//! was acknowledged is never sent again (restarts and replays included: a replay appends no
//! second crossing, see `creto_projections::metering::quotas`). The only repeat is a crash
//! between the receiver's answer and the acknowledgement; receivers deduplicate on
//! `X-Creto-Event-Id`.
//!
//! Configuration (environment):
//!
//! | variable | meaning |
//! |---|---|
//! | `METERING_THRESHOLD_WEBHOOK_URL` | where to POST (unset: no deliveries; crossings wait in the log) |
//! | `METERING_THRESHOLD_WEBHOOK_SECRET` | the HMAC-SHA256 key |
//! | `METERING_THRESHOLD_WEBHOOK_ATTEMPTS` | attempts per delivery before it is retried later (default 5) |
//! | `METERING_THRESHOLD_WEBHOOK_BACKOFF` | delay after the first failure, doubling up to 10 s (humantime, default `200ms`) |
//!
//! Signed like oversight's webhook (`crate::oversight::notify::webhook`, which has
//! `verify_signature`): `X-Creto-Timestamp` (unix seconds) and
//! `X-Creto-Signature: v1=hex(HMAC-SHA256(secret, "<timestamp>.<body>"))`. Body:
//!
//! ```json
//! {"id": "acme:quota-threshold:sub_1:agent.execution:1764547200:80", "type": "QuotaThresholdReached",
//!  "tenant": "acme", "subscription_id": "sub_1", "event_type": "agent.execution",
//!  "period_start": "2025-12-01T00:00:00Z", "pct": 80, "used": "80", "allowance": "100",
//!  "sequence": 42}
//! ```
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use creto_projections::metering::quotas::{decode_quota, threshold_dedupe_id, QuotaFact};
use creto_streams::{AckMode, Catalog, ConsumerSpec, EventLog, ReplayFrom, METERING};
use serde_json::json;
use tokio::sync::watch;

use crate::oversight::notify::webhook::{signature, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::oversight::notify::{check_response, describe_http_error};

pub const DURABLE: &str = "metering-threshold-webhook";
pub const EVENT_ID_HEADER: &str = "X-Creto-Event-Id";

static OVERRIDES: std::sync::LazyLock<Mutex<HashMap<String, WebhookConfig>>> =
    std::sync::LazyLock::new(Default::default);

/// Sets the webhook of the gateways started from now on with the stream named `stream`
/// (tests and embedders that run several platforms in one process), instead of the
/// environment's.
pub fn set_for_stream(stream: &str, config: WebhookConfig) {
    OVERRIDES
        .lock()
        .expect("webhook overrides lock")
        .insert(stream.to_string(), config);
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: Option<String>,
    pub attempts: u32,
    pub backoff: Duration,
    pub timeout: Duration,
}

impl WebhookConfig {
    /// The configuration set for the stream named `stream` by [`set_for_stream`], else the
    /// environment's.
    pub fn for_stream(stream: &str) -> Option<WebhookConfig> {
        let overrides = OVERRIDES.lock().expect("webhook overrides lock");
        match overrides.get(stream) {
            Some(c) => Some(c.clone()),
            None => Self::from_env(),
        }
    }

    /// `None` without `METERING_THRESHOLD_WEBHOOK_URL`.
    pub fn from_env() -> Option<WebhookConfig> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Option<WebhookConfig> {
        let url = var("METERING_THRESHOLD_WEBHOOK_URL").filter(|u| !u.trim().is_empty())?;
        Some(WebhookConfig {
            url,
            secret: var("METERING_THRESHOLD_WEBHOOK_SECRET").filter(|s| !s.is_empty()),
            attempts: var("METERING_THRESHOLD_WEBHOOK_ATTEMPTS")
                .and_then(|a| a.parse().ok())
                .unwrap_or(5)
                .max(1),
            backoff: var("METERING_THRESHOLD_WEBHOOK_BACKOFF")
                .and_then(|b| humantime::parse_duration(&b).ok())
                .unwrap_or(Duration::from_millis(200)),
            timeout: Duration::from_secs(10),
        })
    }
}

struct Sender {
    http: reqwest::Client,
    config: WebhookConfig,
}

impl Sender {
    async fn post(&self, id: &str, body: &[u8]) -> Result<(), String> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string();
        let mut req = self
            .http
            .post(&self.config.url)
            .header("Content-Type", "application/json")
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(EVENT_ID_HEADER, id)
            .body(body.to_vec());
        if let Some(secret) = &self.config.secret {
            req = req.header(
                SIGNATURE_HEADER,
                signature(secret.as_bytes(), &timestamp, body),
            );
        }
        let resp = req.send().await.map_err(describe_http_error)?;
        check_response(resp).await
    }

    /// Attempts with exponential backoff; the last error when all failed. An attempt under
    /// way when shutdown comes is finished (so a call the receiver took is acknowledged),
    /// but none is started after it.
    async fn deliver(
        &self,
        id: &str,
        body: &[u8],
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut delay = self.config.backoff;
        let mut last = String::new();
        for attempt in 1..=self.config.attempts {
            match self.post(id, body).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(id, attempt, error = %e, "threshold webhook attempt failed");
                    last = e;
                    if *shutdown.borrow() {
                        break;
                    }
                    if attempt < self.config.attempts {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
        Err(last)
    }
}

/// Runs until shutdown; one replica at a time gets each crossing (a shared durable consumer).
pub async fn run(
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    config: WebhookConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    if config.secret.is_none() {
        tracing::warn!("METERING_THRESHOLD_WEBHOOK_URL is set but METERING_THRESHOLD_WEBHOOK_SECRET is not: threshold webhooks go unsigned");
    }
    let sender = Sender {
        http: reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("creto-metering/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client"),
        config,
    };
    let stream = catalog.stream(METERING);
    let spec = ConsumerSpec {
        filter_subject: Some(catalog.subject("metering.thresholds.>")),
        ack: AckMode::Each,
        // A naked crossing comes back every 30 s (after its own attempts): about a day of
        // receiver outage before it is dead-lettered (max_deliveries; DeadLettersGrowing
        // pages). 50 gave up after well under an hour.
        max_deliver: 2_880,
        // Longer than all attempts of one delivery together.
        ack_wait: Duration::from_secs(300),
        // Every crossing ever appended is delivered once, including those appended before
        // the consumer first existed.
        start: ReplayFrom::Start,
        ..ConsumerSpec::new(DURABLE)
    };
    let Some(mut deliverer) = crate::delivery_loop::Deliverer::open(
        log.clone(),
        stream,
        spec,
        "threshold webhook",
        &mut shutdown,
    )
    .await
    else {
        return;
    };
    while let Some(deliveries) = deliverer.next(&mut shutdown).await {
        for d in deliveries {
            if *shutdown.borrow() {
                // The rest come back to whichever replica runs next.
                return;
            }
            let fact = match decode_quota(&catalog, &d.event) {
                Some(Ok(QuotaFact::Threshold(t))) => t,
                Some(Err(detail)) => {
                    let _ = d.dead_letter("unreadable_threshold", &detail).await;
                    continue;
                }
                _ => {
                    let _ = d.ack().await;
                    continue;
                }
            };
            let id = threshold_dedupe_id(&fact.tenant, &fact.reached);
            let r = &fact.reached;
            let body = json!({
                "id": id,
                "type": "QuotaThresholdReached",
                "tenant": fact.tenant,
                "subscription_id": r.subscription_id,
                "event_type": r.meter,
                "period_start": r.period_start,
                "pct": r.pct,
                "used": r.used.to_string(),
                "allowance": r.allowance.to_string(),
                "sequence": d.event.sequence,
            })
            .to_string();
            let outcome = sender.deliver(&id, body.as_bytes(), &shutdown).await;
            match outcome {
                Ok(()) => {
                    let _ = d.ack().await;
                }
                Err(e) => {
                    let naked = d.nak(Duration::from_secs(30), &e).await;
                    if matches!(naked, Ok(creto_streams::NakOutcome::DeadLettered)) {
                        // Counted like the projectors' dead letters: DeadLettersGrowing pages.
                        creto_projections::metrics::DEADLETTERS
                            .with_label_values(&[METERING, "max_deliveries"])
                            .inc();
                    }
                }
            }
        }
    }
}
