//! Oversight's notification channels against real receivers: an in-process HTTP server (as
//! Slack and as the webhook target) and aiosmtpd, a real SMTP server that writes what it
//! receives to a maildir (installed by `.ci/services.sh`).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use creto_gateways::oversight::notify::links::{self, LinkClaims, LinkError, LinkSigner};
use creto_gateways::oversight::notify::webhook::verify_signature;
use creto_gateways::oversight::notify::{
    Notification, Notifier, NotifyConfig, NOTIFICATION_SECONDS,
};
use creto_schemas::oversight::v1::{
    Action, ApprovalRequest, Channel, Decision, Priority, State as RequestState,
};
use serde_json::Value;

const LINK_SECRET: &str = "link-secret-for-tests";
const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";
const PUBLIC_URL: &str = "http://127.0.0.1:9091";

// ---- an HTTP receiver -------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Hit {
    route: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Receiver {
    hits: Mutex<Vec<Hit>>,
    /// `/flaky` answers 500 this many times, then 200.
    flaky_failures_left: AtomicU32,
}

impl Receiver {
    fn hits(&self, route: &str) -> Vec<Hit> {
        let hits = self.hits.lock().unwrap();
        hits.iter().filter(|h| h.route == route).cloned().collect()
    }
}

/// `/slack` and `/webhook` answer 200 "ok"; `/flaky` fails first; `/down` always answers 500.
async fn receive(
    State(r): State<Arc<Receiver>>,
    UrlPath(route): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    r.hits.lock().unwrap().push(Hit {
        route: route.clone(),
        headers,
        body,
    });
    match route.as_str() {
        "down" => (StatusCode::INTERNAL_SERVER_ERROR, "receiver down"),
        "flaky" => {
            let failing = r
                .flaky_failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                (StatusCode::INTERNAL_SERVER_ERROR, "try again")
            } else {
                (StatusCode::OK, "ok")
            }
        }
        _ => (StatusCode::OK, "ok"),
    }
}

async fn start_receiver(flaky_failures: u32) -> (SocketAddr, Arc<Receiver>) {
    let receiver = Arc::new(Receiver {
        flaky_failures_left: AtomicU32::new(flaky_failures),
        ..Receiver::default()
    });
    let app = Router::new()
        .route("/{route}", post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, receiver)
}

// ---- fixtures ---------------------------------------------------------------------------

