//! Setting aside an event the database refuses alone ([`crate::runner::apply_setting_aside`]):
//! a live projector parks it in the dead letters ([`park`]), then the checkpoint moves past it
//! ([`skip`]). Parking first: after a crash between the two, the event fails again and is
//! parked again under the same dead-letter id.
use creto_streams::{deadletter, EventLog, StoredEvent};
use sqlx::PgPool;

use crate::metrics;
use crate::postgres::quote_ident;
use crate::runner::{ProjectionError, PROJECTION_FAILED};

/// Parks `event` of `stream` on the dead-letter `subject` with reason `projection_failed`.
pub async fn park(
    log: &dyn EventLog,
    subject: &str,
    stream: &str,
    event: &StoredEvent,
    detail: &str,
) -> Result<(), ProjectionError> {
    log.append(deadletter::letter(
        event,
        subject,
        PROJECTION_FAILED,
        detail,
        1,
    ))
    .await?;
    metrics::DEADLETTERS
        .with_label_values(&[stream, PROJECTION_FAILED])
        .inc();
    Ok(())
}

/// Moves `product`'s checkpoint in `schema` to `sequence` in a transaction holding the
/// projection's `lock`; a checkpoint already past it stays.
pub async fn skip(
    pool: &PgPool,
    lock: &str,
    schema: &str,
    product: &str,
    stream: &str,
    sequence: u64,
) -> Result<(), ProjectionError> {
    let mut tx = pool.begin().await?;
    sqlx::query(lock).execute(&mut *tx).await?;
    sqlx::query(&format!(
        "INSERT INTO {}.projection_checkpoints AS c (projector, stream, last_sequence, updated_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (projector) DO UPDATE
            SET last_sequence = EXCLUDED.last_sequence, updated_at = now()
            WHERE c.last_sequence < EXCLUDED.last_sequence",
        quote_ident(schema)
    ))
    .bind(product)
    .bind(stream)
    .bind(sequence as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
