//! Messaging on loopback: the gateway, its agent clients and the real NATS JetStream, all on
//! this machine (`Env::new`; bearer tokens, no TLS, no practical rate limit), 256-byte
//! plaintexts. In one run, printed next to raw JetStream on the same stream:
//!
//! 0. raw JetStream, first, on a quiet server: publish with pipelined acks and an ordered pull
//!    consumer reading back, as many messages as a one-recipient figure, of the stored
//!    envelope's size; and one-at-a-time publish→ack→delivery latency.
//! 1. latency: one sender, one recipient with a Receive stream open, one message at a time
//!    (the next is sealed once the previous was opened): from before the seal to after the
//!    recipient verified and decrypted it. p50, p95, p99. The recipient acks every 100.
//! 2. to one recipient, BENCH_SENDERS senders (each its own agent: Send is serialized per
//!    sender→recipient pair, so concurrency comes from senders), each once with one Send at a
//!    time and once with SendBatch calls of BENCH_BATCH envelopes (one call in flight per
//!    sender; the server stores a pair's envelopes one after the other, pairs together):
//!    full path: sealed and sent inside the timed part, every message opened, timed until the
//!    last one is opened; and server only: sealed beforehand, timed until the last one is
//!    received (not opened), with the CPU this process (gateway + clients) and nats-server
//!    spent per message over the timed part (nats-server's figure counts anything else it
//!    served meanwhile).
//! 3. across BENCH_RECIPIENTS recipients (only their encryption keys registered: they do not
//!    send), each with its own Receive stream (100 per HTTP/2 connection), messages spread
//!    round-robin over them; each recipient hears from one sender (its verifying-key cache
//!    stays warm, as a real agent's would), each sender sends SendBatch calls of BENCH_BATCH
//!    envelopes to its recipients, one call in flight. Full path, timed until every message is
//!    opened, or until BENCH_FANOUT_SECONDS have passed: then the figure is what got through.
//! 4. the cryptography's CPU per message on one core (seal; the server's signature check; the
//!    recipient's check and open), and the full path's ceiling on this machine's cores from
//!    it alone.
//!
//! Each phase starts after one warm-up message per sender→recipient pair. Senders know the
//! recipients' keys, as after a LookupKeys they would cache. Transient Send failures
//! (`Unavailable`, `Aborted`, also per envelope of a batch) are retried with the same
//! envelopes and counted.
//!
//! Defaults: BENCH_MESSAGES 20,000 (per one-recipient figure), BENCH_LATENCY_MESSAGES 2,000,
//! BENCH_SENDERS 16, BENCH_BATCH 100, BENCH_RECIPIENTS 1,000, BENCH_FANOUT_MESSAGES two per recipient (2,000),
//! so the run stays near a minute and a half on 2 cores; BENCH_FANOUT_SECONDS (20 s, and as
//! much again for its warm-up) caps the fan-out phase: when the cap is hit the figure is what
//! was delivered and opened within it, marked `*`. For the full-size run:
//! BENCH_FANOUT_MESSAGES=20000 BENCH_FANOUT_SECONDS=600. BENCH_TRACE=1 prints the fan-out's
//! progress every half second.
//!
//! `cargo bench -p creto-replay-tests --bench messaging`
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull, DeliverPolicy},
    context::PublishAckFuture,
};
use bytes::Bytes;
use creto_gateways::auth::token::{keygen, KeyRing};
use creto_gateways::auth::AuthArgs;
use creto_gateways::messaging::client::{AgentClient, Rpc};
use creto_replay_tests::Env;
use creto_schemas::messaging::v1 as pb;
use creto_streams::MESSAGING;
use futures::StreamExt;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::{Code, Streaming};

/// Agent id and encryption keys of each recipient, as a sender caches them.
type Directory = Arc<Vec<(String, Vec<(String, Vec<u8>)>)>>;

const TENANT: &str = "default";
const PLAINTEXT: usize = 256;
/// Longest wait for any phase before the bench gives up.
const WAIT: Duration = Duration::from_secs(600);
/// Receive streams per HTTP/2 connection in the fan-out phase.
const STREAMS_PER_CHANNEL: usize = 100;

static ACK_ERRORS: AtomicUsize = AtomicUsize::new(0);
static ACKS: AtomicUsize = AtomicUsize::new(0);
static ACK_RETRIES: AtomicUsize = AtomicUsize::new(0);
/// Sends retried after `Unavailable`/`Aborted` (same envelope: a retry is never a second message).
static SEND_RETRIES: AtomicUsize = AtomicUsize::new(0);
/// Sends given up on after the retries.
static SEND_FAILURES: AtomicUsize = AtomicUsize::new(0);
/// Deliveries with `delivery_attempt` > 1 (not counted as received).
static REDELIVERED: AtomicUsize = AtomicUsize::new(0);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace(['_', ','], "").parse().ok())
        .unwrap_or(default)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The `p` quantile of sorted durations, in milliseconds.
