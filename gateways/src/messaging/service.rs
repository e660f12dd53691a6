//! `creto.enablement.messaging.v1.MessagingService`: key registration and lookup, Send with
//! every check the server can make without reading the message, Receive and Ack.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use creto_domain::messaging::directory::{AgentKeys, KeyRecord};
use creto_domain::messaging::envelope::{self, EnvelopeError};
use creto_domain::messaging::{self as domain, keys, suite, MessagingLimits};
use creto_schemas::messaging::v1 as pb;
use creto_schemas::messaging::v1::messaging_service_server::MessagingService;
use creto_schemas::messaging::v1::{key_event, KeyPurpose};
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Appended, Headers, LogError, ReplayFrom};
use ed25519_dalek::VerifyingKey;
use futures::TryStreamExt;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::delivery::{Queues, Session};
use super::directory::DirectoryView;
use super::metrics;
use crate::log_status::log_status;

const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);
const MAX_OVERLAP: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Envelopes in one SendBatch.
pub const MAX_BATCH: usize = 1_000;
/// Bytes of one SendBatch request: a full batch of envelopes of a few KiB.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Decompressed verifying keys kept (cleared whole when full).
const VERIFYING_CACHE: usize = 100_000;

/// The last message stored for a sender-recipient pair: where the next one must go.
#[derive(Clone)]
struct PairState {
    /// Stream sequence of the last message on the pair's subject (0: none).
    stream_sequence: u64,
    sequence: u64,
}

/// Sender-recipient pairs whose last sequence a gateway keeps in memory.
const MAX_PAIRS_CACHED: usize = 100_000;

pub struct MessagingGateway {
    pub queues: Queues,
    pub directory: Arc<DirectoryView>,
    pub limits: MessagingLimits,
    pairs: Mutex<HashMap<String, PairState>>,
    /// Decompressed Ed25519 keys by their registered bytes.
    verifying: Mutex<HashMap<Vec<u8>, VerifyingKey>>,
}

/// The caller's tenant, after checking it may act as `agent_id`: callers with the `agent` role
/// act only as the agent their token names (its subject), so one agent cannot register keys
/// for, send as, or drain the queue of another; `admin` and `operator` act for any agent of
/// their tenant.
fn acting_as<T>(request: &Request<T>, agent_id: &str) -> Result<String, Status> {
    let caller = crate::auth::layer::caller(request)?;
    let operator = caller.roles.iter().any(|r| r == "admin" || r == "operator");
    if !operator && caller.subject != agent_id {
        return Err(Status::permission_denied(format!(
            "this token acts for agent {:?}, not {agent_id:?}; use a token issued with --subject {agent_id}",
            caller.subject
        )));
    }
    Ok(caller.tenant.clone())
}

fn tenant<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(crate::auth::layer::caller(request)?.tenant.clone())
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(creto_streams::envelope::timestamp(t))
}

fn invalid(e: String) -> Status {
    Status::invalid_argument(e)
}

/// The API view of a key at `now`.
/// Checks a registration's endorsement. Once the agent has a signing key, a key in its name
/// must be vouched for by its current one (not one rotating out: a key replaced after a leak
/// must not mint more), so a token for the agent's name, an operator's too, is not enough.
/// `Ok(true)`: endorsed and checked; `Ok(false)`: the agent has no current signing key, and a
/// signing key registered now starts a new chain.
fn check_endorsement(
    tenant: &str,
    agent: &AgentKeys,
    r: &pb::RegisterKeyRequest,
    purpose: KeyPurpose,
) -> Result<bool, Status> {
    let current = agent.replaced_by_new(KeyPurpose::Signing);
    if current.is_empty() && r.endorsed_by.is_empty() {
        return Ok(false);
    }
    let endorser = current
        .iter()
        .find(|id| **id == r.endorsed_by)
        .and_then(|id| agent.get(id));
    let Some(endorser) = endorser else {
        return Err(Status::failed_precondition(if current.is_empty() {
            format!(
                "endorsed_by {:?} is not the current signing key of agent {:?}, which has none: register its next signing key without an endorsement (it starts a new chain)",
                r.endorsed_by, r.agent_id
            )
        } else {
            format!(
                "agent {:?} has signing key {}: a new key must be endorsed by it (endorsed_by and endorsement, from SigningKeyPair::endorse); an agent that lost its signing keys revokes them with RevokeKey first, and clients that trusted them refuse its new chain until told",
                r.agent_id,
                current.join(", ")
            )
        }));
    };
    keys::verify_endorsement(
        &endorser.public_key,
        tenant,
        &r.agent_id,
        &r.key_id,
        purpose,
        &r.public_key,
        &r.endorsement,
    )
    .map_err(|_| {
        invalid(format!(
            "endorsement must be signing key {:?}'s signature over this registration (SigningKeyPair::endorse)",
            endorser.key_id
        ))
    })?;
    Ok(true)
}

