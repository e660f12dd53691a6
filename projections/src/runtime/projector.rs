//! Applies the RUNTIME stream to PostgreSQL, one transaction per batch with the checkpoint.
//!
//! - `runtime.sandboxes.<sandbox_id>` (`SandboxEvent`): the stored aggregate is loaded (or
//!   started empty for `Requested`), the event folded in by the domain's [`Aggregate::apply`]
//!   and the row upserted once per batch; an Exec start or finish writes its `sandbox_execs`
//!   row, a checkpoint its `sandbox_checkpoints` row.
//! - `runtime.egress.<sandbox_id>` (`EgressDecided`): one `sandbox_egress` row (one decision,
//!   or a summary of `attempts` of them).
//!
//! Idempotent: a sandbox event at or below the row's `version` is skipped whole (its Exec and
//! checkpoint rows were written with it), egress rows are keyed by the event's sequence and
//! checkpoints by their id (`ON CONFLICT DO NOTHING`). Events that cannot be applied
//! (undecodable payload, a subject that does not name a sandbox, an event for a sandbox never
//! requested, a time out of range, ...) are parked in the dead letters with their reason,
//! counted, and skipped; the projector goes on.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use creto_domain::runtime::sandbox::Aggregate;
use creto_schemas::runtime::v1::{self as pb, sandbox_event::Event, EgressDecided, SandboxEvent};
use creto_streams::headers::{content_types, names};
use creto_streams::{deadletter, Catalog, EventLog, StoredEvent, RUNTIME};
use prost::Message;
use sqlx::{PgPool, Postgres, Transaction};

use super::{state_name_of, TABLES};
use crate::runner::{ApplyReport, ProjectionError, Projector};
use crate::whole;

pub const PRODUCT: &str = "runtime";

/// Serializes the live projector's batches and a rebuild.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('creto.projection.runtime'))";

/// Protobuf's own range of a `Timestamp`, 0001-01-01 to 9999-12-31 (PostgreSQL stores all of
/// it, and an expiry a lifetime later).
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;
/// The longest lifetime an event may carry (the domain counts it in nanoseconds, in an i64).
const MAX_TIMEOUT_SECONDS: i64 = 100 * 366 * 24 * 3600;

