//! `enablement backfill metering` imports a file through the live validation and dedupe: the
//! report counts accepted, duplicate and rejected (by reason, with line numbers), usage holds
//! each valid event exactly once, `--accept-late` imports history, and a rebuild by replay
//! decides exactly as the backfill did.
use std::io::Write;
use std::time::Duration;

use chrono::{Duration as Ch, Utc};
use creto_gateways::backfill::{Backfill, BackfillOptions, BackfillReport};
use creto_replay_tests::{cloud_event, metering_checksums, Env};
use serde_json::json;

async fn run(env: &Env, path: &std::path::Path, options: &BackfillOptions) -> BackfillReport {
    Backfill {
        log: &*env.platform.log,
        read_model: &*env.platform.metering,
        catalog: &env.platform.catalog,
        limits: env.settings.limits,
    }
    .file(path, options, |_, _| {})
    .await
    .unwrap()
}

fn count(map: &std::collections::BTreeMap<String, u64>, key: &str) -> u64 {
    map.get(key).copied().unwrap_or(0)
}

async fn usage(env: &Env) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT subscription_id, event_id, quantity::text FROM metering_events ORDER BY 1, 2",
    )
    .fetch_all(env.pool())
    .await
    .unwrap()
}

async fn last_sequence(env: &Env) -> u64 {
    env.platform
        .log
        .stream_state(&env.platform.catalog.stream(creto_streams::METERING))
        .await
        .unwrap()
        .last_sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reports_and_imports_each_valid_event_once() {
    let env = Env::new().await;
    let (running, _client) = env.start_metering(true).await;
    let now = Utc::now();

    // One event ingested live (NATS, the producers' path) and applied.
    let nats = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nats);
    let ack = js
        .publish(
            env.subject("metering.events.sub_a"),
            cloud_event(
                "live-1",
                "sub_a",
                "agent.execution",
                now,
                json!({"quantity": 1}),
            )
            .into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    env.wait_applied(ack.sequence).await;

    let ev = |id: &str, sub: &str, ago: Ch, q: serde_json::Value| {
        cloud_event(
            id,
            sub,
            "agent.execution",
            now - ago,
            json!({"quantity": q, "model": "m"}),
        )
    };
    let lines = [
        ev("v1", "sub_a", Ch::hours(1), json!(2)),   // 1 accepted
        ev("v2", "sub_b", Ch::hours(2), json!(3)),   // 2 accepted
        ev("v1", "sub_a", Ch::hours(1), json!(100)), // 3 dup (file)
        ev("live-1", "sub_a", Ch::minutes(1), json!(50)), // 4 dup (applied)
        "{\"specversion\": \"1.0\", \"id\": \"broken".to_string(), // 5 malformed_json
        ev("w1", "sub_a", Ch::hours(1), json!("three")), // 6 wrong_type
        json!({"specversion": "1.0", "id": "m1", "source": "t", "type": "agent.execution",
               "time": now.to_rfc3339(), "data": {"quantity": 1}})
        .to_string(), // 7 missing_field
        ev("n1", "sub_b", Ch::hours(1), json!(-4)),  // 8 quantity_negative
        ev("old-1", "sub_a", Ch::days(30), json!(7)), // 9 time_too_old
        String::new(),                               // 10 blank: skipped
        ev("v3", "sub_a", Ch::hours(3), json!(4.5)), // 11 accepted
        json!({"specversion": "1.0", "id": 5, "source": "t", "type": "agent.execution",
               "subject": "sub_a", "time": now.to_rfc3339()})
        .to_string(), // 12 wrong_type
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.ndjson");
    let mut f = std::fs::File::create(&path).unwrap();
    for l in &lines {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);

    // A dry run reports the same and appends nothing.
    let before = last_sequence(&env).await;
    let dry = run(
        &env,
        &path,
        &BackfillOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        last_sequence(&env).await,
        before,
        "a dry run appends nothing"
    );
    assert_eq!((dry.accepted, dry.duplicates, dry.rejected), (3, 2, 6));

    let report = run(&env, &path, &BackfillOptions::default()).await;
    println!("{}", report.render());
    assert_eq!(report.events, 11, "blank lines are skipped");
    assert_eq!(report.accepted, 3, "{report:#?}");
    assert_eq!(report.duplicates, 2, "{report:#?}");
    assert_eq!(count(&report.duplicates_by_kind, "same_submission"), 1);
    assert_eq!(count(&report.duplicates_by_kind, "already_applied"), 1);
    assert_eq!(report.rejected, 6);
    let reasons = &report.rejected_by_reason;
    assert_eq!(count(reasons, "malformed_json"), 1);
    assert_eq!(count(reasons, "wrong_type"), 2);
    assert_eq!(count(reasons, "missing_field"), 1);
    assert_eq!(count(reasons, "quantity_negative"), 1);
    assert_eq!(count(reasons, "time_too_old"), 1);
    let shown: Vec<(u64, &str)> = report
        .first_rejections
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    assert_eq!(
        shown,
        [
            (5, "malformed_json"),
            (6, "wrong_type"),
            (7, "missing_field"),
            (8, "quantity_negative"),
            (9, "time_too_old"),
            (12, "wrong_type"),
        ]
    );
    assert!(report.render().contains("--accept-late"));
    env.wait_applied(report.last_sequence).await;
    let expected = vec![
        ("sub_a".to_string(), "live-1".to_string(), "1".to_string()),
        ("sub_a".into(), "v1".into(), "2".into()),
        ("sub_a".into(), "v3".into(), "4.5".into()),
        ("sub_b".into(), "v2".into(), "3".into()),
    ];
    assert_eq!(usage(&env).await, expected);
    let hourly: (i64, String) =
        sqlx::query_as("SELECT sum(event_count)::int8, sum(quantity_sum)::text FROM usage_hourly")
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(
        hourly,
        (4, "10.5".to_string()),
        "usage_hourly counts each once"
    );

    // History: the same file with --accept-late imports the 30-day-old event, nothing twice.
    let late = run(
        &env,
        &path,
        &BackfillOptions {
            accept_late: true,
            rate: 100, // paced: batches of 10
            ..Default::default()
        },
    )
    .await;
    println!("{}", late.render());
    assert!(
        late.late_window_hours >= 30 * 24,
        "{}",
        late.late_window_hours
    );
    assert_eq!(late.accepted, 1, "{late:#?}");
    assert_eq!(late.duplicates, 5, "{late:#?}");
    assert_eq!(late.rejected, 5);
    assert_eq!(count(&late.rejected_by_reason, "time_too_old"), 0);
    assert!(
        late.elapsed_ms >= 100,
        "11 events at 100/s take about 0.1 s"
    );
    env.wait_applied(late.last_sequence).await;
    let mut expected = expected;
    expected.insert(1, ("sub_a".into(), "old-1".into(), "7".into()));
    assert_eq!(usage(&env).await, expected);

    // A rebuild by replay decides as the backfill did (the widened window travels with the
    // events), so the rebuilt tables equal the live ones.
    let live = metering_checksums(env.pool()).await;
    env.rebuild_metering(1_000).await;
    assert_eq!(metering_checksums(env.pool()).await, live);

    tokio::time::timeout(Duration::from_secs(10), running.stop())
        .await
        .ok();
    env.drop().await;
}

/// From an archive prefix: `.ndjson.gz` and `.ndjson` objects in key order, other keys ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_an_archive_prefix() {
    use creto_projections::archive::Archive;
    use std::io::Write;
    let archive = creto_replay_tests::test_archive("enablement-test").await;
    let env = Env::embedded().await;
    let prefix = format!("backfill-{}/", uuid::Uuid::new_v4().simple());
    let now = chrono::Utc::now();
    let line = |id: &str, q: f64| {
        creto_replay_tests::cloud_event(
            id,
            "sub_s3",
            "agent.execution",
            now,
            json!({ "quantity": q }),
        )
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    writeln!(gz, "{}\n{}", line("a", 1.0), line("b", 2.0)).unwrap();
    let objects = [
        (format!("{prefix}1.ndjson.gz"), gz.finish().unwrap()),
        // No trailing newline: the next object must still start on its own line.
        (
            format!("{prefix}2.ndjson"),
            format!("{}\n{}", line("c", 4.0), line("a", 9.0)).into_bytes(),
        ),
        (format!("{prefix}3.txt"), b"not events".to_vec()),
    ];
    for (key, body) in &objects {
        archive
            .put(key, body.clone().into(), "application/octet-stream")
            .await
            .unwrap();
    }
    let staged = tempfile::NamedTempFile::new().unwrap();
    let n = creto_gateways::backfill::fetch_prefix(&archive, &prefix, staged.path())
        .await
        .unwrap();
    assert_eq!(n, 2, "the .txt object is not read");
    let report = run(&env, staged.path(), &BackfillOptions::default()).await;
    assert_eq!(
        (
            report.events,
            report.accepted,
            report.duplicates,
            report.rejected
        ),
        (4, 3, 1, 0)
    );
    let e = creto_gateways::backfill::fetch_prefix(&archive, "nothing-here/", staged.path())
        .await
        .unwrap_err();
    assert!(e.contains("no *.ndjson"), "{e}");
    for (key, _) in &objects {
        archive.delete(key).await.unwrap();
    }
    env.drop().await;
}

/// `enablement backfill` reports every line, then fails (exit 1) when some were rejected:
/// automation must not take a partial import for a complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_fails_when_lines_were_rejected() {
    let env = Env::new().await;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let good = cloud_event(
        "cli-1",
        "sub_cli",
        "agent.execution",
        Utc::now() - Ch::minutes(1),
        json!({"quantity": 2}),
    );
    writeln!(file, "{good}\nnot json").unwrap();
    let args = [
        "enablement",
        "--nats-url",
        &creto_replay_tests::nats_url(),
        "--database-url",
        &env.settings.database_url,
        "--namespace",
        &env.name,
        "backfill",
        "metering",
        "--file",
        file.path().to_str().unwrap(),
    ];
    let cli = <creto_gateways::cli::Cli as clap::Parser>::parse_from(args);
    let e = creto_gateways::cli::run(cli).await.unwrap_err();
    assert!(e.to_string().contains("1 line(s) rejected"), "{e}");
    // The valid line went in all the same.
    assert_eq!(last_sequence(&env).await, 1);
    env.drop().await;
}
