//! Authentication, authorization, tenant isolation and rate limits on a running gateway, on
//! both adapters. The isolation matrix covers every metering method, read and write: a caller
//! of tenant B never sees, changes or learns about tenant A's data, and the read models and
//! counters keep the tenants apart.
use std::time::Duration;

use chrono::Utc;
use creto_gateways::auth::token::{keygen, KeyRing};
use creto_gateways::auth::{AuthArgs, Bearer};
use creto_projections::metering::counters::Counters;
use creto_replay_tests::Env;
use creto_schemas::metering::v1 as pb;
use creto_schemas::metering::v1::metering_service_client::MeteringServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

type Client = MeteringServiceClient<InterceptedService<Channel, Bearer>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_isolation_on_postgres() {
    check(Env::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_isolation_on_embedded() {
    check(Env::embedded().await).await;
}

fn event(id: &str, sub: &str, quantity: f64) -> pb::UsageEvent {
    pb::UsageEvent {
        id: id.into(),
        source: "test".into(),
        r#type: "llm.tokens".into(),
        subject: sub.into(),
        time: Some(creto_streams::envelope::timestamp(Utc::now())),
        data: Some(prost_types::Struct {
            fields: [(
                "quantity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(quantity)),
                },
            )]
            .into(),
        }),
    }
}

fn usage_request(sub: &str, meter: &str, min_sequence: u64) -> pb::QueryUsageRequest {
    let now = Utc::now();
    pb::QueryUsageRequest {
        meter: meter.into(),
        subscription_id: sub.into(),
        event_type: if meter.is_empty() {
            "llm.tokens".into()
        } else {
            String::new()
        },
        from: Some(creto_streams::envelope::timestamp(
            now - chrono::Duration::days(1),
        )),
        to: Some(creto_streams::envelope::timestamp(
            now + chrono::Duration::hours(1),
        )),
        window: pb::Window::Day as i32,
        min_sequence,
        wait_ms: 10_000,
        ..Default::default()
    }
}

fn meter(slug: &str) -> pb::CreateMeterRequest {
    pb::CreateMeterRequest {
        meter: Some(pb::Meter {
            slug: slug.into(),
            event_type: "llm.tokens".into(),
            aggregation: pb::Aggregation::Sum as i32,
            value_property: "$.quantity".into(),
            ..Default::default()
        }),
    }
}

async fn total(c: &mut Client, sub: &str, meter: &str, min: u64) -> Result<f64, tonic::Status> {
    Ok(c.query_usage(usage_request(sub, meter, min))
        .await?
        .into_inner()
        .rows
        .iter()
        .map(|r| r.value)
        .sum())
}

async fn check(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, keygen("k1")).unwrap();
    let limits = dir.path().join("limits.toml");
    std::fs::write(
        &limits,
        "[default]\nrequests_per_second = 1000\nburst = 1000\n[tenants.slow]\nrequests_per_second = 1\nburst = 2\n",
    )
    .unwrap();
    let auth = AuthArgs {
        auth_keys: Some(keys.clone()),
        rate_limits: Some(limits.clone()),
        ..Default::default()
    }
    .build(None)
    .unwrap();
    let running = env.start_metering_with(true, auth).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ring = KeyRing::load(&keys).unwrap();
    let client = |tenant: &str, roles: &[&str]| -> Client {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        let token = ring
            .issue(tenant, "tester", &roles, Duration::from_secs(300))
            .unwrap();
        MeteringServiceClient::with_interceptor(channel.clone(), Bearer::new(&token))
    };

    // Who is calling: no token, a broken one, one from an unknown key, an expired one.
    let mut anonymous = MeteringServiceClient::new(channel.clone());
    let e = anonymous
        .list_meters(pb::ListMetersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("enablement token issue"), "{e:?}");
    let stranger_dir = tempfile::tempdir().unwrap();
    std::fs::write(stranger_dir.path().join("k.toml"), keygen("k1")).unwrap();
    let stranger = KeyRing::load(&stranger_dir.path().join("k.toml")).unwrap();
    let forged = stranger
        .issue("a", "x", &["admin".into()], Duration::from_secs(60))
        .unwrap();
    let expired = ring
        .issue("a", "x", &["admin".into()], Duration::from_secs(1))
        .unwrap();
    for (token, says) in [("garbage".to_string(), "not valid"), (forged, "not valid")] {
        let mut c = MeteringServiceClient::with_interceptor(channel.clone(), Bearer::new(&token));
        let e = c
            .list_meters(pb::ListMetersRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains(says), "{e:?}");
    }
    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");
    // Each dependency has its own gRPC health entry.
    let dependency = match env.platform.stores {
        creto_gateways::platform::Stores::Services { .. } => "dependency.redis",
        creto_gateways::platform::Stores::Embedded { .. } => "dependency.memory_cache",
    };
    let mut serving = false;
    for _ in 0..50 {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: dependency.into(),
            })
            .await;
        if r.is_ok_and(|r| r.into_inner().status == 1) {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "{dependency} not reported SERVING");

    // Roles: the built-in policy.
    let mut a = client("a", &["admin"]);
    let mut b = client("b", &["admin"]);
    let mut a_reader = client("a", &["reader"]);
    let mut a_producer = client("a", &["producer"]);
    let e = a_reader
        .ingest_events(pb::IngestEventsRequest {
            events: vec![event("r", "sub_x", 1.0)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = a_producer
        .query_usage(usage_request("sub_x", "", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = a_producer.create_meter(meter("m0")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Tenant A writes: usage, an invalid event (dead letter), a meter.
    let r = a_producer
        .ingest_events(pb::IngestEventsRequest {
            events: vec![event("e1", "sub_x", 3.0), event("bad", "sub_x", -1.0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.rejected), (1, 1));
    let a_seq = r.sequence;
    let m1 = a
        .create_meter(meter("m1"))
        .await
        .unwrap()
        .into_inner()
        .sequence;
    assert_eq!(
        total(&mut a_reader, "sub_x", "", a_seq.max(m1))
            .await
            .unwrap(),
        3.0
    );
    assert_eq!(total(&mut a_reader, "sub_x", "m1", m1).await.unwrap(), 3.0);

    // Tenant B reads: nothing of A's, and A's meter does not exist for B.
    assert_eq!(total(&mut b, "sub_x", "", m1).await.unwrap(), 0.0);
    let e = total(&mut b, "sub_x", "m1", m1).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let listed = b
        .list_meters(pb::ListMetersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.meters.is_empty(), "{listed:?}");
    let letters = b
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        letters.dead_letters.is_empty(),
        "B sees A's dead letters: {letters:?}"
    );
    // B's page read past A's letter: the next starts after it.
    assert!(letters.next_after_sequence > 0, "{letters:?}");
    let next = b
        .list_dead_letters(pb::ListDeadLettersRequest {
            after_sequence: letters.next_after_sequence,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (next.dead_letters.len(), next.next_after_sequence),
        (0, letters.next_after_sequence)
    );
    let own = a
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.dead_letters.len(), 1);
    // A tenant's operator (the runbook's on-call token) sees its tenant's only.
    let mut on_call = client("ops", &["operator"]);
    let theirs = on_call
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.dead_letters.is_empty(), "{theirs:?}");
    let mut operator = client("ops", &["platform-operator"]);
    let all = operator
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all.dead_letters.len(),
        1,
        "platform operators see every tenant's"
    );

    // Tenant B writes the same ids and slug: its own, never a duplicate of A's, never A's.
    let r = b
        .ingest_events(pb::IngestEventsRequest {
            events: vec![event("e1", "sub_x", 5.0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.accepted, 1,
        "same id in another tenant is another event: {r:?}"
    );
    let bm1 = b
        .create_meter(meter("m1"))
        .await
        .unwrap()
        .into_inner()
        .sequence;
    let e = a.create_meter(meter("m1")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::AlreadyExists,
        "A's own slug is taken in A only"
    );
    assert_eq!(
        total(&mut b, "sub_x", "m1", bm1.max(r.sequence))
            .await
            .unwrap(),
        5.0
    );
    assert_eq!(total(&mut a, "sub_x", "m1", bm1).await.unwrap(), 3.0);
    assert_eq!(total(&mut a, "sub_x", "", bm1).await.unwrap(), 3.0);

    // The counters keep tenants apart too.
    let counters = Counters::new(env.platform.cache.clone(), &env.settings.redis_prefix());
    let mut seen = (None, None);
    for _ in 0..200 {
        seen = (
            counters.get("a", "sub_x", "llm.tokens").await.unwrap(),
            counters.get("b", "sub_x", "llm.tokens").await.unwrap(),
        );
        if seen.0.is_some() && seen.1.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (ca, cb) = (seen.0.expect("a's counter"), seen.1.expect("b's counter"));
    assert_eq!((ca.1.parse::<f64>().unwrap(), ca.2), (3.0, 1));
    assert_eq!((cb.1.parse::<f64>().unwrap(), cb.2), (5.0, 1));

    // Expiry: the 1-second token no longer works.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let mut late = MeteringServiceClient::with_interceptor(channel.clone(), Bearer::new(&expired));
    let e = late
        .list_meters(pb::ListMetersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{e:?}");

    // Rate limits: the third call within a second is refused with when to retry; a reload of
    // the limits file applies without a restart.
    let mut slow = client("slow", &["admin"]);
    for _ in 0..2 {
        slow.list_meters(pb::ListMetersRequest::default())
            .await
            .unwrap();
    }
    let e = slow
        .list_meters(pb::ListMetersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let retry = e.get_details_retry_info().expect("RetryInfo detail");
    let delay = retry.retry_delay.expect("a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    assert!(e.metadata().get("retry-after-ms").is_some());
    std::fs::write(
        &limits,
        "[default]\nrequests_per_second = 1000\nburst = 1000\n[tenants.slow]\nrequests_per_second = 1000\nburst = 1000\n",
    )
    .unwrap();
    let f = std::fs::File::options().append(true).open(&limits).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut ok = true;
        for _ in 0..5 {
            ok &= slow
                .list_meters(pb::ListMetersRequest::default())
                .await
                .is_ok();
        }
        if ok {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "new limits were not picked up");

    running.stop().await;
    env.drop().await;
}
