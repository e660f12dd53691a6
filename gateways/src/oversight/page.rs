//! Oversight's approval page: server-rendered HTML on the product's HTTP port (beside `/metrics`
//! and `/health`), where approvers read a request and answer it from a browser. No script runs
//! on it: plain links and forms.
//!
//! Routes (every one needs a signed token in its query or form; see below):
//!
//! | route | what |
//! |---|---|
//! | `GET /approvals/{tenant}?token=<page token>` | the pending requests the token's approver may answer, highest priority first, oldest first |
//! | `GET /approvals/{tenant}/{request_id}?token=<page token>` | one request, its responses so far, and an Approve and a Deny form |
//! | `GET /approvals/{tenant}/{request_id}/respond?token=<one-click token>` | the confirmation page of a one-click link: changes nothing (mail scanners prefetch links) |
//! | `POST /approvals/{tenant}/{request_id}/respond` | form `token`, `reason` (and `decision` with a page token): records the answer on [`Channel::Web`] |
//!
//! Tokens are the signed claims of [`links`]: the HMAC of `OVERSIGHT_LINK_SECRET` over tenant,
//! request, approver, decision, expiry and a nonce. A one-click token names a request and a
//! decision (what e-mails and Slack buttons carry); a page token ([`links::page_token`]) has no
//! decision and names one request or none (every request of the tenant: what
//! `enablement oversight page-link` prints). Whoever holds a token answers as its approver, so
//! the page checks, in order: the signature, the expiry, the tenant and request against the URL,
//! then the request's own rules decide (an approver of the current level, answering once; a
//! decided request takes no more answers). Refusals: 403 for a bad, expired or foreign token or
//! an approver not allowed, 404 for an unknown request, 409 for a decided one.
//!
//! Agents write the context and parameters shown here: everything is HTML-escaped, and the
//! Content-Security-Policy allows no script at all.
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Form, Path, Query, State as With};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use creto_domain::oversight::request::{state_name, time_of};
use creto_schemas::oversight::v1 as pb;
use creto_schemas::oversight::v1::{Channel, Decision, Priority, State};
use serde::Deserialize;
use tonic::Code;

use super::fold::priority_name;
use super::notify::links::{self, LinkClaims, LinkError};
use super::notify::NotifyConfig;
use super::OversightGateway;

/// `Response.recorded_by` of the answers the page records (its signed links name the approver).
pub const RECORDED_BY_PAGE: &str = "approval-page";
/// The most requests the list page shows.
const MAX_LISTED: usize = 200;

/// Signs and checks the page's tokens: the link secret and how long a page link works.
#[derive(Clone)]
pub struct PageSigner {
    secret: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for PageSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageSigner")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl PageSigner {
    pub fn new(secret: &[u8], ttl: Duration) -> PageSigner {
        PageSigner {
            secret: secret.to_vec(),
            ttl,
        }
    }

    /// From `OVERSIGHT_LINK_SECRET` and `OVERSIGHT_LINK_TTL`; None when no secret is set (the
    /// page is then off). The page itself uses relative URLs, so it needs no public URL.
    pub fn from_config(config: &NotifyConfig) -> Option<PageSigner> {
        config
            .link_secret
            .as_deref()
            .map(|s| PageSigner::new(s.as_bytes(), config.link_ttl))
    }

    /// A page token for `approver`: of one request, or with `request_id` empty of every
    /// request of `tenant`; valid for the TTL from now.
    pub fn page_token(&self, tenant: &str, request_id: &str, approver: &str) -> String {
        links::page_token(
            &self.secret,
            tenant,
            request_id,
            approver,
            SystemTime::now(),
            self.ttl,
        )
    }
}

/// `<public_url>/approvals/<tenant>[/<request_id>]?token=<page token>`.
pub fn page_url(public_url: &str, tenant: &str, request_id: &str, token: &str) -> String {
    let mut url = format!(
        "{}/approvals/{}",
        public_url.trim_end_matches('/'),
        segment(tenant)
    );
    if !request_id.is_empty() {
        url.push('/');
        url.push_str(&segment(request_id));
    }
    format!("{url}?token={token}")
}

