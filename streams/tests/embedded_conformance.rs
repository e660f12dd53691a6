//! The log conformance suite against the embedded (sled) adapter: the same test code as
//! `jetstream_conformance.rs`, each test on its own data directory.
use std::sync::Arc;

use creto_streams::embedded::SledLog;
use creto_streams::{Catalog, EventLog};

async fn make(test: &str) -> (Arc<dyn EventLog>, Catalog) {
    // Under the target directory: what a test leaves behind goes with `cargo clean`.
    let dir = tempfile::Builder::new()
        .prefix(&format!("log-{test}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    let catalog = Catalog::namespaced("t1");
    let log = SledLog::open(&dir, catalog.clone()).expect("embedded log opens");
    log.ensure_streams(&catalog.specs()).await.unwrap();
    (Arc::new(log), catalog)
}

async fn cleanup(log: Arc<dyn EventLog>, catalog: Catalog) {
    for spec in catalog.specs() {
        log.delete_stream(&spec.name).await.unwrap();
    }
}

creto_streams::conformance_suite!(make, cleanup);

/// A page of dead letters reads at most what it is allowed, those the filter refuses
/// included, and says where the next page starts.
#[tokio::test]
async fn a_dead_letter_page_reads_within_its_budget() {
    use creto_streams::{deadletter, StoredEvent, DEADLETTERS, METERING};
    let (log, catalog) = make("dl_page").await;
    let subject = catalog.deadletter_subject(METERING);
    for sequence in 1..=5u64 {
        let original = StoredEvent {
            stream: catalog.stream(METERING),
            sequence,
            subject: catalog.subject("metering.events.s1"),
            headers: Default::default(),
            payload: bytes::Bytes::from_static(b"{}"),
            recorded_at: chrono::Utc::now(),
        };
        let reason = if sequence == 5 { "mine" } else { "theirs" };
        log.append(deadletter::letter(&original, &subject, reason, "", 1))
            .await
            .unwrap();
    }
    let mine = |l: &deadletter::DeadLetter| l.reason == "mine";
    let (found, reached) = deadletter::page(&*log, &catalog, Some(&subject), 0, 10, 3, mine)
        .await
        .unwrap();
    assert_eq!((found.len(), reached), (0, 3));
    let (found, reached) = deadletter::page(&*log, &catalog, Some(&subject), 3, 10, 3, mine)
        .await
        .unwrap();
    assert_eq!((found.len(), reached), (1, 5));
    assert_eq!(
        log.stream_state(&catalog.stream(DEADLETTERS))
            .await
            .unwrap()
            .messages,
        5
    );
    cleanup(log, catalog).await;
}
