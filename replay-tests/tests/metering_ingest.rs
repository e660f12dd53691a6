//! Metering from producer to query on the real services: NATS and gRPC producers, bad input,
//! duplicates, read-your-writes, dead letters, and the runbook's SQL.
use chrono::{Duration as Ch, Utc};
use creto_replay_tests::{cloud_event, Env};
use creto_schemas::metering::v1 as pb;
use creto_streams::{ReplayFrom, DEADLETTERS, METERING};
use futures::TryStreamExt;
use prost::Message;
use tonic::Code;

fn ts(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    creto_streams::envelope::timestamp(t)
}

fn usage_request(sub: &str, event_type: &str, min_sequence: u64) -> pb::QueryUsageRequest {
    let now = Utc::now();
    pb::QueryUsageRequest {
        subscription_id: sub.into(),
        event_type: event_type.into(),
        from: Some(ts(now - Ch::days(8))),
        to: Some(ts(now + Ch::hours(1))),
        window: pb::Window::Day as i32,
        min_sequence,
        ..Default::default()
    }
}

/// Metering's first dead letters, oldest first.
async fn dead_letters(env: &Env) -> Vec<creto_streams::deadletter::DeadLetter> {
    creto_gateways::metering::service::dead_letters_page(
        &*env.platform.log,
        &env.platform.catalog,
        0,
        10,
        None,
    )
    .await
    .unwrap()
    .0
}

fn total(rows: &[pb::UsageRow]) -> f64 {
    rows.iter().map(|r| r.value).sum()
}