struct Page {
    gateway: Arc<OversightGateway>,
    signer: PageSigner,
}

/// The page's routes; with no signer, each answers 404 saying how to turn the page on.
pub fn router(gateway: Arc<OversightGateway>, signer: Option<PageSigner>) -> Router {
    let router = match signer {
        None => Router::new()
            .route("/approvals/{tenant}", get(not_configured))
            .route("/approvals/{tenant}/{request_id}", get(not_configured))
            .route(
                "/approvals/{tenant}/{request_id}/respond",
                get(not_configured).post(not_configured),
            ),
        Some(signer) => Router::new()
            .route("/approvals/{tenant}", get(list_page))
            .route("/approvals/{tenant}/{request_id}", get(request_page))
            .route(
                "/approvals/{tenant}/{request_id}/respond",
                get(confirm_page).post(respond),
            )
            .with_state(Arc::new(Page { gateway, signer })),
    };
    router.layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn not_configured() -> Response {
    (
        StatusCode::NOT_FOUND,
        "The approval page is off: set OVERSIGHT_LINK_SECRET (the key of its signed links) and \
         OVERSIGHT_PUBLIC_URL (this port's address as approvers reach it, for the links in \
         notifications) on the oversight gateway.\n",
    )
        .into_response()
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    token: String,
}

#[derive(Deserialize)]
struct RespondForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    reason: String,
    /// `approve` or `deny`: with a page token (a one-click token carries its own).
    #[serde(default)]
    decision: String,
}

/// A refusal shown as a page.
struct Refused {
    status: StatusCode,
    title: &'static str,
    message: String,
}

impl Refused {
    fn new(status: StatusCode, title: &'static str, message: impl Into<String>) -> Refused {
        Refused {
            status,
            title,
            message: message.into(),
        }
    }

    fn forbidden(message: impl Into<String>) -> Refused {
        Refused::new(StatusCode::FORBIDDEN, "Not allowed", message)
    }

    fn from_status(s: tonic::Status) -> Refused {
        let (status, title) = match s.code() {
            Code::NotFound => (StatusCode::NOT_FOUND, "No such request"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "Not allowed"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "Already decided"),
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "Not accepted"),
            Code::Aborted => (StatusCode::CONFLICT, "Changed meanwhile"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "Failed"),
        };
        Refused::new(status, title, s.message())
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let body = format!(
            "<h1>{}</h1>\n<p class=\"refusal\" id=\"message\">{}</p>\n",
            esc(self.title),
            esc(&self.message)
        );
        (self.status, Html(layout(self.title, &body))).into_response()
    }
}

/// A checked token: its claims, and whether it is a page token (decision chosen on the page).
struct Holder {
    claims: LinkClaims,
    page: bool,
}

impl Page {
    /// Checks `token` against the URL: a page token (of every request, or of `request_id`)
    /// when `page_only`, else a page token or a one-click token of `request_id`.
    fn holder(
        &self,
        token: &str,
        tenant: &str,
        request_id: Option<&str>,
        page_only: bool,
    ) -> Result<Holder, Refused> {
        if token.is_empty() {
            return Err(Refused::forbidden(
                "This page needs a signed link: open the link of your notification, or ask an \
                 operator for one (enablement oversight page-link).",
            ));
        }
        let now = SystemTime::now();
        let (claims, page) = match links::verify_page(&self.signer.secret, token, now) {
            Ok(c) => (c, true),
            Err(LinkError::Malformed(_)) if !page_only => (
                links::verify(&self.signer.secret, token, now).map_err(bad_token)?,
                false,
            ),
            Err(e) => return Err(bad_token(e)),
        };
        if claims.tenant != tenant {
            return Err(Refused::forbidden("This link is for another tenant."));
        }
        match request_id {
            // The list: only a token of every request.
            None if !claims.request_id.is_empty() => Err(Refused::forbidden(
                "This link is for one request, not the list: open it as it was sent.",
            )),
            Some(id) if (!page || !claims.request_id.is_empty()) && claims.request_id != id => {
                Err(Refused::forbidden("This link is for another request."))
            }
            _ => Ok(Holder { claims, page }),
        }
    }

