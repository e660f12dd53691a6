//! Per-recipient delivery. A recipient's queue is the subjects
//! `messaging.msg.<tenant>.<recipient>.*` of the MESSAGING stream, read in stream order; the
//! cursor of a message is its stream sequence. Acknowledgements are cumulative and are events
//! too (`messaging.ack.<tenant>.<recipient>`), so any replica resumes a recipient exactly
//! after its last acknowledged message, and what was not acknowledged comes again, in order.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use creto_domain::messaging::envelope::{self, time_of};
use creto_schemas::messaging::v1::{Acked, Envelope, Expired, ReceivedMessage};
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Catalog, EventLog, Headers, LogError, ReplayFrom, MESSAGING};
use futures::TryStreamExt;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::metrics;
use crate::log_status::log_status;

/// How often a replica looks for messages other replicas stored.
pub const TAIL_INTERVAL: Duration = Duration::from_millis(200);

/// Wakes the Receive sessions of a recipient when something for it was stored or acked.
#[derive(Default)]
pub struct Hub {
    recipients: Mutex<HashMap<(String, String), watch::Sender<u64>>>,
}

impl Hub {
    pub fn subscribe(&self, tenant: &str, agent: &str) -> watch::Receiver<u64> {
        self.recipients
            .lock()
            .expect("hub lock")
            .entry((tenant.to_string(), agent.to_string()))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the recipient's sessions on this replica; forgets recipients with none left, so
    /// the map holds only connected recipients.
    pub fn wake(&self, tenant: &str, agent: &str) {
        let mut recipients = self.recipients.lock().expect("hub lock");
        let key = (tenant.to_string(), agent.to_string());
        if let Some(tx) = recipients.get(&key) {
            if tx.receiver_count() == 0 {
                recipients.remove(&key);
            } else {
                tx.send_modify(|n| *n += 1);
            }
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

    /// Moves the acknowledged position forward to `through` (never back) and returns it.
    pub async fn ack(&self, tenant: &str, recipient: &str, through: u64) -> Result<u64, Status> {
        let subject = self.ack_subject(tenant, recipient);
        let end = self
            .log
            .stream_state(&self.stream)
            .await
            .map_err(log_status)?
            .last_sequence;
        if through > end {
            return Err(Status::out_of_range(format!(
                "cursor {through} is beyond the last stored message ({end}); acknowledge cursors you received"
            )));
        }
        for _ in 0..5 {
            let last = self.last_on::<Acked>(&subject).await.map_err(log_status)?;
            let (expected, floor) = last.map_or((0, 0), |(seq, a)| (seq, a.through_cursor));
            if through <= floor {
                return Ok(floor);
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
                    self.hub.wake(tenant, recipient);
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

    /// Wakes local sessions for messages other replicas stored: one tail of the message
    /// subjects per process, whatever the number of sessions.
    pub async fn tail(self, mut shutdown: watch::Receiver<bool>) {
        let filter = self.catalog.subject("messaging.msg.>");
        let mut after = match self.log.stream_state(&self.stream).await {
            Ok(s) => s.last_sequence,
            Err(_) => 0,
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TAIL_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let events = self
                .log
                .replay(
                    &self.stream,
                    ReplayFrom::Sequence(after + 1),
                    None,
                    Some(&filter),
                )
                .await;
            let Ok(mut events) = events else { continue };
            while let Ok(Some(event)) = events.try_next().await {
                after = event.sequence;
                let logical = self.catalog.strip(&event.subject);
                let mut tokens = logical.split('.').skip(2);
                if let (Some(tenant), Some(recipient)) = (tokens.next(), tokens.next()) {
                    self.hub.wake(tenant, recipient);
                }
            }
        }
    }
}

/// One Receive stream.
pub struct Session {
    pub queues: Queues,
    pub tenant: String,
    pub recipient: String,
    pub after_cursor: u64,
    pub ack_wait: Duration,
}

/// Delivered and not yet acknowledged: cursor → (attempts, first sent this attempt).
type Outstanding = BTreeMap<u64, (u32, Instant)>;

impl Session {
    /// Streams the recipient's messages into `tx` until the caller goes away.
    pub async fn run(self, tx: mpsc::Sender<Result<ReceivedMessage, Status>>) {
        if let Err(status) = self.deliver(&tx).await {
            let _ = tx.send(Err(status)).await;
        }
        let _ = metrics::QUEUE_DEPTH
            .remove_label_values(&[&metrics::agent_label(&self.tenant, &self.recipient)]);
    }

    async fn deliver(
        &self,
        tx: &mpsc::Sender<Result<ReceivedMessage, Status>>,
    ) -> Result<(), Status> {
        let q = &self.queues;
        let mut wake = q.hub.subscribe(&self.tenant, &self.recipient);
        let mut stopping = q.stopping.subscribe();
        if *stopping.borrow() {
            return Err(Status::unavailable("this gateway is stopping; reconnect"));
        }
        let mut floor = q
            .acked_through(&self.tenant, &self.recipient)
            .await
            .map_err(log_status)?;
        let mut cursor = if self.after_cursor > 0 {
            self.after_cursor
        } else {
            floor
        };
        let mut expired_through = q
            .last_on::<Expired>(&q.expired_subject(&self.tenant, &self.recipient))
            .await
            .map_err(log_status)?
            .map_or(0, |(_, e)| e.cursor);
        let filter = q.catalog.subject(&format!(
            "messaging.msg.{}.{}.*",
            self.tenant, self.recipient
        ));
        let label = metrics::agent_label(&self.tenant, &self.recipient);
        let depth = metrics::QUEUE_DEPTH.with_label_values(&[&label]);
        let mut outstanding = Outstanding::new();
        // Attempts of cursors delivered before, kept across a rewind for `delivery_attempt`.
        let mut attempts: BTreeMap<u64, u32> = BTreeMap::new();
        loop {
            wake.mark_unchanged();
            let mut events = q
                .log
                .replay(
                    &q.stream,
                    ReplayFrom::Sequence(cursor + 1),
                    None,
                    Some(&filter),
                )
                .await
                .map_err(log_status)?;
            while let Some(event) = events.try_next().await.map_err(log_status)? {
                cursor = event.sequence;
                let envelope = Envelope::decode(event.payload.as_ref())
                    .map_err(|e| Status::internal(format!("stored envelope undecodable: {e}")))?;
                let header = envelope::header(&envelope)
                    .map_err(|e| Status::internal(format!("stored envelope: {e}")))?;
                let age = (Utc::now() - event.recorded_at)
                    .to_std()
                    .unwrap_or_default()
                    .as_secs_f64();
                if time_of(&header.expires_at).is_some_and(|t| t <= Utc::now()) {
                    if event.sequence > expired_through {
                        self.record_expired(event.sequence, &header).await?;
                        expired_through = event.sequence;
                        metrics::DELIVERY_SECONDS
                            .with_label_values(&["expired"])
                            .observe(age);
                    }
                    continue;
                }
                let attempt = attempts.get(&event.sequence).copied().unwrap_or(0) + 1;
                attempts.insert(event.sequence, attempt);
                let message = ReceivedMessage {
                    cursor: event.sequence,
                    envelope: Some(envelope),
                    stored_at: Some(creto_streams::envelope::timestamp(event.recorded_at)),
                    delivery_attempt: attempt,
                };
                if tx.send(Ok(message)).await.is_err() {
                    return Ok(());
                }
                if attempt == 1 {
                    metrics::RECEIVED.with_label_values(&[&label]).inc();
                    metrics::DELIVERY_SECONDS
                        .with_label_values(&["delivered"])
                        .observe(age);
                } else {
                    metrics::DELIVERY_SECONDS
                        .with_label_values(&["redelivered"])
                        .observe(age);
                }
                outstanding.insert(event.sequence, (attempt, Instant::now()));
            }
            depth.set(outstanding.len() as i64);

            // Wait for news, for the oldest delivery's ack deadline, or for the caller to go.
            let deadline = outstanding
                .values()
                .map(|(_, sent)| *sent + self.ack_wait)
                .min();
            tokio::select! {
                _ = wake.changed() => {}
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = tx.closed() => return Ok(()),
                _ = stopping.changed() => {
                    return Err(Status::unavailable("this gateway is stopping; reconnect and resume"));
                }
            }
            if !outstanding.is_empty() {
                floor = q
                    .acked_through(&self.tenant, &self.recipient)
                    .await
                    .map_err(log_status)?;
                outstanding.retain(|seq, _| *seq > floor);
                attempts.retain(|seq, _| *seq > floor);
                let overdue = outstanding
                    .values()
                    .any(|(_, sent)| sent.elapsed() >= self.ack_wait);
                if overdue {
                    // Redeliver in order: everything after the acknowledged position.
                    cursor = floor.max(self.after_cursor);
                    outstanding.clear();
                }
                depth.set(outstanding.len() as i64);
            }
        }
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
