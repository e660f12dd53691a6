//! The embedded log keeps everything across a close and reopen of its directory: messages,
//! sequences, the duplicate window, subject sequences, and durable consumer positions
//! (including delivery counts, so a poison message still reaches the dead letters).
use std::time::Duration;

use bytes::Bytes;
use creto_streams::embedded::SledLog;
use creto_streams::{AckMode, AppendEvent, Catalog, ConsumerSpec, EventLog, Headers, METERING};

fn event(i: usize) -> AppendEvent {
    AppendEvent {
        subject: format!("metering.events.sub_{}", i % 3),
        id: format!("e{i}"),
        expected_subject_sequence: None,
        headers: Headers::new().with("Creto-Test", i.to_string()),
        payload: Bytes::from(format!("body-{i}")),
    }
}

#[tokio::test]
async fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let catalog = Catalog::default();
    let stream = catalog.stream(METERING);
    let each = |name: &str| ConsumerSpec {
        max_deliver: 2,
        ack_wait: Duration::from_secs(60),
        ..ConsumerSpec::new(name)
    };
    {
        let log = SledLog::open(dir.path(), catalog.clone()).unwrap();
        log.ensure_streams(&catalog.specs()).await.unwrap();
        for r in log.append_batch((1..=1_000).map(event).collect()).await {
            r.unwrap();
        }
        let mut c = log.consumer(&stream, each("worker")).await.unwrap();
        let got = c.fetch(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.len(), 10);
        for d in &got[..5] {
            d.ack().await.unwrap();
        }
        // 7 is acked out of order; 6, 8, 9, 10 stay pending across the restart.
        got[6].ack().await.unwrap();
        let mut cum = log
            .consumer(
                &stream,
                ConsumerSpec {
                    ack: AckMode::Cumulative,
                    ..ConsumerSpec::new("projector")
                },
            )
            .await
            .unwrap();
        let batch = cum.fetch(400, Duration::from_secs(1)).await.unwrap();
        batch.last().unwrap().ack().await.unwrap();
    }

    let log = SledLog::open(dir.path(), catalog.clone()).unwrap();
    let state = log.stream_state(&stream).await.unwrap();
    assert_eq!((state.messages, state.last_sequence), (1_000, 1_000));
    let projector = state
        .consumers
        .iter()
        .find(|c| c.name == "projector")
        .unwrap();
    assert_eq!((projector.ack_floor, projector.pending), (400, 600));
    // Same id after the restart, inside the window: still a duplicate of the original.
    let again = log.append(event(42)).await.unwrap();
    assert!(again.is_duplicate() && again.sequence() == 42, "{again:?}");
    assert_eq!(
        log.last_subject_sequence(&stream, "metering.events.sub_1")
            .await
            .unwrap(),
        1_000
    );
    assert_eq!(
        log.get(&stream, 500).await.unwrap().unwrap().payload,
        "body-500"
    );

    // The unacked deliveries come back first, counted as second deliveries; acked ones never.
    let mut c = log.consumer(&stream, each("worker")).await.unwrap();
    let got = c.fetch(6, Duration::from_secs(1)).await.unwrap();
    let seqs: Vec<(u64, u32)> = got
        .iter()
        .map(|d| (d.event.sequence, d.delivered))
        .collect();
    assert_eq!(
        seqs,
        vec![(6, 2), (8, 2), (9, 2), (10, 2), (11, 1), (12, 1)]
    );
    // Second delivery is the last allowed: a nak now dead-letters.
    assert_eq!(
        got[0].nak(Duration::ZERO, "still broken").await.unwrap(),
        creto_streams::NakOutcome::DeadLettered
    );
    let letters = log
        .stream_state(&catalog.stream(creto_streams::DEADLETTERS))
        .await
        .unwrap();
    assert_eq!(letters.messages, 1);
}