fn request(approvers: &[&str]) -> ApprovalRequest {
    ApprovalRequest {
        request_id: "0190d6a4-7c1e-7000-8000-000000000001".into(),
        agent_id: "agent-7".into(),
        action: Some(Action {
            name: "payments.refund".into(),
            parameters_json: r#"{"amount":120,"currency":"EUR","order":"A-17"}"#.into(),
        }),
        context: "Customer says the parcel never arrived; carrier confirms loss.".into(),
        priority: Priority::High as i32,
        policy_id: "refunds".into(),
        state: RequestState::Pending as i32,
        level: 0,
        approvers: approvers.iter().map(|a| a.to_string()).collect(),
        quorum: 1,
        created_at: Some(prost_types::Timestamp {
            seconds: 1_750_000_000,
            nanos: 0,
        }),
        deadline: Some(prost_types::Timestamp {
            seconds: 1_750_003_600,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn config() -> NotifyConfig {
    NotifyConfig {
        public_url: Some(PUBLIC_URL.into()),
        link_secret: Some(LINK_SECRET.into()),
        webhook_secret: Some(WEBHOOK_SECRET.into()),
        attempts: 5,
        backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(5),
        ..NotifyConfig::default()
    }
}

fn notification(notifier: &Notifier, approvers: &[&str]) -> Notification {
    let request = request(approvers);
    Notification {
        tenant: "acme".into(),
        links: notifier.links("acme", &request.request_id, ""),
        request,
        level: 0,
    }
}

/// The token in a `...respond?token=<token>` link, verified with the link secret.
fn claims_of(link: &str) -> LinkClaims {
    let token = link
        .split_once("?token=")
        .unwrap_or_else(|| panic!("no token in {link}"))
        .1;
    links::verify(LINK_SECRET.as_bytes(), token, SystemTime::now()).unwrap()
}

// ---- Slack ------------------------------------------------------------------------------

#[tokio::test]
async fn slack_message_has_header_parameters_and_link_buttons() {
    let (addr, receiver) = start_receiver(0).await;
    let notifier = Notifier::new(NotifyConfig {
        slack_webhook_url: Some(format!("http://{addr}/slack")),
        slack_links: true,
        ..config()
    });
    let n = notification(&notifier, &["alice@example.org"]);
    let senders = notifier.senders_for(&[Channel::Slack]);
    assert_eq!(senders.len(), 1);
    let delivered = notifier.deliver(senders[0], &n).await;
    assert!(delivered.ok, "{delivered:?}");
    assert_eq!(delivered.attempts, 1);
    assert_eq!(delivered.channel, Channel::Slack as i32);
    assert_eq!(delivered.request_id, n.request.request_id);

    let hits = receiver.hits("slack");
    assert_eq!(hits.len(), 1);
    let msg: Value = serde_json::from_slice(&hits[0].body).unwrap();
    let blocks = msg["blocks"].as_array().unwrap();
    let header = blocks.iter().find(|b| b["type"] == "header").unwrap();
    let header_text = header["text"]["text"].as_str().unwrap();
    assert!(
        header_text.contains("payments.refund") && header_text.contains("HIGH"),
        "{header_text}"
    );
    let all_text = msg.to_string();
    assert!(all_text.contains("agent-7"));
    assert!(all_text.contains("carrier confirms loss"));
    assert!(all_text.contains("```"), "parameters in a code block");
    assert!(all_text.contains(r#"\"amount\": 120"#), "{all_text}");

    let links = n.links.clone().unwrap();
    let actions = blocks.iter().find(|b| b["type"] == "actions").unwrap();
    let buttons = actions["elements"].as_array().unwrap();
    let button = |label: &str| {
        buttons
            .iter()
            .find(|b| b["text"]["text"] == label)
            .unwrap_or_else(|| panic!("no {label} button in {actions}"))
    };
    assert_eq!(button("Approve")["url"], links.approve.as_str());
    assert_eq!(button("Approve")["style"], "primary");
    assert_eq!(button("Deny")["url"], links.deny.as_str());
    assert_eq!(button("Deny")["style"], "danger");
    assert!(links.approve.starts_with(&format!(
        "{PUBLIC_URL}/approvals/acme/{}/respond?token=",
        n.request.request_id
    )));
    let approve = claims_of(&links.approve);
    assert_eq!(approve.decision, Decision::Approve);
    assert_eq!(
        (approve.tenant.as_str(), approve.request_id.as_str()),
        ("acme", n.request.request_id.as_str())
    );
    assert_eq!(claims_of(&links.deny).decision, Decision::Deny);
}

/// A link answers as the approver it names for whoever clicks it: one incoming webhook posts
/// every tenant's requests to a channel many read, so by default Slack gets no link at all.
#[tokio::test]
async fn slack_carries_no_links_unless_it_posts_to_the_approver_alone() {
    let (addr, receiver) = start_receiver(0).await;
    let notifier = Notifier::new(NotifyConfig {
        slack_webhook_url: Some(format!("http://{addr}/slack")),
        ..config()
    });
    let n = notification(&notifier, &["alice@example.org"]);
    let links = n.links.clone().expect("the notifier signs links");
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Slack])[0], &n)
        .await;
    assert!(delivered.ok, "{delivered:?}");
    let body = String::from_utf8(receiver.hits("slack")[0].body.to_vec()).unwrap();
    for link in [&links.approve, &links.deny, &links.page] {
        let token = link.split_once("?token=").map_or(link.as_str(), |t| t.1);
        assert!(!body.contains(token), "a signed link in Slack: {body}");
    }
    assert!(!body.contains("token="), "{body}");
    assert!(body.contains("e-mailed"), "{body}");
    assert!(
        NotifyConfig::from_vars(|v| (v == "OVERSIGHT_SLACK_LINKS").then(|| "approver".into()))
            .slack_links
    );
    assert!(
        !NotifyConfig::from_vars(|v| (v == "OVERSIGHT_SLACK_LINKS").then(|| "yes".into()))
            .slack_links
    );
}

#[tokio::test]
async fn slack_escapes_agent_text() {
    let (addr, receiver) = start_receiver(0).await;
    let notifier = Notifier::new(NotifyConfig {
        slack_webhook_url: Some(format!("http://{addr}/slack")),
        public_url: None,
        ..config()
    });
    let mut n = notification(&notifier, &[]);
    assert!(n.links.is_none(), "no public URL: no links");
    n.request.context = "<!channel> please approve <https://evil.example|here>".into();
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Slack])[0], &n)
        .await;
    assert!(delivered.ok, "{delivered:?}");
    let body = String::from_utf8(receiver.hits("slack")[0].body.to_vec()).unwrap();
    assert!(!body.contains("<!channel>"), "{body}");
    assert!(body.contains("&lt;!channel&gt;"), "{body}");
    assert!(
        !body.contains(r#""type":"actions""#),
        "no buttons without links: {body}"
    );
}

// ---- webhook ----------------------------------------------------------------------------

#[tokio::test]
async fn webhook_is_signed_and_carries_the_request() {
    let (addr, receiver) = start_receiver(0).await;
    let notifier = Notifier::new(NotifyConfig {
        webhook_url: Some(format!("http://{addr}/webhook")),
        ..config()
    });
    let n = notification(&notifier, &["alice@example.org", "bob"]);
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Webhook])[0], &n)
        .await;
    assert!(delivered.ok, "{delivered:?}");
    assert_eq!((delivered.attempts, delivered.detail.as_str()), (1, ""));

    let hits = receiver.hits("webhook");
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    let header = |name: &str| hit.headers.get(name).unwrap().to_str().unwrap().to_owned();
    let timestamp = header("x-creto-timestamp");
    let signature = header("x-creto-signature");
    assert!(signature.starts_with("v1="), "{signature}");
    let sent_at: u64 = timestamp.parse().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(sent_at) < 60);
    assert_eq!(header("content-type"), "application/json");

    assert!(verify_signature(
        WEBHOOK_SECRET.as_bytes(),
        &timestamp,
        &hit.body,
        &signature
    ));
    assert!(!verify_signature(
        b"another secret",
        &timestamp,
        &hit.body,
        &signature
    ));
    let mut altered = hit.body.to_vec();
    altered[10] ^= 1;
    assert!(!verify_signature(
        WEBHOOK_SECRET.as_bytes(),
        &timestamp,
        &altered,
        &signature
    ));
    assert!(!verify_signature(
        WEBHOOK_SECRET.as_bytes(),
        &(sent_at + 1).to_string(),
        &hit.body,
        &signature
    ));
    // A rotation header lists several signatures: one match is enough.
    assert!(verify_signature(
        WEBHOOK_SECRET.as_bytes(),
        &timestamp,
        &hit.body,
        &format!("v1=00ff, {signature}")
    ));

    let body: Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(body["request_id"], n.request.request_id.as_str());
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["agent_id"], "agent-7");
    assert_eq!(body["action"]["name"], "payments.refund");
    assert_eq!(body["action"]["parameters"]["amount"], 120);
    assert_eq!(body["priority"], "HIGH");
    assert_eq!(body["state"], "PENDING");
    assert_eq!(body["level"], 0);
    assert_eq!(
        body["approvers"],
        serde_json::json!(["alice@example.org", "bob"])
    );
    assert_eq!(body["deadline"], "2025-06-15T16:06:40Z");
    assert_eq!(body["context"], n.request.context.as_str());
    assert_eq!(
        body["links"]["approve"],
        n.links.as_ref().unwrap().approve.as_str()
    );
}