/// What one event of the RUNTIME stream is.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Nothing to project: the log's own bookkeeping (the restore marker).
    Marker,
    Sandbox {
        sandbox_id: String,
        event: SandboxEvent,
    },
    Egress {
        sandbox_id: String,
        decided: EgressDecided,
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

fn time_ok(t: &prost_types::Timestamp) -> bool {
    (MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) && (0..1_000_000_000).contains(&t.nanos)
}

/// `Err` with the detail when `t` is missing (and `required`) or out of range.
fn check_time(
    what: &str,
    t: &Option<prost_types::Timestamp>,
    required: bool,
) -> Result<(), String> {
    match t {
        None if required => Err(format!("{what} is missing")),
        Some(t) if !time_ok(t) => Err(format!(
            "{what} {}s {}ns is outside 0001-01-01..9999-12-31",
            t.seconds, t.nanos
        )),
        _ => Ok(()),
    }
}

/// A lifetime: absent (the domain counts zero), or 0 to 100 years.
fn check_timeout(what: &str, d: &Option<prost_types::Duration>) -> Result<(), String> {
    match d {
        Some(d)
            if !(0..=MAX_TIMEOUT_SECONDS).contains(&d.seconds)
                || !(0..1_000_000_000).contains(&d.nanos) =>
        {
            Err(format!(
                "{what} {}s {}ns is negative or longer than 100 years",
                d.seconds, d.nanos
            ))
        }
        _ => Ok(()),
    }
}

/// What a sandbox event must hold to be folded: its time, valid lifetimes and times, and the
/// ids its rows are keyed by.
fn check_sandbox_event(event: &SandboxEvent) -> Result<(), (&'static str, String)> {
    let time = |r: Result<(), String>| r.map_err(|d| ("invalid_time", d));
    let duration = |r: Result<(), String>| r.map_err(|d| ("invalid_duration", d));
    time(check_time("at", &event.at, true))?;
    match &event.event {
        None => return Err(("missing_event", "SandboxEvent without an event".into())),
        Some(Event::Requested(r)) => duration(check_timeout("timeout", &r.timeout))?,
        Some(Event::Claimed(c)) => duration(check_timeout("timeout", &c.timeout))?,
        Some(Event::TimeoutChanged(t)) => time(check_time("expires_at", &t.expires_at, true))?,
        Some(Event::ExecStarted(s)) if s.exec_id.is_empty() => {
            return Err(("missing_exec_id", "ExecStarted without an exec_id".into()))
        }
        Some(Event::ExecFinished(f)) => match &f.result {
            None => return Err(("missing_result", "ExecFinished without a result".into())),
            Some(r) if r.exec_id.is_empty() => {
                return Err(("missing_exec_id", "ExecFinished without an exec_id".into()))
            }
            Some(_) => {}
        },
        Some(Event::Checkpointed(c)) => match &c.checkpoint {
            Some(c) if !c.checkpoint_id.is_empty() => {
                time(check_time("checkpoint.at", &c.at, false))?
            }
            _ => {
                return Err((
                    "missing_checkpoint",
                    "Checkpointed without a checkpoint id".into(),
                ))
            }
        },
        Some(_) => {}
    }
    Ok(())
}

/// Decodes one event by its subject kind. Checks what needs no read model: the subject, the
/// content type, the protobuf payload, its times and ids, and that the sandbox id in the
/// payload matches the subject.
pub fn decode(e: &StoredEvent, catalog: &Catalog) -> Decoded {
    if catalog.restore_marker_subject(&e.stream).as_deref() == Some(e.subject.as_str()) {
        return Decoded::Marker;
    }
    let subject = catalog.strip(&e.subject);
    let tokens: Vec<&str> = subject.split('.').collect();
    let expected = || {
        invalid(
            "unknown_subject",
            format!(
                "{subject}: expected runtime.sandboxes.<sandbox_id> or runtime.egress.<sandbox_id>"
            ),
        )
    };
    let [product, kind, id] = tokens[..] else {
        return expected();
    };
    if product != "runtime" || id.is_empty() || !matches!(kind, "sandboxes" | "egress") {
        return expected();
    }
    if let Some(ct) = e.headers.get(names::CONTENT_TYPE) {
        if ct != content_types::PROTOBUF {
            return invalid(
                "content_type",
                format!("Content-Type {ct:?}; runtime events are application/protobuf"),
            );
        }
    }
    let sandbox_id = id.to_string();
    if kind == "sandboxes" {
        let event = match SandboxEvent::decode(e.payload.as_ref()) {
            Ok(event) => event,
            Err(err) => return invalid("invalid_protobuf", format!("SandboxEvent: {err}")),
        };
        return match check_sandbox_event(&event) {
            Ok(()) => Decoded::Sandbox { sandbox_id, event },
            Err((reason, detail)) => invalid(reason, detail),
        };
    }
    let decided = match EgressDecided::decode(e.payload.as_ref()) {
        Ok(d) => d,
        Err(err) => return invalid("invalid_protobuf", format!("EgressDecided: {err}")),
    };
    if let Err(detail) = check_time("at", &decided.at, true) {
        return invalid("invalid_time", detail);
    }
    if !decided.sandbox_id.is_empty() && decided.sandbox_id != sandbox_id {
        return invalid(
            "subject_mismatch",
            format!(
                "sandbox_id {:?} on the subject of {sandbox_id:?}",
                decided.sandbox_id
            ),
        );
    }
    Decoded::Egress {
        sandbox_id,
        decided,
    }
}

/// A sandbox's bytes, the same for the same sandbox: `metadata` is a map (a `HashMap`,
/// encoded in its random iteration order), so it is written after the other fields, one entry
/// at a time in key order. Concatenated encodings merge, so this decodes to the same sandbox.
pub fn encode_sandbox(s: &pb::Sandbox) -> Vec<u8> {
    let mut rest = s.clone();
    let metadata = std::mem::take(&mut rest.metadata);
    let mut out = rest.encode_to_vec();
    let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
    for (k, v) in sorted {
        let entry = pb::Sandbox {
            metadata: [(k.clone(), v.clone())].into_iter().collect(),
            ..Default::default()
        };
        entry.encode(&mut out).expect("a Vec grows");
    }
    out
}

/// The projector of the RUNTIME stream into the `sandbox*` tables.
pub struct RuntimeProjector {
    pool: PgPool,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    /// The live projector parks invalid events and counts metrics; a rebuild does neither
    /// (they were parked when first applied).
    live: bool,
}

/// A sandbox touched by the batch: its aggregate (`None`: no such sandbox), what the row
/// holds beside it, and whether it must be written back.
struct Slot {
    agg: Option<Aggregate>,
    ended_at: Option<DateTime<Utc>>,
    last_exit_code: Option<i32>,
    dirty: bool,
}

/// Text PostgreSQL accepts: NUL (which it refuses) becomes U+FFFD.
fn clean(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn clean_all(v: &[String]) -> Vec<String> {
    v.iter().map(|s| clean(s).into_owned()).collect()
}

fn non_empty(s: &str) -> Option<Cow<'_, str>> {
    (!s.is_empty()).then(|| clean(s))
}

fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn time_of(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.as_ref()
        .filter(|t| time_ok(t))
        .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos as u32))
}

