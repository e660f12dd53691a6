//! Oversight on loopback: the gateway (`Env::new`, unauthenticated), the real NATS JetStream
//! and an in-process axum webhook receiver, all on this machine. In one run:
//!
//! 0. baselines, first, on a quiet server: a raw JetStream publish round trip (async-nats,
//!    publish with ack, one at a time, with the headers, expected-sequence and size of a
//!    `Requested` event), and a raw HTTP POST round trip (reqwest, keep-alive) of a webhook
//!    body of the real size to the same receiver.
//! 1. request created → webhook delivered: one agent, one request at a time (the next is
//!    created once the previous one's webhook arrived); from before `CreateRequest` to the
//!    receiver's handler (timestamped by `request_id`). Goal: p95 under 50 ms. Printed with
//!    its parts: the `CreateRequest` round trip, what one catch-up of a gateway's view costs
//!    (a second view of the same stream, caught up between the timed requests; CreateRequest
//!    makes two), and answer → webhook. Then BENCH_AGENTS (8) agents creating
//!    BENCH_THROUGHPUT_REQUESTS (1,000) back to back: requests/s created and delivered.
//! 2. BENCH_TIMERS (10,000) pending requests with live timers, created by BENCH_TIMER_TASKS
//!    (16) tasks under a policy whose level times out after BENCH_TIMEOUT_SECONDS (20), so that
//!    creation ends before the first deadline: for each, the lateness of its `TimedOut` event
//!    (`recorded_at` in the log − the deadline of its `Requested` event). Goal: every one
//!    within 1 s. Every request is then checked to be `TIMED_OUT` with `GetRequest` (the tenant
//!    rate limit of 500/s makes that ~20 s). By default the tasks append the `Requested` events
//!    CreateRequest would append (same domain decision, subject, id and expected sequence)
//!    straight to the log, and the gateway picks them up by tailing it: through CreateRequest
//!    (BENCH_TIMERS_VIA=grpc) creation runs at a few dozen requests/s on nats-server 2.9 (every
//!    catch-up of the view creates a JetStream consumer whose cost grows with the subjects in
//!    the stream), so 10,000 take minutes and pass their own deadlines.
//! 3. rebuild rate: `enablement replay oversight --rebuild` (every table made again from the
//!    stream this run wrote, in one transaction) next to a raw ordered pull consumer reading
//!    the same stream; run twice, the second must leave the same rows.
//!
//! `cargo bench -p creto-replay-tests --bench oversight` (BENCH_LATENCY_REQUESTS, default 500).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use creto_domain::oversight::{request, Aggregate};
use creto_gateways::oversight::fold::OversightView;
use creto_gateways::oversight::notify::{webhook, Notification, NotifyConfig};
use creto_gateways::oversight::service::request_append;
use creto_replay_tests::Env;
use creto_schemas::oversight::v1 as pb;
use creto_schemas::oversight::v1::oversight_service_client::OversightServiceClient;
use creto_schemas::oversight::v1::{Priority, State, TimeoutAction};
use creto_streams::headers::{content_types, names};
use creto_streams::{Catalog, EventLog, ReplayFrom, OVERSIGHT};
use futures::TryStreamExt;
use prost::Message;
use tokio::sync::Notify;
use tonic::transport::Channel;

type Client = OversightServiceClient<Channel>;

const TENANT: &str = "default";
const SECRET: &str = "bench-webhook-secret";
/// Longest wait for one webhook before the bench gives up.
const WAIT: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the webhook receiver saw: the first arrival of each request id.
#[derive(Default)]
struct Hooks {
    seen: Mutex<HashMap<String, Instant>>,
    calls: std::sync::atomic::AtomicUsize,
    arrived: Notify,
}

impl Hooks {
    fn record(&self, at: Instant, body: &[u8]) {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["request_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        self.seen.lock().unwrap().entry(id).or_insert(at);
        self.arrived.notify_waiters();
    }

    fn get(&self, id: &str) -> Option<Instant> {
        self.seen.lock().unwrap().get(id).copied()
    }

    /// When the webhook of `id` arrived, waiting for it.
    async fn wait(&self, id: &str) -> Instant {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(t) = self.get(id) {
                return t;
            }
            if tokio::time::timeout_at(until, arrived).await.is_err() {
                panic!("no webhook for {id} within {WAIT:?}");
            }
        }
    }

