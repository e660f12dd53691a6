//! `ops/metrics-contract.txt` against what the running products serve on `/metrics`.
//!
//! The contract lists every name alerts and dashboards use. Names are partitioned by product
//! prefix (`metering_`, `oversight_`, `runtime_`, `messaging_`; anything else is the shared
//! platform: gRPC server, PostgreSQL pool, Redis, streams, projector). Names of the platform
//! and of built products must be served after one call of each kind; names of products not
//! built yet are listed as skipped.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use creto_gateways::messaging::client::AgentClient;
use creto_replay_tests::Env;
use creto_schemas::metering::v1 as pb;
use creto_schemas::oversight::v1 as ov;
use creto_schemas::oversight::v1::oversight_service_client::OversightServiceClient;
use creto_schemas::runtime::v1 as rt;
use creto_schemas::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Products with a metric prefix of their own, and whether this build has them.
const PRODUCTS: &[(&str, bool)] = &[
    ("metering", true),
    ("oversight", true),
    ("runtime", true),
    ("messaging", true),
];
const PLATFORM: &str = "platform";

/// Names of features of a built product that are not built yet, and which issue builds them.
/// They are reported as skipped; the platform does not export fake series for them.
const NOT_BUILT: &[(&str, &str)] = &[];

fn contract() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/metrics-contract.txt");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn product_of(name: &str) -> &'static str {
    PRODUCTS
        .iter()
        .find(|(p, _)| {
            name.strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('_'))
        })
        .map(|(p, _)| *p)
        .unwrap_or(PLATFORM)
}

/// `GET /metrics` over plain HTTP/1.1.
async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
    body
}

/// `GET path` over plain HTTP/1.1: the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or_default().to_string();
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&tail[..size]);
        rest = &tail[size + 2..];
    }
    (status, out)
}

/// Names of the samples served (histograms also under their base name).
fn served(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        if name.is_empty() {
            continue;
        }
        names.insert(name.to_string());
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                names.insert(base.to_string());
            }
        }
    }
    names
}

