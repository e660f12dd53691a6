//! The log port's conformance suite. Every adapter runs exactly these functions (see
//! `tests/jetstream_conformance.rs` and the embedded adapter's twin), each asserting an outcome.
//! Each function gets a fresh log whose catalog has its own namespace and streams created.
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;

use crate::catalog::{Catalog, DEADLETTERS, METERING, OVERSIGHT};
use crate::deadletter::DeadLetter;
use crate::headers::{names, Headers};
use crate::log::*;

fn event(subject: &str, id: &str, body: &str) -> AppendEvent {
    AppendEvent {
        subject: subject.to_string(),
        id: id.to_string(),
        expected_subject_sequence: None,
        headers: Headers::new().with("Creto-Test", id),
        payload: Bytes::from(body.to_string()),
    }
}

pub async fn same_id_twice_is_one_message(log: Arc<dyn EventLog>, c: &Catalog) {
    let s = c.subject("metering.events.sub_a");
    let first = log.append(event(&s, "evt-1", "one")).await.unwrap();
    let second = log.append(event(&s, "evt-1", "one again")).await.unwrap();
    assert!(!first.is_duplicate());
    let stored = log
        .get(&c.stream(METERING), first.sequence())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.headers.get(names::EVENT_ID), Some("evt-1"));
    assert_eq!(
        second,
        Appended::Duplicate {
            sequence: first.sequence()
        }
    );
    let state = log.stream_state(&c.stream(METERING)).await.unwrap();
    assert_eq!(state.messages, 1, "a duplicate must not be stored");
    let batch = log
        .append_batch(vec![
            event(&s, "evt-2", "b"),
            event(&s, "evt-1", "c"),
            event(&s, "evt-2", "d"),
        ])
        .await;
    assert_eq!(batch[0].as_ref().unwrap(), &Appended::New { sequence: 2 });
    assert_eq!(
        batch[1].as_ref().unwrap(),
        &Appended::Duplicate { sequence: 1 }
    );
    assert_eq!(
        batch[2].as_ref().unwrap(),
        &Appended::Duplicate { sequence: 2 }
    );
    assert_eq!(
        log.stream_state(&c.stream(METERING))
            .await
            .unwrap()
            .messages,
        2
    );
}

/// Batches larger together (and one alone) than the acks a client lets wait at once all
/// land, each event once: on JetStream, batches that sent part of their events before
/// awaiting any ack held every slot and waited for one more, and no append went on.
pub async fn batches_past_the_pending_ack_bound_all_land(log: Arc<dyn EventLog>, c: &Catalog) {
    let s = c.subject("metering.events.sub_big");
    let batch = |prefix: &str, n: usize| -> Vec<AppendEvent> {
        (0..n)
            .map(|i| event(&s, &format!("{prefix}-{i}"), "x"))
            .collect()
    };
    let alone = batch("alone", 16_500);
    let together: Vec<_> = (0..20)
        .map(|b| {
            let log = log.clone();
            let events = batch(&format!("b{b}"), 1_000);
            tokio::spawn(async move { log.append_batch(events).await })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(120), async {
        let mut all = log.append_batch(alone).await;
        for task in together {
            all.extend(task.await.unwrap());
        }
        all
    })
    .await
    .expect("the batches landed within 2 minutes");
    let mut sequences: Vec<u64> = results
        .into_iter()
        .map(|r| match r.unwrap() {
            Appended::New { sequence } => sequence,
            other => panic!("a new event came back as {other:?}"),
        })
        .collect();
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(sequences.len(), 36_500);
    let state = log.stream_state(&c.stream(METERING)).await.unwrap();
    assert_eq!(state.messages, 36_500);
}

pub async fn expected_sequence_lets_exactly_one_writer_win(log: Arc<dyn EventLog>, c: &Catalog) {
    let stream = c.stream(OVERSIGHT);
    let s = c.subject("oversight.request.r1");
    // An empty subject expects 0.
    let created = log
        .append(AppendEvent {
            expected_subject_sequence: Some(0),
            ..event(&s, "r1-created", "created")
        })
        .await
        .unwrap();
    assert_eq!(
        log.last_subject_sequence(&stream, &s).await.unwrap(),
        created.sequence()
    );
    // Another subject's appends do not disturb this subject's sequence.
    log.append(event(&c.subject("oversight.request.r2"), "r2-created", "x"))
        .await
        .unwrap();

    for round in 0..5 {
        let expected = log.last_subject_sequence(&stream, &s).await.unwrap();
        let writers = (0..2).map(|w| {
            let log = log.clone();
            let e = AppendEvent {
                expected_subject_sequence: Some(expected),
                ..event(&s, &format!("r1-{round}-{w}"), "decide")
            };
            tokio::spawn(async move { log.append(e).await })
        });
        let results: Vec<_> = futures::future::join_all(writers)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(LogError::Conflict { .. })))
            .count();
        assert_eq!((wins, conflicts), (1, 1), "round {round}: {results:?}");
    }
    // A stale expectation is refused and stores nothing.
    let before = log.stream_state(&stream).await.unwrap().messages;
    let stale = log
        .append(AppendEvent {
            expected_subject_sequence: Some(created.sequence()),
            ..event(&s, "stale", "late")
        })
        .await;
    assert!(matches!(stale, Err(LogError::Conflict { .. })), "{stale:?}");
    assert_eq!(log.stream_state(&stream).await.unwrap().messages, before);
}

