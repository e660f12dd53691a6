//! A publisher keeps working across a nats-server crash and restart, and every append it was
//! told succeeded is in the log exactly once. Uses a private nats-server on a spare port: the
//! machine's own server is never stopped.
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use creto_streams::jetstream::JetStreamLog;
use creto_streams::{AppendEvent, Appended, Catalog, EventLog, Headers, ReplayFrom, METERING};
use futures::TryStreamExt;

fn nats_server_binary() -> String {
    for candidate in [
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/bin/nats-server",
    ] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    "nats-server".to_string()
}

fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(port: u16, dir: &std::path::Path) -> Child {
    Command::new(nats_server_binary())
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed (the test command installs it)")
}

async fn wait_listening(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("private nats-server did not start on port {port}");
}

/// The adapter on the private server at `port`, its streams created.
async fn connected(port: u16) -> (Arc<JetStreamLog>, Catalog) {
    let catalog = Catalog::default();
    let log = JetStreamLog::connect(
        &format!("nats://127.0.0.1:{port}"),
        &Default::default(),
        catalog.clone(),
    )
    .await
    .unwrap();
    log.ensure_streams(&catalog.specs()).await.unwrap();
    (Arc::new(log), catalog)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_survives_server_crash_without_losing_acknowledged_appends() {
    let dir = tempfile::tempdir().unwrap();
    let port = spare_port();
    let mut server = start(port, dir.path());
    wait_listening(port).await;

    let (log, catalog) = connected(port).await;

    let publisher = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut failures = 0;
            for i in 0..1500u32 {
                let event = AppendEvent {
                    subject: format!("metering.events.sub_{}", i % 10),
                    id: format!("evt-{i}"),
                    expected_subject_sequence: None,
                    headers: Headers::new(),
                    payload: Bytes::from(format!("{{\"n\":{i}}}")),
                };
                match log.append(event).await {
                    // The payload names the event: the stored Nats-Msg-Id is keyed.
                    Ok(_) => acknowledged.push(format!("{{\"n\":{i}}}")),
                    Err(_) => failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (acknowledged, failures)
        })
    };

    tokio::time::sleep(Duration::from_millis(800)).await;
    server.kill().unwrap(); // SIGKILL: no graceful shutdown
    server.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut server = start(port, dir.path());

    let (acknowledged, failures) = publisher.await.unwrap();
    assert_eq!(
        failures, 0,
        "appends inside the retry budget must succeed after the restart"
    );
    assert_eq!(acknowledged.len(), 1500);

    let stored: Vec<String> = log
        .replay(&catalog.stream(METERING), ReplayFrom::Start, None, None)
        .await
        .unwrap()
        .map_ok(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .try_collect()
        .await
        .unwrap();
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event was stored twice");
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !unique.contains(id))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    server.kill().ok();
    server.wait().ok();
}

/// While JetStream does not answer (a server restarting recovers its streams before it
/// does), the client reports "no responders" as a missing stream: an append waits for it
/// within its retry budget instead of failing with "run `enablement streams init`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_waits_for_jetstream_to_answer_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = spare_port();
    let mut server = start(port, dir.path());
    wait_listening(port).await;
    let (log, _) = connected(port).await;
    server.kill().unwrap();
    server.wait().unwrap();
    // The same server without JetStream: the client reconnects, and nothing answers.
    let mut plain = Command::new(nats_server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the client's reconnect
    let append = {
        let log = log.clone();
        tokio::spawn(async move {
            log.append(AppendEvent {
                subject: "metering.events.sub_1".into(),
                id: "evt-during-recovery".into(),
                expected_subject_sequence: None,
                headers: Headers::new(),
                payload: Bytes::from_static(b"{}"),
            })
            .await
        })
    };
    let batch = {
        let log = log.clone();
        tokio::spawn(async move {
            let event = |id: &str| AppendEvent {
                subject: "metering.events.sub_2".into(),
                id: id.into(),
                expected_subject_sequence: None,
                headers: Headers::new(),
                payload: Bytes::from_static(b"{}"),
            };
            log.append_batch(vec![event("b1"), event("b2")]).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    plain.kill().unwrap();
    plain.wait().unwrap();
    let mut server = start(port, dir.path());
    let appended = append.await.unwrap();
    assert!(appended.is_ok(), "{appended:?}");
    let batch = batch.await.unwrap();
    assert!(
        batch.iter().all(|r| matches!(r, Ok(Appended::New { .. }))),
        "{batch:?}"
    );
    server.kill().ok();
    server.wait().ok();
}
