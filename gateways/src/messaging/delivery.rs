//! Per-recipient delivery. A recipient's queue is the subjects
//! `messaging.msg.<tenant>.<recipient>.*` of the MESSAGING stream, read in stream order; the
//! cursor of a message is its stream sequence. Acknowledgements are cumulative and are events
//! too (`messaging.ack.<tenant>.<recipient>`), so any replica resumes a recipient exactly
//! after its last acknowledged message, and what was not acknowledged comes again, in order.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use creto_domain::messaging::envelope::{self, time_of};
use creto_schemas::messaging::v1::{Acked, Envelope, Expired, ReceivedMessage};
use creto_streams::headers::{content_types, names};
use creto_streams::{
    AppendEvent, Catalog, EventLog, Headers, LogError, ReplayFrom, StoredEvent, MESSAGING,
};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;

use super::metrics;
use crate::log_status::log_status;

/// How long the tail waits before following the log again after an error.
const TAIL_RETRY: Duration = Duration::from_millis(200);

/// Messages a slow session may fall behind the tail before it catches up from the log.
const SESSION_BUFFER: usize = 1024;

/// Bytes of messages one recipient's feed holds until its sessions take them. Past it the
/// tail hands the sessions a [`Live::Missed`] mark instead, and they read the rest from the
/// log. Counting slots alone, one stalled reader of 256 KiB envelopes held 256 MiB.
const FEED_BYTES: usize = 1 << 20;

/// The same over every recipient of this replica, so many stalled readers together stay
/// within a bound too (past it every session reads from the log: 256 stalled feeds fill it).
const HUB_BYTES: usize = 256 << 20;

/// What a recipient's sessions hear from the tail.
#[derive(Clone)]
enum Live {
    Message(Arc<Passing>),
    /// A message for the recipient went by that did not fit the byte budget: read it from
    /// the log.
    Missed,
}

/// A stored message on its way through a feed. Its bytes count against the feed's and the
/// hub's budgets until every session has taken it (tokio's broadcast drops a value once its
/// last receiver has read it, or when a receiver goes away without reading it).
struct Passing {
    event: StoredEvent,
    bytes: usize,
    held: [Arc<AtomicUsize>; 2],
}