fn key_to_proto(k: &KeyRecord, now: DateTime<Utc>) -> pb::AgentKey {
    pb::AgentKey {
        agent_id: k.agent_id.clone(),
        key_id: k.key_id.clone(),
        purpose: k.purpose as i32,
        public_key: k.public_key.clone(),
        status: k.status(now) as i32,
        registered_at: ts(k.registered_at),
        valid_until: k.valid_until.and_then(ts),
        revoked_at: k.revoked.as_ref().and_then(|(t, _)| ts(*t)),
        revoked_reason: k
            .revoked
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or_default(),
        endorsed_by: k.endorsed_by.clone().unwrap_or_default(),
        endorsement: k.endorsement.clone(),
    }
}

/// Why a Send was refused: the status the caller gets and the metrics label.
struct Refusal {
    reason: &'static str,
    status: Status,
}

impl From<EnvelopeError> for Refusal {
    fn from(e: EnvelopeError) -> Self {
        let reason = e.reason();
        let status = match e {
            EnvelopeError::Expired(_) => Status::failed_precondition(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        };
        Refusal { reason, status }
    }
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        Refusal {
            reason: "error",
            status,
        }
    }
}

fn refuse(reason: &'static str, status: Status) -> Refusal {
    Refusal { reason, status }
}

impl MessagingGateway {
    pub fn new(queues: Queues, directory: Arc<DirectoryView>, limits: MessagingLimits) -> Self {
        MessagingGateway {
            queues,
            directory,
            limits,
            pairs: Mutex::new(HashMap::new()),
            verifying: Mutex::new(HashMap::new()),
        }
    }

    fn keys_subject(&self, tenant: &str, agent: &str) -> String {
        self.queues
            .catalog
            .subject(&format!("messaging.keys.{tenant}.{agent}"))
    }

    /// Appends a key event for the agent, expecting `agent`'s last event (so two registrations
    /// racing on one agent cannot both decide on stale keys), then catches the directory up.
    async fn append_key_event(
        &self,
        tenant: &str,
        agent_id: &str,
        expected: u64,
        id: String,
        event: key_event::Event,
        event_type: &str,
    ) -> Result<(), LogError> {
        let append = AppendEvent {
            subject: self.keys_subject(tenant, agent_id),
            id,
            expected_subject_sequence: Some(expected),
            headers: Headers::new()
                .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                .with(names::EVENT_TYPE, event_type)
                .with(names::TENANT, tenant),
            payload: pb::KeyEvent { event: Some(event) }.encode_to_vec().into(),
        };
        let stored = self.queues.log.append(append).await?;
        self.directory.caught_up_to(stored.sequence()).await
    }

    /// Where the pair's next message goes, from memory or from the log.
    async fn pair_state(&self, subject: &str, refresh: bool) -> Result<PairState, Status> {
        if !refresh {
            if let Some(p) = self.pairs.lock().expect("pairs lock").get(subject) {
                return Ok(p.clone());
            }
        }
        let log = &self.queues.log;
        let stream = &self.queues.stream;
        let last = log
            .last_subject_sequence(stream, subject)
            .await
            .map_err(log_status)?;
        let mut state = PairState {
            stream_sequence: last,
            sequence: 0,
        };
        if last > 0 {
            if let Some(event) = log.get(stream, last).await.map_err(log_status)? {
                let stored = pb::Envelope::decode(event.payload.as_ref())
                    .map_err(|e| Status::internal(format!("stored envelope undecodable: {e}")))?;
                state.sequence = envelope::stored_header(&stored)
                    .map_err(|e| Status::internal(format!("stored envelope: {e}")))?
                    .sequence;
            }
        }
        self.remember_pair(subject, state.clone());
        Ok(state)
    }

    /// Caches a pair's state. Bounded: a pair not cached is read back from the log, so the
    /// cache is emptied when full rather than growing with every pair ever seen.
    fn remember_pair(&self, subject: &str, state: PairState) {
        let mut pairs = self.pairs.lock().expect("pairs lock");
        if pairs.len() >= MAX_PAIRS_CACHED && !pairs.contains_key(subject) {
            pairs.clear();
        }
        pairs.insert(subject.to_string(), state);
    }

