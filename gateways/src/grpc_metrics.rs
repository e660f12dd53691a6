//! gRPC server metrics with the names the runbook's alerts use:
//! `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}` and the
//! `grpc_server_handling_seconds` histogram, labelled by service and method.
use std::collections::HashSet;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};
use prost::Message;

static STARTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "grpc_server_started_total",
        "RPCs started",
        &["grpc_service", "grpc_method"]
    )
    .unwrap()
});
static HANDLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "grpc_server_handled_total",
        "RPCs completed, by status code",
        &["grpc_service", "grpc_method", "grpc_code"]
    )
    .unwrap()
});
static HANDLING: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "grpc_server_handling_seconds",
        "Time to answer an RPC (to the response headers for streams)",
        &["grpc_service", "grpc_method"],
        vec![
            0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
        ]
    )
    .unwrap()
});

/// Touches every series family so `/metrics` lists them before the first call.
pub fn register() {
    LazyLock::force(&STARTED);
    LazyLock::force(&HANDLED);
    LazyLock::force(&HANDLING);
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`); empty parts when the path has none.
pub fn service_and_method(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path.trim_start_matches('/'), ""))
}

/// Every `/pkg.Service/Method` a gateway serves: the platform's services (from the compiled
/// descriptors), gRPC health and both reflection versions.
static KNOWN: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let set = prost_types::FileDescriptorSet::decode(creto_schemas::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptor set decodes");
    let mut known: HashSet<String> = set
        .file
        .iter()
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                service.method.iter().map(move |method| {
                    format!("/{}.{}/{}", file.package(), service.name(), method.name())
                })
            })
        })
        .collect();
    known.extend(
        [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.health.v1.Health/List",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(String::from),
    );
    known
});

/// Whether some gateway serves `path`. Paths come from callers before they are authenticated:
/// anything made up is labelled, authorized and cached as nothing.
pub fn is_known(path: &str) -> bool {
    KNOWN.contains(path)
}

#[derive(Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

fn code_name(status: Option<&http::HeaderValue>) -> String {
    let code = status
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
        .unwrap_or(tonic::Code::Ok);
    format!("{code:?}")
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        // Made-up paths share one series: each would otherwise add series (the histogram
        // alone 17) labelled with whatever text an unauthenticated caller sends.
        let (service, method) = if is_known(path) {
            service_and_method(path)
        } else {
            ("unknown", "unknown")
        };
        let (service, method) = (service.to_string(), method.to_string());
        STARTED.with_label_values(&[&service, &method]).inc();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            let code = match &response {
                Ok(r) => code_name(r.headers().get("grpc-status")),
                Err(_) => "Unknown".to_string(),
            };
            HANDLED.with_label_values(&[&service, &method, &code]).inc();
            HANDLING
                .with_label_values(&[&service, &method])
                .observe(started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_paths_are_known() {
        assert!(is_known(
            "/creto.enablement.metering.v1.MeteringService/QueryUsage"
        ));
        assert!(is_known(
            "/creto.enablement.messaging.v1.MessagingService/Receive"
        ));
        assert!(is_known("/grpc.health.v1.Health/Check"));
        assert!(!is_known(
            "/creto.enablement.metering.v1.MeteringService/Made_Up"
        ));
        assert!(!is_known("/x/y"));
    }
}
