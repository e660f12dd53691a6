//! `enablement replay metering --from-seq … --to-seq …` (no --rebuild) re-applies a range to
//! the live read models idempotently: missing rows come back, rows already there are not
//! counted twice in `usage_hourly`, and the checkpoint never moves.
use chrono::{Duration as Ch, Utc};
use creto_gateways::platform::Stores;
use creto_gateways::replay::{self, RangeArgs};
use creto_projections::Projector;
use creto_replay_tests::{cloud_event, metering_checksums, Env};
use sqlx::Executor;

async fn publish(env: &Env, n: usize) -> u64 {
    let now = Utc::now();
    let events = (0..n).map(|i| {
        // every 7th repeats the previous id; every 40th is invalid
        let id = if i % 7 == 6 { i - 1 } else { i };
        let sub = format!("sub_{}", id % 13);
        let q = if i % 40 == 39 {
            -1.0
        } else {
            (id % 17) as f64 + 0.25
        };
        let payload = cloud_event(
            &format!("r{id}"),
            &sub,
            "agent.execution",
            now - Ch::minutes((id % 500) as i64),
            serde_json::json!({ "quantity": q }),
        );
        (sub, payload)
    });
    creto_replay_tests::publish_events(env, events).await
}

async fn reapply(env: &Env, range: RangeArgs) -> replay::RangeReport {
    let Stores::Services { pool, redis } = &env.platform.stores else {
        unreachable!()
    };
    replay::run_metering(
        env.platform.log.clone(),
        pool.clone(),
        redis.clone(),
        &env.settings,
        &range,
        400,
        true,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapplying_ranges_is_idempotent_and_keeps_the_checkpoint() {
    let env = Env::new().await;
    let (running, _client) = env.start_metering(true).await;
    let last = publish(&env, 3_000).await;
    env.wait_applied(last).await;
    running.stop().await;
    let live = metering_checksums(env.pool()).await;
    let projector = creto_projections::metering::MeteringProjector::new(
        env.pool().clone(),
        env.platform.log.clone(),
        env.platform.catalog.clone(),
        env.settings.limits,
    );
    let checkpoint = projector.checkpoint().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM metering_events")
        .fetch_one(env.pool())
        .await
        .unwrap();

    // Everything already applied: nothing inserted, nothing counted twice.
    let all = reapply(&env, RangeArgs::default()).await;
    assert_eq!((all.first_sequence, all.last_sequence), (1, last));
    assert_eq!(all.inserted, 0, "{all:?}");
    assert_eq!(all.duplicates + all.invalid, last, "{all:?}");
    assert_eq!(metering_checksums(env.pool()).await, live);
    assert_eq!(projector.checkpoint().await.unwrap(), checkpoint);

    // Rows lost (checkpoint kept): two overlapping ranges bring them back exactly once.
    env.pool()
        .execute("TRUNCATE metering_events, usage_hourly, usage_monthly")
        .await
        .unwrap();
    let first = reapply(
        &env,
        RangeArgs {
            from_seq: Some(1),
            to_seq: Some(last / 2),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((first.first_sequence, first.last_sequence), (1, last / 2));
    assert!(first.inserted > 0);
    let second = reapply(
        &env,
        RangeArgs {
            from_seq: Some(last / 3),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(second.first_sequence, last / 3);
    assert_eq!(second.last_sequence, last);
    assert_eq!(first.inserted + second.inserted, rows as u64);
    assert_eq!(
        metering_checksums(env.pool()).await,
        live,
        "re-applied ranges equal the live tables"
    );
    assert_eq!(
        projector.checkpoint().await.unwrap(),
        checkpoint,
        "the checkpoint never moves"
    );

    // By recorded time: the whole stream again, nothing added.
    let by_time = reapply(
        &env,
        RangeArgs {
            from_time: Some(Utc::now() - Ch::hours(1)),
            to_time: Some(Utc::now()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_time.events, last);
    assert_eq!(by_time.inserted, 0);
    assert_eq!(metering_checksums(env.pool()).await, live);
    println!("{}", by_time.render());
    env.drop().await;
}
