//! Audit exports of the streams to the archive: exported exactly once across crashes and past
//! events removed from a stream,
//! verified (deleted, altered, re-forged and swapped objects and manifests are reported), and
//! restored into empty streams for a disaster-recovery drill whose rebuilt read models equal
//! the originals. S3 is the local moto server (`.ci/services.sh`), bucket `enablement-test`.
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use creto_projections::archive::{Archive, ArchiveError, ArchivedObject, LocalDirArchive};
use creto_projections::audit::{
    self, manifest_key, object_key, AuditExporter, ExportConfig, Manifest, RestoreOptions,
};
use creto_projections::metering::MeteringProjector;
use creto_projections::rebuild;
use creto_projections::runner::{self, RunnerConfig};
use creto_replay_tests::{cloud_event, drills, metering_checksums, Env};
use creto_streams::{AppendEvent, Headers, DEADLETTERS, METERING, OVERSIGHT, RUNTIME};

async fn s3() -> Arc<dyn Archive> {
    Arc::new(creto_replay_tests::test_archive("enablement-test").await)
}

async fn clean(archive: &dyn Archive, stream: &str) {
    for o in archive.list(&audit::stream_prefix(stream)).await.unwrap() {
        archive.delete(&o.key).await.unwrap();
    }
}

/// Appends `n` usage events (every 10th reuses an earlier id, every 50th has a negative
/// quantity); returns the last sequence.
async fn append_usage(env: &Env, n: usize, offset: usize) -> u64 {
    let now = Utc::now();
    let mut last = 0;
    for chunk in (offset..offset + n).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|&i| {
                let sub = format!("sub_{}", i % 13);
                let id = if i % 10 == 9 {
                    format!("e{}", i - 5)
                } else {
                    format!("e{i}")
                };
                let quantity = if i % 50 == 49 { -1.0 } else { (i % 97) as f64 };
                let payload = cloud_event(
                    &id,
                    &sub,
                    ["agent.execution", "llm.tokens"][i % 2],
                    now - chrono::Duration::minutes((i % 600) as i64),
                    serde_json::json!({"quantity": quantity, "model": format!("m{}", i % 3)}),
                );
                AppendEvent {
                    subject: env.subject(&format!("metering.events.{sub}")),
                    // Distinct log ids: the duplicates are the projector's business here.
                    id: format!("msg-{i}"),
                    expected_subject_sequence: None,
                    headers: Headers::new()
                        .with("Content-Type", "application/cloudevents+json")
                        .with("X-Multi", "a"),
                    payload: Bytes::from(payload),
                }
            })
            .collect();
        for r in env.platform.log.append_batch(batch).await {
            last = last.max(r.unwrap().sequence());
        }
    }
    last
}

fn small_objects() -> ExportConfig {
    ExportConfig {
        max_events: 500,
        fetch_batch: 200,
        ..ExportConfig::default()
    }
}

async fn export_once(env: &Env, archive: &Arc<dyn Archive>, stream: &str, config: ExportConfig) {
    let (_stop, rx) = tokio::sync::watch::channel(false);
    AuditExporter::new(env.platform.log.clone(), archive.clone(), stream, config)
        .run(true, rx)
        .await
        .unwrap();
}

