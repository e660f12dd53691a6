//! Applies metering facts to Postgres in one transaction per batch: raw events (deduplicated
//! by their key), the hourly and monthly upserts computed from the rows actually inserted,
//! meters, and the checkpoint. Invalid events are dead-lettered with their reason and counted.
use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use creto_domain::metering::{IngestLimits, UsageRecord};
use creto_streams::{Catalog, EventLog, StoredEvent, METERING};
use sqlx::PgPool;

use super::batch::{self, Added, LiveEffects};
use super::counters::Counters;
use super::decode::{decode, Decoded};
use super::read_model::PgReadModel;
use crate::metrics;
use crate::postgres::quote_ident;
use crate::runner::{ApplyReport, ProjectionError, Projector};
use crate::set_aside;

pub const PRODUCT: &str = "metering";

pub struct MeteringProjector {
    pool: PgPool,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    limits: IngestLimits,
    /// Schema holding the read models: `public` live, another during a rebuild.
    schema: String,
    /// Only the live projector (schema `public`) has these.
    live: Option<LiveEffects>,
    sql: Sql,
    /// When the next `usage_daily` refresh may start; `None` while one runs.
    daily_due: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

const DAILY_REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(300);
/// A refresh recomputes the view over all of `usage_hourly`, so it grows with the history
/// (6.5 million hourly rows: 5–5.5 s). The next one waits this many times as long as the last
/// took, if that is longer than `DAILY_REFRESH_EVERY`: at most 5 % of a core, whatever the size.
const DAILY_REFRESH_IDLE_FACTOR: u32 = 20;

const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('creto.projection.metering'))";

#[derive(Clone)]
struct Sql {
    checkpoint: String,
    save_checkpoint: String,
    insert_usage: String,
    insert_meter: String,
    copy_events: String,
}

impl Sql {
    fn new(schema: &str) -> Sql {
        let s = quote_ident(schema);
        Sql {
            checkpoint: format!("SELECT last_sequence FROM {s}.projection_checkpoints WHERE projector = $1 FOR UPDATE"),
            save_checkpoint: format!(
                "INSERT INTO {s}.projection_checkpoints (projector, stream, last_sequence, updated_at)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (projector) DO UPDATE SET last_sequence = EXCLUDED.last_sequence, updated_at = now()"
            ),
            // Only rows really inserted (not duplicates) feed the hourly and monthly aggregates.
            insert_usage: format!(
                "WITH input AS (
                    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                         $6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[], $10::int8[])
                        AS t(tenant, subscription_id, event_id, event_type, source, occurred_at, recorded_at, quantity, data, seq)
                 ), inserted AS (
                    INSERT INTO {s}.metering_events
                        (tenant, subscription_id, event_id, event_type, source, occurred_at, recorded_at, quantity, data, stream_sequence)
                    SELECT tenant, subscription_id, event_id, event_type, source, occurred_at, recorded_at,
                           quantity::numeric, data::jsonb, seq
                    FROM input
                    ON CONFLICT DO NOTHING
                    RETURNING tenant, subscription_id, event_type, occurred_at, quantity
                 ), hourly AS (
                    SELECT tenant, subscription_id, event_type, date_trunc('hour', occurred_at, 'UTC') AS hour,
                           count(*) AS n, sum(quantity) AS q
                    FROM inserted GROUP BY 1, 2, 3, 4
                 ), upserted AS (
                    INSERT INTO {s}.usage_hourly AS u (tenant, subscription_id, event_type, hour, event_count, quantity_sum)
                    SELECT tenant, subscription_id, event_type, hour, n, q FROM hourly
                    ON CONFLICT (tenant, subscription_id, event_type, hour) DO UPDATE
                        SET event_count = u.event_count + EXCLUDED.event_count,
                            quantity_sum = u.quantity_sum + EXCLUDED.quantity_sum
                    RETURNING 1
                 ), monthly AS (
                    INSERT INTO {s}.usage_monthly AS m (tenant, subscription_id, event_type, month, event_count, quantity_sum)
                    SELECT tenant, subscription_id, event_type, date_trunc('month', hour, 'UTC'), sum(n), sum(q)
                    FROM hourly GROUP BY 1, 2, 3, 4
                    ON CONFLICT (subscription_id, event_type, tenant, month) DO UPDATE
                        SET event_count = m.event_count + EXCLUDED.event_count,
                            quantity_sum = m.quantity_sum + EXCLUDED.quantity_sum
                    RETURNING 1
                 )
                 SELECT h.tenant, h.subscription_id, h.event_type, h.n::int8
                 FROM hourly h, (SELECT count(*) FROM upserted) AS done, (SELECT count(*) FROM monthly) AS done_monthly"
            ),
            copy_events: format!(
                "COPY {s}.metering_events (tenant, subscription_id, event_id, event_type, source, occurred_at, recorded_at, quantity, data, stream_sequence) FROM STDIN"
            ),
            insert_meter: format!(
                "INSERT INTO {s}.meters (slug, tenant, event_type, aggregation, value_property, group_by, description, defined_sequence)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant, slug) DO NOTHING"
            ),
        }
    }
}

