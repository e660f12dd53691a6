//! Applies the OVERSIGHT stream to PostgreSQL, one transaction per batch with the checkpoint.
//!
//! - `oversight.requests.<tenant>.<request_id>` (`RequestEvent`): the stored aggregate is
//!   loaded (or started empty for `Requested`), the event folded in by the domain's
//!   [`Aggregate::apply`], the row upserted, and one audit row written per event.
//! - `oversight.policies.<tenant>.<policy_id>` (`PolicyDefined`): the policy is upserted
//!   (`removed` when DeletePolicy removed it).
//! - `oversight.notifications.<tenant>.<request_id>` (`NotificationDelivered`): one row.
//!
//! Idempotent: a request event at or below the row's `version` is skipped, audit and
//! notification rows are keyed by the event's sequence (`ON CONFLICT DO NOTHING`), a policy is
//! replaced only by a later definition. Events that cannot be applied (undecodable payload, a
//! subject that does not name a request, an event for a request never created, ...) are
//! parked in the dead letters with their reason, counted, and skipped; the projector goes on.
use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use creto_domain::oversight::request::time_of;
use creto_domain::oversight::Aggregate;
use creto_schemas::oversight::v1::{
    request_event, ApprovalRequest, NotificationDelivered, Policy, PolicyDefined, RequestEvent,
    State,
};
use creto_streams::headers::{content_types, names};
use creto_streams::{deadletter, Catalog, EventLog, StoredEvent, OVERSIGHT};
use prost::Message;
use sqlx::{PgPool, Postgres, Transaction};

use super::{channel_name, decision_name, priority_name, state_name, TABLES};
use crate::runner::{ApplyReport, ProjectionError, Projector};
use crate::whole;

pub const PRODUCT: &str = "oversight";

/// Serializes the live projector's batches and a rebuild.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('creto.projection.oversight'))";

/// What one event of the OVERSIGHT stream is.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Nothing to project: the log's own bookkeeping (the restore marker).
    Marker,
    Request {
        tenant: String,
        request_id: String,
        event: RequestEvent,
    },
    Policy {
        tenant: String,
        defined: PolicyDefined,
    },
    Notification {
        tenant: String,
        request_id: String,
        delivered: NotificationDelivered,
    },
    /// Cannot be applied: parked in the dead letters with `reason`.
    Invalid {
        reason: &'static str,
        detail: String,
    },
}

fn invalid(reason: &'static str, detail: impl Into<String>) -> Decoded {
    Decoded::Invalid {
        reason,
        detail: detail.into(),
    }
}

