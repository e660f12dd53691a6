//! Quotas (entitlements) end to end over gRPC, on both adapters: hard and soft limits at the
//! boundary, grants and their expiry, the threshold webhook (once per period across a gateway
//! restart and a replay), a fresh replica warming before it answers, tenant isolation, and
//! bad input.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use creto_gateways::auth::token::{keygen, KeyRing};
use creto_gateways::auth::{AuthArgs, Bearer};
use creto_gateways::metering::quota::book_view::{counter_key, latest_key, watermark_key};
use creto_gateways::metering::quota::webhook::{self, WebhookConfig};
use creto_gateways::oversight::notify::webhook::{
    verify_signature, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use creto_projections::metering::quotas;
use creto_replay_tests::Env;
use creto_schemas::metering::v1 as pb;
use creto_schemas::metering::v1::metering_service_client::MeteringServiceClient;
use creto_streams::{ReplayFrom, METERING};
use futures::TryStreamExt;
use tonic::transport::Channel;
use tonic::Code;

type Client = MeteringServiceClient<Channel>;

const CALLS: &str = "api.call";

creto_replay_tests::on_both_adapters!(
    hard_limit_denies_exactly_at_the_boundary,
    soft_limit_allows_and_flags,
    grants_and_expiry_change_remaining,
    threshold_webhook_fires_once_per_period_across_restart_and_replay,
    a_fresh_replica_answers_after_warming,
    tenants_are_isolated,
    bad_input_is_invalid_argument_with_what_to_fix,
    corrections_change_usage_against_the_quota,
    a_replica_warms_from_the_cache_counters,
    a_correction_after_a_warm_up_counts_against_the_quota,
    an_event_stamped_in_the_next_period_counts_in_this_one,
    periods_without_an_anchor_start_at_local_midnight,
);

fn sub(name: &str) -> String {
    format!("{name}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Hourly periods that begin half an hour from now, so that no test runs across a period's
/// end: with the default anchor they end on the hour, and a test that ran across one saw its
/// usage start again from zero. With a fraction of a second, as a client's `now` has.
fn hourly() -> Option<pb::QuotaPeriod> {
    let anchor = Utc::now().timestamp() + 1800;
    Some(pb::QuotaPeriod {
        kind: pb::QuotaPeriodKind::PeriodHour as i32,
        anchor: Some(prost_types::Timestamp {
            seconds: anchor,
            nanos: 250_000_000,
        }),
        time_zone: String::new(),
    })
}

fn set_quota(sub: &str, limit: &str, hard: bool, thresholds: &[u32]) -> pb::SetQuotaRequest {
    pb::SetQuotaRequest {
        subscription_id: sub.into(),
        event_type: CALLS.into(),
        limit: limit.into(),
        period: hourly(),
        hard,
        thresholds_pct: thresholds.to_vec(),
    }
}

fn usage(id: &str, sub: &str, quantity: f64) -> pb::UsageEvent {
    pb::UsageEvent {
        id: id.into(),
        source: "quota-test".into(),
        r#type: CALLS.into(),
        subject: sub.into(),
        time: Some(creto_streams::envelope::timestamp(Utc::now())),
        data: Some(prost_types::Struct {
            fields: [(
                "quantity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(quantity)),
                },
            )]
            .into_iter()
            .collect(),
        }),
    }
}

/// Ingests and returns the sequence to pass as `min_sequence`.
async fn ingest<T>(client: &mut MeteringServiceClient<T>, events: Vec<pb::UsageEvent>) -> u64
where
    T: tonic::client::GrpcService<tonic::body::Body> + Send,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let r = client
        .ingest_events(pb::IngestEventsRequest { events })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rejected, 0, "{r:?}");
    r.sequence
}

/// CheckQuota, retried while the replica warms (UNAVAILABLE).
async fn check(
    client: &mut Client,
    sub: &str,
    quantity: f64,
    min_sequence: u64,
) -> Result<pb::CheckQuotaResponse, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .check_quota(pb::CheckQuotaRequest {
                subscription_id: sub.into(),
                event_type: CALLS.into(),
                quantity: Some(quantity),
                min_sequence,
            })
            .await;
        match r {
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r.map(|r| r.into_inner()),
        }
    }
}

