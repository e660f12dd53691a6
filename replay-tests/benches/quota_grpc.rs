//! CheckQuota over gRPC on loopback against a running metering gateway (the issue's goal:
//! p99 under 500 µs for the whole call), next to a raw tonic round trip of an empty call
//! (`grpc.health.v1.Health/Check`) on the same connection, in the same run.
//!
//! 1. load: BENCH_GRPC_SUBSCRIPTIONS (100,000) subscriptions with an hourly hard quota on
//!    `api.call`, appended straight to the log as `QuotaSet` events (in batches), plus one
//!    usage event for every 10th; on the embedded adapter (sled), or JetStream with
//!    `BENCH_ADAPTER=jetstream` (needs the services).
//! 2. start a gateway and time its warm-up (the replay of the stream into its quota book,
//!    until CheckQuota stops answering UNAVAILABLE).
//! 3. BENCH_GRPC_CALLS (20,000) calls of each kind, one at a time on one HTTP/2 connection,
//!    interleaved (health, check, health, ...) so both see the same machine: p50/p99/p99.9/max
//!    of each call's time seen by the client, and the gateway's own check time from
//!    `metering_quota_check_duration_seconds` (a histogram: bucket bounds only).
//!
//! `cargo bench -p creto-replay-tests --bench quota_grpc`
use std::time::{Duration, Instant};

use creto_domain::metering::quota::{Period, PeriodKind, Quantity, QuotaEvent, QuotaSet};
use creto_gateways::auth::token::{keygen, KeyRing};
use creto_gateways::auth::{AuthArgs, Bearer};
use creto_projections::metering::quotas::seal_quota_event;
use creto_replay_tests::{cloud_event, Env};
use creto_schemas::metering::v1 as pb;
use creto_schemas::metering::v1::metering_service_client::MeteringServiceClient;
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Headers};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const EVENT_TYPE: &str = "api.call";
const GOAL: Duration = Duration::from_micros(500);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace(['_', ','], "").parse().ok())
        .unwrap_or(default)
}

/// SplitMix64, so every run checks the same keys.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn summary(mut us: Vec<f64>) -> String {
    us.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| us[((us.len() as f64 * p).ceil() as usize).clamp(1, us.len()) - 1];
    format!(
        "p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  max {:>8.1} µs",
        q(0.5),
        q(0.99),
        q(0.999),
        us.last().unwrap()
    )
}

fn p99(mut us: Vec<f64>) -> f64 {
    us.sort_by(|a, b| a.total_cmp(b));
    us[((us.len() as f64 * 0.99).ceil() as usize).clamp(1, us.len()) - 1]
}

