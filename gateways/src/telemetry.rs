//! Logs and traces of the `enablement` binary.
//!
//! [`init`] installs one `tracing` subscriber: an `EnvFilter` (`RUST_LOG`), logs on stderr
//! (JSON lines with `trace_id`/`span_id` for the server commands, compact text otherwise) and
//! an OpenTelemetry layer. Spans are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, under `OTEL_SERVICE_NAME` (default
//! `creto-enablement`); without an endpoint spans still get W3C ids, so logs and the
//! `traceparent` written on events still correlate with the caller's trace.
//!
//! One trace follows a command through the platform:
//! - [`GrpcTraceLayer`] opens `grpc {service}/{method}` as the child of the caller's
//!   `traceparent` metadata;
//! - [`append`] / [`append_batch`] open `append {subject-prefix}` and write its context into
//!   the `traceparent`/`tracestate` headers of each event;
//! - the projector runner opens `project {product}` for each batch, parented or linked to the
//!   contexts found in those headers (`creto_projections::trace_context`).
use std::fmt;
use std::task::{Context, Poll};

use creto_streams::{AppendEvent, Appended, EventLog, Headers, LogError};
use futures::future::BoxFuture;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::{field, Instrument, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub const DEFAULT_SERVICE_NAME: &str = "creto-enablement";
const DEFAULT_FILTER: &str = "info,sqlx=warn,async_nats=warn";
/// Instrumentation scope of our spans.
const TRACER: &str = "creto-enablement";

/// What [`init_with`] installs.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub json_logs: bool,
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`. `None`: spans are not exported.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

impl TelemetryConfig {
    /// From the standard OpenTelemetry environment variables.
    pub fn from_env(json_logs: bool) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        TelemetryConfig {
            json_logs,
            otlp_endpoint: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT")),
            service_name: var("OTEL_SERVICE_NAME")
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string()),
        }
    }
}

/// Keeps the tracer provider; flushes and shuts it down when dropped, so spans of the last
/// moments are exported. Hold it until the end of `main`, and drop it while the Tokio runtime
/// that was current at [`init`] is still alive (the gRPC exporter runs on it).
#[must_use = "dropping the guard shuts the span exporter down"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl TelemetryGuard {
    /// Whether spans go to an OTLP collector.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Exports every finished span now. Blocks: from async code call it on a blocking thread
    /// (`tokio::task::spawn_blocking`) of a multi-threaded runtime.
    pub fn flush(&self) -> Result<(), String> {
        self.provider.force_flush().map_err(|e| e.to_string())
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            if self.exporting {
                eprintln!("warning: trace exporter shutdown: {e}");
            }
        }
    }
}

/// [`init_with`] configured from the environment.
pub fn init(json_logs: bool) -> TelemetryGuard {
    init_with(TelemetryConfig::from_env(json_logs))
}

/// Installs the global subscriber (once per process; a second call keeps the first one and
/// says so on stderr) and the W3C TraceContext propagator. The OTLP exporter needs a Tokio
/// runtime: call this inside one (`runtime.enter()`), or spans are not exported.
pub fn init_with(config: TelemetryConfig) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut exporting = false;
    if let Some(endpoint) = &config.otlp_endpoint {
        if tokio::runtime::Handle::try_current().is_err() {
            eprintln!(
                "warning: traces are not exported: telemetry was started outside a Tokio runtime"
            );
        } else {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
            {
                Ok(exporter) => {
                    builder = builder.with_batch_exporter(exporter);
                    exporting = true;
                }
                Err(e) => eprintln!("warning: traces are not exported to {endpoint}: {e}"),
            }
        }
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());

    let filter =
        EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = if config.json_logs {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(JsonWithTrace)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .compact()
            .boxed()
    };
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(TRACER));
    if let Err(e) = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .with(filter)
        .try_init()
    {
        eprintln!("warning: logging was already set up; keeping it ({e})");
    }
    if exporting {
        tracing::info!(
            endpoint = config.otlp_endpoint.as_deref().unwrap_or_default(),
            service = %config.service_name,
            "exporting traces over OTLP/gRPC"
        );
    }
    TelemetryGuard {
        provider,
        exporting,
    }
}

// ------------------------------------------------------------------------------ JSON logs

/// One JSON object per line: `timestamp`, `level`, the event's fields (`message`, …),
/// `target`, the current `span` (name and fields), and `trace_id`/`span_id` of the current
/// OpenTelemetry span when there is one.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        use serde_json::{Map, Value};
        let meta = event.metadata();
        let mut out = Map::new();
        out.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        out.insert("level".into(), meta.level().as_str().into());
        event.record(&mut JsonVisitor(&mut out));
        out.insert("target".into(), meta.target().into());
        if let Some(span) = ctx.lookup_current() {
            let mut fields = span
                .extensions()
                .get::<FormattedFields<N>>()
                .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                .unwrap_or_default();
            fields.insert("name".into(), span.name().into());
            out.insert("span".into(), Value::Object(fields));
        }
        let cx = opentelemetry::Context::current();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            out.insert("trace_id".into(), sc.trace_id().to_string().into());
            out.insert("span_id".into(), sc.span_id().to_string().into());
        }
        writeln!(writer, "{}", Value::Object(out))
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, f: &field::Field, v: f64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &field::Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &field::Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &field::Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_str(&mut self, f: &field::Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_error(&mut self, f: &field::Field, v: &(dyn std::error::Error + 'static)) {
        self.0.insert(f.name().into(), v.to_string().into());
    }
    fn record_debug(&mut self, f: &field::Field, v: &dyn fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
}

// ------------------------------------------------------------------------------ gRPC server

/// Opens `grpc {service}/{method}` around each call, as the child of the caller's W3C
/// `traceparent` (and `tracestate`) metadata when it has one. Health checks are not traced.
#[derive(Clone, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

#[derive(Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Codes that make a server span an error (OpenTelemetry's gRPC semantic conventions).
fn is_server_error(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcTrace<S>
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
        let (service, method) = crate::grpc_metrics::service_and_method(request.uri().path());
        let (service, method) = (service.to_string(), method.to_string());
        if service == "grpc.health.v1.Health" {
            return Box::pin(self.inner.call(request));
        }
        let span = tracing::info_span!(
            "grpc",
            otel.name = %format_args!("grpc {service}/{method}"),
            otel.kind = "server",
            otel.status_code = field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = field::Empty,
        );
        let remote = TraceContextPropagator::new().extract(&HttpHeaders(request.headers()));
        if remote.span().span_context().is_valid() {
            let _ = span.set_parent(remote);
        }
        // The handler's future is built (and later polled) inside the span.
        let future = span.in_scope(|| self.inner.call(request));
        let recorder = span.clone();
        Box::pin(
            async move {
                let response = future.await;
                let code = match &response {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32)
                        .unwrap_or(tonic::Code::Ok),
                    Err(_) => tonic::Code::Unknown,
                };
                recorder.record("rpc.grpc.status_code", code as i32);
                if is_server_error(code) {
                    recorder.record("otel.status_code", "ERROR");
                }
                response
            }
            .instrument(span),
        )
    }
}

// ------------------------------------------------------------------------------ log appends

/// Writes the trace context of the current span into `headers` (`traceparent`, `tracestate`).
pub fn inject(headers: &mut Headers) {
    creto_projections::trace_context::inject_span(&tracing::Span::current(), headers);
}

fn append_span(subject_prefix: &str, events: usize) -> tracing::Span {
    tracing::info_span!(
        "append",
        otel.name = %format_args!("append {subject_prefix}"),
        otel.kind = "producer",
        otel.status_code = field::Empty,
        messaging.destination.name = subject_prefix,
        events,
    )
}

/// Appends one event in a span `append {subject_prefix}` (the logical subject without its
/// last token, e.g. `metering.meters`), with that span's context in the event's headers.
pub async fn append(
    log: &dyn EventLog,
    subject_prefix: &str,
    mut event: AppendEvent,
) -> Result<Appended, LogError> {
    let span = append_span(subject_prefix, 1);
    span.in_scope(|| inject(&mut event.headers));
    let result = log.append(event).instrument(span.clone()).await;
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    result
}

/// [`append`] for a batch: one span, its context in every event's headers.
pub async fn append_batch(
    log: &dyn EventLog,
    subject_prefix: &str,
    mut events: Vec<AppendEvent>,
) -> Vec<Result<Appended, LogError>> {
    if events.is_empty() {
        return log.append_batch(events).await;
    }
    let span = append_span(subject_prefix, events.len());
    span.in_scope(|| {
        for e in &mut events {
            inject(&mut e.headers);
        }
    });
    let results = log.append_batch(events).instrument(span.clone()).await;
    if results.iter().any(|r| r.is_err()) {
        span.record("otel.status_code", "ERROR");
    }
    results
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_the_current_span() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonWithTrace),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let mut headers = Headers::new();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("work", job = 7);
            span.in_scope(|| {
                tracing::info!(answer = 42, "inside");
                inject(&mut headers);
            });
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        let inside = &lines[1];
        assert_eq!(inside["message"], "inside");
        assert_eq!(inside["answer"], 42);
        assert_eq!(inside["level"], "INFO");
        assert_eq!(inside["span"]["name"], "work");
        assert_eq!(inside["span"]["job"], 7);
        let trace_id = inside["trace_id"].as_str().unwrap();
        let span_id = inside["span_id"].as_str().unwrap();
        assert_eq!((trace_id.len(), span_id.len()), (32, 16), "{text}");
        // The same context is what goes on an event appended from that span.
        assert_eq!(
            headers.get("traceparent"),
            Some(format!("00-{trace_id}-{span_id}-01").as_str())
        );
    }
}
