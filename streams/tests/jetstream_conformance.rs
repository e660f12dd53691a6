//! The log conformance suite against the real nats-server (NATS_URL, default 127.0.0.1:4222).
//! Each test gets its own namespace, so streams never collide with a developer's data.
use std::sync::Arc;

use creto_streams::jetstream::JetStreamLog;
use creto_streams::{Catalog, EventLog};

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn make(test: &str) -> (Arc<dyn EventLog>, Catalog) {
    let ns = format!(
        "t{}{}",
        test.len(),
        uuid::Uuid::new_v4().simple().to_string().get(..10).unwrap()
    );
    let catalog = Catalog::namespaced(&ns);
    let log = JetStreamLog::connect(&nats_url(), &Default::default(), catalog.clone())
        .await
        .expect("NATS reachable");
    log.ensure_streams(&catalog.specs()).await.unwrap();
    (Arc::new(log), catalog)
}

async fn cleanup(log: Arc<dyn EventLog>, catalog: Catalog) {
    for spec in catalog.specs() {
        log.delete_stream(&spec.name).await.unwrap();
    }
}

creto_streams::conformance_suite!(make, cleanup);