async fn hard_limit_denies_exactly_at_the_boundary(env: &Env) {
    let (running, mut client) = env.start_metering(false).await;
    let s = sub("hard");
    let set = client
        .set_quota(set_quota(&s, "10", true, &[]))
        .await
        .unwrap()
        .into_inner();
    let q = set.quota.unwrap();
    assert_eq!(
        (q.kind.as_str(), q.limit.as_str(), q.hard),
        ("metered", "10", true)
    );
    let seq = ingest(&mut client, vec![usage("e1", &s, 4.0)]).await;

    let c = check(&mut client, &s, 6.0, seq).await.unwrap();
    assert!(c.allowed && !c.soft, "{c:?}");
    assert_eq!(
        (c.used.as_str(), c.remaining.as_str(), c.limit.as_str()),
        ("4", "6", "10")
    );
    let c = check(&mut client, &s, 6.000001, seq).await.unwrap();
    assert!(
        !c.allowed && !c.soft,
        "one micro-unit past the limit is denied: {c:?}"
    );

    let seq = ingest(&mut client, vec![usage("e2", &s, 6.0)]).await;
    let c = check(&mut client, &s, 0.0, seq).await.unwrap();
    assert!(c.allowed, "exactly at the limit is within it: {c:?}");
    assert_eq!((c.used.as_str(), c.remaining.as_str()), ("10", "0"));
    let c = check(&mut client, &s, 1.0, seq).await.unwrap();
    assert!(!c.allowed && c.hard, "{c:?}");
    let (start, end) = (c.period_start.unwrap(), c.period_end.unwrap());
    assert_eq!(end.seconds - start.seconds, 3600, "an hourly period: {c:?}");
    let now = Utc::now().timestamp();
    assert!(start.seconds <= now && now < end.seconds, "{c:?}");
    // The same event id again counts once.
    let seq = ingest(&mut client, vec![usage("e2", &s, 6.0)]).await;
    let c = check(&mut client, &s, 0.0, seq).await.unwrap();
    assert_eq!(c.used, "10");
    // And under another type with a quota of its own (the read model keys events by tenant,
    // subscription and id, so the invoice counts it once): it used to count against both.
    // (An id first used under a type without a quota is not remembered: see the README.)
    client
        .set_quota(pb::SetQuotaRequest {
            event_type: "other.type".into(),
            ..set_quota(&s, "10", true, &[])
        })
        .await
        .unwrap();
    let mut seq = 0;
    for event_type in ["other.type", CALLS] {
        seq = env
            .platform
            .log
            .append(creto_streams::AppendEvent {
                subject: env.subject(&format!("metering.events.{s}")),
                id: format!("x1-{event_type}"),
                expected_subject_sequence: None,
                headers: Default::default(),
                payload: creto_replay_tests::cloud_event(
                    "x1",
                    &s,
                    event_type,
                    Utc::now(),
                    serde_json::json!({"quantity": 1}),
                )
                .into(),
            })
            .await
            .unwrap()
            .sequence();
    }
    let c = check(&mut client, &s, 0.0, seq).await.unwrap();
    assert_eq!(c.used, "10");
    running.stop().await;
}

async fn soft_limit_allows_and_flags(env: &Env) {
    let (running, mut client) = env.start_metering(false).await;
    let s = sub("soft");
    client
        .set_quota(set_quota(&s, "5", false, &[]))
        .await
        .unwrap();
    let seq = ingest(&mut client, vec![usage("e1", &s, 5.0)]).await;
    let c = check(&mut client, &s, 1.0, seq).await.unwrap();
    assert!(c.allowed && c.soft && !c.hard, "{c:?}");
    assert_eq!((c.used.as_str(), c.remaining.as_str()), ("5", "0"));
    let c = check(&mut client, &s, 0.0, seq).await.unwrap();
    assert!(c.allowed && !c.soft, "{c:?}");
    // Usage past a soft limit is still counted.
    let seq = ingest(&mut client, vec![usage("e2", &s, 3.0)]).await;
    let c = check(&mut client, &s, 0.0, seq).await.unwrap();
    assert!(c.allowed && c.soft, "{c:?}");
    assert_eq!(c.used, "8");
    running.stop().await;
}