#[tokio::test]
async fn deliver_retries_until_the_receiver_answers() {
    let (addr, receiver) = start_receiver(2).await;
    let notifier = Notifier::new(NotifyConfig {
        webhook_url: Some(format!("http://{addr}/flaky")),
        ..config()
    });
    let n = notification(&notifier, &["alice@example.org"]);
    let before = NOTIFICATION_SECONDS
        .with_label_values(&["webhook"])
        .get_sample_count();
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Webhook])[0], &n)
        .await;
    assert!(delivered.ok, "{delivered:?}");
    assert_eq!(delivered.attempts, 3);
    assert!(delivered.detail.contains("500"), "{}", delivered.detail);
    assert_eq!(receiver.hits("flaky").len(), 3);
    // Backoff 10 ms then 20 ms.
    assert!(
        delivered.duration_seconds >= 0.03,
        "{}",
        delivered.duration_seconds
    );
    let after = NOTIFICATION_SECONDS
        .with_label_values(&["webhook"])
        .get_sample_count();
    assert!(after > before, "the histogram recorded the delivery");
}

#[tokio::test]
async fn deliver_reports_a_receiver_that_stays_down() {
    let (addr, receiver) = start_receiver(0).await;
    let notifier = Notifier::new(NotifyConfig {
        webhook_url: Some(format!("http://{addr}/down")),
        attempts: 3,
        ..config()
    });
    let n = notification(&notifier, &["alice@example.org"]);
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Webhook])[0], &n)
        .await;
    assert!(!delivered.ok);
    assert_eq!(delivered.attempts, 3);
    assert_eq!(receiver.hits("down").len(), 3);
    assert!(
        delivered.detail.contains("HTTP 500"),
        "{}",
        delivered.detail
    );
    assert!(
        delivered.detail.contains("receiver down"),
        "{}",
        delivered.detail
    );
}

