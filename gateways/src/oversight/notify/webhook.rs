//! Webhook: the approval request as JSON, POSTed to `OVERSIGHT_WEBHOOK_URL` and signed.
//!
//! # Verifying a call
//!
//! Each POST carries two headers:
//!
//! ```text
//! X-Creto-Timestamp: 1718000000
//! X-Creto-Signature: v1=5d41402abc4b2a76b9719d911017c592...
//! ```
//!
//! `X-Creto-Timestamp` is the sending time in unix seconds; the signature is the lowercase hex
//! HMAC-SHA256, keyed with the shared secret (`OVERSIGHT_WEBHOOK_SECRET`, its UTF-8 bytes), of
//! the timestamp, a `.`, and the raw request body exactly as received:
//!
//! ```text
//! v1=hex(HMAC-SHA256(secret, "<X-Creto-Timestamp>.<body>"))
//! ```
//!
//! A receiver recomputes it over the bytes it received (before parsing the JSON), compares in
//! constant time ([`verify_signature`] does both), and refuses timestamps more than a few
//! minutes from its clock, which bounds replays. The header may list several comma-separated
//! `v1=` values (when the secret is being rotated); one match is enough.
//!
//! Retries send the same request again with a new timestamp and signature: a receiver that
//! must act once deduplicates on (`tenant`, `request_id`, `level`).
//!
//! # Body
//!
//! ```json
//! {
//!   "request_id": "0190…", "tenant": "acme", "agent_id": "agent-7",
//!   "action": {"name": "payments.refund", "parameters": {"amount": 120}},
//!   "context": "…", "priority": "HIGH", "state": "PENDING", "level": 0,
//!   "approvers": ["alice@example.com"], "quorum": 1, "policy_id": "refunds",
//!   "created_at": "2025-01-01T00:00:00Z", "deadline": "2025-01-01T01:00:00Z",
//!   "links": {"page": "…", "approve": "…", "deny": "…"}
//! }
//! ```
//!
//! `parameters` is the action's parameters parsed (a string if they were not JSON); `deadline`
//! and `created_at` are RFC 3339 or null; `links` is null without a public URL.
use std::time::{SystemTime, UNIX_EPOCH};

use creto_schemas::oversight::v1::Channel;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::{
    action_name, check_response, describe_http_error, parameters, priority_name, rfc3339,
    state_name, Notification, Sender,
};

pub const TIMESTAMP_HEADER: &str = "X-Creto-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Creto-Signature";

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The `X-Creto-Signature` value: `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Whether `header` (an `X-Creto-Signature` value) signs `timestamp` and `body` with `secret`.
/// Constant-time; checks no clock (the receiver bounds the timestamp's age itself).
pub fn verify_signature(secret: &[u8], timestamp: &str, body: &[u8], header: &str) -> bool {
    header.split(',').any(|part| {
        let Some(hex_sig) = part.trim().strip_prefix("v1=") else {
            return false;
        };
        let Ok(sig) = hex::decode(hex_sig) else {
            return false;
        };
        mac(secret, timestamp, body).verify_slice(&sig).is_ok()
    })
}

/// The JSON body (module docs).
pub fn payload(n: &Notification) -> Value {
    let r = &n.request;
    json!({
        "request_id": r.request_id,
        "tenant": n.tenant,
        "agent_id": r.agent_id,
        "action": {
            "name": action_name(r),
            "parameters": parameters(r),
        },
        "context": r.context,
        "priority": priority_name(r.priority),
        "state": state_name(r.state),
        "level": n.level,
        "approvers": r.approvers,
        "quorum": r.quorum,
        "policy_id": r.policy_id,
        "created_at": rfc3339(r.created_at.as_ref()),
        "deadline": rfc3339(r.deadline.as_ref()),
        "links": n.links.as_ref().map(|l| json!({
            "page": l.page,
            "approve": l.approve,
            "deny": l.deny,
        })),
    })
}

pub struct WebhookSender {
    http: reqwest::Client,
    url: String,
    secret: Option<String>,
}

impl WebhookSender {
    /// Without `secret` the calls carry a timestamp but no signature.
    pub fn new(http: reqwest::Client, url: String, secret: Option<String>) -> WebhookSender {
        WebhookSender { http, url, secret }
    }
}

#[async_trait::async_trait]
impl Sender for WebhookSender {
    fn channel(&self) -> Channel {
        Channel::Webhook
    }

    async fn send(&self, n: &Notification) -> Result<(), String> {
        let body = serde_json::to_vec(&payload(n)).map_err(|e| e.to_string())?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string();
        let mut req = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, &timestamp);
        if let Some(secret) = &self.secret {
            req = req.header(
                SIGNATURE_HEADER,
                signature(secret.as_bytes(), &timestamp, &body),
            );
        }
        let resp = req.body(body).send().await.map_err(describe_http_error)?;
        check_response(resp).await
    }
}
