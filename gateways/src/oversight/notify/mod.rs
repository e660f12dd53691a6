//! Oversight's notification channels: tell the approvers of a request that it waits for them,
//! on Slack (an incoming webhook), by e-mail (SMTP) and on a signed HTTP webhook, with signed
//! one-click approve / deny links when the gateway has a public URL.
//!
//! The caller (the oversight gateway, after a request was created or escalated) picks the
//! channels of the request's policy with [`Notifier::senders_for`], calls [`Notifier::deliver`]
//! once per sender and appends the [`NotificationDelivered`] it returns to
//! `oversight.notifications.<tenant>.<request_id>`. `deliver` retries with exponential backoff
//! and never fails: a channel that stayed down is an event with `ok == false`, not an error.
//!
//! Links: the webhook carries `Notification::links` as given: signed for the request's only
//! approver (or for "anyone" when a policy names none and one answer decides), so whoever
//! reads it answers as that identity; the receiver is the operator's system, which routes them
//! to the approver. Slack carries them only with `OVERSIGHT_SLACK_LINKS=approver`, for an
//! incoming webhook that posts to the approver alone ([`slack`] says why). E-mail
//! goes to each approver separately, and when the notifier can sign links (public URL and link
//! secret set) each recipient gets links signed for their own identity; otherwise the
//! notification's links.
//!
//! Configuration, from the environment ([`NotifyConfig::from_env`]):
//!
//! | variable | meaning |
//! |---|---|
//! | `OVERSIGHT_SLACK_WEBHOOK_URL` | Slack incoming-webhook URL (a secret: it is never logged) |
//! | `OVERSIGHT_SLACK_LINKS` | `approver`: Slack messages carry the one-click links (the webhook posts to the approver alone); unset: they do not |
//! | `OVERSIGHT_SMTP_URL` | `smtp://host:port` (plain), `smtp://host:port?tls=required` (STARTTLS), `smtps://host:port` (TLS); `user:password@` for AUTH |
//! | `OVERSIGHT_EMAIL_FROM` | the From mailbox, e.g. `Creto Oversight <oversight@example.com>` |
//! | `OVERSIGHT_EMAIL_TO_DOMAIN` | approvers without `@` are mailed at `<approver>@<domain>` (unset: they get no e-mail) |
//! | `OVERSIGHT_EMAIL_DOMAINS` | comma-separated domains the full addresses a policy names may be at; others are not mailed (unset: any, and a tenant's admin can have this relay mail anyone). Addresses made with `OVERSIGHT_EMAIL_TO_DOMAIN` are always mailed |
//! | `OVERSIGHT_WEBHOOK_URL` | where the webhook POSTs |
//! | `OVERSIGHT_WEBHOOK_SECRET` | the webhook's HMAC key ([`webhook`] says how to verify) |
//! | `OVERSIGHT_PUBLIC_URL` | base URL of the oversight gateway's HTTP pages, e.g. `http://127.0.0.1:9091` |
//! | `OVERSIGHT_LINK_SECRET` | HMAC key of the one-click links (same on every replica; at least 32 bytes, else links are off) |
//! | `OVERSIGHT_LINK_TTL` | how long a link works (humantime, default `24h`, at most `7d`); a notification's links work until the level's deadline when that is later (at most `7d`) |
//! | `OVERSIGHT_NOTIFY_ATTEMPTS` | attempts per delivery (default 5), within [`DELIVERY_LIMIT`] |
//! | `OVERSIGHT_NOTIFY_BACKOFF` | delay after the first failure, doubling up to 10 s (humantime, default `200ms`) |
/// How long one channel's delivery may take, every attempt and backoff included: well inside
/// the notifier's ack wait (300 s). Past it the request was delivered to another replica, and
/// announced again, while this one still sent.
pub const DELIVERY_LIMIT: Duration = Duration::from_secs(200);

/// The shortest `OVERSIGHT_LINK_SECRET` taken, as for the token key ring.
pub const MIN_LINK_SECRET_BYTES: usize = 32;