fn grpc_event(id: &str, sub: &str, quantity: f64) -> pb::UsageEvent {
    let mut data = prost_types::Struct::default();
    data.fields.insert(
        "quantity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(quantity)),
        },
    );
    pb::UsageEvent {
        id: id.into(),
        source: "grpc-test".into(),
        r#type: "agent.execution".into(),
        subject: sub.into(),
        time: Some(ts(Utc::now())),
        data: Some(data),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_producers_bad_input_and_duplicates() {
    let env = Env::new().await;
    let (running, mut client) = env.start_metering(true).await;
    let nats = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nats);
    let now = Utc::now();
    let subject = env.subject("metering.events.sub_a");
    let publish = |payload: String, headers: Option<async_nats::HeaderMap>| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            let ack = match headers {
                Some(h) => js
                    .publish_with_headers(subject, h, payload.into())
                    .await
                    .unwrap(),
                None => js.publish(subject, payload.into()).await.unwrap(),
            };
            ack.await.unwrap().sequence
        }
    };

    // Good events: JSON (one without data → quantity 1), and the protobuf form.
    publish(
        cloud_event(
            "e1",
            "sub_a",
            "agent.execution",
            now,
            serde_json::json!({"quantity": 2.5, "model": "m1"}),
        ),
        None,
    )
    .await;
    publish(
        cloud_event(
            "e2",
            "sub_a",
            "agent.execution",
            now - Ch::hours(30),
            serde_json::Value::Null,
        ),
        None,
    )
    .await;
    let mut proto_headers = async_nats::HeaderMap::new();
    proto_headers.insert("Content-Type", "application/protobuf");
    publish(
        grpc_event("e3", "sub_a", 4.0)
            .encode_to_vec()
            .into_iter()
            .map(char::from)
            .collect::<String>(),
        None,
    )
    .await; // wrong content type: malformed JSON
    let proto_bytes = grpc_event("e4", "sub_a", 4.0).encode_to_vec();
    let ack = js
        .publish_with_headers(subject.clone(), proto_headers, proto_bytes.into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.sequence > 0);

    // Bad input, each with its reason.
    let bad: Vec<(String, &str)> = vec![
        ("{not json".into(), "malformed_json"),
        (cloud_event("b1", "sub_a", "agent.execution", now, serde_json::json!({"quantity": -1})), "quantity_negative"),
        (cloud_event("b2", "sub_a", "agent.execution", now, serde_json::json!({"quantity": "7"})), "wrong_type"),
        (cloud_event("b3", "sub_other", "agent.execution", now, serde_json::json!({})), "subject_mismatch"),
        (cloud_event("b4", "sub_a", "agent.execution", now + Ch::minutes(10), serde_json::json!({})), "time_in_future"),
        (cloud_event("b5", "sub_a", "agent.execution", now - Ch::days(9), serde_json::json!({})), "time_too_old"),
        (cloud_event("b6", "sub_a", "agent.execution", now, serde_json::json!({"pad": "x".repeat(70_000)})), "oversized"),
        (r#"{"specversion":"1.0","source":"s","type":"agent.execution","subject":"sub_a","time":"2026-01-01T00:00:00Z"}"#.into(), "missing_field"),
        // PostgreSQL cannot store U+0000: accepted, it would stop the projector for good.
        (cloud_event("b7", "sub_a", "agent.execution", now, serde_json::json!({"model": "m\u{0}1"})), "invalid_field"),
        (cloud_event("b8", "sub_a", "agent.execution", now, serde_json::json!({"tags": [{"k\u{0}": 1}]})), "invalid_field"),
        (cloud_event("b9", "sub_a", "agent.execution", now, serde_json::json!({"quantity": 1e16})), "quantity_too_large"),
    ];
    for (payload, _) in &bad {
        publish(payload.clone(), None).await;
    }
    // Duplicates: same id again, without Nats-Msg-Id, and once more after it was applied.
    let first_dup = publish(
        cloud_event(
            "e1",
            "sub_a",
            "agent.execution",
            now,
            serde_json::json!({"quantity": 100}),
        ),
        None,
    )
    .await;
    env.wait_applied(first_dup).await;
    let last = publish(
        cloud_event(
            "e1",
            "sub_a",
            "agent.execution",
            now,
            serde_json::json!({"quantity": 100}),
        ),
        None,
    )
    .await;

    let rows = client
        .query_usage(usage_request("sub_a", "agent.execution", last))
        .await
        .unwrap()
        .into_inner();
    assert!(rows.applied_sequence >= last);
    assert_eq!(total(&rows.rows), 2.5 + 1.0 + 4.0, "{:?}", rows.rows);

    // Every invalid event is parked with its reason (plus the mislabelled protobuf).
    let letters: Vec<creto_streams::deadletter::DeadLetter> = env
        .platform
        .log
        .replay(
            &env.platform.catalog.stream(DEADLETTERS),
            ReplayFrom::Start,
            None,
            None,
        )
        .await
        .unwrap()
        .map_ok(|e| creto_streams::deadletter::DeadLetter::parse(e).unwrap())
        .try_collect()
        .await
        .unwrap();
    let mut reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    reasons.sort();
    let mut expected: Vec<&str> = bad
        .iter()
        .map(|(_, r)| *r)
        .chain(["malformed_json"])
        .collect();
    expected.sort();
    assert_eq!(reasons, expected);
    assert!(letters.iter().all(
        |l| l.original_stream == env.platform.catalog.stream(METERING) && l.original_sequence > 0
    ));

    // The operator sees them through gRPC too, and can re-drive them.
    let listed = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            limit: 100,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.dead_letters.len(), expected.len());

    // Metrics: invalid by reason, accepted by subscription.
    let metrics = reqwest_metrics(running.metrics_addr).await;
    assert!(
        metrics.contains("metering_events_invalid_total{reason=\"time_too_old\"}"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "metering_events_total{event_type=\"agent.execution\",subscription_id=\"sub_a\"} 3"
    ));

    // Redis holds the month-to-date counter under the runbook's key shape.
    let counters = creto_projections::metering::counters::Counters::new(
        env.platform.cache.clone(),
        &env.settings.redis_prefix(),
    );
    let this_month = Utc::now().format("%Y-%m").to_string();
    let in_month = [(2.5, now), (1.0, now - Ch::hours(30)), (4.0, now)]
        .iter()
        .filter(|(_, t)| t.format("%Y-%m").to_string() == this_month)
        .map(|(q, _)| q)
        .sum::<f64>();
    // Written by a background writer after the commit: poll briefly.
    let mut counter = None;
    for _ in 0..100 {
        counter = counters
            .get("default", "sub_a", "agent.execution")
            .await
            .unwrap();
        if counter
            .as_ref()
            .is_some_and(|c| c.1.parse::<f64>().unwrap() == in_month)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (month, quantity, count) = counter.expect("counter");
    assert_eq!(month, this_month);
    assert_eq!(quantity.parse::<f64>().unwrap(), in_month);
    assert!(count >= 2);

    running.stop().await;
    env.drop().await;
}

