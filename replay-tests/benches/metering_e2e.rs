//! Metering end to end: a producer publishes N CloudEvents (a mix of subscriptions, types and
//! dimensions) to NATS; timed until the last one is applied to `usage_hourly`. Next to it, in
//! the same run: raw JetStream publish of the same payloads. Then the rebuild rate next to a
//! raw ordered pull consumer over the same stream.
//!
//! The projector's ceiling is PostgreSQL's own work on the runbook's tables, so the run also
//! times raw COPY of the very rows the projector wrote (the events in 5,000-row transactions,
//! then the final `usage_hourly` and `usage_monthly` rows) into copies of its tables with the
//! same indexes.
//! `cargo bench -p creto-replay-tests --bench metering_e2e` (BENCH_EVENTS, default 1,000,000).
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use chrono::{Duration as Ch, Utc};
use creto_projections::rebuild;
use creto_replay_tests::{cloud_event, Env};
use creto_streams::{Catalog, EventLog, METERING};

const TYPES: [&str; 5] = [
    "agent.execution",
    "llm.tokens",
    "tool.call",
    "sandbox.seconds",
    "message.sent",
];

async fn publish(js: &jetstream::Context, subjects: &[String], payloads: &[Bytes]) -> u64 {
    let mut last = 0;
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(5_000);
    for (s, p) in subjects.iter().zip(payloads) {
        acks.push(
            js.send_publish(
                s.clone(),
                jetstream::message::PublishMessage::build().payload(p.clone()),
            )
            .await
            .unwrap(),
        );
        if acks.len() == 5_000 {
            for a in acks.drain(..) {
                last = last.max(a.await.unwrap().sequence);
            }
        }
    }
    for a in acks {
        last = last.max(a.await.unwrap().sequence);
    }
    last
}