/// The longest a link may work: a leaked link is a standing approval until then.
pub const MAX_LINK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub mod email;
pub mod links;
pub mod slack;
pub mod webhook;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use creto_schemas::oversight::v1::{
    ApprovalRequest, Channel, NotificationDelivered, Priority, State,
};
use prometheus::{register_histogram_vec, HistogramVec};

use links::LinkSigner;

/// Time `deliver` took, all attempts and backoff included.
pub static NOTIFICATION_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "oversight_notification_duration_seconds",
        "Time to deliver one approval notification, retries included, by channel",
        &["channel"],
        vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    )
    .unwrap()
});

/// One approval request to announce.
#[derive(Clone, Debug)]
pub struct Notification {
    pub tenant: String,
    /// The request after it was created or escalated.
    pub request: ApprovalRequest,
    pub level: u32,
    /// Where a human approves: the request's page and signed one-click links (None: no public URL configured).
    pub links: Option<Links>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Links {
    pub page: String,
    pub approve: String,
    pub deny: String,
}

/// One notification channel.
#[async_trait::async_trait]
pub trait Sender: Send + Sync {
    fn channel(&self) -> Channel;
    /// One attempt. Err: why (HTTP status and body excerpt, SMTP reply...).
    async fn send(&self, n: &Notification) -> Result<(), String>;
}

/// What the notifier sends where. A channel whose settings are missing is not configured, and
/// [`Notifier::senders_for`] leaves it out.
#[derive(Clone)]
pub struct NotifyConfig {
    pub slack_webhook_url: Option<String>,
    /// Slack messages carry one-click links (`OVERSIGHT_SLACK_LINKS=approver`).
    pub slack_links: bool,
    pub smtp_url: Option<String>,
    pub email_from: String,
    /// Approvers without '@' are mailed at `<approver>@<email_to_domain>`; None: not mailed.
    pub email_to_domain: Option<String>,
    /// Domains (lowercase) approvers' addresses may be at; empty: any.
    pub email_domains: Vec<String>,
    pub webhook_url: Option<String>,
    /// None: webhook calls go unsigned (receivers cannot tell them from forgeries).
    pub webhook_secret: Option<String>,
    pub public_url: Option<String>,
    pub link_secret: Option<String>,
    pub link_ttl: Duration,
    /// Attempts per delivery, at least 1.
    pub attempts: u32,
    /// Delay after the first failed attempt; doubles after each, up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Limit of one HTTP request or SMTP command.
    pub timeout: Duration,
}

impl Default for NotifyConfig {
    fn default() -> NotifyConfig {
        NotifyConfig {
            slack_webhook_url: None,
            slack_links: false,
            smtp_url: None,
            email_from: "Creto Oversight <oversight@localhost>".to_owned(),
            email_to_domain: None,
            email_domains: Vec::new(),
            webhook_url: None,
            webhook_secret: None,
            public_url: None,
            link_secret: None,
            link_ttl: Duration::from_secs(24 * 3600),
            attempts: 5,
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

// The Slack URL, SMTP URL (it may hold a password) and the secrets stay out of logs.
impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("NotifyConfig")
            .field("slack_webhook_url", &set(&self.slack_webhook_url))
            .field("smtp_url", &set(&self.smtp_url))
            .field("email_from", &self.email_from)
            .field("email_to_domain", &self.email_to_domain)
            .field("email_domains", &self.email_domains)
            .field("webhook_url", &self.webhook_url)
            .field("webhook_secret", &set(&self.webhook_secret))
            .field("public_url", &self.public_url)
            .field("link_secret", &set(&self.link_secret))
            .field("link_ttl", &self.link_ttl)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .field("backoff_max", &self.backoff_max)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl NotifyConfig {
    /// From the `OVERSIGHT_*` variables (module docs); empty means unset. A value that does not
    /// parse is logged and its default used.
    pub fn from_env() -> NotifyConfig {
        NotifyConfig::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`NotifyConfig::from_env`], reading variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> NotifyConfig {
        let get = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let duration = |name: &str, default: Duration| {
            match get(name) {
            None => default,
            Some(v) => humantime::parse_duration(&v).unwrap_or_else(|e| {
                tracing::warn!(variable = name, value = %v, error = %e, "not a duration; using {}", humantime::format_duration(default));
                default
            }),
        }
        };
        let d = NotifyConfig::default();
        let attempts = match get("OVERSIGHT_NOTIFY_ATTEMPTS") {
            None => d.attempts,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    tracing::warn!(variable = "OVERSIGHT_NOTIFY_ATTEMPTS", value = %v, "not a positive integer; using {}", d.attempts);
                    d.attempts
                }
            },
        };
        let slack_links = match get("OVERSIGHT_SLACK_LINKS").as_deref() {
            None => false,
            Some("approver") => true,
            Some(v) => {
                tracing::warn!(variable = "OVERSIGHT_SLACK_LINKS", value = %v, "not `approver`; Slack messages carry no links");
                false
            }
        };
        NotifyConfig {
            slack_webhook_url: get("OVERSIGHT_SLACK_WEBHOOK_URL"),
            slack_links,
            smtp_url: get("OVERSIGHT_SMTP_URL"),
            email_from: get("OVERSIGHT_EMAIL_FROM").unwrap_or(d.email_from),
            email_to_domain: get("OVERSIGHT_EMAIL_TO_DOMAIN")
                .map(|v| v.trim_start_matches('@').to_owned()),
            email_domains: get("OVERSIGHT_EMAIL_DOMAINS")
                .map(|v| {
                    v.split(',')
                        .map(|d| d.trim().trim_start_matches('@').to_ascii_lowercase())
                        .filter(|d| !d.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            webhook_url: get("OVERSIGHT_WEBHOOK_URL"),
            webhook_secret: get("OVERSIGHT_WEBHOOK_SECRET"),
            public_url: get("OVERSIGHT_PUBLIC_URL"),
            link_secret: get("OVERSIGHT_LINK_SECRET").filter(|secret| {
                // Every link carries its claims and their HMAC: a short key can be guessed
                // offline from one link, and forges links to approve anything.
                let long_enough = secret.len() >= MIN_LINK_SECRET_BYTES;
                if !long_enough {
                    tracing::error!(variable = "OVERSIGHT_LINK_SECRET", "shorter than {MIN_LINK_SECRET_BYTES} bytes; links and the approval page are off (make one with `openssl rand -hex 32`)");
                }
                long_enough
            }),
            link_ttl: {
                let ttl = duration("OVERSIGHT_LINK_TTL", d.link_ttl);
                if ttl > MAX_LINK_TTL {
                    tracing::warn!(variable = "OVERSIGHT_LINK_TTL", "longer than {}; using that", humantime::format_duration(MAX_LINK_TTL));
                }
                ttl.min(MAX_LINK_TTL)
            },
            attempts,
            backoff: duration("OVERSIGHT_NOTIFY_BACKOFF", d.backoff),
            backoff_max: d.backoff_max,
            timeout: d.timeout,
        }
    }
}

/// The configured senders, and the retry loop around them.
pub struct Notifier {
    senders: Vec<Box<dyn Sender>>,
    signer: Option<LinkSigner>,
    attempts: u32,
    backoff: Duration,
    backoff_max: Duration,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let channels: Vec<_> = self
            .senders
            .iter()
            .map(|s| channel_label(s.channel()))
            .collect();
        f.debug_struct("Notifier")
            .field("channels", &channels)
            .field("links", &self.signer.is_some())
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Builds the configured senders. A channel whose settings are unusable (an SMTP URL or
    /// From address that does not parse) is logged and left out.
    pub fn new(config: NotifyConfig) -> Notifier {
        let signer = match (&config.public_url, &config.link_secret) {
            (Some(url), Some(secret)) => {
                Some(LinkSigner::new(url, secret.as_bytes(), config.link_ttl))
            }
            (Some(_), None) => {
                tracing::warn!("OVERSIGHT_PUBLIC_URL is set but OVERSIGHT_LINK_SECRET is not: notifications carry no approve/deny links");
                None
            }
            _ => None,
        };
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A webhook is POSTed where it was configured, not wherever a redirect points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("creto-oversight/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client (rustls with ring, system roots)");
        let mut senders: Vec<Box<dyn Sender>> = Vec::new();
        if let Some(url) = &config.slack_webhook_url {
            senders.push(Box::new(slack::SlackSender::new(
                http.clone(),
                url.clone(),
                config.slack_links,
            )));
        }
        if let Some(url) = &config.smtp_url {
            match email::EmailSender::new(
                url,
                &config.email_from,
                config.email_to_domain.clone(),
                config.email_domains.clone(),
                signer.clone(),
                config.timeout,
            ) {
                Ok(s) => senders.push(Box::new(s)),
                Err(e) => tracing::error!(error = %e, "e-mail notifications disabled"),
            }
        }
        if let Some(url) = &config.webhook_url {
            if config.webhook_secret.is_none() {
                tracing::warn!("OVERSIGHT_WEBHOOK_URL is set but OVERSIGHT_WEBHOOK_SECRET is not: webhook calls go unsigned");
            }
            senders.push(Box::new(webhook::WebhookSender::new(
                http.clone(),
                url.clone(),
                config.webhook_secret.clone(),
            )));
        }
        Notifier {
            senders,
            signer,
            attempts: config.attempts.max(1),
            backoff: config.backoff,
            backoff_max: config.backoff_max,
        }
    }

    /// The configured senders among `channels`, in their order, each once.
    pub fn senders_for(&self, channels: &[Channel]) -> Vec<&dyn Sender> {
        let mut out: Vec<&dyn Sender> = Vec::new();
        for (i, c) in channels.iter().enumerate() {
            if *c == Channel::Unspecified || channels[..i].contains(c) {
                continue;
            }
            if let Some(s) = self.senders.iter().find(|s| s.channel() == *c) {
                out.push(s.as_ref());
            }
        }
        out
    }

    /// Sends with retries and backoff; returns the outcome as the event to append.
    pub async fn deliver(&self, sender: &dyn Sender, n: &Notification) -> NotificationDelivered {
        let channel = sender.channel();
        let start = Instant::now();
        let mut delay = self.backoff;
        let mut last_error = String::new();
        let mut attempts = 0;
        let mut ok = false;
        while attempts < self.attempts {
            attempts += 1;
            let left = DELIVERY_LIMIT.saturating_sub(start.elapsed());
            let Ok(sent) = tokio::time::timeout(left, sender.send(n)).await else {
                last_error = format!(
                    "gave up after {}s (the limit for one delivery)",
                    DELIVERY_LIMIT.as_secs()
                );
                break;
            };
            match sent {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        tenant = %n.tenant,
                        request_id = %n.request.request_id,
                        channel = channel_label(channel),
                        attempt = attempts,
                        error = %e,
                        "approval notification attempt failed"
                    );
                    last_error = e;
                    if start.elapsed() + delay >= DELIVERY_LIMIT {
                        break;
                    }
                    if attempts < self.attempts {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(self.backoff_max);
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        NOTIFICATION_SECONDS
            .with_label_values(&[channel_label(channel)])
            .observe(elapsed.as_secs_f64());
        let detail = match (ok, attempts) {
            (true, 1) => String::new(),
            (true, _) => format!("delivered on attempt {attempts}; before: {last_error}"),
            (false, _) => format!("failed {attempts} attempts; last: {last_error}"),
        };
        NotificationDelivered {
            request_id: n.request.request_id.clone(),
            channel: channel as i32,
            level: n.level,
            ok,
            attempts,
            // The receiver's answer is in it, and may hold what PostgreSQL cannot store.
            detail: creto_domain::text::storable(&excerpt(&detail, 1000)),
            duration_seconds: elapsed.as_secs_f64(),
        }
    }

    /// The request's page and `approver`'s one-click links, or None when no public URL or link
    /// secret is configured.
    pub fn links(&self, tenant: &str, request_id: &str, approver: &str) -> Option<Links> {
        self.links_until(tenant, request_id, approver, None)
    }

    /// [`Self::links`] valid until the request's `deadline` ([`LinkSigner::links_until`]).
    pub fn links_until(
        &self,
        tenant: &str,
        request_id: &str,
        approver: &str,
        deadline: Option<std::time::SystemTime>,
    ) -> Option<Links> {
        self.signer
            .as_ref()
            .map(|s| s.links_until(tenant, request_id, approver, deadline))
    }
}

/// `slack`, `email`, `webhook` (the metric label and log field).
pub fn channel_label(c: Channel) -> &'static str {
    match c {
        Channel::Slack => "slack",
        Channel::Email => "email",
        Channel::Webhook => "webhook",
        // How a response came (the approval page), never a notification channel.
        Channel::Web => "web",
        Channel::Unspecified => "unspecified",
    }
}

/// `HIGH`, `NORMAL`... (the proto name without its prefix).
pub(crate) fn priority_name(p: i32) -> &'static str {
    let name = Priority::try_from(p)
        .unwrap_or(Priority::Unspecified)
        .as_str_name();
    name.trim_start_matches("PRIORITY_")
}

pub(crate) fn state_name(s: i32) -> &'static str {
    let name = State::try_from(s)
        .unwrap_or(State::Unspecified)
        .as_str_name();
    name.trim_start_matches("STATE_")
}

/// A request's deadline as the links' expiry wants it.
pub(crate) fn deadline_of(request: &ApprovalRequest) -> Option<std::time::SystemTime> {
    let d = request.deadline.as_ref()?;
    let secs = u64::try_from(d.seconds).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

pub(crate) fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    chrono::DateTime::from_timestamp(ts.seconds, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The action's parameters as JSON: the parsed object, or the text as a string when it is not
/// JSON.
pub(crate) fn parameters(r: &ApprovalRequest) -> serde_json::Value {
    let text = r
        .action
        .as_ref()
        .map(|a| a.parameters_json.as_str())
        .unwrap_or("");
    if text.trim().is_empty() {
        return serde_json::Value::Object(Default::default());
    }
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

pub(crate) fn action_name(r: &ApprovalRequest) -> &str {
    r.action.as_ref().map(|a| a.name.as_str()).unwrap_or("")
}

/// At most `max` characters of `s`, with "…" when cut.
pub(crate) fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => {
            let mut cut = s[..i].to_owned();
            cut.pop();
            cut.push('…');
            cut
        }
    }
}

/// A reqwest error as text: its chain of causes, without the URL (a Slack webhook URL is a
/// secret, and the detail goes into the log).
pub(crate) fn describe_http_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One POST: Ok on 2xx, else the status and an excerpt of the body.
pub(crate) async fn check_response(resp: reqwest::Response) -> Result<(), String> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp.text().await.unwrap_or_default();
    Err(format!(
        "HTTP {}: {}",
        status.as_u16(),
        excerpt(body.trim(), 200)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> NotifyConfig {
        NotifyConfig::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn a_short_link_secret_turns_links_off_and_the_ttl_is_capped() {
        let short = config(&[("OVERSIGHT_LINK_SECRET", "changeme")]);
        assert_eq!(short.link_secret, None);
        let key = "0123456789abcdef0123456789abcdef";
        let long = config(&[
            ("OVERSIGHT_LINK_SECRET", key),
            ("OVERSIGHT_LINK_TTL", "365d"),
        ]);
        assert_eq!(long.link_secret.as_deref(), Some(key));
        assert_eq!(long.link_ttl, MAX_LINK_TTL);
        assert_eq!(config(&[]).link_ttl, Duration::from_secs(24 * 3600));
    }
}
