//! One trace from a gRPC call through the log into the projector: the client's `traceparent`
//! is the parent of `grpc …/IngestEvents`, whose child `append metering.events` writes its
//! context on the events, and the `project metering` batch that applies them is in (or linked
//! to) that trace. Spans go over OTLP/gRPC to a fake collector in this test.
//!
//! The global subscriber can be installed once per process: this binary holds one test.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use creto_gateways::telemetry::{self, TelemetryConfig};
use creto_replay_tests::Env;
use creto_schemas::metering::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::wrappers::TcpListenerStream;

/// Every span received, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

fn usage_event(id: &str, subscription: &str) -> pb::UsageEvent {
    let mut data = prost_types::Struct::default();
    data.fields.insert(
        "quantity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(2.0)),
        },
    );
    pb::UsageEvent {
        id: id.into(),
        source: "trace-test".into(),
        r#type: "agent.execution".into(),
        subject: subscription.into(),
        time: Some(creto_streams::envelope::timestamp(Utc::now())),
        data: Some(data),
    }
}

fn describe(spans: &[(String, Span)]) -> String {
    spans
        .iter()
        .map(|(_, s)| {
            format!(
                "  {:?} trace={} span={} parent={} links={:?}",
                s.name,
                hex::encode(&s.trace_id),
                hex::encode(&s.span_id),
                hex::encode(&s.parent_span_id),
                s.links
                    .iter()
                    .map(|l| format!("{}/{}", hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                    .collect::<Vec<_>>()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_append_and_its_projection_share_one_trace() {
    // The fake collector.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // The pipeline, pointed at it in-process (not through the environment).
    let guard = Arc::new(telemetry::init_with(TelemetryConfig {
        json_logs: true,
        otlp_endpoint: Some(format!("http://{collector_addr}")),
        service_name: "trace-propagation-test".into(),
    }));
    assert!(guard.exporting(), "the OTLP exporter was not installed");

    let env = Env::embedded().await;
    let (running, mut client) = env.start_metering(true).await;

    // A caller already in a trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(pb::IngestEventsRequest {
        events: vec![
            usage_event("t1", "sub_trace"),
            usage_event("t2", "sub_trace"),
        ],
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let response = client.ingest_events(request).await.unwrap().into_inner();
    assert_eq!(response.accepted, 2, "{response:?}");
    env.wait_applied(response.sequence).await;

    // The projection span ends just after its commit; flush until the three have arrived.
    let grpc_name = "grpc creto.enablement.metering.v1.MeteringService/IngestEvents";
    let deadline = Instant::now() + Duration::from_secs(30);
    let (grpc, append, project) = loop {
        let g = guard.clone();
        tokio::task::spawn_blocking(move || g.flush())
            .await
            .unwrap()
            .expect("flush");
        let spans = collector.spans();
        let in_trace = |s: &Span| hex::encode(&s.trace_id) == trace_id;
        let grpc = spans
            .iter()
            .find(|(_, s)| s.name == grpc_name && in_trace(s))
            .cloned();
        let append = spans
            .iter()
            .find(|(_, s)| s.name == "append metering.events" && in_trace(s))
            .cloned();
        let project = append.as_ref().and_then(|(_, a)| {
            spans
                .iter()
                .find(|(_, s)| {
                    s.name == "project metering"
                        && ((in_trace(s) && s.parent_span_id == a.span_id)
                            || s.links
                                .iter()
                                .any(|l| l.trace_id == a.trace_id && l.span_id == a.span_id))
                })
                .cloned()
        });
        if let (Some(g), Some(a), Some(p)) = (&grpc, &append, &project) {
            break (g.clone(), a.clone(), p.clone());
        }
        assert!(
            Instant::now() < deadline,
            "expected spans not received (grpc: {}, append: {}, project linked: {}); got:\n{}",
            grpc.is_some(),
            append.is_some(),
            project.is_some(),
            describe(&spans)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // grpc: the caller's span is its parent.
    assert_eq!(hex::encode(&grpc.1.parent_span_id), caller_span);
    assert_eq!(grpc.0, "trace-propagation-test");
    // append: a child of the gRPC span, same trace.
    assert_eq!(append.1.trace_id, grpc.1.trace_id);
    assert_eq!(append.1.parent_span_id, grpc.1.span_id);
    // project: every event of the call came from the same append, so it is that span's child.
    let (_, project) = project;
    assert!(
        hex::encode(&project.trace_id) == trace_id
            || project
                .links
                .iter()
                .any(|l| hex::encode(&l.trace_id) == trace_id),
        "projection span not in the caller's trace"
    );
    println!(
        "trace {trace_id}: grpc {} → append {} → project {}",
        hex::encode(&grpc.1.span_id),
        hex::encode(&append.1.span_id),
        hex::encode(&project.span_id)
    );

    running.stop().await;
    env.drop().await;
    server.abort();
    drop(guard);
}
