//! Continuous audit exports of every stream to the archive, their verification, and restore.
//!
//! # Layout
//!
//! Per stream, objects of consecutive, non-overlapping sequence ranges:
//!
//! ```text
//! audit/<STREAM>/<first 20 digits>-<last 20 digits>.ndjson.gz      the events (gzip NDJSON)
//! audit/<STREAM>/<first 20 digits>-<last 20 digits>.manifest.json  what the object holds
//! ```
//!
//! Each NDJSON line is one event ([`ArchivedEvent`]): stream, sequence, subject, id (the
//! platform's `Creto-Event-Id`, else a producer's `Nats-Msg-Id`, when present), headers (name → values), payload in base64 (plus
//! `payload_text` when it is UTF-8, for human readers) and recorded_at (RFC 3339, nanoseconds).
//!
//! Each manifest ([`Manifest`]) names its range, count, object key and the object's SHA-256,
//! and the SHA-256 of the previous manifest's bytes (zeros for the first). The manifests form
//! a hash chain: deleting, altering, re-ordering or re-forging an object or a manifest breaks
//! a hash or the chain, and [`verify`] says where.
//!
//! # Why a dedicated loop and not a [`crate::Projector`]
//!
//! The exporter buffers events and writes one object per N events, M bytes, or `max_age` (the
//! archive's RPO), whichever comes first. `runner::run` does not fit that:
//! - it acks every batch after `apply`, and then, when the next batch does not start right after
//!   the reported checkpoint (buffered, unflushed events are not "applied"), it repositions the
//!   consumer and fetches them again, on every batch;
//! - it calls `apply` only when events arrive, so the buffer of a stream that went quiet would
//!   never be flushed by age.
//!
//! So [`AuditExporter::run`] is its own loop on a durable consumer (`audit-<stream>`, cumulative
//! acks, so `streams info` shows the export lag): it acks the last event of an object only once
//! the object and its manifest are stored. Its checkpoint is the archive itself: the last
//! sequence of the last manifest, found by listing at start, so a crash loses nothing and
//! duplicates nothing: the object is written before its manifest, and objects without a
//! manifest past the checkpoint (a crash between the two puts) are deleted at start and written
//! again; a last manifest whose object is missing (an earlier exporter's late write) is removed
//! and its range written again. One exporter per stream must run at a time (two would fork the
//! chain).
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use creto_streams::headers::names;
use creto_streams::Catalog;
use creto_streams::{
    AckMode, AppendEvent, Appended, ConsumerSpec, Delivery, EventLog, Headers, LogError,
    ReplayFrom, StoredEvent,
};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::metrics::AUDIT_UNARCHIVED_SECONDS;

use crate::archive::{Archive, ArchiveError};

/// Version of the object and manifest formats, in every manifest.
pub const FORMAT_VERSION: u32 = 1;
/// The previous-manifest hash of the first manifest.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const OBJECT_SUFFIX: &str = ".ndjson.gz";
const MANIFEST_SUFFIX: &str = ".manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{0}")]
    Refused(String),
    #[error("corrupt archive: {0}")]
    Corrupt(String),
}

/// The key prefix of a stream's exports: `audit/<STREAM>/`.
pub fn stream_prefix(stream: &str) -> String {
    format!("audit/{stream}/")
}

fn range_name(first: u64, last: u64) -> String {
    format!("{first:020}-{last:020}")
}

pub fn object_key(stream: &str, first: u64, last: u64) -> String {
    format!(
        "{}{}{OBJECT_SUFFIX}",
        stream_prefix(stream),
        range_name(first, last)
    )
}

pub fn manifest_key(stream: &str, first: u64, last: u64) -> String {
    format!(
        "{}{}{MANIFEST_SUFFIX}",
        stream_prefix(stream),
        range_name(first, last)
    )
}

/// `(first, last, is_manifest)` of a key under the stream prefix; `None` for anything else.
fn parse_key(prefix: &str, key: &str) -> Option<(u64, u64, bool)> {
    let rest = key.strip_prefix(prefix)?;
    let (range, manifest) = if let Some(r) = rest.strip_suffix(MANIFEST_SUFFIX) {
        (r, true)
    } else {
        (rest.strip_suffix(OBJECT_SUFFIX)?, false)
    };
    let (a, b) = range.split_once('-')?;
    if a.len() != 20 || b.len() != 20 {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?, manifest))
}

fn short(first: u64, last: u64) -> String {
    format!("{first}-{last}")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The first 128 bits of an id's SHA-256.
fn id_digest(id: &str) -> u128 {
    let digest = Sha256::digest(id.as_bytes());
    u128::from_be_bytes(digest[..16].try_into().expect("a SHA-256 has 32 bytes"))
}

/// One event in an object, one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedEvent {
    pub stream: String,
    pub sequence: u64,
    pub subject: String,
    /// The idempotency id when the stored headers carry a non-empty one: the platform's
    /// (`Creto-Event-Id`; its `Nats-Msg-Id` is keyed), else a producer's `Nats-Msg-Id`.
    pub id: Option<String>,
    pub headers: BTreeMap<String, Vec<String>>,
    /// Base64 (standard, padded).
    pub payload: String,
    /// The payload as text when it is valid UTF-8 (for readers; restore uses `payload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_text: Option<String>,
    /// RFC 3339 with nanoseconds.
    pub recorded_at: String,
}