pub async fn replay_returns_exactly_the_range_in_order(log: Arc<dyn EventLog>, c: &Catalog) {
    let stream = c.stream(METERING);
    let events: Vec<_> = (1..=300)
        .map(|i| {
            event(
                &c.subject(&format!("metering.events.sub_{}", i % 7)),
                &format!("e{i}"),
                &format!("body-{i}"),
            )
        })
        .collect();
    for r in log.append_batch(events).await {
        r.unwrap();
    }
    let all: Vec<StoredEvent> = log
        .replay(&stream, ReplayFrom::Start, None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 300);
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, e)| e.sequence == i as u64 + 1 && e.payload == format!("body-{}", i + 1)));
    assert_eq!(all[41].headers.get("Creto-Test"), Some("e42"));

    let mid: Vec<u64> = log
        .replay(&stream, ReplayFrom::Sequence(123), Some(200), None)
        .await
        .unwrap()
        .map_ok(|e| e.sequence)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(mid, (123..=200).collect::<Vec<_>>());

    // A subject filter returns only that subject, still in order.
    let filtered: Vec<u64> = log
        .replay(
            &stream,
            ReplayFrom::Sequence(10),
            None,
            Some(&c.subject("metering.events.sub_3")),
        )
        .await
        .unwrap()
        .map_ok(|e| e.sequence)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        filtered,
        (10..=300).filter(|i| i % 7 == 3).collect::<Vec<_>>()
    );

    // Past the end: nothing, and the call returns.
    let none: Vec<StoredEvent> = log
        .replay(&stream, ReplayFrom::Sequence(301), None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());

    // By time: everything recorded at or after a cut.
    let cut = all[249].recorded_at;
    let since: Vec<StoredEvent> = log
        .replay(&stream, ReplayFrom::Time(cut), None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(since.first().unwrap().sequence <= 250 && since.last().unwrap().sequence == 300);
    assert!(since.iter().all(|e| e.recorded_at >= cut));

    let one = log.get(&stream, 77).await.unwrap().unwrap();
    assert_eq!(one.payload, "body-77");
    assert!(log.get(&stream, 9_999).await.unwrap().is_none());
}