fn ms(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn quantiles(mut d: Vec<Duration>) -> [f64; 3] {
    d.sort();
    [ms(&d, 0.50), ms(&d, 0.95), ms(&d, 0.99)]
}

/// A fresh HTTP/2 connection to the gateway.
async fn channel(url: &str, token: &str) -> Rpc {
    AgentClient::connect(url, token, TENANT, "bench-channel")
        .await
        .unwrap()
        .rpc()
        .clone()
}

async fn agent(rpc: &Rpc, id: String) -> AgentClient {
    let mut a = AgentClient::with_rpc(rpc.clone(), TENANT, &id);
    a.register().await.unwrap();
    a
}

/// `count` agents registered with `concurrency` registrations in flight.
async fn agents(rpcs: &[Rpc], prefix: &str, count: usize, concurrency: usize) -> Vec<AgentClient> {
    futures::stream::iter(0..count)
        .map(|i| agent(&rpcs[i % rpcs.len()], format!("{prefix}{i:05}")))
        .buffered(concurrency)
        .collect()
        .await
}

/// `count` agents that only receive: their encryption key registered, no signing key (Receive
/// and Ack need none), `concurrency` registrations in flight.
async fn recipients(
    rpcs: &[Rpc],
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Vec<AgentClient> {
    futures::stream::iter(0..count)
        .map(|i| async move {
            let mut a = AgentClient::with_rpc(
                rpcs[i % rpcs.len()].clone(),
                TENANT,
                &format!("{prefix}{i:05}"),
            );
            let key = a.encryption.last().expect("an encryption key");
            let request = pb::RegisterKeyRequest {
                agent_id: a.agent_id.clone(),
                key_id: key.key_id.clone(),
                purpose: pb::KeyPurpose::Encryption as i32,
                public_key: key.public().to_vec(),
                ..Default::default()
            };
            a.rpc().register_key(request).await.unwrap();
            a
        })
        .buffered(concurrency)
        .collect()
        .await
}

/// What a sender would have cached from LookupKeys.
fn keys_of(a: &AgentClient) -> Vec<(String, Vec<u8>)> {
    a.encryption
        .iter()
        .map(|k| (k.key_id.clone(), k.public().to_vec()))
        .collect()
}

/// The number of consumers on the MESSAGING stream ("?" when listing them keeps failing).
async fn consumers(env: &Env) -> String {
    for _ in 0..5 {
        let listed = env
            .platform
            .log
            .stream_state(&env.platform.catalog.stream(MESSAGING))
            .await;
        if let Ok(s) = listed {
            return s.consumers.len().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    "?".into()
}

/// Send, retrying a transient refusal with the same envelope (as a client would: the server
/// answers a resent message as a duplicate). False when it gave up.
async fn send(rpc: &mut Rpc, envelope: pb::Envelope) -> bool {
    for attempt in 0..5 {
        match rpc
            .send(pb::SendRequest {
                envelope: Some(envelope.clone()),
            })
            .await
        {
            Ok(_) => return true,
            Err(e) if matches!(e.code(), Code::Unavailable | Code::Aborted) && attempt < 4 => {
                if SEND_RETRIES.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("send retried: {}", e.message());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                if SEND_FAILURES.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("send failed: {:?} {}", e.code(), e.message());
                }
                return false;
            }
        }
    }
    false
}

/// Acks off the receiving path, retrying a failed Ack up to 5 times (counted).
fn ack(rpc: &Rpc, agent_id: &str, through_cursor: u64) {
    let mut rpc = rpc.clone();
    let agent_id = agent_id.to_string();
    tokio::spawn(async move {
        for attempt in 0..5 {
            let request = pb::AckRequest {
                agent_id: agent_id.clone(),
                through_cursor,
            };
            match rpc.ack(request).await {
                Ok(_) => {
                    ACKS.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) if attempt < 4 => {
                    if ACK_RETRIES.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("ack retried: {}", e.message());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    if ACK_ERRORS.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("ack given up: {}", e.message());
                    }
                }
            }
        }
    });
}

/// Closes Receive streams (their sessions end on the server).
async fn close(handles: Vec<JoinHandle<()>>) {
    for h in &handles {
        h.abort();
    }
    for h in handles {
        let _ = h.await;
    }
}

/// Reads a Receive stream: opens every first delivery (when `open`), counts it in `seen`,
/// acks every `ack_every` of them (off the receiving path). Redeliveries are only counted.
fn receiver(
    mut client: AgentClient,
    mut inbox: Streaming<pb::ReceivedMessage>,
    open: bool,
    ack_every: usize,
    seen: Arc<watch::Sender<usize>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let rpc = client.rpc().clone();
        let mut n = 0usize;
        while let Ok(Some(m)) = inbox.message().await {
            if m.delivery_attempt > 1 {
                REDELIVERED.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if open {
                let opened = client.open(&m).await.unwrap();
                assert_eq!(opened.plaintext.len(), PLAINTEXT);
            }
            n += 1;
            seen.send_modify(|c| *c += 1);
            if n.is_multiple_of(ack_every) {
                ack(&rpc, &client.agent_id, m.cursor);
            }
        }
    })
}

/// Waits until `seen` reaches `target` or `deadline`; true when reached.
async fn seen_by(seen: &watch::Sender<usize>, target: usize, deadline: Instant) -> bool {
    let mut rx = seen.subscribe();
    let _ = tokio::time::timeout_at(deadline.into(), rx.wait_for(|c| *c >= target)).await;
    let reached = *seen.borrow() >= target;
    reached
}

async fn wait_seen(seen: &watch::Sender<usize>, target: usize, what: &str) {
    if !seen_by(seen, target, Instant::now() + WAIT).await {
        panic!(
            "{what}: {} of {target} messages after {WAIT:?}",
            *seen.borrow()
        );
    }
}

/// Sends `per_sender` messages from each sender to `to` with one Send in flight per sender,
/// sealing inside (`presealed` = None) or sending envelopes sealed beforehand.
async fn send_all(
    senders: Vec<AgentClient>,
    to: &str,
    keys: &[(String, Vec<u8>)],
    per_sender: usize,
    presealed: Option<Vec<Vec<pb::Envelope>>>,
) -> Vec<AgentClient> {
    let payload = vec![7u8; PLAINTEXT];
    let mut presealed = presealed.map(|p| p.into_iter());
    let mut tasks = Vec::new();
    for mut s in senders {
        let to = to.to_string();
        let keys = keys.to_vec();
        let payload = payload.clone();
        let sealed = presealed.as_mut().map(|p| p.next().unwrap());
        tasks.push(tokio::spawn(async move {
            let mut rpc = s.rpc().clone();
            match sealed {
                Some(envelopes) => {
                    for e in envelopes {
                        send(&mut rpc, e).await;
                    }
                }
                None => {
                    for _ in 0..per_sender {
                        let e = s.seal(&to, &keys, &payload).unwrap();
                        send(&mut rpc, e).await;
                    }
                }
            }
            s
        }));
    }
    let mut back = Vec::new();
    for t in tasks {
        back.push(t.await.unwrap());
    }
    back
}

/// SendBatch, resending (in order, same envelopes) what failed transiently; counted like
/// `send`. Returns how many were given up on.
async fn send_batch(rpc: &mut Rpc, mut envelopes: Vec<pb::Envelope>) -> usize {
    for attempt in 0..5 {
        let results = match rpc
            .send_batch(pb::SendBatchRequest {
                envelopes: envelopes.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner().results,
            Err(e) if matches!(e.code(), Code::Unavailable | Code::Aborted) && attempt < 4 => {
                if SEND_RETRIES.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("send batch retried: {}", e.message());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                if SEND_FAILURES.fetch_add(envelopes.len(), Ordering::Relaxed) == 0 {
                    eprintln!("send batch failed: {:?} {}", e.code(), e.message());
                }
                return envelopes.len();
            }
        };
        let mut again = Vec::new();
        let mut failed = 0;
        for (e, r) in envelopes.into_iter().zip(results) {
            let code = Code::from(r.code);
            match code {
                Code::Ok => {}
                Code::Unavailable | Code::Aborted if attempt < 4 => again.push(e),
                _ => {
                    if SEND_FAILURES.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("send failed: {code:?} {}", r.message);
                    }
                    failed += 1;
                }
            }
        }
        if again.is_empty() {
            return failed;
        }
        if SEND_RETRIES.fetch_add(again.len(), Ordering::Relaxed) == 0 {
            eprintln!("send retried (in a batch)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        envelopes = again;
    }
    envelopes.len()
}

/// Sends `per_sender` messages from each sender to `to` in SendBatch calls of `batch`, one
/// call in flight per sender (a batch holds one pair's messages in order), sealing each batch
/// inside (`presealed` = None) or sending envelopes sealed beforehand.
async fn send_all_batched(
    senders: Vec<AgentClient>,
    to: &str,
    keys: &[(String, Vec<u8>)],
    per_sender: usize,
    batch: usize,
    presealed: Option<Vec<Vec<pb::Envelope>>>,
) -> Vec<AgentClient> {
    let payload = vec![7u8; PLAINTEXT];
    let mut presealed = presealed.map(|p| p.into_iter());
    let mut tasks = Vec::new();
    for mut s in senders {
        let to = to.to_string();
        let keys = keys.to_vec();
        let payload = payload.clone();
        let sealed = presealed.as_mut().map(|p| p.next().unwrap());
        tasks.push(tokio::spawn(async move {
            let mut rpc = s.rpc().clone();
            match sealed {
                Some(envelopes) => {
                    for chunk in envelopes.chunks(batch) {
                        send_batch(&mut rpc, chunk.to_vec()).await;
                    }
                }
                None => {
                    let mut left = per_sender;
                    while left > 0 {
                        let n = left.min(batch);
                        let envelopes = (0..n)
                            .map(|_| s.seal(&to, &keys, &payload).unwrap())
                            .collect();
                        send_batch(&mut rpc, envelopes).await;
                        left -= n;
                    }
                }
            }
            s
        }));
    }
    let mut back = Vec::new();
    for t in tasks {
        back.push(t.await.unwrap());
    }
    back
}

/// Sends from each sender to its recipients (`plan[s]`, in order), sealing as it goes, in
/// SendBatch calls of up to `batch` envelopes, one call in flight per sender (a batch may hold
/// two messages of one pair: the server stores them in order).
async fn fan_out_batched(
    senders: Vec<AgentClient>,
    plan: Vec<Vec<usize>>,
    recipients: Directory,
    batch: usize,
) -> Vec<AgentClient> {
    // A JoinSet: dropping this future (at the time budget) stops every sender.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (mut s, targets)) in senders.into_iter().zip(plan).enumerate() {
        let recipients = recipients.clone();
        tasks.spawn(async move {
            let payload = vec![7u8; PLAINTEXT];
            let mut rpc = s.rpc().clone();
            for chunk in targets.chunks(batch) {
                let envelopes = chunk
                    .iter()
                    .map(|r| {
                        let (id, keys) = &recipients[*r];
                        s.seal(id, keys, &payload).unwrap()
                    })
                    .collect();
                send_batch(&mut rpc, envelopes).await;
            }
            (i, s)
        });
    }
    let mut back: Vec<(usize, AgentClient)> = tasks.join_all().await;
    back.sort_by_key(|(i, _)| *i);
    back.into_iter().map(|(_, s)| s).collect()
}

/// Per-message CPU of the cryptography on this machine, one core, mean over `n` (µs): the
/// sender's seal (HPKE + sign), the server's signature check, the recipient's check + open.
fn crypto_costs(
    sender: &mut AgentClient,
    recipient: &AgentClient,
    payload: &[u8],
    n: usize,
) -> (f64, f64, f64) {
    let keys = keys_of(recipient);
    let t = Instant::now();
    let sealed: Vec<pb::Envelope> = (0..n)
        .map(|_| sender.seal(&recipient.agent_id, &keys, payload).unwrap())
        .collect();
    let seal = t.elapsed();
    let vk = creto_domain::messaging::keys::verifying_key(&sender.signing.public()).unwrap();
    let t = Instant::now();
    for e in &sealed {
        creto_domain::messaging::envelope::verify(e, &vk).unwrap();
    }
    let verify = t.elapsed();
    let t = Instant::now();
    for e in &sealed {
        let opened = creto_domain::messaging::open(
            e,
            &vk,
            &recipient.agent_id,
            &recipient.encryption,
            chrono::Utc::now(),
        )
        .unwrap();
        std::hint::black_box(opened.plaintext.len());
    }
    let open = t.elapsed();
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    (us(seal), us(verify), us(open))
}

/// CPU time (user + system) used so far by process `pid` ("self" for this one), from
/// /proc (Linux; zero elsewhere).
fn cpu_of(pid: &str) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces): utime and stime are the
            // 12th and 13th.
            let rest = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<u64> = rest
                .split(' ')
                .skip(11)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            Some(f.iter().sum::<u64>())
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// The pid of the local nats-server, if one runs on this machine.
fn nats_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "nats-server").then(|| e.file_name().to_string_lossy().to_string())
    })
}

