//! The log port: what every adapter (JetStream, embedded) provides, with no backend type in it.
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::catalog::StreamSpec;
use crate::headers::Headers;

/// Idempotency key of an append at an expected position: the subject, the position and a hash
/// of what it writes, so a retry of the same append is recognised while another writer's
/// different event at the same position is a conflict, not a duplicate.
pub fn append_id(subject: &str, expected: u64, payload: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same bytes give the same id in every process.
    let mut h = std::hash::DefaultHasher::new();
    payload.hash(&mut h);
    format!("{subject}:{expected}:{:016x}", h.finish())
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct AppendEvent {
    pub subject: String,
    /// Idempotency key (JetStream `Nats-Msg-Id`).
    pub id: String,
    /// Optimistic concurrency: the append succeeds only if the last event on `subject` has
    /// this stream sequence (0: the subject must be empty).
    pub expected_subject_sequence: Option<u64>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New {
        sequence: u64,
    },
    /// The id was seen within the duplicate window; `sequence` is the original's.
    Duplicate {
        sequence: u64,
    },
}

impl Appended {
    pub fn sequence(&self) -> u64 {
        match self {
            Appended::New { sequence } | Appended::Duplicate { sequence } => *sequence,
        }
    }
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Appended::Duplicate { .. })
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LogError {
    #[error("conflict on subject {subject}: another writer appended first (expected last sequence {expected}); re-read and retry")]
    Conflict { subject: String, expected: u64 },
    #[error("no stream captures subject {0}: run `enablement streams init`")]
    NoStream(String),
    #[error("stream {0} does not exist: run `enablement streams init`")]
    UnknownStream(String),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("log unavailable: {0}")]
    Unavailable(String),
    #[error("log error: {0}")]
    Other(String),
}

/// An event as stored in the log.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub stream: String,
    pub sequence: u64,
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
    /// When the log accepted it (server clock). Validation that depends on "now" uses this,
    /// so a replay decides exactly as the live projection did.
    pub recorded_at: DateTime<Utc>,
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    Start,
    Sequence(u64),
    Time(DateTime<Utc>),
}

/// How a durable consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Every delivery is acked on its own (work queues: notifications, timers).
    Each,
    /// Acking one delivery acks every earlier one (projectors that checkpoint per batch).
    Cumulative,
}

#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Durable name; survives restarts of the consumer and of the server.
    pub durable: String,
    pub filter_subject: Option<String>,
    pub ack: AckMode,
    /// After this many deliveries a nak'ed message goes to the dead letters.
    pub max_deliver: u32,
    /// Redelivery if neither acked nor nak'ed within this time.
    pub ack_wait: Duration,
    /// Where a new consumer starts (ignored when the durable already exists).
    pub start: ReplayFrom,
}

impl ConsumerSpec {
    pub fn new(durable: impl Into<String>) -> Self {
        ConsumerSpec {
            durable: durable.into(),
            filter_subject: None,
            ack: AckMode::Each,
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            start: ReplayFrom::Start,
        }
    }
}

/// State of a durable consumer, for `streams info` and lag metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerState {
    pub name: String,
    /// Messages not yet delivered (the lag).
    pub pending: u64,
    /// Delivered but not yet acked.
    pub ack_pending: u64,
    /// Highest stream sequence acked with nothing unacked below it.
    pub ack_floor: u64,
    /// A named, lasting consumer (not an ordered one of a replay, gone when it ends).
    pub durable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub consumers: Vec<ConsumerState>,
}

/// Result of reconciling one stream with the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnsureOutcome {
    Created,
    Unchanged,
    /// The live config had drifted; each entry says `field: live → catalog`. It was updated.
    Updated(Vec<String>),
    /// Drift left as it is: it cannot be changed in place (e.g. storage type), or the caller
    /// only creates missing streams ([`EventLog::create_missing_streams`]).
    Drifted(Vec<String>),
}

/// Acknowledgement of one delivery, implemented per adapter.
#[async_trait]
pub trait AckHandle: Send + Sync {
    async fn ack(&self) -> Result<(), LogError>;
    async fn nak(&self, delay: Duration) -> Result<(), LogError>;
    /// Stop redelivering (after the message was dead-lettered).
    async fn term(&self) -> Result<(), LogError>;
}

/// A message handed out by a durable consumer.
pub struct Delivery {
    pub event: StoredEvent,
    /// How many times it has been delivered, this time included.
    pub delivered: u32,
    pub(crate) max_deliver: u32,
    pub(crate) handle: Box<dyn AckHandle>,
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) deadletter_subject: String,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event)
            .field("delivered", &self.delivered)
            .finish()
    }
}