impl ArchivedEvent {
    pub fn from_stored(e: &StoredEvent) -> Self {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in e.headers.iter() {
            headers
                .entry(name.to_string())
                .or_default()
                .push(value.to_string());
        }
        ArchivedEvent {
            stream: e.stream.clone(),
            sequence: e.sequence,
            subject: e.subject.clone(),
            id: [names::EVENT_ID, "Nats-Msg-Id"]
                .into_iter()
                .find_map(|h| e.headers.get(h).filter(|v| !v.is_empty()))
                .map(str::to_string),
            headers,
            payload: base64::engine::general_purpose::STANDARD.encode(&e.payload),
            payload_text: std::str::from_utf8(&e.payload).ok().map(str::to_string),
            recorded_at: e.recorded_at.to_rfc3339_opts(SecondsFormat::Nanos, true),
        }
    }

    pub fn payload_bytes(&self) -> Result<Bytes, AuditError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .map(Bytes::from)
            .map_err(|e| {
                AuditError::Corrupt(format!(
                    "sequence {}: payload not base64: {e}",
                    self.sequence
                ))
            })
    }

    pub fn recorded_at(&self) -> Result<DateTime<Utc>, AuditError> {
        DateTime::parse_from_rfc3339(&self.recorded_at)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                AuditError::Corrupt(format!(
                    "sequence {}: recorded_at {:?}: {e}",
                    self.sequence, self.recorded_at
                ))
            })
    }
}

/// What one object holds; the link of the hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub stream: String,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub count: u64,
    pub object_key: String,
    pub object_sha256: String,
    pub object_bytes: u64,
    /// SHA-256 of the previous manifest's bytes as stored; [`ZERO_HASH`] for the first.
    pub previous_manifest_sha256: String,
    pub created_at: String,
}

/// When the exporter writes an object.
#[derive(Debug, Clone, Copy)]
pub struct ExportConfig {
    /// Events per object at most (kept below the consumer's 50,000 unacked messages).
    pub max_events: usize,
    /// Uncompressed NDJSON bytes per object at most (one event may go over).
    pub max_bytes: usize,
    /// The oldest buffered event is written out within this time: the archive's RPO.
    pub max_age: Duration,
    /// Deliveries fetched at a time.
    pub fetch_batch: usize,
    /// How long an object's writes are retried before the exporter stops with the error (and
    /// is reported down) instead of looking healthy while nothing reaches the archive.
    pub put_give_up: Duration,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            max_events: 20_000,
            max_bytes: 16 * 1024 * 1024,
            max_age: Duration::from_secs(60),
            fetch_batch: 1_000,
            put_give_up: Duration::from_secs(120),
        }
    }
}

/// The end of the chain: what the next manifest follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// Last exported sequence (0: nothing yet).
    pub last_sequence: u64,
    pub manifest_sha256: String,
    /// The key of the object holding the last exported event.
    pub last_object: Option<String>,
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStats {
    pub objects: u64,
    pub events: u64,
    pub compressed_bytes: u64,
    /// Last exported sequence.
    pub checkpoint: u64,
}

/// Events buffered for the next object, gzip-encoded as they arrive.
struct Buffer {
    encoder: GzEncoder<Vec<u8>>,
    first: u64,
    last: u64,
    count: usize,
    raw_bytes: usize,
    oldest: Instant,
    /// When the log stored the oldest event held: how long it has waited for the archive,
    /// across the exporter's restarts (each reads it again from the log).
    oldest_recorded: DateTime<Utc>,
}

impl Buffer {
    fn new(first: u64) -> Self {
        Buffer {
            encoder: GzEncoder::new(Vec::new(), flate2::Compression::default()),
            first,
            last: first.saturating_sub(1),
            count: 0,
            raw_bytes: 0,
            oldest: Instant::now(),
            oldest_recorded: Utc::now(),
        }
    }

    fn push(&mut self, e: &StoredEvent) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(&ArchivedEvent::from_stored(e))
            .map_err(|e| AuditError::Corrupt(e.to_string()))?;
        line.push(b'\n');
        self.encoder
            .write_all(&line)
            .map_err(|e| AuditError::Corrupt(format!("gzip: {e}")))?;
        if self.count == 0 {
            self.first = e.sequence;
            self.oldest = Instant::now();
            self.oldest_recorded = e.recorded_at;
        }
        self.last = e.sequence;
        self.count += 1;
        self.raw_bytes += line.len();
        Ok(())
    }
}

/// Exports one stream to the archive (see the module documentation).
pub struct AuditExporter {
    log: Arc<dyn EventLog>,
    archive: Arc<dyn Archive>,
    stream: String,
    config: ExportConfig,
}