fn has(report: &audit::VerifyReport, needle: &str) -> bool {
    report.problems.iter().any(|p| p.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_verify_and_tampering_is_reported() {
    let env = Env::new().await;
    let archive = s3().await;
    let stream = env.platform.catalog.stream(METERING);
    let last = append_usage(&env, 3_000, 0).await;
    assert_eq!(last, 3_000);
    export_once(&env, &archive, &stream, small_objects()).await;

    let report = audit::verify(&*archive, &stream, Some(&*env.platform.log))
        .await
        .unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(
        (report.objects, report.events, report.unarchived),
        (6, 3_000, 0)
    );
    // The archive holds exactly the log, event for event.
    let archived = audit::archived_events(&*archive, &stream).await.unwrap();
    let logged = audit::log_events(&*env.platform.log, &stream)
        .await
        .unwrap();
    assert_eq!(archived, logged);
    assert_eq!(archived[0].id.as_deref(), Some("msg-0"));
    assert!(archived[0]
        .payload_text
        .as_deref()
        .unwrap()
        .contains("\"e0\""));

    // A second export adds nothing.
    export_once(&env, &archive, &stream, small_objects()).await;
    assert_eq!(
        archive
            .list(&audit::stream_prefix(&stream))
            .await
            .unwrap()
            .len(),
        12
    );

    let check = || async {
        audit::verify(&*archive, &stream, Some(&*env.platform.log))
            .await
            .unwrap()
    };
    let put = |key: String, body: Bytes| {
        let archive = archive.clone();
        async move {
            archive
                .put(&key, body, "application/octet-stream")
                .await
                .unwrap()
        }
    };
    let get = |key: String| {
        let archive = archive.clone();
        async move { archive.get(&key).await.unwrap().unwrap() }
    };

    // 1. A deleted object.
    let key = object_key(&stream, 501, 1000);
    let saved = get(key.clone()).await;
    archive.delete(&key).await.unwrap();
    let r = check().await;
    assert!(has(&r, "object 501-1000 missing"), "{r}");
    put(key, saved).await;
    assert!(check().await.ok());

    // 2. One byte altered.
    let key = object_key(&stream, 1001, 1500);
    let saved = get(key.clone()).await;
    let mut altered = saved.to_vec();
    let at = altered.len() / 2;
    altered[at] ^= 0x01;
    put(key.clone(), altered.into()).await;
    let r = check().await;
    assert!(has(&r, "object 1001-1500 sha256 mismatch (altered)"), "{r}");
    put(key, saved).await;
    assert!(check().await.ok());

    // 3. A re-forged object: an event changed, the object re-compressed and its manifest
    //    rewritten with the new hash. Only the chain gives it away.
    let key = object_key(&stream, 1501, 2000);
    let mkey = manifest_key(&stream, 1501, 2000);
    let (saved, saved_manifest) = (get(key.clone()).await, get(mkey.clone()).await);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&saved[..]), &mut text)
        .unwrap();
    let forged_text = text.replacen("\"quantity\\\":", "\"quantity\\\":1", 1);
    assert_ne!(forged_text, text);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, forged_text.as_bytes()).unwrap();
    let forged = Bytes::from(gz.finish().unwrap());
    let mut manifest: Manifest = serde_json::from_slice(&saved_manifest).unwrap();
    manifest.object_sha256 = audit::sha256_hex(&forged);
    manifest.object_bytes = forged.len() as u64;
    put(key.clone(), forged).await;
    put(
        mkey.clone(),
        serde_json::to_vec_pretty(&manifest).unwrap().into(),
    )
    .await;
    let r = check().await;
    assert!(
        has(
            &r,
            "manifest 2001-2500 chain broken: previous hash does not match manifest 1501-2000"
        ),
        "{r}"
    );
    assert_eq!(r.problems.len(), 1, "{r}");
    put(key, saved).await;
    put(mkey, saved_manifest).await;
    assert!(check().await.ok());

    // 4. Two manifests swapped.
    let (a, b) = (
        manifest_key(&stream, 1, 500),
        manifest_key(&stream, 501, 1000),
    );
    let (ma, mb) = (get(a.clone()).await, get(b.clone()).await);
    put(a.clone(), mb.clone()).await;
    put(b.clone(), ma.clone()).await;
    let r = check().await;
    assert!(has(&r, "manifest 1-500 describes"), "{r}");
    assert!(has(&r, "chain broken"), "{r}");
    put(a, ma).await;
    put(b, mb).await;
    assert!(check().await.ok());

    // 5. An object and its manifest removed together: a gap.
    let (key, mkey) = (
        object_key(&stream, 2001, 2500),
        manifest_key(&stream, 2001, 2500),
    );
    let (saved, saved_manifest) = (get(key.clone()).await, get(mkey.clone()).await);
    archive.delete(&key).await.unwrap();
    archive.delete(&mkey).await.unwrap();
    let r = check().await;
    assert!(has(&r, "gap between 2000 and 2501"), "{r}");
    // A broken archive is not restored into anything.
    let err = audit::restore(
        &*archive,
        &stream,
        &*env.platform.log,
        RestoreOptions::default(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    put(key, saved).await;
    put(mkey, saved_manifest).await;
    assert!(check().await.ok());

    clean(&*archive, &stream).await;
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_exporter_resumes_without_gaps_or_duplicates() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let archive: Arc<dyn Archive> = Arc::new(LocalDirArchive::new(dir.path().to_path_buf()));
    let stream = env.platform.catalog.stream(METERING);
    let config = ExportConfig {
        max_events: 150,
        fetch_batch: 40,
        ..ExportConfig::default()
    };
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut total = append_usage(&env, 2_000, 0).await;
    let exporter =
        || AuditExporter::new(env.platform.log.clone(), archive.clone(), &stream, config);
    for round in 0..8u64 {
        let running = exporter();
        let task = tokio::spawn({
            let rx = stop_rx.clone();
            async move { running.run(false, rx).await }
        });
        tokio::time::sleep(Duration::from_millis(40 + 37 * round)).await;
        task.abort(); // wherever it is: between the object and its manifest included
        let _ = task.await;
        if round == 3 {
            total = append_usage(&env, 700, 2_000).await;
        }
        if round == 5 {
            // What a crash between the two puts leaves: an object past the chain, no manifest.
            let tail = exporter().recover().await.unwrap();
            let orphan = object_key(&stream, tail.last_sequence + 1, tail.last_sequence + 77);
            archive
                .put(&orphan, Bytes::from_static(b"half"), "application/gzip")
                .await
                .unwrap();
        }
        if round == 6 {
            // What an earlier exporter's late manifest write leaves when it lands after a
            // recovery deleted its object as an orphan: the last manifest without its object.
            let tail = exporter().recover().await.unwrap();
            let suffix = format!("-{:020}.ndjson.gz", tail.last_sequence);
            let listed = archive.list(&audit::stream_prefix(&stream)).await.unwrap();
            let object = listed
                .iter()
                .find(|o| o.key.ends_with(&suffix))
                .expect("the last manifest's object");
            archive.delete(&object.key).await.unwrap();
        }
    }
    export_once(&env, &archive, &stream, config).await;
    let report = audit::verify(&*archive, &stream, Some(&*env.platform.log))
        .await
        .unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.unarchived, 0);
    let sequences: Vec<u64> = audit::archived_events(&*archive, &stream)
        .await
        .unwrap()
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(
        sequences,
        (1..=total).collect::<Vec<_>>(),
        "each sequence exactly once"
    );
    println!(
        "{} objects for {total} events after 8 crashes",
        report.objects
    );

    // A quiet stream's last events are written within max_age (the RPO).
    let exporter = AuditExporter::new(
        env.platform.log.clone(),
        archive.clone(),
        &stream,
        ExportConfig {
            max_age: Duration::from_millis(300),
            ..ExportConfig::default()
        },
    );
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { exporter.run(false, rx).await });
    let last = append_usage(&env, 5, 3_000).await;
    let started = Instant::now();
    loop {
        let r = audit::verify(&*archive, &stream, None).await.unwrap();
        if r.last_sequence == Some(last) {
            assert!(r.ok(), "{r}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not flushed by age: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_drill_restore_from_the_archive_rebuilds_equal_read_models() {
    let env = Env::new().await;
    let archive = s3().await;
    let catalog = env.platform.catalog.clone();
    let log = env.platform.log.clone();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // The other products (oversight requests, runtime sandboxes, a quota), projected, before
    // metering's own events, which then end the stream.
    drills::oversight_and_runtime_activity(&env).await;
    let others = drills::checksums_of_activity(&env).await;

    // Live: events in, projected (with dead letters for the invalid ones).
    append_usage(&env, 4_000, 0).await;
    // A producer's event 30 days late (refused live, `time_too_old`) carrying the restore's
    // original-time header: the log ignores it live, and the restore must not honour it.
    let forged_time = Utc::now() - chrono::Duration::days(30);
    let last = log
        .append(AppendEvent {
            subject: catalog.subject("metering.events.sub_forger"),
            id: "forged-late".into(),
            expected_subject_sequence: None,
            headers: Headers::new().with(
                creto_streams::headers::names::ORIGINAL_RECORDED_AT,
                forged_time.to_rfc3339(),
            ),
            payload: cloud_event(
                "forged-late",
                "sub_forger",
                "agent.execution",
                forged_time,
                serde_json::json!({"quantity": 5}),
            )
            .into(),
        })
        .await
        .unwrap()
        .sequence();
    let projector = Arc::new(MeteringProjector::new(
        env.pool().clone(),
        log.clone(),
        catalog.clone(),
        env.settings.limits,
    ));
    let task = tokio::spawn(runner::run(
        log.clone(),
        runner::Leadership::Postgres(env.pool().clone()),
        projector,
        RunnerConfig::default(),
        stop_rx.clone(),
    ));
    env.wait_applied(last).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let before = metering_checksums(env.pool()).await;
    let originals = audit::log_events(&*log, &catalog.stream(METERING))
        .await
        .unwrap();

    // Continuous export, stopped (it flushes what it holds on the way out).
    let streams: Vec<String> = [METERING, DEADLETTERS, OVERSIGHT, RUNTIME]
        .iter()
        .map(|s| catalog.stream(s))
        .collect();
    let (stop_export, export_rx) = tokio::sync::watch::channel(false);
    let exporters: Vec<_> = streams
        .iter()
        .map(|s| {
            let exporter =
                AuditExporter::new(log.clone(), archive.clone(), s, ExportConfig::default());
            let rx = export_rx.clone();
            tokio::spawn(async move { exporter.run(false, rx).await })
        })
        .collect();
    for s in &streams {
        let wanted = log.stream_state(s).await.unwrap().last_sequence;
        let started = Instant::now();
        while audit::verify(&*archive, s, None)
            .await
            .unwrap()
            .last_sequence
            != Some(wanted)
        {
            if started.elapsed() > Duration::from_secs(5) {
                // Not yet due by size or age: the stop flushes it.
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stop_export.send(true).unwrap();
    for e in exporters {
        e.await.unwrap().unwrap();
    }
    let dead_letters = log.stream_state(&streams[1]).await.unwrap().messages;
    assert!(dead_letters > 50, "{dead_letters}");
    for s in &streams {
        let r = audit::verify(&*archive, s, Some(&*log)).await.unwrap();
        assert!(r.ok() && r.unarchived == 0, "{r}");
    }

    // Disaster: the streams are gone.
    for spec in catalog.specs() {
        log.delete_stream(&spec.name).await.unwrap();
    }
    log.ensure_streams(&catalog.specs()).await.unwrap();

    // Recovery: restore the streams, rebuild the read models by replay.
    let started = Instant::now();
    let mut restored = 0;
    for s in &streams {
        let report = audit::restore(&*archive, s, &*log, RestoreOptions::default(), |_| {})
            .await
            .unwrap();
        assert!(report.sequences_preserved, "{s}");
        restored += report.events;
    }
    let restore_time = started.elapsed();
    // Restoring twice is refused.
    let err = audit::restore(
        &*archive,
        &streams[0],
        &*log,
        RestoreOptions::default(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");

    let rebuilding = rebuild::prepare_metering(
        env.pool(),
        log.clone(),
        catalog.clone(),
        env.settings.limits,
        true,
    )
    .await
    .unwrap();
    rebuild::catch_up(&log, &rebuilding, None, 5_000, |_| {})
        .await
        .unwrap();
    let switched = rebuild::switch_over(env.pool(), &log, &rebuilding)
        .await
        .unwrap();
    drills::wipe(&env).await;
    drills::rebuild(&env).await;
    let total = started.elapsed();
    // The restore marker follows the restored events.
    assert_eq!(switched, last + 1);
    assert_eq!(
        metering_checksums(env.pool()).await,
        before,
        "read models rebuilt from the restored streams differ"
    );
    assert_eq!(
        drills::checksums(&env).await,
        others,
        "oversight, runtime or quota tables rebuilt from the restored streams differ"
    );
    // Same events at the same sequences with the same recorded times.
    let after = audit::log_events(&*log, &catalog.stream(METERING))
        .await
        .unwrap();
    assert_eq!(
        after.len(),
        originals.len() + 1,
        "the originals and the restore marker"
    );
    // A producer cannot backdate: the original-time header counts only up to the marker.
    let forged = log
        .append(creto_streams::AppendEvent {
            subject: catalog.subject("metering.events.sub_forger"),
            id: "forged".into(),
            expected_subject_sequence: None,
            headers: creto_streams::Headers::new().with(
                creto_streams::headers::names::ORIGINAL_RECORDED_AT,
                "2001-01-01T00:00:00Z",
            ),
            payload: "{}".into(),
        })
        .await
        .unwrap();
    let stored = log
        .get(&catalog.stream(METERING), forged.sequence())
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.recorded_at > chrono::Utc::now() - chrono::Duration::minutes(5),
        "a producer's original-time header was honoured: {}",
        stored.recorded_at
    );
    for (a, o) in after.iter().zip(&originals) {
        assert_eq!(
            (a.sequence, &a.subject, &a.payload, &a.recorded_at, &a.id),
            (o.sequence, &o.subject, &o.payload, &o.recorded_at, &o.id)
        );
        for (name, values) in &o.headers {
            // JetStream keeps a publish's expectations (Nats-Expected-*) with the message: they
            // applied to the original append, not to the restore, which does not repeat them.
            if name != creto_streams::headers::names::ORIGINAL_RECORDED_AT
                && !name.starts_with("Nats-Expected-")
            {
                assert_eq!(a.headers.get(name), Some(values), "{name}");
            }
        }
    }
    println!(
        "DR drill: {restored} events restored in {:.2} s ({:.0} events/s); read models rebuilt, recovery {:.2} s in all",
        restore_time.as_secs_f64(),
        restored as f64 / restore_time.as_secs_f64(),
        total.as_secs_f64()
    );
    for s in &streams {
        clean(&*archive, s).await;
    }
    env.drop().await;
}

/// The same on the embedded adapters (`enablement dev`): sled log, local-directory archive. A
/// broken archive is refused until it is repaired (or forced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_export_and_restore_round_trip() {
    let env = Env::embedded().await;
    let archive = env.platform.archive.clone().expect("dev has an archive");
    let log = env.platform.log.clone();
    let stream = env.platform.catalog.stream(METERING);
    let last = append_usage(&env, 1_200, 0).await;
    export_once(&env, &archive, &stream, small_objects()).await;
    let report = audit::verify(&*archive, &stream, Some(&*log))
        .await
        .unwrap();
    assert!(report.ok() && report.unarchived == 0, "{report}");
    let originals = audit::log_events(&*log, &stream).await.unwrap();

    env.recreate_stream(&stream).await;
    let key = object_key(&stream, 501, 1000);
    let saved = archive.get(&key).await.unwrap().unwrap();
    archive.delete(&key).await.unwrap();
    let err = audit::restore(&*archive, &stream, &*log, RestoreOptions::default(), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    assert!(err.to_string().contains("object 501-1000 missing"), "{err}");
    assert_eq!(log.stream_state(&stream).await.unwrap().messages, 0);
    archive
        .put(&key, saved.clone(), "application/gzip")
        .await
        .unwrap();

    let report = audit::restore(&*archive, &stream, &*log, RestoreOptions::default(), |_| {})
        .await
        .unwrap();
    assert_eq!((report.events, report.last_sequence), (1_200, last));
    assert!(report.sequences_preserved);
    let mut restored = audit::log_events(&*log, &stream).await.unwrap();
    // The restore marker follows the restored events; the originals come back unchanged.
    let marker = restored.pop().unwrap();
    assert_eq!(
        (marker.subject.as_str(), marker.sequence),
        ("metering._restored", last + 1)
    );
    assert_eq!(restored.len(), originals.len());
    for (a, o) in restored.iter().zip(&originals) {
        assert_eq!(
            (a.sequence, &a.subject, &a.payload, &a.recorded_at),
            (o.sequence, &o.subject, &o.payload, &o.recorded_at)
        );
    }

    // An object that no longer reads, forced: the rest is restored, at new sequences after
    // the hole, and the report says so (it used to stop there, leaving a stream it would not
    // restore into again).
    env.recreate_stream(&stream).await;
    archive
        .put(&key, Bytes::from_static(b"not gzip"), "application/gzip")
        .await
        .unwrap();
    let forced = RestoreOptions { force: true };
    let report = audit::restore(&*archive, &stream, &*log, forced, |_| {})
        .await
        .unwrap();
    assert_eq!(report.events, 1_200 - 500);
    assert!(!report.sequences_preserved);
    assert_eq!(report.unvouched, ["501-1000"]);

    // An object altered but readable (an event changed, re-compressed; its manifest left):
    // the verify reports it, and a forced restore must not make it history (it did).
    env.recreate_stream(&stream).await;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&saved[..]), &mut text)
        .unwrap();
    let forged_text = text.replacen("\"quantity\\\":", "\"quantity\\\":1", 1);
    assert_ne!(forged_text, text);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, forged_text.as_bytes()).unwrap();
    archive
        .put(&key, Bytes::from(gz.finish().unwrap()), "application/gzip")
        .await
        .unwrap();
    let report = audit::restore(&*archive, &stream, &*log, forced, |_| {})
        .await
        .unwrap();
    assert_eq!(report.events, 1_200 - 500);
    assert_eq!(report.unvouched, ["501-1000"]);
    env.drop().await;
}

/// METERING with 100 usage events, the 40th removed (`nats stream rmm`): 99 left.
async fn stream_with_a_hole(env: &Env) -> String {
    let stream = env.platform.catalog.stream(METERING);
    assert_eq!(append_usage(env, 100, 0).await, 100);
    creto_replay_tests::remove_message(&stream, 40).await;
    let left = env
        .platform
        .log
        .stream_state(&stream)
        .await
        .unwrap()
        .messages;
    assert_eq!(left, 99);
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_removed_from_the_stream_neither_stops_the_exporter_nor_hides() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let archive: Arc<dyn Archive> = Arc::new(LocalDirArchive::new(dir.path().to_path_buf()));
    let stream = stream_with_a_hole(&env).await;
    // Before, the exporter took the hole for deliveries out of order and repositioned for ever.
    tokio::time::timeout(
        Duration::from_secs(30),
        export_once(&env, &archive, &stream, small_objects()),
    )
    .await
    .expect("the exporter goes on past the removed event");
    let report = audit::verify(&*archive, &stream, Some(&*env.platform.log))
        .await
        .unwrap();
    assert_eq!((report.events, report.unarchived), (99, 0), "{report}");
    assert!(has(&report, "gap between 39 and 41"), "{report}");
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_removed_from_the_stream_does_not_stop_the_projector() {
    let env = Env::new().await;
    stream_with_a_hole(&env).await;
    let projector = Arc::new(MeteringProjector::new(
        env.pool().clone(),
        env.platform.log.clone(),
        env.platform.catalog.clone(),
        Default::default(),
    ));
    // Before, the runner took the hole for deliveries out of order and repositioned for ever.
    let (stop, task) = creto_replay_tests::run_projector(&env, projector.clone());
    creto_replay_tests::wait_checkpoint(&*projector, 100).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let at = |sequence: i64| {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM metering_events WHERE stream_sequence = $1",
        )
        .bind(sequence)
        .fetch_one(env.pool())
    };
    assert_eq!((at(40).await.unwrap(), at(41).await.unwrap()), (0, 1));
    env.drop().await;
}

/// Batches commit without waiting for the WAL flush: a PostgreSQL crash can lose the last
/// ones, checkpoint included, under a runner that counts them applied. Its next batch used to
/// move the checkpoint over the lost ones for good; the runner now starts again from the read
/// model's checkpoint. (The crash is played by putting the rows and checkpoint back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_lost_by_the_database_are_applied_again() {
    let env = Env::new().await;
    assert_eq!(append_usage(&env, 100, 0).await, 100);
    let projector = Arc::new(MeteringProjector::new(
        env.pool().clone(),
        env.platform.log.clone(),
        env.platform.catalog.clone(),
        Default::default(),
    ));
    let (stop, task) = creto_replay_tests::run_projector(&env, projector.clone());
    creto_replay_tests::wait_checkpoint(&*projector, 100).await;
    let tail = || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM metering_events WHERE stream_sequence BETWEEN 61 AND 100",
        )
        .fetch_one(env.pool())
    };
    let applied = tail().await.unwrap();
    assert!(applied > 30, "{applied}");
    sqlx::Executor::execute(
        env.pool(),
        "DELETE FROM metering_events WHERE stream_sequence > 60;
         UPDATE projection_checkpoints SET last_sequence = 60 WHERE projector = 'metering';",
    )
    .await
    .unwrap();
    assert_eq!(append_usage(&env, 10, 100).await, 110);
    creto_replay_tests::wait_checkpoint(&*projector, 110).await;
    assert_eq!(tail().await.unwrap(), applied);
    stop.send(true).unwrap();
    task.await.unwrap();
    env.drop().await;
}

