//! The external authorization adapter: asks creto-authz (`creto.authz.v1.AuthorizationService`)
//! over gRPC, with a per-call deadline, a decision cache and the runbook's circuit breaker
//! (operations runbook §6.6: `AUTHZ_CIRCUIT_BREAKER_ENABLED`, `AUTHZ_FALLBACK_DECISION`,
//! `AUTHZ_FALLBACK_TTL_SECONDS`).
//!
//! One call to [`RemoteAuthorizer::decide`]:
//!
//! 1. A real decision cached for the (tenant, subject, sorted roles, product, method) is
//!    returned as is. The server says how long it may be kept (`cache_ttl_seconds`, 0 = not at
//!    all), capped by [`RemoteAuthzSettings::cache_ttl`].
//! 2. The circuit breaker is asked. Open: the fallback decision, without touching the network.
//!    Open for [`RemoteAuthzSettings::open_for`] already: this call is the half-open probe and
//!    goes to the server (even when its key has a remembered fallback); any other call while the
//!    probe is in flight gets the fallback.
//! 3. Closed (or breaker disabled): a fallback remembered for this key is returned — a down
//!    creto-authz is not asked again for the same caller and method for
//!    [`RemoteAuthzSettings::fallback_ttl`] — otherwise the server is called.
//! 4. The call has [`RemoteAuthzSettings::timeout`] to answer (also sent as `grpc-timeout`). An
//!    error or a late answer is a failure: the fallback decision, remembered for the key, and a
//!    step towards opening the breaker. `failure_threshold` consecutive failures open it; a
//!    failed probe reopens it; any answer closes it and forgets every remembered fallback, so
//!    real decisions come back as soon as creto-authz does.
//!
//! The fallback is DENY unless `AUTHZ_FALLBACK_DECISION=ALLOW`. Deny reasons say what happened:
//! `denied by creto-authz: <reason>` or
//! `authorization service unavailable (circuit open); fallback decision DENY`.
//!
//! Metrics: `enablement_authz_decisions_total{source="remote|cache|fallback",decision}`,
//! `enablement_authz_breaker_state` (0 closed, 1 open, 2 half-open),
//! `enablement_authz_request_duration_seconds{outcome="ok|timeout|error"}` and the runbook's
//! `authz_check_errors_total{kind="timeout|unavailable|error"}` (calls that got no decision).
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use creto_schemas::authz::v1::authorization_service_client::AuthorizationServiceClient;
use creto_schemas::authz::v1::{CheckRequest, CheckResponse};
use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge, HistogramVec,
    IntCounterVec, IntGauge,
};
use tonic::transport::{Channel, Endpoint};

use super::{Action, Authorizer, Decision, Identity};

pub const ENV_ENDPOINT: &str = "AUTHZ_ENDPOINT";
pub const ENV_BREAKER_ENABLED: &str = "AUTHZ_CIRCUIT_BREAKER_ENABLED";
pub const ENV_FALLBACK_DECISION: &str = "AUTHZ_FALLBACK_DECISION";
pub const ENV_FALLBACK_TTL_SECONDS: &str = "AUTHZ_FALLBACK_TTL_SECONDS";

pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(10);
pub const DEFAULT_FALLBACK_TTL: Duration = Duration::from_secs(30);
/// Upper bound accepted for `AUTHZ_FALLBACK_TTL_SECONDS` (one day).
pub const MAX_FALLBACK_TTL_SECONDS: u64 = 86_400;
/// Past this many cached decisions, expired ones are swept; if none are, the cache starts over.
const MAX_CACHE_ENTRIES: usize = 65_536;

static DECISIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "enablement_authz_decisions_total",
        "Authorization decisions of the creto-authz adapter, by where they came from",
        &["source", "decision"]
    )
    .unwrap()
});
static BREAKER_STATE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "enablement_authz_breaker_state",
        "Circuit breaker in front of creto-authz: 0 closed, 1 open, 2 half-open"
    )
    .unwrap()
});
static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "enablement_authz_request_duration_seconds",
        "Time of a Check call to creto-authz, deadline included",
        &["outcome"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .unwrap()
});
static CHECK_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "authz_check_errors_total",
        "Check calls to creto-authz that got no decision (the fallback applied)",
        &["kind"]
    )
    .unwrap()
});

