//! The embedded adapter of the log port, on sled: what `enablement dev` runs on when there is
//! no NATS server. Same semantics as the JetStream adapter, held to the same conformance suite:
//! idempotent appends inside the duplicate window, expected-last-subject-sequence concurrency,
//! ordered replay, durable consumers with ack / nak / redelivery after `ack_wait`, and the
//! dead-letter path of [`Delivery`].
//!
//! Layout: one sled tree per stream with prefixed keys, so one append batch is one atomic
//! `apply_batch` (message, id, subject index and the stream counters together):
//! `m<seq>` → record (with its id), `i<id>` → seq + time, `s<subject>` → last seq,
//! `z` → counters. Ids expire in message order, so no separate time index is needed. Stream specs and consumer positions live in
//! their own trees. An append returns after sled has flushed it to disk, and readers see it only
//! then.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::catalog::{Catalog, StreamSpec};
use crate::headers::Headers;
use crate::log::*;
use crate::subject;

const MSG: u8 = b'm';
const ID: u8 = b'i';
const SUBJECT: u8 = b's';
const COUNTS: &[u8] = b"z";
/// How often expired ids and messages past `max_age` are removed.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(30);
/// Ids forgotten, and messages removed, by one maintenance pass at most; a pass that had
/// more to do runs again at the next append.
const MAINTENANCE_STEPS: usize = 10_000;
/// Messages read from sled per step of a replay.
const REPLAY_CHUNK: usize = 512;

#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    #[prost(string, tag = "1")]
    subject: String,
    #[prost(message, repeated, tag = "2")]
    headers: Vec<Header>,
    #[prost(bytes = "bytes", tag = "3")]
    payload: Bytes,
    #[prost(int64, tag = "4")]
    recorded_at_micros: i64,
    /// The idempotency key, so ids can be forgotten in message order.
    #[prost(string, tag = "5")]
    id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Header {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// Per-stream counters, written in the same batch as the messages they count.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Counts {
    first: u64,
    last: u64,
    messages: u64,
    bytes: u64,
    /// Recorded times never go backwards within a stream, so replay by time can bisect.
    last_micros: i64,
    /// Ids of messages up to here have left the duplicate window and were forgotten.
    ids_forgotten_to: u64,
}

fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