    /// An envelope whose sequence is not ahead of its pair: the same message again (answered
    /// as a duplicate with its cursor) or a replay (refused). The original can only have been
    /// stored after its `created_at` (less the clock skew allowed, twice: the sender's and the
    /// log's clocks) and before any message of a higher sequence: the search reads that stretch
    /// of the pair, not the pair's whole history (which an old sequence made it read, again
    /// and again, for each envelope of a batch).
    async fn resent_or_replayed(
        &self,
        subject: &str,
        header: &pb::EnvelopeHeader,
        bytes: &[u8],
    ) -> Result<u64, Refusal> {
        let skew = chrono::Duration::from_std(self.limits.max_clock_skew).unwrap_or_default();
        let from = match envelope::time_of(&header.created_at) {
            Some(created) => ReplayFrom::Time(created - skew * 2),
            None => ReplayFrom::Start,
        };
        let message_id = &header.message_id;
        let mut events = self
            .queues
            .log
            .replay(&self.queues.stream, from, None, Some(subject))
            .await
            .map_err(log_status)?;
        while let Some(event) = events.try_next().await.map_err(log_status)? {
            let Ok(stored) = pb::Envelope::decode(event.payload.as_ref()) else {
                continue;
            };
            let Ok(stored_header) = envelope::stored_header(&stored) else {
                continue;
            };
            if stored_header.sequence > header.sequence {
                break;
            }
            if stored_header.message_id == *message_id {
                return if event.payload.as_ref() == bytes {
                    Ok(event.sequence)
                } else {
                    Err(refuse(
                        "invalid",
                        Status::already_exists(format!(
                            "message id {message_id} was already used for another message; use a new id"
                        )),
                    ))
                };
            }
        }
        Err(refuse(
            "replayed",
            Status::failed_precondition(
                "sequence is not ahead of the last message from this sender to this recipient: a replayed or reordered message is refused",
            ),
        ))
    }

    /// Every check, then the append. Returns (cursor, duplicate).
    async fn send_checked(
        &self,
        tenant: &str,
        envelope: pb::Envelope,
        now: DateTime<Utc>,
    ) -> Result<(u64, bool), Refusal> {
        let checked = self.check(tenant, envelope, now).await?;
        self.verify(&checked)?;
        self.store(tenant, &checked).await
    }

    /// Every check that needs neither the signature nor the log: size, header, tenant, ids,
    /// times, and the sender's and recipient's keys in the directory.
    async fn check(
        &self,
        tenant: &str,
        envelope: pb::Envelope,
        now: DateTime<Utc>,
    ) -> Result<Checked, Refusal> {
        if envelope.ciphertext.len() > self.limits.max_ciphertext_bytes {
            return Err(refuse(
                "oversized",
                Status::invalid_argument(format!(
                    "ciphertext of {} bytes exceeds the limit of {} bytes; split the payload",
                    envelope.ciphertext.len(),
                    self.limits.max_ciphertext_bytes
                )),
            ));
        }
        let header = envelope::header(&envelope)?;
        if header.tenant != tenant {
            return Err(refuse(
                "invalid",
                Status::permission_denied(format!(
                    "the envelope is for tenant {:?}; your credentials are for tenant {tenant:?}",
                    header.tenant
                )),
            ));
        }
        envelope::check_for_sending(&envelope, &header, now, &self.limits)?;

        let unknown = |what: &str, agent: &str, key: &str| {
            refuse(
                "unknown_key",
                Status::failed_precondition(format!(
                    "{what} key {key:?} of agent {agent:?} is not registered in tenant {tenant:?}; register it with RegisterKey"
                )),
            )
        };
        let sender = self
            .directory
            .agent_fresh(tenant, &header.sender_agent_id, Some(&header.sender_key_id))
            .await
            .map_err(log_status)?
            .unwrap_or_default();
        let Some(signing) = sender
            .get(&header.sender_key_id)
            .filter(|k| k.purpose == KeyPurpose::Signing)
        else {
            return Err(unknown(
                "signing",
                &header.sender_agent_id,
                &header.sender_key_id,
            ));
        };
        key_usable(signing, now)?;
        let verifying = self.verifying_key(&signing.public_key)?;

        let to = &header.recipient_agent_id;
        let mut recipient = self
            .directory
            .agent_fresh(tenant, to, None)
            .await
            .map_err(log_status)?
            .unwrap_or_default();
        // A key registered a moment ago through another replica: read the log before saying
        // it is not registered.
        if let Some(missing) = header
            .recipient_key_ids
            .iter()
            .find(|k| recipient.get(k).is_none())
        {
            recipient = self
                .directory
                .agent_fresh(tenant, to, Some(missing))
                .await
                .map_err(log_status)?
                .unwrap_or_default();
        }
        for key_id in &header.recipient_key_ids {
            match recipient
                .get(key_id)
                .filter(|k| k.purpose == KeyPurpose::Encryption)
            {
                Some(k) => key_usable(k, now)?,
                None => return Err(unknown("encryption", &header.recipient_agent_id, key_id)),
            }
        }
        let subject = self.queues.message_subject(
            tenant,
            &header.recipient_agent_id,
            &header.sender_agent_id,
        );
        Ok(Checked {
            subject,
            bytes: envelope.encode_to_vec(),
            envelope,
            header,
            verifying,
        })
    }