/// Events appended with a concurrency check (expected last subject sequence), as oversight,
/// runtime and messaging append theirs, restore past a hole: the archived check is not sent
/// again at shifted sequences (the restore used to stop at the first event after the hole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_restore_past_a_hole_replays_checked_appends() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let archive: Arc<dyn Archive> = Arc::new(LocalDirArchive::new(dir.path().to_path_buf()));
    let stream = env.platform.catalog.stream(OVERSIGHT);
    let subject = env.subject("oversight.test.default.r1");
    for expected in 0..10u64 {
        env.platform
            .log
            .append(AppendEvent {
                subject: subject.clone(),
                id: format!("step-{expected}"),
                expected_subject_sequence: Some(expected),
                headers: Headers::new(),
                payload: Bytes::from(format!("step {expected}")),
            })
            .await
            .unwrap();
    }
    creto_replay_tests::remove_message(&stream, 5).await;
    export_once(&env, &archive, &stream, small_objects()).await;

    env.recreate_stream(&stream).await;
    let forced = RestoreOptions { force: true };
    let report = audit::restore(&*archive, &stream, &*env.platform.log, forced, |_| {})
        .await
        .unwrap();
    assert_eq!(report.events, 9);
    assert!(!report.sequences_preserved);
    let restored = audit::log_events(&*env.platform.log, &stream)
        .await
        .unwrap();
    let payloads: Vec<_> = restored
        .iter()
        .filter(|e| e.subject == subject)
        .map(|e| String::from_utf8_lossy(&e.payload_bytes().unwrap()).to_string())
        .collect();
    assert_eq!(payloads.len(), 9);
    assert_eq!(payloads[5], "step 6");
    env.drop().await;
}

