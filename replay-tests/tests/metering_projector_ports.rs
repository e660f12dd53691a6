//! The metering projector and read model on both adapters (PostgreSQL + Redis, and the
//! embedded sled + in-process cache), through the log port: duplicates that reach the
//! projector past the log's duplicate window (different log ids, same event id) count once,
//! the first occurrence wins, invalid events are dead-lettered, meters apply once, the
//! checkpoint moves with the rows, and the usage counters are written to the cache.
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use chrono::{Duration as Ch, DurationRound, Utc};
use creto_domain::metering::Window;
use creto_projections::metering::counters::Counters;
use creto_projections::metering::query::{quantity_meter, UsageQuery};
use creto_projections::runner::{self, RunnerConfig};
use creto_replay_tests::faulty_log::FaultyLog;
use creto_replay_tests::{cloud_event, Env};
use creto_streams::headers::{content_types, names};
use creto_streams::{
    AppendEvent, Delivery, DurableConsumer, EventLog, Headers, LogError, ReplayFrom, DEADLETTERS,
};
use futures::TryStreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_and_read_model_on_postgres() {
    check(Env::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_and_read_model_on_embedded() {
    check(Env::embedded().await).await;
}

type Projecting = (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), creto_projections::ProjectionError>>,
);

/// The metering projector's runner on `log`, with a sender that stops it.
fn project(env: &Env, log: std::sync::Arc<dyn EventLog>) -> Projecting {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(runner::run(
        log,
        env.platform.leadership(),
        env.platform.metering_projector(),
        RunnerConfig::default(),
        stop_rx,
    ));
    (stop, task)
}

fn append(env: &Env, log_id: &str, json: String, sub: &str) -> AppendEvent {
    AppendEvent {
        subject: env.subject(&format!("metering.events.{sub}")),
        id: log_id.to_string(),
        expected_subject_sequence: None,
        headers: Headers::new().with(names::CONTENT_TYPE, content_types::CLOUDEVENTS_JSON),
        payload: Bytes::from(json),
    }
}

async fn check(env: Env) {
    let now = Utc::now().duration_trunc(Ch::minutes(1)).unwrap();
    let t = now - Ch::minutes(5);
    let q = |x: f64| serde_json::json!({ "quantity": x, "model": "m1" });
    let events = vec![
        append(
            &env,
            "l1",
            cloud_event("a", "s1", "llm.tokens", t, q(10.0)),
            "s1",
        ),
        append(
            &env,
            "l2",
            cloud_event("b", "s1", "llm.tokens", t, q(5.0)),
            "s1",
        ),
        // The same event id again under another log id: the first one wins.
        append(
            &env,
            "l3",
            cloud_event("a", "s1", "llm.tokens", t, q(99.0)),
            "s1",
        ),
        // The same id on another subscription is another event.
        append(
            &env,
            "l4",
            cloud_event("a", "s2", "llm.tokens", t, q(1.0)),
            "s2",
        ),
        // Negative quantity: invalid, parked.
        append(
            &env,
            "l5",
            cloud_event("c", "s1", "llm.tokens", t, q(-1.0)),
            "s1",
        ),
        append(&env, "l6", "{not json".into(), "s1"),
    ];
    let last = env
        .platform
        .log
        .append_batch(events)
        .await
        .into_iter()
        .map(|r| r.unwrap().sequence())
        .max()
        .unwrap();

    let (stop, task) = project(&env, env.platform.log.clone());
    env.wait_applied(last).await;

    // A later batch repeating an applied id, after a restart of the projector.
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let again = env
        .platform
        .log
        .append(append(
            &env,
            "l7",
            cloud_event("b", "s1", "llm.tokens", t, q(7.0)),
            "s1",
        ))
        .await
        .unwrap()
        .sequence();
    let (stop, task) = project(&env, env.platform.log.clone());
    env.wait_applied(again).await;

    let rm = &env.platform.metering;
    let usage = |sub: &str| UsageQuery {
        tenant: "default".into(),
        meter: quantity_meter("llm.tokens"),
        from: now - Ch::hours(1),
        to: now + Ch::hours(1),
        window: Window::Hour,
        tz: chrono_tz::UTC,
        group_by: vec!["subscription_id".into()],
        filters: vec![("subscription_id".into(), sub.into())],
    };
    let s1 = rm.usage(&usage("s1")).await.unwrap();
    assert_eq!(s1.len(), 1, "{s1:?}");
    assert_eq!(s1[0].value, 15.0, "first occurrence of each id, once");
    assert_eq!(s1[0].group, vec![("subscription_id".into(), "s1".into())]);
    assert_eq!(rm.usage(&usage("s2")).await.unwrap()[0].value, 1.0);
    assert_eq!(rm.checkpoint().await.unwrap(), again);
    let known = rm
        .existing_ids(
            "default",
            &[("s1".into(), "a".into()), ("s1".into(), "zzz".into())],
        )
        .await
        .unwrap();
    assert_eq!(known, vec![("s1".to_string(), "a".to_string())]);

    let letters: Vec<_> = env
        .platform
        .log
        .replay(
            &env.platform.catalog.stream(DEADLETTERS),
            ReplayFrom::Start,
            None,
            None,
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "the two invalid events are parked");

    // Month-to-date counters reach the cache (written in the background after the commit).
    let counters = Counters::new(env.platform.cache.clone(), &env.settings.redis_prefix());
    let this_month = t.format("%Y-%m").to_string() == now.format("%Y-%m").to_string();
    let mut got = None;
    for _ in 0..200 {
        got = counters.get("default", "s1", "llm.tokens").await.unwrap();
        if got.as_ref().is_some_and(|c| c.2 == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if this_month {
        let (_, quantity, count) = got.expect("counter written");
        assert_eq!((quantity.parse::<f64>().unwrap(), count), (15.0, 2));
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    env.drop().await;
}

/// A projector consumer that loses one delivery on the way, as a connection cut in the middle
/// of a fetched batch does: the server counts it delivered, the client never sees it.
struct LosingConsumer {
    inner: Box<dyn DurableConsumer>,
    lose: u64,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl DurableConsumer for LosingConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, LogError> {
        let mut batch = self.inner.fetch(max, wait).await?;
        let at = batch.iter().position(|d| d.event.sequence == self.lose);
        if let Some(at) = at.filter(|_| !self.lost.swap(true, Ordering::SeqCst)) {
            batch.remove(at);
        }
        Ok(batch)
    }
}

/// Stores `n` valid `llm.tokens` events of subscription `s1` (quantity 1, five minutes ago);
/// their sequences.
async fn store_tokens(env: &Env, n: usize) -> Vec<u64> {
    let t = Utc::now().duration_trunc(Ch::minutes(1)).unwrap() - Ch::minutes(5);
    let events: Vec<_> = (0..n)
        .map(|i| {
            let data = serde_json::json!({ "quantity": 1 });
            let json = cloud_event(&format!("e{i}"), "s1", "llm.tokens", t, data);
            append(env, &format!("l{i}"), json, "s1")
        })
        .collect();
    env.platform
        .log
        .append_batch(events)
        .await
        .into_iter()
        .map(|r| r.unwrap().sequence())
        .collect()
}

/// A delivery lost in the middle of a batch is projected once the consumer starts again, not
/// skipped: the batch's cumulative ack covered it, and its checkpoint moved past it, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_mid_batch_is_projected_not_skipped() {
    let env = Env::embedded().await;
    let t = Utc::now().duration_trunc(Ch::minutes(1)).unwrap() - Ch::minutes(5);
    let sequences = store_tokens(&env, 10).await;
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (lose, losing) = (sequences[4], lost.clone());
    let log = FaultyLog::wrapping_consumers(env.platform.log.clone(), move |inner| {
        Box::new(LosingConsumer {
            inner,
            lose,
            lost: losing.clone(),
        })
    });
    let (stop, task) = project(&env, log);
    env.wait_applied(sequences[9]).await;
    assert!(lost.load(Ordering::SeqCst), "a delivery was lost");
    let rm = &env.platform.metering;
    let usage = rm
        .usage(&UsageQuery {
            tenant: "default".into(),
            meter: quantity_meter("llm.tokens"),
            from: t - Ch::hours(1),
            to: t + Ch::hours(1),
            window: Window::Hour,
            tz: chrono_tz::UTC,
            group_by: vec![],
            filters: vec![],
        })
        .await
        .unwrap();
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(usage[0].value, 10.0, "every event, the lost delivery's too");
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    env.drop().await;
}

/// The active projector stops when the connection that holds its lock dies (the lock died
/// with it, and a standby may take it), instead of projecting beside the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_whose_lock_connection_dies_stops() {
    let env = Env::new().await;
    let first = store_tokens(&env, 1).await[0];
    let (_stop, task) = project(&env, env.platform.log.clone());
    env.wait_applied(first).await;
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND database = \
         (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(env.pool())
    .await
    .unwrap();
    assert_eq!(ended, vec![true], "one connection held the lock");
    let result = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the projector stopped")
        .unwrap();
    assert!(result.is_err(), "{result:?}");
    env.drop().await;
}

/// Read models past the end of the log (a log that lost its tail in a crash, a stream
/// recreated under kept read models) refuse to project: the next events stored would reuse
/// applied sequences and be skipped without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_ahead_of_the_log_refuse_to_project() {
    let env = Env::embedded().await;
    let last = store_tokens(&env, 3).await[2];
    let run = || project(&env, env.platform.log.clone());
    let (stop, task) = run();
    env.wait_applied(last).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let stream = env.platform.catalog.stream(creto_streams::METERING);
    env.recreate_stream(&stream).await;
    let (_stop, task) = run();
    let err = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("refused at once")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("past the end of the log"), "{err}");
    assert!(
        err.to_string().contains("replay metering --rebuild"),
        "{err}"
    );
    env.drop().await;
}