    /// Waits until every id of `ids` arrived; returns their arrival times in order.
    async fn wait_all(&self, ids: &[String]) -> Vec<Instant> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.wait(id).await);
        }
        out
    }
}

/// The receiver: POST /hook, timestamped on arrival, answered 200.
async fn receiver(hooks: Arc<Hooks>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: Bytes| {
            let at = Instant::now();
            let hooks = hooks.clone();
            async move {
                hooks.record(at, &body);
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn level(timeout: Duration) -> pb::Level {
    pb::Level {
        approvers: vec!["ann".into()],
        timeout: Some(timeout.try_into().unwrap()),
    }
}

fn policy(id: &str, action: &str, timeout: Duration) -> pb::Policy {
    pb::Policy {
        policy_id: id.into(),
        action: action.into(),
        require_approval: true,
        quorum: 1,
        levels: vec![level(timeout)],
        on_timeout: TimeoutAction::Deny as i32,
        ..Default::default()
    }
}

fn ask(id: &str, agent: &str, action: &str) -> pb::CreateRequestRequest {
    pb::CreateRequestRequest {
        request_id: id.into(),
        agent_id: agent.into(),
        action: Some(pb::Action {
            name: action.into(),
            parameters_json: r#"{"service": "billing", "version": "2025.06.1", "replicas": 3}"#
                .into(),
        }),
        context: "Deploy billing 2025.06.1 to production (canary passed)".into(),
        priority: Priority::High as i32,
    }
}

/// Worth retrying: the tenant's rate limit (500 requests/s, on even without authentication),
/// or a transient failure.
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::ResourceExhausted
    )
}

/// The request as GetRequest answers, retrying transient failures.
async fn get(c: &mut Client, id: &str) -> pb::ApprovalRequest {
    let mut tries = 0;
    loop {
        match c
            .get_request(pb::GetRequestRequest {
                request_id: id.into(),
            })
            .await
        {
            Ok(r) => return r.into_inner(),
            Err(s) if tries < 100 && transient(&s) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("GetRequest {id}: {s}"),
        }
    }
}

/// Creates a request, retrying transient failures; panics on anything else.
async fn create(c: &mut Client, cmd: pb::CreateRequestRequest) -> pb::CreateRequestResponse {
    let mut tries = 0;
    loop {
        match c.create_request(cmd.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if tries < 100 && transient(&s) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("CreateRequest {}: {s}", cmd.request_id),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `p50 … p95 … p99 … max …` in ms.
fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:>7.2} | p95 {:>7.2} | p99 {:>7.2} | max {:>7.2} ms",
        ms(pct(&v, 0.50)),
        ms(pct(&v, 0.95)),
        ms(pct(&v, 0.99)),
        ms(v.last().copied().unwrap_or_default())
    )
}

fn time_of(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// The `Requested` event the latency phase creates, and the webhook body it gives: the sizes
/// the baselines use.
fn sample_event_and_body() -> (pb::RequestEvent, Vec<u8>) {
    let p = policy("deploys", "deploy.*", Duration::from_secs(3600));
    let event = request::create(
        &ask("lat-00000", "deploy-bot", "deploy.production"),
        std::slice::from_ref(&p),
        Utc::now(),
    )
    .unwrap();
    let mut agg = Aggregate::default();
    agg.apply(&event, 1);
    let body = serde_json::to_vec(&webhook::payload(&Notification {
        tenant: TENANT.into(),
        request: agg.view.clone(),
        level: 0,
        links: None,
    }))
    .unwrap();
    (event, body)
}

#[tokio::main]
async fn main() {
    let n_lat = env_usize("BENCH_LATENCY_REQUESTS", 500);
    let n_thr = env_usize("BENCH_THROUGHPUT_REQUESTS", 1_000);
    let agents = env_usize("BENCH_AGENTS", 8);
    let n_timers = env_usize("BENCH_TIMERS", 10_000);
    let timer_tasks = env_usize("BENCH_TIMER_TASKS", 16);
    let timeout = Duration::from_secs(env_usize("BENCH_TIMEOUT_SECONDS", 20) as u64);
    // The timers' requests go through CreateRequest, or (default) straight to the log as
    // CreateRequest appends them (module docs).
    let via_grpc = std::env::var("BENCH_TIMERS_VIA").is_ok_and(|v| v == "grpc");

    let env = Env::new().await;
    let hooks = Arc::new(Hooks::default());
    let addr = receiver(hooks.clone()).await;
    let hook_url = format!("http://{addr}/hook");

    // 0. Baselines on a quiet server.
    let (sample, body) = sample_event_and_body();
    let payload = Bytes::from(sample.encode_to_vec());
    let nats = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = jetstream::new(nats.clone());
    let raw_catalog = Catalog::namespaced(&format!("{}raw", env.name));
    let raw_log =
        creto_streams::jetstream::JetStreamLog::from_client(nats.clone(), raw_catalog.clone())
            .await
            .unwrap();
    raw_log.ensure_streams(&raw_catalog.specs()).await.unwrap();
    let mut raw_js = Vec::with_capacity(n_lat);
    for i in 0..n_lat + 50 {
        let subject = raw_catalog.subject(&format!("oversight.requests.{TENANT}.raw-{i:05}"));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(names::CONTENT_TYPE, content_types::PROTOBUF);
        headers.insert(names::EVENT_TYPE, "oversight.requested");
        headers.insert(names::TENANT, TENANT);
        let message = PublishMessage::build()
            .payload(payload.clone())
            .headers(headers)
            .message_id(format!("{subject}:0:raw"))
            .expected_last_subject_sequence(0);
        let t0 = Instant::now();
        js.send_publish(subject, message)
            .await
            .unwrap()
            .await
            .unwrap();
        if i >= 50 {
            raw_js.push(t0.elapsed());
        }
    }
    let http = reqwest::Client::new();
    let mut raw_http = Vec::with_capacity(n_lat);
    let body_text = String::from_utf8(body.clone()).unwrap();
    for i in 0..n_lat + 50 {
        let b = body_text.replacen("lat-00000", &format!("raw-{i:05}"), 1);
        let ts = Utc::now().timestamp().to_string();
        let sig = webhook::signature(SECRET.as_bytes(), &ts, b.as_bytes());
        let t0 = Instant::now();
        let resp = http
            .post(&hook_url)
            .header("content-type", "application/json")
            .header(webhook::TIMESTAMP_HEADER, ts)
            .header(webhook::SIGNATURE_HEADER, sig)
            .body(b)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        if i >= 50 {
            raw_http.push(t0.elapsed());
        }
    }

    println!(
        "oversight on loopback: Requested event {} bytes, webhook body {} bytes",
        payload.len(),
        body.len()
    );
    println!("baseline  raw JetStream publish+ack  {}", summary(raw_js));
    println!("baseline  raw HTTP POST to receiver  {}", summary(raw_http));

    // 1. Created → webhook delivered.
    let running = env
        .start_oversight_notifying(NotifyConfig {
            webhook_url: Some(hook_url.clone()),
            webhook_secret: Some(SECRET.into()),
            ..Default::default()
        })
        .await;
    let url = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = Client::connect(url.clone()).await.unwrap();
    let timer_policy = policy("timers", "timer.*", timeout);
    for p in [
        policy("deploys", "deploy.*", Duration::from_secs(3600)),
        timer_policy.clone(),
    ] {
        c.put_policy(pb::PutPolicyRequest { policy: Some(p) })
            .await
            .unwrap();
    }
    // Warm-up (the notifier's consumer may not exist yet: its first requests may go
    // unannounced, so each warm-up request gets a short wait of its own).
    let mut warmed = 0;
    for i in 0..200 {
        let id = format!("warm-{i:05}");
        create(&mut c, ask(&id, "deploy-bot", "deploy.production")).await;
        let got = tokio::time::timeout(Duration::from_secs(2), hooks.wait(&id)).await;
        if got.is_ok() {
            warmed += 1;
            if warmed == 20 {
                break;
            }
        }
    }
    assert_eq!(warmed, 20, "webhooks arrive");

    let mut created = Vec::with_capacity(n_lat);
    let mut delivered = Vec::with_capacity(n_lat);
    let mut after_created = Vec::with_capacity(n_lat);
    // What one catch-up of a gateway's view costs here (CreateRequest makes two): a second
    // view of the same stream, caught up between the timed requests.
    let probe_view = OversightView::new(env.platform.log.clone(), env.platform.catalog.clone());
    probe_view.catch_up().await.unwrap();
    let mut catch_ups = Vec::with_capacity(n_lat);
    for i in 0..n_lat {
        let id = format!("lat-{i:05}");
        let t0 = Instant::now();
        let r = create(&mut c, ask(&id, "deploy-bot", "deploy.production")).await;
        let answered = Instant::now();
        assert!(!r.auto_approved);
        let t1 = hooks.wait(&id).await;
        created.push(answered - t0);
        delivered.push(t1 - t0);
        after_created.push(t1.saturating_duration_since(answered));
        let t2 = Instant::now();
        probe_view.catch_up().await.unwrap();
        catch_ups.push(t2.elapsed());
    }

    println!("created → webhook delivered, one at a time, {n_lat} requests (goal: p95 < 50 ms)");
    println!("          CreateRequest RPC          {}", summary(created));
    println!(
        "          one view catch-up          {}",
        summary(catch_ups)
    );
    println!(
        "          answered → webhook         {}",
        summary(after_created)
    );
    println!(
        "          created → webhook          {}",
        summary(delivered)
    );

    // Throughput: `agents` agents creating back to back.
    let ids: Vec<String> = (0..n_thr).map(|i| format!("thr-{i:05}")).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..agents {
        let mut c = c.clone();
        let mine: Vec<String> = ids.iter().skip(a).step_by(agents).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let agent = format!("agent-{a}");
            let mut sent = Vec::with_capacity(mine.len());
            for id in mine {
                let t0 = Instant::now();
                create(&mut c, ask(&id, &agent, "deploy.production")).await;
                sent.push((id, t0));
            }
            sent
        }));
    }
    let mut sent_at = HashMap::new();
    for t in tasks {
        sent_at.extend(t.await.unwrap());
    }
    let all_created = started.elapsed();
    let arrivals = hooks.wait_all(&ids).await;
    let all_delivered = started.elapsed();
    let thr_latency: Vec<Duration> = ids
        .iter()
        .zip(&arrivals)
        .map(|(id, t1)| t1.saturating_duration_since(sent_at[id]))
        .collect();

    println!(
        "{agents} agents, {n_thr} requests: created {:>6.0} req/s ({:.2} s), delivered {:>6.0} req/s ({:.2} s)",
        n_thr as f64 / all_created.as_secs_f64(),
        all_created.as_secs_f64(),
        n_thr as f64 / all_delivered.as_secs_f64(),
        all_delivered.as_secs_f64()
    );
    println!(
        "          created → webhook          {}",
        summary(thr_latency)
    );

    // 2. Timers.
    let hook_calls_before = hooks.calls.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let subjects = Arc::new(OversightView::new(
        env.platform.log.clone(),
        env.platform.catalog.clone(),
    ));
    for t in 0..timer_tasks {
        let mut c = c.clone();
        let (log, subjects, timer_policy) = (
            env.platform.log.clone(),
            subjects.clone(),
            timer_policy.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            let mut n = 0;
            while i < n_timers {
                let cmd = ask(
                    &format!("timer-{i:05}"),
                    &format!("timer-bot-{t}"),
                    "timer.fire",
                );
                if via_grpc {
                    let r = create(&mut c, cmd).await;
                    assert_eq!(
                        r.request.unwrap().state,
                        State::Pending as i32,
                        "pending until its deadline"
                    );
                } else {
                    // What CreateRequest appends, without its two catch-ups of the view.
                    let event =
                        request::create(&cmd, std::slice::from_ref(&timer_policy), Utc::now())
                            .unwrap();
                    log.append(request_append(
                        &subjects,
                        TENANT,
                        &cmd.request_id,
                        0,
                        &event,
                    ))
                    .await
                    .unwrap();
                }
                i += timer_tasks;
                n += 1;
            }
            n
        }));
    }
    let mut made = 0;
    for t in tasks {
        made += t.await.unwrap();
    }
    let creation = started.elapsed();
    assert_eq!(made, n_timers);

    // Read the OVERSIGHT stream until every timer fired (or a minute past the deadlines).
    let stream = env.platform.catalog.stream(OVERSIGHT);
    let filter = env.subject("oversight.requests.>");
    let first_wait = timeout.saturating_sub(creation) + Duration::from_secs(2);
    tokio::time::sleep(first_wait).await;
    let give_up = Instant::now() + Duration::from_secs(60);
    let (deadlines, fired) = loop {
        let mut deadlines: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut fired: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut events = env
            .platform
            .log
            .replay(&stream, ReplayFrom::Start, None, Some(&filter))
            .await
            .unwrap();
        while let Some(e) = events.try_next().await.unwrap() {
            let id = e.subject.rsplit('.').next().unwrap_or_default().to_string();
            if !id.starts_with("timer-") {
                continue;
            }
            match pb::RequestEvent::decode(e.payload.as_ref()).unwrap().event {
                Some(pb::request_event::Event::Requested(r)) => {
                    deadlines.insert(id, time_of(r.deadline.as_ref()).expect("a deadline"));
                }
                Some(pb::request_event::Event::TimedOut(_)) => {
                    fired.insert(id, e.recorded_at);
                }
                other => panic!("unexpected event on {id}: {other:?}"),
            }
        }
        if fired.len() >= n_timers || Instant::now() > give_up {
            break (deadlines, fired);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let first_deadline = deadlines.values().min().copied().unwrap();
    let last_deadline = deadlines.values().max().copied().unwrap();
    let mut late = Vec::with_capacity(n_timers);
    let mut early = 0;
    for (id, d) in &deadlines {
        match fired.get(id) {
            Some(at) => match (*at - *d).to_std() {
                Ok(l) => late.push(l),
                Err(_) => early += 1,
            },
            None => late.push(Duration::MAX),
        }
    }
    let missing = deadlines.len() - fired.len();
    let over_1s = late.iter().filter(|l| **l > Duration::from_secs(1)).count();
    // Every request TIMED_OUT, as the API tells it.
    let mut tasks = Vec::new();
    for t in 0..timer_tasks {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut bad = 0;
            let mut i = t;
            while i < n_timers {
                let r = get(&mut c, &format!("timer-{i:05}")).await;
                if r.state != State::TimedOut as i32 {
                    bad += 1;
                }
                i += timer_tasks;
            }
            bad
        }));
    }
    let mut not_timed_out = 0;
    for t in tasks {
        not_timed_out += t.await.unwrap();
    }
    let timer_hooks = hooks.calls.load(std::sync::atomic::Ordering::Relaxed) - hook_calls_before;
    let (announced, last_announced) = {
        let seen = hooks.seen.lock().unwrap();
        let times: Vec<Instant> = seen
            .iter()
            .filter(|(id, _)| id.starts_with("timer-"))
            .map(|(_, t)| *t)
            .collect();
        (
            times.len(),
            times.iter().max().map(|t| *t - started).unwrap_or_default(),
        )
    };
    running.stop().await;

    println!(
        "timers: {n_timers} pending requests created by {timer_tasks} tasks ({}) in {:.2} s ({:.0} req/s); deadlines over {:.2} s",
        if via_grpc { "CreateRequest" } else { "appended to the log as CreateRequest does" },
        creation.as_secs_f64(),
        n_timers as f64 / creation.as_secs_f64(),
        (last_deadline - first_deadline).as_seconds_f64()
    );
    let mut sorted = late.clone();
    sorted.sort();
    let fmt = |d: Duration| {
        if d == Duration::MAX {
            "never".to_string()
        } else {
            format!("{:.1} ms", ms(d))
        }
    };
    println!(
        "          TimedOut recorded − deadline: p50 {} | p99 {} | max {} | later than 1 s: {over_1s} (goal 0) | not fired: {missing} | before the deadline: {early}",
        fmt(pct(&sorted, 0.50)),
        fmt(pct(&sorted, 0.99)),
        fmt(sorted.last().copied().unwrap_or_default()),
    );
    println!(
        "          GetRequest: {} of {n_timers} TIMED_OUT",
        n_timers - not_timed_out
    );
    println!(
        "          their webhooks: {announced} of {n_timers} received ({timer_hooks} calls), the last {:.2} s after creation began ({:.0} /s)",
        last_announced.as_secs_f64(),
        announced as f64 / last_announced.as_secs_f64().max(1e-9)
    );

    // 3. Rebuild rate: every oversight table made again from the stream this run wrote.
    creto_replay_tests::whole_rebuild_rate(&env, OVERSIGHT).await;
    for spec in raw_catalog.specs() {
        raw_log.delete_stream(&spec.name).await.unwrap();
    }
    env.drop().await;
}
