//! `enablement dev`, the README's first command, as a newcomer runs it: no NATS, PostgreSQL or
//! Redis (their URLs point at closed ports), a metering event ingested through gRPC shows up
//! in a usage query, and is still there after a clean stop and after a SIGKILL; a sealed
//! message sent before the restart is received and opened after it.
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use creto_gateways::auth::Bearer;
use creto_gateways::messaging::client::AgentClient;
use creto_schemas::metering::v1 as pb;
use creto_schemas::metering::v1::metering_service_client::MeteringServiceClient;
use tonic::service::interceptor::InterceptedService;

type Client = MeteringServiceClient<InterceptedService<tonic::transport::Channel, Bearer>>;

/// What `enablement dev` needs to run sandboxes: root, bubblewrap, loop devices, mkfs.ext4 and
/// nft or iptables.
fn can_run_sandboxes() -> bool {
    let runs = |program: &str, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // SAFETY: plain getter.
    let root = unsafe { libc::geteuid() } == 0;
    root && runs("bwrap", "--version")
        && std::path::Path::new("/dev/loop-control").exists()
        && runs("mkfs.ext4", "-V")
        && (runs("nft", "--version") || runs("iptables", "--version"))
}

fn spare_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Dev {
    child: Child,
    grpc: String,
    messaging: String,
    token: String,
    /// The approval page's base URL, as the banner gives it.
    approvals: String,
}

