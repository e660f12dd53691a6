//! Signed one-click links: an approver opens
//! `<public_url>/approvals/<tenant>/<request_id>/respond?token=<token>` from a Slack button or an
//! e-mail, and the oversight gateway answers the request as that approver with that decision.
//!
//! A token is `base64url(JSON claims) "." base64url(HMAC-SHA256(secret, <first part>))`
//! (URL-safe alphabet, no padding; the MAC covers the encoded claims text, as in a JWS). Approve
//! and deny each get their own token. The claims name the tenant, request, approver and
//! decision, an expiry (unix seconds) and a random nonce, so two links never look alike.
//!
//! What this module does not do: enforce single use. The gateway does, from the request's own
//! state in the log: a request already decided refuses any further response, and an approver
//! who already answered is a no-op (the same rule as the gRPC `Respond`), so replaying a link
//! changes nothing. A link leaks as much as the e-mail or channel it was sent to; keep the TTL
//! short enough for that.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use creto_schemas::oversight::v1::Decision;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::Links;

type HmacSha256 = Hmac<Sha256>;

/// What a token says. `decision` is APPROVE or DENY (UNSPECIFIED in a [`page_token`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkClaims {
    pub tenant: String,
    pub request_id: String,
    pub approver: String,
    pub decision: Decision,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: u64,
    /// 16 random bytes, hex.
    pub nonce: String,
}

impl LinkClaims {
    /// Claims valid for `ttl` from `now`, with a fresh nonce.
    pub fn new(
        tenant: &str,
        request_id: &str,
        approver: &str,
        decision: Decision,
        now: SystemTime,
        ttl: Duration,
    ) -> LinkClaims {
        LinkClaims {
            tenant: tenant.to_owned(),
            request_id: request_id.to_owned(),
            approver: approver.to_owned(),
            decision,
            expires_at: unix_secs(now).saturating_add(ttl.as_secs()),
            nonce: hex::encode(rand::random::<[u8; 16]>()),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("malformed link token: {0}")]
    Malformed(&'static str),
    #[error("link token signature does not match (altered, or signed with another secret)")]
    BadSignature,
    #[error("link expired at {expires_at} (unix seconds)")]
    Expired { expires_at: u64 },
}

/// The JSON form of the claims (the decision by its proto name).
#[derive(Serialize, Deserialize)]
struct Wire {
    tenant: String,
    request_id: String,
    approver: String,
    decision: String,
    expires_at: u64,
    nonce: String,
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    HmacSha256::new_from_slice(secret).expect("HMAC takes any key length")
}

/// The token for `claims`.
pub fn sign(secret: &[u8], claims: &LinkClaims) -> String {
    let wire = Wire {
        tenant: claims.tenant.clone(),
        request_id: claims.request_id.clone(),
        approver: claims.approver.clone(),
        decision: claims.decision.as_str_name().to_owned(),
        expires_at: claims.expires_at,
        nonce: claims.nonce.clone(),
    };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wire).expect("claims serialize"));
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{payload}.{tag}")
}

/// The claims of `token` if `secret` signed it and it has not expired at `now`. The signature is
/// checked (in constant time) before anything in the claims is trusted.
pub fn verify(secret: &[u8], token: &str, now: SystemTime) -> Result<LinkClaims, LinkError> {
    verify_kind(secret, token, now, false)
}

/// A page token: lets `approver` open the approval page of `request_id` (empty: of every
/// request of `tenant`) and answer there. Its decision is UNSPECIFIED (chosen on the page), so
/// [`verify`] refuses it as a one-click link, and [`verify_page`] refuses one-click links.
pub fn page_token(
    secret: &[u8],
    tenant: &str,
    request_id: &str,
    approver: &str,
    now: SystemTime,
    ttl: Duration,
) -> String {
    let claims = LinkClaims::new(
        tenant,
        request_id,
        approver,
        Decision::Unspecified,
        now,
        ttl,
    );
    sign(secret, &claims)
}

/// As [`verify`], for a page token (decision UNSPECIFIED).
pub fn verify_page(secret: &[u8], token: &str, now: SystemTime) -> Result<LinkClaims, LinkError> {
    verify_kind(secret, token, now, true)
}