    /// The decompressed key for registered key bytes (decompressing costs about a quarter of a
    /// verification, and a sender signs many messages with one key).
    fn verifying_key(&self, public_key: &[u8]) -> Result<VerifyingKey, Refusal> {
        if let Some(k) = self
            .verifying
            .lock()
            .expect("verifying keys lock")
            .get(public_key)
        {
            return Ok(*k);
        }
        let key = keys::verifying_key(public_key)?;
        let mut cache = self.verifying.lock().expect("verifying keys lock");
        if cache.len() >= VERIFYING_CACHE {
            cache.clear();
        }
        cache.insert(public_key.to_vec(), key);
        Ok(key)
    }

    /// The sender's signature over the envelope.
    fn verify(&self, checked: &Checked) -> Result<(), Refusal> {
        let started = Instant::now();
        let verified = envelope::verify(&checked.envelope, &checked.verifying);
        metrics::ENCRYPTION_SECONDS
            .with_label_values(&[suite::ALGORITHM_LABEL])
            .observe(started.elapsed().as_secs_f64());
        metrics::SIGNATURE_VERIFICATIONS
            .with_label_values(&[if verified.is_ok() { "valid" } else { "invalid" }])
            .inc();
        verified?;
        Ok(())
    }

    /// Stores a checked, verified envelope after its pair's last message: refused when its
    /// sequence is not ahead (a replay), answered as a duplicate when it is the same message
    /// again. Returns (cursor, duplicate).
    async fn store(&self, tenant: &str, checked: &Checked) -> Result<(u64, bool), Refusal> {
        let Checked {
            subject,
            bytes,
            header,
            ..
        } = checked;
        let mut refresh = false;
        for _ in 0..5 {
            let pair = self.pair_state(subject, refresh).await?;
            if header.sequence <= pair.sequence {
                let cursor = self.resent_or_replayed(subject, header, bytes).await?;
                return Ok((cursor, true));
            }
            let append = AppendEvent {
                subject: subject.clone(),
                id: format!(
                    "msg:{tenant}:{}:{}",
                    header.sender_agent_id, header.message_id
                ),
                expected_subject_sequence: Some(pair.stream_sequence),
                headers: Headers::new()
                    .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                    .with(names::EVENT_TYPE, "messaging.sealed")
                    .with(names::TENANT, tenant),
                payload: bytes.clone().into(),
            };
            match self.queues.log.append(append).await {
                Ok(Appended::New { sequence }) => {
                    self.remember_pair(
                        subject,
                        PairState {
                            stream_sequence: sequence,
                            sequence: header.sequence,
                        },
                    );
                    return Ok((sequence, false));
                }
                Ok(Appended::Duplicate { sequence }) => {
                    // The log saw this id recently: the same message, or another one reusing
                    // its id.
                    let original = self
                        .queues
                        .log
                        .get(&self.queues.stream, sequence)
                        .await
                        .map_err(log_status)?;
                    return match original {
                        Some(o) if o.payload.as_ref() == bytes.as_slice() => Ok((sequence, true)),
                        _ => Err(refuse(
                            "invalid",
                            Status::already_exists(format!(
                                "message id {} was already used for another message; use a new id",
                                header.message_id
                            )),
                        )),
                    };
                }
                // Another replica stored a message for this pair first: re-read and check the
                // sequence again.
                Err(LogError::Conflict { .. }) => refresh = true,
                Err(e) => return Err(log_status(e).into()),
            }
        }
        Err(Status::aborted("concurrent sends to this recipient kept racing; retry").into())
    }