/// `{"key": "value", ...}` for `jsonb` (and the metadata filter of a list).
pub(crate) fn metadata_json<'a>(
    metadata: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> serde_json::Value {
    serde_json::Value::Object(
        metadata
            .into_iter()
            .map(|(k, v)| {
                (
                    clean(k).into_owned(),
                    serde_json::Value::String(clean(v).into_owned()),
                )
            })
            .collect(),
    )
}

fn egress_json(egress: &Option<pb::EgressPolicy>) -> serde_json::Value {
    serde_json::Value::Array(
        egress
            .iter()
            .flat_map(|p| p.allow.iter())
            .map(|rule| serde_json::Value::String(clean(rule).into_owned()))
            .collect(),
    )
}

fn millis(d: &Option<prost_types::Duration>) -> Option<f64> {
    d.as_ref()
        .map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
}

impl RuntimeProjector {
    /// The live projector.
    pub fn new(pool: PgPool, log: Arc<dyn EventLog>, catalog: Catalog) -> Self {
        RuntimeProjector {
            stream: catalog.stream(RUNTIME),
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
        let mut sandboxes: HashMap<String, Slot> = HashMap::new();
        for &e in events {
            let outcome = match decode(e, &self.catalog) {
                Decoded::Marker => continue,
                Decoded::Sandbox { sandbox_id, event } => {
                    self.sandbox_event(tx, &mut sandboxes, e, sandbox_id, &event)
                        .await?
                }
                Decoded::Egress {
                    sandbox_id,
                    decided,
                } => Ok(self
                    .egress(tx, &mut sandboxes, e, &sandbox_id, &decided)
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
                        "runtime event cannot be applied; skipped"
                    );
                    if park {
                        let letter = deadletter::letter(
                            e,
                            &self.catalog.deadletter_subject(RUNTIME),
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
        for (sandbox_id, slot) in &sandboxes {
            if let (true, Some(agg)) = (slot.dirty, &slot.agg) {
                upsert_sandbox(tx, sandbox_id, agg, slot).await?;
            }
        }
        Ok((report, invalid))
    }

    /// The slot of `sandbox_id`, loaded from its row the first time the batch meets it.
    async fn slot<'s>(
        tx: &mut Transaction<'_, Postgres>,
        sandboxes: &'s mut HashMap<String, Slot>,
        sandbox_id: &str,
    ) -> Result<&'s mut Slot, ProjectionError> {
        if !sandboxes.contains_key(sandbox_id) {
            let slot = load(tx, sandbox_id).await?;
            sandboxes.insert(sandbox_id.to_string(), slot);
        }
        Ok(sandboxes.get_mut(sandbox_id).expect("just inserted"))
    }

    /// Folds one sandbox event into its aggregate and writes its Exec or checkpoint row.
    /// `Ok(Ok(false))`: already applied; `Ok(Err(_))`: cannot be applied.
    async fn sandbox_event(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        sandboxes: &mut HashMap<String, Slot>,
        e: &StoredEvent,
        sandbox_id: String,
        event: &SandboxEvent,
    ) -> Result<Result<bool, (&'static str, String)>, ProjectionError> {
        let slot = Self::slot(tx, sandboxes, &sandbox_id).await?;
        let is_requested = matches!(event.event, Some(Event::Requested(_)));
        let agg = match (&mut slot.agg, is_requested) {
            (Some(agg), _) if e.sequence <= agg.view.version => return Ok(Ok(false)),
            (Some(_), true) => {
                return Ok(Err((
                    "already_requested",
                    format!("sandbox {sandbox_id} was requested already"),
                )))
            }
            (Some(agg), false) => agg,
            (None, false) => {
                return Ok(Err((
                    "no_sandbox",
                    format!("sandbox {sandbox_id} was never requested"),
                )))
            }
            (none, true) => none.insert(Aggregate::default()),
        };
        let at = time_of(&event.at).expect("checked by decode");
        let changed = agg.apply(&sandbox_id, event, e.sequence);
        slot.dirty = true;
        if let Some((_, to)) = changed {
            if matches!(
                to,
                pb::State::Terminated | pb::State::Failed | pb::State::Expired
            ) && slot.ended_at.is_none()
            {
                slot.ended_at = Some(at);
            }
        }
        let tenant = agg.view.tenant.clone();
        match event.event.as_ref().expect("checked by decode") {
            Event::ExecStarted(s) => {
                sqlx::query(
                    "INSERT INTO sandbox_execs (sandbox_id, exec_id, argv, started_at)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (sandbox_id, exec_id) DO UPDATE
                        SET argv = EXCLUDED.argv, started_at = EXCLUDED.started_at",
                )
                .bind(&sandbox_id)
                .bind(clean(&s.exec_id))
                .bind(clean_all(&s.argv))
                .bind(at)
                .execute(&mut **tx)
                .await?;
            }
            Event::ExecFinished(f) => {
                let r = f.result.as_ref().expect("checked by decode");
                slot.last_exit_code = r.exit_code;
                sqlx::query(
                    "INSERT INTO sandbox_execs
                        (sandbox_id, exec_id, argv, finished_at, exit_code, signal, timed_out,
                         oom_killed, pids_limited, duration_ms, disk_full, error)
                     VALUES ($1, $2, '{}', $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (sandbox_id, exec_id) DO UPDATE
                        SET finished_at = EXCLUDED.finished_at, exit_code = EXCLUDED.exit_code,
                            signal = EXCLUDED.signal, timed_out = EXCLUDED.timed_out,
                            oom_killed = EXCLUDED.oom_killed,
                            pids_limited = EXCLUDED.pids_limited,
                            duration_ms = EXCLUDED.duration_ms, disk_full = EXCLUDED.disk_full,
                            error = EXCLUDED.error",
                )
                .bind(&sandbox_id)
                .bind(clean(&r.exec_id))
                .bind(at)
                .bind(r.exit_code)
                .bind(r.signal)
                .bind(r.timed_out)
                .bind(r.oom_killed)
                .bind(r.pids_limited)
                .bind(millis(&r.duration))
                .bind(r.disk_full)
                .bind((!r.error.is_empty()).then(|| clean(&r.error)))
                .execute(&mut **tx)
                .await?;
            }
            Event::Checkpointed(c) => {
                let c = c.checkpoint.as_ref().expect("checked by decode");
                sqlx::query(
                    "INSERT INTO sandbox_checkpoints
                        (checkpoint_id, sandbox_id, tenant, object_key, size_bytes, sha256, at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT DO NOTHING",
                )
                .bind(clean(&c.checkpoint_id))
                .bind(&sandbox_id)
                .bind(clean(&tenant))
                .bind(clean(&c.object_key))
                .bind(big(c.size_bytes))
                .bind(clean(&c.sha256))
                .bind(time_of(&c.at).unwrap_or(at))
                .execute(&mut **tx)
                .await?;
            }
            _ => {}
        }
        Ok(Ok(true))
    }

    /// Records an egress decision once. `true`: written. Its tenant is the event's, else the
    /// sandbox's as folded so far.
    async fn egress(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        sandboxes: &mut HashMap<String, Slot>,
        e: &StoredEvent,
        sandbox_id: &str,
        d: &EgressDecided,
    ) -> Result<bool, ProjectionError> {
        let tenant = if d.tenant.is_empty() {
            let slot = Self::slot(tx, sandboxes, sandbox_id).await?;
            slot.agg
                .as_ref()
                .map(|a| a.view.tenant.clone())
                .unwrap_or_default()
        } else {
            d.tenant.clone()
        };
        let done = sqlx::query(
            "INSERT INTO sandbox_egress
                (sequence, sandbox_id, tenant, destination, allowed, rule, at, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT DO NOTHING",
        )
        .bind(e.sequence as i64)
        .bind(sandbox_id)
        .bind(clean(&tenant))
        .bind(clean(&d.destination))
        .bind(d.allowed)
        .bind(clean(&d.rule))
        .bind(time_of(&d.at).expect("checked by decode"))
        // Events from before the field say 0: one attempt.
        .bind(d.attempts.clamp(1, i64::MAX as u64) as i64)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// The stored aggregate of a sandbox and what its row holds beside it (an empty slot when
/// there is no row).
async fn load(
    tx: &mut Transaction<'_, Postgres>,
    sandbox_id: &str,
) -> Result<Slot, ProjectionError> {
    type Row = (
        Vec<u8>,
        bool,
        String,
        String,
        i64,
        Option<DateTime<Utc>>,
        Option<i32>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT view, pooled, request_id, restore_checkpoint_id, timeout_ns, ended_at,
                last_exit_code
         FROM sandboxes WHERE sandbox_id = $1",
    )
    .bind(sandbox_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((view, pooled, request_id, restore_checkpoint_id, timeout_ns, ended_at, exit)) = row
    else {
        return Ok(Slot {
            agg: None,
            ended_at: None,
            last_exit_code: None,
            dirty: false,
        });
    };
    let view = pb::Sandbox::decode(view.as_slice())
        .map_err(|e| ProjectionError::Database(sqlx::Error::Decode(e.into())))?;
    Ok(Slot {
        agg: Some(Aggregate::from_parts(
            view,
            pooled,
            request_id,
            restore_checkpoint_id,
            chrono::Duration::nanoseconds(timeout_ns),
        )),
        ended_at,
        last_exit_code: exit,
        dirty: false,
    })
}

/// Writes a sandbox's row unless a later version is there.
async fn upsert_sandbox(
    tx: &mut Transaction<'_, Postgres>,
    sandbox_id: &str,
    agg: &Aggregate,
    slot: &Slot,
) -> Result<(), ProjectionError> {
    let v = &agg.view;
    let resources = v.resources.unwrap_or_default();
    let created_at = time_of(&v.created_at).unwrap_or(DateTime::UNIX_EPOCH);
    let timeout_ns = agg.timeout().num_nanoseconds().unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO sandboxes AS s
            (sandbox_id, tenant, template, template_digest, backend, node, state, warm, pooled,
             memory_mb, pids, cpu_millis, metadata, egress, env_names, created_at, expires_at,
             ended_at, failure_reason, execs, last_exit_code, request_id, restore_checkpoint_id,
             timeout_ns, version, view, disk_mb)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)
         ON CONFLICT (sandbox_id) DO UPDATE
            SET tenant = EXCLUDED.tenant, template = EXCLUDED.template,
                template_digest = EXCLUDED.template_digest, backend = EXCLUDED.backend,
                node = EXCLUDED.node, state = EXCLUDED.state, warm = EXCLUDED.warm,
                pooled = EXCLUDED.pooled, memory_mb = EXCLUDED.memory_mb,
                pids = EXCLUDED.pids, cpu_millis = EXCLUDED.cpu_millis,
                disk_mb = EXCLUDED.disk_mb, metadata = EXCLUDED.metadata, egress = EXCLUDED.egress,
                env_names = EXCLUDED.env_names, created_at = EXCLUDED.created_at,
                expires_at = EXCLUDED.expires_at, ended_at = EXCLUDED.ended_at,
                failure_reason = EXCLUDED.failure_reason, execs = EXCLUDED.execs,
                last_exit_code = EXCLUDED.last_exit_code, request_id = EXCLUDED.request_id,
                restore_checkpoint_id = EXCLUDED.restore_checkpoint_id,
                timeout_ns = EXCLUDED.timeout_ns, version = EXCLUDED.version,
                view = EXCLUDED.view
            WHERE s.version < EXCLUDED.version",
    )
    .bind(sandbox_id)
    .bind(clean(&v.tenant))
    .bind(clean(&v.template))
    .bind(clean(&v.template_digest))
    .bind(clean(&v.backend))
    .bind(clean(&v.node))
    .bind(state_name_of(v.state))
    .bind(v.warm)
    .bind(agg.pooled)
    .bind(big(resources.memory_mb))
    .bind(int(resources.pids))
    .bind(int(resources.cpu_millis))
    .bind(metadata_json(&v.metadata))
    .bind(egress_json(&v.egress))
    .bind(clean_all(&v.env_names))
    .bind(created_at)
    .bind(time_of(&v.expires_at))
    .bind(slot.ended_at)
    .bind(non_empty(&v.failure_reason))
    .bind(big(v.execs))
    .bind(slot.last_exit_code)
    .bind(clean(&agg.request_id))
    .bind(clean(&agg.restore_checkpoint_id))
    .bind(timeout_ns)
    .bind(big(v.version))
    .bind(encode_sandbox(v))
    .bind(big(resources.disk_mb))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projector for RuntimeProjector {
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
impl whole::InTransaction for RuntimeProjector {
    const PRODUCT: &'static str = PRODUCT;
    const LOCK: &'static str = LOCK;

    fn stream_name(&self) -> &str {
        &self.stream
    }

    fn parking(&self) -> Option<(&dyn EventLog, String)> {
        self.live
            .then(|| (&*self.log, self.catalog.deadletter_subject(RUNTIME)))
    }

    async fn project(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[&StoredEvent],
        park: bool,
    ) -> Result<(ApplyReport, Vec<&'static str>), ProjectionError> {
        RuntimeProjector::project(self, tx, events, park).await
    }
}

/// Rebuilds the runtime read model from the whole stream (`enablement replay runtime
/// --rebuild`) in one transaction, as [`whole::rebuild`] describes. Invalid events are skipped
/// and not parked again. Returns the checkpoint.
pub async fn rebuild(
    pool: &PgPool,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
) -> Result<u64, ProjectionError> {
    let projector = RuntimeProjector::new(pool.clone(), log.clone(), catalog).replaying();
    let (checkpoint, _) = whole::rebuild(pool, log, TABLES, &projector).await?;
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use creto_streams::Headers;

    fn stored(catalog: &Catalog, subject: &str, payload: Vec<u8>) -> StoredEvent {
        StoredEvent {
            stream: catalog.stream(RUNTIME),
            sequence: 7,
            subject: catalog.subject(subject),
            headers: Headers::new().with(names::CONTENT_TYPE, content_types::PROTOBUF),
            payload: payload.into(),
            recorded_at: Utc::now(),
        }
    }

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn sandbox_event(at_: Option<prost_types::Timestamp>, e: Event) -> Vec<u8> {
        SandboxEvent {
            at: at_,
            event: Some(e),
        }
        .encode_to_vec()
    }

    #[test]
    fn sandbox_bytes_do_not_depend_on_map_order() {
        let s = pb::Sandbox {
            sandbox_id: "sb".into(),
            metadata: (0..16)
                .map(|k| (format!("k{k}"), format!("v{k}")))
                .collect(),
            ..Default::default()
        };
        let bytes = encode_sandbox(&s);
        for _ in 0..8 {
            let again = pb::Sandbox::decode(bytes.as_slice()).unwrap();
            assert_eq!(again, s);
            assert_eq!(encode_sandbox(&again), bytes);
        }
    }

    #[test]
    fn decodes_by_subject_and_refuses_what_cannot_apply() {
        let catalog = Catalog::namespaced("t1");
        let requested = sandbox_event(
            at(1_800_000_000),
            Event::Requested(pb::Requested {
                tenant: "acme".into(),
                ..Default::default()
            }),
        );
        assert!(matches!(
            decode(&stored(&catalog, "runtime.sandboxes.sb1", requested.clone()), &catalog),
            Decoded::Sandbox { ref sandbox_id, .. } if sandbox_id == "sb1"
        ));
        let egress = EgressDecided {
            at: at(1_800_000_000),
            sandbox_id: "sb1".into(),
            ..Default::default()
        };
        assert!(matches!(
            decode(&stored(&catalog, "runtime.egress.sb1", egress.encode_to_vec()), &catalog),
            Decoded::Egress { ref sandbox_id, .. } if sandbox_id == "sb1"
        ));
        let reason = |subject: &str, payload: Vec<u8>| match decode(
            &stored(&catalog, subject, payload),
            &catalog,
        ) {
            Decoded::Invalid { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason("runtime.egress.sb2", egress.encode_to_vec()),
            "subject_mismatch"
        );
        assert_eq!(
            reason("runtime.sandboxes.sb1", b"not protobuf".to_vec()),
            "invalid_protobuf"
        );
        assert_eq!(reason("runtime.sandboxes.sb1", vec![]), "invalid_time");
        assert_eq!(
            reason(
                "runtime.sandboxes.sb1",
                SandboxEvent {
                    at: at(1),
                    event: None
                }
                .encode_to_vec()
            ),
            "missing_event"
        );
        assert_eq!(
            reason(
                "runtime.sandboxes.sb1",
                sandbox_event(at(i64::MAX), Event::Ready(pb::Ready::default()))
            ),
            "invalid_time"
        );
        assert_eq!(
            reason(
                "runtime.sandboxes.sb1",
                sandbox_event(
                    at(1),
                    Event::Requested(pb::Requested {
                        timeout: Some(prost_types::Duration {
                            seconds: i64::MAX,
                            nanos: 0
                        }),
                        ..Default::default()
                    })
                )
            ),
            "invalid_duration"
        );
        assert_eq!(
            reason(
                "runtime.sandboxes.sb1",
                sandbox_event(at(1), Event::ExecFinished(pb::ExecFinished::default()))
            ),
            "missing_result"
        );
        assert_eq!(
            reason(
                "runtime.sandboxes.sb1",
                sandbox_event(at(1), Event::ExecStarted(pb::ExecStarted::default()))
            ),
            "missing_exec_id"
        );
        assert_eq!(
            reason(
                "runtime.sandboxes.sb1",
                sandbox_event(at(1), Event::Checkpointed(pb::Checkpointed::default()))
            ),
            "missing_checkpoint"
        );
        assert_eq!(reason("runtime.sandboxes", vec![]), "unknown_subject");
        assert_eq!(reason("runtime.sandboxes.a.b", vec![]), "unknown_subject");
        assert_eq!(reason("runtime.pool.sb1", vec![]), "unknown_subject");
        let marker = stored(&catalog, "runtime._restored", b"12".to_vec());
        assert_eq!(decode(&marker, &catalog), Decoded::Marker);
    }
}
