//! `replay metering --rebuild` rebuilds every read model from the stream into fresh tables,
//! switches readers over, and the result equals the live-built tables row for row, including
//! after duplicates, invalid events and a projector killed mid-batch (repeatedly).
use std::sync::Arc;
use std::time::Duration;

use chrono::{Duration as Ch, Utc};
use creto_projections::metering::MeteringProjector;
use creto_projections::rebuild;
use creto_projections::runner::{self, RunnerConfig};
use creto_replay_tests::{cloud_event, metering_checksums, monthly_rollup_mismatches, Env};
use rand::Rng;

async fn publish_all(env: &Env, n: usize, seed: u64) -> u64 {
    let now = Utc::now();
    let events = (0..n).map(|i| {
        let k = (i as u64).wrapping_mul(2654435761).wrapping_add(seed);
        let sub = format!("sub_{}", k % 37);
        // Every 10th event repeats an earlier id (a duplicate); every 50th is invalid.
        let id = if i % 10 == 9 {
            format!("e{}", i - 5)
        } else {
            format!("e{i}")
        };
        let dup_sub = if i % 10 == 9 {
            format!(
                "sub_{}",
                ((i as u64 - 5).wrapping_mul(2654435761).wrapping_add(seed)) % 37
            )
        } else {
            sub
        };
        let quantity = if i % 50 == 49 {
            -1.0
        } else {
            (k % 1000) as f64 / 4.0
        };
        let payload = cloud_event(
            &id,
            &dup_sub,
            ["agent.execution", "llm.tokens"][i % 2],
            now - Ch::minutes((k % 3000) as i64),
            serde_json::json!({"quantity": quantity, "model": format!("m{}", k % 3)}),
        );
        (dup_sub, payload)
    });
    creto_replay_tests::publish_events(env, events).await
}

/// Every index on the public metering tables, as PostgreSQL would create it again.
async fn metering_indexes(pool: &sqlx::PgPool) -> Vec<String> {
    let tables: Vec<String> = rebuild::METERING_RELATIONS
        .iter()
        .map(|(_, name)| name.to_string())
        .collect();
    sqlx::query_scalar(
        "SELECT indexdef::text FROM pg_indexes
         WHERE schemaname = 'public' AND tablename = ANY($1) ORDER BY indexname",
    )
    .bind(&tables)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The live projector with the default settings, on the environment's pool; stopped when the
/// sender is dropped or aborted with its task.
fn live_projector(
    env: &Env,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), creto_projections::ProjectionError>>,
) {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(runner::run(
        env.platform.log.clone(),
        runner::Leadership::Postgres(env.pool().clone()),
        projector(env, env.pool()),
        RunnerConfig::default(),
        stop_rx,
    ));
    (stop, task)
}

fn projector(env: &Env, pool: &sqlx::PgPool) -> Arc<MeteringProjector> {
    Arc::new(MeteringProjector::new(
        pool.clone(),
        env.platform.log.clone(),
        env.platform.catalog.clone(),
        env.settings.limits,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_tables_equal_live_built_ones() {
    let env = Env::new().await;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let config = RunnerConfig {
        batch: 700,
        wait: Duration::from_millis(100),
    };

    // Live projection, killed mid-batch several times while events keep arriving.
    let last = publish_all(&env, 6_000, 1).await;
    let mut rng = rand::rng();
    for _ in 0..6 {
        // Its own connections, as a projector process has: killing it mid-query must not
        // leave a half-spoken connection in the pool the test reads with.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&env.settings.database_url)
            .await
            .unwrap();
        let task = tokio::spawn(runner::run(
            env.platform.log.clone(),
            runner::Leadership::Postgres(pool.clone()),
            projector(&env, &pool),
            config,
            stop_rx.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..250))).await;
        task.abort(); // dropped wherever it is: mid-transaction included
        let _ = task.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
    }
    let last = last.max(publish_all(&env, 2_000, 2).await);
    let task = tokio::spawn(runner::run(
        env.platform.log.clone(),
        runner::Leadership::Postgres(env.pool().clone()),
        projector(&env, env.pool()),
        config,
        stop_rx.clone(),
    ));
    env.wait_applied(last).await;

    let live = metering_checksums(env.pool()).await;
    let (events, hourly_total): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM metering_events), (SELECT sum(event_count)::int8 FROM usage_hourly)")
            .fetch_one(env.pool())
            .await
            .unwrap();
    // 8,000 published, 10% duplicates, 2% invalid (some of those duplicates of valid ones).
    assert_eq!(
        events, hourly_total,
        "usage_hourly counts each stored event exactly once"
    );
    assert_eq!(monthly_rollup_mismatches(env.pool()).await, 0);
    assert!(events > 6_000 && events < 7_300, "{events}");
    let letters = creto_gateways::metering::service::dead_letters_page(
        &*env.platform.log,
        &env.platform.catalog,
        0,
        10_000,
        None,
    )
    .await
    .unwrap()
    .0;
    assert!(letters.iter().all(|l| l.reason == "quantity_negative"));

    // Rebuild, interrupted halfway and resumed.
    let log = env.platform.log.clone();
    let rebuilding = env.prepare_rebuild(true).await;
    rebuild::catch_up(&log, &rebuilding, Some(last / 2), 1_000, |_| {})
        .await
        .unwrap();
    drop(rebuilding);
    let resumed = env.prepare_rebuild(false).await;
    use creto_projections::Projector;
    assert_eq!(
        resumed.checkpoint().await.unwrap(),
        last / 2,
        "an interrupted rebuild resumes where it stopped"
    );
    let mut updates = 0;
    rebuild::catch_up(&log, &resumed, Some(last * 3 / 4), 1_000, |_| updates += 1)
        .await
        .unwrap();
    assert!(updates > 0);
    // Interrupted again, after the keys and usage_hourly were built: what comes after must be
    // applied row by row (usage_hourly included), not bulk-loaded.
    // As a rebuild interrupted in its finishing phase before migration 0009 left it: the
    // events' key built in the old column order. It is built again in the new one (checked
    // with every index after the switch).
    sqlx::query(&format!(
        "CREATE UNIQUE INDEX metering_events_pkey ON {}.metering_events (tenant, subscription_id, event_id)",
        rebuild::REBUILD_SCHEMA
    ))
    .execute(env.pool())
    .await
    .unwrap();
    rebuild::build_indexes(env.pool()).await.unwrap();
    drop(resumed);
    let resumed = env.prepare_rebuild(false).await;
    rebuild::catch_up(&log, &resumed, None, 1_000, |_| {})
        .await
        .unwrap();
    // Readers still see the live tables until the switch.
    assert_eq!(metering_checksums(env.pool()).await, live);

    let migrated = metering_indexes(env.pool()).await;
    let switched_at = rebuild::switch_over(env.pool(), &log, &resumed)
        .await
        .unwrap();
    assert_eq!(switched_at, last);
    assert_eq!(
        metering_checksums(env.pool()).await,
        live,
        "rebuilt tables differ from the live-built ones"
    );
    assert_eq!(monthly_rollup_mismatches(env.pool()).await, 0);
    // The switched-in tables carry exactly the indexes the migrations made (names, columns
    // and their order: migration 0009's keys), though the rebuild built them its own way.
    assert_eq!(metering_indexes(env.pool()).await, migrated);
    assert!(migrated.len() >= 8, "{migrated:?}");
    // The switched-in tables keep the byte-order keys of migration 0007.
    let collations: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, collation_name::text
         FROM information_schema.columns
         WHERE table_schema = 'public' AND data_type = 'text'
           AND column_name IN ('tenant', 'subscription_id', 'event_id', 'event_type')
           AND table_name IN ('metering_events', 'usage_hourly', 'usage_monthly',
                              'metering_corrections', 'metering_event_corrections')",
    )
    .fetch_all(env.pool())
    .await
    .unwrap();
    assert_eq!(collations.len(), 16, "{collations:?}");
    for (table, column, collation) in collations {
        assert_eq!(collation.as_deref(), Some("C"), "{table}.{column}");
    }
    let daily: i64 = sqlx::query_scalar("SELECT sum(total_count)::int8 FROM usage_daily")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert_eq!(daily, hourly_total);

    // The live projector keeps going on the new tables.
    let more = publish_all(&env, 500, 3).await;
    env.wait_applied(more).await;
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM metering_events")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert!(after > events);
    task.abort();
    let _ = task.await;
    env.drop().await;
}