#[tokio::test]
async fn deliver_reports_a_refused_connection() {
    // A port that was free a moment ago: nothing listens there.
    let port = spare_port();
    let notifier = Notifier::new(NotifyConfig {
        webhook_url: Some(format!("http://127.0.0.1:{port}/webhook")),
        attempts: 2,
        ..config()
    });
    let n = notification(&notifier, &[]);
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Webhook])[0], &n)
        .await;
    assert!(!delivered.ok);
    assert_eq!(delivered.attempts, 2);
    assert!(!delivered.detail.is_empty());
    assert!(
        !delivered.detail.contains(&port.to_string()),
        "no URL in the detail: {}",
        delivered.detail
    );
}

#[test]
fn senders_for_keeps_configured_channels_in_order_once() {
    let notifier = Notifier::new(NotifyConfig {
        slack_webhook_url: Some("http://127.0.0.1:1/slack".into()),
        webhook_url: Some("http://127.0.0.1:1/webhook".into()),
        ..config()
    });
    let channels: Vec<Channel> = notifier
        .senders_for(&[
            Channel::Email,
            Channel::Webhook,
            Channel::Unspecified,
            Channel::Slack,
            Channel::Webhook,
        ])
        .iter()
        .map(|s| s.channel())
        .collect();
    assert_eq!(channels, [Channel::Webhook, Channel::Slack]);
    let none = Notifier::new(NotifyConfig::default());
    assert!(none
        .senders_for(&[Channel::Slack, Channel::Email, Channel::Webhook])
        .is_empty());
    assert!(none.links("acme", "r", "alice").is_none());
}

#[test]
fn config_from_variables() {
    let vars = |name: &str| {
        match name {
            "OVERSIGHT_SMTP_URL" => Some("smtp://127.0.0.1:2525"),
            "OVERSIGHT_EMAIL_FROM" => Some("Oversight <ov@example.com>"),
            "OVERSIGHT_WEBHOOK_URL" => Some("https://hooks.example.com/x"),
            "OVERSIGHT_WEBHOOK_SECRET" => Some("s"),
            "OVERSIGHT_SLACK_WEBHOOK_URL" => Some(""),
            "OVERSIGHT_LINK_TTL" => Some("2h 30m"),
            "OVERSIGHT_EMAIL_DOMAINS" => Some(" Example.com, @corp.example ,"),
            _ => None,
        }
        .map(str::to_owned)
    };
    let c = NotifyConfig::from_vars(vars);
    assert_eq!(c.smtp_url.as_deref(), Some("smtp://127.0.0.1:2525"));
    assert_eq!(c.email_from, "Oversight <ov@example.com>");
    assert_eq!(c.slack_webhook_url, None, "empty is unset");
    assert_eq!(c.link_ttl, Duration::from_secs(9000));
    assert_eq!(c.email_domains, ["example.com", "corp.example"]);
    assert_eq!(c.attempts, 5);
    assert_eq!(c.backoff, Duration::from_millis(200));
    assert_eq!(c.backoff_max, Duration::from_secs(10));
    assert!(
        !format!("{c:?}").contains("\"s\""),
        "secrets stay out of Debug"
    );
    let d = NotifyConfig::from_vars(|_| None);
    assert_eq!(d.link_ttl, Duration::from_secs(24 * 3600));
}