/// CPU used since a reading by (this process, nats-server).
struct Cpu(Duration, Duration);

impl Cpu {
    fn now(nats: &Option<String>) -> Cpu {
        Cpu(
            cpu_of("self"),
            nats.as_deref().map_or(Duration::ZERO, cpu_of),
        )
    }
    /// Per message, in µs.
    fn per_message(&self, nats: &Option<String>, n: usize) -> (f64, f64) {
        let now = Cpu::now(nats);
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        (us(now.0 - self.0), us(now.1 - self.1))
    }
}

async fn publish(js: &jetstream::Context, subject: &str, payload: &Bytes, n: usize) {
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(5_000);
    for _ in 0..n {
        acks.push(
            js.send_publish(
                subject.to_string(),
                jetstream::message::PublishMessage::build().payload(payload.clone()),
            )
            .await
            .unwrap(),
        );
        if acks.len() == 5_000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// What one replay of a Receive session costs JetStream, now: milliseconds for a stream info
/// and for creating a filtered ordered consumer (as `EventLog::replay` does), mean of 10.
async fn probe(env: &Env) -> (f64, f64) {
    let client = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(env.platform.catalog.stream(MESSAGING))
        .await
        .unwrap();
    let (mut info, mut create) = (Duration::ZERO, Duration::ZERO);
    for i in 0..10 {
        let t = Instant::now();
        stream.info().await.unwrap();
        info += t.elapsed();
        let t = Instant::now();
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: env.subject(&format!("messaging.msg.{TENANT}.probe{i}.*")),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 1 },
                ..Default::default()
            })
            .await
            .unwrap();
        create += t.elapsed();
        let name = consumer.cached_info().name.clone();
        let _ = stream.delete_consumer(&name).await;
    }
    (info.as_secs_f64() * 100.0, create.as_secs_f64() * 100.0)
}