fn usage_event(id: &str, subscription: &str, event_type: &str) -> pb::UsageEvent {
    pb::UsageEvent {
        id: id.into(),
        source: "metrics-test".into(),
        r#type: event_type.into(),
        subject: subscription.into(),
        time: Some(creto_streams::envelope::timestamp(Utc::now())),
        data: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_contract_name_of_a_built_product_is_served() {
    let names = contract();
    assert!(!names.is_empty(), "empty metrics contract");
    let mut by_product: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for n in &names {
        by_product.entry(product_of(n)).or_default().push(n);
    }

    let env = Env::new().await;
    let (running, mut client) = env.start_metering(true).await;

    // One call of each kind, so that labelled series exist.
    let ingested = client
        .ingest_events(pb::IngestEventsRequest {
            events: vec![
                usage_event("m1", "sub_metrics", "agent.execution"),
                // No subject: rejected, counted and parked in the dead letters.
                usage_event("m2", "", "agent.execution"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ingested.accepted, ingested.rejected),
        (1, 1),
        "{ingested:?}"
    );
    let meter = client
        .create_meter(pb::CreateMeterRequest {
            meter: Some(pb::Meter {
                slug: "metrics_exec".into(),
                event_type: "agent.execution".into(),
                aggregation: pb::Aggregation::Count as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    env.wait_applied(ingested.sequence.max(meter.sequence))
        .await;
    client.list_meters(pb::ListMetersRequest {}).await.unwrap();
    let now = Utc::now();
    client
        .query_usage(pb::QueryUsageRequest {
            meter: "metrics_exec".into(),
            from: Some(creto_streams::envelope::timestamp(
                now - chrono::Duration::days(1),
            )),
            to: Some(creto_streams::envelope::timestamp(
                now + chrono::Duration::hours(1),
            )),
            window: pb::Window::Day as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap();
    // Invoices: a plan, attached this hour, and the draft of the hour.
    let hour =
        DateTime::from_timestamp(now.timestamp() - now.timestamp().rem_euclid(3600), 0).unwrap();
    client
        .put_plan(pb::PutPlanRequest {
            plan: Some(pb::Plan {
                plan_id: "metrics".into(),
                version: 1,
                currency: "USD".into(),
                charges: vec![pb::Charge {
                    id: "base".into(),
                    model: Some(pb::charge::Model::Flat(pb::FlatModel {
                        amount: "1".into(),
                    })),
                    ..Default::default()
                }],
                billing_interval: pb::BillingInterval::BillingHourly as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    client
        .attach_plan(pb::AttachPlanRequest {
            subscription_id: "sub_metrics".into(),
            plan_id: "metrics".into(),
            version: 1,
            effective_from: Some(creto_streams::envelope::timestamp(hour)),
        })
        .await
        .unwrap();
    let draft = client
        .generate_invoice(pb::GenerateInvoiceRequest {
            subscription_id: "sub_metrics".into(),
            period_start: Some(creto_streams::envelope::timestamp(hour)),
            period_end: Some(creto_streams::envelope::timestamp(
                hour + chrono::Duration::hours(1),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(draft.invoice.unwrap().total, "1.00");
    // Quotas: a hard limit of 1 (usage before the quota existed does not count against it),
    // one check allowed and one denied.
    client
        .set_quota(pb::SetQuotaRequest {
            subscription_id: "sub_metrics".into(),
            event_type: "agent.execution".into(),
            limit: "1".into(),
            period: Some(pb::QuotaPeriod {
                kind: pb::QuotaPeriodKind::PeriodDay as i32,
                ..Default::default()
            }),
            hard: true,
            thresholds_pct: vec![],
        })
        .await
        .unwrap();
    for (quantity, allowed) in [(1.0, true), (2.0, false)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        let checked = loop {
            match client
                .check_quota(pb::CheckQuotaRequest {
                    subscription_id: "sub_metrics".into(),
                    event_type: "agent.execution".into(),
                    quantity: Some(quantity),
                    min_sequence: ingested.sequence,
                })
                .await
            {
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                r => break r.unwrap().into_inner(),
            }
        };
        assert_eq!(checked.allowed, allowed, "{checked:?}");
    }

    // Messaging: a sealed message sent, received, opened and acknowledged, and one refused.
    let (messaging, url) = env.start_messaging().await;
    let mut alice = AgentClient::connect(&url, "", "default", "alice")
        .await
        .unwrap();
    let mut bob = AgentClient::connect(&url, "", "default", "bob")
        .await
        .unwrap();
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    alice.send("bob", b"metrics").await.unwrap();
    let keys = alice.recipient_keys("bob").await.unwrap();
    let mut tampered = alice.seal("bob", &keys, b"x").unwrap();
    tampered.ciphertext[0] ^= 1;
    assert!(alice.send_envelope(tampered).await.is_err());
    let mut inbox = bob.receive(0).await.unwrap();
    let message = inbox.message().await.unwrap().unwrap();
    bob.open(&message).await.unwrap();
    bob.ack(message.cursor).await.unwrap();

    // Oversight: a policy, a request answered, one timed out, one notification delivered.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
        let _ = axum::serve(hook, app).await;
    });
    let notify = creto_gateways::oversight::notify::NotifyConfig {
        webhook_url: Some(format!("http://{hook_addr}/hook")),
        webhook_secret: Some("s".into()),
        ..Default::default()
    };
    let oversight = env.start_oversight_notifying(notify).await;
    let mut oc =
        OversightServiceClient::connect(format!("http://{}", oversight.grpc_addr.unwrap()))
            .await
            .unwrap();
    oc.put_policy(ov::PutPolicyRequest {
        policy: Some(ov::Policy {
            policy_id: "metrics".into(),
            action: "*".into(),
            require_approval: true,
            quorum: 1,
            levels: vec![ov::Level {
                approvers: vec![],
                timeout: Some(Duration::from_millis(300).try_into().unwrap()),
            }],
            on_timeout: ov::TimeoutAction::Deny as i32,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    for id in ["m-1", "m-2"] {
        oc.create_request(ov::CreateRequestRequest {
            request_id: id.into(),
            agent_id: "bot".into(),
            action: Some(ov::Action {
                name: "x".into(),
                parameters_json: "{}".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    oc.respond(ov::RespondRequest {
        request_id: "m-1".into(),
        decision: ov::Decision::Approve as i32,
        approver: "ann".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Runtime: a warm claim, a cold spawn, an exec whose connection is denied, an attestation.
    let runtime_dir = tempfile::Builder::new()
        .prefix("creto-runtime-metrics-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        runtime_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (runtime, runtime_url) = env.start_runtime(runtime_dir.path(), "base=1").await;
    let mut rc = RuntimeServiceClient::connect(runtime_url).await.unwrap();
    let pooled = Instant::now();
    let claimed = loop {
        let sb = rc
            .create_sandbox(rt::CreateSandboxRequest::default())
            .await
            .unwrap()
            .into_inner();
        if sb.warm || pooled.elapsed() > Duration::from_secs(20) {
            break sb;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(claimed.warm, "the warm pool never filled");
    let mut out = rc
        .exec(rt::ExecRequest {
            sandbox_id: claimed.sandbox_id.clone(),
            argv: ["bash", "-c", "exec 3<>/dev/tcp/192.0.2.1/80 || true"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while out.message().await.unwrap().is_some() {}
    rc.get_attestation(rt::GetAttestationRequest {
        sandbox_id: claimed.sandbox_id.clone(),
    })
    .await
    .unwrap();

    // The audit exporter (its own process in production; the same registry here): one export.
    let archive_dir = tempfile::tempdir().unwrap();
    let (_running_on, not_stopping) = tokio::sync::watch::channel(false);
    creto_projections::audit::AuditExporter::new(
        env.platform.log.clone(),
        std::sync::Arc::new(creto_projections::archive::LocalDirArchive::new(
            archive_dir.path().to_path_buf(),
        )),
        env.platform.catalog.stream(creto_streams::METERING),
        Default::default(),
    )
    .run(true, not_stopping)
    .await
    .unwrap();

    // Metering is ready once its quota book is warm, and says so (checked every 5 s).
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, health) = get(running.metrics_addr, "/health").await;
        if health.contains("\"quota_book\":\"up\"") {
            assert!(status.starts_with("HTTP/1.1 200"), "{status} {health}");
            break;
        }
        assert!(Instant::now() < until, "{status} {health}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Gauges (pool, stream, lag) are refreshed in the background: wait for them a little.
    let expected: Vec<&str> = by_product
        .iter()
        .filter(|(p, _)| **p == PLATFORM || PRODUCTS.iter().any(|(q, built)| q == *p && *built))
        .flat_map(|(_, n)| n.iter().copied())
        .filter(|n| !NOT_BUILT.iter().any(|(x, _)| x == n))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (exposition, missing) = loop {
        // One registry per process: both products' ports serve it; scrape both anyway.
        let exposition = scrape(running.metrics_addr).await
            + &scrape(messaging.metrics_addr).await
            + &scrape(oversight.metrics_addr).await
            + &scrape(runtime.metrics_addr).await;
        let served = served(&exposition);
        let missing: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|n| !served.contains(*n))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (exposition, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    for (product, list) in &by_product {
        let built = *product == PLATFORM || PRODUCTS.iter().any(|(p, b)| p == product && *b);
        if built {
            println!("checked  {product}: {} names", list.len());
        } else {
            println!(
                "SKIPPED  {product}: not built yet, {} contract names not checked: {}",
                list.len(),
                list.join(", ")
            );
        }
    }
    for (name, feature) in NOT_BUILT {
        println!("SKIPPED  {name}: {feature} not built yet");
    }
    drop(inbox);
    messaging.stop().await;
    oversight.stop().await;
    runtime.stop().await;
    running.stop().await;
    env.drop().await;
    assert!(
        missing.is_empty(),
        "contract names not served on /metrics: {missing:?}\n--- /metrics ---\n{exposition}"
    );
}