/// Raw PostgreSQL COPY of the rows the projector wrote into copies of its tables (same
/// columns, indexes and fill factor): the events 5,000 rows per transaction, as the projector
/// commits them, then the hourly and monthly rows; commits do not wait for the WAL flush, as
/// the projector's. Only COPY is timed, not the export.
async fn raw_copy(pool: &sqlx::PgPool) -> Duration {
    use futures::TryStreamExt;
    const TABLES: [&str; 3] = ["metering_events", "usage_hourly", "usage_monthly"];
    let mut exported = Vec::new();
    for table in TABLES {
        let mut conn = pool.acquire().await.unwrap();
        let chunks: Vec<bytes::Bytes> = conn
            .copy_out_raw(&format!("COPY {table} TO STDOUT"))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        exported.push(chunks.concat());
    }
    let mut ddl = "DROP SCHEMA IF EXISTS bench_raw CASCADE; CREATE SCHEMA bench_raw;".to_string();
    for table in TABLES {
        let fill = if table == "metering_events" {
            ""
        } else {
            " WITH (fillfactor = 70)"
        };
        ddl +=
            &format!("CREATE TABLE bench_raw.{table} (LIKE public.{table} INCLUDING ALL){fill};");
    }
    sqlx::raw_sql(&ddl).execute(pool).await.unwrap();
    // (table, rows): the events cut after every 5,000th newline (COPY text escapes newlines
    // inside values), then each aggregate table whole.
    let mut batches: Vec<(&str, &[u8])> = Vec::new();
    let events = &exported[0];
    let (mut start, mut rows) = (0, 0);
    for (i, b) in events.iter().enumerate() {
        if *b == b'\n' {
            rows += 1;
            if rows == 5_000 {
                batches.push((TABLES[0], &events[start..=i]));
                (start, rows) = (i + 1, 0);
            }
        }
    }
    if start < events.len() {
        batches.push((TABLES[0], &events[start..]));
    }
    batches.push((TABLES[1], &exported[1]));
    batches.push((TABLES[2], &exported[2]));
    let started = Instant::now();
    for (table, rows) in batches {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await
            .unwrap();
        let mut sink = tx
            .copy_in_raw(&format!("COPY bench_raw.{table} FROM STDIN"))
            .await
            .unwrap();
        sink.send(rows).await.unwrap();
        sink.finish().await.unwrap();
        tx.commit().await.unwrap();
    }
    let elapsed = started.elapsed();
    sqlx::raw_sql("DROP SCHEMA bench_raw CASCADE")
        .execute(pool)
        .await
        .unwrap();
    elapsed
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let env = Env::new().await;
    let now = Utc::now();
    let mut subjects = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for i in 0..n {
        let k = (i as u64).wrapping_mul(2_654_435_761);
        let sub = format!("sub_{:05}", k % 10_000);
        let region = ["eu", "us", "ap"][(k % 3) as usize];
        let data = serde_json::json!({"quantity": (k % 100) as f64 + 1.0, "model": format!("model-{}", k % 7), "region": region});
        payloads.push(Bytes::from(cloud_event(
            &format!("evt-{i}"),
            &sub,
            TYPES[(k % 5) as usize],
            now - Ch::seconds((k % 86_400) as i64),
            data,
        )));
        subjects.push(sub);
    }
    let bytes: usize = payloads.iter().map(|p| p.len()).sum();
    let client = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(16_384)
        .build(client.clone());

    // Raw: the same payloads into a stream nobody projects.
    let raw_catalog = Catalog::namespaced(&format!("{}raw", env.name));
    let raw_log =
        creto_streams::jetstream::JetStreamLog::from_client(client.clone(), raw_catalog.clone())
            .await
            .unwrap();
    raw_log.ensure_streams(&raw_catalog.specs()).await.unwrap();
    let raw_subjects: Vec<String> = subjects
        .iter()
        .map(|s| raw_catalog.subject(&format!("metering.events.{s}")))
        .collect();
    let started = Instant::now();
    publish(&js, &raw_subjects, &payloads).await;
    let raw_publish = started.elapsed();

    // End to end: publish, projector running, until the last event is in usage_hourly.
    let (running, _client) = env.start_metering(true).await;
    let subjects: Vec<String> = subjects
        .iter()
        .map(|s| env.subject(&format!("metering.events.{s}")))
        .collect();
    let started = Instant::now();
    let last = publish(&js, &subjects, &payloads).await;
    let published = started.elapsed();
    while creto_projections::metering::read_model::wait_for(
        &*env.platform.metering,
        last,
        Duration::from_secs(600),
    )
    .await
    .unwrap()
        < last
    {}
    let e2e = started.elapsed();
    let batches =
        creto_projections::metrics::PROJECTOR_BATCH_SECONDS.with_label_values(&["metering"]);
    println!(
        "projector: {} batches, {:.1} ms per batch on average, {:.0} events per batch",
        batches.get_sample_count(),
        batches.get_sample_sum() * 1000.0 / batches.get_sample_count().max(1) as f64,
        n as f64 / batches.get_sample_count().max(1) as f64
    );
    running.stop().await;
    let stored: i64 = sqlx::query_scalar("SELECT sum(event_count)::int8 FROM usage_hourly")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert_eq!(stored as usize, n, "every event counted exactly once");

    let raw_copy = raw_copy(env.pool()).await;

    // Rebuild rate vs a raw ordered pull consumer over the same stream.
    let (read, raw_consume) = creto_replay_tests::raw_read(&env, METERING).await;
    assert!(read as usize >= n);
    let log = env.platform.log.clone();
    let started = Instant::now();
    let projector = env.prepare_rebuild(true).await;
    rebuild::catch_up(&log, &projector, None, 5_000, |_| {})
        .await
        .unwrap();
    rebuild::switch_over(env.pool(), &log, &projector)
        .await
        .unwrap();
    let rebuilt = started.elapsed();

    println!(
        "metering end to end: {n} events, {:.0} bytes each on average",
        bytes as f64 / n as f64
    );
    println!(
        "ingest   raw JetStream publish   {:>9.0} ev/s | publish→usage_hourly {:>9.0} ev/s (publish alone {:>9.0} ev/s) | ratio {:.2}",
        rate(n, raw_publish),
        rate(n, e2e),
        rate(n, published),
        raw_publish.as_secs_f64() / e2e.as_secs_f64()
    );
    println!(
        "postgres raw COPY, same rows     {:>9.0} ev/s | publish→usage_hourly {:>9.0} ev/s                           | ratio {:.2}",
        rate(n, raw_copy),
        rate(n, e2e),
        raw_copy.as_secs_f64() / e2e.as_secs_f64()
    );
    println!(
        "rebuild  raw ordered consumer    {:>9.0} ev/s | replay --rebuild     {:>9.0} ev/s | ratio {:.2}",
        rate(n, raw_consume),
        rate(n, rebuilt),
        raw_consume.as_secs_f64() / rebuilt.as_secs_f64()
    );
    println!(
        "         10,000,000 events would rebuild in {:.0} s at this rate",
        10_000_000.0 / rate(n, rebuilt)
    );
    for spec in raw_catalog.specs() {
        raw_log.delete_stream(&spec.name).await.unwrap();
    }
    env.drop().await;
}