async fn load(env: &Env, ids: &[String]) {
    let period = Period::new(
        PeriodKind::Hour,
        chrono::DateTime::UNIX_EPOCH,
        chrono_tz::Tz::UTC,
    );
    let now = chrono::Utc::now();
    let mut batch = Vec::with_capacity(1_000);
    for (i, id) in ids.iter().enumerate() {
        let event = QuotaEvent::QuotaSet(QuotaSet {
            subscription_id: id.clone(),
            meter: EVENT_TYPE.into(),
            limit: Quantity::units(1_000),
            period,
            hard: true,
            thresholds_pct: vec![],
        });
        batch.push(seal_quota_event(
            &env.platform.catalog,
            "default",
            &event,
            format!("bench-quota-{i}"),
        ));
        if i % 10 == 0 {
            batch.push(AppendEvent {
                subject: env.subject(&format!("metering.events.{id}")),
                id: format!("default:{id}:u{i}"),
                expected_subject_sequence: None,
                headers: Headers::new()
                    .with(names::CONTENT_TYPE, content_types::CLOUDEVENTS_JSON)
                    .with(names::TENANT, "default"),
                payload: cloud_event(
                    &format!("u{i}"),
                    id,
                    EVENT_TYPE,
                    now,
                    serde_json::json!({"quantity": 7}),
                )
                .into(),
            });
        }
        if batch.len() >= 1_000 || i + 1 == ids.len() {
            for r in env
                .platform
                .log
                .append_batch(std::mem::take(&mut batch))
                .await
            {
                r.unwrap();
            }
        }
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let subscriptions = env_usize("BENCH_GRPC_SUBSCRIPTIONS", 100_000);
    let calls = env_usize("BENCH_GRPC_CALLS", 20_000);
    let jetstream = std::env::var("BENCH_ADAPTER").is_ok_and(|a| a == "jetstream");
    let env = if jetstream {
        Env::new().await
    } else {
        Env::embedded().await
    };
    println!(
        "CheckQuota over gRPC on loopback: {} adapter, {subscriptions} subscriptions, {calls} calls of each kind",
        if jetstream { "jetstream" } else { "embedded" }
    );
    let mut rng = SplitMix(7);
    let ids: Vec<String> = (0..subscriptions)
        .map(|_| format!("sub_{:016x}", rng.next()))
        .collect();
    let started = Instant::now();
    load(&env, &ids).await;
    println!(
        "load        {:>8.2} s  ({} quota events, {} usage events appended)",
        started.elapsed().as_secs_f64(),
        subscriptions,
        subscriptions.div_ceil(10)
    );

    // A real bearer token and a rate limit far above what this box can reach: the default
    // limit (500 requests/s per tenant) would be what gets measured otherwise.
    let dir = tempfile::tempdir().unwrap();
    let (key_ring, limits) = (dir.path().join("keys.toml"), dir.path().join("limits.toml"));
    std::fs::write(&key_ring, keygen("bench")).unwrap();
    std::fs::write(
        &limits,
        "[default]\nrequests_per_second = 10000000\nburst = 10000000\n",
    )
    .unwrap();
    let auth = AuthArgs {
        auth_keys: Some(key_ring.clone()),
        rate_limits: Some(limits),
        ..Default::default()
    }
    .build(None)
    .unwrap();
    let token = KeyRing::load(&key_ring)
        .unwrap()
        .issue(
            "default",
            "bench",
            &["admin".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let started = Instant::now();
    let running = env.start_metering_with(false, auth).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", running.grpc_addr.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut client = MeteringServiceClient::with_interceptor(channel.clone(), Bearer::new(&token));
    let probe = |id: &str| pb::CheckQuotaRequest {
        subscription_id: id.to_string(),
        event_type: EVENT_TYPE.into(),
        quantity: Some(1.0),
        min_sequence: 0,
    };
    loop {
        match client.check_quota(probe(&ids[0])).await {
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            r => {
                let r = r.unwrap().into_inner();
                assert_eq!(r.used, "7", "{r:?}");
                break;
            }
        }
    }
    println!(
        "warm-up     {:>8.2} s  (gateway start to first CheckQuota answered)",
        started.elapsed().as_secs_f64()
    );

    let mut health = HealthClient::with_interceptor(channel, Bearer::new(&token));
    let mut keys = SplitMix(42);
    let warmup = calls / 10;
    let mut check_us = Vec::with_capacity(calls);
    let mut health_us = Vec::with_capacity(calls);
    let mut denied = 0usize;
    for i in 0..calls + warmup {
        let t = Instant::now();
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        let h = t.elapsed();
        let id = &ids[(keys.next() % ids.len() as u64) as usize];
        let req = probe(id);
        let t = Instant::now();
        let r = client.check_quota(req).await.unwrap().into_inner();
        let c = t.elapsed();
        denied += usize::from(!r.allowed);
        if i >= warmup {
            health_us.push(h.as_secs_f64() * 1e6);
            check_us.push(c.as_secs_f64() * 1e6);
        }
    }
    assert_eq!(denied, 0);
    let p99_check = p99(check_us.clone());
    println!("health      {}", summary(health_us));
    println!("CheckQuota  {}", summary(check_us));
    println!(
        "goal: CheckQuota p99 under {} µs: {}",
        GOAL.as_micros(),
        if p99_check < GOAL.as_secs_f64() * 1e6 {
            "met"
        } else {
            "NOT met"
        }
    );
    // The gateway's own time per check, from its metrics port (histogram buckets).
    let text = reqwest::get(format!("http://{}/metrics", running.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |suffix: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with(&format!("metering_quota_check_duration_seconds{suffix}")))
            .filter(|l| l.contains("action=\"allow\""))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let count = series("_count").first().map(|s| s.1).unwrap_or(0.0);
    let sum = series("_sum").first().map(|s| s.1).unwrap_or(0.0);
    if count > 0.0 {
        let buckets: Vec<String> = series("_bucket")
            .iter()
            .filter_map(|(k, v)| {
                let le = k.split("le=\"").nth(1)?.split('"').next()?;
                Some(format!("≤{le}s {:.2}%", v * 100.0 / count))
            })
            .collect();
        println!(
            "server-side check (allow): mean {:.2} µs over {count} checks; {}",
            sum / count * 1e6,
            buckets.join(", ")
        );
    }
    running.stop().await;
    env.drop().await;
}
