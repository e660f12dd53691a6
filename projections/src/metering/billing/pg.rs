//! Corrections, plans and invoices in PostgreSQL (tables of `0005_billing.sql`).
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use creto_domain::metering::pricing::{Plan, PlanAssignment, PlanRef};
use creto_streams::StoredEvent;
use serde_json::{Map, Value};

use super::{BillingFact, BillingReadModel, CorrectionFact, CorrectionRecord, CorrectionState};
use crate::metering::read_model::PgReadModel;
use crate::postgres::quote_ident;
use crate::runner::ProjectionError;

/// `metering_events` as usage sees it: voided events left out, amended ones with their new
/// quantity and dimensions. Same columns as the table, so queries read it in its place.
/// `schema`: qualify the tables (a rebuild's side schema); `None`: the search path.
pub fn effective_events(schema: Option<&str>) -> String {
    let s = schema.map_or_else(String::new, |s| format!("{}.", quote_ident(s)));
    format!(
        "(SELECT e.tenant, e.subscription_id, e.event_id, e.event_type, e.source, e.occurred_at,
                 e.recorded_at, COALESCE(c.quantity, e.quantity) AS quantity,
                 COALESCE(c.data, e.data) AS data, e.stream_sequence
          FROM {s}metering_events e
          LEFT JOIN {s}metering_event_corrections c
            ON c.tenant = e.tenant AND c.subscription_id = e.subscription_id AND c.event_id = e.event_id
          WHERE c.voided IS NOT TRUE)"
    )
}

fn json_text(m: &Option<Map<String, Value>>) -> Option<String> {
    m.as_ref().map(|m| Value::Object(m.clone()).to_string())
}

fn json_map(text: Option<String>) -> Option<Map<String, Value>> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

/// Applies billing facts inside the projector's transaction, in log order, idempotently.
/// With `maintain_hourly`, the hour of each corrected event is recomputed in `usage_hourly`
/// from the events as corrected (exactly what a rebuild computes); a rebuild's bulk load
/// passes false (it computes `usage_hourly` once at the end). Returns the facts applied.
pub async fn apply(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    schema: &str,
    facts: &[(BillingFact, &StoredEvent)],
    maintain_hourly: bool,
) -> Result<u64, sqlx::Error> {
    let s = quote_ident(schema);
    let mut applied = 0;
    for (fact, e) in facts {
        let sequence = e.sequence as i64;
        match fact {
            BillingFact::Correction(c) => {
                if apply_correction(tx, schema, c, e, maintain_hourly).await? {
                    applied += 1;
                }
            }
            BillingFact::PlanDefined { tenant, plan } => {
                let definition = serde_json::to_string(plan).unwrap_or_default();
                let done = sqlx::query(&format!(
                    "INSERT INTO {s}.plans (tenant, plan_id, version, currency, definition, defined_sequence)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
                ))
                .bind(tenant)
                .bind(&plan.id)
                .bind(plan.version as i32)
                .bind(plan.currency.code())
                .bind(definition)
                .bind(sequence)
                .execute(&mut **tx)
                .await?;
                applied += done.rows_affected();
            }
            BillingFact::PlanAttached { tenant, attached } => {
                let done = sqlx::query(&format!(
                    "INSERT INTO {s}.plan_assignments AS a (tenant, subscription_id, effective_from, plan_id, version, stream_sequence)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (tenant, subscription_id, effective_from) DO UPDATE
                        SET plan_id = EXCLUDED.plan_id, version = EXCLUDED.version,
                            stream_sequence = EXCLUDED.stream_sequence
                        WHERE a.stream_sequence < EXCLUDED.stream_sequence"
                ))
                .bind(tenant)
                .bind(&attached.subscription_id)
                .bind(attached.effective_from)
                .bind(&attached.plan.id)
                .bind(attached.plan.version as i32)
                .bind(sequence)
                .execute(&mut **tx)
                .await?;
                applied += done.rows_affected();
            }
            BillingFact::InvoiceIssued {
                tenant,
                document,
                invoice,
            } => {
                let (Some(number), Some(number_seq), Some(issued_at)) = (
                    invoice.number.as_ref(),
                    invoice.number_seq,
                    invoice.issued_at,
                ) else {
                    continue;
                };
                let done = sqlx::query(&format!(
                    "INSERT INTO {s}.invoices (tenant, number, number_seq, subscription_id, period_start, period_end,
                                               status, currency, total, issued_at, document, stream_sequence)
                     VALUES ($1, $2, $3, $4, $5, $6, 'issued', $7, $8::numeric, $9, $10, $11) ON CONFLICT DO NOTHING"
                ))
                .bind(tenant)
                .bind(number)
                .bind(number_seq as i64)
                .bind(&invoice.subscription_id)
                .bind(invoice.invoice.period.start)
                .bind(invoice.invoice.period.end)
                .bind(invoice.invoice.currency.code())
                .bind(invoice.invoice.total.to_string())
                .bind(issued_at)
                .bind(document)
                .bind(sequence)
                .execute(&mut **tx)
                .await?;
                applied += done.rows_affected();
            }
        }
    }
    Ok(applied)
}