/// Decodes one event by its subject kind. Checks what needs no read model: the subject, the
/// content type, the protobuf payload, and that the ids in the payload match the subject.
pub fn decode(e: &StoredEvent, catalog: &Catalog) -> Decoded {
    if catalog.restore_marker_subject(&e.stream).as_deref() == Some(e.subject.as_str()) {
        return Decoded::Marker;
    }
    let subject = catalog.strip(&e.subject);
    let tokens: Vec<&str> = subject.split('.').collect();
    let [product, kind, tenant, id] = tokens[..] else {
        return invalid(
            "unknown_subject",
            format!("{subject}: expected oversight.<kind>.<tenant>.<id>"),
        );
    };
    if product != "oversight" || tenant.is_empty() || id.is_empty() {
        return invalid(
            "unknown_subject",
            format!("{subject}: expected oversight.<kind>.<tenant>.<id>"),
        );
    }
    if let Some(ct) = e.headers.get(names::CONTENT_TYPE) {
        if ct != content_types::PROTOBUF {
            return invalid(
                "content_type",
                format!("Content-Type {ct:?}; oversight events are application/protobuf"),
            );
        }
    }
    let (tenant, id) = (tenant.to_string(), id.to_string());
    match kind {
        "requests" => {
            let event = match RequestEvent::decode(e.payload.as_ref()) {
                Ok(event) => event,
                Err(err) => return invalid("invalid_protobuf", format!("RequestEvent: {err}")),
            };
            match &event.event {
                None => return invalid("missing_event", "RequestEvent without an event"),
                Some(request_event::Event::Requested(r)) if r.request_id != id => {
                    return invalid(
                        "subject_mismatch",
                        format!("request_id {:?} on the subject of {id:?}", r.request_id),
                    )
                }
                Some(request_event::Event::Responded(r)) if r.response.is_none() => {
                    return invalid("missing_response", "Responded without a response")
                }
                Some(_) => {}
            }
            Decoded::Request {
                tenant,
                request_id: id,
                event,
            }
        }
        "policies" => {
            let defined = match PolicyDefined::decode(e.payload.as_ref()) {
                Ok(d) => d,
                Err(err) => return invalid("invalid_protobuf", format!("PolicyDefined: {err}")),
            };
            match &defined.policy {
                None => invalid("missing_policy", "PolicyDefined without a policy"),
                Some(p) if p.policy_id != id => invalid(
                    "subject_mismatch",
                    format!("policy_id {:?} on the subject of {id:?}", p.policy_id),
                ),
                Some(_) => Decoded::Policy { tenant, defined },
            }
        }
        "notifications" => {
            let delivered = match NotificationDelivered::decode(e.payload.as_ref()) {
                Ok(d) => d,
                Err(err) => {
                    return invalid("invalid_protobuf", format!("NotificationDelivered: {err}"))
                }
            };
            if !delivered.request_id.is_empty() && delivered.request_id != id {
                return invalid(
                    "subject_mismatch",
                    format!(
                        "request_id {:?} on the subject of {id:?}",
                        delivered.request_id
                    ),
                );
            }
            Decoded::Notification {
                tenant,
                request_id: id,
                delivered,
            }
        }
        _ => invalid(
            "unknown_subject",
            format!("{subject}: no oversight events of kind {kind:?}"),
        ),
    }
}

/// The projector of the OVERSIGHT stream into the `oversight_*` tables.
pub struct OversightProjector {
    pool: PgPool,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    /// The live projector parks invalid events and counts metrics; a rebuild does neither
    /// (they were parked when first applied).
    live: bool,
}

/// A request touched by the batch: its aggregate (`None`: no such request) and whether it
/// must be written back.
struct Slot {
    agg: Option<Aggregate>,
    dirty: bool,
}

/// One audit row.
struct Audit<'a> {
    event_type: &'static str,
    actor: &'a str,
    decision: Option<&'static str>,
    channel: Option<&'static str>,
    level: u32,
    reason: Option<&'a str>,
    /// Who recorded a response, when it says.
    recorded_by: Option<&'a str>,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// `parameters_json` as a JSON value PostgreSQL accepts in `jsonb`: text that is not JSON is
/// kept as a JSON string, and NUL characters (which `jsonb` refuses) become U+FFFD. The exact
/// text stays in `view`.
fn parameters(text: &str) -> serde_json::Value {
    fn clean(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        let s = |s: String| {
            if s.contains('\0') {
                s.replace('\0', "\u{fffd}")
            } else {
                s
            }
        };
        match v {
            Value::String(t) => Value::String(s(t)),
            Value::Array(a) => Value::Array(a.into_iter().map(clean).collect()),
            Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (s(k), clean(v))).collect())
            }
            other => other,
        }
    }
    let text = if text.trim().is_empty() { "{}" } else { text };
    clean(
        serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string())),
    )
}

/// A policy's bytes, the same for the same policy: `channels` is a map (a `HashMap`, encoded
/// in its random iteration order), so it is written after the other fields, one entry at a
/// time in key order. Concatenated encodings merge, so this decodes to the same policy.
pub fn encode_policy(p: &Policy) -> Vec<u8> {
    let mut rest = p.clone();
    let channels = std::mem::take(&mut rest.channels);
    let mut out = rest.encode_to_vec();
    let mut keys: Vec<&i32> = channels.keys().collect();
    keys.sort();
    for k in keys {
        let entry = Policy {
            channels: [(*k, channels[k].clone())].into_iter().collect(),
            ..Default::default()
        };
        entry.encode(&mut out).expect("a Vec grows");
    }
    out
}

impl OversightProjector {
    /// The live projector.
    pub fn new(pool: PgPool, log: Arc<dyn EventLog>, catalog: Catalog) -> Self {
        OversightProjector {
            stream: catalog.stream(OVERSIGHT),
            pool,
            log,
            catalog,
            live: true,
        }
    }