impl Drop for Passing {
    fn drop(&mut self) {
        for held in &self.held {
            held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Receive streams one recipient may have open on a replica at once. A recipient needs one; a
/// few more cover a reconnect before the old stream's end is noticed. Without a bound, one
/// caller could open thousands, each catching up from the log (a consumer on JetStream) and
/// each handed every message.
pub const MAX_SESSIONS: usize = 4;

/// A session's share of its recipient's feed.
type Subscription = (broadcast::Receiver<Live>, watch::Receiver<u64>);

/// What the sessions of one recipient hear on this replica: the tail's messages for it, in
/// stream order, and its acknowledged position as acks pass through this replica.
struct Feed {
    messages: broadcast::Sender<Live>,
    floor: watch::Sender<u64>,
    /// Bytes of the messages in `messages` not yet taken by every session.
    held: Arc<AtomicUsize>,
}

/// The connected recipients of this replica.
#[derive(Default)]
pub struct Hub {
    recipients: Mutex<HashMap<(String, String), Feed>>,
    /// Bytes held by all feeds.
    held: Arc<AtomicUsize>,
}

impl Hub {
    /// A new session's subscription, unless the recipient has [`MAX_SESSIONS`] already.
    fn subscribe(&self, tenant: &str, agent: &str) -> Result<Subscription, Status> {
        let mut recipients = self.recipients.lock().expect("hub lock");
        let feed = recipients
            .entry((tenant.to_string(), agent.to_string()))
            .or_insert_with(|| Feed {
                messages: broadcast::channel(SESSION_BUFFER).0,
                floor: watch::channel(0).0,
                held: Arc::default(),
            });
        if feed.messages.receiver_count() >= MAX_SESSIONS {
            return Err(Status::resource_exhausted(format!(
                "agent {agent} already has {MAX_SESSIONS} Receive streams open on this gateway; \
                 a recipient needs one: close the others (a stream whose client went away \
                 closes within seconds)"
            )));
        }
        Ok((feed.messages.subscribe(), feed.floor.subscribe()))
    }

    /// Hands a stored message to the recipient's sessions, or a [`Live::Missed`] mark when
    /// it does not fit the byte budgets; forgets recipients with no session left, so the map
    /// holds only connected recipients.
    fn publish(&self, tenant: &str, agent: &str, event: StoredEvent) {
        let mut recipients = self.recipients.lock().expect("hub lock");
        let key = (tenant.to_string(), agent.to_string());
        let Some(feed) = recipients.get(&key) else {
            return;
        };
        if feed.messages.receiver_count() == 0 {
            recipients.remove(&key);
            return;
        }
        // The payload is nearly all of it; the rest is a rough allowance for the subject,
        // headers and bookkeeping.
        let bytes = event.payload.len() + event.subject.len() + 256;
        let fits = feed.held.load(Ordering::Relaxed) + bytes <= FEED_BYTES
            && self.held.load(Ordering::Relaxed) + bytes <= HUB_BYTES;
        let live = if fits {
            for held in [&feed.held, &self.held] {
                held.fetch_add(bytes, Ordering::Relaxed);
            }
            Live::Message(Arc::new(Passing {
                event,
                bytes,
                held: [feed.held.clone(), self.held.clone()],
            }))
        } else {
            Live::Missed
        };
        let _ = feed.messages.send(live);
    }

    /// Called as a session ends (its subscription dropped). When it was the recipient's last
    /// here, its feed is forgotten (a recipient that does not come back, and gets nothing
    /// more, would otherwise keep it for the life of the process) and so is its queue-depth
    /// series; not before: another session (a reconnect that overlapped this stream's end)
    /// keeps setting it. Under the lock, so a session opening meanwhile keeps its series.
    fn ended(&self, tenant: &str, agent: &str) {
        let mut recipients = self.recipients.lock().expect("hub lock");
        let key = (tenant.to_string(), agent.to_string());
        let last = recipients
            .get(&key)
            .is_none_or(|feed| feed.messages.receiver_count() == 0);
        if last {
            recipients.remove(&key);
            let _ =
                metrics::QUEUE_DEPTH.remove_label_values(&[&metrics::agent_label(tenant, agent)]);
        }
    }

    fn acked(&self, tenant: &str, agent: &str, through: u64) {
        let recipients = self.recipients.lock().expect("hub lock");
        if let Some(feed) = recipients.get(&(tenant.to_string(), agent.to_string())) {
            feed.floor.send_if_modified(|f| {
                let moved = through > *f;
                *f = (*f).max(through);
                moved
            });
        }
    }
}

/// Subjects and log access of one product instance.
#[derive(Clone)]
pub struct Queues {
    pub log: Arc<dyn EventLog>,
    pub catalog: Catalog,
    pub stream: String,
    pub hub: Arc<Hub>,
    /// Ends every Receive stream when the product stops (a graceful shutdown waits for open
    /// streams).
    stopping: watch::Sender<bool>,
}

impl Queues {
    pub fn new(log: Arc<dyn EventLog>, catalog: Catalog) -> Self {
        Queues {
            stream: catalog.stream(MESSAGING),
            log,
            catalog,
            hub: Arc::new(Hub::default()),
            stopping: watch::channel(false).0,
        }
    }

    /// Ends the Receive streams: clients reconnect to another replica and resume after their
    /// acknowledged cursor.
    pub fn stop_sessions(&self) {
        self.stopping.send_replace(true);
    }

    pub fn message_subject(&self, tenant: &str, recipient: &str, sender: &str) -> String {
        self.catalog
            .subject(&format!("messaging.msg.{tenant}.{recipient}.{sender}"))
    }

    fn ack_subject(&self, tenant: &str, recipient: &str) -> String {
        self.catalog
            .subject(&format!("messaging.ack.{tenant}.{recipient}"))
    }

    fn expired_subject(&self, tenant: &str, recipient: &str) -> String {
        self.catalog
            .subject(&format!("messaging.expired.{tenant}.{recipient}"))
    }

    /// The last event on `subject`, decoded (`None` when the subject is empty).
    async fn last_on<M: Message + Default>(
        &self,
        subject: &str,
    ) -> Result<Option<(u64, M)>, LogError> {
        let seq = self
            .log
            .last_subject_sequence(&self.stream, subject)
            .await?;
        if seq == 0 {
            return Ok(None);
        }
        let Some(event) = self.log.get(&self.stream, seq).await? else {
            return Ok(None);
        };
        Ok(M::decode(event.payload.as_ref()).ok().map(|m| (seq, m)))
    }

    /// The recipient's acknowledged position (0: nothing acknowledged).
    pub async fn acked_through(&self, tenant: &str, recipient: &str) -> Result<u64, LogError> {
        Ok(self
            .last_on::<Acked>(&self.ack_subject(tenant, recipient))
            .await?
            .map_or(0, |(_, a)| a.through_cursor))
    }

    /// Refuses a cursor that is not a message to `recipient`.
    async fn check_message_to(
        &self,
        tenant: &str,
        recipient: &str,
        through: u64,
    ) -> Result<(), Status> {
        let ours = self
            .catalog
            .subject(&format!("messaging.msg.{tenant}.{recipient}."));
        let stored = self
            .log
            .get(&self.stream, through)
            .await
            .map_err(log_status)?;
        if stored.is_some_and(|e| e.subject.starts_with(&ours)) {
            return Ok(());
        }
        Err(Status::invalid_argument(format!(
            "cursor {through} is not a message to {recipient}; acknowledge cursors you received"
        )))
    }

    /// Moves the acknowledged position forward to `through` (never back) and returns it.
    pub async fn ack(&self, tenant: &str, recipient: &str, through: u64) -> Result<u64, Status> {
        let subject = self.ack_subject(tenant, recipient);
        let end = self
            .log
            .last_sequence(&self.stream)
            .await
            .map_err(log_status)?;
        if through > end {
            return Err(Status::out_of_range(format!(
                "cursor {through} is beyond the last stored message ({end}); acknowledge cursors you received"
            )));
        }
        let mut checked = false;
        for _ in 0..5 {
            let last = self.last_on::<Acked>(&subject).await.map_err(log_status)?;
            let (expected, floor) = last.map_or((0, 0), |(seq, a)| (seq, a.through_cursor));
            if through <= floor {
                return Ok(floor);
            }
            // Acks are cumulative and cursors are sequences of the whole stream: another
            // cursor (one of a message this agent sent, or to someone else) would skip its
            // undelivered messages below it without a trace.
            if !checked {
                self.check_message_to(tenant, recipient, through).await?;
                checked = true;
            }
            let event = AppendEvent {
                subject: subject.clone(),
                id: format!("ack:{tenant}:{recipient}:{through}"),
                expected_subject_sequence: Some(expected),
                headers: Headers::new()
                    .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                    .with(names::EVENT_TYPE, "messaging.acked")
                    .with(names::TENANT, tenant),
                payload: Acked {
                    agent_id: recipient.to_string(),
                    through_cursor: through,
                }
                .encode_to_vec()
                .into(),
            };
            match self.log.append(event).await {
                Ok(_) => {
                    self.hub.acked(tenant, recipient, through);
                    return Ok(through);
                }
                // Another ack landed first: re-read and go again.
                Err(LogError::Conflict { .. }) => continue,
                Err(e) => return Err(log_status(e)),
            }
        }
        Err(Status::aborted(
            "acknowledgements kept racing; retry the Ack",
        ))
    }

    /// Where [`Queues::tail`] starts: the stream's last sequence now.
    pub async fn tail_start(&self) -> Result<u64, LogError> {
        self.log.last_sequence(&self.stream).await
    }

    /// Hands a stored message to its recipient's sessions on this replica.
    fn to_sessions(&self, event: StoredEvent) {
        let logical = self.catalog.strip(&event.subject);
        // Acks, expiries and keys pass through too: skipped before any allocation.
        if !logical.starts_with("messaging.msg.") {
            return;
        }
        let logical = logical.to_string();
        let mut tokens = logical.split('.').skip(2);
        if let (Some(tenant), Some(recipient)) = (tokens.next(), tokens.next()) {
            self.hub.publish(tenant, recipient, event);
        }
    }

    /// The one reader of the message subjects on this replica: follows what is stored (by any
    /// replica) in stream order and hands each message to its recipient's sessions, so a
    /// thousand connected recipients cost one log reader, not a thousand. One long-lived
    /// follow (one consumer on JetStream) for the life of the replica, not one per look.
    /// It reads the whole stream and skips what is not a message here: a `messaging.msg.>`
    /// filter, matching one subject per sender-recipient pair, made nats-server 2.9 match it
    /// against every pair's subject for each delivery (see `creto_streams::jetstream`).
    ///
    /// It follows from after `after`, the stream's last sequence read before the first
    /// Receive stream could open ([`Queues::tail_start`]): a session replays the log up to
    /// where it stands when it opens, at or past `after`, and the tail hands it everything
    /// later. Read lazily, a message stored between a session's replay and the tail's first
    /// read reached neither, and an Ack of a later one acknowledged it unseen.
    pub async fn tail(self, mut after: u64, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self
                .log
                .follow(
                    &self.stream,
                    ReplayFrom::Sequence(after.saturating_add(1)),
                    None,
                )
                .await
            {
                Ok(mut events) => loop {
                    tokio::select! {
                        next = events.next() => match next {
                            Some(Ok(event)) => {
                                after = event.sequence;
                                self.to_sessions(event);
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, after, "messaging tail interrupted; following again");
                                break;
                            }
                            None => break,
                        },
                        _ = shutdown.changed() => return,
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "messaging tail cannot follow the log; retrying")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TAIL_RETRY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// One Receive stream.
pub struct Session {
    queues: Queues,
    tenant: String,
    recipient: String,
    after_cursor: u64,
    ack_wait: Duration,
    /// Taken by the delivery loop.
    subscription: Option<Subscription>,
}

/// Delivered and not yet acknowledged: cursor → (attempts, first sent this attempt). Handed
/// out in cursor order and emptied at each rewind, so the first entry is the oldest.
type Outstanding = BTreeMap<u64, (u32, Instant)>;

/// Messages a session hands out before their acks: past it, it waits for them (or for the
/// ack wait to send them again). Without a bound, a client that never acks was sent the whole
/// backlog again at every ack wait, and the server tracked every message of it.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// Where one session stands.
struct Delivering {
    /// Last stream sequence handed out (or skipped).
    cursor: u64,
    expired_through: u64,
    outstanding: Outstanding,
    /// Attempts of cursors delivered before, kept across a rewind for `delivery_attempt`.
    attempts: BTreeMap<u64, u32>,
    label: String,
}

impl Delivering {
    fn forget_through(&mut self, floor: u64) {
        self.outstanding.retain(|seq, _| *seq > floor);
        self.attempts.retain(|seq, _| *seq > floor);
    }
}

impl Session {
    /// A Receive stream of `recipient`, subscribed to what this replica's tail hands out
    /// before it reads the log (whatever is stored after its catch-up reaches it live);
    /// refused past [`MAX_SESSIONS`].
    pub fn open(
        queues: Queues,
        tenant: String,
        recipient: String,
        after_cursor: u64,
        ack_wait: Duration,
    ) -> Result<Session, Status> {
        let subscription = queues.hub.subscribe(&tenant, &recipient)?;
        Ok(Session {
            queues,
            tenant,
            recipient,
            after_cursor,
            ack_wait,
            subscription: Some(subscription),
        })
    }

    /// Streams the recipient's messages into `tx` until the caller goes away.
    pub async fn run(mut self, tx: mpsc::Sender<Result<ReceivedMessage, Status>>) {
        let delivered = self.deliver(&tx).await;
        self.queues.hub.ended(&self.tenant, &self.recipient);
        if let Err(status) = delivered {
            let _ = tx.send(Err(status)).await;
        }
    }

    async fn deliver(
        &mut self,
        tx: &mpsc::Sender<Result<ReceivedMessage, Status>>,
    ) -> Result<(), Status> {
        let (mut live, mut acks) = self.subscription.take().expect("a session delivers once");
        let q = &self.queues;
        let mut stopping = q.stopping.subscribe();
        if *stopping.borrow() {
            return Err(Status::unavailable("this gateway is stopping; reconnect"));
        }
        let mut floor = q
            .acked_through(&self.tenant, &self.recipient)
            .await
            .map_err(log_status)?;
        let mut state = Delivering {
            cursor: if self.after_cursor > 0 {
                self.after_cursor
            } else {
                floor
            },
            expired_through: q
                .last_on::<Expired>(&q.expired_subject(&self.tenant, &self.recipient))
                .await
                .map_err(log_status)?
                .map_or(0, |(_, e)| e.cursor),
            outstanding: Outstanding::new(),
            attempts: BTreeMap::new(),
            label: metrics::agent_label(&self.tenant, &self.recipient),
        };
        let filter = q.catalog.subject(&format!(
            "messaging.msg.{}.{}.*",
            self.tenant, self.recipient
        ));
        let depth = metrics::QUEUE_DEPTH.with_label_values(&[&state.label]);
        loop {
            // Catch up from the log: at the start, after a rewind, or after falling behind.
            let mut events = q
                .log
                .replay(
                    &q.stream,
                    ReplayFrom::Sequence(state.cursor.saturating_add(1)),
                    None,
                    Some(&filter),
                )
                .await
                .map_err(log_status)?;
            // Stopped short when the in-flight window is full: the rest is read again from
            // the log once acks make room (the tail's messages are after it).
            let mut behind = false;
            while let Some(event) = events.try_next().await.map_err(log_status)? {
                // Acks keep coming during a replay (a rewind's may be long): what they cover
                // is not sent again.
                floor = floor.max(*acks.borrow());
                if !self.hand_out(&mut state, &event, floor, tx).await? {
                    return Ok(());
                }
                if state.outstanding.len() >= MAX_IN_FLIGHT {
                    behind = true;
                    break;
                }
            }
            drop(events);
            // Then live, from the tail, until a rewind or a fall-behind sends us back.
            loop {
                let room = state.outstanding.len() < MAX_IN_FLIGHT;
                // Back to the log once half the window is free: a replay per freed slot would
                // open a log reader per ack while a backlog drains.
                if behind && state.outstanding.len() <= MAX_IN_FLIGHT / 2 {
                    break;
                }
                depth.set(state.outstanding.len() as i64);
                let deadline = state
                    .outstanding
                    .first_key_value()
                    .map(|(_, (_, sent))| *sent + self.ack_wait);
                tokio::select! {
                    message = live.recv(), if room && !behind => match message {
                        Ok(Live::Message(passing)) => {
                            if passing.event.sequence > state.cursor
                                && !self.hand_out(&mut state, &passing.event, floor, tx).await?
                            {
                                return Ok(());
                            }
                        }
                        // Fell behind the feed or its byte budget: the rest is in the log.
                        Ok(Live::Missed) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    _ = acks.changed() => {
                        floor = floor.max(*acks.borrow_and_update());
                        state.forget_through(floor);
                    }
                    _ = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d.into()).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        // Acks may have gone through another replica: ask the log.
                        floor = floor.max(
                            q.acked_through(&self.tenant, &self.recipient)
                                .await
                                .map_err(log_status)?,
                        );
                        state.forget_through(floor);
                        if state
                            .outstanding
                            .first_key_value()
                            .is_some_and(|(_, (_, sent))| sent.elapsed() >= self.ack_wait)
                        {
                            // Redeliver in order: everything after the acknowledged position.
                            state.cursor = floor.max(self.after_cursor);
                            state.outstanding.clear();
                            break;
                        }
                    }
                    _ = tx.closed() => return Ok(()),
                    _ = stopping.changed() => {
                        return Err(Status::unavailable("this gateway is stopping; reconnect and resume"));
                    }
                }
            }
        }
    }

    /// Sends one stored message (or records its expiry), unless acknowledged (at or below
    /// `floor`); false when the caller went away.
    async fn hand_out(
        &self,
        state: &mut Delivering,
        event: &StoredEvent,
        floor: u64,
        tx: &mpsc::Sender<Result<ReceivedMessage, Status>>,
    ) -> Result<bool, Status> {
        state.cursor = event.sequence;
        if event.sequence <= floor {
            return Ok(true);
        }
        let envelope = Envelope::decode(event.payload.as_ref())
            .map_err(|e| Status::internal(format!("stored envelope undecodable: {e}")))?;
        let header = envelope::stored_header(&envelope)
            .map_err(|e| Status::internal(format!("stored envelope: {e}")))?;
        let age = (Utc::now() - event.recorded_at)
            .to_std()
            .unwrap_or_default()
            .as_secs_f64();
        if time_of(&header.expires_at).is_some_and(|t| t <= Utc::now()) {
            if event.sequence > state.expired_through {
                self.record_expired(event.sequence, &header).await?;
                state.expired_through = event.sequence;
                metrics::DELIVERY_SECONDS
                    .with_label_values(&["expired"])
                    .observe(age);
            }
            return Ok(true);
        }
        let attempt = state.attempts.get(&event.sequence).copied().unwrap_or(0) + 1;
        state.attempts.insert(event.sequence, attempt);
        let message = ReceivedMessage {
            cursor: event.sequence,
            envelope: Some(envelope),
            stored_at: Some(creto_streams::envelope::timestamp(event.recorded_at)),
            delivery_attempt: attempt,
        };
        if tx.send(Ok(message)).await.is_err() {
            return Ok(false);
        }
        if attempt == 1 {
            metrics::RECEIVED.with_label_values(&[&state.label]).inc();
        }
        metrics::DELIVERY_SECONDS
            .with_label_values(&[if attempt == 1 {
                "delivered"
            } else {
                "redelivered"
            }])
            .observe(age);
        state
            .outstanding
            .insert(event.sequence, (attempt, Instant::now()));
        Ok(true)
    }

    async fn record_expired(
        &self,
        cursor: u64,
        header: &creto_schemas::messaging::v1::EnvelopeHeader,
    ) -> Result<(), Status> {
        let q = &self.queues;
        let event = AppendEvent {
            subject: q.expired_subject(&self.tenant, &self.recipient),
            id: format!("expired:{}:{}:{cursor}", self.tenant, self.recipient),
            expected_subject_sequence: None,
            headers: Headers::new()
                .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                .with(names::EVENT_TYPE, "messaging.expired")
                .with(names::TENANT, &self.tenant),
            payload: Expired {
                agent_id: self.recipient.clone(),
                cursor,
                message_id: header.message_id.clone(),
                sender_agent_id: header.sender_agent_id.clone(),
            }
            .encode_to_vec()
            .into(),
        };
        q.log.append(event).await.map_err(log_status)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sequence: u64, bytes: usize) -> StoredEvent {
        StoredEvent {
            stream: "MESSAGING".into(),
            sequence,
            subject: "messaging.msg.acme.bob.alice".into(),
            headers: Headers::new(),
            payload: vec![0u8; bytes].into(),
            recorded_at: Utc::now(),
        }
    }

    #[test]
    fn a_stalled_reader_holds_at_most_the_feed_budget_and_hears_what_it_missed() {
        let hub = Hub::default();
        let (mut stalled, _) = hub.subscribe("acme", "bob").unwrap();
        for seq in 1..=64 {
            hub.publish("acme", "bob", message(seq, 256 * 1024));
        }
        let held = hub.held.load(Ordering::Relaxed);
        assert!(held <= FEED_BYTES, "{held} bytes held");
        assert!(held > FEED_BYTES / 2, "the budget is used: {held}");
        // What fitted comes in order, then the marks that send the session to the log.
        let mut fitted = 0;
        let mut missed = 0;
        while let Ok(live) = stalled.try_recv() {
            match live {
                Live::Message(p) => {
                    assert_eq!(missed, 0, "a message after a missed one");
                    fitted += 1;
                    assert_eq!(p.event.sequence, fitted);
                }
                Live::Missed => missed += 1,
            }
        }
        assert_eq!(fitted + missed, 64);
        assert!(missed > 0);
        // Taken by its only reader: nothing is held any more.
        assert_eq!(hub.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_reader_that_goes_away_releases_what_it_did_not_take() {
        let hub = Hub::default();
        let (stalled, _) = hub.subscribe("acme", "bob").unwrap();
        let (mut reading, _) = hub.subscribe("acme", "bob").unwrap();
        hub.publish("acme", "bob", message(1, 1000));
        assert!(matches!(reading.try_recv(), Ok(Live::Message(_))));
        // Still the stalled reader's to take.
        assert!(hub.held.load(Ordering::Relaxed) >= 1000);
        drop(stalled);
        assert_eq!(hub.held.load(Ordering::Relaxed), 0);
        hub.ended("acme", "bob");
        drop(reading);
        hub.ended("acme", "bob");
        assert!(hub.recipients.lock().unwrap().is_empty());
    }
}