/// Touches every series family so `/metrics` lists them before the first decision.
pub fn register_metrics() {
    LazyLock::force(&DECISIONS);
    LazyLock::force(&BREAKER_STATE);
    LazyLock::force(&REQUEST_SECONDS);
    // Zero series of every kind, so the AuthzUnavailable alert's rate() has a baseline.
    for kind in ["timeout", "unavailable", "error"] {
        CHECK_ERRORS.with_label_values(&[kind]);
    }
}

/// What a call gets when creto-authz cannot decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackDecision {
    Deny,
    Allow,
}

impl fmt::Display for FallbackDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FallbackDecision::Deny => "DENY",
            FallbackDecision::Allow => "ALLOW",
        })
    }
}

/// A setting that cannot be used, named with what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?} is invalid: accepted values are {accepted}")]
pub struct AuthzSettingsError {
    pub variable: &'static str,
    pub value: String,
    pub accepted: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteAuthzSettings {
    /// creto-authz, e.g. `http://authz.creto.local:50051`; `grpc://host:port` and a bare
    /// `host:port` mean plaintext HTTP/2 too.
    pub endpoint: String,
    /// Deadline of one Check call; a slower answer is a failure.
    pub timeout: Duration,
    /// Longest a real decision is cached (the server's `cache_ttl_seconds` is capped by it).
    pub cache_ttl: Duration,
    pub breaker_enabled: bool,
    /// Consecutive failures that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open before one half-open probe.
    pub open_for: Duration,
    pub fallback: FallbackDecision,
    /// How long a fallback decision is remembered per (identity, action), unless creto-authz
    /// answers again first.
    pub fallback_ttl: Duration,
}

impl RemoteAuthzSettings {
    /// The defaults, for `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        RemoteAuthzSettings {
            endpoint: endpoint.into(),
            timeout: DEFAULT_TIMEOUT,
            cache_ttl: DEFAULT_CACHE_TTL,
            breaker_enabled: true,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            open_for: DEFAULT_OPEN_FOR,
            fallback: FallbackDecision::Deny,
            fallback_ttl: DEFAULT_FALLBACK_TTL,
        }
    }

    /// From `AUTHZ_ENDPOINT` (unset or empty: `Ok(None)`, no external authorization),
    /// `AUTHZ_CIRCUIT_BREAKER_ENABLED`, `AUTHZ_FALLBACK_DECISION` and
    /// `AUTHZ_FALLBACK_TTL_SECONDS`; the other settings keep their defaults.
    pub fn from_env() -> Result<Option<Self>, AuthzSettingsError> {
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// [`Self::from_env`] over any source of variables (tests, config files). Every variable
    /// is checked, also when `AUTHZ_ENDPOINT` is unset.
    pub fn from_vars(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, AuthzSettingsError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let breaker_enabled = match get(ENV_BREAKER_ENABLED) {
            None => true,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(AuthzSettingsError {
                        variable: ENV_BREAKER_ENABLED,
                        value: v,
                        accepted: "true or false (also 1/0, yes/no, on/off)",
                    })
                }
            },
        };
        let fallback = match get(ENV_FALLBACK_DECISION) {
            None => FallbackDecision::Deny,
            Some(v) => match v.to_ascii_uppercase().as_str() {
                "DENY" => FallbackDecision::Deny,
                "ALLOW" => FallbackDecision::Allow,
                _ => {
                    return Err(AuthzSettingsError {
                        variable: ENV_FALLBACK_DECISION,
                        value: v,
                        accepted: "DENY or ALLOW",
                    })
                }
            },
        };
        let fallback_ttl = match get(ENV_FALLBACK_TTL_SECONDS) {
            None => DEFAULT_FALLBACK_TTL,
            Some(v) => match v.parse::<u64>() {
                Ok(secs) if secs <= MAX_FALLBACK_TTL_SECONDS => Duration::from_secs(secs),
                _ => {
                    return Err(AuthzSettingsError {
                        variable: ENV_FALLBACK_TTL_SECONDS,
                        value: v,
                        accepted: "whole seconds from 0 (do not remember fallbacks) to 86400",
                    })
                }
            },
        };
        let Some(endpoint) = get(ENV_ENDPOINT) else {
            return Ok(None);
        };
        normalize_endpoint(&endpoint)?;
        Ok(Some(RemoteAuthzSettings {
            breaker_enabled,
            fallback,
            fallback_ttl,
            ..RemoteAuthzSettings::new(endpoint)
        }))
    }
}