    /// A projector that parks nothing and counts no metrics: for re-applying events that
    /// were already applied once (a rebuild, a replayed range).
    pub fn replaying(mut self) -> Self {
        self.live = false;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Re-applies `events` whatever the checkpoint, parking nothing ([`whole::reapply`]).
    pub async fn reapply(&self, events: &[StoredEvent]) -> Result<ApplyReport, ProjectionError> {
        whole::reapply(&self.pool, self, events).await
    }

    /// Writes `events` to the tables (not the checkpoint). `park`: invalid events go to the
    /// dead letters (their id comes from the stream and sequence, so a retried batch parks
    /// each once).
    async fn project(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[&StoredEvent],
        park: bool,
    ) -> Result<(ApplyReport, Vec<&'static str>), ProjectionError> {
        let mut report = ApplyReport::default();
        let mut invalid = Vec::new();
        let mut requests: HashMap<(String, String), Slot> = HashMap::new();
        for &e in events {
            let outcome = match decode(e, &self.catalog) {
                Decoded::Marker => continue,
                Decoded::Request {
                    tenant,
                    request_id,
                    event,
                } => {
                    self.request_event(tx, &mut requests, e, tenant, request_id, &event)
                        .await?
                }
                Decoded::Policy { tenant, defined } => {
                    Ok(self.policy(tx, e, &tenant, &defined).await?)
                }
                Decoded::Notification {
                    tenant,
                    request_id,
                    delivered,
                } => Ok(self
                    .notification(tx, e, &tenant, &request_id, &delivered)
                    .await?),
                Decoded::Invalid { reason, detail } => Err((reason, detail)),
            };
            match outcome {
                Ok(true) => report.applied += 1,
                Ok(false) => report.duplicates += 1,
                Err((reason, detail)) => {
                    tracing::warn!(
                        product = PRODUCT,
                        sequence = e.sequence,
                        subject = %e.subject,
                        reason,
                        %detail,
                        "oversight event cannot be applied; skipped"
                    );
                    if park {
                        let letter = deadletter::letter(
                            e,
                            &self.catalog.deadletter_subject(OVERSIGHT),
                            reason,
                            &detail,
                            1,
                        );
                        self.log.append(letter).await?;
                    }
                    report.dead_lettered += 1;
                    invalid.push(reason);
                }
            }
        }
        for ((tenant, request_id), slot) in &requests {
            if let (true, Some(agg)) = (slot.dirty, &slot.agg) {
                upsert_request(tx, tenant, request_id, agg).await?;
            }
        }
        Ok((report, invalid))
    }

    /// Folds one request event into its aggregate and writes its audit row. `Ok(Ok(false))`:
    /// already applied; `Ok(Err(_))`: cannot be applied.
    async fn request_event(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        requests: &mut HashMap<(String, String), Slot>,
        e: &StoredEvent,
        tenant: String,
        request_id: String,
        event: &RequestEvent,
    ) -> Result<Result<bool, (&'static str, String)>, ProjectionError> {
        let key = (tenant, request_id);
        if !requests.contains_key(&key) {
            let agg = load(tx, &key.0, &key.1).await?;
            requests.insert(key.clone(), Slot { agg, dirty: false });
        }
        let slot = requests.get_mut(&key).expect("just inserted");
        let (tenant, request_id) = &key;
        let is_requested = matches!(event.event, Some(request_event::Event::Requested(_)));
        let agg = match (&mut slot.agg, is_requested) {
            (Some(agg), _) if e.sequence <= agg.view.version => return Ok(Ok(false)),
            (Some(_), true) => {
                return Ok(Err((
                    "already_requested",
                    format!("request {request_id} of tenant {tenant} exists already"),
                )))
            }
            (Some(agg), false) => agg,
            (None, false) => {
                return Ok(Err((
                    "no_request",
                    format!("request {request_id} of tenant {tenant} was never requested"),
                )))
            }
            (none, true) => none.insert(Aggregate::default()),
        };
        let before = agg.state();
        let transitions = agg.apply(event, e.sequence);
        slot.dirty = true;
        let after = agg.state();
        // The transition this event made: the first one (an escalation makes two, pending →
        // escalated → pending: the audit says escalated), unless the escalation decided the
        // request (its level's names had approved already): then how it ended.
        let approved_by_escalation = matches!(
            event.event.as_ref(),
            Some(request_event::Event::Escalated(x)) if x.outcome == State::Approved as i32
        );
        let (from, to) = if approved_by_escalation {
            (before, after)
        } else {
            transitions.first().copied().unwrap_or((before, after))
        };
        let audit = match event.event.as_ref().expect("checked by decode") {
            request_event::Event::Requested(r) => Audit {
                event_type: "requested",
                actor: &r.agent_id,
                decision: r.auto_approved.then_some("approve"),
                channel: None,
                level: 0,
                reason: None,
                recorded_by: None,
            },
            request_event::Event::Responded(r) => {
                let response = r.response.as_ref().expect("checked by decode");
                Audit {
                    event_type: "responded",
                    actor: &response.approver,
                    decision: decision_name(response.decision),
                    channel: channel_name(response.channel),
                    level: response.level,
                    reason: non_empty(&response.reason),
                    recorded_by: non_empty(&response.recorded_by),
                }
            }
            request_event::Event::TimedOut(t) => Audit {
                event_type: "timed_out",
                actor: "timer",
                decision: decision_name(t.resolution),
                channel: None,
                level: agg.view.level,
                reason: None,
                recorded_by: None,
            },
            request_event::Event::Escalated(x) => Audit {
                event_type: "escalated",
                actor: "timer",
                decision: approved_by_escalation.then_some("approve"),
                channel: None,
                level: x.level,
                reason: None,
                recorded_by: None,
            },
            request_event::Event::Cancelled(c) => Audit {
                event_type: "cancelled",
                actor: &c.by,
                decision: None,
                channel: None,
                level: agg.view.level,
                reason: non_empty(&c.reason),
                recorded_by: None,
            },
        };
        let at = time_of(&event.at).unwrap_or(e.recorded_at);
        let done = sqlx::query(
            "INSERT INTO oversight_audit
                (tenant, request_id, sequence, at, event_type, actor, decision, channel, level,
                 reason, from_state, to_state, recorded_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(request_id)
        .bind(e.sequence as i64)
        .bind(at)
        .bind(audit.event_type)
        .bind(audit.actor)
        .bind(audit.decision)
        .bind(audit.channel)
        .bind(int(audit.level))
        .bind(audit.reason)
        .bind((from != State::Unspecified).then(|| state_name(from)))
        .bind(state_name(to))
        .bind(audit.recorded_by)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 0 {
            tracing::debug!(sequence = e.sequence, "audit row was there already");
        }
        Ok(Ok(true))
    }

    /// Upserts a policy (removed or not) unless a later definition is there. `true`: written.
    async fn policy(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        e: &StoredEvent,
        tenant: &str,
        defined: &PolicyDefined,
    ) -> Result<bool, ProjectionError> {
        let p: &Policy = defined.policy.as_ref().expect("checked by decode");
        let done = sqlx::query(
            "INSERT INTO oversight_policies AS p
                (tenant, policy_id, precedence, action, agents, require_approval, definition,
                 version, updated_at, removed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (tenant, policy_id) DO UPDATE
                SET precedence = EXCLUDED.precedence, action = EXCLUDED.action,
                    agents = EXCLUDED.agents, require_approval = EXCLUDED.require_approval,
                    definition = EXCLUDED.definition, version = EXCLUDED.version,
                    updated_at = EXCLUDED.updated_at, removed = EXCLUDED.removed
                WHERE p.version < EXCLUDED.version",
        )
        .bind(tenant)
        .bind(&p.policy_id)
        .bind(p.precedence)
        .bind(&p.action)
        .bind(&p.agents)
        .bind(p.require_approval)
        .bind(encode_policy(p))
        .bind(e.sequence as i64)
        .bind(time_of(&defined.at).unwrap_or(e.recorded_at))
        .bind(defined.removed)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records a delivery outcome once. `true`: written.
    async fn notification(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        e: &StoredEvent,
        tenant: &str,
        request_id: &str,
        n: &NotificationDelivered,
    ) -> Result<bool, ProjectionError> {
        let done = sqlx::query(
            "INSERT INTO oversight_notifications
                (tenant, request_id, sequence, at, channel, level, ok, attempts, detail,
                 duration_seconds)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(request_id)
        .bind(e.sequence as i64)
        .bind(e.recorded_at)
        .bind(channel_name(n.channel))
        .bind(int(n.level))
        .bind(n.ok)
        .bind(int(n.attempts))
        .bind(&n.detail)
        .bind(if n.duration_seconds.is_finite() {
            n.duration_seconds
        } else {
            0.0
        })
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// The stored aggregate of a request, if any.
async fn load(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    request_id: &str,
) -> Result<Option<Aggregate>, ProjectionError> {
    let row: Option<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT view, policy FROM oversight_requests WHERE tenant = $1 AND request_id = $2",
    )
    .bind(tenant)
    .bind(request_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((view, policy)) = row else {
        return Ok(None);
    };
    let corrupt = |e: prost::DecodeError| ProjectionError::Database(sqlx::Error::Decode(e.into()));
    Ok(Some(Aggregate {
        view: ApprovalRequest::decode(view.as_slice()).map_err(corrupt)?,
        policy: Policy::decode(policy.as_slice()).map_err(corrupt)?,
    }))
}

/// Writes a request's row unless a later version is there.
async fn upsert_request(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    request_id: &str,
    agg: &Aggregate,
) -> Result<(), ProjectionError> {
    let v = &agg.view;
    let (action_name, parameters_json) = v
        .action
        .as_ref()
        .map(|a| (a.name.as_str(), a.parameters_json.as_str()))
        .unwrap_or_default();
    let created_at: DateTime<Utc> = time_of(&v.created_at).unwrap_or(DateTime::UNIX_EPOCH);
    sqlx::query(
        "INSERT INTO oversight_requests AS r
            (tenant, request_id, agent_id, action_name, parameters, context, priority,
             priority_rank, policy_id, state, resolution, level, approvers, quorum, created_at,
             deadline, decided_at, cancelled_by, cancel_reason, version, view, policy)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $19, $20, $21, $22)
         ON CONFLICT (tenant, request_id) DO UPDATE
            SET agent_id = EXCLUDED.agent_id, action_name = EXCLUDED.action_name,
                parameters = EXCLUDED.parameters, context = EXCLUDED.context,
                priority = EXCLUDED.priority, priority_rank = EXCLUDED.priority_rank,
                policy_id = EXCLUDED.policy_id, state = EXCLUDED.state,
                resolution = EXCLUDED.resolution, level = EXCLUDED.level,
                approvers = EXCLUDED.approvers, quorum = EXCLUDED.quorum,
                created_at = EXCLUDED.created_at, deadline = EXCLUDED.deadline,
                decided_at = EXCLUDED.decided_at, cancelled_by = EXCLUDED.cancelled_by,
                cancel_reason = EXCLUDED.cancel_reason, version = EXCLUDED.version,
                view = EXCLUDED.view, policy = EXCLUDED.policy
            WHERE r.version < EXCLUDED.version",
    )
    .bind(tenant)
    .bind(request_id)
    .bind(&v.agent_id)
    .bind(action_name)
    .bind(parameters(parameters_json))
    .bind(&v.context)
    .bind(priority_name(v.priority))
    .bind(i16::try_from(v.priority).unwrap_or(0))
    .bind(&v.policy_id)
    .bind(super::state_name_of(v.state))
    .bind(decision_name(v.resolution))
    .bind(int(v.level))
    .bind(&v.approvers)
    .bind(int(v.quorum))
    .bind(created_at)
    .bind(time_of(&v.deadline))
    .bind(time_of(&v.decided_at))
    .bind(non_empty(&v.cancelled_by))
    .bind(non_empty(&v.cancel_reason))
    .bind(v.version as i64)
    .bind(v.encode_to_vec())
    .bind(encode_policy(&agg.policy))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projector for OversightProjector {
    fn product(&self) -> &'static str {
        PRODUCT
    }

    fn stream(&self) -> &str {
        &self.stream
    }

    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        whole::checkpoint::<Self>(&self.pool).await
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<ApplyReport, ProjectionError> {
        whole::apply(&self.pool, self, events, self.live).await
    }

    async fn set_aside(&self, event: &StoredEvent, detail: &str) -> Result<bool, ProjectionError> {
        whole::set_aside(&self.pool, self, event, detail).await
    }
}

#[async_trait]
impl whole::InTransaction for OversightProjector {
    const PRODUCT: &'static str = PRODUCT;
    const LOCK: &'static str = LOCK;

    fn stream_name(&self) -> &str {
        &self.stream
    }

    fn parking(&self) -> Option<(&dyn EventLog, String)> {
        self.live
            .then(|| (&*self.log, self.catalog.deadletter_subject(OVERSIGHT)))
    }

    async fn project(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[&StoredEvent],
        park: bool,
    ) -> Result<(ApplyReport, Vec<&'static str>), ProjectionError> {
        OversightProjector::project(self, tx, events, park).await
    }
}

/// Rebuilds the oversight read model from the whole stream (`enablement replay oversight
/// --rebuild`) in one transaction, as [`whole::rebuild`] describes. Invalid events are skipped
/// and not parked again. Returns the checkpoint.
pub async fn rebuild(
    pool: &PgPool,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
) -> Result<u64, ProjectionError> {
    let projector = OversightProjector::new(pool.clone(), log.clone(), catalog).replaying();
    let (checkpoint, _) = whole::rebuild(pool, log, TABLES, &projector).await?;
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use creto_schemas::oversight::v1::{ChannelList, Requested};
    use creto_streams::Headers;

    fn stored(catalog: &Catalog, subject: &str, payload: Vec<u8>) -> StoredEvent {
        StoredEvent {
            stream: catalog.stream(OVERSIGHT),
            sequence: 7,
            subject: catalog.subject(subject),
            headers: Headers::new().with(names::CONTENT_TYPE, content_types::PROTOBUF),
            payload: payload.into(),
            recorded_at: Utc::now(),
        }
    }

    #[test]
    fn policy_bytes_do_not_depend_on_map_order() {
        let p = Policy {
            policy_id: "p".into(),
            channels: (0..16)
                .map(|k| {
                    (
                        k,
                        ChannelList {
                            channels: vec![k % 3 + 1],
                        },
                    )
                })
                .collect(),
            ..Default::default()
        };
        let bytes = encode_policy(&p);
        for _ in 0..8 {
            let again = Policy::decode(bytes.as_slice()).unwrap();
            assert_eq!(again, p);
            assert_eq!(encode_policy(&again), bytes);
        }
    }

    #[test]
    fn decodes_by_subject_and_refuses_what_cannot_apply() {
        let catalog = Catalog::namespaced("t1");
        let requested = RequestEvent {
            at: None,
            event: Some(request_event::Event::Requested(Requested {
                request_id: "r1".into(),
                ..Default::default()
            })),
        };
        let ok = stored(
            &catalog,
            "oversight.requests.acme.r1",
            requested.encode_to_vec(),
        );
        assert!(matches!(
            decode(&ok, &catalog),
            Decoded::Request { ref tenant, ref request_id, .. } if tenant == "acme" && request_id == "r1"
        ));
        let reason = |subject: &str, payload: Vec<u8>| match decode(
            &stored(&catalog, subject, payload),
            &catalog,
        ) {
            Decoded::Invalid { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason("oversight.requests.acme.r2", requested.encode_to_vec()),
            "subject_mismatch"
        );
        assert_eq!(
            reason("oversight.requests.acme.r1", b"not protobuf".to_vec()),
            "invalid_protobuf"
        );
        assert_eq!(
            reason("oversight.requests.acme.r1", vec![]),
            "missing_event"
        );
        assert_eq!(
            reason("oversight.policies.acme.p1", vec![]),
            "missing_policy"
        );
        assert_eq!(reason("oversight.requests.acme", vec![]), "unknown_subject");
        assert_eq!(
            reason("oversight.timers.acme.r1", vec![]),
            "unknown_subject"
        );
        let marker = stored(&catalog, "oversight._restored", b"12".to_vec());
        assert_eq!(decode(&marker, &catalog), Decoded::Marker);
    }
}
