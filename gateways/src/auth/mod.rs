//! Who is calling and what they may do: authentication (bearer JWTs and mutual TLS client
//! certificates), authorization behind one interface (an embedded policy file, or the external
//! creto-authz service with a decision cache and a circuit breaker), and per-tenant rate
//! limits. The gRPC layer in [`layer`] applies them to every product method; gRPC health and
//! reflection stay open.
pub mod authz_remote;
pub mod layer;
pub mod policy;
pub mod ratelimit;
pub mod reload;
pub mod token;

use std::sync::LazyLock;

use async_trait::async_trait;
use prometheus::{register_int_counter_vec, IntCounterVec};

/// Calls refused by the rate limiter, per tenant.
pub static RATE_LIMITED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "enablement_rate_limited_total",
        "Calls refused with RESOURCE_EXHAUSTED by the per-tenant rate limit",
        &["tenant"]
    )
    .unwrap()
});

/// How the caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Bearer,
    ClientCertificate,
}

/// The role of the platform's own operators: it lists every tenant's dead letters. Not
/// `operator`, which the runbook gives on-call tokens of one tenant.
pub const PLATFORM_OPERATOR: &str = "platform-operator";

/// An authenticated caller. Every read and write is scoped to `tenant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub subject: String,
    pub roles: Vec<String>,
    pub via: AuthMethod,
}

/// Tenant names appear in subjects and keys: 1 to 64 letters, digits, `_` or `-`.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant {tenant:?} is not a valid name: use 1 to 64 letters, digits, `_` or `-`"
        ))
    }
}

impl Identity {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// What a call wants to do: the product (`metering`, …) and the gRPC method (`QueryUsage`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Action {
    pub product: String,
    pub method: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason the caller is told.
    Deny(String),
}

/// The one authorization interface.
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// Never fails: an authorizer that cannot decide applies its fallback decision.
    async fn decide(&self, who: &Identity, action: &Action) -> Decision;
    /// For logs and the startup banner.
    fn describe(&self) -> String;
}

/// How the gateways authenticate (flags and environment; see the README's Security section).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// `tokens` (default: bearer tokens and/or client certificates required) or `none` (every
    /// caller is an admin of tenant `default`: development only, never in production).
    #[arg(long = "auth", env = "ENABLEMENT_AUTH", global = true)]
    pub mode: Option<String>,
    /// Key ring that signs and verifies bearer tokens (TOML; `enablement token keygen`).
    #[arg(long, env = "ENABLEMENT_AUTH_KEYS", global = true)]
    pub auth_keys: Option<std::path::PathBuf>,
    /// Authorization rules (TOML); the built-in policy when unset. Ignored when AUTHZ_ENDPOINT
    /// points at a creto-authz service.
    #[arg(long, env = "ENABLEMENT_POLICY", global = true)]
    pub policy: Option<std::path::PathBuf>,
    /// Per-tenant rate limits (TOML); 500 requests/s, burst 1,000 per tenant when unset.
    #[arg(long, env = "ENABLEMENT_RATE_LIMITS", global = true)]
    pub rate_limits: Option<std::path::PathBuf>,
    /// Server certificate and key (PEM) for TLS on the gRPC ports.
    #[arg(long, env = "ENABLEMENT_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "ENABLEMENT_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// CA whose client certificates are accepted (mutual TLS): O = tenant, CN = subject,
    /// each OU = a role.
    #[arg(
        long,
        env = "ENABLEMENT_TLS_CLIENT_CA",
        global = true,
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

