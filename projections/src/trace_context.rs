//! W3C trace context on the log: the `traceparent`/`tracestate` headers a writer puts on an
//! event, and the span a projector opens for a batch, tied to the traces of its events, so one
//! trace shows command → append → projection.
//!
//! Both directions use the W3C TraceContext propagator directly (not the process-global one):
//! the header names are part of the log's format, whatever propagator the process installs for
//! its own calls. Without an OpenTelemetry layer in the subscriber, spans have no context and
//! nothing is written or linked.
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use creto_streams::{Headers, StoredEvent};

/// At most this many links on one batch span (the SDK's default span link limit).
pub const MAX_LINKS: usize = 128;

struct HeaderWriter<'a>(&'a mut Headers);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderReader<'a>(&'a Headers);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// Writes the trace context of `span` into `headers` (`traceparent`, and `tracestate` when
/// there is one). A span without a valid context writes nothing.
pub fn inject_span(span: &tracing::Span, headers: &mut Headers) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(headers));
    }
}

/// The span context in an event's headers, if it carries a valid `traceparent`.
pub fn extract(headers: &Headers) -> Option<SpanContext> {
    let cx = TraceContextPropagator::new().extract(&HeaderReader(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The distinct trace contexts of `events`, in order of first appearance, at most `MAX_LINKS`.
pub fn contexts(events: &[StoredEvent]) -> Vec<SpanContext> {
    let mut out: Vec<SpanContext> = Vec::new();
    for e in events {
        if let Some(sc) = extract(&e.headers) {
            if !out
                .iter()
                .any(|o| o.trace_id() == sc.trace_id() && o.span_id() == sc.span_id())
            {
                out.push(sc);
                if out.len() == MAX_LINKS {
                    break;
                }
            }
        }
    }
    out
}

/// The span `project {product}` for one batch. When every traced event of the batch comes from
/// the same writer span (one command, or a single event), that span is its parent and the
/// projection sits in the command's trace; otherwise it is a root span with one link per
/// distinct writer span.
pub fn batch_span(product: &'static str, events: &[StoredEvent]) -> tracing::Span {
    let span = tracing::info_span!(
        "project",
        otel.name = %format_args!("project {product}"),
        otel.kind = "consumer",
        product,
        events = events.len(),
        first_sequence = events.first().map(|e| e.sequence).unwrap_or_default(),
        last_sequence = events.last().map(|e| e.sequence).unwrap_or_default(),
    );
    let found = contexts(events);
    match found.as_slice() {
        [] => {}
        [one] => {
            let parent = opentelemetry::Context::new().with_remote_span_context(one.clone());
            let _ = span.set_parent(parent);
        }
        many => {
            // A batch is not the child of any one command: it starts its own trace.
            let _ = span.set_parent(opentelemetry::Context::new());
            for sc in many {
                span.add_link(sc.clone());
            }
        }
    }
    span
}
