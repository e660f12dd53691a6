//! The JetStream adapter of the log port.
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    context::{GetStreamErrorKind, PublishErrorKind},
    message::{AckKind, Acker, PublishMessage},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use async_trait::async_trait;
use futures::{stream::BoxStream, FutureExt, StreamExt, TryStreamExt};

use crate::catalog::{Catalog, StreamSpec};
use crate::headers::Headers;
use crate::log::*;

/// How long an append keeps retrying a transient failure (server restart, leader election)
/// before it reports `Unavailable`. Retries reuse the event id, so they never duplicate.
const APPEND_RETRY_BUDGET: Duration = Duration::from_secs(15);

/// How long `fetch` keeps collecting after the first delivery.
const LINGER: Duration = Duration::from_millis(20);

pub mod ids;

/// How the client identifies itself to a NATS server that asks (see `ops/nats/accounts.conf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsCredentials {
    /// Nothing beyond what the URL carries (a user and password, or a token).
    #[default]
    None,
    /// A `.creds` file (JWT and nkey seed), from `nsc generate creds`.
    CredsFile(std::path::PathBuf),
    /// A file holding a user's nkey seed (`SU...`), for the static nkey users of
    /// `accounts.conf`.
    NkeySeedFile(std::path::PathBuf),
}

#[derive(Clone)]
pub struct JetStreamLog {
    context: jetstream::Context,
    catalog: Catalog,
    ids: ids::IdKey,
    /// Publishes awaiting their acks, as the client counts them ([`MAX_ACKS_PENDING`]). The
    /// client's own bound makes a publish wait for a free slot, held until its ack comes back
    /// (or its future is dropped): batches that each sent part of their events before
    /// awaiting any ack could hold every slot and wait for one more, and no append of the
    /// process went on. Here a window of a batch takes all its slots at once, before sending.
    acks_pending: Arc<tokio::sync::Semaphore>,
}

/// Publishes the client lets await their acks at once.
const MAX_ACKS_PENDING: usize = 16_384;

/// Events of a batch sent before their acks are awaited.
const PUBLISH_WINDOW: usize = 1_024;

impl JetStreamLog {
    /// Connects to `url`: one server URL, or several separated by commas (the client learns
    /// the rest of a cluster from any of them). `credentials`, when given, is how the client
    /// proves who it is where the server requires nkeys or JWTs ([`NatsCredentials`]); a user
    /// and password or a token can also be in the URL. The error names the URL (without its
    /// secrets) and what to do about it.
    pub async fn connect(
        url: &str,
        credentials: &NatsCredentials,
        catalog: Catalog,
    ) -> Result<Self, LogError> {
        let fail = |what: String| {
            LogError::Unavailable(format!(
                "cannot reach NATS at {} ({what}); start nats-server with JetStream enabled (-js) or set NATS_URL",
                redact(url)
            ))
        };
        let servers: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let mut options = async_nats::ConnectOptions::new();
        match credentials {
            NatsCredentials::None => {}
            NatsCredentials::CredsFile(path) => {
                options = options.credentials_file(path).await.map_err(|e| {
                    LogError::Unavailable(format!(
                        "cannot read the NATS credentials file {} ({e}): set NATS_CREDS to a .creds file",
                        path.display()
                    ))
                })?;
            }
            NatsCredentials::NkeySeedFile(path) => {
                let seed = std::fs::read_to_string(path).map_err(|e| {
                    LogError::Unavailable(format!(
                        "cannot read the NATS nkey seed file {} ({e}): set NATS_NKEY_SEED_FILE to a file holding the user's seed (SU...)",
                        path.display()
                    ))
                })?;
                options = options.nkey(seed.trim().to_string());
            }
        }
        let client = options
            .name("creto-enablement")
            .connection_timeout(Duration::from_secs(5))
            .connect(servers)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Self::from_client(client, catalog).await
    }