/// How often key rings, policies and rate limits are re-read.
const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl AuthArgs {
    /// Explicitly unauthenticated (tests of other concerns, local experiments).
    pub fn disabled() -> Self {
        AuthArgs {
            mode: Some("none".into()),
            ..Default::default()
        }
    }

    /// Builds the gateways' authentication, authorization and rate limits. `dev_keys` is the
    /// key ring `enablement dev` keeps in its data directory. Errors say what to set.
    pub fn build(
        &self,
        dev_keys: Option<&std::path::Path>,
    ) -> Result<std::sync::Arc<layer::Auth>, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {} ({e})", p.display()))
        };
        let anonymous = match self.mode.as_deref().unwrap_or("tokens") {
            "tokens" => None,
            "none" => Some(Identity {
                tenant: creto_domain::metering::event::DEFAULT_TENANT.to_string(),
                subject: "anonymous".into(),
                roles: vec!["admin".into()],
                via: AuthMethod::Bearer,
            }),
            other => return Err(format!("ENABLEMENT_AUTH={other:?}: use `tokens` or `none`")),
        };
        let keys = match self.auth_keys.as_deref().or(dev_keys) {
            Some(p) => {
                let ring = token::KeyRing::load(p).map_err(|e| e.to_string())?;
                reload::spawn(ring.clone(), RELOAD_EVERY);
                Some(ring)
            }
            None => None,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let mut tls = tonic::transport::ServerTlsConfig::new().identity(
                    tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
                );
                if let Some(ca) = &self.tls_client_ca {
                    // With a key ring too, a caller may use either: the certificate is optional.
                    tls = tls
                        .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?))
                        .client_auth_optional(keys.is_some() || anonymous.is_some());
                }
                // Parsed here, not when the gateway starts: there a bad key left a process
                // that answered health checks with nothing on its gRPC port.
                tonic::transport::Server::builder()
                    .tls_config(tls.clone())
                    .map_err(|e| {
                        format!(
                            "ENABLEMENT_TLS_CERT / ENABLEMENT_TLS_KEY{} do not load: {e}",
                            if self.tls_client_ca.is_some() {
                                " / ENABLEMENT_TLS_CLIENT_CA"
                            } else {
                                ""
                            }
                        )
                    })?;
                Some(tls)
            }
            _ => None,
        };
        if anonymous.is_none() && keys.is_none() && self.tls_client_ca.is_none() {
            return Err("authentication is not configured: set ENABLEMENT_AUTH_KEYS (create a key ring with `enablement token keygen`) and/or ENABLEMENT_TLS_CLIENT_CA, or ENABLEMENT_AUTH=none to run unauthenticated (development only)".into());
        }
        let authorizer: std::sync::Arc<dyn Authorizer> =
            match authz_remote::RemoteAuthzSettings::from_env().map_err(|e| e.to_string())? {
                Some(remote) => {
                    let remote: std::sync::Arc<dyn Authorizer> = std::sync::Arc::new(
                        authz_remote::RemoteAuthorizer::new(remote).map_err(|e| e.to_string())?,
                    );
                    match &self.policy {
                        Some(p) => {
                            let policy = policy::PolicyAuthorizer::load(p)?;
                            reload::spawn(policy.clone(), RELOAD_EVERY);
                            std::sync::Arc::new(policy::DenyRulesFirst {
                                local: policy,
                                then: remote,
                            })
                        }
                        None => remote,
                    }
                }
                None => match &self.policy {
                    Some(p) => {
                        let policy = policy::PolicyAuthorizer::load(p)?;
                        reload::spawn(policy.clone(), RELOAD_EVERY);
                        std::sync::Arc::new(policy)
                    }
                    None => std::sync::Arc::new(policy::PolicyAuthorizer::default_policy()),
                },
            };
        let limits = match &self.rate_limits {
            Some(p) => {
                let limits = ratelimit::RateLimits::load(p)?;
                reload::spawn(limits.clone(), RELOAD_EVERY);
                limits
            }
            None => ratelimit::RateLimits::new(ratelimit::LimitsFile::default())?,
        };
        Ok(std::sync::Arc::new(layer::Auth {
            keys,
            authorizer,
            limits,
            anonymous,
            tls,
        }))
    }
}

/// A client-side interceptor that sends a bearer token (tests, tools).
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Self {
        Bearer(
            format!("Bearer {token}")
                .parse()
                .expect("a JWT is valid header text"),
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}