    async fn request(&self, tenant: &str, id: &str) -> Result<pb::ApprovalRequest, Refused> {
        let agg = self
            .gateway
            .existing(tenant, id)
            .await
            .map_err(|s| match s.code() {
                // An id that cannot exist is as unknown as one that does not.
                Code::InvalidArgument => Refused::new(
                    StatusCode::NOT_FOUND,
                    "No such request",
                    format!("no request {id:?} in tenant {tenant:?}"),
                ),
                _ => Refused::from_status(s),
            })?;
        Ok(agg.view)
    }

    /// Whether `approver` may answer `id` now (an approver of a level reached so far, or anyone
    /// when the policy names none).
    fn may_answer(&self, tenant: &str, id: &str, approver: &str) -> bool {
        self.gateway.view.get(tenant, id).is_some_and(|a| {
            let allowed = a.allowed_approvers();
            allowed.is_empty() || allowed.iter().any(|x| x == approver)
        })
    }
}

fn bad_token(e: LinkError) -> Refused {
    match e {
        LinkError::Expired { .. } => Refused::forbidden(
            "This link has expired: answer from a newer notification, or ask for a new link.",
        ),
        LinkError::BadSignature => Refused::forbidden(
            "This link is not valid: it was altered, or signed with another key.",
        ),
        LinkError::Malformed(why) => Refused::forbidden(format!("This link is not valid: {why}.")),
    }
}

async fn list_page(
    With(page): With<Arc<Page>>,
    Path(tenant): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Result<Response, Refused> {
    let holder = page.holder(&q.token, &tenant, None, true)?;
    let approver = holder.claims.approver.as_str();
    page.gateway.view.catch_up().await.map_err(|e| {
        Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            e.to_string(),
        )
    })?;
    let pending = page.gateway.view.pending_for(&tenant, approver, MAX_LISTED);
    let mine: Vec<&pb::ApprovalRequest> = pending.iter().collect();
    let mut body = format!(
        "<h1>Requests waiting for {}</h1>\n<p class=\"muted\">Tenant {} · {} pending</p>\n",
        esc(approver),
        esc(&tenant),
        mine.len()
    );
    if mine.is_empty() {
        body.push_str("<p id=\"empty\">Nothing waits for you.</p>\n");
    } else {
        body.push_str(
            "<table id=\"requests\">\n<tr><th>Priority</th><th>Action</th><th>Agent</th>\
             <th>Context</th><th>Asked</th><th>Deadline</th><th></th></tr>\n",
        );
        for r in mine {
            // Each request's link carries a token of that request only, expiring with this one.
            let mut claims = LinkClaims::new(
                &tenant,
                &r.request_id,
                approver,
                Decision::Unspecified,
                SystemTime::now(),
                page.signer.ttl,
            );
            claims.expires_at = claims.expires_at.min(holder.claims.expires_at);
            let token = links::sign(&page.signer.secret, &claims);
            let href = format!(
                "./{}/{}?token={}",
                segment(&tenant),
                segment(&r.request_id),
                token
            );
            let answered = r.responses.iter().any(|x| x.approver == approver);
            let _ = writeln!(
                body,
                "<tr><td>{}</td><td><a class=\"request\" data-request-id=\"{}\" href=\"{}\">{}</a></td>\
                 <td>{}</td><td>{}</td><td class=\"nowrap\">{}</td><td class=\"nowrap\">{}</td><td>{}</td></tr>",
                priority_badge(r.priority),
                esc(&r.request_id),
                esc(&href),
                esc(action_name(r)),
                esc(&r.agent_id),
                esc(&excerpt(&r.context, 140)),
                esc(&short_time(&r.created_at)),
                esc(&time_left(&r.deadline)),
                if answered { "you answered" } else { "" },
            );
        }
        body.push_str("</table>\n");
    }
    Ok(Html(layout("Approvals", &body)).into_response())
}

