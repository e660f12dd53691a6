//! The gRPC layer that authenticates, authorizes and rate-limits every product call before it
//! reaches a service, and hands the service the caller's [`Identity`] in the request
//! extensions. gRPC health and reflection pass untouched.
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::ratelimit::RateLimits;
use super::token::KeyRing;
use super::{Action, AuthMethod, Authorizer, Decision, Identity};

/// Everything the layer needs; built once per process from the configuration.
pub struct Auth {
    /// Verifies bearer tokens; `None`: bearer tokens are not accepted.
    pub keys: Option<KeyRing>,
    pub authorizer: Arc<dyn Authorizer>,
    pub limits: RateLimits,
    /// Set only when authentication is explicitly disabled (`ENABLEMENT_AUTH=none`): every
    /// caller is this identity.
    pub anonymous: Option<Identity>,
    /// TLS on the gRPC port, with client certificates when a client CA is configured.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Paths that stay reachable without credentials.
fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// `/creto.enablement.metering.v1.MeteringService/QueryUsage` → (`metering`, `QueryUsage`);
/// `None` for a method no gateway serves, answered UNIMPLEMENTED before anything is decided
/// (made-up names would each be a new decision, and cache entry, of the remote authorizer).
pub fn action_of(path: &str) -> Option<Action> {
    if !crate::grpc_metrics::is_known(path) {
        return None;
    }
    let (service, method) = crate::grpc_metrics::service_and_method(path);
    let product = service
        .strip_prefix("creto.enablement.")?
        .split('.')
        .next()?;
    Some(Action {
        product: product.to_string(),
        method: method.to_string(),
    })
}

/// The identity in a client certificate: `O` is the tenant, `CN` the subject, each `OU` a role.
pub fn identity_from_certificate(der: &[u8]) -> Result<Identity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("client certificate cannot be parsed: {e}"))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let tenant = first(&mut subject.iter_organization())
        .ok_or("client certificate has no O (organization) naming the tenant")?;
    let name = first(&mut subject.iter_common_name())
        .ok_or("client certificate has no CN naming the subject")?;
    super::check_tenant(&tenant)?;
    let roles = subject
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok().map(str::to_string))
        .collect();
    Ok(Identity {
        tenant,
        subject: name,
        roles,
        via: AuthMethod::ClientCertificate,
    })
}

impl Auth {
    fn authenticate<B>(&self, request: &http::Request<B>) -> Result<Identity, Status> {
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            let keys = self.keys.as_ref().ok_or_else(|| {
                Status::unauthenticated(
                    "bearer tokens are not accepted by this server; use a client certificate",
                )
            })?;
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
            return keys
                .verify(token.trim())
                .map_err(|e| Status::unauthenticated(e.to_string()));
        }
        let certificate = request
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().cloned());
        if let Some(der) = certificate {
            return identity_from_certificate(&der).map_err(Status::unauthenticated);
        }
        self.anonymous.clone().ok_or_else(|| {
            Status::unauthenticated(
                "no credentials: send `authorization: Bearer <token>` (mint one with `enablement token issue`) or connect with a client certificate",
            )
        })
    }

    /// Rate-limits, then authorizes, one call of an authenticated caller. In that order: a
    /// decision may be a call to the remote authorizer, shared by every tenant, and calls it
    /// would deny must cost their tenant's budget before they can load it.
    pub async fn admit(&self, who: Identity, action: &Action) -> Result<Identity, Status> {
        if let Err(e) = self.limits.check(&who.tenant) {
            let message = format!(
                "tenant {} is over its rate limit of {} requests/s (burst {}); retry in {} ms",
                who.tenant,
                e.limit.requests_per_second,
                e.limit.burst,
                e.retry_after.as_millis().max(1)
            );
            let mut status = Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(e.retry_after)),
            );
            if let Ok(v) = e.retry_after.as_millis().max(1).to_string().parse() {
                status.metadata_mut().insert("retry-after-ms", v);
            }
            crate::auth::RATE_LIMITED
                .with_label_values(&[&who.tenant])
                .inc();
            return Err(status);
        }
        if let Decision::Deny(reason) = self.authorizer.decide(&who, action).await {
            return Err(Status::permission_denied(reason));
        }
        Ok(who)
    }
}

#[derive(Clone)]
pub struct AuthLayer(pub Arc<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            auth: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    auth: Arc<Auth>,
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service that was polled ready handles this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path().to_string();
        if is_open(&path) {
            return Box::pin(inner.call(request));
        }
        let auth = self.auth.clone();
        Box::pin(async move {
            let Some(action) = action_of(&path) else {
                return Ok(Status::unimplemented(format!("no such method {path}")).into_http());
            };
            let admitted = match auth.authenticate(&request) {
                Ok(who) => auth.admit(who, &action).await,
                Err(status) => Err(status),
            };
            match admitted {
                Ok(who) => {
                    request.extensions_mut().insert(who);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The caller of a product method (set by [`AuthLayer`]).
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls the authorizer would deny still spend the tenant's budget: past it they are
    /// refused before a decision is asked (a remote one is shared by every tenant).
    #[tokio::test]
    async fn the_rate_limit_comes_before_the_decision() {
        use crate::auth::ratelimit::{Limit, LimitsFile};
        let auth = Auth {
            keys: None,
            authorizer: Arc::new(crate::auth::policy::PolicyAuthorizer::default_policy()),
            limits: RateLimits::new(LimitsFile {
                default: Limit {
                    requests_per_second: 1,
                    burst: 1,
                },
                tenants: Default::default(),
            })
            .unwrap(),
            anonymous: None,
            tls: None,
        };
        let nobody = Identity {
            tenant: "acme".into(),
            subject: "x".into(),
            roles: vec![],
            via: crate::auth::AuthMethod::Bearer,
        };
        let action = action_of("/creto.enablement.metering.v1.MeteringService/QueryUsage").unwrap();
        let first = auth.admit(nobody.clone(), &action).await.unwrap_err();
        assert_eq!(first.code(), Code::PermissionDenied, "{first:?}");
        let second = auth.admit(nobody, &action).await.unwrap_err();
        assert_eq!(second.code(), Code::ResourceExhausted, "{second:?}");
    }

    #[test]
    fn paths_map_to_products_and_methods() {
        assert_eq!(
            action_of("/creto.enablement.metering.v1.MeteringService/QueryUsage"),
            Some(Action {
                product: "metering".into(),
                method: "QueryUsage".into()
            })
        );
        assert_eq!(action_of("/other.Service/X"), None);
        assert_eq!(
            action_of("/creto.enablement.metering.v1.MeteringService/Made_Up"),
            None
        );
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open(
            "/creto.enablement.metering.v1.MeteringService/QueryUsage"
        ));
    }
}
