//! What the read models that apply each batch in one PostgreSQL transaction, under the
//! product's advisory lock, and are rebuilt whole (oversight, runtime) share: the checkpoint
//! read, the live batch, and the rebuild.
use std::sync::Arc;

use async_trait::async_trait;
use creto_streams::{EventLog, ReplayFrom, StoredEvent};
use futures::StreamExt;
use sqlx::{PgPool, Postgres, Transaction};

use crate::metrics;
use crate::runner::{ApplyReport, ProjectionError};

/// Events per batch of a rebuild.
const REBUILD_BATCH: usize = 1_000;

#[async_trait]
pub trait InTransaction: Send + Sync {
    /// Takes the projection's lock in `tx`: live batches and a rebuild exclude each other.
    async fn lock(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), ProjectionError>;

    /// Applies the events after the checkpoint and moves the checkpoint, inside `tx` (which
    /// holds the lock). Returns the report and the reasons of the invalid events.
    async fn apply_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[StoredEvent],
    ) -> Result<(ApplyReport, Vec<&'static str>), ProjectionError>;
}

/// The last sequence `product`'s projector applied (0: none).
pub async fn checkpoint(pool: &PgPool, product: &str) -> Result<u64, ProjectionError> {
    let at: Option<i64> =
        sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoints WHERE projector = $1")
            .bind(product)
            .fetch_optional(pool)
            .await?;
    Ok(at.unwrap_or(0) as u64)
}

/// One live batch in its own transaction. Invalid events are counted as dead letters of
/// `stream` when `live` (a rebuild's were counted when first applied).
pub async fn apply(
    pool: &PgPool,
    projector: &impl InTransaction,
    events: &[StoredEvent],
    stream: &str,
    live: bool,
) -> Result<ApplyReport, ProjectionError> {
    if events.is_empty() {
        return Ok(ApplyReport::default());
    }
    let mut tx = pool.begin().await?;
    projector.lock(&mut tx).await?;
    let (report, invalid) = projector.apply_in(&mut tx, events).await?;
    tx.commit().await?;
    if live {
        for reason in invalid {
            metrics::DEADLETTERS
                .with_label_values(&[stream, reason])
                .inc();
        }
    }
    Ok(report)
}

/// Rebuilds `product`'s read model from the whole `stream`: in ONE transaction holding the
/// projection lock, empties `tables` and the checkpoint, then re-applies the stream from its
/// first event in batches. Readers see the old rows until the commit, then the new ones
/// (DELETE, not TRUNCATE, so readers are not blocked meanwhile); the live projector waits for
/// the lock and goes on from the new checkpoint. Returns the checkpoint (the last sequence
/// re-applied, 0 for an empty stream) and what was applied.
pub async fn rebuild(
    pool: &PgPool,
    log: Arc<dyn EventLog>,
    stream: &str,
    product: &str,
    tables: &[&str],
    projector: &impl InTransaction,
) -> Result<(u64, ApplyReport), ProjectionError> {
    let mut tx = pool.begin().await?;
    projector.lock(&mut tx).await?;
    for table in tables {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM projection_checkpoints WHERE projector = $1")
        .bind(product)
        .execute(&mut *tx)
        .await?;
    let mut events = log.replay(stream, ReplayFrom::Start, None, None).await?;
    let mut batch = Vec::with_capacity(REBUILD_BATCH);
    let mut checkpoint = 0;
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
            let (r, _) = projector.apply_in(&mut tx, &batch).await?;
            checkpoint = r.checkpoint;
            report.applied += r.applied;
            report.duplicates += r.duplicates;
            report.dead_lettered += r.dead_lettered;
            batch.clear();
        }
        if done {
            break;
        }
    }
    tx.commit().await?;
    tracing::info!(
        product,
        checkpoint,
        applied = report.applied,
        skipped = report.dead_lettered,
        "read model rebuilt"
    );
    Ok((checkpoint, report))
}
