//! Metering on the embedded default (`enablement dev`'s adapters): N events ingested over gRPC
//! (IngestEvents, 1,000 per call, 4 callers), timed until the last one is in the read model;
//! then a replay of the whole stream into a fresh read model by the embedded projector. Next
//! to each, in the same run, raw sled: the same payloads written in batches of 1,000 with a
//! flush each, and a scan of them.
//! `cargo bench -p creto-replay-tests --bench metering_embedded` (BENCH_EVENTS, default 200,000).
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Duration as Ch, Utc};
use creto_projections::metering::embedded::{SledProjector, SledReadModel};
use creto_projections::metering::read_model::wait_for;
use creto_projections::runner::{self, Leadership, RunnerConfig};
use creto_replay_tests::Env;
use creto_schemas::metering::v1 as pb;
use prost::Message;

const TYPES: [&str; 5] = [
    "agent.execution",
    "llm.tokens",
    "tool.call",
    "sandbox.seconds",
    "message.sent",
];

fn event(i: usize) -> pb::UsageEvent {
    let k = (i as u64).wrapping_mul(2_654_435_761);
    let number = |n: f64| prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(n)),
    };
    let text = |s: String| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s)),
    };
    pb::UsageEvent {
        id: format!("evt-{i}"),
        source: "bench".into(),
        r#type: TYPES[(k % 5) as usize].into(),
        subject: format!("sub_{:05}", k % 10_000),
        time: Some(creto_streams::envelope::timestamp(
            Utc::now() - Ch::seconds((k % 86_400) as i64),
        )),
        data: Some(prost_types::Struct {
            fields: [
                ("quantity".to_string(), number((k % 100) as f64 + 1.0)),
                ("model".to_string(), text(format!("model-{}", k % 7))),
                (
                    "region".to_string(),
                    text(["eu", "us", "ap"][(k % 3) as usize].into()),
                ),
            ]
            .into(),
        }),
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let batches: Vec<Vec<pb::UsageEvent>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(1_000)
        .map(|c| c.iter().map(|&i| event(i)).collect())
        .collect();

    // Raw sled: the encoded events, one batch and one flush per 1,000, then a scan.
    let raw_dir = tempfile::tempdir().unwrap();
    let raw = sled::open(raw_dir.path()).unwrap();
    let started = Instant::now();
    let mut seq = 0u64;
    for b in &batches {
        let mut batch = sled::Batch::default();
        for e in b {
            seq += 1;
            batch.insert(&seq.to_be_bytes(), e.encode_to_vec());
        }
        raw.apply_batch(batch).unwrap();
        raw.flush_async().await.unwrap();
    }
    let raw_write = started.elapsed();
    let started = Instant::now();
    let mut scanned = 0;
    for kv in raw.iter() {
        std::hint::black_box(kv.unwrap().1.len());
        scanned += 1;
    }
    assert_eq!(scanned, n);
    let raw_scan = started.elapsed();

    // Ingest over gRPC until the last event is in the read model.
    let env = Env::embedded().await;
    let (running, client) = env.start_metering(true).await;
    let started = Instant::now();
    let per_caller = batches.len().div_ceil(4);
    let callers: Vec<_> = batches
        .chunks(per_caller)
        .map(|mine| {
            let mine = mine.to_vec();
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut last = 0;
                for events in mine {
                    let r = client
                        .ingest_events(pb::IngestEventsRequest { events })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.accepted, 1_000.min(r.results.len() as u32));
                    last = last.max(r.sequence);
                }
                last
            })
        })
        .collect();
    let mut last = 0;
    for c in callers {
        last = last.max(c.await.unwrap());
    }
    let accepted = started.elapsed();
    let at = wait_for(&*env.platform.metering, last, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(at, last);
    let ingested = started.elapsed();
    running.stop().await;

    // Replay: the whole stream into a fresh read model.
    let replay_dir = tempfile::tempdir().unwrap();
    let fresh = Arc::new(SledReadModel::open(replay_dir.path()).unwrap());
    let projector = SledProjector::new(
        fresh.clone(),
        env.platform.log.clone(),
        env.platform.catalog.clone(),
        env.settings.limits,
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(runner::run(
        env.platform.log.clone(),
        Leadership::Process,
        Arc::new(projector),
        RunnerConfig::default(),
        stop_rx,
    ));
    let at = wait_for(&*fresh, last, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(at, last);
    let replayed = started.elapsed();
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    println!("metering on the embedded default: {n} events over gRPC, 1,000 per call, 4 callers");
    println!(
        "ingest  raw sled batch+flush {:>9.0} ev/s | gRPC → read model {:>9.0} ev/s (accepted alone {:>9.0} ev/s) | ratio {:.2}",
        rate(n, raw_write),
        rate(n, ingested),
        rate(n, accepted),
        raw_write.as_secs_f64() / ingested.as_secs_f64()
    );
    println!(
        "replay  raw sled scan        {:>9.0} ev/s | stream → fresh read model {:>9.0} ev/s | ratio {:.2}",
        rate(n, raw_scan),
        rate(n, replayed),
        raw_scan.as_secs_f64() / replayed.as_secs_f64()
    );
    env.drop().await;
}