async fn request_page(
    With(page): With<Arc<Page>>,
    Path((tenant, id)): Path<(String, String)>,
    Query(q): Query<TokenQuery>,
) -> Result<Response, Refused> {
    let holder = page.holder(&q.token, &tenant, Some(&id), true)?;
    // Base: .../{tenant}/{request_id}.
    let action = format!("./{}/respond", segment(&id));
    render_request(&page, &tenant, &id, &holder, &q.token, &action).await
}

/// One request and, while its approver may answer, the Approve and Deny forms (posting to
/// `action`, relative to the page's URL).
async fn render_request(
    page: &Page,
    tenant: &str,
    id: &str,
    holder: &Holder,
    token: &str,
    action: &str,
) -> Result<Response, Refused> {
    let r = page.request(tenant, id).await?;
    let approver = holder.claims.approver.as_str();
    let mut body = format!("<h1>{}</h1>\n{}", esc(action_name(&r)), details(tenant, &r));
    body.push_str(&answer_state(page, tenant, &r, approver));
    if r.state == State::Pending as i32
        && !answered(&r, approver)
        && page.may_answer(tenant, id, approver)
    {
        body.push_str("<div class=\"forms\">\n");
        for (decision, label) in [("approve", "Approve"), ("deny", "Deny")] {
            let _ = write!(
                body,
                "<form method=\"post\" action=\"{action}\" class=\"{decision}\">\n\
                 <input type=\"hidden\" name=\"token\" value=\"{token}\">\n\
                 <input type=\"hidden\" name=\"decision\" value=\"{decision}\">\n\
                 <label for=\"reason-{decision}\">Reason</label>\n\
                 <textarea id=\"reason-{decision}\" name=\"reason\" rows=\"3\" maxlength=\"2048\"></textarea>\n\
                 <button type=\"submit\" id=\"{decision}\">{label}</button>\n</form>\n",
                action = esc(action),
                token = esc(token),
            );
        }
        body.push_str("</div>\n");
    }
    Ok(Html(layout(action_name(&r), &body)).into_response())
}

/// What the approver can do now, when it is not answering.
fn answer_state(page: &Page, tenant: &str, r: &pb::ApprovalRequest, approver: &str) -> String {
    if let Some(mine) = r.responses.iter().find(|x| x.approver == approver) {
        return format!(
            "<p class=\"notice\" id=\"notice\">You ({}) answered {} {}.</p>\n",
            esc(approver),
            decision_label(mine.decision).to_lowercase(),
            esc(&when(&mine.at))
        );
    }
    if r.state != State::Pending as i32 {
        return format!(
            "<p class=\"notice\" id=\"notice\">This request is {}: it takes no more answers.</p>\n",
            state_label(r.state)
        );
    }
    if !page.may_answer(tenant, &r.request_id, approver) {
        return format!(
            "<p class=\"notice\" id=\"notice\">{} is not an approver of this request at level {} \
             (approvers: {}).</p>\n",
            esc(approver),
            r.level,
            esc(&r.approvers.join(", "))
        );
    }
    format!("<p class=\"muted\">Answering as {}.</p>\n", esc(approver))
}