/// `http://host:port` for the accepted spellings of the endpoint.
fn normalize_endpoint(raw: &str) -> Result<String, AuthzSettingsError> {
    let invalid = || AuthzSettingsError {
        variable: ENV_ENDPOINT,
        value: raw.to_string(),
        accepted: "http://host:port, grpc://host:port or host:port (plaintext HTTP/2; TLS to \
                   creto-authz is not configurable yet)",
    };
    let raw = raw.trim();
    let url = match raw.split_once("://") {
        None => format!("http://{raw}"),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => format!("http://{rest}"),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("grpc") => format!("http://{rest}"),
        Some(_) => return Err(invalid()),
    };
    let uri: http::Uri = url.parse().map_err(|_| invalid())?;
    match uri.host() {
        Some(host) if !host.is_empty() => Ok(url),
        _ => Err(invalid()),
    }
}

/// Where the circuit breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// Open time over, one probe call in flight.
    HalfOpen,
}

impl BreakerState {
    fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

enum BreakerInner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Permit {
    Call,
    Probe,
    Reject,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    tenant: String,
    subject: String,
    roles: Vec<String>,
    product: String,
    method: String,
}

impl CacheKey {
    fn new(who: &Identity, action: &Action) -> Self {
        let mut roles = who.roles.clone();
        roles.sort_unstable();
        CacheKey {
            tenant: who.tenant.clone(),
            subject: who.subject.clone(),
            roles,
            product: action.product.clone(),
            method: action.method.clone(),
        }
    }
}

#[derive(Clone)]
enum Origin {
    /// Answered by creto-authz.
    Remote,
    /// Fallback, valid while no answer came from creto-authz since `epoch`.
    Fallback { epoch: u64 },
}

#[derive(Clone)]
struct Cached {
    decision: Decision,
    expires: Instant,
    origin: Origin,
}

/// Why creto-authz gave no decision.
enum Failure {
    Timeout(Duration),
    Unavailable(String),
    Error(tonic::Code, String),
    CircuitOpen,
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            Failure::Unavailable(_) => "unavailable",
            Failure::Error(..) | Failure::CircuitOpen => "error",
        }
    }
}

impl Failure {
    /// What a refused caller is told: the failure's text (transport errors, addresses) is
    /// for the log.
    fn for_callers(&self) -> String {
        match self {
            Failure::Unavailable(_) => "unreachable".to_string(),
            Failure::Error(code, _) => format!("error {code:?}"),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout(d) => write!(f, "no answer within {d:?}"),
            Failure::Unavailable(m) => write!(f, "unreachable: {m}"),
            Failure::Error(code, m) => write!(f, "error {code:?}: {m}"),
            Failure::CircuitOpen => f.write_str("circuit open"),
        }
    }
}

/// The deadline passed: the server's DEADLINE_EXCEEDED, or tonic's own client-side
/// `grpc-timeout` enforcement (CANCELLED, "Timeout expired").
fn is_deadline(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::DeadlineExceeded {
        return true;
    }
    if status.code() != tonic::Code::Cancelled {
        return false;
    }
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = err.source();
    }
    status.message() == tonic::TimeoutExpired(()).to_string()
}

fn status_text(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let s = err.to_string();
        if !text.contains(&s) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&s);
        }
        source = err.source();
    }
    if text.is_empty() {
        text = format!("{:?}", status.code());
    }
    text
}

/// [`Authorizer`] backed by creto-authz. Build it inside a tokio runtime; it connects lazily,
/// so creto-authz being down at startup only means fallback decisions until it is up.
pub struct RemoteAuthorizer {
    settings: RemoteAuthzSettings,
    channel: Channel,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    breaker: Mutex<BreakerInner>,
    /// Bumped by every answer from creto-authz: fallbacks remembered before it are void.
    epoch: AtomicU64,
}