/// One correction: skipped when its id is in the audit trail already (a replay), else the
/// event's state moves, its hour is recomputed, and the audit row is written.
async fn apply_correction(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    schema: &str,
    c: &CorrectionFact,
    e: &StoredEvent,
    maintain_hourly: bool,
) -> Result<bool, sqlx::Error> {
    let s = quote_ident(schema);
    let seen: Option<i32> = sqlx::query_scalar(&format!(
        "SELECT 1 FROM {s}.metering_corrections WHERE tenant = $1 AND correction_id = $2"
    ))
    .bind(&c.tenant)
    .bind(&c.correction_id)
    .fetch_optional(&mut **tx)
    .await?;
    if seen.is_some() {
        return Ok(false);
    }
    let row: Option<(bool, Option<f64>, Option<String>)> = sqlx::query_as(&format!(
        "SELECT voided, quantity::float8, data::text FROM {s}.metering_event_corrections
         WHERE tenant = $1 AND subscription_id = $2 AND event_id = $3 FOR UPDATE"
    ))
    .bind(&c.tenant)
    .bind(&c.subscription_id)
    .bind(&c.event_id)
    .fetch_optional(&mut **tx)
    .await?;
    let mut state = row.map_or_else(CorrectionState::default, |(voided, quantity, data)| {
        CorrectionState {
            voided,
            quantity,
            data: json_map(data),
        }
    });
    let applied = state.apply(c);
    if applied {
        sqlx::query(&format!(
            "INSERT INTO {s}.metering_event_corrections (tenant, subscription_id, event_id, voided, quantity, data, stream_sequence)
             VALUES ($1, $2, $3, $4, $5::numeric, $6::jsonb, $7)
             ON CONFLICT (tenant, subscription_id, event_id) DO UPDATE
                SET voided = EXCLUDED.voided, quantity = EXCLUDED.quantity, data = EXCLUDED.data,
                    stream_sequence = EXCLUDED.stream_sequence"
        ))
        .bind(&c.tenant)
        .bind(&c.subscription_id)
        .bind(&c.event_id)
        .bind(state.voided)
        .bind(state.quantity.map(|q| q.to_string()))
        .bind(json_text(&state.data))
        .bind(e.sequence as i64)
        .execute(&mut **tx)
        .await?;
        if maintain_hourly {
            recompute_hour(tx, schema, c).await?;
        }
    }
    sqlx::query(&format!(
        "INSERT INTO {s}.metering_corrections (tenant, correction_id, subscription_id, event_id, kind, quantity, data,
                                               reason, applied, recorded_at, stream_sequence)
         VALUES ($1, $2, $3, $4, $5, $6::numeric, $7::jsonb, $8, $9, $10, $11) ON CONFLICT DO NOTHING"
    ))
    .bind(&c.tenant)
    .bind(&c.correction_id)
    .bind(&c.subscription_id)
    .bind(&c.event_id)
    .bind(c.kind.as_str())
    .bind(c.quantity.map(|q| q.to_string()))
    .bind(json_text(&c.data))
    .bind(&c.reason)
    .bind(applied)
    .bind(e.recorded_at)
    .bind(e.sequence as i64)
    .execute(&mut **tx)
    .await?;
    Ok(applied)
}

