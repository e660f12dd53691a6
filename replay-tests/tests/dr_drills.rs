//! Disaster-recovery drills (ops/runbook.md): the read models are projections, so losing them
//! whole (every product's PostgreSQL rows and the Redis counters) or killing a rebuild at any
//! point loses nothing: replaying the streams gives back the same rows, checksum for checksum.
//! Each drill prints its recovery time and event count.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Duration as Ch, Utc};
use creto_projections::rebuild;
use creto_projections::Projector;
use creto_replay_tests::{cloud_event, drills, metering_checksums, Env};
use rand::Rng;
use sqlx::Executor;

/// Publishes `n` usage events over NATS (the producers' path): every 10th repeats an earlier
/// id, every 50th has a negative quantity. Returns the last sequence.
async fn publish(env: &Env, n: usize, seed: u64) -> u64 {
    let now = Utc::now();
    let events = (0..n).map(|i| {
        // The subscription follows the id, so a repeated id is a true duplicate.
        let id_index = if i % 10 == 9 { i - 5 } else { i };
        let k = (id_index as u64)
            .wrapping_mul(2654435761)
            .wrapping_add(seed);
        let sub = format!("sub_{}", k % 23);
        let quantity = if i % 50 == 49 {
            -1.0
        } else {
            (k % 1000) as f64 / 4.0
        };
        let payload = cloud_event(
            &format!("e{seed}-{id_index}"),
            &sub,
            ["agent.execution", "llm.tokens"][i % 2],
            // Within this month's first minutes, or earlier today: counters compare either way.
            now - Ch::minutes((k % 600) as i64),
            serde_json::json!({"quantity": quantity, "model": format!("m{}", k % 3)}),
        );
        (sub, payload)
    });
    creto_replay_tests::publish_events(env, events).await
}

/// Every counter hash under the environment's prefix.
async fn counters(env: &Env) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for key in env
        .platform
        .cache
        .keys(&env.settings.redis_prefix())
        .await
        .unwrap()
    {
        if key.contains("quota:") {
            let h = env.platform.cache.hash(&key).await.unwrap();
            out.insert(key, h.into_iter().collect());
        }
    }
    out
}

async fn flush_redis(env: &Env) {
    let keys = env
        .platform
        .cache
        .keys(&env.settings.redis_prefix())
        .await
        .unwrap();
    if keys.is_empty() {
        return;
    }
    let mut redis = redis::aio::ConnectionManager::new(
        redis::Client::open(env.settings.redis_url.as_str()).unwrap(),
    )
    .await
    .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// Drops every metering read-model row: the disaster.
async fn wipe_read_models(env: &Env) {
    env.pool()
        .execute(
            "TRUNCATE metering_events, usage_hourly, usage_monthly, meters;
             DELETE FROM projection_checkpoints WHERE projector = 'metering';
             REFRESH MATERIALIZED VIEW usage_daily;",
        )
        .await
        .unwrap();
}

async fn rows(env: &Env) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM metering_events")
        .fetch_one(env.pool())
        .await
        .unwrap()
}

