//! Audit export rate: N metering events (≈ 200 B CloudEvents) exported from JetStream to S3 as
//! gzip NDJSON objects with hash-chained manifests, next to the raw engines in the same run:
//! a raw ordered read of the stream, and raw S3 puts of the same number of objects of the
//! same compressed size. Also a full restore into an empty stream.
//! `cargo bench -p creto-replay-tests --bench audit_export` (BENCH_EVENTS, default 200,000;
//! S3 at S3_ENDPOINT, default the moto server `.ci/services.sh` starts on 127.0.0.1:5000).
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use creto_projections::archive::Archive;
use creto_projections::audit::{self, AuditExporter, ExportConfig, RestoreOptions};
use creto_replay_tests::{cloud_event, Env};
use creto_streams::{AppendEvent, Headers, ReplayFrom, METERING};
use futures::StreamExt;

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let env = Env::new().await;
    let log = env.platform.log.clone();
    let stream = env.platform.catalog.stream(METERING);
    let now = Utc::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let batch = chunk
            .iter()
            .map(|&i| AppendEvent {
                subject: env.subject(&format!("metering.events.sub_{}", i % 1_000)),
                id: format!("evt-{i}"),
                expected_subject_sequence: None,
                headers: Headers::new(),
                payload: Bytes::from(cloud_event(
                    &format!("evt-{i}"),
                    &format!("sub_{}", i % 1_000),
                    "agent.execution",
                    now,
                    serde_json::json!({"quantity": (i % 100) as f64, "model": "m"}),
                )),
            })
            .collect();
        for r in log.append_batch(batch).await {
            r.unwrap();
        }
    }
    let archive: Arc<dyn Archive> =
        Arc::new(creto_replay_tests::test_archive("enablement-bench").await);

    // Raw read of the stream (the exporter's input).
    let started = Instant::now();
    let mut events = log
        .replay(&stream, ReplayFrom::Start, None, None)
        .await
        .unwrap();
    let mut read = 0u64;
    while let Some(e) = events.next().await {
        std::hint::black_box(e.unwrap().payload.len());
        read += 1;
    }
    let raw_read = started.elapsed();

    // The exporter, once through the stream.
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let stats = AuditExporter::new(
        log.clone(),
        archive.clone(),
        &stream,
        ExportConfig::default(),
    )
    .run(true, rx)
    .await
    .unwrap();
    let exported = started.elapsed();
    assert_eq!(stats.events as usize, n);

    // Raw S3: the same number of objects of the same size, put one after the other.
    let object_size = (stats.compressed_bytes / stats.objects.max(1)) as usize;
    let body = Bytes::from(vec![7u8; object_size]);
    let started = Instant::now();
    for i in 0..stats.objects {
        archive
            .put(
                &format!("bench-raw/{i}"),
                body.clone(),
                "application/octet-stream",
            )
            .await
            .unwrap();
    }
    let raw_put = started.elapsed();

    // Restore into the emptied stream.
    log.delete_stream(&stream).await.unwrap();
    log.ensure_streams(&env.platform.catalog.specs())
        .await
        .unwrap();
    let started = Instant::now();
    let report = audit::restore(&*archive, &stream, &*log, RestoreOptions::default(), |_| {})
        .await
        .unwrap();
    let restored = started.elapsed();
    assert_eq!(report.events as usize, n);

    println!(
        "audit export: {n} events, {} objects, {:.1} MB compressed",
        stats.objects,
        stats.compressed_bytes as f64 / 1e6
    );
    println!(
        "export   raw stream read {:>9.0} ev/s | raw S3 puts of the objects {:>7.2} s | exporter {:>9.0} ev/s ({:.2} s) | ratio to read+put {:.2}",
        rate(read, raw_read),
        raw_put.as_secs_f64(),
        rate(stats.events, exported),
        exported.as_secs_f64(),
        (raw_read + raw_put).as_secs_f64() / exported.as_secs_f64()
    );
    println!(
        "restore  {:>9.0} ev/s ({:.2} s); 10,000,000 events would restore in {:.0} s",
        rate(report.events, restored),
        restored.as_secs_f64(),
        10_000_000.0 / rate(report.events, restored)
    );
    for o in archive.list("").await.unwrap() {
        archive.delete(&o.key).await.unwrap();
    }
    env.drop().await;
}