/// Recomputes the `usage_hourly` row of the corrected event's hour from the events as
/// corrected, then the key's `usage_monthly` row of that month from its hours; a row goes
/// when nothing is left in it.
async fn recompute_hour(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    schema: &str,
    c: &CorrectionFact,
) -> Result<(), sqlx::Error> {
    let s = quote_ident(schema);
    let event: Option<(String, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT event_type, occurred_at FROM {s}.metering_events
         WHERE tenant = $1 AND subscription_id = $2 AND event_id = $3"
    ))
    .bind(&c.tenant)
    .bind(&c.subscription_id)
    .bind(&c.event_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((event_type, occurred_at)) = event else {
        return Ok(());
    };
    // Each statement takes the key and the event's time. The month is compared truncated, not
    // as a range: adding '1 month' to a timestamptz follows the session's time zone.
    let statements = [
        format!(
            "DELETE FROM {s}.usage_hourly WHERE tenant = $1 AND subscription_id = $2 AND event_type = $3
                AND hour = date_trunc('hour', $4::timestamptz, 'UTC')"
        ),
        format!(
            "INSERT INTO {s}.usage_hourly (tenant, subscription_id, event_type, hour, event_count, quantity_sum)
             SELECT tenant, subscription_id, event_type, date_trunc('hour', occurred_at, 'UTC'), count(*), sum(quantity)
             FROM {} e
             WHERE tenant = $1 AND subscription_id = $2 AND event_type = $3
               AND occurred_at >= date_trunc('hour', $4::timestamptz, 'UTC')
               AND occurred_at < date_trunc('hour', $4::timestamptz, 'UTC') + interval '1 hour'
             GROUP BY 1, 2, 3, 4",
            effective_events(Some(schema))
        ),
        format!(
            "DELETE FROM {s}.usage_monthly WHERE tenant = $1 AND subscription_id = $2 AND event_type = $3
                AND month = date_trunc('month', $4::timestamptz, 'UTC')"
        ),
        format!(
            "INSERT INTO {s}.usage_monthly (tenant, subscription_id, event_type, month, event_count, quantity_sum)
             SELECT tenant, subscription_id, event_type, date_trunc('month', hour, 'UTC'), sum(event_count), sum(quantity_sum)
             FROM {s}.usage_hourly
             WHERE tenant = $1 AND subscription_id = $2 AND event_type = $3
               AND date_trunc('month', hour, 'UTC') = date_trunc('month', $4::timestamptz, 'UTC')
             GROUP BY 1, 2, 3, 4"
        ),
    ];
    for statement in &statements {
        sqlx::query(statement)
            .bind(&c.tenant)
            .bind(&c.subscription_id)
            .bind(&event_type)
            .bind(occurred_at)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

type AuditRow = (
    String,
    String,
    String,
    String,
    Option<f64>,
    Option<String>,
    String,
    bool,
    DateTime<Utc>,
    i64,
);

#[async_trait]
impl BillingReadModel for PgReadModel {
    async fn event_sequence(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<Option<u64>, ProjectionError> {
        let seq: Option<i64> = sqlx::query_scalar(
            "SELECT stream_sequence FROM metering_events WHERE tenant = $1 AND subscription_id = $2 AND event_id = $3",
        )
        .bind(tenant)
        .bind(subscription_id)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(seq.map(|s| s as u64))
    }

    async fn correction_state(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<Option<CorrectionState>, ProjectionError> {
        let row: Option<(bool, Option<f64>, Option<String>)> = sqlx::query_as(
            "SELECT voided, quantity::float8, data::text FROM metering_event_corrections
             WHERE tenant = $1 AND subscription_id = $2 AND event_id = $3",
        )
        .bind(tenant)
        .bind(subscription_id)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(voided, quantity, data)| CorrectionState {
            voided,
            quantity,
            data: json_map(data),
        }))
    }

    async fn corrections(
        &self,
        tenant: &str,
        subscription_id: &str,
    ) -> Result<Vec<CorrectionRecord>, ProjectionError> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT correction_id, kind, subscription_id, event_id, quantity::float8, data::text, reason, applied,
                    recorded_at, stream_sequence
             FROM metering_corrections WHERE tenant = $1 AND subscription_id = $2 ORDER BY stream_sequence",
        )
        .bind(tenant)
        .bind(subscription_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, kind, sub, event, quantity, data, reason, applied, at, seq)| {
                    CorrectionRecord {
                        correction_id: id,
                        kind: if kind == "void" {
                            super::CorrectionKind::Void
                        } else {
                            super::CorrectionKind::Amend
                        },
                        subscription_id: sub,
                        event_id: event,
                        quantity,
                        data: json_map(data),
                        reason,
                        applied,
                        recorded_at: at,
                        sequence: seq as u64,
                    }
                },
            )
            .collect())
    }

    async fn plan(
        &self,
        tenant: &str,
        plan_id: &str,
        version: u32,
    ) -> Result<Option<Plan>, ProjectionError> {
        let text: Option<String> = sqlx::query_scalar(
            "SELECT definition FROM plans WHERE tenant = $1 AND plan_id = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(plan_id)
        .bind(version as i32)
        .fetch_optional(&self.pool)
        .await?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    async fn assignments(
        &self,
        tenant: &str,
        subscription_id: &str,
    ) -> Result<Vec<PlanAssignment>, ProjectionError> {
        let rows: Vec<(String, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT plan_id, version, effective_from FROM plan_assignments
             WHERE tenant = $1 AND subscription_id = $2 ORDER BY effective_from",
        )
        .bind(tenant)
        .bind(subscription_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, version, from)| PlanAssignment {
                plan: PlanRef {
                    id,
                    version: version as u32,
                },
                effective_from: from,
            })
            .collect())
    }

    async fn invoice(&self, tenant: &str, number: &str) -> Result<Option<String>, ProjectionError> {
        Ok(
            sqlx::query_scalar("SELECT document FROM invoices WHERE tenant = $1 AND number = $2")
                .bind(tenant)
                .bind(number)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn invoices(
        &self,
        tenant: &str,
        subscription_id: Option<&str>,
    ) -> Result<Vec<String>, ProjectionError> {
        Ok(sqlx::query_scalar(
            "SELECT document FROM invoices WHERE tenant = $1 AND ($2::text IS NULL OR subscription_id = $2)
             ORDER BY number_seq",
        )
        .bind(tenant)
        .bind(subscription_id)
        .fetch_all(&self.pool)
        .await?)
    }
}
