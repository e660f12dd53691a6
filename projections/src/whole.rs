//! What the read models that apply each batch in one PostgreSQL transaction, under the
//! product's advisory lock, and are rebuilt whole (oversight, runtime) share: the lock, the
//! checkpoint kept in the batch's transaction, re-application, and the rebuild. Each product
//! only says how to write its events ([`InTransaction::project`]).
use std::sync::Arc;

use async_trait::async_trait;
use creto_streams::{EventLog, ReplayFrom, StoredEvent};
use futures::future::BoxFuture;
use futures::StreamExt;
use sqlx::{Acquire, PgPool, Postgres, Transaction};

use crate::runner::{ApplyReport, ProjectionError};
use crate::{metrics, set_aside};

/// Events per batch of a rebuild.
const REBUILD_BATCH: usize = 1_000;

#[async_trait]
pub trait InTransaction: Send + Sync {
    /// The projector's name in `projection_checkpoints`.
    const PRODUCT: &'static str;
    /// Takes the product's advisory lock for the rest of a transaction, e.g.
    /// `SELECT pg_advisory_xact_lock(hashtext('creto.projection.oversight'))`.
    const LOCK: &'static str;

    fn stream_name(&self) -> &str;

    /// Where the live projector parks events the database refuses: the log and the
    /// dead-letter subject. `None` while rebuilding or replaying (parked when first applied).
    fn parking(&self) -> Option<(&dyn EventLog, String)>;

