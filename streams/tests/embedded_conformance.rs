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