async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Requests that do not decode (bytes of another message, data nested past prost's limit of
/// 100) are answered `InvalidArgument` with a short message, and counted so: `Internal` would
/// count towards the `HighErrorRate` page.
async fn undecodable_requests_are_the_callers_error(
    client: &mut pb::metering_service_client::MeteringServiceClient<tonic::transport::Channel>,
    running: &creto_gateways::server::Running,
) {
    let mut data = prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(1.0)),
    };
    for _ in 0..150 {
        data = prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                fields: [("n".to_string(), data)].into_iter().collect(),
            })),
        };
    }
    let mut deep = grpc_event("deep", "sub_g", 1.0);
    deep.data.as_mut().unwrap().fields.insert("n".into(), data);
    let err = client
        .ingest_events(pb::IngestEventsRequest { events: vec![deep] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("recursion limit"), "{err:?}");
    assert!(err.message().len() < 400, "{err:?}");

    // Field 1 as a varint where IngestEventsRequest has its repeated events.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", running.grpc_addr.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let err = raw
        .unary(
            tonic::Request::new(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/creto.enablement.metering.v1.MeteringService/IngestEvents",
            ),
            tonic_prost::ProstCodec::<prost_types::Duration, pb::IngestEventsResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .starts_with("the request is not a valid IngestEventsRequest: "),
        "{err:?}"
    );

    let exposition = reqwest_metrics(running.metrics_addr).await;
    let handled = |code: &str| {
        exposition.lines().any(|l| {
            l.starts_with("grpc_server_handled_total{")
                && l.contains(&format!("grpc_code=\"{code}\""))
                && l.contains("grpc_method=\"IngestEvents\"")
        })
    };
    assert!(handled("InvalidArgument"), "{exposition}");
    assert!(!handled("Internal"), "{exposition}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ingest_answers_per_event_and_reads_its_writes() {
    let env = Env::new().await;
    let (running, mut client) = env.start_metering(true).await;

    // Within a minute of the window's ends: the projector checks again by the log's clock,
    // and could refuse what was answered ACCEPTED here; refused here instead.
    let at = |id: &str, time: chrono::DateTime<Utc>| {
        let mut e = grpc_event(id, "sub_g", 1.0);
        e.time = Some(ts(time));
        e
    };
    let batch = vec![
        grpc_event("g1", "sub_g", 10.0),
        grpc_event("g1", "sub_g", 10.0),
        grpc_event("g2", "sub_g", -1.0),
        grpc_event("g3", "sub_g", f64::NAN),
        at("g4", Utc::now() - Ch::days(7) + Ch::seconds(30)),
        at("g5", Utc::now() + Ch::minutes(5) - Ch::seconds(30)),
    ];
    let r = client
        .ingest_events(pb::IngestEventsRequest { events: batch })
        .await
        .unwrap()
        .into_inner();
    let statuses: Vec<i32> = r.results.iter().map(|x| x.status).collect();
    use pb::IngestStatus::*;
    assert_eq!(
        statuses,
        vec![
            Accepted as i32,
            Duplicate as i32,
            Rejected as i32,
            Rejected as i32,
            Rejected as i32,
            Rejected as i32
        ]
    );
    assert!(r.results[2].reason.starts_with("quantity_negative"));
    assert!(r.results[3].reason.starts_with("quantity_not_finite"));
    assert!(
        r.results[4].reason.starts_with("time_too_old"),
        "{}",
        r.results[4].reason
    );
    assert!(
        r.results[4].reason.contains("within 60 s"),
        "{}",
        r.results[4].reason
    );
    assert!(
        r.results[5].reason.starts_with("time_in_future"),
        "{}",
        r.results[5].reason
    );
    assert_eq!(r.results[1].sequence, r.results[0].sequence);

    // Read your writes: the query waits for the returned sequence.
    let rows = client
        .query_usage(usage_request("sub_g", "agent.execution", r.sequence))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(total(&rows.rows), 10.0);

    // Long after JetStream's duplicate window the read model still knows the id.
    let again = client
        .ingest_events(pb::IngestEventsRequest {
            events: vec![grpc_event("g1", "sub_g", 10.0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.results[0].status, Duplicate as i32);
    // Known from the read model, not from JetStream's duplicate window (which would answer
    // the same status within its 10 minutes).
    assert_eq!(
        again.results[0].reason, "this id was already accepted for this subscription",
        "{again:?}"
    );

    // Limits and malformed requests.
    let too_many = (0..1001)
        .map(|i| grpc_event(&format!("x{i}"), "sub_g", 1.0))
        .collect();
    let err = client
        .ingest_events(pb::IngestEventsRequest { events: too_many })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 1000"));
    let err = client
        .ingest_events(pb::IngestEventsRequest { events: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    undecodable_requests_are_the_callers_error(&mut client, &running).await;
    let mut q = usage_request("sub_g", "agent.execution", 0);
    q.time_zone = "Mars/Olympus".into();
    assert_eq!(
        client.query_usage(q).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut q = usage_request("sub_g", "agent.execution", 0);
    q.window = pb::Window::Minute as i32;
    q.from = Some(ts(Utc::now() - Ch::days(365)));
    let err = client.query_usage(q).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut q = usage_request("sub_g", "agent.execution", 0);
    q.meter = "nope".into();
    assert_eq!(
        client.query_usage(q).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut q = usage_request("sub_g", "agent.execution", 10_000_000);
    q.wait_ms = 200;
    assert_eq!(
        client.query_usage(q.clone()).await.unwrap_err().code(),
        Code::DeadlineExceeded
    );
    // A request wrong in itself is told so at once, not after waiting for the projection.
    q.window = 42;
    q.wait_ms = 30_000;
    let asked = std::time::Instant::now();
    let err = client.query_usage(q).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );

    // Meters: defined once, with group-by.
    let meter = pb::Meter {
        slug: "exec_by_model".into(),
        event_type: "agent.execution".into(),
        aggregation: pb::Aggregation::Count as i32,
        group_by: vec!["model".into()],
        ..Default::default()
    };
    let created = client
        .create_meter(pb::CreateMeterRequest {
            meter: Some(meter.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let err = client
        .create_meter(pb::CreateMeterRequest { meter: Some(meter) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    env.wait_applied(created.sequence).await;
    let meters = client
        .list_meters(pb::ListMetersRequest {})
        .await
        .unwrap()
        .into_inner()
        .meters;
    assert_eq!(meters.len(), 1);
    let mut q = usage_request("", "", 0);
    q.meter = "exec_by_model".into();
    q.group_by = vec!["not_a_dimension".into()];
    assert_eq!(
        client.query_usage(q.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A dimension named again and again, or filters without end: refused before any work.
    q.group_by = vec!["model".into(); 100_000];
    let e = client.query_usage(q.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("each once"), "{e:?}");
    q.group_by = vec![];
    q.filters = (0..17).map(|i| (format!("d{i}"), "x".into())).collect();
    let e = client.query_usage(q).await.unwrap_err();
    assert!(e.message().contains("at most 16 filters"), "{e:?}");

    running.stop().await;
    env.drop().await;
}

fn refused<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, field: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(&format!("`{field}` contains U+0000")),
        "{field}: {e:?}"
    );
}

/// PostgreSQL's text and jsonb cannot hold U+0000: every command that would carry one into a
/// read model is refused with the field named (accepted, it would stop the projector for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_postgresql_cannot_store_is_refused() {
    let env = Env::new().await;
    let (running, mut c) = env.start_metering(true).await;
    let text = |s: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.into())),
    };
    refused(
        c.void_event(pb::VoidEventRequest {
            subscription_id: "sub_t".into(),
            event_id: "e1".into(),
            reason: "typo\0".into(),
        })
        .await,
        "reason",
    );
    refused(
        c.amend_event(pb::AmendEventRequest {
            subscription_id: "sub_t".into(),
            event_id: "e1".into(),
            quantity: None,
            data: Some(prost_types::Struct {
                fields: [("model".to_string(), text("m\0"))].into_iter().collect(),
            }),
            reason: "fix".into(),
        })
        .await,
        "data.model",
    );
    refused(
        c.create_meter(pb::CreateMeterRequest {
            meter: Some(pb::Meter {
                slug: "m".into(),
                event_type: "agent.execution".into(),
                aggregation: pb::Aggregation::Count as i32,
                description: "calls\0".into(),
                ..Default::default()
            }),
        })
        .await,
        "description",
    );
    refused(
        c.put_plan(pb::PutPlanRequest {
            plan: Some(pb::Plan {
                plan_id: "p".into(),
                version: 1,
                currency: "USD".into(),
                charges: vec![pb::Charge {
                    id: "base\0".into(),
                    model: Some(pb::charge::Model::Flat(pb::FlatModel {
                        amount: "10".into(),
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await,
        "charges[0].id",
    );
    // Lookups too: PostgreSQL refuses the parameter, and no retry would mend it.
    let mut q = usage_request("sub_t", "agent.execution", 0);
    q.filters.insert("model".into(), "m\0".into());
    refused(c.query_usage(q).await, "filters.model");
    let e = c
        .get_invoice(pb::GetInvoiceRequest {
            number: "INV-default-\0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("U+0000"), "{e:?}");
    refused(
        c.set_entitlement(pb::SetEntitlementRequest {
            subscription_id: "sub_t".into(),
            feature: "limits".into(),
            value: Some(pb::set_entitlement_request::Value::Config(text("x\0"))),
        })
        .await,
        "config",
    );
    running.stop().await;
    env.drop().await;
}

/// Results are 64-bit floats: a quantity is at most 10^15 per event (two of 1e308 made the
/// subscription's usage unqueryable: UNAVAILABLE "overflow; retry" for good), a SUM meter adds
/// only values a quantity could take, and a meter whose result overflows answers OUT_OF_RANGE,
/// not a retryable error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_past_a_float_range_are_refused_or_out_of_range() {
    let env = Env::new().await;
    let (running, mut c) = env.start_metering(true).await;
    let mut huge = grpc_event("big", "sub_f", 1e308);
    let r = c
        .ingest_events(pb::IngestEventsRequest {
            events: vec![huge.clone(), grpc_event("ok", "sub_f", 1e15)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.results[0].reason.starts_with("quantity_too_large"),
        "{r:?}"
    );
    assert_eq!(r.results[1].status, pb::IngestStatus::Accepted as i32);
    let e = c
        .amend_event(pb::AmendEventRequest {
            subscription_id: "sub_f".into(),
            event_id: "ok".into(),
            quantity: Some(1e16),
            data: None,
            reason: "fix".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    for (slug, aggregation) in [
        ("bytes", pb::Aggregation::Sum),
        ("bytes_avg", pb::Aggregation::Avg),
    ] {
        let meter = c
            .create_meter(pb::CreateMeterRequest {
                meter: Some(pb::Meter {
                    slug: slug.into(),
                    event_type: "agent.execution".into(),
                    aggregation: aggregation as i32,
                    value_property: "$.bytes".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        env.wait_applied(meter.sequence).await;
    }
    let bytes = prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(1e308)),
    };
    let mut events = Vec::new();
    for id in ["b1", "b2"] {
        huge.id = id.into();
        huge.data = Some(prost_types::Struct {
            fields: [("bytes".to_string(), bytes.clone())].into_iter().collect(),
        });
        events.push(huge.clone());
    }
    let r = c
        .ingest_events(pb::IngestEventsRequest { events })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 2, "{r:?}");
    let mut q = usage_request("", "", r.sequence);
    q.meter = "bytes".into();
    let rows = c.query_usage(q.clone()).await.unwrap().into_inner().rows;
    assert!(rows.is_empty(), "{rows:?}");
    q.meter = "bytes_avg".into();
    let e = c.query_usage(q).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("meter \"bytes_avg\""), "{e:?}");
    // The quantities of the same events still sum.
    let rows = c
        .query_usage(usage_request("sub_f", "agent.execution", r.sequence))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(total(&rows.rows), 1e15 + 2.0);
    running.stop().await;
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_section_9_3_sql_runs_against_the_schema() {
    let env = Env::new().await;
    let pool = env.pool();
    sqlx::query(
        "INSERT INTO usage_hourly (tenant, subscription_id, event_type, hour, event_count, quantity_sum)
         SELECT 'default', 'sub_' || (i % 50), 'agent.execution', date_trunc('hour', now()) - (i || ' hours')::interval, i, i
         FROM generate_series(1, 500) AS i",
    )
    .execute(pool)
    .await
    .unwrap();
    // The runbook's statements, verbatim. Our schema already ships the indexes and the
    // materialized view they create, so those two may only fail with "already exists".
    let statements = [
        // The runbook writes `tablename`; pg_stat_user_tables calls it `relname` (fixed in ops/runbook.md).
        "SELECT schemaname, relname AS tablename, seq_scan, seq_tup_read, idx_scan, seq_tup_read / NULLIF(seq_scan, 0) AS avg_seq_tup FROM pg_stat_user_tables WHERE seq_scan > 0 ORDER BY seq_tup_read DESC LIMIT 10",
        "CREATE INDEX CONCURRENTLY idx_usage_hourly_subscription_hour ON usage_hourly (subscription_id, hour DESC)",
        "EXPLAIN ANALYZE SELECT * FROM usage_hourly WHERE subscription_id = 'sub_123' AND hour >= '2024-12-01'",
        "SELECT * FROM usage_hourly WHERE hour >= now() - interval '7 days' AND event_type = 'agent.execution'",
        "CREATE INDEX idx_usage_hourly_event_hour ON usage_hourly (event_type, hour DESC)",
        "CREATE MATERIALIZED VIEW usage_daily AS SELECT subscription_id, event_type, date_trunc('day', hour) AS day, SUM(event_count) AS total_count FROM usage_hourly GROUP BY subscription_id, event_type, day",
        "REFRESH MATERIALIZED VIEW CONCURRENTLY usage_daily",
        "VACUUM ANALYZE usage_hourly",
        "REINDEX INDEX CONCURRENTLY usage_hourly_subscription_idx",
        "SELECT count(*) FROM usage_hourly",
    ];
    for sql in statements {
        match sqlx::raw_sql(sql).execute(pool).await {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P07") => {}
            Err(e) => panic!("runbook SQL failed: {sql}: {e}"),
        }
    }
    let daily: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_daily")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(daily > 0);
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN SELECT * FROM usage_hourly WHERE subscription_id = 'sub_7' AND hour >= now() - interval '3 days'")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(
        plan.join("\n")
            .contains("idx_usage_hourly_subscription_hour")
            || plan.join("\n").contains("Index"),
        "{plan:?}"
    );
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_redriven_after_a_fix() {
    let env = Env::new().await;
    let (running, mut client) = env.start_metering(true).await;
    let nats = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nats);
    // Rejected because the subject names another subscription; an operator fixes nothing in the
    // event itself here, so re-driving parks it again with the same reason: nothing is lost.
    let bad = cloud_event(
        "r1",
        "sub_x",
        "agent.execution",
        Utc::now(),
        serde_json::json!({}),
    );
    let seq = js
        .publish(env.subject("metering.events.sub_r"), bad.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    env.wait_applied(seq).await;
    let letters = dead_letters(&env).await;
    assert_eq!(letters.len(), 1);
    let a = env.platform.log.append(letters[0].redrive()).await.unwrap();
    env.wait_applied(a.sequence()).await;
    let again = dead_letters(&env).await;
    assert_eq!(again.len(), 2);
    assert_eq!(again[1].original_sequence, a.sequence());
    let rows = client
        .query_usage(usage_request("sub_r", "agent.execution", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(rows.rows.is_empty());
    running.stop().await;
    env.drop().await;
}

/// An event near the log's 1 MiB limit is oversized for metering; its letter, with the
/// dead-letter headers added, would be past the limit and refused, and the projector retried
/// it for ever (every later event waited). It is parked without its payload, which a re-drive
/// reads back from the original stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_near_the_logs_limit_is_parked_and_the_projection_goes_on() {
    let env = Env::new().await;
    let (running, mut client) = env.start_metering(true).await;
    let nats = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nats);
    let subject = env.subject("metering.events.sub_big");
    let now = Utc::now();
    let huge = cloud_event(
        "big",
        "sub_big",
        "agent.execution",
        now,
        serde_json::json!({"pad": "x".repeat(1_048_240)}),
    );
    // With the letter's headers (reason, origin, ...) past the 1 MiB the log takes.
    let size = huge.len();
    assert!(size > 1024 * 1024 - 400 && size < 1024 * 1024, "{size}");
    js.publish(subject.clone(), huge.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let next = js
        .publish(
            subject,
            cloud_event(
                "small",
                "sub_big",
                "agent.execution",
                now,
                serde_json::json!({}),
            )
            .into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    env.wait_applied(next).await;
    let rows = client
        .query_usage(usage_request("sub_big", "agent.execution", next))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(total(&rows.rows), 1.0);
    let letters = dead_letters(&env).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "oversized");
    assert_eq!(letters[0].omitted, Some(size));
    assert!(letters[0].event.payload.is_empty());
    let again = letters[0]
        .redrive_from(&*env.platform.log)
        .await
        .unwrap()
        .expect("the original is still in its stream");
    assert_eq!(again.payload, huge.as_bytes());
    running.stop().await;
    env.drop().await;
}

/// The runbook's re-drive, for an event `IngestEvents` refused: its letter (no stream of
/// origin: it never reached the log) goes to metering's subject like a NATS producer's. It was
/// taken for an oversight or runtime letter and refused, with advice to rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_of_the_grpc_ingest_is_redriven_by_the_cli() {
    let env = Env::new().await;
    let (running, mut client) = env.start_metering(true).await;
    // Two different events under one id, refused for the same reason: both are parked (the
    // second's letter was taken for a duplicate of the first's).
    let early = |quantity: f64| {
        let mut e = grpc_event("g1", "sub_g", quantity);
        e.time = Some(ts(Utc::now() + Ch::minutes(20)));
        e
    };
    let answer = client
        .ingest_events(pb::IngestEventsRequest {
            events: vec![early(2.0), early(3.0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.rejected, 2, "{answer:?}");
    assert_eq!(dead_letters(&env).await.len(), 2);
    let nats_url = creto_replay_tests::nats_url();
    let cli = <creto_gateways::cli::Cli as clap::Parser>::parse_from([
        "enablement",
        "--nats-url",
        &nats_url,
        "--namespace",
        &env.name,
        "deadletters",
        "redrive",
        "--stream",
        "metering",
        "--reason",
        "time_in_future",
    ]);
    creto_gateways::cli::run(cli).await.unwrap();
    // Still twenty minutes ahead: parked again, from the metering stream this time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let letters = loop {
        let letters = dead_letters(&env).await;
        if letters.len() == 4 || std::time::Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 4, "{letters:?}");
    for again in &letters[2..] {
        assert_eq!(again.reason, "time_in_future");
        assert_eq!(again.original_stream, env.platform.catalog.stream(METERING));
    }
    running.stop().await;
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_database_refuses_is_set_aside_then_redriven_after_the_fix() {
    let env = Env::new().await;
    // A rule of this database that the producer's events do not know: one producer's rows are
    // refused (SQLSTATE 23514), as a value PostgreSQL cannot hold would be. Before, the
    // projector retried that batch for ever and no later event of any subscription counted.
    sqlx::query(
        "ALTER TABLE metering_events
           ADD CONSTRAINT refuses_one_source CHECK (source <> 'refused-producer')",
    )
    .execute(env.pool())
    .await
    .unwrap();
    let (running, mut client) = env.start_metering(true).await;
    let js = async_nats::jetstream::new(
        async_nats::connect(creto_replay_tests::nats_url())
            .await
            .unwrap(),
    );
    let now = Utc::now();
    let mut sequences = Vec::new();
    for i in 0..6 {
        let mut event: serde_json::Value = serde_json::from_str(&cloud_event(
            &format!("s{i}"),
            "sub_s",
            "agent.execution",
            now,
            serde_json::json!({"quantity": 1}),
        ))
        .unwrap();
        if i == 2 {
            event["source"] = "refused-producer".into();
        }
        let ack = js
            .publish(
                env.subject("metering.events.sub_s"),
                event.to_string().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        sequences.push(ack.sequence);
    }
    let usage = |min_sequence| usage_request("sub_s", "agent.execution", min_sequence);
    let rows = client
        .query_usage(usage(sequences[5]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(total(&rows.rows), 5.0, "every event but the refused one");

    let letters = dead_letters(&env).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.reason, "projection_failed");
    assert_eq!(letter.original_sequence, sequences[2]);
    assert!(
        letter.detail.contains("23514") && letter.detail.contains("refuses_one_source"),
        "{}",
        letter.detail
    );
    let stream = env.platform.catalog.stream(METERING);
    assert!(
        creto_projections::metrics::DEADLETTERS
            .with_label_values(&[stream.as_str(), "projection_failed"])
            .get()
            >= 1
    );

    // The operator fixes the cause and re-drives: the event counts, once.
    sqlx::query("ALTER TABLE metering_events DROP CONSTRAINT refuses_one_source")
        .execute(env.pool())
        .await
        .unwrap();
    let redriven = env.platform.log.append(letter.redrive()).await.unwrap();
    let rows = client
        .query_usage(usage(redriven.sequence()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(total(&rows.rows), 6.0);
    running.stop().await;
    env.drop().await;
}

/// The producer permissions shipped in `ops/nats/accounts.conf`, on a real nats-server: a
/// producer publishes its own subscription's events on `metering.events.<subscription_id>` (the
/// subject the platform reads) and is refused another subscription's. The example nkeys have
/// no known seed, so the test gives the same users passwords instead.
#[tokio::test]
async fn the_shipped_nats_permissions_let_a_producer_publish_its_own_events_only() {
    use async_nats::jetstream;
    use std::time::Duration;

    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/nats/accounts.conf"
    ))
    .unwrap();
    // The binary's user keeps an nkey (a fresh one: the shipped keys have no known seed); the
    // producer's becomes a password user, as a producer's client may log in either way.
    let binary = nkeys::KeyPair::new_user();
    let mut accounts = shipped.clone();
    for (nkey, login) in [
        (
            "UCRGZDTSZJB5QSCDL2QYG3XO4O6YSGSFL7U22RHJIP52ZOFNYWPXQB4Q",
            format!("nkey: {}", binary.public_key()),
        ),
        (
            "UAUH5T3UOOCRUZWIXU7FUTA7JGG3UJNX5PZCLW6UJYQ6LQBBKSD7OS4X",
            "user: sub_acme, password: pw-sub_acme".to_string(),
        ),
    ] {
        assert!(
            accounts.contains(nkey),
            "accounts.conf no longer holds {nkey}: update this test"
        );
        accounts = accounts.replace(&format!("nkey: {nkey}"), &login);
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(dir.path().join("accounts.conf"), accounts).unwrap();
    std::fs::write(
        dir.path().join("server.conf"),
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\ninclude ./accounts.conf\n",
            dir.path().join("js")
        ),
    )
    .unwrap();
    let mut server = tokio::process::Command::new("nats-server")
        .arg("-c")
        .arg(dir.path().join("server.conf"))
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server on the PATH (.ci/services.sh installs it)");
    let url = format!("nats://127.0.0.1:{port}");
    let seed_file = dir.path().join("enablement.nk");
    std::fs::write(&seed_file, binary.seed().unwrap()).unwrap();
    // As the binary logs in (NATS_NKEY_SEED_FILE), with a list of servers whose first is down.
    let mut log = None;
    for _ in 0..100 {
        match creto_streams::jetstream::JetStreamLog::connect(
            &format!("nats://127.0.0.1:1, {url}"),
            &creto_streams::jetstream::NatsCredentials::NkeySeedFile(seed_file.clone()),
            creto_streams::Catalog::default(),
        )
        .await
        {
            Ok(l) => {
                log = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let log = log.expect("the binary's nkey login to the test nats-server");
    let ensured = creto_streams::EventLog::ensure_streams(
        &log,
        &[creto_streams::Catalog::default()
            .spec(creto_streams::METERING)
            .unwrap()],
    )
    .await
    .unwrap();
    assert_eq!(ensured.len(), 1);
    let producer_login = |user: &'static str| {
        let url = url.clone();
        async move {
            for _ in 0..100 {
                let options = async_nats::ConnectOptions::with_user_and_password(
                    user.into(),
                    format!("pw-{user}"),
                )
                .custom_inbox_prefix(format!("_INBOX_{user}"));
                if let Ok(c) = options.connect(&url).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("cannot connect to the test nats-server as {user}");
        }
    };
    let mut stream = jetstream::new(
        async_nats::ConnectOptions::with_nkey(binary.seed().unwrap())
            .connect(&url)
            .await
            .unwrap(),
    )
    .get_stream("METERING")
    .await
    .unwrap();
    let mut producer = jetstream::new(producer_login("sub_acme").await);
    producer.set_timeout(Duration::from_secs(2));
    let own = producer
        .publish("metering.events.sub_acme", "{}".into())
        .await
        .unwrap()
        .await;
    assert!(own.is_ok(), "its own subscription's subject: {own:?}");
    let other = async {
        producer
            .publish("metering.events.sub_globex", "{}".into())
            .await?
            .await
    }
    .await;
    assert!(other.is_err(), "another subscription's subject: {other:?}");
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    server.kill().await.unwrap();
}

/// A producer chooses its `Nats-Msg-Id`, and JetStream deduplicates ids across the whole
/// stream: published first from a producer's own subject, the id of a platform write made
/// that write a "duplicate", dropped. The platform's ids are keyed now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_preempt_the_platforms_writes() {
    let env = Env::new().await;
    let (running, mut client) = env.start_metering(true).await;
    let js = async_nats::jetstream::new(
        async_nats::connect(creto_replay_tests::nats_url())
            .await
            .unwrap(),
    );
    // The id a gRPC ingest of sub_victim's event v1 appends under, in the clear.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "default:sub_victim:v1");
    js.publish_with_headers(
        env.subject("metering.events.sub_evil"),
        headers,
        "{}".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let r = client
        .ingest_events(pb::IngestEventsRequest {
            events: vec![grpc_event("v1", "sub_victim", 3.0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.duplicates), (1, 0), "{r:?}");
    let rows = client
        .query_usage(usage_request("sub_victim", "agent.execution", r.sequence))
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows.iter().map(|r| r.value).sum::<f64>(), 3.0);
    running.stop().await;
    env.drop().await;
}