    /// Writes `events` to the tables (not the checkpoint). `park`: invalid events go to the
    /// dead letters. Returns the report and the reasons of the invalid events.
    async fn project(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[&StoredEvent],
        park: bool,
    ) -> Result<(ApplyReport, Vec<&'static str>), ProjectionError>;
}

/// Takes `P`'s lock for the rest of `tx` (batches of the live projector and a rebuild never
/// interleave) and commits without waiting for the WAL flush: the read model is a projection,
/// a batch lost in a PostgreSQL crash is lost whole, checkpoint included, and re-applied from
/// the log.
pub async fn lock<P: InTransaction>(
    tx: &mut Transaction<'_, Postgres>,
) -> Result<(), ProjectionError> {
    sqlx::query(P::LOCK).execute(&mut **tx).await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Applies the events after the checkpoint and moves the checkpoint, inside `tx` (which must
/// hold [`lock`]). `park`: invalid events go to the dead letters.
pub async fn apply_in<P: InTransaction>(
    projector: &P,
    tx: &mut Transaction<'_, Postgres>,
    events: &[StoredEvent],
    park: bool,
) -> Result<(ApplyReport, Vec<&'static str>), ProjectionError> {
    let Some(last) = events.last() else {
        return Ok(Default::default());
    };
    let checkpoint: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_checkpoints WHERE projector = $1 FOR UPDATE",
    )
    .bind(P::PRODUCT)
    .fetch_optional(&mut **tx)
    .await?;
    let checkpoint = checkpoint.unwrap_or(0) as u64;
    if last.sequence <= checkpoint {
        let report = ApplyReport {
            checkpoint,
            ..Default::default()
        };
        return Ok((report, Vec::new()));
    }
    let fresh: Vec<&StoredEvent> = events.iter().filter(|e| e.sequence > checkpoint).collect();
    let (mut report, invalid) = projector.project(tx, &fresh, park).await?;
    report.checkpoint = last.sequence;
    save_checkpoint(projector, tx, last.sequence).await?;
    Ok((report, invalid))
}

async fn save_checkpoint<P: InTransaction>(
    projector: &P,
    tx: &mut Transaction<'_, Postgres>,
    sequence: u64,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projector, stream, last_sequence, updated_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (projector) DO UPDATE
            SET stream = EXCLUDED.stream, last_sequence = EXCLUDED.last_sequence, updated_at = now()",
    )
    .bind(P::PRODUCT)
    .bind(projector.stream_name())
    .bind(sequence as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// [`crate::Projector::set_aside`] for these read models: parks `event` if `projector` is
/// the live one, then moves the checkpoint past it.
pub async fn set_aside<P: InTransaction>(
    pool: &PgPool,
    projector: &P,
    event: &StoredEvent,
    detail: &str,
) -> Result<bool, ProjectionError> {
    let stream = projector.stream_name();
    if let Some((log, subject)) = projector.parking() {
        set_aside::park(log, &subject, stream, event, detail).await?;
    }
    set_aside::skip(pool, P::LOCK, "public", P::PRODUCT, stream, event.sequence).await?;
    Ok(true)
}

/// [`apply_in`] (parking nothing) in a savepoint of `tx`, halving `events` when the database
/// refuses them as [`crate::runner::apply_setting_aside`] does: the one event refused alone is
/// skipped (it was parked when the live projector met it) and the checkpoint moved past it.
fn apply_in_setting_aside<'a, 't: 'a, P: InTransaction>(
    projector: &'a P,
    tx: &'a mut Transaction<'t, Postgres>,
    events: &'a [StoredEvent],
) -> BoxFuture<'a, Result<ApplyReport, ProjectionError>> {
    Box::pin(async move {
        let mut savepoint = tx.begin().await?;
        let error = match apply_in(projector, &mut savepoint, events, false).await {
            Ok((report, _)) => {
                savepoint.commit().await?;
                return Ok(report);
            }
            Err(e) => e,
        };
        savepoint.rollback().await?;
        let Some(detail) = error.refusal() else {
            return Err(error);
        };
        if let [event] = events {
            tracing::warn!(
                product = P::PRODUCT,
                sequence = event.sequence,
                %detail,
                "the database refuses this event; skipped"
            );
            save_checkpoint(projector, tx, event.sequence).await?;
            return Ok(ApplyReport {
                dead_lettered: 1,
                checkpoint: event.sequence,
                ..Default::default()
            });
        }
        let (first, second) = events.split_at(events.len() / 2);
        let a = apply_in_setting_aside(projector, tx, first).await?;
        let b = apply_in_setting_aside(projector, tx, second).await?;
        Ok(a.then(b))
    })
}

/// Re-applies events applied before or not, whatever the checkpoint, without moving it and
/// parking nothing: what was applied already changes nothing (the rows' versions and keys),
/// the rest is applied. `checkpoint` in the report is the last sequence of `events`.
pub async fn reapply<P: InTransaction>(
    pool: &PgPool,
    projector: &P,
    events: &[StoredEvent],
) -> Result<ApplyReport, ProjectionError> {
    let Some(last) = events.last() else {
        return Ok(ApplyReport::default());
    };
    let mut tx = pool.begin().await?;
    lock::<P>(&mut tx).await?;
    let all: Vec<&StoredEvent> = events.iter().collect();
    let (mut report, _) = projector.project(&mut tx, &all, false).await?;
    tx.commit().await?;
    report.checkpoint = last.sequence;
    Ok(report)
}

/// The last sequence `P`'s projector applied (0: none).
pub async fn checkpoint<P: InTransaction>(pool: &PgPool) -> Result<u64, ProjectionError> {
    let at: Option<i64> =
        sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoints WHERE projector = $1")
            .bind(P::PRODUCT)
            .fetch_optional(pool)
            .await?;
    Ok(at.unwrap_or(0) as u64)
}

/// One batch in its own transaction. `live`: invalid events are parked and counted as dead
/// letters (a replaying projector's were when first applied).
pub async fn apply<P: InTransaction>(
    pool: &PgPool,
    projector: &P,
    events: &[StoredEvent],
    live: bool,
) -> Result<ApplyReport, ProjectionError> {
    if events.is_empty() {
        return Ok(ApplyReport::default());
    }
    let mut tx = pool.begin().await?;
    lock::<P>(&mut tx).await?;
    let (report, invalid) = apply_in(projector, &mut tx, events, live).await?;
    tx.commit().await?;
    if live {
        for reason in invalid {
            metrics::DEADLETTERS
                .with_label_values(&[projector.stream_name(), reason])
                .inc();
        }
    }
    Ok(report)
}

/// Rebuilds `P`'s read model from its whole stream: in ONE transaction holding the projection
/// lock, empties `tables` and the checkpoint, then re-applies the stream from its first event
/// in batches, parking nothing (invalid events were parked when first applied) and skipping
/// what the database refuses. Readers see the old rows until the commit, then the new ones
/// (DELETE, not TRUNCATE, so readers are not blocked meanwhile); the live projector waits for
/// the lock and goes on from the new checkpoint. Returns the checkpoint (the last sequence
/// re-applied, 0 for an empty stream) and what was applied.
pub async fn rebuild<P: InTransaction>(
    pool: &PgPool,
    log: Arc<dyn EventLog>,
    tables: &[&str],
    projector: &P,
) -> Result<(u64, ApplyReport), ProjectionError> {
    let mut tx = pool.begin().await?;
    lock::<P>(&mut tx).await?;
    // The tables fill up inside this one transaction, so their statistics (autovacuum cannot
    // see uncommitted rows) still describe them as they were, often empty. A prepared
    // statement's cached generic plan, made from those statistics, then reads a request by
    // scanning the whole table: every lookup dearer than the last (33k oversight events took
    // 39 s). Custom plans are costed against the table's current size and use the keys.
    sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
        .execute(&mut *tx)
        .await?;
    for table in tables {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM projection_checkpoints WHERE projector = $1")
        .bind(P::PRODUCT)
        .execute(&mut *tx)
        .await?;
    let mut events = log
        .replay(projector.stream_name(), ReplayFrom::Start, None, None)
        .await?;
    let mut batch = Vec::with_capacity(REBUILD_BATCH);
    let mut report = ApplyReport::default();
    loop {
        let done = match events.next().await {
            Some(e) => {
                batch.push(e?);
                false
            }
            None => true,
        };
        if batch.len() >= REBUILD_BATCH || (done && !batch.is_empty()) {
            report = report.then(apply_in_setting_aside(projector, &mut tx, &batch).await?);
            batch.clear();
        }
        if done {
            break;
        }
    }
    tx.commit().await?;
    tracing::info!(
        product = P::PRODUCT,
        checkpoint = report.checkpoint,
        applied = report.applied,
        skipped = report.dead_lettered,
        "read model rebuilt"
    );
    Ok((report.checkpoint, report))
}