fn start(dir: &std::path::Path) -> Dev {
    let (grpc, metrics) = (spare_port(), spare_port());
    let (messaging, messaging_metrics) = (spare_port(), spare_port());
    let (oversight, oversight_metrics) = (spare_port(), spare_port());
    let (runtime, runtime_metrics) = (spare_port(), spare_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_enablement"))
        .args(["dev", "--data-dir"])
        .arg(dir)
        .args(["--metering-grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--metering-metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(["--messaging-grpc-addr", &format!("127.0.0.1:{messaging}")])
        .args(["--oversight-grpc-addr", &format!("127.0.0.1:{oversight}")])
        .args([
            "--oversight-metrics-addr",
            &format!("127.0.0.1:{oversight_metrics}"),
        ])
        .args([
            "--messaging-metrics-addr",
            &format!("127.0.0.1:{messaging_metrics}"),
        ])
        .args(["--runtime-grpc-addr", &format!("127.0.0.1:{runtime}")])
        .args([
            "--runtime-metrics-addr",
            &format!("127.0.0.1:{runtime_metrics}"),
        ])
        // Nothing listens there: dev must not need them.
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .stdout(Stdio::piped())
        // Kept beside the data directory: when dev does not come up, the log says why.
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
        .spawn()
        .expect("binary runs");
    let mut banner = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let Some(line) = lines.next() else {
            let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "dev ended before its banner; its log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        };
        let line = line.expect("stdout readable");
        banner.push_str(&line);
        banner.push('\n');
        if line == "ready" || Instant::now() > until {
            break;
        }
    }
    assert!(
        banner.contains(&format!("grpc 127.0.0.1:{grpc}"))
            && banner.contains(&format!("http://127.0.0.1:{metrics}/metrics"))
            && banner.contains(&format!("grpc 127.0.0.1:{messaging}"))
            && banner.contains(&format!("grpc 127.0.0.1:{oversight}"))
            // Root with bubblewrap runs sandboxes (as CI does: there, "unavailable" is a
            // failure); elsewhere the banner says why not.
            && (banner.contains(&format!("grpc 127.0.0.1:{runtime}"))
                || (!can_run_sandboxes() && banner.contains("runtime    unavailable: ")))
            && banner.contains(&dir.canonicalize().unwrap().display().to_string()),
        "{banner}"
    );
    let token = banner
        .lines()
        .find_map(|l| l.strip_prefix("export ENABLEMENT_TOKEN="))
        .expect("dev prints a development token")
        .to_string();
    let approvals = format!("http://127.0.0.1:{oversight_metrics}");
    assert!(
        banner.contains(&format!("approvals  page on {approvals};")),
        "dev turns the approval page on: {banner}"
    );
    Dev {
        child,
        grpc: format!("http://127.0.0.1:{grpc}"),
        messaging: format!("http://127.0.0.1:{messaging}"),
        token,
        approvals,
    }
}

/// An approver's link, made as the banner says, opens the approval page.
async fn approval_page_opens(dev: &Dev, data: &std::path::Path) {
    let secret = std::fs::read_to_string(data.join("link-secret")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_enablement"))
        .args([
            "oversight",
            "page-link",
            "--tenant",
            "default",
            "--approver",
            "ann",
        ])
        .env("OVERSIGHT_PUBLIC_URL", &dev.approvals)
        .env("OVERSIGHT_LINK_SECRET", secret.trim())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let link = String::from_utf8(out.stdout).unwrap();
    let page = reqwest::get(link.trim()).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Approvals"));
}

async fn usage(client: &mut Client, min: u64) -> f64 {
    let now = chrono::Utc::now();
    let rows = client
        .query_usage(pb::QueryUsageRequest {
            subscription_id: "sub_dev".into(),
            event_type: "agent.execution".into(),
            from: Some(creto_streams::envelope::timestamp(
                now - chrono::Duration::days(1),
            )),
            to: Some(creto_streams::envelope::timestamp(
                now + chrono::Duration::hours(1),
            )),
            window: pb::Window::Day as i32,
            min_sequence: min,
            wait_ms: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    rows.iter().map(|r| r.value).sum()
}

async fn ingest(client: &mut Client, id: &str) -> u64 {
    let data: prost_types::Struct = prost_types::Struct {
        fields: [(
            "quantity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(2.5)),
            },
        )]
        .into(),
    };
    let r = client
        .ingest_events(pb::IngestEventsRequest {
            events: vec![pb::UsageEvent {
                id: id.into(),
                source: "dev-test".into(),
                r#type: "agent.execution".into(),
                subject: "sub_dev".into(),
                time: Some(creto_streams::envelope::timestamp(chrono::Utc::now())),
                data: Some(data),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 1, "{r:?}");
    r.sequence
}

async fn connect(dev: &Dev) -> Client {
    let channel = tonic::transport::Channel::from_shared(dev.grpc.clone())
        .unwrap()
        .connect()
        .await
        .expect("gateway listening once ready is printed");
    // Without the token the gateway refuses; with it the caller is tenant default's admin.
    let mut anonymous = MeteringServiceClient::new(channel.clone());
    let refused = anonymous
        .list_meters(pb::ListMetersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    MeteringServiceClient::with_interceptor(channel, Bearer::new(&dev.token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_alone_and_keeps_its_data_across_restarts() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();

    let mut dev = start(&data);
    approval_page_opens(&dev, &data).await;
    let mut client = connect(&dev).await;
    let seq = ingest(&mut client, "evt-1").await;
    assert_eq!(usage(&mut client, seq).await, 2.5);
    // Messaging runs too: Alice seals a message for Bob, who is not listening yet.
    let mut alice = AgentClient::connect(&dev.messaging, &dev.token, "default", "alice")
        .await
        .unwrap();
    let mut bob = AgentClient::connect(&dev.messaging, &dev.token, "default", "bob")
        .await
        .unwrap();
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    alice
        .send("bob", b"see you after the restart")
        .await
        .unwrap();
    // A clean stop (SIGTERM), as Ctrl-C would.
    // The shell's kill builtin: no procps needed on a minimal machine.
    Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", dev.child.id())])
        .status()
        .unwrap();
    assert!(dev.child.wait().unwrap().success());

    let mut dev = start(&data);
    approval_page_opens(&dev, &data).await;
    let mut client = connect(&dev).await;
    assert_eq!(usage(&mut client, seq).await, 2.5, "kept across a restart");
    // The directory and Bob's queue came back from the embedded log.
    let mut bob = bob.reconnect(&dev.messaging, &dev.token).await.unwrap();
    let mut inbox = bob.receive(0).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), inbox.message())
        .await
        .expect("delivered after the restart")
        .unwrap()
        .unwrap();
    assert_eq!(
        bob.open(&message).await.unwrap().plaintext,
        b"see you after the restart"
    );
    bob.ack(message.cursor).await.unwrap();
    // The same id again is still a duplicate; a new one adds.
    let dup = client
        .ingest_events(pb::IngestEventsRequest {
            events: vec![pb::UsageEvent {
                id: "evt-1".into(),
                source: "dev-test".into(),
                r#type: "agent.execution".into(),
                subject: "sub_dev".into(),
                time: Some(creto_streams::envelope::timestamp(chrono::Utc::now())),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dup.duplicates, 1, "{dup:?}");
    let seq = ingest(&mut client, "evt-2").await;
    assert_eq!(usage(&mut client, seq).await, 5.0);
    // A crash: acknowledged events survive it.
    dev.child.kill().unwrap();
    dev.child.wait().unwrap();

    let mut dev = start(&data);
    approval_page_opens(&dev, &data).await;
    let mut client = connect(&dev).await;
    assert_eq!(usage(&mut client, seq).await, 5.0, "kept across a SIGKILL");
    // A clean stop last: it ends the warm pool's sandboxes (this start cleaned up what the
    // killed one left), so the test leaves no namespace or mounted disk on the machine.
    Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", dev.child.id())])
        .status()
        .unwrap();
    assert!(dev.child.wait().unwrap().success());
}