impl MeteringProjector {
    pub fn new(
        pool: PgPool,
        log: Arc<dyn EventLog>,
        catalog: Catalog,
        limits: IngestLimits,
    ) -> Self {
        Self::in_schema(pool, log, catalog, limits, "public")
    }

    /// A projector writing to another schema (a rebuild). It counts no metrics.
    pub fn in_schema(
        pool: PgPool,
        log: Arc<dyn EventLog>,
        catalog: Catalog,
        limits: IngestLimits,
        schema: &str,
    ) -> Self {
        let stream = catalog.stream(METERING);
        MeteringProjector {
            live: (schema == "public").then(|| LiveEffects::new(&stream)),
            stream,
            pool,
            log,
            catalog,
            limits,
            schema: schema.to_string(),
            sql: Sql::new(schema),
            daily_due: Arc::new(std::sync::Mutex::new(Some(std::time::Instant::now()))),
        }
    }

    /// Keeps the usage counters current (live projector only; spawns their writer task).
    pub fn with_counters(mut self, counters: Counters) -> Self {
        let read_model = std::sync::Arc::new(PgReadModel::new(self.pool.clone()));
        self.live = self.live.map(|l| l.with_counters(counters, read_model));
        self
    }

    pub fn with_label_limit(mut self, limit: usize) -> Self {
        self.live = self.live.map(|l| l.with_label_limit(limit));
        self
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `usage_daily` is the runbook's materialized view over `usage_hourly`; the live projector
    /// refreshes it in the background, one refresh at a time, at most once per
    /// `DAILY_REFRESH_EVERY` or `DAILY_REFRESH_IDLE_FACTOR` times the last refresh's duration
    /// (the runbook refreshes it daily; queries never read it).
    fn refresh_daily_if_due(&self) {
        {
            let mut due = self.daily_due.lock().unwrap();
            if !due.is_some_and(|t| t <= std::time::Instant::now()) {
                return;
            }
            *due = None;
        }
        let pool = self.pool.clone();
        let daily_due = self.daily_due.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = sqlx::query("REFRESH MATERIALIZED VIEW CONCURRENTLY usage_daily")
                .execute(&pool)
                .await;
            let took = started.elapsed();
            *daily_due.lock().unwrap() = Some(
                std::time::Instant::now()
                    + DAILY_REFRESH_EVERY.max(took * DAILY_REFRESH_IDLE_FACTOR),
            );
            metrics::METERING_POSTGRES_QUERIES
                .with_label_values(&["refresh_usage_daily", metrics::status(r.is_ok())])
                .inc();
            metrics::METERING_AGGREGATION_SECONDS
                .with_label_values(&["usage_daily"])
                .observe(took.as_secs_f64());
        });
    }

    /// Applies `events` inside `tx`, which must hold the projection lock ([`Self::lock`]).
    /// Returns the report, the usage added per key and the reasons of invalid events.
    pub async fn apply_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        events: &[StoredEvent],
    ) -> Result<Applied, ProjectionError> {
        let Some(last) = events.last() else {
            return Ok(Default::default());
        };
        let checkpoint: Option<i64> = sqlx::query_scalar(&self.sql.checkpoint)
            .bind(PRODUCT)
            .fetch_optional(&mut **tx)
            .await?;
        let checkpoint = checkpoint.unwrap_or(0) as u64;
        if last.sequence <= checkpoint {
            return Ok((
                ApplyReport {
                    checkpoint,
                    ..Default::default()
                },
                Vec::new(),
                Vec::new(),
            ));
        }

        // A rebuild parks only what the live projector has not passed (it parked the rest).
        let parked_through = match &self.live {
            Some(_) => 0,
            None => batch::live_checkpoint(&mut **tx).await?,
        };
        let sorted = batch::sort(
            events,
            checkpoint,
            &self.catalog,
            &self.limits,
            &*self.log,
            parked_through,
        )
        .await?;
        let mut report = ApplyReport {
            checkpoint: last.sequence,
            dead_lettered: sorted.invalid.len() as u64,
            ..Default::default()
        };
        for (meter, tenant, sequence) in &sorted.meters {
            insert_meter(tx, &self.sql.insert_meter, meter, tenant, *sequence).await?;
            report.applied += 1;
        }
        let mut columns = Columns::default();
        for (r, e) in sorted.usage {
            columns.push(r, e);
        }

        let submitted = columns.id.len() as u64;
        let inserted_by_key = self.insert_usage(tx, &columns).await?;
        let inserted: u64 = inserted_by_key.iter().map(|k| k.3 as u64).sum();
        report.applied += inserted;
        report.duplicates = submitted - inserted;
        report.applied +=
            super::billing::pg::apply(tx, &self.schema, &sorted.billing, true).await?;

        sqlx::query(&self.sql.save_checkpoint)
            .bind(PRODUCT)
            .bind(&self.stream)
            .bind(last.sequence as i64)
            .execute(&mut **tx)
            .await?;
        let added = inserted_by_key
            .into_iter()
            .map(|(tenant, subscription_id, event_type, n)| Added {
                key: (tenant, subscription_id, event_type),
                events: n as u64,
            })
            // Corrected keys: their counters are re-read too.
            .chain(
                sorted
                    .billing
                    .iter()
                    .filter_map(|(f, _)| f.usage_key())
                    .map(|key| Added { key, events: 0 }),
            )
            .collect();
        Ok((report, added, sorted.invalid))
    }

    /// Inserts usage rows (duplicates skipped by their key) and adds to `usage_hourly` only
    /// the rows really inserted; returns the events inserted per key.
    async fn insert_usage(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        columns: &Columns,
    ) -> Result<Vec<(String, String, String, i64)>, sqlx::Error> {
        if columns.id.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_as(&self.sql.insert_usage)
            .bind(&columns.tenant)
            .bind(&columns.subscription)
            .bind(&columns.id)
            .bind(&columns.event_type)
            .bind(&columns.source)
            .bind(&columns.occurred)
            .bind(&columns.recorded)
            .bind(&columns.quantity)
            .bind(&columns.data)
            .bind(&columns.seq)
            .fetch_all(&mut **tx)
            .await
    }

    /// Re-applies a range of the stream, applied before or not, idempotently
    /// (`enablement replay metering --from-seq … --to-seq …`): rows already present are
    /// skipped by their key, `usage_hourly` grows only by the rows really inserted, meters keep
    /// their first definition. Unlike [`Self::apply_in`] it ignores the checkpoint and never
    /// moves it, and parks nothing (invalid events were parked when first applied; they are
    /// counted in `dead_lettered`). `checkpoint` in the report is the last sequence of `events`.
    pub async fn reapply(&self, events: &[StoredEvent]) -> Result<ApplyReport, ProjectionError> {
        let Some(last) = events.last() else {
            return Ok(ApplyReport::default());
        };
        let mut report = ApplyReport {
            checkpoint: last.sequence,
            ..Default::default()
        };
        let mut tx = self.pool.begin().await?;
        Self::lock(&mut tx).await?;
        // Unlike a live batch, nothing would apply these rows again after a crash (they lie
        // below the checkpoint) once the CLI has said they were inserted: wait for the flush.
        sqlx::query("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
        let mut columns = Columns::default();
        let mut billing = Vec::new();
        for e in events {
            match decode(e, &self.catalog, &self.limits) {
                Decoded::Usage(r) => columns.push(r, e),
                Decoded::Billing(fact) => billing.push((fact, e)),
                Decoded::MeterDefined { meter, tenant } => {
                    let done = sqlx::query(&self.sql.insert_meter)
                        .bind(&meter.slug)
                        .bind(&tenant)
                        .bind(&meter.event_type)
                        .bind(meter.aggregation.as_str())
                        .bind(meter.value_property())
                        .bind(&meter.group_by)
                        .bind(&meter.description)
                        .bind(e.sequence as i64)
                        .execute(&mut *tx)
                        .await?;
                    if done.rows_affected() > 0 {
                        report.applied += 1;
                    } else {
                        report.duplicates += 1;
                    }
                }
                Decoded::Invalid(_) => report.dead_lettered += 1,
                Decoded::Marker | Decoded::Quota => {}
            }
        }
        let submitted = columns.id.len() as u64;
        let inserted: u64 = self
            .insert_usage(&mut tx, &columns)
            .await?
            .iter()
            .map(|k| k.3 as u64)
            .sum();
        report.applied += inserted;
        report.duplicates += submitted - inserted;
        report.applied += super::billing::pg::apply(&mut tx, &self.schema, &billing, true).await?;
        tx.commit().await?;
        Ok(report)
    }

    /// The first half of the bulk load, for a thread of its own.
    pub fn bulk_decoder(&self) -> BulkDecoder {
        BulkDecoder {
            catalog: self.catalog.clone(),
            limits: self.limits,
        }
    }

    /// The second half of the bulk load, for a task of its own.
    pub fn bulk_writer(&self) -> BulkWriter {
        BulkWriter {
            pool: self.pool.clone(),
            schema: self.schema.clone(),
            stream: self.stream.clone(),
            sql: self.sql.clone(),
            log: self.log.clone(),
            catalog: self.catalog.clone(),
        }
    }

    /// Takes the projection lock for the rest of `tx`: batches of the live projector and a
    /// rebuild's switch-over never interleave.
    pub async fn lock(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), ProjectionError> {
        sqlx::query(LOCK).execute(&mut **tx).await?;
        // The read model is a projection: if PostgreSQL crashes, a batch committed without
        // waiting for its WAL flush is lost whole, checkpoint included, and is re-applied from
        // the log. Atomicity is kept; only the wait for the flush goes.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// A batch decoded by [`BulkDecoder::prepare`], ready for [`BulkWriter::write_bulk`].
pub struct BulkBatch {
    /// Events read from the log for this batch, whatever became of them.
    pub events: u64,
    report: ApplyReport,
    /// COPY text rows of the new (not duplicate) usage events.
    rows: String,
    meters: Vec<(creto_domain::metering::Meter, String, u64)>,
    billing: Vec<(super::billing::BillingFact, StoredEvent)>,
    /// Invalid events, parked by the writer when the live projector has not passed them.
    invalid: Vec<(StoredEvent, creto_domain::metering::Invalid)>,
}

/// The idempotency key of a usage event as one string (one allocation per event). The tenant
/// is length-prefixed and a subscription id never holds the separator, so two different keys
/// never give the same string.
pub fn seen_key(tenant: &str, subscription_id: &str, id: &str) -> String {
    format!("{}:{tenant}\u{1f}{subscription_id}\u{1f}{id}", tenant.len())
}

/// Decodes batches for [`BulkWriter`].
#[derive(Clone)]
pub struct BulkDecoder {
    catalog: Catalog,
    limits: IngestLimits,
}

/// The idempotency keys a bulk load has seen ([`seen_key`]).
pub type SeenKeys = HashSet<String, foldhash::fast::RandomState>;

impl BulkDecoder {
    /// The rebuild's fast path into a side schema whose `metering_events` has no keys yet,
    /// first half: decodes `events` and drops duplicates here, in log order (the first
    /// occurrence wins, as live), into COPY rows. `usage_hourly` and the keys are built once at
    /// the end (`rebuild::switch_over`). `seen` holds the keys loaded so far. Pure CPU work, so
    /// a rebuild prepares the next batch while [`BulkWriter::write_bulk`] streams this one.
    pub fn prepare(&self, events: &[StoredEvent], seen: &mut SeenKeys) -> BulkBatch {
        let mut batch = BulkBatch {
            events: events.len() as u64,
            report: ApplyReport {
                checkpoint: events.last().map_or(0, |e| e.sequence),
                ..Default::default()
            },
            rows: String::with_capacity(events.len() * 256),
            meters: Vec::new(),
            billing: Vec::new(),
            invalid: Vec::new(),
        };
        for e in events {
            match decode(e, &self.catalog, &self.limits) {
                Decoded::Usage(r) => {
                    if !seen.insert(seen_key(&r.tenant, &r.subscription_id, &r.id)) {
                        batch.report.duplicates += 1;
                        continue;
                    }
                    copy_row(&mut batch.rows, r, e);
                    batch.report.applied += 1;
                }
                Decoded::MeterDefined { meter, tenant } => {
                    batch.meters.push((meter, tenant, e.sequence))
                }
                Decoded::Billing(fact) => batch.billing.push((fact, e.clone())),
                Decoded::Invalid(invalid) => {
                    batch.report.dead_lettered += 1;
                    batch.invalid.push((e.clone(), invalid));
                }
                Decoded::Marker | Decoded::Quota => {}
            }
        }
        batch
    }
}

/// Streams batches prepared by [`BulkDecoder::prepare`] into the side schema.
#[derive(Clone)]
pub struct BulkWriter {
    pool: PgPool,
    schema: String,
    stream: String,
    sql: Sql,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
}

impl BulkWriter {
    /// Second half of the bulk load: one transaction streams the rows with COPY and moves the
    /// side schema's checkpoint with them.
    pub async fn write_bulk(&self, batch: BulkBatch) -> Result<ApplyReport, ProjectionError> {
        let mut report = batch.report;
        if report.checkpoint == 0 {
            return Ok(report);
        }
        let mut tx = self.pool.begin().await?;
        // Invalid events the live projector has not passed (it is stopped or behind, and the
        // switch-over will move its checkpoint past them) are parked here, as it would have.
        if !batch.invalid.is_empty() {
            let live = batch::live_checkpoint(&mut *tx).await?;
            for (e, invalid) in batch.invalid.iter().filter(|(e, _)| e.sequence > live) {
                batch::park(&*self.log, &self.catalog, e, invalid).await?;
            }
        }
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let mut sink = tx.copy_in_raw(&self.sql.copy_events).await?;
        sink.send(batch.rows.into_bytes()).await?;
        sink.finish().await?;
        for (meter, tenant, sequence) in batch.meters {
            insert_meter(&mut tx, &self.sql.insert_meter, &meter, &tenant, sequence).await?;
            report.applied += 1;
        }
        let billing: Vec<_> = batch.billing.iter().map(|(f, e)| (f.clone(), e)).collect();
        // usage_hourly is computed once at the end of a bulk load, corrections included.
        report.applied += super::billing::pg::apply(&mut tx, &self.schema, &billing, false).await?;
        sqlx::query(&self.sql.save_checkpoint)
            .bind(PRODUCT)
            .bind(&self.stream)
            .bind(report.checkpoint as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(report)
    }
}

/// Records a meter definition; the first definition of a slug wins, as in the log.
async fn insert_meter(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sql: &str,
    meter: &creto_domain::metering::Meter,
    tenant: &str,
    sequence: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(sql)
        .bind(&meter.slug)
        .bind(tenant)
        .bind(&meter.event_type)
        .bind(meter.aggregation.as_str())
        .bind(meter.value_property())
        .bind(&meter.group_by)
        .bind(&meter.description)
        .bind(sequence as i64)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What [`MeteringProjector::apply_in`] did: the report, the usage added per key, and the
/// reasons of the invalid events it parked.
pub type Applied = (ApplyReport, Vec<Added>, Vec<&'static str>);

/// Shortest decimal that round-trips the f64 (Rust's `Display` never uses an exponent),
/// stored as `numeric`: sums are exact from here on.
fn quantity_text(q: f64) -> String {
    q.to_string()
}

/// Appends one row in COPY text format.
fn copy_row(out: &mut String, r: UsageRecord, e: &StoredEvent) {
    use std::fmt::Write;
    let data = serde_json::Value::Object(r.dimensions).to_string();
    for field in [
        &r.tenant,
        &r.subscription_id,
        &r.id,
        &r.event_type,
        &r.source,
    ] {
        copy_text(out, field);
        out.push('\t');
    }
    let _ = write!(
        out,
        "{}\t{}\t{}\t",
        micros(r.time),
        micros(e.recorded_at),
        quantity_text(r.quantity)
    );
    copy_text(out, &data);
    let _ = writeln!(out, "\t{}", e.sequence);
}

/// PostgreSQL keeps microseconds; the binary bind of the live path truncates to them, so the
/// text form must truncate too (PostgreSQL would round more digits).
fn micros(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// COPY text escaping: backslash, tab, newline and carriage return.
fn copy_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[derive(Default)]
struct Columns {
    tenant: Vec<String>,
    subscription: Vec<String>,
    id: Vec<String>,
    event_type: Vec<String>,
    source: Vec<String>,
    occurred: Vec<DateTime<Utc>>,
    recorded: Vec<DateTime<Utc>>,
    quantity: Vec<String>,
    data: Vec<String>,
    seq: Vec<i64>,
}

impl Columns {
    fn push(&mut self, r: UsageRecord, e: &StoredEvent) {
        self.tenant.push(r.tenant);
        self.subscription.push(r.subscription_id);
        self.id.push(r.id);
        self.event_type.push(r.event_type);
        self.source.push(r.source);
        self.occurred.push(r.time);
        self.recorded.push(e.recorded_at);
        self.quantity.push(quantity_text(r.quantity));
        self.data
            .push(serde_json::Value::Object(r.dimensions).to_string());
        self.seq.push(e.sequence as i64);
    }
}

#[async_trait]
impl Projector for MeteringProjector {
    fn product(&self) -> &'static str {
        PRODUCT
    }

    fn stream(&self) -> &str {
        &self.stream
    }

    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        let at: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT last_sequence FROM {}.projection_checkpoints WHERE projector = $1",
            quote_ident(&self.schema)
        ))
        .bind(PRODUCT)
        .fetch_optional(&self.pool)
        .await?;
        Ok(at.unwrap_or(0) as u64)
    }

    async fn on_activate(&self) -> Result<(), ProjectionError> {
        if let Some(live) = &self.live {
            let read_model = PgReadModel::new(self.pool.clone());
            live.activate(&read_model, self.checkpoint().await?).await;
        }
        Ok(())
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<ApplyReport, ProjectionError> {
        let started = std::time::Instant::now();
        let Some(last) = events.last() else {
            return Ok(ApplyReport::default());
        };
        let mut tx = self.pool.begin().await?;
        Self::lock(&mut tx).await?;
        let (report, added, invalid) = self.apply_in(&mut tx, events).await?;
        let committed = tx.commit().await;
        if let Some(live) = &self.live {
            metrics::METERING_POSTGRES_QUERIES
                .with_label_values(&["projection_batch", metrics::status(committed.is_ok())])
                .inc();
            committed?;
            live.committed(added, &invalid, last.sequence, started);
            self.refresh_daily_if_due();
        } else {
            committed?;
        }
        Ok(report)
    }

    async fn set_aside(&self, event: &StoredEvent, detail: &str) -> Result<bool, ProjectionError> {
        if let Some(live) = &self.live {
            let subject = self.catalog.deadletter_subject(METERING);
            set_aside::park(&*self.log, &subject, &self.stream, event, detail).await?;
            live.skipped(event.sequence);
        }
        set_aside::skip(
            &self.pool,
            LOCK,
            &self.schema,
            PRODUCT,
            &self.stream,
            event.sequence,
        )
        .await?;
        Ok(true)
    }
}