struct Raw {
    publish: f64,
    consume: f64,
    latency: [f64; 3],
}

async fn raw_jetstream(env: &Env, payload: Bytes, n: usize, n_lat: usize) -> Raw {
    let client = async_nats::connect(creto_replay_tests::nats_url())
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(16_384)
        .build(client);
    let stream = js
        .get_stream(env.platform.catalog.stream(MESSAGING))
        .await
        .unwrap();

    // Publish with pipelined acks, then read back with an ordered pull consumer.
    let subject = env.subject("messaging.raw.bench");
    let started = Instant::now();
    publish(&js, &subject, &payload, n).await;
    let publish_rate = rate(n, started.elapsed());
    let started = Instant::now();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..n {
        std::hint::black_box(messages.next().await.unwrap().unwrap().payload.len());
    }
    drop(messages);
    let consume_rate = rate(n, started.elapsed());

    // One at a time: publish, await the ack, and the consumer's delivery.
    let subject = env.subject("messaging.raw.latency");
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.clone(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut latencies = Vec::with_capacity(n_lat);
    for i in 0..n_lat + 50 {
        let t0 = Instant::now();
        js.publish(subject.clone(), payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        std::hint::black_box(messages.next().await.unwrap().unwrap().payload.len());
        if i >= 50 {
            latencies.push(t0.elapsed());
        }
    }
    Raw {
        publish: publish_rate,
        consume: consume_rate,
        latency: quantiles(latencies),
    }
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_MESSAGES", 20_000);
    let n_lat = env_usize("BENCH_LATENCY_MESSAGES", 2_000);
    let n_recipients = env_usize("BENCH_RECIPIENTS", 1_000).max(1);
    let n_fan = env_usize("BENCH_FANOUT_MESSAGES", 2 * n_recipients);
    let fan_budget = Duration::from_secs(env_usize("BENCH_FANOUT_SECONDS", 20) as u64);
    let n_senders = env_usize("BENCH_SENDERS", 16).max(1);
    let batch = env_usize("BENCH_BATCH", 100).clamp(1, 1_000);
    let bench_started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nats = nats_pid();

    let env = Env::new().await;
    // A real bearer token (HS256) and a rate limit far above what this box can reach: the
    // unauthenticated mode refuses any `authorization` header, which the client always sends,
    // and its default limit (500 requests/s per tenant) would be what gets measured.
    let dir = tempfile::tempdir().unwrap();
    let (key_ring, limits) = (dir.path().join("keys.toml"), dir.path().join("limits.toml"));
    std::fs::write(&key_ring, keygen("bench")).unwrap();
    std::fs::write(
        &limits,
        "[default]\nrequests_per_second = 10000000\nburst = 10000000\n",
    )
    .unwrap();
    let auth = AuthArgs {
        auth_keys: Some(key_ring.clone()),
        rate_limits: Some(limits),
        ..Default::default()
    }
    .build(None)
    .unwrap();
    let token = KeyRing::load(&key_ring)
        .unwrap()
        .issue(
            TENANT,
            "bench",
            &["admin".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let running = env.start_messaging_with(auth).await;
    let url = format!("http://{}", running.grpc_addr.unwrap());
    let senders_rpc = vec![channel(&url, &token).await, channel(&url, &token).await];
    let receivers_rpc = channel(&url, &token).await;
    let payload = vec![7u8; PLAINTEXT];

    // ---- Raw JetStream first, on a quiet server: same stream, stored envelope's size.
    let mut alice = AgentClient::with_rpc(senders_rpc[0].clone(), TENANT, "alice");
    let mut bob = AgentClient::with_rpc(receivers_rpc.clone(), TENANT, "bob");
    let sample = alice.seal("bob", &keys_of(&bob), &payload).unwrap();
    let envelope_bytes = sample.encoded_len();
    let per_sender = n / n_senders;
    let n_tp = per_sender * n_senders;
    let raw = raw_jetstream(&env, Bytes::from(sample.encode_to_vec()), n_tp, n_lat).await;
    let (info_quiet, create_quiet) = probe(&env).await;
    println!(
        "raw JetStream  {n_tp} × {envelope_bytes} B: publish {:.0} msg/s (pipelined acks), ordered consumer {:.0} msg/s; one at a time publish→ack→delivery p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
        raw.publish, raw.consume, raw.latency[0], raw.latency[1], raw.latency[2]
    );

    // ---- 1. Latency: one message at a time.
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let bob_keys = alice.recipient_keys("bob").await.unwrap();
    let mut inbox = bob.receive(0).await.unwrap();
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Instant>();
    let bob_task = tokio::spawn(async move {
        let rpc = bob.rpc().clone();
        let mut n = 0u64;
        while let Ok(Some(m)) = inbox.message().await {
            if m.delivery_attempt > 1 {
                REDELIVERED.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let opened = bob.open(&m).await.unwrap();
            assert_eq!(opened.plaintext.len(), PLAINTEXT);
            if opened_tx.send(Instant::now()).is_err() {
                return;
            }
            n += 1;
            if n.is_multiple_of(100) {
                ack(&rpc, "bob", m.cursor);
            }
        }
    });
    let warm = 50;
    let (mut total, mut seal, mut send) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warm + n_lat {
        let t0 = Instant::now();
        let e = alice.seal("bob", &bob_keys, &payload).unwrap();
        let sealed = Instant::now();
        alice.send_envelope(e).await.unwrap();
        let sent = Instant::now();
        let t1 = tokio::time::timeout(WAIT, opened_rx.recv())
            .await
            .expect("latency: message not delivered")
            .unwrap();
        if i >= warm {
            total.push(t1 - t0);
            seal.push(sealed - t0);
            send.push(sent - sealed);
        }
    }
    close(vec![bob_task]).await;
    let latency = quantiles(total);
    let seal_q = quantiles(seal);
    let send_q = quantiles(send);
    println!(
        "latency        {n_lat} messages one at a time, seal→Send→Receive→open: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms (seal p50 {:.3} ms; Send RPC p50 {:.2} ms, p95 {:.2} ms)",
        latency[0], latency[1], latency[2], seal_q[0], send_q[0], send_q[1]
    );

    // ---- 2a. One recipient, full path.
    let mut senders = agents(&senders_rpc, "sender", n_senders, 16).await;
    let mut carol = agent(&receivers_rpc, "carol".into()).await;
    let mut dave = agent(&receivers_rpc, "dave".into()).await;
    let carol_keys = keys_of(&carol);
    let carol_probe = AgentClient::with_rpc(receivers_rpc.clone(), TENANT, "carol-probe");
    let inbox = carol.receive(0).await.unwrap();
    let seen = Arc::new(watch::channel(0usize).0);
    let carol_task = receiver(carol, inbox, true, 1_000, seen.clone());
    senders = send_all(senders, "carol", &carol_keys, 1, None).await;
    wait_seen(&seen, n_senders, "one recipient warm-up").await;
    let consumers_before = consumers(&env).await;
    let started = Instant::now();
    senders = send_all(senders, "carol", &carol_keys, per_sender, None).await;
    let sent_in = started.elapsed();
    wait_seen(&seen, n_senders + n_tp, "one recipient, full path").await;
    let full = started.elapsed();
    close(vec![carol_task]).await;
    println!(
        "one recipient  full path: {n_tp} messages, {n_senders} senders: {:.0} msg/s sealed, sent, delivered and opened (Sends alone {:.0} msg/s; consumers on the stream {} → {})",
        rate(n_tp, full),
        rate(n_tp, sent_in),
        consumers_before,
        consumers(&env).await
    );

    // ---- 2a'. One recipient, full path, SendBatch.
    let mut erin = agent(&receivers_rpc, "erin".into()).await;
    let erin_keys = keys_of(&erin);
    let inbox = erin.receive(0).await.unwrap();
    let seen = Arc::new(watch::channel(0usize).0);
    let erin_task = receiver(erin, inbox, true, 1_000, seen.clone());
    senders = send_all(senders, "erin", &erin_keys, 1, None).await;
    wait_seen(&seen, n_senders, "one recipient (batches) warm-up").await;
    let started = Instant::now();
    senders = send_all_batched(senders, "erin", &erin_keys, per_sender, batch, None).await;
    let sent_in = started.elapsed();
    wait_seen(&seen, n_senders + n_tp, "one recipient, full path, batches").await;
    let full_batched = started.elapsed();
    close(vec![erin_task]).await;
    println!(
        "one recipient  full path, SendBatch of {batch}: {n_tp} messages, {n_senders} senders: {:.0} msg/s sealed, sent, delivered and opened (Sends alone {:.0} msg/s)",
        rate(n_tp, full_batched),
        rate(n_tp, sent_in),
    );

    // ---- 2b. One recipient, server only (sealed beforehand, received but not opened).
    let dave_keys = keys_of(&dave);
    let inbox = dave.receive(0).await.unwrap();
    let seen = Arc::new(watch::channel(0usize).0);
    let dave_task = receiver(dave, inbox, false, 1_000, seen.clone());
    senders = send_all(senders, "dave", &dave_keys, 1, None).await;
    wait_seen(&seen, n_senders, "server-only warm-up").await;
    let presealed: Vec<Vec<pb::Envelope>> = senders
        .iter_mut()
        .map(|s| {
            (0..per_sender)
                .map(|_| s.seal("dave", &dave_keys, &payload).unwrap())
                .collect()
        })
        .collect();
    let cpu = Cpu::now(&nats);
    let started = Instant::now();
    senders = send_all(senders, "dave", &dave_keys, per_sender, Some(presealed)).await;
    let sent_in = started.elapsed();
    wait_seen(&seen, n_senders + n_tp, "one recipient, server only").await;
    let server_only = started.elapsed();
    let cpu_send = cpu.per_message(&nats, n_tp);
    close(vec![dave_task]).await;
    println!(
        "one recipient  server only: {n_tp} messages, {n_senders} senders: {:.0} msg/s sent and received, sealed beforehand, not opened (Sends alone {:.0} msg/s); CPU per message {:.0} µs in this process (gateway + clients), {:.0} µs nats-server",
        rate(n_tp, server_only),
        rate(n_tp, sent_in),
        cpu_send.0,
        cpu_send.1
    );

    // ---- 2b'. One recipient, server only, SendBatch.
    let mut frank = agent(&receivers_rpc, "frank".into()).await;
    let frank_keys = keys_of(&frank);
    let inbox = frank.receive(0).await.unwrap();
    let seen = Arc::new(watch::channel(0usize).0);
    let frank_task = receiver(frank, inbox, false, 1_000, seen.clone());
    senders = send_all(senders, "frank", &frank_keys, 1, None).await;
    wait_seen(&seen, n_senders, "server-only (batches) warm-up").await;
    let presealed: Vec<Vec<pb::Envelope>> = senders
        .iter_mut()
        .map(|s| {
            (0..per_sender)
                .map(|_| s.seal("frank", &frank_keys, &payload).unwrap())
                .collect()
        })
        .collect();
    let cpu = Cpu::now(&nats);
    let started = Instant::now();
    senders = send_all_batched(
        senders,
        "frank",
        &frank_keys,
        per_sender,
        batch,
        Some(presealed),
    )
    .await;
    let sent_in = started.elapsed();
    wait_seen(
        &seen,
        n_senders + n_tp,
        "one recipient, server only, batches",
    )
    .await;
    let server_batched = started.elapsed();
    let cpu_batch = cpu.per_message(&nats, n_tp);
    close(vec![frank_task]).await;
    println!(
        "one recipient  server only, SendBatch of {batch}: {n_tp} messages, {n_senders} senders: {:.0} msg/s sent and received, sealed beforehand, not opened (Sends alone {:.0} msg/s); CPU per message {:.0} µs in this process (gateway + clients), {:.0} µs nats-server",
        rate(n_tp, server_batched),
        rate(n_tp, sent_in),
        cpu_batch.0,
        cpu_batch.1
    );

    // ---- Per-message cryptography on one core (what bounds the full path).
    let (seal_us, verify_us, open_us) = crypto_costs(&mut senders[0], &carol_probe, &payload, 500);
    println!(
        "crypto         per message on one core: seal (HPKE + sign) {seal_us:.0} µs, server signature check {verify_us:.0} µs, recipient check + open {open_us:.0} µs: {:.0} µs of CPU per message end to end, so at most {:.0} msg/s on {} cores with nothing else running",
        seal_us + verify_us + open_us,
        cores as f64 * 1e6 / (seal_us + verify_us + open_us),
        cores
    );
    drop(senders);

    // ---- 3. Across many recipients, within a time budget.
    let started = Instant::now();
    let mut fan_rpcs = Vec::new();
    for _ in 0..n_recipients.div_ceil(STREAMS_PER_CHANNEL) {
        fan_rpcs.push(channel(&url, &token).await);
    }
    let recipients = recipients(&fan_rpcs, "r", n_recipients, 64).await;
    let active = n_senders.min(n_recipients);
    let fan_senders = agents(&senders_rpc, "fan", active, 16).await;
    let registered = started.elapsed();
    let directory: Directory = Arc::new(
        recipients
            .iter()
            .map(|r| (r.agent_id.clone(), keys_of(r)))
            .collect(),
    );
    let per_recipient = (n_fan / n_recipients).max(1);
    let seen = Arc::new(watch::channel(0usize).0);
    let started = Instant::now();
    let mut handles = Vec::new();
    for mut r in recipients {
        let inbox = r.receive(0).await.unwrap();
        handles.push(receiver(r, inbox, true, per_recipient, seen.clone()));
    }
    let opened_streams = started.elapsed();
    let consumers_at_open = consumers(&env).await;
    // Recipient r hears from sender r % senders; message i goes to recipient i % recipients.
    let plan = |count: usize| {
        let mut plan = vec![Vec::new(); active];
        for i in 0..count {
            let r = i % n_recipients;
            plan[r % active].push(r);
        }
        plan
    };
    let deadline = Instant::now() + fan_budget;
    let warm_started = Instant::now();
    if std::env::var("BENCH_TRACE").is_ok() {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                eprintln!(
                    "{:>6.1} s seen {}",
                    warm_started.elapsed().as_secs_f64(),
                    *seen.borrow()
                );
            }
        });
    }
    let warming = tokio::spawn(fan_out_batched(
        fan_senders,
        plan(n_recipients),
        directory.clone(),
        batch,
    ));
    let warmed = seen_by(&seen, n_recipients, deadline).await;
    let warm_up = warm_started.elapsed();
    let mut fan: Option<(usize, Duration, bool, Duration)> = None;
    let consumers_before = consumers(&env).await;
    if warmed {
        let fan_senders = warming.await.unwrap();
        let deadline = Instant::now() + fan_budget;
        let failed_before = SEND_FAILURES.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut sending = tokio::spawn(fan_out_batched(
            fan_senders,
            plan(n_fan),
            directory.clone(),
            batch,
        ));
        let sent_in = match tokio::time::timeout_at(deadline.into(), &mut sending).await {
            Ok(done) => {
                done.unwrap();
                started.elapsed()
            }
            Err(_) => {
                sending.abort();
                fan_budget
            }
        };
        let lost = SEND_FAILURES.load(Ordering::Relaxed) - failed_before;
        let complete = seen_by(&seen, n_recipients + n_fan - lost, deadline).await;
        let delivered = *seen.borrow() - n_recipients;
        fan = Some((delivered, started.elapsed(), complete, sent_in));
    } else {
        warming.abort();
    }
    let fan_rate = fan.map_or(0.0, |(d, t, _, _)| rate(d, t));
    match fan {
        Some((delivered, took, complete, sent_in)) => println!(
            "{n_recipients} recipients {}: {delivered} of {n_fan} messages in {:.1} s, {active} senders, SendBatch of {batch}: {fan_rate:.0} msg/s sealed, sent, delivered and opened (Sends {:.0} msg/s; consumers on the stream {} → {})",
            if complete { "complete" } else { "INCOMPLETE at the time budget" },
            took.as_secs_f64(),
            rate(n_fan, sent_in),
            consumers_before,
            consumers(&env).await
        ),
        None => println!(
            "{n_recipients} recipients: warm-up (one message each) INCOMPLETE within {:?}: {} of {n_recipients} delivered; not measured",
            fan_budget,
            *seen.borrow()
        ),
    }
    println!(
        "               setup: {n_recipients} recipients + {active} senders registered in {:.1} s, {n_recipients} Receive streams opened in {:.2} s ({consumers_at_open} consumers on the stream then), warm-up (one message each) {:.1} s",
        registered.as_secs_f64(),
        opened_streams.as_secs_f64(),
        warm_up.as_secs_f64()
    );

    let (info_busy, create_busy) = probe(&env).await;
    println!(
        "               JetStream now: stream info {info_busy:.1} ms, filtered ordered consumer created in {create_busy:.1} ms, with {} consumers on the stream (quiet, at the start: {info_quiet:.1} ms, {create_quiet:.1} ms)",
        consumers(&env).await
    );
    close(handles).await;

    println!();
    println!(
        "messaging on loopback: {PLAINTEXT} B plaintext, {envelope_bytes} B stored envelope, {} cores, one process (gateway + clients + benchmark) and nats-server",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<36} {:>22} {:>16} {:>22} {:>7}",
        "", "messaging", "goal", "raw JetStream", "ratio"
    );
    println!(
        "{:<36} {:>22} {:>16} {:>22} {:>7.2}",
        "latency p50 / p95 / p99 (ms)",
        format!("{:.2} / {:.2} / {:.2}", latency[0], latency[1], latency[2]),
        "p95 < 5 ms",
        format!(
            "{:.2} / {:.2} / {:.2}",
            raw.latency[0], raw.latency[1], raw.latency[2]
        ),
        latency[1] / raw.latency[1]
    );
    let row = |label: String, ours: f64, goal: &str| {
        println!(
            "{:<36} {:>16.0} msg/s {:>16} {:>16.0} msg/s {:>7.3}  (vs raw consume {:.3})",
            label,
            ours,
            goal,
            raw.publish,
            ours / raw.publish,
            ours / raw.consume
        );
    };
    row(
        "to one recipient, full path, Send".into(),
        rate(n_tp, full),
        "≥ 20,000 msg/s",
    );
    row(
        format!("to one recipient, full path, batch {batch}"),
        rate(n_tp, full_batched),
        "≥ 20,000 msg/s",
    );
    row(
        "to one recipient, server only, Send".into(),
        rate(n_tp, server_only),
        "",
    );
    row(
        format!("to one recipient, server only, b. {batch}"),
        rate(n_tp, server_batched),
        "",
    );
    row(
        format!(
            "across {n_recipients} recipients, full, b. {batch}{}",
            match fan {
                Some((_, _, true, _)) => "",
                _ => " *",
            }
        ),
        fan_rate,
        "≥ 20,000 msg/s",
    );
    println!(
        "{:<36} {:>22} {:>16} {:>16.0} msg/s",
        "raw ordered consumer read", "", "", raw.consume
    );
    println!(
        "{:<36} {:>16.0} msg/s   (seal {seal_us:.0} + verify {verify_us:.0} + open {open_us:.0} µs of CPU per message, {cores} cores, nothing else)",
        "full-path ceiling from crypto alone",
        cores as f64 * 1e6 / (seal_us + verify_us + open_us),
    );
    println!(
        "{:<36} {:>16.0} msg/s   (Send: {:.0} µs gateway + clients + {:.0} µs nats-server of CPU per message; SendBatch: {:.0} + {:.0} µs)",
        "server-only ceiling from its CPU",
        cores as f64 * 1e6 / (cpu_batch.0 + cpu_batch.1),
        cpu_send.0,
        cpu_send.1,
        cpu_batch.0,
        cpu_batch.1
    );
    println!(
        "{n_tp} messages per one-recipient figure, {n_fan} across recipients, {n_lat} for latency. Raw: publish with 5,000 acks in flight; latency = publish→ack→ordered-consumer delivery. Ratio = messaging / raw (p95 for latency)."
    );
    if !matches!(fan, Some((_, _, true, _))) {
        println!(
            "* not every message was delivered and opened within {fan_budget:?} (BENCH_FANOUT_SECONDS): the figure is what was, over the budget"
        );
    }
    println!(
        "sends retried {}, given up {}; redeliveries {}; acks {} done, {} retried, {} given up; whole run {:.0} s",
        SEND_RETRIES.load(Ordering::Relaxed),
        SEND_FAILURES.load(Ordering::Relaxed),
        REDELIVERED.load(Ordering::Relaxed),
        ACKS.load(Ordering::Relaxed),
        ACK_RETRIES.load(Ordering::Relaxed),
        ACK_ERRORS.load(Ordering::Relaxed),
        bench_started.elapsed().as_secs_f64()
    );

    drop(receivers_rpc);
    drop(senders_rpc);
    drop(fan_rpcs);
    if tokio::time::timeout(Duration::from_secs(20), running.stop())
        .await
        .is_err()
    {
        eprintln!("the gateway did not stop within 20 s");
    }
    env.drop().await;
}
