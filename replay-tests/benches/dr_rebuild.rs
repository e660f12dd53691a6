//! DR rebuild rate: the metering read models rebuilt from the stream (`enablement replay
//! metering --rebuild`) next to a raw ordered pull consumer over the same stream, in the same
//! run, and the recovery time that extrapolates to for 10 million events.
//! `cargo bench -p creto-replay-tests --bench dr_rebuild` (BENCH_EVENTS, default 100,000).
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture};
use chrono::{Duration as Ch, Utc};
use creto_projections::rebuild;
use creto_replay_tests::{cloud_event, metering_checksums, Env};
use creto_streams::METERING;

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let env = Env::new().await;
    let client = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(16_384)
        .build(client);
    let now = Utc::now();
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(5_000);
    for i in 0..n {
        let k = (i as u64).wrapping_mul(2_654_435_761);
        let sub = format!("sub_{:04}", k % 5_000);
        let payload = cloud_event(
            &format!("evt-{i}"),
            &sub,
            ["agent.execution", "llm.tokens", "tool.call"][(k % 3) as usize],
            now - Ch::seconds((k % 86_400) as i64),
            serde_json::json!({"quantity": (k % 100) as f64 + 1.0, "model": format!("m{}", k % 7)}),
        );
        acks.push(
            js.publish(
                env.subject(&format!("metering.events.{sub}")),
                payload.into(),
            )
            .await
            .unwrap(),
        );
        if acks.len() == 5_000 || i + 1 == n {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }

    // Raw: an ordered pull consumer reading every message of the stream.
    let (read, raw) = creto_replay_tests::raw_read(&env, METERING).await;
    assert_eq!(read as usize, n);

    // The project: the blue/green rebuild from nothing (the read models lost).
    // Phase by phase (load, keys and usage_hourly, switch), as `enablement replay metering
    // --rebuild` runs them.
    eprintln!("rebuilding {n} events");
    let started = Instant::now();
    let log = env.platform.log.clone();
    let side = env.prepare_rebuild(true).await;
    rebuild::catch_up(&log, &side, None, 5_000, |_| {})
        .await
        .unwrap();
    let loaded = started.elapsed();
    rebuild::build_indexes(env.pool()).await.unwrap();
    let built = started.elapsed();
    rebuild::switch_over(env.pool(), &log, &side).await.unwrap();
    let rebuilt = started.elapsed();
    let stored: i64 = sqlx::query_scalar("SELECT sum(event_count)::int8 FROM usage_hourly")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert_eq!(stored as usize, n, "every event counted exactly once");
    let first = metering_checksums(env.pool()).await;

    // Once more, to check the rebuild is deterministic (same checksums).
    env.rebuild_metering(5_000).await;
    assert_eq!(metering_checksums(env.pool()).await, first);

    println!("DR rebuild: {n} events");
    println!(
        "rebuild  raw ordered consumer {:>9.0} ev/s | replay --rebuild {:>9.0} ev/s ({:.1} s) | ratio {:.2}",
        rate(n, raw),
        rate(n, rebuilt),
        rebuilt.as_secs_f64(),
        raw.as_secs_f64() / rebuilt.as_secs_f64()
    );
    println!(
        "         phases: replay and load {:.1} s, keys, usage_hourly and indexes {:.1} s, switch {:.1} s",
        loaded.as_secs_f64(),
        (built - loaded).as_secs_f64(),
        (rebuilt - built).as_secs_f64()
    );
    println!(
        "recovery of 10,000,000 events: ~{:.0} s ({:.1} min) at this rate (the raw consumer alone: {:.0} s)",
        10_000_000.0 / rate(n, rebuilt),
        10_000_000.0 / rate(n, rebuilt) / 60.0,
        10_000_000.0 / rate(n, raw)
    );
    env.drop().await;
}