async fn confirm_page(
    With(page): With<Arc<Page>>,
    Path((tenant, id)): Path<(String, String)>,
    Query(q): Query<TokenQuery>,
) -> Result<Response, Refused> {
    let holder = page.holder(&q.token, &tenant, Some(&id), false)?;
    if holder.page {
        // A page token here: the request's page, with both forms.
        return render_request(&page, &tenant, &id, &holder, &q.token, "./respond").await;
    }
    let r = page.request(&tenant, &id).await?;
    let approver = holder.claims.approver.as_str();
    let label = decision_label(holder.claims.decision as i32);
    let mut body = format!(
        "<h1>{label} this request?</h1>\n<p class=\"muted\">Nothing is recorded until you \
         confirm, as {}.</p>\n{}",
        esc(approver),
        details(&tenant, &r)
    );
    if r.state == State::Pending as i32 && !answered(&r, approver) {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"./respond\" class=\"{class}\">\n\
             <input type=\"hidden\" name=\"token\" value=\"{token}\">\n\
             <label for=\"reason\">Reason</label>\n\
             <textarea id=\"reason\" name=\"reason\" rows=\"3\" maxlength=\"2048\"></textarea>\n\
             <button type=\"submit\" id=\"confirm\">Confirm: {label}</button>\n</form>\n",
            class = label.to_lowercase(),
            token = esc(&q.token),
        );
    } else {
        body.push_str(&answer_state(&page, &tenant, &r, approver));
    }
    Ok(Html(layout(&format!("{label}?"), &body)).into_response())
}

async fn respond(
    With(page): With<Arc<Page>>,
    Path((tenant, id)): Path<(String, String)>,
    Form(f): Form<RespondForm>,
) -> Result<Response, Refused> {
    let holder = page.holder(&f.token, &tenant, Some(&id), false)?;
    let decision = if holder.page {
        match f.decision.as_str() {
            "approve" => Decision::Approve,
            "deny" => Decision::Deny,
            _ => {
                return Err(Refused::new(
                    StatusCode::BAD_REQUEST,
                    "Not accepted",
                    "choose Approve or Deny",
                ))
            }
        }
    } else {
        holder.claims.decision
    };
    let approver = holder.claims.approver.as_str();
    let before = page.request(&tenant, &id).await?;
    // A person who answered already (a second click, the other button of an e-mail) is shown
    // that answer; the gateway would refuse a changed one as a conflict.
    let after = if before.responses.iter().any(|x| x.approver == approver) {
        before.clone()
    } else {
        page.gateway
            .respond_as(
                &tenant,
                &id,
                approver,
                decision,
                f.reason.trim(),
                Channel::Web as i32,
                RECORDED_BY_PAGE,
            )
            .await
            .map_err(Refused::from_status)?
    };
    let mut body = match before.responses.iter().find(|x| x.approver == approver) {
        Some(earlier) => format!(
            "<h1 id=\"outcome\">Already recorded</h1>\n<p>{} answered {} {}; that answer stands.</p>\n",
            esc(approver),
            decision_label(earlier.decision).to_lowercase(),
            esc(&when(&earlier.at))
        ),
        None => format!(
            "<h1 id=\"outcome\">{} — recorded for {}</h1>\n",
            if decision == Decision::Approve {
                "Approved"
            } else {
                "Denied"
            },
            esc(approver)
        ),
    };
    let _ = writeln!(
        body,
        "<p id=\"state\">The request is now <strong>{}</strong>{}.</p>",
        state_label(after.state),
        if after.state == State::Pending as i32 {
            format!(
                " ({} of {} approvals)",
                after
                    .responses
                    .iter()
                    .filter(|x| x.decision == Decision::Approve as i32)
                    .count(),
                after.quorum.max(1)
            )
        } else {
            String::new()
        }
    );
    body.push_str(&details(&tenant, &after));
    if holder.page {
        // Back to where the page token leads (base: .../{id}/respond).
        let href = if holder.claims.request_id.is_empty() {
            format!("../../{}?token={}", segment(&tenant), f.token)
        } else {
            format!("../{}?token={}", segment(&id), f.token)
        };
        let _ = writeln!(body, "<p><a href=\"{}\">Back</a></p>", esc(&href));
    }
    Ok(Html(layout("Recorded", &body)).into_response())
}

fn answered(r: &pb::ApprovalRequest, approver: &str) -> bool {
    r.responses.iter().any(|x| x.approver == approver)
}