impl RemoteAuthorizer {
    pub fn new(mut settings: RemoteAuthzSettings) -> Result<Self, AuthzSettingsError> {
        let url = normalize_endpoint(&settings.endpoint)?;
        settings.failure_threshold = settings.failure_threshold.max(1);
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|_| AuthzSettingsError {
                variable: ENV_ENDPOINT,
                value: settings.endpoint.clone(),
                accepted: "http://host:port, grpc://host:port or host:port",
            })?
            .connect_timeout(settings.timeout)
            .connect_lazy();
        register_metrics();
        BREAKER_STATE.set(BreakerState::Closed.gauge());
        Ok(RemoteAuthorizer {
            settings,
            channel,
            cache: Mutex::new(HashMap::new()),
            breaker: Mutex::new(BreakerInner::Closed { failures: 0 }),
            epoch: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &RemoteAuthzSettings {
        &self.settings
    }

    /// Where the circuit breaker is now (an open breaker whose time is over reads `Open`
    /// until the next call probes).
    pub fn breaker_state(&self) -> BreakerState {
        match *self.breaker.lock().unwrap() {
            BreakerInner::Closed { .. } => BreakerState::Closed,
            BreakerInner::Open { .. } => BreakerState::Open,
            BreakerInner::HalfOpen => BreakerState::HalfOpen,
        }
    }

    fn set_breaker(&self, inner: &mut BreakerInner, next: BreakerInner) {
        let before = state_of(inner);
        *inner = next;
        let after = state_of(inner);
        if before != after {
            BREAKER_STATE.set(after.gauge());
            match after {
                BreakerState::Open => tracing::warn!(
                    endpoint = %self.settings.endpoint,
                    open_for = ?self.settings.open_for,
                    fallback = %self.settings.fallback,
                    "creto-authz circuit breaker open"
                ),
                BreakerState::HalfOpen => {
                    tracing::info!(endpoint = %self.settings.endpoint, "creto-authz circuit breaker half-open: probing")
                }
                BreakerState::Closed => {
                    tracing::info!(endpoint = %self.settings.endpoint, "creto-authz circuit breaker closed")
                }
            }
        }
    }

    fn permit(&self) -> Permit {
        if !self.settings.breaker_enabled {
            return Permit::Call;
        }
        let mut inner = self.breaker.lock().unwrap();
        match *inner {
            BreakerInner::Closed { .. } => Permit::Call,
            BreakerInner::Open { until } if Instant::now() < until => Permit::Reject,
            BreakerInner::Open { .. } => {
                self.set_breaker(&mut inner, BreakerInner::HalfOpen);
                Permit::Probe
            }
            BreakerInner::HalfOpen => Permit::Reject,
        }
    }

    fn record_success(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if !self.settings.breaker_enabled {
            return;
        }
        let mut inner = self.breaker.lock().unwrap();
        self.set_breaker(&mut inner, BreakerInner::Closed { failures: 0 });
    }

    fn record_failure(&self, probe: bool) {
        if !self.settings.breaker_enabled {
            return;
        }
        let mut inner = self.breaker.lock().unwrap();
        let open = BreakerInner::Open {
            until: Instant::now() + self.settings.open_for,
        };
        match *inner {
            BreakerInner::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.settings.failure_threshold {
                    self.set_breaker(&mut inner, open);
                } else {
                    *inner = BreakerInner::Closed { failures };
                }
            }
            BreakerInner::HalfOpen if probe => self.set_breaker(&mut inner, open),
            // A call let through while closed, ending after the breaker opened: already open.
            BreakerInner::HalfOpen | BreakerInner::Open { .. } => {}
        }
    }

    /// A probe that ended without an outcome (the caller went away): the next call probes.
    fn abandon_probe(&self) {
        let mut inner = self.breaker.lock().unwrap();
        if matches!(*inner, BreakerInner::HalfOpen) {
            self.set_breaker(
                &mut inner,
                BreakerInner::Open {
                    until: Instant::now(),
                },
            );
        }
    }

    fn lookup(&self, key: &CacheKey, now: Instant) -> Option<Cached> {
        let mut cache = self.cache.lock().unwrap();
        let entry = cache.get(key)?;
        let live = entry.expires > now
            && match entry.origin {
                Origin::Remote => true,
                Origin::Fallback { epoch } => epoch == self.epoch.load(Ordering::SeqCst),
            };
        if live {
            Some(entry.clone())
        } else {
            cache.remove(key);
            None
        }
    }

    fn remember(&self, key: CacheKey, decision: Decision, ttl: Duration, origin: Origin) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_CACHE_ENTRIES && !cache.contains_key(&key) {
            let epoch = self.epoch.load(Ordering::SeqCst);
            cache.retain(|_, e| {
                e.expires > now
                    && match e.origin {
                        Origin::Remote => true,
                        Origin::Fallback { epoch: e } => e == epoch,
                    }
            });
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Cached {
                decision,
                expires: now + ttl,
                origin,
            },
        );
    }