fn msg_key(seq: u64) -> [u8; 9] {
    let mut k = [MSG; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

fn storage(e: sled::Error) -> LogError {
    LogError::Unavailable(format!("embedded log storage: {e}"))
}

/// Bytes a message counts against `max_message_size` and `max_bytes`: payload and headers.
fn size_of(headers: &Headers, payload: &[u8]) -> usize {
    payload.len()
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
}

fn micros_to_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// What [`Stream::read_chunk`] read.
struct Chunk {
    items: Vec<Result<StoredEvent, LogError>>,
    /// The sequence of the last entry read, matched by the filter or not.
    last_read: Option<u64>,
    /// It read [`REPLAY_CHUNK`] entries: more may follow.
    full: bool,
    /// The last item is a read error.
    failed: bool,
}

struct Stream {
    name: String,
    tree: sled::Tree,
    spec: Mutex<StreamSpec>,
    /// Also the append lock: appends to one stream are serialized, as on a stream leader.
    counts: Mutex<Counts>,
    /// The last sequence known to be on disk: readers are shown the stream up to here. One
    /// shown an event before its flush could act on it (a notification sent, a checkpoint
    /// saved) and a crash would then lose it, its sequence taken by a later event. Writers'
    /// checks (duplicate ids, expected subject sequences, `stream_state`) see every append at
    /// once, so a replay up to an end they saw flushes that end first (see
    /// [`SledLog::on_disk`]).
    flushed: watch::Sender<u64>,
    /// When the last maintenance pass ran; None: one is due (not `now - MAINTENANCE_EVERY`,
    /// which underflows in a machine's first 30 s).
    maintained: Mutex<Option<Instant>>,
    /// The sequence of the last restore marker's payload (see `Catalog::restore_marker_subject`),
    /// read once and forgotten when a new marker is appended.
    restored: Mutex<Option<u64>>,
}

impl Stream {
    /// Events up to this sequence were restored from the archive: their original recorded time
    /// (a header) is honoured.
    fn restored_through(&self) -> u64 {
        if let Some(n) = *self.restored.lock().unwrap() {
            return n;
        }
        let n = crate::catalog::restore_marker_of(&self.spec.lock().unwrap().subjects)
            .and_then(|marker| {
                self.tree
                    .get(key(SUBJECT, marker.as_bytes()))
                    .ok()
                    .flatten()
            })
            .and_then(|v| self.tree.get(msg_key(u64_at(&v, 0))).ok().flatten())
            .and_then(|v| Record::decode(v.as_ref()).ok())
            .and_then(|r| std::str::from_utf8(&r.payload).ok()?.trim().parse().ok())
            .unwrap_or(0);
        *self.restored.lock().unwrap() = Some(n);
        n
    }

    fn counts(&self) -> Counts {
        *self.counts.lock().unwrap()
    }

    fn flushed(&self) -> u64 {
        *self.flushed.borrow()
    }

    /// Shows readers the stream up to `last`, which is on disk.
    fn mark_flushed(&self, last: u64) {
        self.flushed.send_if_modified(|shown| {
            let later = last > *shown;
            if later {
                *shown = last;
            }
            later
        });
    }

    fn read(&self, seq: u64) -> Result<Option<StoredEvent>, LogError> {
        match self.tree.get(msg_key(seq)).map_err(storage)? {
            Some(v) => self.decode(seq, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Reads up to [`REPLAY_CHUNK`] stored events from `from` to `to` (inclusive), keeping
    /// those `filter` matches; a read error is the last item.
    fn read_chunk(&self, from: u64, to: u64, filter: Option<&str>) -> Chunk {
        let mut chunk = Chunk {
            items: Vec::new(),
            last_read: None,
            full: false,
            failed: false,
        };
        for (read, kv) in self
            .tree
            .range(msg_key(from)..=msg_key(to))
            .take(REPLAY_CHUNK)
            .enumerate()
        {
            chunk.full = read + 1 == REPLAY_CHUNK;
            let item = kv.map_err(storage).and_then(|(k, v)| {
                let seq = u64_at(&k, 1);
                chunk.last_read = Some(seq);
                self.decode(seq, &v)
            });
            match item {
                Ok(e) if filter.is_some_and(|f| !subject::matches(f, &e.subject)) => {}
                Ok(e) => chunk.items.push(Ok(e)),
                Err(e) => {
                    chunk.items.push(Err(e));
                    chunk.failed = true;
                    break;
                }
            }
        }
        chunk
    }

    fn decode(&self, seq: u64, bytes: &[u8]) -> Result<StoredEvent, LogError> {
        let r = Record::decode(bytes)
            .map_err(|e| LogError::Other(format!("corrupt record {seq} in {}: {e}", self.name)))?;
        let mut headers = Headers::new();
        for h in r.headers {
            headers.0.append(h.name.as_str(), h.value.as_str());
        }
        // As JetStream stores it: the audit archive takes an event's id from this header, and
        // a restore without ids loses their duplicate protection.
        if !r.id.is_empty() && headers.get(crate::headers::names::EVENT_ID).is_none() {
            headers.insert(crate::headers::names::EVENT_ID, r.id.as_str());
        }
        Ok(StoredEvent {
            stream: self.name.clone(),
            sequence: seq,
            subject: r.subject,
            payload: r.payload,
            recorded_at: (seq <= self.restored_through())
                .then(|| headers.original_recorded_at())
                .flatten()
                .unwrap_or_else(|| micros_to_time(r.recorded_at_micros)),
            headers,
        })
    }

    /// First sequence recorded at or after `t` (bisection: recorded times never decrease).
    fn first_at_or_after(&self, t: DateTime<Utc>) -> Result<u64, LogError> {
        let c = self.counts();
        let (mut lo, mut hi) = (c.first.max(1), c.last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.read(mid)? {
                Some(e) if e.recorded_at < t => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// Appends a run of events that all belong to this stream, atomically; readers are shown
    /// them once they are flushed.
    fn append_run(&self, events: &[AppendEvent]) -> Vec<Result<Appended, LogError>> {
        let spec = self.spec.lock().unwrap().clone();
        let mut counts = self.counts.lock().unwrap();
        let before = *counts;
        let micros = Utc::now().timestamp_micros().max(counts.last_micros);
        let window = spec.duplicate_window.as_micros() as i64;
        let mut batch = sled::Batch::default();
        let mut ids: HashMap<&str, u64> = HashMap::new();
        let mut subjects: HashMap<&str, u64> = HashMap::new();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            out.push(self.stage(
                e,
                &spec,
                micros,
                window,
                &mut counts,
                &mut batch,
                &mut ids,
                &mut subjects,
            ));
        }
        counts.last_micros = micros;
        if counts.last == before.last {
            return out;
        }
        batch.insert(
            COUNTS,
            serde_json::to_vec(&*counts).expect("counts serialize"),
        );
        if let Err(e) = self.tree.apply_batch(batch) {
            *counts = before;
            let e = storage(e);
            return out
                .into_iter()
                .map(|r| match r {
                    Ok(Appended::New { .. }) => Err(e.clone()),
                    other => other,
                })
                .collect();
        }
        if let Some(marker) = crate::catalog::restore_marker_of(&spec.subjects) {
            if events.iter().any(|e| e.subject == marker) {
                *self.restored.lock().unwrap() = None;
            }
        }
        let mut maintained = self.maintained.lock().unwrap();
        if maintained.is_none_or(|at| at.elapsed() >= MAINTENANCE_EVERY) {
            *maintained = Some(Instant::now());
            match self.maintain(&spec, &mut counts) {
                Ok(true) => *maintained = None,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(stream = %self.name, error = %e, "embedded log maintenance failed")
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn stage<'a>(
        &self,
        e: &'a AppendEvent,
        spec: &StreamSpec,
        micros: i64,
        window: i64,
        counts: &mut Counts,
        batch: &mut sled::Batch,
        ids: &mut HashMap<&'a str, u64>,
        subjects: &mut HashMap<&'a str, u64>,
    ) -> Result<Appended, LogError> {
        let size = size_of(&e.headers, &e.payload);
        if size > spec.max_message_size.max(0) as usize {
            return Err(LogError::TooLarge {
                size,
                limit: spec.max_message_size as usize,
            });
        }
        if !e.id.is_empty() {
            if let Some(&sequence) = ids.get(e.id.as_str()) {
                return Ok(Appended::Duplicate { sequence });
            }
            if let Some(v) = self.tree.get(key(ID, e.id.as_bytes())).map_err(storage)? {
                let seen = u64_at(&v, 8) as i64;
                if micros - seen < window {
                    return Ok(Appended::Duplicate {
                        sequence: u64_at(&v, 0),
                    });
                }
            }
        }
        if let Some(expected) = e.expected_subject_sequence {
            let last = match subjects.get(e.subject.as_str()) {
                Some(s) => *s,
                None => self
                    .tree
                    .get(key(SUBJECT, e.subject.as_bytes()))
                    .map_err(storage)?
                    .map_or(0, |v| u64_at(&v, 0)),
            };
            if last != expected {
                return Err(LogError::Conflict {
                    subject: e.subject.clone(),
                    expected,
                });
            }
        }
        let seq = counts.last + 1;
        counts.last = seq;
        if counts.first == 0 {
            counts.first = seq;
        }
        counts.messages += 1;
        counts.bytes += size as u64;
        let record = Record {
            subject: e.subject.clone(),
            headers: e
                .headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.to_string(),
                    value: value.to_string(),
                })
                .collect(),
            payload: e.payload.clone(),
            recorded_at_micros: micros,
            id: e.id.clone(),
        };
        batch.insert(&msg_key(seq), record.encode_to_vec());
        if !e.id.is_empty() {
            let mut v = seq.to_be_bytes().to_vec();
            v.extend_from_slice(&(micros as u64).to_be_bytes());
            batch.insert(key(ID, e.id.as_bytes()), v);
            ids.insert(&e.id, seq);
        }
        batch.insert(key(SUBJECT, e.subject.as_bytes()), &seq.to_be_bytes());
        subjects.insert(&e.subject, seq);
        Ok(Appended::New { sequence: seq })
    }

    /// Forgets ids past the duplicate window and drops messages past `max_age` / `max_bytes`
    /// (oldest first, as JetStream's discard-old), [`MAINTENANCE_STEPS`] of each at most; true
    /// when there may be more.
    fn maintain(&self, spec: &StreamSpec, counts: &mut Counts) -> Result<bool, LogError> {
        let now = Utc::now().timestamp_micros();
        let id_cut = now - spec.duplicate_window.as_micros() as i64;
        let mut batch = sled::Batch::default();
        let from = counts.ids_forgotten_to.max(counts.first.saturating_sub(1)) + 1;
        // Bounded: it runs inside an append, under the stream's lock. The rest waits for the
        // next pass (a burst of a million events expired at once stalled one append for
        // seconds).
        let mut forgotten = 0;
        for kv in self
            .tree
            .range(msg_key(from)..=msg_key(counts.last))
            .take(MAINTENANCE_STEPS)
        {
            let (k, v) = kv.map_err(storage)?;
            let seq = u64_at(&k, 1);
            let r = Record::decode(v.as_ref()).map_err(|e| LogError::Other(e.to_string()))?;
            if r.recorded_at_micros >= id_cut {
                break;
            }
            let id = key(ID, r.id.as_bytes());
            // A later message may have reused the id after it expired: keep that one.
            if let Some(v) = self.tree.get(&id).map_err(storage)? {
                if u64_at(&v, 0) == seq {
                    batch.remove(id);
                }
            }
            counts.ids_forgotten_to = seq;
            forgotten += 1;
        }
        let age_cut = (!spec.max_age.is_zero()).then(|| now - spec.max_age.as_micros() as i64);
        let mut removed = 0;
        while counts.messages > 0 && removed < MAINTENANCE_STEPS {
            let Some(oldest) = self.read(counts.first)? else {
                break;
            };
            let too_old = age_cut.is_some_and(|cut| oldest.recorded_at.timestamp_micros() < cut);
            let too_big = spec.max_bytes >= 0 && counts.bytes > spec.max_bytes as u64;
            if !too_old && !too_big {
                break;
            }
            batch.remove(&msg_key(counts.first));
            removed += 1;
            counts.bytes = counts
                .bytes
                .saturating_sub(size_of(&oldest.headers, &oldest.payload) as u64);
            counts.messages -= 1;
            counts.first += 1;
        }
        batch.insert(
            COUNTS,
            serde_json::to_vec(&*counts).expect("counts serialize"),
        );
        self.tree.apply_batch(batch).map_err(storage)?;
        Ok(forgotten == MAINTENANCE_STEPS || removed == MAINTENANCE_STEPS)
    }
}

/// A durable consumer's position, as persisted (`consumers` tree).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Position {
    filter: Option<String>,
    cumulative: bool,
    ack_wait_ms: u64,
    /// Next sequence never delivered yet.
    next: u64,
    ack_floor: u64,
    /// Acked above the floor (individual acks while an earlier one is pending).
    acked: Vec<u64>,
    /// Delivery counts of pending messages delivered more than once, so a poison message
    /// still reaches the dead letters across restarts.
    redelivered: Vec<(u64, u32)>,
}

struct Pending {
    delivered: u32,
    due: Instant,
}

struct Core {
    stream: Arc<Stream>,
    durable: String,
    filter: Option<String>,
    cumulative: bool,
    ack_wait: Duration,
    next: u64,
    ack_floor: u64,
    acked: BTreeSet<u64>,
    pending: BTreeMap<u64, Pending>,
}

impl Core {
    fn position(&self) -> Position {
        Position {
            filter: self.filter.clone(),
            cumulative: self.cumulative,
            ack_wait_ms: self.ack_wait.as_millis() as u64,
            next: self.next,
            ack_floor: self.ack_floor,
            acked: self.acked.iter().copied().collect(),
            redelivered: self
                .pending
                .iter()
                .filter(|(_, p)| p.delivered > 1)
                .map(|(s, p)| (*s, p.delivered))
                .collect(),
        }
    }

    fn matches(&self, subject: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| f.is_empty() || subject::matches(f, subject))
    }

    /// Due redeliveries first, then new messages, up to `max`.
    fn collect(&mut self, max: usize) -> Result<Vec<(StoredEvent, u32)>, LogError> {
        let now = Instant::now();
        let mut out = Vec::new();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(s, _)| *s)
            .take(max)
            .collect();
        for seq in due {
            match self.stream.read(seq)? {
                // Restored after a restart without knowing the filter outcome.
                Some(e) if !self.matches(&e.subject) => {
                    self.pending.remove(&seq);
                }
                Some(e) => {
                    let p = self.pending.get_mut(&seq).expect("pending");
                    p.delivered += 1;
                    p.due = now + self.ack_wait;
                    out.push((e, p.delivered));
                }
                None => {
                    self.pending.remove(&seq);
                }
            }
        }
        let last = self.stream.flushed();
        if out.len() < max && self.next <= last {
            let from = self.next.max(self.stream.counts().first);
            for kv in self.stream.tree.range(msg_key(from)..=msg_key(last)) {
                let (k, v) = kv.map_err(storage)?;
                let seq = u64_at(&k, 1);
                self.next = seq + 1;
                if self.acked.contains(&seq) {
                    continue;
                }
                let e = self.stream.decode(seq, &v)?;
                if !self.matches(&e.subject) {
                    continue;
                }
                let delivered = 1;
                self.pending.insert(
                    seq,
                    Pending {
                        delivered,
                        due: now + self.ack_wait,
                    },
                );
                out.push((e, delivered));
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    fn settle(&mut self, seq: u64) {
        if self.cumulative {
            self.pending = self.pending.split_off(&(seq + 1));
            self.ack_floor = self.ack_floor.max(seq);
        } else {
            self.pending.remove(&seq);
            self.acked.insert(seq);
        }
        let floor = self
            .pending
            .keys()
            .next()
            .map_or(self.next.saturating_sub(1), |s| s - 1);
        self.ack_floor = self.ack_floor.max(floor);
        self.acked = self.acked.split_off(&(self.ack_floor + 1));
    }
}

/// (stream, durable)
type ConsumerKey = (String, String);

struct Inner {
    db: sled::Db,
    catalog: Catalog,
    specs: sled::Tree,
    positions: sled::Tree,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    consumers: Mutex<HashMap<ConsumerKey, Arc<Mutex<Core>>>>,
    /// One flush at a time ([`SledLog::flush`]).
    flushing: tokio::sync::Mutex<()>,
    /// Flushes begun, and the number of the last one done: a caller whose writes came before
    /// flush `n` began is on disk once `flushed_through >= n`.
    flushes_begun: std::sync::atomic::AtomicU64,
    flushed_through: std::sync::atomic::AtomicU64,
}

/// The log on sled. Cheap to clone; one per data directory per process (sled locks it).
#[derive(Clone)]
pub struct SledLog {
    inner: Arc<Inner>,
}

impl SledLog {
    /// Creates missing streams; brings the others to their spec when `update`, else reports
    /// their drift.
    async fn ensure(
        &self,
        specs: &[StreamSpec],
        update: bool,
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError> {
        let mut out = Vec::new();
        for want in specs {
            let outcome = match self.stream(&want.name) {
                Err(_) => {
                    self.store_spec(want)?;
                    self.load_stream(want.clone())?;
                    EnsureOutcome::Created
                }
                Ok(s) => {
                    let drift = Self::drift(&s.spec.lock().unwrap(), want);
                    if drift.is_empty() {
                        EnsureOutcome::Unchanged
                    } else if !update {
                        EnsureOutcome::Drifted(drift)
                    } else {
                        self.store_spec(want)?;
                        *s.spec.lock().unwrap() = want.clone();
                        EnsureOutcome::Updated(drift)
                    }
                }
            };
            out.push((want.name.clone(), outcome));
        }
        self.flush().await?;
        Ok(out)
    }

    /// Opens (creating if needed) the log under `dir`.
    pub fn open(dir: &Path, catalog: Catalog) -> Result<SledLog, LogError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            LogError::Unavailable(format!(
                "cannot open the embedded log at {} ({e}); is another `enablement dev` using this directory?",
                dir.display()
            ))
        })?;
        let specs = db.open_tree("streams").map_err(storage)?;
        let positions = db.open_tree("consumers").map_err(storage)?;
        let log = SledLog {
            inner: Arc::new(Inner {
                db,
                catalog,
                specs,
                positions,
                streams: Mutex::new(HashMap::new()),
                consumers: Mutex::new(HashMap::new()),
                flushing: tokio::sync::Mutex::new(()),
                flushes_begun: Default::default(),
                flushed_through: Default::default(),
            }),
        };
        for kv in log.inner.specs.iter() {
            let (_, v) = kv.map_err(storage)?;
            let spec: StreamSpec = serde_json::from_slice(&v)
                .map_err(|e| LogError::Other(format!("corrupt stream spec: {e}")))?;
            log.load_stream(spec)?;
        }
        for kv in log.inner.positions.iter() {
            let (k, v) = kv.map_err(storage)?;
            let key = String::from_utf8_lossy(&k).to_string();
            let Some((stream, durable)) = key.split_once('\0') else {
                continue;
            };
            let position: Position = serde_json::from_slice(&v)
                .map_err(|e| LogError::Other(format!("corrupt consumer {key}: {e}")))?;
            if let Ok(s) = log.stream(stream) {
                log.restore_consumer(s, durable, position);
            }
        }
        Ok(log)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// Bytes on disk (for `streams info` and the benchmark).
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    fn load_stream(&self, spec: StreamSpec) -> Result<Arc<Stream>, LogError> {
        let tree = self
            .inner
            .db
            .open_tree(format!("stream:{}", spec.name))
            .map_err(storage)?;
        let counts: Counts = match tree.get(COUNTS).map_err(storage)? {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| LogError::Other(format!("corrupt counters of {}: {e}", spec.name)))?,
            None => Counts::default(),
        };
        let stream = Arc::new(Stream {
            name: spec.name.clone(),
            tree,
            spec: Mutex::new(spec.clone()),
            counts: Mutex::new(counts),
            // Read from disk: all of it is there.
            flushed: watch::channel(counts.last).0,
            maintained: Mutex::new(None),
            restored: Mutex::new(None),
        });
        self.inner
            .streams
            .lock()
            .unwrap()
            .insert(spec.name, stream.clone());
        Ok(stream)
    }

    fn stream(&self, name: &str) -> Result<Arc<Stream>, LogError> {
        self.inner
            .streams
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownStream(name.to_string()))
    }

    fn route(&self, subject: &str) -> Result<Arc<Stream>, LogError> {
        self.inner
            .streams
            .lock()
            .unwrap()
            .values()
            .find(|s| {
                s.spec
                    .lock()
                    .unwrap()
                    .subjects
                    .iter()
                    .any(|p| subject::matches(p, subject))
            })
            .cloned()
            .ok_or_else(|| LogError::NoStream(subject.to_string()))
    }

    fn position_key(stream: &str, durable: &str) -> Vec<u8> {
        format!("{stream}\0{durable}").into_bytes()
    }

    fn save(&self, core: &Core) {
        let key = Self::position_key(&core.stream.name, &core.durable);
        let value = serde_json::to_vec(&core.position()).expect("position serializes");
        if let Err(e) = self.inner.positions.insert(key, value) {
            // Losing a position only means redelivery (at least once), never loss.
            tracing::warn!(durable = %core.durable, error = %e, "consumer position not saved");
        }
    }

    fn restore_consumer(&self, stream: Arc<Stream>, durable: &str, p: Position) {
        let now = Instant::now();
        let acked: BTreeSet<u64> = p.acked.into_iter().collect();
        let counts: HashMap<u64, u32> = p.redelivered.into_iter().collect();
        // Delivered before the restart and never acked: redeliver now, counting that delivery.
        let pending = (p.ack_floor + 1..p.next)
            .filter(|s| !acked.contains(s))
            .map(|s| {
                (
                    s,
                    Pending {
                        delivered: counts.get(&s).copied().unwrap_or(1),
                        due: now,
                    },
                )
            })
            .collect();
        let core = Core {
            stream: stream.clone(),
            durable: durable.to_string(),
            filter: p.filter,
            cumulative: p.cumulative,
            ack_wait: Duration::from_millis(p.ack_wait_ms),
            next: p.next,
            ack_floor: p.ack_floor,
            acked,
            pending,
        };
        self.inner.consumers.lock().unwrap().insert(
            (stream.name.clone(), durable.to_string()),
            Arc::new(Mutex::new(core)),
        );
    }

    fn drift(live: &StreamSpec, want: &StreamSpec) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! cmp {
            ($field:ident) => {
                if live.$field != want.$field {
                    out.push(format!(
                        "{}: {:?} → {:?}",
                        stringify!($field),
                        live.$field,
                        want.$field
                    ));
                }
            };
        }
        // Replicas mean nothing to a single embedded store.
        cmp!(subjects);
        cmp!(description);
        cmp!(max_age);
        cmp!(max_bytes);
        cmp!(max_message_size);
        cmp!(duplicate_window);
        out
    }

    fn store_spec(&self, spec: &StreamSpec) -> Result<(), LogError> {
        self.inner
            .specs
            .insert(
                spec.name.as_bytes(),
                serde_json::to_vec(spec).expect("spec serializes"),
            )
            .map_err(storage)?;
        Ok(())
    }

    /// Returns once everything written before the call is on disk. sled 0.34's `flush_async`
    /// deadlocks when called concurrently (spacejam/sled#1308, fixed only on its main branch):
    /// this runs its blocking flush on tokio's blocking pool, one at a time, and a caller that
    /// waited while a flush begun after its call ran is done with that one (group commit).
    async fn flush(&self) -> Result<(), LogError> {
        use std::sync::atomic::Ordering::SeqCst;
        let covered_by = self.inner.flushes_begun.load(SeqCst) + 1;
        let _one = self.inner.flushing.lock().await;
        if self.inner.flushed_through.load(SeqCst) >= covered_by {
            return Ok(());
        }
        let n = self.inner.flushes_begun.fetch_add(1, SeqCst) + 1;
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| LogError::Unavailable(format!("embedded log flush: {e}")))?
            .map_err(storage)?;
        self.inner.flushed_through.store(n, SeqCst);
        Ok(())
    }

    /// Returns once `stream` is on disk up to `upto` (at most its last sequence), flushing if
    /// it is not yet: the end of a replay may come from a writer's view, which includes
    /// appends whose flush is still running.
    async fn on_disk(&self, stream: &Stream, upto: u64) -> Result<(), LogError> {
        if stream.flushed() >= upto {
            return Ok(());
        }
        let last = stream.counts().last;
        self.flush().await?;
        stream.mark_flushed(last);
        Ok(())
    }
}

#[async_trait]
impl EventLog for SledLog {
    async fn ensure_streams(
        &self,
        specs: &[StreamSpec],
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError> {
        self.ensure(specs, true).await
    }

    async fn create_missing_streams(
        &self,
        specs: &[StreamSpec],
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError> {
        self.ensure(specs, false).await
    }

    async fn append(&self, event: AppendEvent) -> Result<Appended, LogError> {
        self.append_batch(vec![event])
            .await
            .pop()
            .expect("one result per event")
    }

    async fn append_batch(&self, events: Vec<AppendEvent>) -> Vec<Result<Appended, LogError>> {
        let mut out = Vec::with_capacity(events.len());
        let mut written = Vec::new();
        let mut start = 0;
        // Consecutive events of one stream are appended as one atomic batch.
        while start < events.len() {
            let stream = match self.route(&events[start].subject) {
                Ok(s) => s,
                Err(e) => {
                    out.push(Err(e));
                    start += 1;
                    continue;
                }
            };
            let mut end = start + 1;
            while end < events.len()
                && self
                    .route(&events[end].subject)
                    .is_ok_and(|s| Arc::ptr_eq(&s, &stream))
            {
                end += 1;
            }
            out.extend(stream.append_run(&events[start..end]));
            written.push((stream.clone(), stream.counts().last));
            start = end;
        }
        // Acknowledged means on disk, a duplicate's original included (it may be another
        // writer's append whose flush is still running); shown to readers only then.
        if written.iter().any(|(s, last)| *last > s.flushed()) {
            if let Err(e) = self.flush().await {
                return out
                    .into_iter()
                    .map(|r| match r {
                        Ok(Appended::New { .. }) => Err(e.clone()),
                        other => other,
                    })
                    .collect();
            }
            for (stream, last) in written {
                stream.mark_flushed(last);
            }
        }
        out
    }

    async fn replay(
        &self,
        stream_name: &str,
        from: ReplayFrom,
        to: Option<u64>,
        filter_subject: Option<&str>,
    ) -> Result<BoxStream<'static, Result<StoredEvent, LogError>>, LogError> {
        let stream = self.stream(stream_name)?;
        let counts = stream.counts();
        let end = to.map_or(counts.last, |t| t.min(counts.last));
        self.on_disk(&stream, end).await?;
        let start = match from {
            ReplayFrom::Start => counts.first.max(1),
            ReplayFrom::Sequence(s) => s.max(counts.first).max(1),
            ReplayFrom::Time(t) => stream.first_at_or_after(t)?,
        };
        if start > end {
            return Ok(stream::empty().boxed());
        }
        let filter = filter_subject.filter(|f| !f.is_empty()).map(str::to_string);
        let chunks = stream::unfold(Some(start), move |next| {
            let stream = stream.clone();
            let filter = filter.clone();
            async move {
                let next = next?;
                let chunk = stream.read_chunk(next, end, filter.as_deref());
                // Past the last one read, unless it was the end or a read failed.
                let cursor = match chunk.last_read {
                    Some(seq) if seq < end && !chunk.failed => Some(seq + 1),
                    _ => None,
                };
                let items = chunk.items;
                Some((stream::iter(items), cursor))
            }
        });
        Ok(chunks.flatten().boxed())
    }

    async fn follow(
        &self,
        stream_name: &str,
        from: ReplayFrom,
        filter_subject: Option<&str>,
    ) -> Result<BoxStream<'static, Result<StoredEvent, LogError>>, LogError> {
        let stream = self.stream(stream_name)?;
        // Subscribed before the first look, so an append in between still wakes the reader.
        let appended = stream.flushed.subscribe();
        let counts = stream.counts();
        let start = match from {
            ReplayFrom::Start => counts.first.max(1),
            ReplayFrom::Sequence(s) => s.max(counts.first).max(1),
            ReplayFrom::Time(t) => stream.first_at_or_after(t)?,
        };
        let filter = filter_subject.filter(|f| !f.is_empty()).map(str::to_string);
        // Reads what is stored from `next` on in chunks; with nothing new, waits for an append.
        // After a read error (yielded) it ends: the caller follows again.
        let chunks = stream::unfold((Some(start), appended), move |(next, mut appended)| {
            let stream = stream.clone();
            let filter = filter.clone();
            async move {
                let mut next = next?;
                loop {
                    let last = *appended.borrow_and_update();
                    if next > last {
                        // Never closed while the stream is held: waits for the next append.
                        appended.changed().await.ok()?;
                        continue;
                    }
                    let chunk = stream.read_chunk(next, last, filter.as_deref());
                    // A full chunk: the next look starts right after it; otherwise everything
                    // up to `last` was read.
                    let cursor = match chunk.last_read {
                        _ if chunk.failed => None,
                        Some(seq) if chunk.full => Some(seq + 1),
                        _ => Some(last + 1),
                    };
                    let items = chunk.items;
                    match cursor {
                        Some(c) if items.is_empty() => next = c,
                        _ => return Some((stream::iter(items), (cursor, appended))),
                    }
                }
            }
        });
        Ok(chunks.flatten().boxed())
    }

    async fn get(&self, stream_name: &str, sequence: u64) -> Result<Option<StoredEvent>, LogError> {
        let stream = self.stream(stream_name)?;
        self.on_disk(&stream, sequence.min(stream.counts().last))
            .await?;
        stream.read(sequence)
    }

    async fn last_subject_sequence(
        &self,
        stream_name: &str,
        subject: &str,
    ) -> Result<u64, LogError> {
        let stream = self.stream(stream_name)?;
        Ok(stream
            .tree
            .get(key(SUBJECT, subject.as_bytes()))
            .map_err(storage)?
            .map_or(0, |v| u64_at(&v, 0)))
    }

    async fn stream_state(&self, stream_name: &str) -> Result<StreamState, LogError> {
        let stream = self.stream(stream_name)?;
        let counts = stream.counts();
        let cores: Vec<Arc<Mutex<Core>>> = self
            .inner
            .consumers
            .lock()
            .unwrap()
            .iter()
            .filter(|((s, _), _)| s == stream_name)
            .map(|(_, c)| c.clone())
            .collect();
        let mut consumers = Vec::new();
        for core in cores {
            let core = core.lock().unwrap();
            let from = core.next.max(counts.first);
            let pending = if core.filter.as_deref().is_none_or(str::is_empty) {
                (counts.last + 1).saturating_sub(from)
            } else {
                let mut n = 0;
                for kv in stream.tree.range(msg_key(from)..=msg_key(counts.last)) {
                    let (k, v) = kv.map_err(storage)?;
                    if core.matches(&stream.decode(u64_at(&k, 1), &v)?.subject) {
                        n += 1;
                    }
                }
                n
            };
            consumers.push(ConsumerState {
                name: core.durable.clone(),
                pending,
                ack_pending: core.pending.len() as u64,
                ack_floor: core.ack_floor,
                durable: true,
            });
        }
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(StreamState {
            name: stream_name.to_string(),
            messages: counts.messages,
            bytes: counts.bytes,
            first_sequence: counts.first,
            last_sequence: counts.last,
            consumers,
        })
    }

    async fn consumer(
        &self,
        stream_name: &str,
        spec: ConsumerSpec,
    ) -> Result<Box<dyn DurableConsumer>, LogError> {
        let stream = self.stream(stream_name)?;
        let key = (stream_name.to_string(), spec.durable.clone());
        let existing = self.inner.consumers.lock().unwrap().get(&key).cloned();
        let core = match existing {
            Some(core) => core,
            None => {
                let next = match spec.start {
                    ReplayFrom::Start => 1,
                    ReplayFrom::Sequence(s) => s.max(1),
                    ReplayFrom::Time(t) => stream.first_at_or_after(t)?,
                };
                let core = Core {
                    stream: stream.clone(),
                    durable: spec.durable.clone(),
                    filter: spec.filter_subject.clone(),
                    cumulative: spec.ack == AckMode::Cumulative,
                    ack_wait: spec.ack_wait,
                    next,
                    ack_floor: next - 1,
                    acked: BTreeSet::new(),
                    pending: BTreeMap::new(),
                };
                self.save(&core);
                let core = Arc::new(Mutex::new(core));
                self.inner
                    .consumers
                    .lock()
                    .unwrap()
                    .insert(key, core.clone());
                core
            }
        };
        Ok(Box::new(SledConsumer {
            core,
            stream,
            log: self.clone(),
            max_deliver: spec.max_deliver.max(1),
            deadletter_subject: self.inner.catalog.deadletter_subject_of_stream(stream_name),
        }))
    }

    async fn delete_consumer(&self, stream_name: &str, durable: &str) -> Result<(), LogError> {
        self.inner
            .consumers
            .lock()
            .unwrap()
            .remove(&(stream_name.to_string(), durable.to_string()));
        self.inner
            .positions
            .remove(Self::position_key(stream_name, durable))
            .map_err(storage)?;
        Ok(())
    }

    async fn delete_stream(&self, stream_name: &str) -> Result<(), LogError> {
        let removed = self.inner.streams.lock().unwrap().remove(stream_name);
        if removed.is_none() {
            return Ok(());
        }
        let durables: Vec<String> = self
            .inner
            .consumers
            .lock()
            .unwrap()
            .keys()
            .filter(|(s, _)| s == stream_name)
            .map(|(_, d)| d.clone())
            .collect();
        for d in durables {
            self.delete_consumer(stream_name, &d).await?;
        }
        self.inner.specs.remove(stream_name).map_err(storage)?;
        self.inner
            .db
            .drop_tree(format!("stream:{stream_name}"))
            .map_err(storage)?;
        self.flush().await
    }
}

struct SledConsumer {
    core: Arc<Mutex<Core>>,
    stream: Arc<Stream>,
    log: SledLog,
    max_deliver: u32,
    deadletter_subject: String,
}

struct SledAck {
    core: Arc<Mutex<Core>>,
    log: SledLog,
    sequence: u64,
}

impl SledAck {
    fn update<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let mut core = self.core.lock().unwrap();
        let r = f(&mut core);
        self.log.save(&core);
        r
    }
}

#[async_trait]
impl AckHandle for SledAck {
    async fn ack(&self) -> Result<(), LogError> {
        let cumulative = self.update(|c| {
            c.settle(self.sequence);
            c.cumulative
        });
        // A work queue's ack stands for an effect done (a notification sent): on disk before
        // it is answered, as JetStream keeps it, or a crash within the store's flush interval
        // does it again. A projector's cumulative acks need not be: its checkpoint is the truth.
        if !cumulative {
            self.log.flush().await?;
        }
        Ok(())
    }
    async fn nak(&self, delay: Duration) -> Result<(), LogError> {
        self.update(|c| {
            if let Some(p) = c.pending.get_mut(&self.sequence) {
                p.due = Instant::now() + delay;
            }
        });
        Ok(())
    }
    async fn term(&self) -> Result<(), LogError> {
        self.update(|c| {
            if c.cumulative {
                c.pending.remove(&self.sequence);
                c.acked.insert(self.sequence);
            } else {
                c.settle(self.sequence);
            }
        });
        Ok(())
    }
}

#[async_trait]
impl DurableConsumer for SledConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, LogError> {
        let deadline = Instant::now() + wait;
        loop {
            // Subscribe before looking, so an append in between still wakes us.
            let mut appended = self.stream.flushed.subscribe();
            let (batch, next_due) = {
                let mut core = self.core.lock().unwrap();
                let batch = core.collect(max.max(1))?;
                if !batch.is_empty() {
                    self.log.save(&core);
                }
                (batch, core.next_due())
            };
            if !batch.is_empty() {
                let log: Arc<dyn EventLog> = Arc::new(self.log.clone());
                return Ok(batch
                    .into_iter()
                    .map(|(event, delivered)| Delivery {
                        handle: Box::new(SledAck {
                            core: self.core.clone(),
                            log: self.log.clone(),
                            sequence: event.sequence,
                        }),
                        event,
                        delivered,
                        max_deliver: self.max_deliver,
                        log: log.clone(),
                        deadletter_subject: self.deadletter_subject.clone(),
                    })
                    .collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake = next_due.map_or(deadline, |d| d.min(deadline)).max(now);
            tokio::select! {
                _ = appended.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::METERING;

    fn event(id: &str) -> AppendEvent {
        AppendEvent {
            subject: "metering.events.sub_1".into(),
            id: id.into(),
            expected_subject_sequence: None,
            headers: Headers::new(),
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn readers_see_an_append_only_once_it_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::default();
        let log = SledLog::open(dir.path(), catalog.clone()).unwrap();
        log.ensure_streams(&catalog.specs()).await.unwrap();
        let name = catalog.stream(METERING);
        let mut follower = log.follow(&name, ReplayFrom::Start, None).await.unwrap();
        let mut consumer = log
            .consumer(&name, ConsumerSpec::new("worker"))
            .await
            .unwrap();

        // In the store, not yet flushed: as while an append's flush is running.
        let stream = log.stream(&name).unwrap();
        assert!(stream.append_run(&[event("a")])[0].is_ok());
        let wait = Duration::from_millis(200);
        assert!(consumer.fetch(10, wait).await.unwrap().is_empty());
        assert!(tokio::time::timeout(wait, follower.next()).await.is_err());

        // A writer's view includes it, and a replay to that end flushes it first.
        let end = log.stream_state(&name).await.unwrap().last_sequence;
        assert_eq!(end, 1);
        let replayed: Vec<_> = log
            .replay(&name, ReplayFrom::Start, Some(end), None)
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(replayed.len(), 1);

        // Now on disk: every reader is shown it.
        let followed = tokio::time::timeout(wait, follower.next()).await.unwrap();
        assert_eq!(followed.unwrap().unwrap().sequence, 1);
        assert_eq!(consumer.fetch(10, wait).await.unwrap().len(), 1);
        // A duplicate of an append still being flushed is answered once it is on disk.
        assert!(stream.append_run(&[event("b")])[0].is_ok());
        let again = log.append(event("b")).await.unwrap();
        assert_eq!(again, Appended::Duplicate { sequence: 2 });
        assert_eq!(stream.flushed(), 2);
    }

    /// Appends from many tasks at once each wait for a flush: sled's own `flush_async`
    /// deadlocked under such concurrency (spacejam/sled#1308).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::default();
        let log = SledLog::open(dir.path(), catalog.clone()).unwrap();
        log.ensure_streams(&catalog.specs()).await.unwrap();
        for round in 0..20 {
            let tasks: Vec<_> = (0..100)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(async move { log.append(event(&format!("{round}-{i}"))).await })
                })
                .collect();
            let all = futures::future::join_all(tasks);
            let done = tokio::time::timeout(Duration::from_secs(30), all)
                .await
                .expect("every append returned");
            assert!(done.into_iter().all(|r| r.unwrap().is_ok()));
        }
        let name = catalog.stream(METERING);
        assert_eq!(log.stream(&name).unwrap().flushed(), 2_000);
    }
}