/// One rebuild at a time: the second is refused while the first holds the lock, and the lock
/// goes with the first's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_is_refused_while_one_runs() {
    let env = Env::new().await;
    let first = rebuild::only_rebuild(env.pool()).await.unwrap();
    assert!(first.is_some());
    assert!(
        rebuild::only_rebuild(env.pool()).await.unwrap().is_none(),
        "two rebuilds at once"
    );
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rebuild::only_rebuild(env.pool()).await.unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.drop().await;
}

/// A rebuild that passes the live projector (stopped, or never run: the rebuild is often the
/// remedy) parks the invalid events it passes, as the live projector would have: it moves the
/// live checkpoint past them, so nothing else ever will. The bulk load used to only count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_past_the_live_projector_parks_what_it_passes() {
    let env = Env::new().await;
    let letters = || async {
        creto_gateways::metering::service::dead_letters_page(
            &*env.platform.log,
            &env.platform.catalog,
            0,
            10_000,
            None,
        )
        .await
        .unwrap()
        .0
    };
    // 500 events, every 50th invalid; no live projector has run.
    let last = publish_all(&env, 500, 7).await;
    let log = env.platform.log.clone();
    let p = env.prepare_rebuild(true).await;
    rebuild::catch_up(&log, &p, None, 100, |_| {})
        .await
        .unwrap();
    assert_eq!(
        rebuild::switch_over(env.pool(), &log, &p).await.unwrap(),
        last
    );
    let parked = letters().await;
    assert_eq!(parked.len(), 10, "{parked:?}");
    assert!(parked.iter().all(|l| l.reason == "quantity_negative"));

    // The live projector goes on from the rebuild's position: parks only what comes after.
    let (_stop, task) = live_projector(&env);
    let more = publish_all(&env, 100, 8).await;
    env.wait_applied(more).await;
    assert_eq!(letters().await.len(), 12);
    task.abort();
    let _ = task.await;
    env.drop().await;
}

/// A rebuild far behind the live projector when it switches (the live one went on while it
/// loaded) closes the distance in batches before it takes the lock, and gives the same tables.
/// The whole distance used to be read into memory and applied in one statement under the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_far_behind_the_live_projector_switches_to_the_same_tables() {
    let env = Env::new().await;
    let last = publish_all(&env, 8_000, 9).await;
    let (_stop, task) = live_projector(&env);
    env.wait_applied(last).await;
    let live = metering_checksums(env.pool()).await;
    let log = env.platform.log.clone();
    let p = env.prepare_rebuild(true).await;
    rebuild::catch_up(&log, &p, Some(1_000), 500, |_| {})
        .await
        .unwrap();
    assert_eq!(
        rebuild::switch_over(env.pool(), &log, &p).await.unwrap(),
        last
    );
    assert_eq!(metering_checksums(env.pool()).await, live);
    assert_eq!(monthly_rollup_mismatches(env.pool()).await, 0);
    task.abort();
    let _ = task.await;
    env.drop().await;
}