/// The request's facts, context, parameters and responses.
fn details(tenant: &str, r: &pb::ApprovalRequest) -> String {
    let parameters = r
        .action
        .as_ref()
        .map(|a| a.parameters_json.as_str())
        .unwrap_or_default();
    let parameters = match serde_json::from_str::<serde_json::Value>(parameters) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| parameters.to_owned()),
        Err(_) => parameters.to_owned(),
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "<dl class=\"facts\">\n\
         <dt>Request</dt><dd id=\"request-id\">{}</dd>\n\
         <dt>Tenant</dt><dd>{}</dd>\n\
         <dt>Agent</dt><dd id=\"agent\">{}</dd>\n\
         <dt>Action</dt><dd id=\"action\">{}</dd>\n\
         <dt>Priority</dt><dd id=\"priority\">{}</dd>\n\
         <dt>State</dt><dd id=\"request-state\">{}</dd>\n\
         <dt>Level</dt><dd id=\"level\">{}</dd>\n\
         <dt>Approvers</dt><dd>{} (quorum {})</dd>\n\
         <dt>Asked</dt><dd>{}</dd>\n\
         <dt>Deadline</dt><dd id=\"deadline\">{}</dd>\n\
         </dl>\n\
         <h2>Context</h2>\n<div class=\"context\" id=\"context\">{}</div>\n\
         <h2>Parameters</h2>\n<pre id=\"parameters\">{}</pre>\n",
        esc(&r.request_id),
        esc(tenant),
        esc(&r.agent_id),
        esc(action_name(r)),
        priority_badge(r.priority),
        state_label(r.state),
        r.level,
        if r.approvers.is_empty() {
            "anyone".to_owned()
        } else {
            esc(&r.approvers.join(", "))
        },
        r.quorum.max(1),
        esc(&when(&r.created_at)),
        if r.state == State::Pending as i32 {
            esc(&deadline(&r.deadline))
        } else {
            "—".to_owned()
        },
        esc(&r.context),
        esc(&parameters),
    );
    out.push_str("<h2>Responses</h2>\n");
    if r.responses.is_empty() {
        out.push_str("<p class=\"muted\" id=\"responses\">None yet.</p>\n");
    } else {
        out.push_str(
            "<table id=\"responses\">\n<tr><th>Approver</th><th>Decision</th><th>Reason</th>\
             <th>Channel</th><th>Level</th><th>At</th></tr>\n",
        );
        for x in &r.responses {
            let channel = Channel::try_from(x.channel)
                .map(|c| match c {
                    Channel::Unspecified => "api",
                    Channel::Slack => "slack",
                    Channel::Email => "e-mail",
                    Channel::Webhook => "webhook",
                    Channel::Web => "web",
                })
                .unwrap_or("?");
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td class=\"reason\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&x.approver),
                decision_label(x.decision),
                esc(&x.reason),
                channel,
                x.level,
                esc(&when(&x.at)),
            );
        }
        out.push_str("</table>\n");
    }
    out
}

fn action_name(r: &pb::ApprovalRequest) -> &str {
    r.action.as_ref().map_or("(no action)", |a| a.name.as_str())
}

fn priority_badge(p: i32) -> String {
    let name = priority_name(Priority::try_from(p).unwrap_or(Priority::Unspecified));
    format!("<span class=\"priority {name}\">{name}</span>")
}

fn state_label(s: i32) -> &'static str {
    state_name(State::try_from(s).unwrap_or(State::Unspecified))
}

fn decision_label(d: i32) -> &'static str {
    match Decision::try_from(d) {
        Ok(Decision::Approve) => "Approve",
        Ok(Decision::Deny) => "Deny",
        _ => "(none)",
    }
}

fn short_time(t: &Option<prost_types::Timestamp>) -> String {
    time_of(t).map_or_else(|| "—".to_owned(), |t| t.format("%m-%d %H:%M").to_string())
}