    /// The fallback decision, remembered while no answer has come from creto-authz since
    /// `epoch`: the epoch read before the failed call, so that an answer to another call
    /// meanwhile (the service is back) already retires it.
    fn fallback(&self, key: CacheKey, failure: &Failure, epoch: u64) -> Decision {
        let decision = match self.settings.fallback {
            FallbackDecision::Deny => Decision::Deny(format!(
                "authorization service unavailable ({}); fallback decision DENY",
                failure.for_callers()
            )),
            FallbackDecision::Allow => Decision::Allow,
        };
        self.remember(
            key,
            decision.clone(),
            self.settings.fallback_ttl,
            Origin::Fallback { epoch },
        );
        decision
    }

    async fn check(&self, who: &Identity, action: &Action) -> Result<CheckResponse, Failure> {
        let mut request = tonic::Request::new(CheckRequest {
            tenant: who.tenant.clone(),
            subject: who.subject.clone(),
            roles: who.roles.clone(),
            product: action.product.clone(),
            method: action.method.clone(),
        });
        request.set_timeout(self.settings.timeout);
        let mut client = AuthorizationServiceClient::new(self.channel.clone());
        match tokio::time::timeout(self.settings.timeout, client.check(request)).await {
            Err(_) => Err(Failure::Timeout(self.settings.timeout)),
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) if is_deadline(&status) => Err(Failure::Timeout(self.settings.timeout)),
            Ok(Err(status)) => match status.code() {
                tonic::Code::Unavailable => Err(Failure::Unavailable(status_text(&status))),
                // creto-authz answered about this request's content: a refusal, not an
                // outage. As a failure it took the fallback decision (ALLOW in an emergency
                // setting) and counted toward opening the breaker for every tenant. Statuses
                // about the gateway itself (its credential refused, authz misconfigured) stay
                // failures: they must show, and alert.
                code @ (tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::OutOfRange) => {
                    tracing::warn!(code = ?code, error = %status_text(&status), "creto-authz refused a check");
                    Ok(CheckResponse {
                        allowed: false,
                        reason: format!("the check was refused ({code:?})"),
                        cache_ttl_seconds: 0,
                    })
                }
                code => Err(Failure::Error(code, status_text(&status))),
            },
        }
    }
}

fn state_of(inner: &BreakerInner) -> BreakerState {
    match inner {
        BreakerInner::Closed { .. } => BreakerState::Closed,
        BreakerInner::Open { .. } => BreakerState::Open,
        BreakerInner::HalfOpen => BreakerState::HalfOpen,
    }
}

fn decision_label(decision: &Decision) -> &'static str {
    match decision {
        Decision::Allow => "allow",
        Decision::Deny(_) => "deny",
    }
}

fn count(source: &str, decision: &Decision) {
    DECISIONS
        .with_label_values(&[source, decision_label(decision)])
        .inc();
}

/// Releases the half-open slot if the probing call is dropped before it ends.
struct ProbeGuard<'a> {
    authorizer: &'a RemoteAuthorizer,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.authorizer.abandon_probe();
        }
    }
}

