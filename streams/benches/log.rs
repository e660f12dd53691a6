//! Log benchmark: the project's append and replay next to raw async-nats on the same server,
//! the same payloads, in the same run. `cargo bench -p creto-streams --bench log`
//! (BENCH_EVENTS sets the count; default 200,000 messages of 200 bytes). The embedded (sled)
//! adapter is measured the same way next to raw sled.
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, consumer::pull, context::PublishAckFuture, message::PublishMessage,
};
use bytes::Bytes;
use creto_streams::embedded::SledLog;
use creto_streams::jetstream::JetStreamLog;
use creto_streams::{AppendEvent, Catalog, EventLog, Headers, ReplayFrom, METERING};
use futures::StreamExt;

const CHUNK: usize = 5_000;

fn payload(i: usize) -> Bytes {
    let mut s = format!("{{\"specversion\":\"1.0\",\"id\":\"{i}\",\"type\":\"agent.execution\",\"data\":{{\"quantity\":1}}");
    s.push_str(&" ".repeat(200 - s.len().min(199) - 1));
    s.push('}');
    Bytes::from(s)
}

/// `EventLog::append_batch` of every payload, in chunks, to 100 subjects.
async fn append_all(log: &dyn EventLog, catalog: &Catalog, payloads: &[Bytes]) -> Duration {
    let started = Instant::now();
    for (c, chunk) in payloads.chunks(CHUNK).enumerate() {
        let batch = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| AppendEvent {
                subject: catalog.subject(&format!("metering.events.sub_{}", i % 100)),
                id: format!("evt-{}", c * CHUNK + i),
                expected_subject_sequence: None,
                headers: Headers::new(),
                payload: p.clone(),
            })
            .collect();
        for r in log.append_batch(batch).await {
            r.unwrap();
        }
    }
    started.elapsed()
}

/// `EventLog::replay` of the whole metering stream.
async fn replay_all(log: &dyn EventLog, catalog: &Catalog, n: usize) -> Duration {
    let started = Instant::now();
    let mut events = log
        .replay(&catalog.stream(METERING), ReplayFrom::Start, None, None)
        .await
        .unwrap();
    let mut count = 0;
    while let Some(e) = events.next().await {
        std::hint::black_box(&e.unwrap().payload);
        count += 1;
    }
    assert_eq!(count, n);
    started.elapsed()
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
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let payloads: Vec<Bytes> = (0..n).map(payload).collect();

    // Raw: async-nats JetStream publish, pipelined in the same chunks.
    let raw_catalog = Catalog::namespaced("benchraw");
    let project_catalog = Catalog::namespaced("benchlog");
    let client = async_nats::connect(&url).await.expect("NATS reachable");
    let setup = JetStreamLog::from_client(client.clone(), raw_catalog.clone())
        .await
        .unwrap();
    for c in [&raw_catalog, &project_catalog] {
        for spec in c.specs() {
            setup.delete_stream(&spec.name).await.unwrap();
        }
        setup.ensure_streams(&c.specs()).await.unwrap();
    }
    let raw = jetstream::ContextBuilder::new()
        .max_ack_inflight(16_384)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let started = Instant::now();
    for (c, chunk) in payloads.chunks(CHUNK).enumerate() {
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(CHUNK);
        for (i, p) in chunk.iter().enumerate() {
            let id = format!("raw-{}", c * CHUNK + i);
            let subject = format!("benchraw.metering.events.sub_{}", i % 100);
            acks.push(
                raw.send_publish(
                    subject,
                    PublishMessage::build().payload(p.clone()).message_id(id),
                )
                .await
                .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let raw_append = started.elapsed();

    let log = JetStreamLog::from_client(client.clone(), project_catalog.clone())
        .await
        .unwrap();
    let project_append = append_all(&log, &project_catalog, &payloads).await;

    // Raw replay: an ordered pull consumer over the raw stream.
    let started = Instant::now();
    let stream = raw.get_stream(raw_catalog.stream(METERING)).await.unwrap();
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut count = 0;
    while count < n {
        let m = messages.next().await.unwrap().unwrap();
        std::hint::black_box(&m.payload);
        count += 1;
    }
    let raw_replay = started.elapsed();
    drop(messages);
    let project_replay = replay_all(&log, &project_catalog, n).await;

    // The embedded adapter next to raw sled (one batch and one flush per chunk, then a scan).
    let dir = tempfile::tempdir().unwrap();
    let raw_db = sled::open(dir.path().join("raw")).unwrap();
    let started = Instant::now();
    for (c, chunk) in payloads.chunks(CHUNK).enumerate() {
        let mut batch = sled::Batch::default();
        for (i, p) in chunk.iter().enumerate() {
            batch.insert(&((c * CHUNK + i) as u64).to_be_bytes(), p.as_ref());
        }
        raw_db.apply_batch(batch).unwrap();
        raw_db.flush_async().await.unwrap();
    }
    let sled_append = started.elapsed();
    let started = Instant::now();
    let mut scanned = 0;
    for kv in raw_db.iter() {
        std::hint::black_box(kv.unwrap().1.len());
        scanned += 1;
    }
    assert_eq!(scanned, n);
    let sled_replay = started.elapsed();
    let embedded = SledLog::open(&dir.path().join("log"), project_catalog.clone()).unwrap();
    embedded
        .ensure_streams(&project_catalog.specs())
        .await
        .unwrap();
    let embedded_append = append_all(&embedded, &project_catalog, &payloads).await;
    let embedded_replay = replay_all(&embedded, &project_catalog, n).await;

    println!("log benchmark: {n} messages of 200 bytes, nats-server at {url}");
    println!(
        "append  raw JetStream publish {:>10.0} msg/s | EventLog::append_batch {:>10.0} msg/s | ratio {:.2}",
        rate(n, raw_append),
        rate(n, project_append),
        raw_append.as_secs_f64() / project_append.as_secs_f64()
    );
    println!(
        "replay  raw pull consumer     {:>10.0} msg/s | EventLog::replay       {:>10.0} msg/s | ratio {:.2}",
        rate(n, raw_replay),
        rate(n, project_replay),
        raw_replay.as_secs_f64() / project_replay.as_secs_f64()
    );
    println!(
        "embedded append  raw sled batch+flush {:>10.0} msg/s | SledLog::append_batch {:>10.0} msg/s | ratio {:.2}",
        rate(n, sled_append),
        rate(n, embedded_append),
        sled_append.as_secs_f64() / embedded_append.as_secs_f64()
    );
    println!(
        "embedded replay  raw sled scan        {:>10.0} msg/s | SledLog::replay       {:>10.0} msg/s | ratio {:.2}",
        rate(n, sled_replay),
        rate(n, embedded_replay),
        sled_replay.as_secs_f64() / embedded_replay.as_secs_f64()
    );
    for c in [&raw_catalog, &project_catalog] {
        for spec in c.specs() {
            setup.delete_stream(&spec.name).await.unwrap();
        }
    }
}