/// What `nak` did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NakOutcome {
    /// It will come back after the delay.
    Redeliver,
    /// It had reached max deliveries and is now in the dead letters.
    DeadLettered,
}

impl Delivery {
    pub async fn ack(&self) -> Result<(), LogError> {
        self.handle.ack().await
    }

    /// Processing failed for a reason that may pass (a dependency down): retry after `delay`,
    /// unless this was the last allowed delivery, in which case it is dead-lettered.
    pub async fn nak(&self, delay: Duration, reason: &str) -> Result<NakOutcome, LogError> {
        if self.delivered >= self.max_deliver {
            self.dead_letter("max_deliveries", reason).await?;
            Ok(NakOutcome::DeadLettered)
        } else {
            self.handle.nak(delay).await?;
            Ok(NakOutcome::Redeliver)
        }
    }

    /// The message can never be applied (poison): park it with the reason and move on.
    pub async fn dead_letter(&self, reason: &str, detail: &str) -> Result<(), LogError> {
        let letter = crate::deadletter::letter(
            &self.event,
            &self.deadletter_subject,
            reason,
            detail,
            self.delivered,
        );
        self.log.append(letter).await?;
        self.handle.term().await
    }
}

/// A durable consumer: deliveries survive restarts until acked.
#[async_trait]
pub trait DurableConsumer: Send {
    /// Waits up to `wait` for the first delivery, then returns what is ready, up to `max`.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, LogError>;
}

/// The log port.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Creates or reconciles every stream of the catalog.
    async fn ensure_streams(
        &self,
        specs: &[StreamSpec],
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError>;

    /// Creates the streams that are missing and leaves the others as they are: their drift
    /// from `specs` is reported ([`EnsureOutcome::Drifted`]), not applied. What every process
    /// does at start: the live configuration is `streams init`'s to change, not that of
    /// whichever process started last with its own settings (a replica count left unset).
    async fn create_missing_streams(
        &self,
        specs: &[StreamSpec],
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError>;

    async fn append(&self, event: AppendEvent) -> Result<Appended, LogError>;

    /// Appends in order, pipelined: results are in the order of `events`. An append that
    /// failed ambiguously (it may have been stored) is retried after the others were sent, so
    /// after such a failure its sequence may come after theirs.
    async fn append_batch(&self, events: Vec<AppendEvent>) -> Vec<Result<Appended, LogError>>;

    /// Ordered replay of `stream` from `from` up to and including `to` (default: the last
    /// sequence at the time of the call, so a replay always ends).
    async fn replay(
        &self,
        stream: &str,
        from: ReplayFrom,
        to: Option<u64>,
        filter_subject: Option<&str>,
    ) -> Result<BoxStream<'static, Result<StoredEvent, LogError>>, LogError>;

    /// Every event of `stream` matching `filter_subject`, from `from` on, as it is stored: old
    /// ones first, then each new one as soon as the log holds it, in stream order, each once.
    /// The stream never ends by itself (drop it to stop): one long-lived reader for a tail,
    /// instead of a replay (a new consumer on JetStream) per look. After an error the caller
    /// follows again from after the last event it got.
    async fn follow(
        &self,
        stream: &str,
        from: ReplayFrom,
        filter_subject: Option<&str>,
    ) -> Result<BoxStream<'static, Result<StoredEvent, LogError>>, LogError>;

    /// Reads one event by sequence.
    async fn get(&self, stream: &str, sequence: u64) -> Result<Option<StoredEvent>, LogError>;

    /// Last sequence on a subject (0 if none): the expected sequence for the next append.
    async fn last_subject_sequence(&self, stream: &str, subject: &str) -> Result<u64, LogError>;

    async fn stream_state(&self, stream: &str) -> Result<StreamState, LogError>;

    /// The stream's last sequence alone (no consumer listing): for hot paths.
    async fn last_sequence(&self, stream: &str) -> Result<u64, LogError> {
        Ok(self.stream_state(stream).await?.last_sequence)
    }

    /// Opens (creating if needed) a durable consumer.
    async fn consumer(
        &self,
        stream: &str,
        spec: ConsumerSpec,
    ) -> Result<Box<dyn DurableConsumer>, LogError>;

    async fn delete_consumer(&self, stream: &str, durable: &str) -> Result<(), LogError>;

    /// Deletes a stream and everything in it (tests and DR drills).
    async fn delete_stream(&self, stream: &str) -> Result<(), LogError>;
}