#[async_trait]
impl Authorizer for RemoteAuthorizer {
    async fn decide(&self, who: &Identity, action: &Action) -> Decision {
        let key = CacheKey::new(who, action);
        let remembered = self.lookup(&key, Instant::now());
        if let Some(Cached {
            decision,
            origin: Origin::Remote,
            ..
        }) = &remembered
        {
            count("cache", decision);
            return decision.clone();
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let permit = self.permit();
        if permit != Permit::Probe {
            if let Some(cached) = remembered {
                count("fallback", &cached.decision);
                return cached.decision;
            }
        }
        if permit == Permit::Reject {
            let decision = self.fallback(key, &Failure::CircuitOpen, epoch);
            count("fallback", &decision);
            return decision;
        }

        let mut guard = ProbeGuard {
            authorizer: self,
            armed: permit == Permit::Probe,
        };
        let started = Instant::now();
        let result = self.check(who, action).await;
        guard.armed = false;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Failure::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        REQUEST_SECONDS
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(answer) => {
                self.record_success();
                let decision = if answer.allowed {
                    Decision::Allow
                } else if answer.reason.is_empty() {
                    Decision::Deny("denied by creto-authz".to_string())
                } else {
                    Decision::Deny(format!("denied by creto-authz: {}", answer.reason))
                };
                let ttl = Duration::from_secs(answer.cache_ttl_seconds.into())
                    .min(self.settings.cache_ttl);
                self.remember(key, decision.clone(), ttl, Origin::Remote);
                count("remote", &decision);
                decision
            }
            Err(failure) => {
                CHECK_ERRORS.with_label_values(&[failure.kind()]).inc();
                tracing::warn!(
                    endpoint = %self.settings.endpoint,
                    tenant = %who.tenant,
                    product = %action.product,
                    method = %action.method,
                    fallback = %self.settings.fallback,
                    "creto-authz gave no decision ({failure})"
                );
                self.record_failure(permit == Permit::Probe);
                let decision = self.fallback(key, &failure, epoch);
                count("fallback", &decision);
                decision
            }
        }
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        let breaker = if s.breaker_enabled {
            format!(
                "circuit breaker opens after {} failures for {:?}",
                s.failure_threshold, s.open_for
            )
        } else {
            "circuit breaker disabled".to_string()
        };
        format!(
            "creto-authz at {} (deadline {:?}, decisions cached up to {:?}, {breaker}, \
             fallback {} remembered {:?})",
            s.endpoint, s.timeout, s.cache_ttl, s.fallback, s.fallback_ttl
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_and_unset_endpoint() {
        assert_eq!(RemoteAuthzSettings::from_vars(vars(&[])).unwrap(), None);
        let s = RemoteAuthzSettings::from_vars(vars(&[(ENV_ENDPOINT, "authz:50051")]))
            .unwrap()
            .unwrap();
        assert_eq!(s, RemoteAuthzSettings::new("authz:50051"));
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.fallback, FallbackDecision::Deny);
        assert_eq!(s.fallback_ttl, Duration::from_secs(30));
        assert!(s.breaker_enabled);
    }

    #[test]
    fn runbook_values() {
        let s = RemoteAuthzSettings::from_vars(vars(&[
            (ENV_ENDPOINT, "grpc://authz.creto.local:50051"),
            (ENV_BREAKER_ENABLED, "true"),
            (ENV_FALLBACK_DECISION, "DENY"),
            (ENV_FALLBACK_TTL_SECONDS, "900"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.fallback_ttl, Duration::from_secs(900));
        assert_eq!(
            normalize_endpoint(&s.endpoint).unwrap(),
            "http://authz.creto.local:50051"
        );
        let s = RemoteAuthzSettings::from_vars(vars(&[
            (ENV_ENDPOINT, "http://a:1"),
            (ENV_BREAKER_ENABLED, "FALSE"),
            (ENV_FALLBACK_DECISION, "allow"),
        ]))
        .unwrap()
        .unwrap();
        assert!(!s.breaker_enabled);
        assert_eq!(s.fallback, FallbackDecision::Allow);
    }

    #[test]
    fn invalid_values_name_the_variable_and_the_choices() {
        for (name, value, accepted) in [
            (ENV_FALLBACK_DECISION, "MAYBE", "DENY or ALLOW"),
            (ENV_BREAKER_ENABLED, "sometimes", "true or false"),
            (ENV_FALLBACK_TTL_SECONDS, "-1", "whole seconds"),
            (ENV_FALLBACK_TTL_SECONDS, "15m", "whole seconds"),
            (ENV_ENDPOINT, "ftp://authz:1", "http://host:port"),
            (ENV_ENDPOINT, "https://authz:1", "http://host:port"),
        ] {
            let err = RemoteAuthzSettings::from_vars(vars(&[
                (ENV_ENDPOINT, "authz:50051"),
                (name, value),
            ]))
            .unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(&format!("{name}=")), "{text}");
            assert!(text.contains(value), "{text}");
            assert!(text.contains(accepted), "{text}");
        }
        // Checked also without an endpoint.
        assert!(
            RemoteAuthzSettings::from_vars(vars(&[(ENV_FALLBACK_DECISION, "permit")])).is_err()
        );
    }
}