/// An object past the last manifest is an export cut between the object and its manifest
/// (what a crash leaves): noted, not a broken archive, and a restore goes on without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_past_the_last_manifest_is_an_export_in_progress() {
    let env = Env::embedded().await;
    let archive = env.platform.archive.clone().expect("dev has an archive");
    let log = env.platform.log.clone();
    let stream = env.platform.catalog.stream(METERING);
    let last = append_usage(&env, 600, 0).await;
    export_once(&env, &archive, &stream, small_objects()).await;
    archive
        .put(
            &object_key(&stream, last + 1, last + 50),
            Bytes::from_static(b"cut short"),
            "application/gzip",
        )
        .await
        .unwrap();
    let report = audit::verify(&*archive, &stream, None).await.unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.notes.len(), 1, "{report}");
    assert!(
        report.to_string().contains("has no manifest yet"),
        "{report}"
    );

    env.recreate_stream(&stream).await;
    let restored = audit::restore(&*archive, &stream, &*log, RestoreOptions::default(), |_| {})
        .await
        .unwrap();
    assert_eq!((restored.events, restored.last_sequence), (600, last));
    env.drop().await;
}

/// An archive that lists and reads, but refuses every write (revoked credentials, an outage).
struct RefusingPuts(Arc<dyn Archive>);