    /// SendBatch: every envelope checked and verified, then stored: the envelopes of one pair
    /// one after the other, in the order given (each append expects the previous one's
    /// position), different pairs at the same time (their appends pipelined on the log).
    async fn send_many(
        &self,
        caller: &crate::auth::Identity,
        envelopes: Vec<pb::Envelope>,
        now: DateTime<Utc>,
    ) -> Vec<(String, Sent)> {
        let tenant = caller.tenant.as_str();
        let mut out: Vec<(String, Option<Sent>)> = Vec::with_capacity(envelopes.len());
        let mut checked: Vec<(usize, Checked)> = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let (label, allowed) = sender_of(caller, &envelope);
            let i = out.len();
            out.push((label, None));
            let result = match allowed {
                Err(refusal) => Err(refusal),
                Ok(()) => match self.check(tenant, envelope, now).await {
                    Ok(c) => match self.verify(&c) {
                        Ok(()) => {
                            checked.push((i, c));
                            continue;
                        }
                        Err(r) => Err(r),
                    },
                    Err(r) => Err(r),
                },
            };
            out[i].1 = Some(result);
        }
        // One chain per subject, in the order given; the chains run together.
        let mut chains: Vec<Vec<(usize, Checked)>> = Vec::new();
        let mut by_subject: HashMap<String, usize> = HashMap::new();
        for (i, c) in checked {
            let n = *by_subject.entry(c.subject.clone()).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[n].push((i, c));
        }
        let stored = futures::future::join_all(chains.into_iter().map(|chain| async move {
            let mut results = Vec::with_capacity(chain.len());
            let mut broken = false;
            for (i, c) in chain {
                if broken {
                    // Storing it would put it before the one that failed: the sender resends
                    // from that one, in order.
                    results.push((
                        i,
                        Err(refuse(
                            "error",
                            Status::aborted(
                                "not stored: an earlier envelope of this sender and recipient in the batch failed; resend from that one",
                            ),
                        )),
                    ));
                    continue;
                }
                let result = self.store(tenant, &c).await;
                broken = result.as_ref().is_err_and(|r| {
                    matches!(
                        r.status.code(),
                        tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::Internal
                    )
                });
                results.push((i, result));
            }
            results
        }))
        .await;
        for (i, result) in stored.into_iter().flatten() {
            out[i].1 = Some(result);
        }
        out.into_iter()
            .map(|(label, r)| (label, r.expect("every envelope answered")))
            .collect()
    }
}

/// What one Send did: (cursor, duplicate), or why it was refused.
type Sent = Result<(u64, bool), Refusal>;

/// What a checked envelope carries to verification and storage.
struct Checked {
    subject: String,
    bytes: Vec<u8>,
    envelope: pb::Envelope,
    header: pb::EnvelopeHeader,
    verifying: VerifyingKey,
}

/// The metrics label of an envelope's sender and whether the caller may send as that agent. A
/// refused envelope is counted under the caller: the sender it claims is free text of the
/// client's choosing, one new series per name otherwise. A header that names no valid sender
/// is invalid (it was refused as sent by "unknown", a permission the caller could not fix).
fn sender_of(
    caller: &crate::auth::Identity,
    envelope: &pb::Envelope,
) -> (String, Result<(), Refusal>) {
    let invalid = |status| {
        (
            metrics::agent_label(&caller.tenant, &caller.subject),
            Err(refuse("invalid", status)),
        )
    };
    let sender = match pb::EnvelopeHeader::decode(envelope.header.as_slice()) {
        Ok(h) => match domain::check_agent_id(&h.sender_agent_id) {
            Ok(()) => h.sender_agent_id,
            Err(e) => return invalid(Status::invalid_argument(format!("header: {e}"))),
        },
        Err(e) => {
            return invalid(Status::invalid_argument(format!(
            "the envelope header does not decode ({e}); seal envelopes with the messaging client"
        )))
        }
    };
    let operator = caller.roles.iter().any(|r| r == "admin" || r == "operator");
    if !operator && caller.subject != sender {
        let refused = Status::permission_denied(format!(
            "this token acts for agent {:?}, not {sender:?}; use a token issued with --subject {sender}",
            caller.subject
        ));
        return (
            metrics::agent_label(&caller.tenant, &caller.subject),
            Err(refuse("forbidden", refused)),
        );
    }
    (metrics::agent_label(&caller.tenant, &sender), Ok(()))
}

/// Counts a Send under the sender it names when it was stored, else under the caller: an
/// operator's refused envelope names any sender it likes, and each new name would be a new
/// series.
fn count_sent(caller_label: String, sender_label: String, outcome: &Result<(u64, bool), Refusal>) {
    let label = if outcome.is_ok() {
        sender_label
    } else {
        caller_label
    };
    metrics::SENT
        .with_label_values(&[&label, outcome_label(outcome)])
        .inc();
}

fn outcome_label(outcome: &Result<(u64, bool), Refusal>) -> &'static str {
    match outcome {
        Ok((_, false)) => "accepted",
        Ok((_, true)) => "duplicate",
        Err(r) => r.reason,
    }
}