async fn grants_and_expiry_change_remaining(env: &Env) {
    let (running, mut client) = env.start_metering(false).await;
    let s = sub("grants");
    client
        .set_quota(set_quota(&s, "10", true, &[]))
        .await
        .unwrap();
    let seq = ingest(&mut client, vec![usage("e1", &s, 4.0)]).await;
    assert_eq!(
        check(&mut client, &s, 0.0, seq).await.unwrap().remaining,
        "6"
    );

    let grant =
        |id: &str, amount: &str, expires: Option<chrono::DateTime<Utc>>| pb::AddGrantRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            grant_id: id.into(),
            amount: amount.into(),
            priority: 1,
            effective_from: None,
            expires_at: expires.map(creto_streams::envelope::timestamp),
        };
    let r = client
        .add_grant(grant("topup", "5", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.quota.unwrap().remaining, "11");
    let c = check(&mut client, &s, 11.0, r.sequence).await.unwrap();
    assert!(c.allowed, "{c:?}");
    assert_eq!((c.granted.as_str(), c.remaining.as_str()), ("5", "11"));
    assert!(!check(&mut client, &s, 11.5, 0).await.unwrap().allowed);

    // A short grant: counts while live, then not.
    let expires = Utc::now() + chrono::Duration::seconds(2);
    let r = client
        .add_grant(grant("short", "3", Some(expires)))
        .await
        .unwrap()
        .into_inner();
    let c = check(&mut client, &s, 0.0, r.sequence).await.unwrap();
    assert_eq!((c.granted.as_str(), c.remaining.as_str()), ("8", "14"));
    let e = client
        .add_grant(grant("short", "3", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let wait = (expires - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(200);
    tokio::time::sleep(wait).await;
    let c = check(&mut client, &s, 0.0, 0).await.unwrap();
    assert_eq!(
        (c.granted.as_str(), c.remaining.as_str()),
        ("5", "11"),
        "expired"
    );

    // Voiding the top-up takes it away from now on.
    let r = client
        .void_grant(pb::VoidGrantRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            grant_id: "topup".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let c = check(&mut client, &s, 0.0, r.sequence).await.unwrap();
    assert_eq!((c.granted.as_str(), c.remaining.as_str()), ("0", "6"));
    let q = client
        .get_quota(pb::GetQuotaRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .quota
        .unwrap();
    assert_eq!(q.used, "4");
    let topup = q.grants.iter().find(|g| g.grant_id == "topup").unwrap();
    assert!(topup.voided_at.is_some() && !topup.live, "{topup:?}");
    let e = client
        .void_grant(pb::VoidGrantRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            grant_id: "topup".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    running.stop().await;
}

/// What the webhook receiver got: (event id, pct, subscription) of each verified call.
type Received = Arc<Mutex<Vec<(String, u64, String)>>>;

/// An HTTP receiver on loopback that checks the HMAC and records each call; the first call
/// is answered 500 (the sender retries).
async fn receiver(secret: &'static str) -> (String, Received, tokio::task::JoinHandle<()>) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let received: Received = Default::default();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let r = r.clone();
            let failed_once = failed_once.clone();
            async move {
                let ts = headers.get(TIMESTAMP_HEADER).and_then(|v| v.to_str().ok());
                let sig = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
                let (Some(ts), Some(sig)) = (ts, sig) else {
                    return StatusCode::UNAUTHORIZED;
                };
                if !verify_signature(secret.as_bytes(), ts, &body, sig) {
                    return StatusCode::UNAUTHORIZED;
                }
                if !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                r.lock().unwrap().push((
                    v["id"].as_str().unwrap().to_string(),
                    v["pct"].as_u64().unwrap(),
                    v["subscription_id"].as_str().unwrap().to_string(),
                ));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, received, task)
}

async fn received_for(received: &Received, s: &str) -> Vec<(String, u64)> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, sub)| sub == s)
        .map(|(id, pct, _)| (id.clone(), *pct))
        .collect()
}

async fn wait_received(received: &Received, s: &str, n: usize) -> Vec<(String, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = received_for(received, s).await;
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn thresholds_in_log(env: &Env, s: &str) -> usize {
    let filter = env.subject(&format!("metering.thresholds.default.{s}.>"));
    let events: Vec<_> = env
        .platform
        .log
        .replay(
            &env.platform.catalog.stream(METERING),
            ReplayFrom::Start,
            None,
            Some(&filter),
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    events.len()
}

async fn threshold_webhook_fires_once_per_period_across_restart_and_replay(env: &Env) {
    const SECRET: &str = "quota-webhook-secret";
    let (url, received, server) = receiver(SECRET).await;
    webhook::set_for_stream(
        &env.platform.catalog.stream(METERING),
        WebhookConfig {
            url,
            secret: Some(SECRET.into()),
            attempts: 5,
            backoff: Duration::from_millis(50),
            timeout: Duration::from_secs(5),
        },
    );
    let (running, mut client) = env.start_metering(true).await;
    let s = sub("thresholds");
    client
        .set_quota(set_quota(&s, "10", true, &[50, 100]))
        .await
        .unwrap();
    let seq = ingest(&mut client, vec![usage("e1", &s, 6.0)]).await;
    check(&mut client, &s, 0.0, seq).await.unwrap();
    let got = wait_received(&received, &s, 1).await;
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![50],
        "{got:?}"
    );
    // More usage in the same period crosses 100 only; 50 is not raised again.
    let seq = ingest(
        &mut client,
        vec![
            usage("e2", &s, 3.0),
            usage("e3", &s, 1.0),
            usage("e4", &s, 2.0),
        ],
    )
    .await;
    check(&mut client, &s, 0.0, seq).await.unwrap();
    let got = wait_received(&received, &s, 2).await;
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![50, 100],
        "{got:?}"
    );
    running.stop().await;

    // Restart on the same stream: the new replica replays every event (crossing both
    // thresholds again in its book) but raises and delivers nothing new.
    let (running, mut client) = env.start_metering(true).await;
    let c = check(&mut client, &s, 0.0, 0).await.unwrap();
    assert_eq!(c.used, "12");
    // And a second replica beside it replays too.
    let (replica, mut other) = env.start_metering(false).await;
    assert_eq!(check(&mut other, &s, 0.0, 0).await.unwrap().used, "12");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = received_for(&received, &s).await;
    assert_eq!(got.len(), 2, "no second delivery: {got:?}");
    assert_ne!(got[0].0, got[1].0);
    assert_eq!(
        thresholds_in_log(env, &s).await,
        2,
        "one crossing each in the log"
    );

    if env.platform.pool().is_some() {
        // The read model: the quota and both crossings.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let quotas: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM quotas WHERE subscription_id = $1 AND kind = 'metered' AND quota_limit = 10",
            )
            .bind(&s)
            .fetch_one(env.pool())
            .await
            .unwrap();
            let crossed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM quota_thresholds_reached WHERE subscription_id = $1",
            )
            .bind(&s)
            .fetch_one(env.pool())
            .await
            .unwrap();
            if (quotas, crossed) == (1, 2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "quotas {quotas}, crossings {crossed}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    replica.stop().await;
    running.stop().await;
    if env.platform.pool().is_some() {
        // The read model is rebuilt by a replay, in one transaction (readers never see it
        // empty), while the live projector waits for its lock and then goes on.
        let order = "tenant, subscription_id, event_type";
        let quotas = creto_replay_tests::checksum(env.pool(), "quotas", order).await;
        let order = "tenant, subscription_id, event_type, period_start, pct";
        let crossed =
            creto_replay_tests::checksum(env.pool(), "quota_thresholds_reached", order).await;
        sqlx::query("DELETE FROM quotas")
            .execute(env.pool())
            .await
            .unwrap();
        let (running, _) = env.start_metering(true).await;
        quotas::rebuild(
            env.pool(),
            env.platform.log.clone(),
            env.platform.catalog.clone(),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let again = (
                creto_replay_tests::checksum(
                    env.pool(),
                    "quotas",
                    "tenant, subscription_id, event_type",
                )
                .await,
                creto_replay_tests::checksum(env.pool(), "quota_thresholds_reached", order).await,
            );
            if again == (quotas.clone(), crossed.clone()) {
                break;
            }
            assert!(Instant::now() < deadline, "the rebuild differs");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        running.stop().await;
        assert_eq!(received_for(&received, &s).await.len(), 2);
    }
    server.abort();
}

async fn a_fresh_replica_answers_after_warming(env: &Env) {
    let (running, mut client) = env.start_metering(false).await;
    let s = sub("warm");
    client
        .set_quota(set_quota(&s, "100", true, &[]))
        .await
        .unwrap();
    let mut seq = 0;
    for i in 0..20 {
        seq = ingest(&mut client, vec![usage(&format!("e{i}"), &s, 1.5)]).await;
    }
    assert_eq!(check(&mut client, &s, 0.0, seq).await.unwrap().used, "30");

    let (fresh, mut other) = env.start_metering(false).await;
    // From its very first answer on it is either UNAVAILABLE (warming) or right.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match other
            .check_quota(pb::CheckQuotaRequest {
                subscription_id: s.clone(),
                event_type: CALLS.into(),
                quantity: Some(1.0),
                min_sequence: 0,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!((r.used.as_str(), r.remaining.as_str()), ("30", "70"));
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(e.message().contains("warming"), "{e:?}");
                assert!(Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // And follows the stream afterwards.
    let seq = ingest(&mut client, vec![usage("late", &s, 10.0)]).await;
    let c = check(&mut other, &s, 0.0, seq).await.unwrap();
    assert_eq!(c.used, "40");
    // The shared counter in the cache (Redis, or the in-process cache) with its sequence.
    let key = counter_key(
        &env.settings.redis_prefix(),
        "default",
        &s,
        CALLS,
        chrono::DateTime::from_timestamp(c.period_start.unwrap().seconds, 0).unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counter = env.platform.cache.hash(&key).await.unwrap();
        if counter.get("used").map(String::as_str) == Some("40") {
            assert_eq!(counter["sequence"], seq.to_string());
            break;
        }
        assert!(Instant::now() < deadline, "{key}: {counter:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fresh.stop().await;
    running.stop().await;
}

async fn tenants_are_isolated(env: &Env) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, keygen("k1")).unwrap();
    let auth = AuthArgs {
        auth_keys: Some(keys.clone()),
        ..Default::default()
    }
    .build(None)
    .unwrap();
    let running = env.start_metering_with(false, auth).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ring = KeyRing::load(&keys).unwrap();
    let client = |tenant: &str| {
        let token = ring
            .issue(
                tenant,
                "tester",
                &["admin".into()],
                Duration::from_secs(300),
            )
            .unwrap();
        MeteringServiceClient::with_interceptor(channel.clone(), Bearer::new(&token))
    };
    let (mut a, mut b) = (client("tenant-a"), client("tenant-b"));
    let s = sub("shared");
    a.set_quota(set_quota(&s, "10", true, &[])).await.unwrap();
    let seq = ingest(&mut a, vec![usage("e1", &s, 7.0)]).await;
    // Tenant B has no quota under the same subscription id...
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        let e = b
            .check_quota(pb::CheckQuotaRequest {
                subscription_id: s.clone(),
                event_type: CALLS.into(),
                quantity: Some(1.0),
                min_sequence: seq,
            })
            .await
            .unwrap_err();
        if e.code() != Code::Unavailable || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = b
        .get_quota(pb::GetQuotaRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = b
        .add_grant(pb::AddGrantRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            grant_id: "steal".into(),
            amount: "100".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // ...its own quota there and usage there do not touch A's.
    b.set_quota(set_quota(&s, "3", true, &[])).await.unwrap();
    let seq = ingest(&mut b, vec![usage("e1", &s, 2.0), usage("e2", &s, 1.0)]).await;
    let cb = b
        .check_quota(pb::CheckQuotaRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            quantity: Some(0.0),
            min_sequence: seq,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((cb.used.as_str(), cb.limit.as_str()), ("3", "3"));
    let ca = a
        .check_quota(pb::CheckQuotaRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            quantity: Some(0.0),
            min_sequence: seq,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ca.used.as_str(), ca.limit.as_str()), ("7", "10"));
    running.stop().await;
}

async fn bad_input_is_invalid_argument_with_what_to_fix(env: &Env) {
    let (running, mut client) = env.start_metering(false).await;
    let s = sub("bad");
    let invalid = |e: tonic::Status, needle: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "{needle:?} not in {e:?}");
    };
    let mut req = set_quota(&s, "ten", true, &[]);
    invalid(client.set_quota(req.clone()).await.unwrap_err(), "`limit`");
    req.limit = "-1".into();
    invalid(client.set_quota(req.clone()).await.unwrap_err(), "limit");
    req.limit = "1.0000001".into();
    invalid(
        client.set_quota(req.clone()).await.unwrap_err(),
        "6 decimals",
    );
    req.limit = "10".into();
    req.period = None;
    invalid(
        client.set_quota(req.clone()).await.unwrap_err(),
        "`period` is required",
    );
    req.period = Some(pb::QuotaPeriod {
        kind: pb::QuotaPeriodKind::PeriodDay as i32,
        anchor: None,
        time_zone: "Mars/Olympus".into(),
    });
    invalid(client.set_quota(req.clone()).await.unwrap_err(), "IANA");
    req.period = hourly();
    req.thresholds_pct = vec![80, 50];
    invalid(
        client.set_quota(req.clone()).await.unwrap_err(),
        "ascending",
    );
    req.thresholds_pct = vec![150];
    invalid(client.set_quota(req.clone()).await.unwrap_err(), "1 to 100");
    req.thresholds_pct = vec![];
    req.subscription_id = "not a token".into();
    invalid(
        client.set_quota(req.clone()).await.unwrap_err(),
        "subscription_id",
    );
    req.subscription_id = s.clone();
    req.event_type = String::new();
    invalid(
        client.set_quota(req.clone()).await.unwrap_err(),
        "event_type",
    );

    // No quota: NOT_FOUND, saying nothing is enforced.
    let e = check(&mut client, &s, 1.0, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("SetQuota"), "{e:?}");
    let e = check(&mut client, &s, -1.0, 0).await.unwrap_err();
    invalid(e, "quantity");
    // Grants need a quota, and sane fields.
    let e = client
        .add_grant(pb::AddGrantRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            grant_id: "g".into(),
            amount: "5".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("set one"), "{e:?}");
    client
        .set_quota(set_quota(&s, "10", true, &[]))
        .await
        .unwrap();
    let now = Utc::now();
    let e = client
        .add_grant(pb::AddGrantRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            grant_id: "g".into(),
            amount: "5".into(),
            effective_from: Some(creto_streams::envelope::timestamp(now)),
            expires_at: Some(creto_streams::envelope::timestamp(
                now - chrono::Duration::hours(1),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    invalid(e, "expires_at");
    let e = client
        .add_grant(pb::AddGrantRequest {
            subscription_id: s.clone(),
            event_type: CALLS.into(),
            grant_id: "g".into(),
            amount: "0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    invalid(e, "amount");
    let e = client
        .set_entitlement(pb::SetEntitlementRequest {
            subscription_id: s.clone(),
            feature: "sso".into(),
            value: None,
        })
        .await
        .unwrap_err();
    invalid(e, "enabled");

    // Boolean and static entitlements: GetQuota reads them, CheckQuota says to.
    let r = client
        .set_entitlement(pb::SetEntitlementRequest {
            subscription_id: s.clone(),
            feature: "sso".into(),
            value: Some(pb::set_entitlement_request::Value::Enabled(true)),
        })
        .await
        .unwrap()
        .into_inner();
    let q = r.quota.unwrap();
    assert_eq!((q.kind.as_str(), q.enabled), ("boolean", true));
    let e = client
        .check_quota(pb::CheckQuotaRequest {
            subscription_id: s.clone(),
            event_type: "sso".into(),
            quantity: None,
            min_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let removed = client
        .remove_quota(pb::RemoveQuotaRequest {
            subscription_id: s.clone(),
            event_type: "sso".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(removed.sequence > 0);
    let e = client
        .remove_quota(pb::RemoveQuotaRequest {
            subscription_id: s.clone(),
            event_type: "sso".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    running.stop().await;
}

async fn corrections_change_usage_against_the_quota(env: &Env) {
    let (running, mut client) = env.start_metering(true).await;
    let s = sub("corrections");
    client
        .set_quota(set_quota(&s, "10", true, &[]))
        .await
        .unwrap();
    let seq = ingest(&mut client, vec![usage("a", &s, 4.0), usage("b", &s, 5.0)]).await;
    env.wait_applied(seq).await;
    assert_eq!(check(&mut client, &s, 0.0, seq).await.unwrap().used, "9");
    let amended = client
        .amend_event(pb::AmendEventRequest {
            subscription_id: s.clone(),
            event_id: "b".into(),
            quantity: Some(2.0),
            data: None,
            reason: "double counted".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let c = check(&mut client, &s, 0.0, amended.sequence).await.unwrap();
    assert_eq!((c.used.as_str(), c.remaining.as_str()), ("6", "4"));
    let voided = void(&mut client, &s, "a", "test run").await;
    assert!(voided.voided);
    let c = check(&mut client, &s, 0.0, voided.sequence).await.unwrap();
    assert_eq!(c.used, "2");
    // A fresh replica replays the corrections the same way.
    let (fresh, mut other) = env.start_metering(false).await;
    assert_eq!(check(&mut other, &s, 0.0, 0).await.unwrap().used, "2");
    fresh.stop().await;
    // With every event of the month voided, the usage counter in the cache reads nothing (it
    // used to keep the last total: a key without usage had no row to write).
    let month = Utc::now().format("%Y-%m").to_string();
    let voided = void(&mut client, &s, "b", "test run").await;
    env.wait_applied(voided.sequence).await;
    let counters = creto_projections::metering::counters::Counters::new(
        env.platform.cache.clone(),
        &env.settings.redis_prefix(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = counters.get("default", &s, CALLS).await.unwrap();
        if got
            .as_ref()
            .is_some_and(|(_, q, n)| (q.as_str(), *n) == ("0", 0))
        {
            break;
        }
        let month_turned = Utc::now().format("%Y-%m").to_string() != month;
        assert!(
            Instant::now() < deadline || month_turned,
            "the counter keeps voided usage: {got:?}"
        );
        if month_turned {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

/// A replica warmed from the cache counts corrections of events its counters already hold:
/// once past the warm-up it took them for events that never counted, and a customer blocked
/// by a mistaken event stayed blocked on restarted replicas after it was voided.
async fn a_correction_after_a_warm_up_counts_against_the_quota(env: &Env) {
    let (running, mut client) = env.start_metering(true).await;
    let s = sub("warmvoid");
    client
        .set_quota(set_quota(&s, "10", true, &[]))
        .await
        .unwrap();
    let seq = ingest(&mut client, vec![usage("a", &s, 4.0), usage("b", &s, 5.0)]).await;
    env.wait_applied(seq).await;
    wait_watermark(env, seq).await;
    running.stop().await;
    let (warmed, mut other) = env.start_metering(true).await;
    assert_eq!(check(&mut other, &s, 0.0, seq).await.unwrap().used, "9");
    let voided = void(&mut other, &s, "a", "mistaken").await;
    assert!(voided.voided);
    let c = check(&mut other, &s, 0.0, voided.sequence).await.unwrap();
    assert_eq!(c.used, "5");
    warmed.stop().await;
}

/// Voids event `id` of subscription `sub` with `reason`.
async fn void(client: &mut Client, sub: &str, id: &str, reason: &str) -> pb::VoidEventResponse {
    client
        .void_event(pb::VoidEventRequest {
            subscription_id: sub.into(),
            event_id: id.into(),
            reason: reason.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the cache's watermark is at least `seq`.
async fn wait_watermark(env: &Env, seq: u64) {
    let key = watermark_key(&env.settings.redis_prefix());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = env.platform.cache.get(&key).await.unwrap();
        if w.and_then(|w| w.parse::<u64>().ok())
            .is_some_and(|w| w >= seq)
        {
            return;
        }
        assert!(Instant::now() < deadline, "no watermark {seq}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_replica_warms_from_the_cache_counters(env: &Env) {
    use creto_projections::cache::CacheWrite;
    let (running, mut client) = env.start_metering(false).await;
    let (s, idle) = (sub("cached"), sub("idle"));
    for x in [&s, &idle] {
        client
            .set_quota(set_quota(x, "100", true, &[]))
            .await
            .unwrap();
    }
    let seq = ingest(&mut client, vec![usage("a", &s, 1.0), usage("b", &s, 2.0)]).await;
    assert_eq!(check(&mut client, &s, 0.0, seq).await.unwrap().used, "3");
    wait_watermark(env, seq).await;
    let prefix = env.settings.redis_prefix();
    let latest = env
        .platform
        .cache
        .hash(&latest_key(&prefix, "default", &s, CALLS))
        .await
        .unwrap();
    assert_eq!(latest["used"], "3", "{latest:?}");
    assert_eq!(latest["sequence"], seq.to_string());
    // Tamper with the counter: a replica that shows 50 read it from the cache, not the stream.
    env.platform
        .cache
        .write(vec![CacheWrite::Hash {
            key: latest_key(&prefix, "default", &s, CALLS),
            fields: vec![("used".into(), "50".into())],
            ttl: None,
        }])
        .await
        .unwrap();
    let (b, mut other) = env.start_metering(false).await;
    assert_eq!(check(&mut other, &s, 0.0, 0).await.unwrap().used, "50");
    // A key without a counter (no usage yet) starts from nothing, and both follow the stream
    // without counting the restored events again.
    assert_eq!(check(&mut other, &idle, 0.0, 0).await.unwrap().used, "0");
    let seq = ingest(
        &mut client,
        vec![usage("c", &s, 1.0), usage("a", &idle, 4.0)],
    )
    .await;
    assert_eq!(check(&mut other, &s, 0.0, seq).await.unwrap().used, "51");
    assert_eq!(check(&mut other, &idle, 0.0, seq).await.unwrap().used, "4");
    assert_eq!(check(&mut client, &s, 0.0, seq).await.unwrap().used, "4");
    b.stop().await;
    // Without a watermark the cache is not trusted: the stream is replayed.
    wait_watermark(env, seq).await;
    env.platform
        .cache
        .write(vec![CacheWrite::Delete {
            key: watermark_key(&prefix),
        }])
        .await
        .unwrap();
    running.stop().await;
    let (c, mut third) = env.start_metering(false).await;
    assert_eq!(check(&mut third, &s, 0.0, 0).await.unwrap().used, "4");
    assert_eq!(check(&mut third, &idle, 0.0, 0).await.unwrap().used, "4");
    c.stop().await;
}

/// A producer may stamp an event up to 5 minutes ahead. Stamped past the period's end, it used
/// to move the quota to the next period early: the rest of this period's usage then counted
/// against nothing and checks answered from the next period's near-empty counter.
async fn an_event_stamped_in_the_next_period_counts_in_this_one(env: &Env) {
    let (running, mut client) = env.start_metering(true).await;
    let s = sub("ahead");
    // An hourly period that ends two minutes from now.
    let end = Utc::now() + chrono::Duration::seconds(120);
    let mut quota = set_quota(&s, "10", true, &[]);
    quota.period = Some(pb::QuotaPeriod {
        kind: pb::QuotaPeriodKind::PeriodHour as i32,
        anchor: Some(creto_streams::envelope::timestamp(end)),
        time_zone: String::new(),
    });
    client.set_quota(quota).await.unwrap();
    let mut ahead = usage("ahead", &s, 1.0);
    ahead.time = Some(creto_streams::envelope::timestamp(
        end + chrono::Duration::seconds(60),
    ));
    let seq = ingest(
        &mut client,
        vec![usage("a", &s, 8.0), ahead, usage("b", &s, 1.0)],
    )
    .await;
    env.wait_applied(seq).await;
    let c = check(&mut client, &s, 1.0, seq).await.unwrap();
    assert_eq!(c.used, "10", "{c:?}");
    assert!(!c.allowed, "{c:?}");
    assert_eq!(c.period_end.unwrap().seconds, end.timestamp());
    // Voided, it is taken back from the period it counted in.
    let voided = void(&mut client, &s, "ahead", "clock ahead").await;
    let c = check(&mut client, &s, 1.0, voided.sequence).await.unwrap();
    assert_eq!((c.used.as_str(), c.allowed), ("9", true), "{c:?}");
    running.stop().await;
}

/// The book warms when its replay reaches the stream's end, also when the last stored event
/// was removed (`nats stream rmm`): warming waited for that sequence, which nothing would
/// ever deliver, and metering (not ready until warm) never took traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_book_warms_when_the_streams_last_event_was_removed() {
    let env = Env::new().await;
    let stream = env.platform.catalog.stream(METERING);
    let mut last = 0;
    for i in 0..3 {
        let json = creto_replay_tests::cloud_event(
            &format!("e{i}"),
            "sub_rm",
            "agent.execution",
            Utc::now(),
            serde_json::json!({}),
        );
        last = env
            .platform
            .log
            .append(creto_streams::AppendEvent {
                subject: env.subject("metering.events.sub_rm"),
                id: format!("l{i}"),
                expected_subject_sequence: None,
                headers: creto_streams::Headers::new().with(
                    creto_streams::headers::names::CONTENT_TYPE,
                    creto_streams::headers::content_types::CLOUDEVENTS_JSON,
                ),
                payload: json.into(),
            })
            .await
            .unwrap()
            .sequence();
    }
    creto_replay_tests::remove_message(&stream, last).await;
    let view = creto_gateways::metering::quota::start(&env.platform);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(view.clone().tail(rx));
    let until = Instant::now() + Duration::from_secs(15);
    while !view.is_warm() {
        assert!(Instant::now() < until, "the quota book never warmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.drop().await;
}

/// Without an anchor, a day in New York starts at its midnight (it used to start at 19:00,
/// the Unix epoch's local time there).
async fn periods_without_an_anchor_start_at_local_midnight(env: &Env) {
    use chrono::{TimeZone, Timelike};
    let (running, mut client) = env.start_metering(false).await;
    let s = sub("ny");
    let mut req = set_quota(&s, "10", true, &[]);
    req.period = Some(pb::QuotaPeriod {
        kind: pb::QuotaPeriodKind::PeriodDay as i32,
        anchor: None,
        time_zone: "America/New_York".into(),
    });
    let seq = client.set_quota(req).await.unwrap().into_inner().sequence;
    let c = check(&mut client, &s, 1.0, seq).await.unwrap();
    let start = chrono::DateTime::from_timestamp(c.period_start.unwrap().seconds, 0).unwrap();
    let local = chrono_tz::America::New_York.from_utc_datetime(&start.naive_utc());
    assert_eq!((local.hour(), local.minute()), (0, 0), "{local}");
    running.stop().await;
}