    /// The adapter on a connected client; loads (or, first, creates) the message-id key.
    pub async fn from_client(
        client: async_nats::Client,
        catalog: Catalog,
    ) -> Result<Self, LogError> {
        let context = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .max_ack_inflight(MAX_ACKS_PENDING)
            .backpressure_on_inflight(true)
            .build(client);
        let ids = ids::IdKey::load(&context, catalog.replicas()).await?;
        Ok(JetStreamLog {
            context,
            catalog,
            ids,
            acks_pending: Arc::new(tokio::sync::Semaphore::new(MAX_ACKS_PENDING)),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn stream_config(spec: &StreamSpec) -> stream::Config {
        stream::Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            description: Some(spec.description.clone()),
            max_age: spec.max_age,
            max_bytes: spec.max_bytes,
            max_messages: -1,
            max_message_size: spec.max_message_size,
            duplicate_window: spec.duplicate_window,
            num_replicas: spec.replicas,
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The last sequence `audit restore` wrote into this stream (its marker), 0 if none.
    async fn restored_through(&self, stream: &stream::Stream) -> Result<u64, LogError> {
        let Some(marker) = crate::catalog::restore_marker_of(&stream.cached_info().config.subjects)
        else {
            return Ok(0);
        };
        match stream.get_last_raw_message_by_subject(&marker).await {
            Ok(m) => Ok(std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn stream(&self, name: &str) -> Result<stream::Stream, LogError> {
        self.context
            .get_stream(name)
            .await
            .map_err(|e| match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    LogError::UnknownStream(name.to_string())
                }
                _ => unavailable(e),
            })
    }

    /// The sequence `event`, a conditional append, was stored at: the first message on its
    /// subject after the one it expected, when that message carries its id (later ones may
    /// have followed it since).
    async fn stored_after_expected(&self, event: &AppendEvent) -> Option<u64> {
        let expected = event.expected_subject_sequence?;
        if event.id.is_empty() {
            return None;
        }
        let name = self.catalog.stream_for_subject(&event.subject)?;
        let stream = self.stream(&name).await.ok()?;
        let next = stream
            .get_first_raw_message_by_subject(&event.subject, expected + 1)
            .await
            .ok()?;
        let id = next.headers.get(crate::headers::names::EVENT_ID)?;
        (id.as_str() == event.id).then_some(next.sequence)
    }

    /// Whether the stream of `subject` is one of the catalog's, and JetStream does not say it
    /// is missing (it does not answer at all).
    async fn stream_is_unreachable(&self, subject: &str) -> bool {
        match self.catalog.stream_for_subject(subject) {
            Some(name) => matches!(self.stream(&name).await, Err(LogError::Unavailable(_))),
            None => false,
        }
    }

    /// Creates missing streams; brings the others to their spec when `update`, else reports
    /// their drift.
    async fn ensure(
        &self,
        specs: &[StreamSpec],
        update: bool,
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError> {
        let mut out = Vec::new();
        for spec in specs {
            let want = Self::stream_config(spec);
            let outcome = match self.stream(&spec.name).await {
                Err(LogError::UnknownStream(_)) => {
                    self.context
                        .create_stream(want)
                        .await
                        .map_err(unavailable)?;
                    EnsureOutcome::Created
                }
                Err(e) => return Err(e),
                Ok(live) => {
                    let (updatable, fixed) = drift(&live.cached_info().config, &want);
                    if !fixed.is_empty() || (!update && !updatable.is_empty()) {
                        EnsureOutcome::Drifted(fixed.into_iter().chain(updatable).collect())
                    } else if updatable.is_empty() {
                        EnsureOutcome::Unchanged
                    } else {
                        self.context
                            .update_stream(want)
                            .await
                            .map_err(unavailable)?;
                        EnsureOutcome::Updated(updatable)
                    }
                }
            };
            out.push((spec.name.clone(), outcome));
        }
        Ok(out)
    }

    async fn publish_once(&self, event: &AppendEvent) -> Result<Appended, (LogError, bool)> {
        let _slot = self
            .acks_pending
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let ack = match self
            .context
            .send_publish(event.subject.clone(), publish_message(&self.ids, event))
            .await
        {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        };
        ack.map(appended).map_err(|e| publish_error(e, event))
    }

    /// Appends one event, retrying ambiguous failures with the same id. `retried`: an
    /// earlier attempt failed ambiguously (it may have been stored).
    async fn append_retrying(
        &self,
        event: &AppendEvent,
        mut retried: bool,
    ) -> Result<Appended, LogError> {
        let deadline = tokio::time::Instant::now() + APPEND_RETRY_BUDGET;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.publish_once(event).await {
                // After an ambiguous failure a duplicate is almost surely our own first attempt.
                Ok(Appended::Duplicate { sequence }) if retried => {
                    return Ok(Appended::New { sequence })
                }
                Ok(done) => return Ok(done),
                // The client reports "no responders" as a missing stream: also what a server
                // answers while JetStream recovers its streams after a restart, or during a
                // cluster's leader election. Missing for good only when the server says so.
                // Nothing was stored then: `retried` stays as it was.
                Err((LogError::NoStream(s), _))
                    if self.stream_is_unreachable(&event.subject).await =>
                {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(LogError::Unavailable(format!(
                            "the stream of {s} does not answer (JetStream unreachable or recovering its streams)"
                        )));
                    }
                    tracing::warn!(subject = %s, "the stream does not answer; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                // A clustered stream checks the expected last sequence before the duplicate
                // id: the retry of an attempt that was stored meets itself as the conflict.
                Err((LogError::Conflict { subject, expected }, _)) if retried => {
                    return match self.stored_after_expected(event).await {
                        Some(sequence) => Ok(Appended::New { sequence }),
                        None => Err(LogError::Conflict { subject, expected }),
                    };
                }
                Err((e, true)) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %e, subject = %event.subject, "append failed, retrying with the same id");
                    retried = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

fn appended(ack: jetstream::publish::PublishAck) -> Appended {
    if ack.duplicate {
        Appended::Duplicate {
            sequence: ack.sequence,
        }
    } else {
        Appended::New {
            sequence: ack.sequence,
        }
    }
}

/// Maps a publish error to the port's error and whether retrying with the same id is safe
/// and useful (the server may or may not have stored the message).
fn publish_error(e: jetstream::context::PublishError, event: &AppendEvent) -> (LogError, bool) {
    match publish_error_of_kind(e, event) {
        // Only the id makes a retry safe: without one, the first attempt may have been
        // stored and a retry would store the event twice. The caller is told.
        (LogError::Unavailable(text), true) if event.id.is_empty() => (
            LogError::Unavailable(format!(
                "{text}; it may have been stored (an append without an id is not retried: it could be stored twice)"
            )),
            false,
        ),
        other => other,
    }
}

fn publish_error_of_kind(
    e: jetstream::context::PublishError,
    event: &AppendEvent,
) -> (LogError, bool) {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => (
            LogError::Conflict {
                subject: event.subject.clone(),
                expected: event.expected_subject_sequence.unwrap_or(0),
            },
            false,
        ),
        PublishErrorKind::StreamNotFound => (LogError::NoStream(event.subject.clone()), false),
        PublishErrorKind::MaxPayloadExceeded => (
            LogError::TooLarge {
                size: event.payload.len(),
                limit: 1024 * 1024,
            },
            false,
        ),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            (LogError::Unavailable(e.to_string()), true)
        }
        _ => {
            let text = e.to_string();
            // A message over the stream's max_message_size comes back as a generic error.
            if text.contains("message size exceeds") {
                (
                    LogError::TooLarge {
                        size: event.payload.len(),
                        limit: 1024 * 1024,
                    },
                    false,
                )
            } else {
                (LogError::Other(text), false)
            }
        }
    }
}

/// The URLs (comma-separated) without their credentials (`user:password@` or a token as
/// `token@`), for messages; one that does not parse loses whatever precedes its last '@'.
fn redact(urls: &str) -> String {
    let one = |url: &str| match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => match (url.split_once("://"), url.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
            (None, Some((_, host))) => format!("***@{host}"),
            _ => url.to_string(),
        },
    };
    urls.split(',')
        .map(|u| one(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The JetStream message for an append: the id keyed as `Nats-Msg-Id` (see [`ids`]), optional
/// expected sequence.
fn publish_message(ids: &ids::IdKey, event: &AppendEvent) -> PublishMessage {
    let mut headers = event.headers.0.clone();
    // The event's own id when it carries one (a restore keeps the original's), as the
    // embedded log does.
    if !event.id.is_empty() && headers.get(crate::headers::names::EVENT_ID).is_none() {
        headers.insert(crate::headers::names::EVENT_ID, event.id.as_str());
    }
    let mut publish = PublishMessage::build()
        .payload(event.payload.clone())
        .headers(headers);
    if !event.id.is_empty() {
        publish = publish.message_id(ids.msg_id(&event.id));
    }
    match event.expected_subject_sequence {
        Some(expected) => publish.expected_last_subject_sequence(expected),
        None => publish,
    }
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// The filter to give the server: none when `filter` takes the whole stream. nats-server 2.9
/// counts a consumer's pending messages (for every delivery's ack subject once it has caught
/// up) by matching a wildcard filter against every subject of every block it has not read,
/// holding the store's lock: with thousands of subjects (one per subscription), a
/// `metering.>` filter on the METERING stream cost ~150 µs of server CPU per event and stalled
/// publishers for seconds. Without a filter the count is a subtraction.
fn server_filter(stream: &stream::Stream, filter: Option<&str>) -> String {
    filter_for(&stream.cached_info().config.subjects, filter)
}

fn filter_for(stream_subjects: &[String], filter: Option<&str>) -> String {
    match (filter, stream_subjects) {
        (None, _) => String::new(),
        (Some(f), [only]) if f == only => String::new(),
        (Some(f), _) => f.to_string(),
    }
}

fn deliver_policy(from: ReplayFrom) -> DeliverPolicy {
    match from {
        ReplayFrom::Start | ReplayFrom::Sequence(0) => DeliverPolicy::All,
        ReplayFrom::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
        ReplayFrom::Time(start_time) => DeliverPolicy::ByStartTime { start_time },
    }
}

fn stored(
    stream: &str,
    message: async_nats::Message,
    sequence: u64,
    recorded_at: chrono::DateTime<chrono::Utc>,
    restored_through: u64,
) -> StoredEvent {
    let headers = Headers(message.headers.unwrap_or_default());
    StoredEvent {
        stream: stream.to_string(),
        sequence,
        subject: message.subject.to_string(),
        recorded_at: original_time(&headers, sequence, restored_through).unwrap_or(recorded_at),
        headers,
        payload: message.payload,
    }
}

/// The original recorded time of a restored event: honoured only up to the restore marker.
fn original_time(
    headers: &Headers,
    sequence: u64,
    restored_through: u64,
) -> Option<chrono::DateTime<chrono::Utc>> {
    (sequence <= restored_through)
        .then(|| headers.original_recorded_at())
        .flatten()
}

/// Splits a JetStream message into the stored event and its acker.
fn split(
    stream: &str,
    message: jetstream::Message,
    restored_through: u64,
) -> Result<(StoredEvent, u32, Acker), LogError> {
    let (sequence, delivered, published) = {
        let info = message
            .info()
            .map_err(|e| LogError::Other(format!("bad JetStream reply subject: {e}")))?;
        (
            info.stream_sequence,
            info.delivered.max(1) as u32,
            info.published,
        )
    };
    let (message, acker) = message.split();
    Ok((
        stored(stream, message, sequence, published, restored_through),
        delivered,
        acker,
    ))
}

fn drift(live: &stream::Config, want: &stream::Config) -> (Vec<String>, Vec<String>) {
    let mut updatable = Vec::new();
    let mut fixed = Vec::new();
    macro_rules! cmp {
        ($list:ident, $field:ident) => {
            if live.$field != want.$field {
                $list.push(format!(
                    "{}: {:?} → {:?}",
                    stringify!($field),
                    live.$field,
                    want.$field
                ));
            }
        };
    }
    cmp!(updatable, subjects);
    cmp!(updatable, description);
    cmp!(updatable, max_age);
    cmp!(updatable, max_bytes);
    cmp!(updatable, max_message_size);
    cmp!(updatable, duplicate_window);
    cmp!(updatable, num_replicas);
    cmp!(updatable, discard);
    cmp!(updatable, allow_direct);
    cmp!(fixed, storage);
    cmp!(fixed, retention);
    (updatable, fixed)
}

#[async_trait]
impl EventLog for JetStreamLog {
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
        self.append_retrying(&event, false).await
    }

    async fn append_batch(&self, events: Vec<AppendEvent>) -> Vec<Result<Appended, LogError>> {
        // Pipelined by windows: send a window, then collect its acks in order. A failed ack
        // is retried on its own (same id, so never duplicated) once the window's slots are
        // free again: retrying while holding them could wait for a slot for ever.
        let mut out = Vec::with_capacity(events.len());
        let mut retry = Vec::new();
        for window in events.chunks(PUBLISH_WINDOW) {
            let slots = self
                .acks_pending
                .acquire_many(window.len() as u32)
                .await
                .expect("the semaphore is never closed");
            let mut pending = Vec::with_capacity(window.len());
            for event in window {
                pending.push(
                    self.context
                        .send_publish(event.subject.clone(), publish_message(&self.ids, event))
                        .await,
                );
            }
            for (event, sent) in window.iter().zip(pending) {
                let acked = match sent {
                    Ok(fut) => fut.await,
                    Err(e) => Err(e),
                };
                let index = out.len();
                out.push(
                    acked
                        .map(appended)
                        .map_err(|e| match publish_error(e, event) {
                            // Maybe stored: retried as such.
                            (e, true) => {
                                retry.push((index, true));
                                e
                            }
                            // Perhaps a stream that does not answer yet (see append_retrying).
                            (e @ LogError::NoStream(_), false) => {
                                retry.push((index, false));
                                e
                            }
                            (e, false) => e,
                        }),
                );
            }
            drop(slots);
        }
        // Once one event found its stream still silent after the retry budget, the others of
        // the batch fail at once: one by one, a batch of 1,000 would wait 1,000 budgets.
        let mut silent = None;
        for (i, ambiguous) in retry {
            if let (Some(e), false) = (&silent, ambiguous) {
                out[i] = Err(LogError::clone(e));
                continue;
            }
            out[i] = self.append_retrying(&events[i], ambiguous).await;
            if let (Err(e @ LogError::Unavailable(_)), false) = (&out[i], ambiguous) {
                silent = Some(e.clone());
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
        let mut stream = self.stream(stream_name).await?;
        let last = stream
            .info()
            .await
            .map_err(unavailable)?
            .state
            .last_sequence;
        let end = to.map_or(last, |t| t.min(last));
        if let ReplayFrom::Sequence(s) = from {
            if s > end {
                return Ok(futures::stream::empty().boxed());
            }
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: deliver_policy(from),
                filter_subject: server_filter(&stream, filter_subject),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        // Deleted as soon as the replay is over: thousands of idle consumers slow the server.
        let cleanup = {
            let stream = stream.clone();
            let name = consumer.cached_info().name.clone();
            move || {
                tokio::spawn(async move {
                    let _ = stream.delete_consumer(&name).await;
                });
            }
        };
        // The ordered consumer never ends by itself: stop after what was pending at creation,
        // or at the end sequence, whichever comes first.
        let initially_pending = consumer.cached_info().num_pending;
        if initially_pending == 0 || end == 0 {
            cleanup();
            return Ok(futures::stream::empty().boxed());
        }
        let messages = consumer.messages().await.map_err(unavailable)?;
        let name = stream_name.to_string();
        let restored = self.restored_through(&stream).await?;
        // Ends right after the last wanted event, without polling the consumer again (which
        // would wait for events that may never come).
        let events = futures::stream::unfold(
            (messages, 0u64, false),
            move |(mut messages, seen, done)| {
                let name = name.clone();
                let cleanup = cleanup.clone();
                async move {
                    if done {
                        cleanup();
                        return None;
                    }
                    let item = match messages.next().await? {
                        Ok(m) => split(&name, m, restored).map(|(e, _, _)| e),
                        Err(e) => Err(unavailable(e)),
                    };
                    let seen = seen + 1;
                    let done = match &item {
                        Ok(e) if e.sequence > end => {
                            cleanup();
                            return None;
                        }
                        Ok(e) => e.sequence >= end || seen >= initially_pending,
                        Err(_) => true,
                    };
                    Some((item, (messages, seen, done)))
                }
            },
        );
        Ok(events.boxed())
    }

    async fn follow(
        &self,
        stream_name: &str,
        from: ReplayFrom,
        filter_subject: Option<&str>,
    ) -> Result<BoxStream<'static, Result<StoredEvent, LogError>>, LogError> {
        let stream = self.stream(stream_name).await?;
        let restored = self.restored_through(&stream).await?;
        // One ordered consumer for the life of the stream: it recreates itself after a gap or
        // a server restart, and the server drops it once nobody pulls (inactive threshold).
        let messages = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: deliver_policy(from),
                filter_subject: server_filter(&stream, filter_subject),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?
            .messages()
            .await
            .map_err(unavailable)?;
        let name = stream_name.to_string();
        Ok(messages
            .map(move |m| match m {
                Ok(m) => split(&name, m, restored).map(|(e, _, _)| e),
                Err(e) => Err(unavailable(e)),
            })
            .boxed())
    }

    async fn get(&self, stream_name: &str, sequence: u64) -> Result<Option<StoredEvent>, LogError> {
        let stream = self.stream(stream_name).await?;
        let restored = self.restored_through(&stream).await?;
        match stream.get_raw_message(sequence).await {
            Ok(m) => {
                let headers = Headers(m.headers);
                Ok(Some(StoredEvent {
                    stream: stream_name.to_string(),
                    sequence: m.sequence,
                    subject: m.subject.to_string(),
                    recorded_at: original_time(&headers, m.sequence, restored).unwrap_or(m.time),
                    headers,
                    payload: m.payload,
                }))
            }
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn last_subject_sequence(
        &self,
        stream_name: &str,
        subject: &str,
    ) -> Result<u64, LogError> {
        let stream = self.stream(stream_name).await?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn last_sequence(&self, stream_name: &str) -> Result<u64, LogError> {
        let mut stream = self.stream(stream_name).await?;
        Ok(stream
            .info()
            .await
            .map_err(unavailable)?
            .state
            .last_sequence)
    }

    async fn stream_state(&self, stream_name: &str) -> Result<StreamState, LogError> {
        let mut stream = self.stream(stream_name).await?;
        let state = stream.info().await.map_err(unavailable)?.state.clone();
        let mut consumers: Vec<ConsumerState> = stream
            .consumers()
            .map_ok(|c| ConsumerState {
                name: c.name,
                pending: c.num_pending,
                ack_pending: c.num_ack_pending as u64,
                ack_floor: c.ack_floor.stream_sequence,
                durable: c.config.durable_name.is_some(),
            })
            .try_collect()
            .await
            .map_err(unavailable)?;
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(StreamState {
            name: stream_name.to_string(),
            messages: state.messages,
            bytes: state.bytes,
            first_sequence: state.first_sequence,
            last_sequence: state.last_sequence,
            consumers,
        })
    }

    async fn consumer(
        &self,
        stream_name: &str,
        spec: ConsumerSpec,
    ) -> Result<Box<dyn DurableConsumer>, LogError> {
        let stream = self.stream(stream_name).await?;
        let config = pull::Config {
            durable_name: Some(spec.durable.clone()),
            ack_policy: match spec.ack {
                AckMode::Each => AckPolicy::Explicit,
                AckMode::Cumulative => AckPolicy::All,
            },
            ack_wait: spec.ack_wait,
            // The server never gives up on a message: we dead-letter it ourselves at
            // `spec.max_deliver`, so a crash on the last delivery cannot lose it.
            max_deliver: -1,
            max_ack_pending: 50_000,
            filter_subject: server_filter(&stream, spec.filter_subject.as_deref()),
            deliver_policy: deliver_policy(spec.start),
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer(&spec.durable, config)
            .await
            .map_err(unavailable)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(match spec.ack {
                // Work queues (notifications, timers) handle a few dozen at once, some for
                // a minute and more: a deep prefetch let the tail's ack_wait run out in the
                // client's buffer, and another replica sent those notifications again.
                AckMode::Each => 64,
                AckMode::Cumulative => 5_000,
            })
            // Bounded in bytes too: 5,000 messages near the 1 MiB limit are 5 GiB of buffer.
            .max_bytes_per_batch(64 * 1024 * 1024)
            .messages()
            .await
            .map_err(unavailable)?;
        Ok(Box::new(JetStreamConsumer {
            restored_through: self.restored_through(&stream).await?,
            stream: stream_name.to_string(),
            messages,
            max_deliver: spec.max_deliver.max(1),
            log: Arc::new(self.clone()),
            deadletter_subject: self.catalog.deadletter_subject_of_stream(stream_name),
        }))
    }

    async fn delete_consumer(&self, stream_name: &str, durable: &str) -> Result<(), LogError> {
        let stream = self.stream(stream_name).await?;
        match stream.delete_consumer(durable).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete_stream(&self, stream_name: &str) -> Result<(), LogError> {
        match self.context.delete_stream(stream_name).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

struct JetStreamConsumer {
    stream: String,
    restored_through: u64,
    messages: pull::Stream,
    max_deliver: u32,
    log: Arc<JetStreamLog>,
    deadletter_subject: String,
}

struct JetStreamAck(Acker);

#[async_trait]
impl AckHandle for JetStreamAck {
    async fn ack(&self) -> Result<(), LogError> {
        self.0.ack().await.map_err(unavailable)
    }
    async fn nak(&self, delay: Duration) -> Result<(), LogError> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(unavailable)
    }
    async fn term(&self) -> Result<(), LogError> {
        self.0.ack_with(AckKind::Term).await.map_err(unavailable)
    }
}

impl JetStreamConsumer {
    fn delivery(&self, message: jetstream::Message) -> Result<Delivery, LogError> {
        let (event, delivered, acker) = split(&self.stream, message, self.restored_through)?;
        Ok(Delivery {
            event,
            delivered,
            max_deliver: self.max_deliver,
            handle: Box::new(JetStreamAck(acker)),
            log: self.log.clone(),
            deadletter_subject: self.deadletter_subject.clone(),
        })
    }
}

#[async_trait]
impl DurableConsumer for JetStreamConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, LogError> {
        let mut out = Vec::new();
        match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(out),
            // The client ends a consumer's messages for good (the consumer deleted, its
            // stream recreated): empty batches from here on would hide that for ever.
            Ok(None) => {
                return Err(LogError::Unavailable(
                    "the consumer's messages ended (consumer deleted?); open it again".into(),
                ))
            }
            Ok(Some(m)) => out.push(self.delivery(m.map_err(unavailable)?)?),
        }
        // Then gather what arrives within a short linger, so batches fill under load without
        // delaying a lone event by more than LINGER.
        let until = tokio::time::Instant::now() + LINGER.min(wait);
        while out.len() < max {
            let next = match self.messages.next().now_or_never() {
                Some(m) => m,
                None => match tokio::time::timeout_at(until, self.messages.next()).await {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match next.map(|m| m.map_err(unavailable).and_then(|m| self.delivery(m))) {
                Some(Ok(d)) => out.push(d),
                // What was gathered is handed over (dropped, it would only come back after
                // ack_wait); the error shows again at the next fetch if it lasts.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "a delivery failed; handing over those before it");
                    break;
                }
                None => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::filter_for;

    #[test]
    fn a_filter_taking_the_whole_stream_is_not_sent() {
        let one = ["t1.metering.>".to_string()];
        assert_eq!(filter_for(&one, None), "");
        assert_eq!(filter_for(&one, Some("t1.metering.>")), "");
        assert_eq!(
            filter_for(&one, Some("t1.metering.quotas.>")),
            "t1.metering.quotas.>"
        );
        // With several subjects, one of them is a real filter.
        let two = ["a.>".to_string(), "b.>".to_string()];
        assert_eq!(filter_for(&two, Some("a.>")), "a.>");
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            redact("nats://alice:s3cret@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(redact("nats://t0ken@nats:4222"), "nats://***@nats:4222");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        // Each of a list; and what does not parse loses what precedes its '@'.
        assert_eq!(
            redact("nats://a:pw1@n1:4222, nats://b:pw2@n2:4222"),
            "nats://***@n1:4222,nats://***@n2:4222"
        );
        assert_eq!(redact("nats://a:pw@n1:bad"), "nats://***@n1:bad");
        assert_eq!(redact("a:pw@n1"), "***@n1");
    }
}