pub async fn nak_redelivers_after_its_delay(log: Arc<dyn EventLog>, c: &Catalog) {
    let stream = c.stream(METERING);
    log.append(event(&c.subject("metering.events.s"), "n1", "retry me"))
        .await
        .unwrap();
    let mut consumer = log
        .consumer(&stream, ConsumerSpec::new("nak-test"))
        .await
        .unwrap();
    let first = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].delivered, 1);
    let naked_at = Instant::now();
    assert_eq!(
        first[0]
            .nak(Duration::from_millis(700), "dependency down")
            .await
            .unwrap(),
        NakOutcome::Redeliver
    );
    let early = consumer
        .fetch(10, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(early.is_empty(), "redelivered before its delay");
    let again = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(
        naked_at.elapsed() >= Duration::from_millis(650),
        "came back after {:?}",
        naked_at.elapsed()
    );
    assert_eq!(again[0].delivered, 2);
    assert_eq!(again[0].event.payload, "retry me");
    again[0].ack().await.unwrap();
    assert!(
        consumer
            .fetch(10, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty(),
        "acked message came back"
    );
}

pub async fn poison_goes_to_dead_letters_after_max_deliveries(log: Arc<dyn EventLog>, c: &Catalog) {
    let stream = c.stream(METERING);
    let subject = c.subject("metering.events.poison");
    let appended = log.append(event(&subject, "p1", "poison")).await.unwrap();
    log.append(event(&subject, "p2", "fine")).await.unwrap();
    let spec = ConsumerSpec {
        max_deliver: 3,
        ..ConsumerSpec::new("poison-test")
    };
    let mut consumer = log.consumer(&stream, spec).await.unwrap();
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && outcomes.last() != Some(&NakOutcome::DeadLettered) {
        for d in consumer.fetch(10, Duration::from_secs(2)).await.unwrap() {
            if d.event.payload == "poison" {
                outcomes.push(
                    d.nak(Duration::from_millis(50), "cannot parse")
                        .await
                        .unwrap(),
                );
            } else {
                d.ack().await.unwrap();
            }
        }
    }
    assert_eq!(
        outcomes,
        vec![
            NakOutcome::Redeliver,
            NakOutcome::Redeliver,
            NakOutcome::DeadLettered
        ]
    );
    assert!(
        consumer
            .fetch(10, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty(),
        "dead letter redelivered"
    );

    let letters: Vec<DeadLetter> = log
        .replay(&c.stream(DEADLETTERS), ReplayFrom::Start, None, None)
        .await
        .unwrap()
        .map_ok(|e| DeadLetter::parse(e).expect("dead letter headers"))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(
        (l.reason.as_str(), l.detail.as_str()),
        ("max_deliveries", "cannot parse")
    );
    assert_eq!(
        (l.original_stream.as_str(), l.original_sequence),
        (stream.as_str(), appended.sequence())
    );
    assert_eq!(l.original_subject, subject);
    assert_eq!(l.deliveries, 3);
    assert_eq!(l.event.payload, "poison");
    assert_eq!(l.event.headers.get("Creto-Test"), Some("p1"));

    // Dead-lettering the same event again (a crash before term) stores it once.
    log.append(crate::deadletter::letter(
        &l.event.clone(),
        &l.event.subject,
        "x",
        "y",
        9,
    ))
    .await
    .ok();
    let redrive = l.redrive();
    assert_eq!(redrive.subject, subject);
    assert!(redrive
        .headers
        .get(crate::headers::names::DL_REASON)
        .is_none());
}

pub async fn durable_consumer_resumes_and_acks_cumulatively(log: Arc<dyn EventLog>, c: &Catalog) {
    let stream = c.stream(METERING);
    let s = c.subject("metering.events.cum");
    for r in log
        .append_batch(
            (1..=50)
                .map(|i| event(&s, &format!("c{i}"), &i.to_string()))
                .collect(),
        )
        .await
    {
        r.unwrap();
    }
    // A short ack_wait: what the first instance held unacked comes again within the test.
    let spec = ConsumerSpec {
        ack: AckMode::Cumulative,
        ack_wait: Duration::from_secs(2),
        ..ConsumerSpec::new("projector-test")
    };
    {
        let mut consumer = log.consumer(&stream, spec.clone()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 30 {
            got.extend(
                consumer
                    .fetch(30 - got.len(), Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
        }
        // Acking the 30th acks 1..=30.
        got[29].ack().await.unwrap();
        assert_eq!(got[29].event.sequence, 30);
    }
    // The ack reaches the server on its own time (a busy machine: more than moments).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = log.stream_state(&stream).await.unwrap();
        let cs = state
            .consumers
            .iter()
            .find(|x| x.name == "projector-test")
            .expect("durable listed");
        if cs.ack_floor == 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ack floor {} after the ack of 30",
            cs.ack_floor
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut consumer = log.consumer(&stream, spec).await.unwrap();
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Unacked 31..=50 are either still pending or redelivered after ack_wait (the first
    // instance may have taken them in without handing them out); 1..=30 never again.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 20 && Instant::now() < deadline {
        let batch = consumer.fetch(100, Duration::from_secs(1)).await.unwrap();
        seen.extend(batch.iter().map(|d| d.event.sequence));
        rest.extend(batch);
    }
    let mut seqs: Vec<u64> = rest.iter().map(|d| d.event.sequence).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs,
        (31..=50).collect::<Vec<u64>>(),
        "resumes after the acked 30, and only there"
    );
    log.delete_consumer(&stream, "projector-test")
        .await
        .unwrap();
}

pub async fn streams_init_is_idempotent(log: Arc<dyn EventLog>, c: &Catalog) {
    let again = log.ensure_streams(&c.specs()).await.unwrap();
    assert!(
        again.iter().all(|(_, o)| *o == EnsureOutcome::Unchanged),
        "{again:?}"
    );
    // Drift: a changed duplicate window is reported and repaired; a process starting with
    // other settings only reports it.
    let mut drifted = c.specs();
    drifted[0].duplicate_window = Duration::from_secs(60);
    let left = log.create_missing_streams(&drifted[..1]).await.unwrap();
    assert!(
        matches!(&left[0].1, EnsureOutcome::Drifted(f) if f[0].starts_with("duplicate_window")),
        "{left:?}"
    );
    assert_eq!(
        log.ensure_streams(&c.specs()[..1]).await.unwrap()[0].1,
        EnsureOutcome::Unchanged,
        "left as it was"
    );
    let changed = log.ensure_streams(&drifted[..1]).await.unwrap();
    assert!(
        matches!(&changed[0].1, EnsureOutcome::Updated(f) if f[0].starts_with("duplicate_window")),
        "{changed:?}"
    );
    let back = log.ensure_streams(&c.specs()[..1]).await.unwrap();
    assert!(matches!(&back[0].1, EnsureOutcome::Updated(_)));
    assert_eq!(
        log.ensure_streams(&c.specs())
            .await
            .unwrap()
            .iter()
            .filter(|(_, o)| *o != EnsureOutcome::Unchanged)
            .count(),
        0
    );
}

pub async fn oversized_and_unrouted_appends_are_refused(log: Arc<dyn EventLog>, c: &Catalog) {
    let big = AppendEvent {
        payload: Bytes::from(vec![b'x'; 2 * 1024 * 1024]),
        ..event(&c.subject("metering.events.big"), "big", "")
    };
    assert!(matches!(
        log.append(big).await,
        Err(LogError::TooLarge { .. })
    ));
    let nowhere = log
        .append(event(&c.subject("nowhere.at.all"), "n", "x"))
        .await;
    assert!(matches!(nowhere, Err(LogError::NoStream(_))), "{nowhere:?}");
    assert!(matches!(
        log.stream_state("NO_SUCH_STREAM").await,
        Err(LogError::UnknownStream(_))
    ));
    assert_eq!(
        log.stream_state(&c.stream(METERING))
            .await
            .unwrap()
            .messages,
        0
    );
}

pub async fn follow_yields_stored_then_new_events_in_order(log: Arc<dyn EventLog>, c: &Catalog) {
    use futures::StreamExt;
    let stream = c.stream(METERING);
    let a = c.subject("metering.events.follow_a");
    let b = c.subject("metering.events.follow_b");
    for i in 1..=6 {
        let s = if i % 2 == 1 { &a } else { &b };
        log.append(event(s, &format!("f{i}"), &format!("old-{i}")))
            .await
            .unwrap();
    }
    // Stored events from the start sequence first, filtered, then new ones as they come.
    let mut only_a = log
        .follow(&stream, ReplayFrom::Sequence(2), Some(&a))
        .await
        .unwrap();
    let mut all = log.follow(&stream, ReplayFrom::Start, None).await.unwrap();
    async fn next(
        s: &mut futures::stream::BoxStream<'static, Result<StoredEvent, LogError>>,
    ) -> StoredEvent {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("an event within 10 s")
            .expect("a follow never ends")
            .unwrap()
    }
    for want in [3, 5] {
        assert_eq!(next(&mut only_a).await.sequence, want);
    }
    for want in 1..=6 {
        let e = next(&mut all).await;
        assert_eq!(
            (e.sequence, e.payload.clone()),
            (want, Bytes::from(format!("old-{want}")))
        );
    }
    // Caught up: nothing more until something is stored, and the stream does not end.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), only_a.next())
            .await
            .is_err(),
        "a follow waits for new events instead of ending"
    );
    // New events arrive one by one (the reader idle in between), in order, filter applied.
    for i in 7..=12 {
        let s = if i % 2 == 1 { &a } else { &b };
        let stored = log
            .append(event(s, &format!("f{i}"), &format!("new-{i}")))
            .await
            .unwrap()
            .sequence();
        let e = next(&mut all).await;
        assert_eq!((e.sequence, e.subject.as_str()), (stored, s.as_str()));
        assert_eq!(e.headers.get("Creto-Test"), Some(format!("f{i}").as_str()));
        if s == &a {
            assert_eq!(next(&mut only_a).await.sequence, stored);
        }
    }
    // A burst, appended pipelined, comes through whole and in order.
    let burst: Vec<_> = (13..=212)
        .map(|i| event(&a, &format!("f{i}"), &format!("burst-{i}")))
        .collect();
    for r in log.append_batch(burst).await {
        r.unwrap();
    }
    for want in 13..=212 {
        assert_eq!(next(&mut only_a).await.sequence, want);
        assert_eq!(next(&mut all).await.sequence, want);
    }
    // Following from past the end waits for the next event.
    let mut later = log
        .follow(&stream, ReplayFrom::Sequence(213), None)
        .await
        .unwrap();
    log.append(event(&b, "f213", "last")).await.unwrap();
    assert_eq!(next(&mut later).await.sequence, 213);
}

/// Runs `$test` for an adapter; `$make` builds `(Arc<dyn EventLog>, Catalog)` with streams
/// created, and `$cleanup` removes them.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr, $cleanup:expr) => {
        $crate::conformance_suite!(@tests $make, $cleanup;
            same_id_twice_is_one_message,
            batches_past_the_pending_ack_bound_all_land,
            expected_sequence_lets_exactly_one_writer_win,
            replay_returns_exactly_the_range_in_order,
            follow_yields_stored_then_new_events_in_order,
            nak_redelivers_after_its_delay,
            poison_goes_to_dead_letters_after_max_deliveries,
            durable_consumer_resumes_and_acks_cumulatively,
            streams_init_is_idempotent,
            oversized_and_unrouted_appends_are_refused);
    };
    (@tests $make:expr, $cleanup:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (log, catalog) = $make(stringify!($name)).await;
                $crate::conformance::$name(log.clone(), &catalog).await;
                $cleanup(log, catalog).await;
            }
        )*
    };
}