async fn wait_counters(
    env: &Env,
    want: &BTreeMap<String, BTreeMap<String, String>>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = counters(env).await;
        if &got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the counters reflect `sequence` (the writer runs after each commit).
async fn wait_counters_at(env: &Env, sequence: u64) {
    let key = format!("{}metering:counters:sequence", env.settings.redis_prefix());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let at: u64 = env
            .platform
            .cache
            .get(&key)
            .await
            .unwrap()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if at >= sequence {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counters stuck at {at}, wanted {sequence}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_1_read_models_and_cache_lost_rebuilt_by_replay() {
    let env = Env::new().await;
    // The other products' read models (oversight requests, runtime sandboxes, a quota and its
    // crossings), before metering's own events so that those end the stream.
    drills::oversight_and_runtime_activity(&env).await;
    let others = drills::checksums_of_activity(&env).await;
    let (running, _client) = env.start_metering(true).await;
    let last = publish(&env, 4_000, 11).await;
    env.wait_applied(last).await;
    let before = metering_checksums(env.pool()).await;
    let stored = rows(&env).await;
    assert!(stored > 3_000 && stored < 3_700, "{stored}");
    wait_counters_at(&env, last).await;
    let cached = counters(&env).await;
    assert!(!cached.is_empty(), "the projector keeps Redis counters");

    // The disaster: every read model row and every cache key of the environment is gone.
    running.stop().await;
    wipe_read_models(&env).await;
    drills::wipe(&env).await;
    flush_redis(&env).await;
    assert_eq!(rows(&env).await, 0);
    assert!(counters(&env).await.is_empty());
    assert_ne!(metering_checksums(env.pool()).await, before);
    assert_ne!(drills::checksums(&env).await, others);

    // Recovery: `enablement replay metering --rebuild`, then the projector resumes (and
    // rebuilds the counters it finds behind).
    let started = Instant::now();
    let log = env.platform.log.clone();
    let p = env.prepare_rebuild(true).await;
    let events = rebuild::catch_up(&log, &p, None, 2_000, |_| {})
        .await
        .unwrap();
    let at = rebuild::switch_over(env.pool(), &log, &p).await.unwrap();
    drills::rebuild(&env).await;
    let tables = started.elapsed();
    assert_eq!(at, last);
    assert_eq!(metering_checksums(env.pool()).await, before);
    assert_eq!(drills::checksums(&env).await, others);
    let (running, _client) = env.start_metering(true).await;
    let restored = wait_counters(&env, &cached).await;
    let total = started.elapsed();
    assert_eq!(restored, cached, "Redis counters come back");
    println!(
        "DR drill 1: {events} metering events replayed ({stored} rows), with oversight, runtime and quota tables restored in {:.2} s, counters in {:.2} s total ({:.0} events/s)",
        tables.as_secs_f64(),
        total.as_secs_f64(),
        events as f64 / tables.as_secs_f64()
    );

    // And the platform goes on: new events land on the restored tables.
    let more = publish(&env, 200, 12).await;
    env.wait_applied(more).await;
    assert!(rows(&env).await > stored);
    running.stop().await;
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_3_rebuild_killed_at_random_points_resumes_and_switches() {
    let env = Env::new().await;
    let (running, _client) = env.start_metering(true).await;
    let last = publish(&env, 5_000, 31).await;
    env.wait_applied(last).await;
    let live = metering_checksums(env.pool()).await;
    let log = env.platform.log.clone();

    // How long one whole rebuild of these events takes on this machine: the kills below land
    // within its first quarter (at fixed 5–80 ms, a fast machine finished before most of them and
    // a slow one had not begun).
    let timed = Instant::now();
    {
        let p = env.prepare_rebuild(true).await;
        rebuild::catch_up(&log, &p, None, 100, |_| {})
            .await
            .unwrap();
    }
    let whole = timed.elapsed().as_millis().max(40) as u64;

    let started = Instant::now();
    let mut rng = rand::rng();
    let mut checkpoints = Vec::new();
    let mut restart = true;
    for _ in 0..8 {
        // The CLI's rebuild, as its own process would run it: its own connections, so killing
        // it mid-query (inside a COPY or a commit included) leaves nothing behind in ours.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&env.settings.database_url)
            .await
            .unwrap();
        let (log2, catalog, limits) = (
            log.clone(),
            env.platform.catalog.clone(),
            env.settings.limits,
        );
        let killed = pool.clone();
        let task = tokio::spawn(async move {
            let p = rebuild::prepare_metering(&pool, log2.clone(), catalog, limits, restart)
                .await
                .unwrap();
            rebuild::catch_up(&log2, &p, None, 100, |_| {})
                .await
                .unwrap();
        });
        restart = false;
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(whole / 10..whole / 4),
        ))
        .await;
        task.abort();
        let _ = task.await;
        // The process is gone: so are its connections (and their transactions).
        let _ = tokio::time::timeout(Duration::from_secs(5), killed.close()).await;
        let p = env.prepare_rebuild(false).await;
        checkpoints.push(p.checkpoint().await.unwrap());
    }
    let mid = checkpoints.iter().filter(|&&c| c > 0 && c < last).count();
    assert!(
        mid >= 2,
        "at least two kills land mid-rebuild: {checkpoints:?} of {last}"
    );
    assert!(
        checkpoints.windows(2).all(|w| w[0] <= w[1]),
        "a resumed rebuild never goes back: {checkpoints:?}"
    );
    // Readers kept the live tables the whole time.
    assert_eq!(metering_checksums(env.pool()).await, live);

    let p = Arc::new(env.prepare_rebuild(false).await);
    let resumed_from = p.checkpoint().await.unwrap();
    let events = rebuild::catch_up(&log, &p, None, 1_000, |_| {})
        .await
        .unwrap();
    let at = rebuild::switch_over(env.pool(), &log, &p).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(at, last);
    assert_eq!(
        metering_checksums(env.pool()).await,
        live,
        "a rebuild killed {} times differs from the live tables",
        checkpoints.len()
    );
    println!(
        "DR drill 3: {last} events, rebuild killed at sequences {checkpoints:?}, resumed from {resumed_from} ({events} events left), switched at {at}; recovery {:.2} s",
        elapsed.as_secs_f64()
    );
    running.stop().await;
    env.drop().await;
}

/// The `enablement` binary next to this test (cargo builds it for the workspace's tests).
fn enablement_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("enablement");
    assert!(
        bin.exists(),
        "{} missing: run the workspace's tests (`cargo test --workspace`) or `cargo build -p creto-gateways`",
        bin.display()
    );
    bin
}

/// Drill 3 as an operator meets it: `enablement replay all --rebuild`, SIGKILLed at random
/// moments, run again until it completes; the switched tables equal the live ones, and so do
/// oversight's and runtime's (each rebuilt in one transaction: a kill leaves the old rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_3_sigkilled_cli_rebuild_resumes_and_switches() {
    let env = Env::new().await;
    drills::oversight_and_runtime_activity(&env).await;
    let others = drills::checksums_of_activity(&env).await;
    let (running, _client) = env.start_metering(true).await;
    let last = publish(&env, 5_000, 41).await;
    env.wait_applied(last).await;
    running.stop().await;
    let live = metering_checksums(env.pool()).await;
    let replay = |product: &str, extra: &[&str]| {
        let mut c = std::process::Command::new(enablement_binary());
        c.args(["replay", product, "--rebuild", "--batch", "250"])
            .args(extra)
            .env("NATS_URL", creto_replay_tests::nats_url())
            .env("DATABASE_URL", &env.settings.database_url)
            .env("REDIS_URL", &env.settings.redis_url)
            .env("ENABLEMENT_NAMESPACE", &env.name)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        c
    };
    let rebuild = |extra: &[&str]| replay("all", extra);
    // One whole metering rebuild first, timed (metering comes first in `all`): the kills below
    // land in its second half, past the process's start, where metering is loading or
    // finishing (at fixed 100–600 ms they landed before it had loaded anything, or after).
    let timed = Instant::now();
    assert!(replay("metering", &[]).status().unwrap().success());
    let whole = timed.elapsed().as_millis().max(100) as u64;
    let started = Instant::now();
    let mut rng = rand::rng();
    let mut kills = 0;
    // Where the last killed run left its rebuild, when it had loaded something.
    let mut left_at = 0;
    // When to kill, moved by what the last kill found (the machine's speed varies while
    // the other drills run): later after one that came too early, earlier after a run that
    // finished first.
    let mut kill_at = whole * 7 / 10;
    // The switch-over moves the rebuilt tables in: a new oid says the run got that far.
    let live_table = || async {
        sqlx::query_scalar::<_, sqlx::postgres::types::Oid>(
            "SELECT to_regclass('public.usage_hourly')::oid",
        )
        .fetch_one(env.pool())
        .await
        .unwrap()
    };
    for _ in 0..12 {
        let before = live_table().await;
        let mut child = rebuild(&[]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(
            rng.random_range(kill_at * 9 / 10..=kill_at * 11 / 10),
        ));
        let killed = child.try_wait().unwrap().is_none();
        if killed {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // Readers keep the live tables while a rebuild is pending.
        assert_eq!(metering_checksums(env.pool()).await, live);
        assert_eq!(drills::checksums(&env).await, others);
        let switched = live_table().await != before;
        left_at = if killed && !switched {
            env.prepare_rebuild(false).await.checkpoint().await.unwrap()
        } else {
            0
        };
        if left_at > 0 {
            break;
        }
        // Too late when metering had switched (a kill in oversight's or runtime's rebuild,
        // after it, leaves nothing to resume), too early otherwise.
        kill_at = if killed && !switched {
            kill_at + whole / 5
        } else {
            (kill_at * 2 / 3).max(20)
        };
    }
    assert!(
        left_at > 0,
        "no kill landed once the rebuild had loaded something ({kills} kills)"
    );
    let done = rebuild(&["--json"]).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stdout)
    );
    // One JSON report per product: metering's, then oversight's and runtime's.
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&done.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 3, "{reports:?}");
    let report = &reports[0];
    assert_eq!(report["switched"], true, "{report}");
    assert_eq!(
        report["resumed_from"].as_u64(),
        Some(left_at),
        "the last run resumed where the killed one stopped: {report}"
    );
    assert_eq!(
        [&reports[1]["product"], &reports[2]["product"]],
        ["oversight", "runtime"]
    );
    assert_eq!(
        metering_checksums(env.pool()).await,
        live,
        "a rebuild SIGKILLed {kills} times differs from the live tables"
    );
    assert_eq!(drills::checksums(&env).await, others);
    println!(
        "DR drill 3 (SIGKILL): {last} events, rebuild killed {kills} times, resumed from sequence {} and switched; recovery {:.2} s",
        report["resumed_from"],
        started.elapsed().as_secs_f64()
    );
    env.drop().await;
}