fn verify_kind(
    secret: &[u8],
    token: &str,
    now: SystemTime,
    page: bool,
) -> Result<LinkClaims, LinkError> {
    let (payload, tag) = token
        .split_once('.')
        .ok_or(LinkError::Malformed("no '.' between claims and signature"))?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| LinkError::Malformed("signature is not base64url"))?;
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    m.verify_slice(&tag).map_err(|_| LinkError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| LinkError::Malformed("claims are not base64url"))?;
    let wire: Wire =
        serde_json::from_slice(&json).map_err(|_| LinkError::Malformed("claims are not JSON"))?;
    let decision = match Decision::from_str_name(&wire.decision) {
        Some(d @ (Decision::Approve | Decision::Deny)) if !page => d,
        Some(Decision::Unspecified) if page => Decision::Unspecified,
        _ if page => return Err(LinkError::Malformed("not a page token")),
        _ => return Err(LinkError::Malformed("decision is neither approve nor deny")),
    };
    if unix_secs(now) >= wire.expires_at {
        return Err(LinkError::Expired {
            expires_at: wire.expires_at,
        });
    }
    Ok(LinkClaims {
        tenant: wire.tenant,
        request_id: wire.request_id,
        approver: wire.approver,
        decision,
        expires_at: wire.expires_at,
        nonce: wire.nonce,
    })
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Makes the links of one approver: what [`super::Notifier::links`] and the e-mail sender use.
#[derive(Clone)]
pub struct LinkSigner {
    public_url: String,
    secret: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSigner")
            .field("public_url", &self.public_url)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl LinkSigner {
    pub fn new(public_url: &str, secret: &[u8], ttl: Duration) -> LinkSigner {
        LinkSigner {
            public_url: public_url.trim_end_matches('/').to_owned(),
            secret: secret.to_vec(),
            ttl,
        }
    }

    /// The request's page and the approver's two one-click links, valid for the TTL from `now`.
    pub fn links_at(
        &self,
        tenant: &str,
        request_id: &str,
        approver: &str,
        now: SystemTime,
    ) -> Links {
        self.links_for(tenant, request_id, approver, now, self.ttl)
    }

    /// [`Self::links`], valid until `deadline` when that is later than the TTL (at most
    /// [`super::MAX_LINK_TTL`]): a level may wait days, and links that expired on its second
    /// day left the approver nothing to answer with (no newer notification comes).
    pub fn links_until(
        &self,
        tenant: &str,
        request_id: &str,
        approver: &str,
        deadline: Option<SystemTime>,
    ) -> Links {
        let now = SystemTime::now();
        let until = deadline.and_then(|d| d.duration_since(now).ok());
        let ttl = until
            .map_or(self.ttl, |u| self.ttl.max(u))
            .min(super::MAX_LINK_TTL);
        self.links_for(tenant, request_id, approver, now, ttl)
    }

    fn links_for(
        &self,
        tenant: &str,
        request_id: &str,
        approver: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Links {
        let page = format!(
            "{}/approvals/{}/{}",
            self.public_url,
            encode_segment(tenant),
            encode_segment(request_id)
        );
        let link = |decision| {
            let claims = LinkClaims::new(tenant, request_id, approver, decision, now, ttl);
            // The token is base64url and '.': nothing in it needs escaping in a query.
            format!("{page}/respond?token={}", sign(&self.secret, &claims))
        };
        // The page opens with a token for this request and approver (the page refuses
        // anonymous visits).
        let token = page_token(&self.secret, tenant, request_id, approver, now, ttl);
        Links {
            approve: link(Decision::Approve),
            deny: link(Decision::Deny),
            page: format!("{page}?token={token}"),
        }
    }

    pub fn links(&self, tenant: &str, request_id: &str, approver: &str) -> Links {
        self.links_at(tenant, request_id, approver, SystemTime::now())
    }
}

/// Percent-encodes a path segment (tenant and request ids are validated upstream, so this
/// normally changes nothing).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