// ---- e-mail, through a real SMTP server ------------------------------------------------------

fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Python that has aiosmtpd: `.ci/services.sh` installs it in /opt/aiosmtpd when the system
/// Python lacks it.
fn aiosmtpd_python() -> PathBuf {
    for python in ["/opt/aiosmtpd/bin/python", "python3"] {
        let ok = Command::new(python)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return PathBuf::from(python);
        }
    }
    panic!(
        "aiosmtpd is not installed (`python3 -c \"import aiosmtpd\"` fails): run `bash .ci/services.sh` \
         (as root), which installs it in /opt/aiosmtpd"
    );
}

/// aiosmtpd on a spare port, writing every message into a maildir; killed on drop.
struct SmtpSink {
    child: Child,
    port: u16,
    maildir: PathBuf,
    python: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_smtp_sink() -> SmtpSink {
    let python = aiosmtpd_python();
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("maildir");
    let port = spare_port();
    let child = Command::new(&python)
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(&maildir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aiosmtpd");
    let mut sink = SmtpSink {
        child,
        port,
        maildir,
        python,
        _dir: dir,
    };
    for _ in 0..150 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return sink;
        }
        if let Some(status) = sink.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = sink.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("aiosmtpd exited ({status}) before listening on {port}: {err}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("aiosmtpd did not listen on 127.0.0.1:{port} within 15 s");
}

/// The messages in the maildir, parsed by Python's own e-mail package (which undoes the
/// quoted-printable body encoding): subject, from, to, envelope recipients and text body.
fn read_maildir(python: &Path, maildir: &Path) -> Vec<Value> {
    let script = r#"
import email, email.policy, glob, json, os, sys
out = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "new", "*"))):
    with open(path, "rb") as f:
        m = email.message_from_binary_file(f, policy=email.policy.default)
    out.append({"subject": str(m["subject"]), "from": str(m["from"]), "to": str(m["to"]),
                "rcpt_to": str(m["X-RcptTo"]), "body": m.get_content()})
print(json.dumps(out))
"#;
    let out = Command::new(python)
        .args(["-c", script])
        .arg(maildir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn link_after<'a>(body: &'a str, label: &str) -> &'a str {
    let line = body
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in {body}"));
    line[label.len()..].trim()
}

/// A tenant's policy may name any address: with OVERSIGHT_EMAIL_DOMAINS set, only those
/// domains are mailed (the others are left out, not retried).
#[tokio::test]
async fn email_goes_only_to_the_allowed_domains() {
    let sink = start_smtp_sink().await;
    let notifier = Notifier::new(NotifyConfig {
        smtp_url: Some(format!("smtp://127.0.0.1:{}", sink.port)),
        email_to_domain: Some("example.com".into()),
        email_domains: vec!["example.com".into()],
        ..config()
    });
    let n = notification(
        &notifier,
        &["alice@example.org", "bob", "carol@EXAMPLE.com"],
    );
    let senders = notifier.senders_for(&[Channel::Email]);
    let delivered = notifier.deliver(senders[0], &n).await;
    assert!(delivered.ok && delivered.attempts == 1, "{delivered:?}");
    let mut to: Vec<String> = read_maildir(&sink.python, &sink.maildir)
        .iter()
        .map(|m| m["to"].as_str().unwrap().to_owned())
        .collect();
    to.sort();
    assert_eq!(to, ["bob@example.com", "carol@EXAMPLE.com"]);
}