fn when(t: &Option<prost_types::Timestamp>) -> String {
    time_of(t).map_or_else(
        || "—".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// The deadline and the time left.
fn deadline(t: &Option<prost_types::Timestamp>) -> String {
    match time_of(t) {
        None => "none".to_owned(),
        Some(at) => format!("{} ({})", at.format("%Y-%m-%d %H:%M:%S UTC"), time_left(t)),
    }
}

/// "in 9m 58s", "passed", or "none".
fn time_left(t: &Option<prost_types::Timestamp>) -> String {
    let Some(at) = time_of(t) else {
        return "none".to_owned();
    };
    let secs = (at - Utc::now()).num_seconds();
    if secs <= 0 {
        return "passed".to_owned();
    }
    // To the minute past an hour.
    let secs = secs as u64;
    let secs = if secs >= 3600 { secs / 60 * 60 } else { secs };
    format!(
        "in {}",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment (ids are validated tokens, so this normally changes nothing).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <title>{} · Creto Oversight</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}</main>\n</body>\n</html>\n",
        esc(title)
    )
}

const STYLE: &str = "\
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}\
main{max-width:860px;margin:2rem auto;padding:0 1rem}\
h1{font-size:1.5rem}h2{font-size:1.1rem;margin-top:1.5rem}\
table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid #e3e6eb;vertical-align:top}\
td.nowrap{white-space:nowrap}\
dl.facts{display:grid;grid-template-columns:9rem 1fr;gap:.2rem .8rem;background:#fff;padding:.8rem;border:1px solid #e3e6eb}\
dt{color:#5b6475}dd{margin:0}\
.context{white-space:pre-wrap;background:#fff;border:1px solid #e3e6eb;padding:.8rem}\
pre{background:#fff;border:1px solid #e3e6eb;padding:.8rem;overflow:auto}\
.muted{color:#5b6475}.notice{background:#fff7d6;border:1px solid #ead27a;padding:.6rem}\
.refusal{background:#fde8e8;border:1px solid #e6a0a0;padding:.6rem}\
.priority{font-size:.8rem;padding:.1rem .4rem;border-radius:.3rem;background:#e3e6eb}\
.priority.high{background:#ffe0b3}.priority.critical{background:#f9b4b4}\
.forms{display:flex;gap:1rem;flex-wrap:wrap;margin-top:1.5rem}\
form{flex:1;min-width:16rem;background:#fff;border:1px solid #e3e6eb;padding:.8rem}\
label{display:block;color:#5b6475}textarea{width:100%;box-sizing:border-box;margin:.3rem 0 .6rem}\
button{font:inherit;padding:.4rem 1.2rem;border:0;border-radius:.3rem;color:#fff;cursor:pointer}\
form.approve button{background:#1f7a3d}form.deny button{background:#b3261e}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
    }

    #[test]
    fn page_urls_encode_segments() {
        assert_eq!(
            page_url("http://h:9091/", "acme", "", "tok"),
            "http://h:9091/approvals/acme?token=tok"
        );
        assert_eq!(
            page_url("http://h", "a b", "r/1", "t"),
            "http://h/approvals/a%20b/r%2F1?token=t"
        );
    }

    #[test]
    fn page_and_one_click_tokens_are_not_interchangeable() {
        let secret = b"s3cret";
        let now = SystemTime::now();
        let ttl = Duration::from_secs(60);
        let page = links::page_token(secret, "acme", "", "ann", now, ttl);
        let claims = links::verify_page(secret, &page, now).unwrap();
        assert_eq!(
            (claims.decision, claims.request_id.as_str()),
            (Decision::Unspecified, "")
        );
        assert!(matches!(
            links::verify(secret, &page, now),
            Err(LinkError::Malformed(_))
        ));
        let click = links::sign(
            secret,
            &LinkClaims::new("acme", "r1", "ann", Decision::Approve, now, ttl),
        );
        assert!(matches!(
            links::verify_page(secret, &click, now),
            Err(LinkError::Malformed(_))
        ));
    }

    #[test]
    fn excerpts_cut_on_characters() {
        assert_eq!(excerpt("héllo wörld", 5), "héllo…");
        assert_eq!(excerpt("short", 10), "short");
    }
}