#[async_trait::async_trait]
impl Archive for RefusingPuts {
    async fn put(&self, key: &str, _: Bytes, _: &str) -> Result<(), ArchiveError> {
        Err(ArchiveError::Unavailable(format!(
            "put {key}: access denied"
        )))
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        self.0.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ArchivedObject>, ArchiveError> {
        self.0.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        self.0.delete(key).await
    }
    fn describe(&self) -> String {
        "refusing puts".into()
    }
}

/// An exporter that cannot write stops with the error (its stream is then reported down)
/// after its give-up time, instead of retrying for ever while looking healthy, and says how
/// long events have waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_that_cannot_write_stops_and_says_how_long_events_wait() {
    let env = Env::embedded().await;
    let dir = tempfile::tempdir().unwrap();
    let archive: Arc<dyn Archive> = Arc::new(RefusingPuts(Arc::new(LocalDirArchive::new(
        dir.path().to_path_buf(),
    ))));
    let stream = env.platform.catalog.stream(METERING);
    append_usage(&env, 10, 0).await;
    let config = ExportConfig {
        max_age: Duration::from_millis(100),
        put_give_up: Duration::from_secs(1),
        ..ExportConfig::default()
    };
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let exporter = AuditExporter::new(env.platform.log.clone(), archive, &stream, config);
    let err = tokio::time::timeout(Duration::from_secs(30), exporter.run(false, rx))
        .await
        .expect("the exporter gave up")
        .unwrap_err();
    assert!(err.to_string().contains("access denied"), "{err}");
    let waited = creto_projections::metrics::AUDIT_UNARCHIVED_SECONDS
        .with_label_values(&[&stream])
        .get();
    assert!(waited >= 1, "{waited}");
    env.drop().await;
}

/// A log that is not the archive's continuation (a stream recreated empty, a restore at new
/// sequences): the exporter refuses to start, where it used to resume after the archive's
/// end and leave the log's events up to it unarchived for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_refuses_an_archive_past_the_log() {
    let env = Env::embedded().await;
    let archive = env.platform.archive.clone().expect("dev has an archive");
    let log = env.platform.log.clone();
    let stream = env.platform.catalog.stream(METERING);
    append_usage(&env, 100, 0).await;
    export_once(&env, &archive, &stream, small_objects()).await;
    env.recreate_stream(&stream).await;
    // New events past the archive's end (producers started before the exporter): the log
    // is longer than the archive, and still not its continuation.
    append_usage(&env, 150, 1_000).await;
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = AuditExporter::new(log.clone(), archive.clone(), &stream, small_objects())
        .run(true, rx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("(last sequence 150)"), "{err}");
    env.drop().await;
}