impl AuditExporter {
    pub fn new(
        log: Arc<dyn EventLog>,
        archive: Arc<dyn Archive>,
        stream: impl Into<String>,
        config: ExportConfig,
    ) -> Self {
        let mut config = config;
        config.max_events = config.max_events.clamp(1, 40_000);
        config.fetch_batch = config.fetch_batch.max(1);
        AuditExporter {
            log,
            archive,
            stream: stream.into(),
            config,
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Durable consumer name (and the product label): `audit-<stream lowercase>`.
    pub fn durable(&self) -> String {
        format!("audit-{}", self.stream.to_ascii_lowercase())
    }

    /// Finds the end of the chain in the archive and deletes objects a crash left without
    /// their manifest past it.
    ///
    /// The last manifest is taken only when its object is there. Written in this order, a
    /// manifest without its object is the mark of an earlier exporter whose manifest write
    /// landed after this recovery had deleted its object as an orphan (an aborted write still
    /// in flight, a late S3 PUT): that link is removed and its range exported again, from the
    /// log. Only the last link: an object missing further back is for `verify` to report.
    pub async fn recover(&self) -> Result<Tail, AuditError> {
        let prefix = stream_prefix(&self.stream);
        let listed = self.archive.list(&prefix).await?;
        let mut links: Vec<(u64, u64)> = listed
            .iter()
            .filter_map(|o| match parse_key(&prefix, &o.key) {
                Some((first, last, true)) => Some((first, last)),
                _ => None,
            })
            .collect();
        links.sort_by_key(|&(first, last)| (last, first));
        if let Some(&(first, l)) = links.last() {
            let object = object_key(&self.stream, first, l);
            if !listed.iter().any(|o| o.key == object) {
                tracing::warn!(stream = %self.stream, object = %short(first, l),
                    "the last manifest's object is missing (an interrupted export); writing the range again");
                self.archive
                    .delete(&manifest_key(&self.stream, first, l))
                    .await?;
                links.pop();
            }
        }
        let tail = match links.last() {
            None => Tail {
                last_sequence: 0,
                manifest_sha256: ZERO_HASH.to_string(),
                last_object: None,
            },
            Some(&(first, l)) => {
                let key = manifest_key(&self.stream, first, l);
                let bytes = self.archive.get(&key).await?.ok_or_else(|| {
                    AuditError::Corrupt(format!("manifest {key} listed but absent"))
                })?;
                Tail {
                    last_sequence: l,
                    manifest_sha256: sha256_hex(&bytes),
                    last_object: Some(object_key(&self.stream, first, l)),
                }
            }
        };
        for o in &listed {
            if let Some((first, l, false)) = parse_key(&prefix, &o.key) {
                if first > tail.last_sequence {
                    tracing::warn!(stream = %self.stream, object = %short(first, l),
                        "object without a manifest (interrupted export); writing it again");
                    self.archive.delete(&o.key).await?;
                }
            }
        }
        Ok(tail)
    }

    async fn open(&self, after: u64) -> Result<Box<dyn creto_streams::DurableConsumer>, LogError> {
        let durable = self.durable();
        self.log.delete_consumer(&self.stream, &durable).await?;
        // Buffered deliveries stay unacked up to max_age (and the put): no redelivery before.
        let ack_wait =
            (self.config.max_age * 2).max(Duration::from_secs(30)) + Duration::from_secs(30);
        let spec = ConsumerSpec {
            ack: AckMode::Cumulative,
            ack_wait,
            max_deliver: u32::MAX / 2,
            start: ReplayFrom::Sequence(after + 1),
            ..ConsumerSpec::new(durable)
        };
        self.log.consumer(&self.stream, spec).await
    }

    /// Writes the buffer as one object, then its manifest; moves the tail.
    async fn flush(&self, buffer: Buffer, tail: &mut Tail) -> Result<u64, AuditError> {
        let (count, oldest) = (buffer.count, buffer.oldest_recorded);
        let body = buffer
            .encoder
            .finish()
            .map_err(|e| AuditError::Corrupt(format!("gzip: {e}")))?;
        let body = Bytes::from(body);
        let key = object_key(&self.stream, buffer.first, buffer.last);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            stream: self.stream.clone(),
            first_sequence: buffer.first,
            last_sequence: buffer.last,
            count: buffer.count as u64,
            object_key: key.clone(),
            object_sha256: sha256_hex(&body),
            object_bytes: body.len() as u64,
            previous_manifest_sha256: tail.manifest_sha256.clone(),
            created_at: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        };
        let manifest_bytes = Bytes::from(
            serde_json::to_vec_pretty(&manifest).map_err(|e| AuditError::Corrupt(e.to_string()))?,
        );
        let size = body.len() as u64;
        let mut backoff = Duration::from_millis(200);
        let failing_since = Instant::now();
        loop {
            self.waited(count, oldest);
            let put = async {
                self.archive
                    .put(&key, body.clone(), "application/gzip")
                    .await?;
                self.archive
                    .put(
                        &manifest_key(&self.stream, buffer.first, buffer.last),
                        manifest_bytes.clone(),
                        "application/json",
                    )
                    .await
            };
            match put.await {
                Ok(()) => break,
                Err(ArchiveError::InvalidKey(m)) => return Err(ArchiveError::InvalidKey(m).into()),
                // Nothing is lost: events are acknowledged only once archived, and read again
                // when the exporter starts again.
                Err(e) if failing_since.elapsed() >= self.config.put_give_up => {
                    return Err(e.into())
                }
                Err(e) => {
                    tracing::error!(stream = %self.stream, error = %e, "audit export put failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        tail.last_sequence = buffer.last;
        tail.manifest_sha256 = sha256_hex(&manifest_bytes);
        tracing::debug!(stream = %self.stream, range = %short(buffer.first, buffer.last), bytes = size, "audit object written");
        Ok(size)
    }

    /// Flushes a non-empty buffer, then acks its last delivery.
    async fn commit(
        &self,
        buffer: &mut Buffer,
        tail: &mut Tail,
        stats: &mut ExportStats,
        last_delivery: &mut Option<Delivery>,
    ) -> Result<(), AuditError> {
        if buffer.count == 0 {
            return Ok(());
        }
        let full = std::mem::replace(buffer, Buffer::new(0));
        let (events, last) = (full.count as u64, full.last);
        stats.compressed_bytes += self.flush(full, tail).await?;
        stats.objects += 1;
        stats.events += events;
        stats.checkpoint = last;
        *buffer = Buffer::new(last + 1);
        if let Some(d) = last_delivery.take() {
            if let Err(e) = d.ack().await {
                tracing::debug!(error = %e, "audit ack failed (the archive is the checkpoint)");
            }
        }
        Ok(())
    }

    /// Whether the log holds, at the archive's last sequence, the event archived there (or
    /// nothing any more, removed from a stream that still reaches that far).
    async fn log_continues_archive(&self, tail: &Tail) -> Result<bool, AuditError> {
        let Some(key) = &tail.last_object else {
            return Ok(true);
        };
        let Some(stored) = self.log.get(&self.stream, tail.last_sequence).await? else {
            let last = self.log.last_sequence(&self.stream).await?;
            return Ok(tail.last_sequence <= last);
        };
        let Some(body) = self.archive.get(key).await? else {
            return Ok(true); // recover() took it as the last link: it was there
        };
        let archived = gunzip(&body)
            .and_then(|raw| parse_lines(&raw))
            .map_err(|e| AuditError::Corrupt(format!("object {key}: {e}")))?;
        Ok(match archived.last() {
            Some(a) => a.subject == stored.subject && a.payload_bytes()? == stored.payload,
            None => true,
        })
    }

    /// Sets [`AUDIT_UNARCHIVED_SECONDS`] from a buffer's count and when the log stored its
    /// oldest event.
    fn waited(&self, count: usize, oldest_recorded: DateTime<Utc>) {
        let seconds = if count > 0 {
            (Utc::now() - oldest_recorded).num_seconds().max(0)
        } else {
            0
        };
        AUDIT_UNARCHIVED_SECONDS
            .with_label_values(&[&self.stream])
            .set(seconds);
    }

    fn due(&self, b: &Buffer) -> bool {
        b.count >= self.config.max_events
            || b.raw_bytes >= self.config.max_bytes
            || (b.count > 0 && b.oldest.elapsed() >= self.config.max_age)
    }

    /// Exports until `shutdown` turns true (the unflushed buffer is written first), or, with
    /// `once`, until everything up to the stream's last sequence at the start is archived.
    pub async fn run(
        &self,
        once: bool,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<ExportStats, AuditError> {
        let mut tail = self.recover().await?;
        // The log no longer holds, at the archive's last sequence, the event archived there:
        // it was restored at new sequences or recreated. The exporter would resume after the
        // archive's end, and the log's events up to it would never be archived. Compared by
        // content, not only by length: appends after a restore soon pass the archive's end.
        if !self.log_continues_archive(&tail).await? {
            let last = self.log.last_sequence(&self.stream).await?;
            return Err(AuditError::Corrupt(format!(
                "the archive of {} runs to sequence {}, and the log (last sequence {last}) does \
                 not hold the event archived there: the log was restored at new sequences or \
                 recreated. Restore it (`enablement audit restore`) or move the archive's {} \
                 objects aside, then start the exporter again",
                self.stream,
                tail.last_sequence,
                stream_prefix(&self.stream)
            )));
        }
        let mut stats = ExportStats {
            checkpoint: tail.last_sequence,
            ..Default::default()
        };
        let target = if once {
            let state = self.log.stream_state(&self.stream).await?;
            if state.last_sequence <= tail.last_sequence || state.messages == 0 {
                return Ok(stats);
            }
            Some(state.last_sequence)
        } else {
            None
        };
        let mut consumer = self.open(tail.last_sequence).await?;
        // Nothing delivered yet by this consumer: its first delivery is the first event the
        // stream holds after where it was opened.
        let mut fresh = true;
        tracing::info!(stream = %self.stream, checkpoint = tail.last_sequence, "audit exporter active");
        let mut buffer = Buffer::new(tail.last_sequence + 1);
        let mut last_delivery: Option<Delivery> = None;
        // With `once`: fetches that waited and got nothing, for long enough. The target may be
        // a sequence the stream no longer holds (its last events removed: JetStream keeps the
        // last sequence), which no delivery would ever reach; but one silent fetch is also
        // what a slow server gives, and stopping there archived less than asked.
        let mut drained = false;
        let mut silent_since: Option<Instant> = None;
        loop {
            self.waited(buffer.count, buffer.oldest_recorded);
            let stopping = *shutdown.borrow();
            let reached =
                drained || target.is_some_and(|t| buffer.last.max(tail.last_sequence) >= t);
            if buffer.count > 0 && (stopping || reached || self.due(&buffer)) {
                self.commit(&mut buffer, &mut tail, &mut stats, &mut last_delivery)
                    .await?;
                continue;
            }
            if stopping || reached {
                return Ok(stats);
            }
            let wait = if buffer.count > 0 {
                self.config
                    .max_age
                    .saturating_sub(buffer.oldest.elapsed())
                    .clamp(Duration::from_millis(10), Duration::from_millis(500))
            } else {
                Duration::from_millis(500)
            };
            let room = self.config.max_events - buffer.count;
            let batch = tokio::select! {
                b = consumer.fetch(self.config.fetch_batch.min(room), wait) => b?,
                _ = shutdown.changed() => continue,
            };
            if once && batch.is_empty() {
                let since = *silent_since.get_or_insert_with(Instant::now);
                drained = since.elapsed() >= ONCE_SILENCE;
                continue;
            }
            silent_since = None;
            for d in batch {
                let first_delivery = std::mem::replace(&mut fresh, false);
                let expected = tail.last_sequence.max(buffer.last) + 1;
                let seq = d.event.sequence;
                if seq < expected {
                    continue; // a redelivery of what we have
                }
                if seq > expected {
                    // Out of order unless the stream no longer holds them: removed from its
                    // front (limits) or, seen by a fresh consumer, from the middle (`nats
                    // stream rmm`, a purge by subject); `verify` reports that gap.
                    let first = self.log.stream_state(&self.stream).await?.first_sequence;
                    if first <= expected && !first_delivery {
                        tracing::warn!(stream = %self.stream, expected, got = seq,
                            "gap in deliveries; repositioning the exporter");
                        consumer = self.open(expected - 1).await?;
                        fresh = true;
                        break;
                    }
                    tracing::warn!(stream = %self.stream, from = expected, to = seq - 1,
                        "events removed from the stream before they were archived");
                    // Objects hold consecutive sequences: the next one starts after the hole.
                    self.commit(&mut buffer, &mut tail, &mut stats, &mut last_delivery)
                        .await?;
                    buffer = Buffer::new(seq);
                }
                buffer.push(&d.event)?;
                last_delivery = Some(d);
                if self.due(&buffer) {
                    break;
                }
            }
        }
    }
}

/// How long `--once` waits for the stream to deliver more before it takes the rest for events
/// removed from the stream.
const ONCE_SILENCE: Duration = Duration::from_secs(10);

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub stream: String,
    pub objects: u64,
    pub events: u64,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    /// The log's last sequence, when a log was given.
    pub log_last_sequence: Option<u64>,
    /// Events in the log past the archive (the unflushed tail, at most the RPO's worth).
    pub unarchived: u64,
    pub problems: Vec<String>,
    /// What is normal but worth saying (an export caught between an object and its manifest).
    pub notes: Vec<String>,
    /// Each object found equal to its manifest: its range and hash, as read by the verify.
    #[serde(skip)]
    pub vouched: std::collections::BTreeMap<(u64, u64), String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = match (self.first_sequence, self.last_sequence) {
            (Some(a), Some(b)) => format!("sequences {a}-{b}"),
            _ => "no events".into(),
        };
        write!(
            f,
            "{}: {} object(s), {} event(s), {range}",
            self.stream, self.objects, self.events
        )?;
        if let Some(l) = self.log_last_sequence {
            write!(f, "; log at {l}, {} not archived yet", self.unarchived)?;
        }
        if self.ok() {
            write!(f, "; OK")?;
        } else {
            write!(f, "; {} PROBLEM(S):", self.problems.len())?;
            for p in &self.problems {
                write!(f, "\n  - {p}")?;
            }
        }
        for note in &self.notes {
            write!(f, "\n  note: {note}")?;
        }
        Ok(())
    }
}

fn gunzip(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    GzDecoder::new(body)
        .read_to_end(&mut out)
        .map_err(|e| format!("not gzip: {e}"))?;
    Ok(out)
}

fn parse_lines(raw: &[u8]) -> Result<Vec<ArchivedEvent>, String> {
    raw.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_slice(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// Checks a stream's archive: every object has its manifest and matches its SHA-256, the
/// chain of manifests is unbroken and in order, ranges follow each other without gap or
/// overlap, and every object holds exactly the events its manifest says. With `log`, also
/// that the archive starts where the log starts and does not run past it.
pub async fn verify(
    archive: &dyn Archive,
    stream: &str,
    log: Option<&dyn EventLog>,
) -> Result<VerifyReport, AuditError> {
    let prefix = stream_prefix(stream);
    let mut report = VerifyReport {
        stream: stream.to_string(),
        ..Default::default()
    };
    let problems = &mut report.problems;
    // Ranges, in listing (key) order.
    let mut objects: BTreeMap<(u64, u64), ()> = BTreeMap::new();
    let mut manifests: Vec<(u64, u64)> = Vec::new();
    for o in archive.list(&prefix).await? {
        match parse_key(&prefix, &o.key) {
            Some((a, b, true)) => manifests.push((a, b)),
            Some((a, b, false)) => {
                objects.insert((a, b), ());
            }
            None => problems.push(format!("unexpected object {} in the archive", o.key)),
        }
    }
    let archived_through = manifests.iter().map(|&(_, b)| b).max().unwrap_or(0);
    for &(a, b) in objects.keys() {
        if manifests.contains(&(a, b)) {
            continue;
        }
        // Past the last manifest: an export stopped between writing an object and its
        // manifest (a crash, or a look at the wrong moment). The exporter writes it again
        // when it resumes; nothing restores from it meanwhile.
        if a > archived_through {
            report.notes.push(format!(
                "object {} has no manifest yet (an export in progress or cut short); not part of the archive",
                short(a, b)
            ));
        } else {
            problems.push(format!("object {} has no manifest", short(a, b)));
        }
    }
    let mut previous: Option<(u64, u64, String)> = None; // range and sha of the previous manifest
    for &(a, b) in &manifests {
        let name = short(a, b);
        let key = manifest_key(stream, a, b);
        let Some(bytes) = archive.get(&key).await? else {
            problems.push(format!("manifest {name} missing (listed, then gone)"));
            continue;
        };
        let sha = sha256_hex(&bytes);
        let manifest: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("manifest {name} unreadable: {e}"));
                previous = Some((a, b, sha));
                continue;
            }
        };
        if manifest.first_sequence != a
            || manifest.last_sequence != b
            || manifest.stream != stream
            || manifest.object_key != object_key(stream, a, b)
        {
            problems.push(format!(
                "manifest {name} describes {} {} ({}), not its own range (moved or swapped)",
                manifest.stream,
                short(manifest.first_sequence, manifest.last_sequence),
                manifest.object_key
            ));
        }
        // The chain and the ranges.
        match &previous {
            None => {
                if manifest.previous_manifest_sha256 != ZERO_HASH {
                    problems.push(format!(
                        "manifest {name} chain broken: it follows a manifest with hash {} but is the first in the archive (earlier objects deleted?)",
                        manifest.previous_manifest_sha256
                    ));
                }
            }
            Some((pa, pb, psha)) => {
                if manifest.previous_manifest_sha256 != *psha {
                    problems.push(format!(
                        "manifest {name} chain broken: previous hash does not match manifest {} (expected {psha}, found {})",
                        short(*pa, *pb),
                        manifest.previous_manifest_sha256
                    ));
                }
                if a <= *pb {
                    if a < *pa || (a == *pa && b < *pb) {
                        problems.push(format!(
                            "ranges out of order: {name} after {}",
                            short(*pa, *pb)
                        ));
                    } else {
                        problems.push(format!("ranges overlap: {name} and {}", short(*pa, *pb)));
                    }
                } else if a > pb + 1 {
                    problems.push(format!("gap between {pb} and {a}"));
                }
            }
        }
        if b < a {
            problems.push(format!(
                "ranges out of order: manifest {name} ends before it starts"
            ));
        }
        previous = Some((a, b, sha));
        report.first_sequence = Some(report.first_sequence.map_or(a, |f| f.min(a)));
        report.last_sequence = Some(report.last_sequence.map_or(b, |l| l.max(b)));
        // The object.
        let Some(body) = archive.get(&object_key(stream, a, b)).await? else {
            problems.push(format!("object {name} missing"));
            continue;
        };
        report.objects += 1;
        if sha256_hex(&body) != manifest.object_sha256 {
            problems.push(format!(
                "object {name} sha256 mismatch (altered): manifest says {}, object is {}",
                manifest.object_sha256,
                sha256_hex(&body)
            ));
            continue;
        }
        report
            .vouched
            .insert((a, b), manifest.object_sha256.clone());
        let events = match gunzip(&body).and_then(|raw| parse_lines(&raw)) {
            Ok(events) => events,
            Err(e) => {
                problems.push(format!("object {name} unreadable: {e}"));
                continue;
            }
        };
        report.events += events.len() as u64;
        if events.len() as u64 != manifest.count {
            problems.push(format!(
                "object {name} holds {} events, its manifest says {}",
                events.len(),
                manifest.count
            ));
        }
        // A manifest and object re-forged to hold nothing would otherwise pass: its range
        // checks below walk the events it has.
        if events.is_empty() {
            problems.push(format!("object {name} holds no events"));
        }
        let mut expected = a;
        for e in &events {
            if e.sequence != expected || e.stream != stream {
                problems.push(format!(
                    "object {name}: event {} of stream {} where sequence {expected} was expected",
                    e.sequence, e.stream
                ));
                break;
            }
            expected += 1;
        }
        if expected != b + 1 && expected > a {
            if let Some(last) = events.last() {
                if last.sequence != b {
                    problems.push(format!("object {name} ends at {}, not {b}", last.sequence));
                }
            }
        }
    }
    if let Some(log) = log {
        let state = log.stream_state(stream).await?;
        report.log_last_sequence = Some(state.last_sequence);
        let archived_to = report.last_sequence.unwrap_or(0);
        report.unarchived = state.last_sequence.saturating_sub(archived_to);
        if archived_to > state.last_sequence {
            report.problems.push(format!(
                "the archive runs to {archived_to}, past the log's last sequence {}",
                state.last_sequence
            ));
        }
        if let Some(first) = report.first_sequence {
            if state.messages > 0 && state.first_sequence < first {
                report.problems.push(format!(
                    "gap between {} and {first}: the log has sequences the archive lacks",
                    state.first_sequence.saturating_sub(1)
                ));
            }
        }
    }
    Ok(report)
}

/// How [`restore`] goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Restore even when [`verify`] finds problems (what can be read is restored).
    pub force: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreProgress {
    pub restored: u64,
    pub total: u64,
    pub last_sequence: u64,
}

/// What [`restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub events: u64,
    pub objects: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// Whether restored sequences equal the originals (archive from 1, without gap).
    pub sequences_preserved: bool,
    /// Events whose id had been used by an earlier event (accepted by the original log after
    /// its duplicate window): appended without the id, or the log would drop them.
    pub reused_ids: u64,
    /// Objects a forced restore skipped: altered, or with no manifest to vouch for them.
    pub unvouched: Vec<String>,
    pub verify: VerifyReport,
}

/// Replays a stream's archive into the stream, which must be empty and never written (last
/// sequence 0): in order, with the original subject, headers, payload and id, and the
/// original recorded time (header [`names::ORIGINAL_RECORDED_AT`]). Verifies first and refuses
/// a broken archive unless `force`. When the archive starts at sequence 1 without gaps, every
/// restored event gets its original sequence, and a mismatch stops the restore.
pub async fn restore(
    archive: &dyn Archive,
    stream: &str,
    log: &dyn EventLog,
    options: RestoreOptions,
    mut progress: impl FnMut(&RestoreProgress),
) -> Result<RestoreReport, AuditError> {
    let state = log.stream_state(stream).await?;
    if state.messages > 0 || state.last_sequence > 0 {
        return Err(AuditError::Refused(format!(
            "stream {stream} is not empty (messages {}, last sequence {}): restore only into a freshly created stream (delete it and run `enablement streams init`)",
            state.messages, state.last_sequence
        )));
    }
    let report = verify(archive, stream, None).await?;
    if report.objects == 0 && report.problems.is_empty() {
        return Err(AuditError::Refused(format!(
            "the archive holds nothing for stream {stream} (under {}): check S3_BUCKET and the namespace",
            stream_prefix(stream)
        )));
    }
    if !report.ok() && !options.force {
        return Err(AuditError::Refused(format!(
            "the archive does not verify; fix it or pass --force to restore what can be read:\n{report}"
        )));
    }
    // Sequences come back as they were when the archive starts at 1 without holes, and stay
    // so until a forced restore has to skip an object it cannot read.
    let mut preserving = report.first_sequence == Some(1)
        && !report
            .problems
            .iter()
            .any(|p| p.starts_with("gap") || p.contains("missing"));
    let prefix = stream_prefix(stream);
    let mut ranges: Vec<(u64, u64)> = archive
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|o| match parse_key(&prefix, &o.key) {
            Some((a, b, true)) => Some((a, b)),
            _ => None,
        })
        .collect();
    ranges.sort();
    let mut out = RestoreReport {
        sequences_preserved: preserving,
        verify: report.clone(),
        ..Default::default()
    };
    let mut prog = RestoreProgress {
        total: report.events,
        ..Default::default()
    };
    // Ids by a 128-bit digest: a restore of tens of millions of events kept every id string
    // (about 100 bytes apiece with the set's own). Two ids sharing a digest would only cost the
    // second its original id (it gets one of its own, like a reused id), never the event.
    let mut seen_ids: HashSet<u128> = HashSet::new();
    let mut next_original = 0u64;
    for (a, b) in ranges {
        let Some(body) = archive.get(&object_key(stream, a, b)).await? else {
            if options.force {
                preserving = false;
                continue;
            }
            return Err(AuditError::Corrupt(format!(
                "object {} missing",
                short(a, b)
            )));
        };
        // Only what its manifest vouched for when the verify above read them, checked again
        // now: an object the verify found altered (which --force lets past), or one replaced
        // since (with its manifest or not), must not become the log's history.
        let vouched = report.vouched.get(&(a, b)) == Some(&sha256_hex(&body));
        if !vouched {
            if options.force {
                tracing::warn!(object = %short(a, b), "skipping an object its manifest does not vouch for");
                out.unvouched.push(short(a, b));
                preserving = false;
                continue;
            }
            return Err(AuditError::Corrupt(format!(
                "object {} is not the one its manifest vouched for at the verify (altered since?); the restore stopped",
                short(a, b)
            )));
        }
        let events = match gunzip(&body).and_then(|raw| parse_lines(&raw)) {
            Ok(e) => e,
            Err(e) if options.force => {
                tracing::warn!(object = %short(a, b), error = %e, "skipping an unreadable object");
                preserving = false;
                continue;
            }
            Err(e) => return Err(AuditError::Corrupt(format!("object {}: {e}", short(a, b)))),
        };
        out.objects += 1;
        for chunk in events.chunks(500) {
            let mut appends = Vec::with_capacity(chunk.len());
            for e in chunk {
                if e.sequence <= next_original {
                    continue; // overlapping objects (forced restore): each event once
                }
                next_original = e.sequence;
                let mut id = e.id.clone().unwrap_or_default();
                let reused = !id.is_empty() && !seen_ids.insert(id_digest(&id));
                if reused || id.is_empty() {
                    // An id of its own place in the original log: the log would drop the
                    // event as a duplicate under its original id, and without any id an
                    // ambiguous append could not be retried safely. Its Creto-Event-Id
                    // header stays the original's.
                    out.reused_ids += u64::from(reused);
                    id = format!("restore:{stream}:{}", e.sequence);
                }
                let mut headers = Headers::new();
                for (name, values) in &e.headers {
                    if name == "Nats-Msg-Id" {
                        continue;
                    }
                    // The log keeps a publish's concurrency checks among its headers; sent
                    // again, it checks them again, and once sequences shift (a forced restore
                    // past a hole) the first of them stopped the restore half done.
                    if name.starts_with("Nats-Expected-") {
                        continue;
                    }
                    for v in values {
                        headers.append(name, v);
                    }
                }
                // Always the time the log honoured (`recorded_at`): a header of that name in
                // the archive may be a producer's, set on a live publish, where the log ignored
                // it; kept, the restore marker would make it count.
                let at = e.recorded_at()?;
                headers.insert(
                    names::ORIGINAL_RECORDED_AT,
                    at.to_rfc3339_opts(SecondsFormat::Nanos, true),
                );
                appends.push((
                    e.sequence,
                    AppendEvent {
                        subject: e.subject.clone(),
                        id,
                        expected_subject_sequence: None,
                        headers,
                        payload: e.payload_bytes()?,
                    },
                ));
            }
            let originals: Vec<u64> = appends.iter().map(|(s, _)| *s).collect();
            let results = log
                .append_batch(appends.into_iter().map(|(_, a)| a).collect())
                .await;
            for (original, result) in originals.into_iter().zip(results) {
                let appended = result?;
                if let Appended::Duplicate { sequence } = appended {
                    return Err(AuditError::Corrupt(format!(
                        "event {original} was taken for a duplicate of sequence {sequence} by the log; the restore stopped"
                    )));
                }
                if preserving && appended.sequence() != original {
                    return Err(AuditError::Corrupt(format!(
                        "event {original} was restored at sequence {}: sequences would not match the original; the restore stopped",
                        appended.sequence()
                    )));
                }
                if out.first_sequence == 0 {
                    out.first_sequence = appended.sequence();
                }
                out.last_sequence = appended.sequence();
                out.events += 1;
                prog.restored += 1;
                prog.last_sequence = original;
            }
            progress(&prog);
        }
    }
    out.sequences_preserved = preserving;
    // The marker that lets the log honour the original recorded times up to here, and not on
    // anything a producer appends later (see `Catalog::restore_marker_subject`).
    if out.events > 0 {
        if let Some(marker) = Catalog::of_stream(stream).restore_marker_subject(stream) {
            log.append(AppendEvent {
                subject: marker,
                id: format!("restore-marker:{}", out.last_sequence),
                expected_subject_sequence: None,
                headers: Headers::new(),
                payload: out.last_sequence.to_string().into(),
            })
            .await?;
        }
    }
    Ok(out)
}

/// Replays a stream from the log, for comparisons: the archived form of every event.
pub async fn log_events(
    log: &dyn EventLog,
    stream: &str,
) -> Result<Vec<ArchivedEvent>, AuditError> {
    let events = log.replay(stream, ReplayFrom::Start, None, None).await?;
    Ok(events
        .map_ok(|e| ArchivedEvent::from_stored(&e))
        .try_collect()
        .await?)
}

/// Every event of a stream's archive, in object order (no verification: see [`verify`]).
pub async fn archived_events(
    archive: &dyn Archive,
    stream: &str,
) -> Result<Vec<ArchivedEvent>, AuditError> {
    let prefix = stream_prefix(stream);
    let mut out = Vec::new();
    for o in archive.list(&prefix).await? {
        if let Some((a, b, false)) = parse_key(&prefix, &o.key) {
            let body = archive
                .get(&o.key)
                .await?
                .ok_or_else(|| AuditError::Corrupt(format!("object {} missing", short(a, b))))?;
            out.extend(
                gunzip(&body)
                    .and_then(|raw| parse_lines(&raw))
                    .map_err(|e| AuditError::Corrupt(format!("object {}: {e}", short(a, b))))?,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_sequence() {
        let p = stream_prefix("T1_METERING");
        let k = object_key("T1_METERING", 1, 200);
        assert_eq!(
            k,
            "audit/T1_METERING/00000000000000000001-00000000000000000200.ndjson.gz"
        );
        assert_eq!(parse_key(&p, &k), Some((1, 200, false)));
        assert_eq!(
            parse_key(&p, &manifest_key("T1_METERING", 201, 9_999_999_999)),
            Some((201, 9_999_999_999, true))
        );
        assert!(object_key("S", 9, 9) < object_key("S", 10, 10));
        assert_eq!(parse_key(&p, "audit/T1_METERING/x.json"), None);
    }
}