#[tokio::test]
async fn email_reaches_each_approver_with_their_own_links() {
    let sink = start_smtp_sink().await;
    let notifier = Notifier::new(NotifyConfig {
        smtp_url: Some(format!("smtp://127.0.0.1:{}", sink.port)),
        email_from: "Creto Oversight <oversight@example.net>".into(),
        email_to_domain: Some("example.com".into()),
        ..config()
    });
    let n = notification(&notifier, &["alice@example.org", "bob"]);
    let senders = notifier.senders_for(&[Channel::Email]);
    assert_eq!(senders.len(), 1);
    let delivered = notifier.deliver(senders[0], &n).await;
    assert!(delivered.ok, "{delivered:?}");
    assert_eq!(
        (delivered.attempts, delivered.channel),
        (1, Channel::Email as i32)
    );

    let mut messages = read_maildir(&sink.python, &sink.maildir);
    assert_eq!(messages.len(), 2, "{messages:?}");
    messages.sort_by_key(|m| m["to"].as_str().unwrap().to_owned());
    for (m, (address, approver)) in messages.iter().zip([
        ("alice@example.org", "alice@example.org"),
        ("bob@example.com", "bob"),
    ]) {
        assert_eq!(
            m["subject"],
            "[Approval needed][HIGH] payments.refund by agent-7"
        );
        assert_eq!(m["to"], address);
        assert_eq!(m["rcpt_to"], address);
        assert_eq!(m["from"], "Creto Oversight <oversight@example.net>");
        let body = m["body"].as_str().unwrap();
        assert!(body.contains("carrier confirms loss"), "{body}");
        assert!(body.contains(r#""currency": "EUR""#), "{body}");
        let approve = link_after(body, "Approve:");
        let deny = link_after(body, "Deny:");
        let page = link_after(body, "Open the request:");
        let base = format!("{PUBLIC_URL}/approvals/acme/{}", n.request.request_id);
        assert!(page.starts_with(&format!("{base}?token=")), "{page}");
        assert!(
            approve.starts_with(&format!("{base}/respond?token=")),
            "{approve}"
        );
        let approve = claims_of(approve);
        assert_eq!(
            (approve.approver.as_str(), approve.decision),
            (approver, Decision::Approve)
        );
        let deny = claims_of(deny);
        assert_eq!(
            (deny.approver.as_str(), deny.decision),
            (approver, Decision::Deny)
        );
    }
}

/// A retry mails only the recipients that failed: each retry used to mail everyone again,
/// each time with other links.
#[tokio::test]
async fn an_email_retry_mails_only_who_was_not_reached() {
    let sink = start_smtp_sink().await;
    let notifier = Notifier::new(NotifyConfig {
        smtp_url: Some(format!("smtp://127.0.0.1:{}", sink.port)),
        attempts: 3,
        backoff: Duration::from_millis(10),
        ..config()
    });
    // "bad@" is no address: that recipient fails every attempt.
    let n = notification(&notifier, &["alice@example.org", "bad@"]);
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Email])[0], &n)
        .await;
    assert!(!delivered.ok, "{delivered:?}");
    assert_eq!(delivered.attempts, 3, "{delivered:?}");
    assert!(delivered.detail.contains("bad@"), "{}", delivered.detail);
    let messages = read_maildir(&sink.python, &sink.maildir);
    assert_eq!(messages.len(), 1, "alice mailed once: {messages:?}");
}

#[tokio::test]
async fn email_without_any_address_fails_with_a_reason() {
    let notifier = Notifier::new(NotifyConfig {
        // Never contacted: no approver has an address.
        smtp_url: Some("smtp://127.0.0.1:1".into()),
        attempts: 1,
        ..config()
    });
    let n = notification(&notifier, &["alice", "bob"]);
    let delivered = notifier
        .deliver(notifier.senders_for(&[Channel::Email])[0], &n)
        .await;
    assert!(!delivered.ok);
    assert!(
        delivered
            .detail
            .contains("no approver has an e-mail address"),
        "{}",
        delivered.detail
    );
}

// ---- signed links -----------------------------------------------------------------------