fn key_usable(k: &KeyRecord, now: DateTime<Utc>) -> Result<(), Refusal> {
    if k.usable(now) {
        return Ok(());
    }
    let (reason, why) = match &k.revoked {
        Some((at, reason)) => ("revoked_key", format!("was revoked at {at} ({reason})")),
        None => (
            "retired_key",
            format!(
                "retired at {} at the end of its rotation overlap",
                k.valid_until.unwrap_or_default()
            ),
        ),
    };
    Err(refuse(
        reason,
        Status::failed_precondition(format!(
            "key {:?} of agent {:?} {why}; use the agent's current key (LookupKeys)",
            k.key_id, k.agent_id
        )),
    ))
}

fn check_ids(agent_id: &str, key_id: Option<&str>) -> Result<(), Status> {
    domain::check_agent_id(agent_id).map_err(invalid)?;
    if let Some(k) = key_id {
        domain::check_key_id(k).map_err(invalid)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl MessagingService for MessagingGateway {
    async fn register_key(
        &self,
        request: Request<pb::RegisterKeyRequest>,
    ) -> Result<Response<pb::RegisterKeyResponse>, Status> {
        let tenant = acting_as(&request, &request.get_ref().agent_id)?;
        let r = request.into_inner();
        check_ids(&r.agent_id, Some(&r.key_id))?;
        let purpose = match KeyPurpose::try_from(r.purpose) {
            Ok(p @ (KeyPurpose::Signing | KeyPurpose::Encryption)) => p,
            _ => {
                return Err(invalid(
                    "purpose must be KEY_PURPOSE_SIGNING or KEY_PURPOSE_ENCRYPTION".into(),
                ))
            }
        };
        let signing = purpose == KeyPurpose::Signing;
        keys::check_public_key(signing, &r.public_key).map_err(|e| invalid(e.to_string()))?;
        if signing {
            keys::verify_proof(&tenant, &r.agent_id, &r.key_id, &r.public_key, &r.proof)
                .map_err(|_| {
                    invalid(
                        "proof must be the new signing key's signature over its registration (SigningKeyPair::proof)"
                            .into(),
                    )
                })?;
        }
        let overlap = match r.overlap {
            None => DEFAULT_OVERLAP,
            Some(d) => Duration::try_from(d)
                .ok()
                .filter(|d| *d <= MAX_OVERLAP)
                .ok_or_else(|| invalid("overlap must be between 0 and 30 days".into()))?,
        };
        let same_material = |k: &KeyRecord| k.public_key == r.public_key && k.purpose == purpose;
        for _ in 0..5 {
            let agent = self
                .directory
                .agent_fresh(&tenant, &r.agent_id, Some(&r.key_id))
                .await
                .map_err(log_status)?
                .unwrap_or_default();
            let now = Utc::now();
            // A key registered before endorsements existed takes one now, from the agent's
            // current signing key, so clients that pinned the agent trust it: an upgraded
            // client's `register` does this for the newest encryption key it holds. Encryption
            // keys only: a signing key endorsed later (by itself, say) would leave no root.
            let endorse_later = |k: &KeyRecord| {
                same_material(k)
                    && purpose == KeyPurpose::Encryption
                    && k.endorsed_by.is_none()
                    && !r.endorsed_by.is_empty()
            };
            let existing = agent.get(&r.key_id);
            let (event, id, replaces) = match existing {
                Some(k) if endorse_later(k) => {
                    check_endorsement(&tenant, &agent, &r, purpose)?;
                    let event = pb::KeyRegistered {
                        agent_id: r.agent_id.clone(),
                        key_id: r.key_id.clone(),
                        purpose: purpose as i32,
                        public_key: r.public_key.clone(),
                        registered_at: ts(k.registered_at),
                        endorsed_by: r.endorsed_by.clone(),
                        endorsement: r.endorsement.clone(),
                        ..Default::default()
                    };
                    let id = format!("endorse:{tenant}:{}:{}", r.agent_id, r.key_id);
                    (event, id, Vec::new())
                }
                Some(k) if same_material(k) => {
                    return Ok(Response::new(pb::RegisterKeyResponse {
                        key: Some(key_to_proto(k, now)),
                        rotated: vec![],
                        already_registered: true,
                    }));
                }
                Some(_) => {
                    return Err(Status::already_exists(format!(
                        "key id {:?} of agent {:?} is already registered with other material; choose a new key id",
                        r.key_id, r.agent_id
                    )))
                }
                None => {
                    let endorsed = check_endorsement(&tenant, &agent, &r, purpose)?;
                    // Senders wrap each message for every usable encryption key of its
                    // recipient, and Send takes at most max_recipient_keys: one more would
                    // leave the agent unreachable.
                    let usable = agent.usable(purpose, now);
                    if !signing && usable.len() >= self.limits.max_recipient_keys {
                        let ends = usable
                            .iter()
                            .filter_map(|k| k.valid_until)
                            .min()
                            .map_or("never (revoke one)".to_string(), |t| t.to_rfc3339());
                        return Err(Status::failed_precondition(format!(
                            "agent {:?} already has {} usable encryption keys, the most a message is wrapped for; \
                             revoke one with RevokeKey or wait for the oldest overlap to end ({ends})",
                            r.agent_id,
                            usable.len()
                        )));
                    }
                    let replaces = agent.replaced_by_new(purpose);
                    let until = now + chrono::Duration::from_std(overlap).unwrap_or_default();
                    let event = pb::KeyRegistered {
                        agent_id: r.agent_id.clone(),
                        key_id: r.key_id.clone(),
                        purpose: purpose as i32,
                        public_key: r.public_key.clone(),
                        registered_at: ts(now),
                        replaces: replaces.clone(),
                        replaced_valid_until: if replaces.is_empty() { None } else { ts(until) },
                        endorsed_by: if endorsed {
                            r.endorsed_by.clone()
                        } else {
                            String::new()
                        },
                        endorsement: if endorsed {
                            r.endorsement.clone()
                        } else {
                            Vec::new()
                        },
                    };
                    let id = format!("key:{tenant}:{}:{}", r.agent_id, r.key_id);
                    (event, id, replaces)
                }
            };
            let endorsing = existing.is_some();
            let event = key_event::Event::Registered(event);
            match self
                .append_key_event(
                    &tenant,
                    &r.agent_id,
                    agent.last_sequence,
                    id,
                    event,
                    "messaging.key_registered",
                )
                .await
            {
                Ok(()) => {
                    let after = self
                        .directory
                        .agent(&tenant, &r.agent_id)
                        .unwrap_or_default();
                    // A concurrent registration of the same key id stored first (ours was
                    // taken for its duplicate): ours is not registered, unless it is the same.
                    if !endorsing && after.get(&r.key_id).is_some_and(|k| !same_material(k)) {
                        return Err(Status::already_exists(format!(
                            "key id {:?} of agent {:?} was just registered with other material; choose a new key id",
                            r.key_id, r.agent_id
                        )));
                    }
                    let view = |id: &str| after.get(id).map(|k| key_to_proto(k, now));
                    return Ok(Response::new(pb::RegisterKeyResponse {
                        key: view(&r.key_id),
                        rotated: replaces.iter().filter_map(|id| view(id)).collect(),
                        already_registered: endorsing,
                    }));
                }
                Err(LogError::Conflict { .. }) => {
                    self.directory.catch_up().await.map_err(log_status)?
                }
                Err(e) => return Err(log_status(e)),
            }
        }
        Err(Status::aborted(
            "key registrations for this agent kept racing; retry",
        ))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let tenant = acting_as(&request, &request.get_ref().agent_id)?;
        let r = request.into_inner();
        check_ids(&r.agent_id, Some(&r.key_id))?;
        if r.reason.len() > 512 {
            return Err(invalid("reason is at most 512 bytes".into()));
        }
        for _ in 0..5 {
            let agent: AgentKeys = self
                .directory
                .agent_fresh(&tenant, &r.agent_id, Some(&r.key_id))
                .await
                .map_err(log_status)?
                .unwrap_or_default();
            let Some(key) = agent.get(&r.key_id) else {
                return Err(Status::not_found(format!(
                    "agent {:?} has no key {:?} in tenant {tenant:?}",
                    r.agent_id, r.key_id
                )));
            };
            let now = Utc::now();
            if key.revoked.is_some() {
                return Ok(Response::new(pb::RevokeKeyResponse {
                    key: Some(key_to_proto(key, now)),
                }));
            }
            let event = key_event::Event::Revoked(pb::KeyRevoked {
                agent_id: r.agent_id.clone(),
                key_id: r.key_id.clone(),
                reason: r.reason.clone(),
                revoked_at: ts(now),
            });
            let id = format!("revoke:{tenant}:{}:{}", r.agent_id, r.key_id);
            match self
                .append_key_event(
                    &tenant,
                    &r.agent_id,
                    agent.last_sequence,
                    id,
                    event,
                    "messaging.key_revoked",
                )
                .await
            {
                Ok(()) => {
                    let after = self.directory.agent(&tenant, &r.agent_id);
                    return Ok(Response::new(pb::RevokeKeyResponse {
                        key: after
                            .as_ref()
                            .and_then(|a| a.get(&r.key_id))
                            .map(|k| key_to_proto(k, now)),
                    }));
                }
                Err(LogError::Conflict { .. }) => {
                    self.directory.catch_up().await.map_err(log_status)?
                }
                Err(e) => return Err(log_status(e)),
            }
        }
        Err(Status::aborted(
            "key changes for this agent kept racing; retry",
        ))
    }

    async fn lookup_keys(
        &self,
        request: Request<pb::LookupKeysRequest>,
    ) -> Result<Response<pb::LookupKeysResponse>, Status> {
        let tenant = tenant(&request)?;
        let r = request.into_inner();
        check_ids(&r.agent_id, None)?;
        let Some(agent) = self
            .directory
            .agent_fresh(&tenant, &r.agent_id, None)
            .await
            .map_err(log_status)?
        else {
            return Err(Status::not_found(format!(
                "agent {:?} has no keys in tenant {tenant:?}",
                r.agent_id
            )));
        };
        let now = Utc::now();
        let keys = agent
            .keys
            .iter()
            .filter(|k| r.include_inactive || k.usable(now))
            .map(|k| key_to_proto(k, now))
            .collect();
        Ok(Response::new(pb::LookupKeysResponse { keys }))
    }

    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let Some(envelope) = request.get_ref().envelope.as_ref() else {
            return Err(invalid("envelope is required".into()));
        };
        let caller = crate::auth::layer::caller(&request)?;
        let caller_label = metrics::agent_label(&caller.tenant, &caller.subject);
        let (label, allowed) = sender_of(caller, envelope);
        if let Err(refusal) = allowed {
            metrics::SENT
                .with_label_values(&[&label, refusal.reason])
                .inc();
            return Err(refusal.status);
        }
        let tenant = caller.tenant.clone();
        let envelope = request.into_inner().envelope.unwrap_or_default();
        let outcome = self.send_checked(&tenant, envelope, Utc::now()).await;
        count_sent(caller_label, label, &outcome);
        let (cursor, duplicate) = outcome.map_err(|r| r.status)?;
        Ok(Response::new(pb::SendResponse { cursor, duplicate }))
    }

    async fn send_batch(
        &self,
        request: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        let caller_label = metrics::agent_label(&caller.tenant, &caller.subject);
        let envelopes = request.into_inner().envelopes;
        if envelopes.is_empty() {
            return Err(invalid(format!(
                "envelopes is empty: send 1 to {MAX_BATCH} envelopes"
            )));
        }
        if envelopes.len() > MAX_BATCH {
            return Err(invalid(format!(
                "a batch holds at most {MAX_BATCH} envelopes, not {}; split it",
                envelopes.len()
            )));
        }
        let results = self
            .send_many(&caller, envelopes, Utc::now())
            .await
            .into_iter()
            .map(|(label, outcome)| {
                count_sent(caller_label.clone(), label, &outcome);
                match outcome {
                    Ok((cursor, duplicate)) => pb::SendResult {
                        cursor,
                        duplicate,
                        code: 0,
                        message: String::new(),
                    },
                    Err(r) => pb::SendResult {
                        cursor: 0,
                        duplicate: false,
                        code: r.status.code() as i32,
                        message: r.status.message().to_string(),
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::SendBatchResponse { results }))
    }

    type ReceiveStream = ReceiverStream<Result<pb::ReceivedMessage, Status>>;

    async fn receive(
        &self,
        request: Request<pb::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let tenant = acting_as(&request, &request.get_ref().agent_id)?;
        let r = request.into_inner();
        check_ids(&r.agent_id, None)?;
        let ack_wait = match r.ack_wait {
            None => DEFAULT_ACK_WAIT,
            Some(d) => Duration::try_from(d)
                .ok()
                .filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(3600))
                .ok_or_else(|| invalid("ack_wait must be between 100 ms and 1 h".into()))?,
        };
        let session = Session::open(
            self.queues.clone(),
            tenant,
            r.agent_id,
            r.after_cursor,
            ack_wait,
        )?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(session.run(tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let tenant = acting_as(&request, &request.get_ref().agent_id)?;
        let r = request.into_inner();
        check_ids(&r.agent_id, None)?;
        let acked_through = self
            .queues
            .ack(&tenant, &r.agent_id, r.through_cursor)
            .await?;
        Ok(Response::new(pb::AckResponse { acked_through }))
    }
}