fn claims(now: SystemTime) -> LinkClaims {
    LinkClaims::new(
        "acme",
        "req-1",
        "alice@example.org",
        Decision::Approve,
        now,
        Duration::from_secs(3600),
    )
}

#[test]
fn link_round_trip() {
    let now = SystemTime::now();
    let c = claims(now);
    assert_eq!(c.nonce.len(), 32);
    assert_ne!(c.nonce, claims(now).nonce, "fresh nonce each time");
    let token = links::sign(b"k", &c);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "{token}"
    );
    assert_eq!(
        links::verify(b"k", &token, now + Duration::from_secs(3599)),
        Ok(c)
    );
}

#[test]
fn link_tampered_is_refused() {
    let now = SystemTime::now();
    let token = links::sign(b"k", &claims(now));
    let (payload, tag) = token.split_once('.').unwrap();
    // Claims rewritten to another approver and decision, old signature kept.
    let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let forged = json
        .replace("alice@example.org", "mallory@example.org")
        .replace("DECISION_APPROVE", "DECISION_DENY");
    let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(forged));
    assert_eq!(
        links::verify(b"k", &forged, now),
        Err(LinkError::BadSignature)
    );
    // A changed signature.
    let mut bad_tag = URL_SAFE_NO_PAD.decode(tag).unwrap();
    bad_tag[0] ^= 1;
    let token2 = format!("{payload}.{}", URL_SAFE_NO_PAD.encode(bad_tag));
    assert_eq!(
        links::verify(b"k", &token2, now),
        Err(LinkError::BadSignature)
    );
    // Not a token at all.
    assert!(matches!(
        links::verify(b"k", "garbage", now),
        Err(LinkError::Malformed(_))
    ));
    assert!(matches!(
        links::verify(b"k", "a.b!c", now),
        Err(LinkError::Malformed(_))
    ));
}

#[test]
fn link_expired_is_refused() {
    let now = SystemTime::now();
    let c = claims(now);
    let token = links::sign(b"k", &c);
    let err = links::verify(b"k", &token, now + Duration::from_secs(3600)).unwrap_err();
    assert_eq!(
        err,
        LinkError::Expired {
            expires_at: c.expires_at
        }
    );
    assert!(err.to_string().contains("expired"), "{err}");
}

#[test]
fn link_with_another_secret_is_refused() {
    let now = SystemTime::now();
    let token = links::sign(b"one secret", &claims(now));
    assert_eq!(
        links::verify(b"another secret", &token, now),
        Err(LinkError::BadSignature)
    );
}

#[test]
fn link_signer_makes_two_tokens_per_approver() {
    let signer = LinkSigner::new(
        "https://oversight.example.com/",
        LINK_SECRET.as_bytes(),
        Duration::from_secs(60),
    );
    let l = signer.links("acme", "req 1", "bob");
    assert!(l
        .page
        .starts_with("https://oversight.example.com/approvals/acme/req%201?token="));
    assert!(l
        .approve
        .starts_with("https://oversight.example.com/approvals/acme/req%201/respond?token="));
    assert_ne!(l.approve, l.deny);
    let approve = claims_of(&l.approve);
    assert_eq!(
        (
            approve.tenant.as_str(),
            approve.request_id.as_str(),
            approve.approver.as_str(),
            approve.decision
        ),
        ("acme", "req 1", "bob", Decision::Approve)
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(approve.expires_at > now && approve.expires_at <= now + 60);
    // A level that waits three days: the links last until its deadline (not a minute, then
    // nothing to answer with); past the longest a link may work, that longest.
    let in_days = |d: u64| SystemTime::now() + Duration::from_secs(d * 86_400);
    let until = |deadline| {
        let l = signer.links_until("acme", "req 1", "bob", Some(deadline));
        claims_of(&l.approve).expires_at
    };
    assert!(until(in_days(3)).abs_diff(now + 3 * 86_400) <= 2);
    assert!(until(in_days(30)).abs_diff(now + 7 * 86_400) <= 2);
    assert!(
        until(SystemTime::now()) <= now + 61,
        "a deadline sooner: the usual lifetime"
    );
}
