//! Blue/green rebuild of a product's read models from its stream.
//!
//! The new tables are built in a side schema from the same DDL as the live ones while readers
//! keep using the old tables. At the end, one transaction holding the projection lock catches
//! up to the live checkpoint and swaps the tables: readers see the old or the new model, never
//! a mix. An interrupted rebuild resumes from the side schema's own checkpoint.
use std::sync::Arc;
use std::time::{Duration, Instant};

use creto_streams::{EventLog, ReplayFrom, StoredEvent};
use futures::StreamExt;
use sqlx::{Executor, PgPool};

use crate::metering::projector::{seen_key, BulkBatch, SeenKeys};
use crate::metering::MeteringProjector;
use crate::postgres::{
    quote_ident, BILLING_DDL, CHECKPOINT_DDL, METERING_DDL, METERING_KEYS_DDL, USAGE_MONTHLY_DDL,
};
use crate::runner::{ProjectionError, Projector};

/// Tables and views of the metering read model, moved together at the switch.
pub const METERING_RELATIONS: &[(&str, &str)] = &[
    ("TABLE", "metering_events"),
    ("TABLE", "usage_hourly"),
    ("TABLE", "usage_monthly"),
    ("MATERIALIZED VIEW", "usage_daily"),
    ("TABLE", "meters"),
    ("TABLE", "metering_corrections"),
    ("TABLE", "metering_event_corrections"),
    ("TABLE", "plans"),
    ("TABLE", "plan_assignments"),
    ("TABLE", "invoices"),
];

pub const REBUILD_SCHEMA: &str = "metering_rebuild";

const RETIRED_SCHEMA: &str = "metering_retired";

/// `(table, primary key)` dropped in the side schema for the load and built in the finishing
/// phase, with the columns in [`primary_key`].
const KEYS_BUILT_AT_THE_END: [(&str, &str); 2] = [
    ("metering_events", "metering_events_pkey"),
    ("usage_hourly", "usage_hourly_pkey"),
];

/// The key columns as migration 0009 orders them (the subscription first: it says why).
fn primary_key(table: &str) -> &'static str {
    match table {
        "metering_events" => "subscription_id, event_id, tenant",
        _ => "subscription_id, event_type, tenant, hour",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub applied_to: u64,
    pub target: u64,
    pub events: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub events: u64,
    pub checkpoint: u64,
    pub resumed_from: u64,
    pub switched: bool,
    pub elapsed_ms: u128,
}

/// The one metering rebuild allowed at a time: a connection holding a session lock, released
/// when it is dropped (or its process dies). Two rebuilds share the side schema: one
/// `--restart` would drop the other's tables, and two loads would each copy the same rows.
/// None when another rebuild holds it.
pub async fn only_rebuild(pool: &PgPool) -> Result<Option<sqlx::PgConnection>, ProjectionError> {
    // Out of the pool: a pooled connection given back would keep the lock for its next user.
    let mut conn = pool.acquire().await?.detach();
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('creto.rebuild.metering'))")
            .fetch_one(&mut conn)
            .await?;
    Ok(locked.then_some(conn))
}

/// Prepares (or resumes) the side schema and returns the rebuild projector.
pub async fn prepare_metering(
    pool: &PgPool,
    log: Arc<dyn EventLog>,
    catalog: creto_streams::Catalog,
    limits: creto_domain::metering::IngestLimits,
    restart: bool,
) -> Result<MeteringProjector, ProjectionError> {
    let schema = quote_ident(REBUILD_SCHEMA);
    if restart {
        pool.execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
            .await?;
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(REBUILD_SCHEMA)
            .fetch_one(pool)
            .await?;
    if !exists {
        let mut tx = pool.begin().await?;
        tx.execute(format!("CREATE SCHEMA {schema}").as_str())
            .await?;
        tx.execute(format!("SET LOCAL search_path TO {schema}").as_str())
            .await?;
        tx.execute(CHECKPOINT_DDL).await?;
        tx.execute(METERING_DDL).await?;
        tx.execute(BILLING_DDL).await?;
        tx.execute(METERING_KEYS_DDL).await?;
        tx.execute(USAGE_MONTHLY_DDL).await?;
        // Load without keys or indexes (the loader deduplicates): building them once at the
        // end is several times faster than maintaining them row by row.
        for (table, key) in KEYS_BUILT_AT_THE_END {
            tx.execute(format!("ALTER TABLE {schema}.{table} DROP CONSTRAINT {key}").as_str())
                .await?;
        }
        for (name, _) in secondary_indexes() {
            tx.execute(format!("DROP INDEX {schema}.{}", quote_ident(&name)).as_str())
                .await?;
        }
        tx.commit().await?;
    } else if !relation_exists(pool, "invoices").await? {
        // Resuming a rebuild begun before the billing tables existed.
        run_in_side_schema(pool, BILLING_DDL).await?;
    }
    if !byte_order_keys(pool).await? {
        // Resuming a rebuild begun before the keys compared byte-wise: the side tables are
        // switched in as the live ones, so they get the live collation first.
        run_in_side_schema(pool, METERING_KEYS_DDL).await?;
    }
    if !relation_exists(pool, "usage_monthly").await? {
        // Resuming a rebuild begun before migration 0010: filled from the side usage_hourly.
        run_in_side_schema(pool, USAGE_MONTHLY_DDL).await?;
    }
    Ok(MeteringProjector::in_schema(
        pool.clone(),
        log,
        catalog,
        limits,
        REBUILD_SCHEMA,
    ))
}

/// Replays the stream into the side schema up to `to` (default: the stream's end now).
pub async fn catch_up(
    log: &Arc<dyn EventLog>,
    projector: &MeteringProjector,
    to: Option<u64>,
    batch: usize,
    mut progress: impl FnMut(Progress),
) -> Result<u64, ProjectionError> {
    let started = Instant::now();
    let target = match to {
        Some(t) => t,
        None => log.stream_state(projector.stream()).await?.last_sequence,
    };
    let from = projector.checkpoint().await?;
    if from >= target {
        return Ok(0);
    }
    let mut events = log
        .replay(
            projector.stream(),
            ReplayFrom::Sequence(from + 1),
            Some(target),
            None,
        )
        .await?;
    let built = finished_building(projector.pool()).await?;
    if built {
        return apply_in_batches(events, projector, batch, |report, applied| {
            progress(Progress {
                applied_to: report.checkpoint,
                target,
                events: applied,
                elapsed: started.elapsed(),
            })
        })
        .await;
    }
    // Keys already loaded (non-empty when resuming an interrupted rebuild).
    let seen: SeenKeys = sqlx::query_as::<_, (String, String, String)>(&format!(
        "SELECT tenant, subscription_id, event_id FROM {}.metering_events",
        quote_ident(projector.schema())
    ))
    .fetch_all(projector.pool())
    .await?
    .into_iter()
    .map(|(t, s, i)| seen_key(&t, &s, &i))
    .collect();
    // Three stages, each on its own core when one is free: this task reads the log, a
    // blocking thread decodes and deduplicates (in log order: the first occurrence wins, as
    // live), a writer task streams COPYs. Batches are written one at a time, in order, so the
    // side schema's checkpoint never passes a gap.
    let (to_decoder, mut read) = tokio::sync::mpsc::channel::<Vec<StoredEvent>>(2);
    let (to_writer, mut decoded) = tokio::sync::mpsc::channel::<BulkBatch>(2);
    let (reports, mut written) = tokio::sync::mpsc::unbounded_channel();
    let decoder = {
        let decoder = projector.bulk_decoder();
        let mut seen = seen;
        tokio::task::spawn_blocking(move || {
            while let Some(events) = read.blocking_recv() {
                if to_writer
                    .blocking_send(decoder.prepare(&events, &mut seen))
                    .is_err()
                {
                    return; // the writer failed: its error is returned below
                }
            }
        })
    };
    let writer = {
        let writer = projector.bulk_writer();
        tokio::spawn(async move {
            while let Some(b) = decoded.recv().await {
                let events = b.events;
                let report = writer.write_bulk(b).await?;
                let _ = reports.send((report, events));
            }
            Ok::<_, ProjectionError>(())
        })
    };
    let mut applied = 0u64;
    let mut report_progress = |written: &mut tokio::sync::mpsc::UnboundedReceiver<_>| {
        while let Ok((report, n)) = written.try_recv() {
            let report: crate::runner::ApplyReport = report;
            applied += n;
            progress(Progress {
                applied_to: report.checkpoint,
                target,
                events: applied,
                elapsed: started.elapsed(),
            });
        }
    };
    let mut buffer: Vec<StoredEvent> = Vec::with_capacity(batch);
    let mut read_all = false;
    while !read_all {
        match events.next().await {
            Some(e) => buffer.push(e?),
            None => read_all = true,
        }
        if buffer.len() >= batch || (read_all && !buffer.is_empty()) {
            let full = std::mem::replace(&mut buffer, Vec::with_capacity(batch));
            if to_decoder.send(full).await.is_err() {
                break; // a later stage stopped: its error is returned below
            }
            report_progress(&mut written);
        }
    }
    drop(to_decoder);
    let finished = writer.await;
    decoder
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    finished.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    report_progress(&mut written);
    Ok(applied)
}

/// Applies `events` through the live path in batches (a rebuild resumed after its finishing
/// phase: the keys and `usage_hourly` exist and are kept current row by row).
async fn apply_in_batches(
    mut events: futures::stream::BoxStream<'static, Result<StoredEvent, creto_streams::LogError>>,
    projector: &MeteringProjector,
    batch: usize,
    mut progress: impl FnMut(&crate::runner::ApplyReport, u64),
) -> Result<u64, ProjectionError> {
    let mut buffer: Vec<StoredEvent> = Vec::with_capacity(batch);
    let mut applied = 0u64;
    loop {
        let next = events.next().await;
        let end = next.is_none();
        if let Some(e) = next {
            buffer.push(e?);
        }
        if buffer.len() >= batch || (end && !buffer.is_empty()) {
            let report = crate::runner::apply_setting_aside(projector, &buffer).await?;
            applied += buffer.len() as u64;
            buffer.clear();
            progress(&report, applied);
        }
        if end {
            return Ok(applied);
        }
    }
}

/// Catches up to the live checkpoint under the lock and swaps the side schema's tables in.
/// `(name, CREATE statement)` of every index the metering DDL creates with CREATE INDEX.
fn secondary_indexes() -> Vec<(String, String)> {
    METERING_DDL
        .split(';')
        .map(|stmt| {
            stmt.lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter_map(|stmt| {
            let stmt = stmt.trim().to_string();
            let rest = stmt
                .strip_prefix("CREATE INDEX ")
                .or_else(|| stmt.strip_prefix("CREATE UNIQUE INDEX "))?;
            let name = rest.split_whitespace().next()?.to_string();
            Some((name, stmt))
        })
        .collect()
}

/// Row of the side schema's checkpoint table that says the finishing phase is done: from then
/// on `usage_hourly` is maintained row by row, so a resumed rebuild applies events through the
/// live path instead of the bulk one.
const BUILT_MARKER: &str = "metering.rebuild_built";

async fn finished_building(pool: &PgPool) -> Result<bool, ProjectionError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {}.projection_checkpoints WHERE projector = $1)",
        quote_ident(REBUILD_SCHEMA)
    ))
    .bind(BUILT_MARKER)
    .fetch_one(pool)
    .await?)
}

async fn byte_order_keys(pool: &PgPool) -> Result<bool, ProjectionError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1
           AND table_name = 'metering_events' AND column_name = 'event_id' AND collation_name = 'C')",
    )
    .bind(REBUILD_SCHEMA)
    .fetch_one(pool)
    .await?)
}

async fn relation_exists(pool: &PgPool, name: &str) -> Result<bool, ProjectionError> {
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{REBUILD_SCHEMA}.{name}"))
        .fetch_one(pool)
        .await?)
}

/// Memory for the finishing phase's sorts and aggregation, per statement. The defaults (64 MB
/// and 4 MB) spill a million-row index build or GROUP BY to temporary files; a rebuild is an
/// operator's batch job and these are set for its own transactions only.
const FINISHING_MEMORY: &str =
    "SET LOCAL maintenance_work_mem = '256MB'; SET LOCAL work_mem = '256MB'";

/// Runs `statements` in one transaction with the side schema first on the search path.
async fn run_in_side_schema(pool: &PgPool, statements: &str) -> Result<(), ProjectionError> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    tx.execute(format!("SET LOCAL search_path TO {}", quote_ident(REBUILD_SCHEMA)).as_str())
        .await?;
    tx.execute(FINISHING_MEMORY).await?;
    tx.execute(statements).await?;
    tx.commit().await?;
    // Where a rebuild's finishing phase spends its time, statement by statement.
    tracing::info!(
        statement = statements.trim(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "rebuild: finishing statement done"
    );
    Ok(())
}

/// Builds `table`'s primary key (unless it exists) as a unique index, then makes it the key.
async fn build_key(pool: &PgPool, table: &str, key: &str) -> Result<(), ProjectionError> {
    let columns = primary_key(table);
    // A rebuild resumed from before migration 0009 may have built the key in the old order.
    let built: Option<String> = sqlx::query_scalar("SELECT pg_get_indexdef(to_regclass($1))")
        .bind(format!("{REBUILD_SCHEMA}.{key}"))
        .fetch_one(pool)
        .await?;
    if built.is_some_and(|def| !def.ends_with(&format!("({columns})"))) {
        run_in_side_schema(
            pool,
            &format!(
                "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {key}; DROP INDEX IF EXISTS {key}"
            ),
        )
        .await?;
    }
    if !relation_exists(pool, key).await? {
        run_in_side_schema(
            pool,
            &format!("CREATE UNIQUE INDEX {key} ON {table} ({columns})"),
        )
        .await?;
    }
    let is_constraint: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = $1 AND connamespace = $2::regnamespace)",
    )
    .bind(key)
    .bind(REBUILD_SCHEMA)
    .fetch_one(pool)
    .await?;
    if !is_constraint {
        run_in_side_schema(
            pool,
            &format!("ALTER TABLE {table} ADD CONSTRAINT {key} PRIMARY KEY USING INDEX {key}"),
        )
        .await?;
    }
    Ok(())
}

/// Builds the indexes of `indexes` that do not exist yet, one after the other.
async fn build_missing(pool: &PgPool, indexes: &[(String, String)]) -> Result<(), ProjectionError> {
    for (name, create) in indexes {
        if !relation_exists(pool, name).await? {
            run_in_side_schema(pool, create).await?;
        }
    }
    Ok(())
}

/// Finishes a bulk load: the primary key, `usage_hourly` and the secondary indexes. They only
/// read `metering_events` (CREATE INDEX takes a SHARE lock, which does not block another
/// reader or index build), so three connections do them at once; each key is built as a
/// unique index, then made the primary key. Indexes already built are kept (COPY kept them
/// current), and `usage_hourly` is recomputed whole unless the phase had finished, so this
/// resumes too.
pub async fn build_indexes(pool: &PgPool) -> Result<(), ProjectionError> {
    if finished_building(pool).await? {
        return Ok(());
    }
    let schema = quote_ident(REBUILD_SCHEMA);
    let (on_events, on_hourly): (Vec<_>, Vec<_>) = secondary_indexes()
        .into_iter()
        .partition(|(_, create)| create.contains(" ON metering_events "));
    let key = build_key(pool, "metering_events", "metering_events_pkey");
    let hourly = async {
        // From the events as corrected (voids and amends), as the live projector keeps it;
        // straight from the events when nothing was corrected, which spares a join per row.
        // The hour is the UTC hour: date_bin from a UTC midnight gives the same value as
        // date_trunc('hour', …, 'UTC') without a time-zone conversion per row (in psql, this
        // GROUP BY over a million events took 0.75 s instead of 1.1–1.4 s).
        let corrected: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.metering_event_corrections)"
        ))
        .fetch_one(pool)
        .await?;
        let events = if corrected {
            crate::metering::billing::pg::effective_events(None)
        } else {
            "metering_events".to_string()
        };
        run_in_side_schema(
            pool,
            &format!("TRUNCATE usage_hourly;
             INSERT INTO usage_hourly (tenant, subscription_id, event_type, hour, event_count, quantity_sum)
             SELECT tenant, subscription_id, event_type, date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'), count(*), sum(quantity)
             FROM {events} AS metering_events GROUP BY 1, 2, 3, 4;
             TRUNCATE usage_monthly;
             INSERT INTO usage_monthly (tenant, subscription_id, event_type, month, event_count, quantity_sum)
             SELECT tenant, subscription_id, event_type, date_trunc('month', hour, 'UTC'), sum(event_count), sum(quantity_sum)
             FROM usage_hourly GROUP BY 1, 2, 3, 4"),
        )
        .await?;
        build_key(pool, "usage_hourly", "usage_hourly_pkey").await?;
        build_missing(pool, &on_hourly).await
    };
    tokio::try_join!(key, build_missing(pool, &on_events), hourly)?;
    sqlx::query(&format!(
        "INSERT INTO {schema}.projection_checkpoints (projector, stream, last_sequence) VALUES ($1, '', 0)"
    ))
    .bind(BUILT_MARKER)
    .execute(pool)
    .await?;
    Ok(())
}

/// How far behind the live projector a rebuild may be when it takes the lock to switch, and
/// the batch it closes the distance with.
const SWITCH_TAIL: u64 = 5_000;
const SWITCH_BATCH: usize = 1_000;
const SWITCH_PASSES: usize = 10;

/// Builds the indexes, then catches up to the live checkpoint under the lock and swaps the
/// side schema's tables in.
pub async fn switch_over(
    pool: &PgPool,
    log: &Arc<dyn EventLog>,
    projector: &MeteringProjector,
) -> Result<u64, ProjectionError> {
    build_indexes(pool).await?;
    // The live projector went on while the rebuild loaded and built: most of that distance is
    // closed here, in batches of their own, without its lock (it keeps projecting). What is
    // left is applied under the lock, where the live projector waits.
    // A bounded number of passes: ingestion faster than the rebuild applies would keep the
    // distance open for ever; what is left then is applied under the lock all the same.
    for _ in 0..SWITCH_PASSES {
        let live = crate::metering::batch::live_checkpoint(pool).await?;
        let at = projector.checkpoint().await?;
        if live <= at + SWITCH_TAIL {
            break;
        }
        catch_up(log, projector, Some(live), SWITCH_BATCH, |_| {}).await?;
    }
    let mut tx = pool.begin().await?;
    MeteringProjector::lock(&mut tx).await?;
    let live = crate::metering::batch::live_checkpoint(&mut *tx).await?;
    let mut at = projector.checkpoint().await?;
    if at < live {
        let mut tail = log
            .replay(
                projector.stream(),
                ReplayFrom::Sequence(at + 1),
                Some(live),
                None,
            )
            .await?;
        let mut buffer = Vec::with_capacity(SWITCH_BATCH);
        loop {
            let next = tail.next().await;
            let end = next.is_none();
            if let Some(e) = next {
                buffer.push(e?);
            }
            if buffer.len() >= SWITCH_BATCH || (end && !buffer.is_empty()) {
                at = projector
                    .apply_in(&mut tx, &buffer)
                    .await?
                    .0
                    .checkpoint
                    .max(at);
                buffer.clear();
            }
            if end {
                break;
            }
        }
    }
    let rebuild = quote_ident(REBUILD_SCHEMA);
    let retired = quote_ident(RETIRED_SCHEMA);
    tx.execute(format!("REFRESH MATERIALIZED VIEW {rebuild}.usage_daily").as_str())
        .await?;
    tx.execute(
        format!("DROP SCHEMA IF EXISTS {retired} CASCADE; CREATE SCHEMA {retired}").as_str(),
    )
    .await?;
    for (kind, name) in METERING_RELATIONS {
        tx.execute(format!("ALTER {kind} public.{name} SET SCHEMA {retired}").as_str())
            .await?;
        tx.execute(format!("ALTER {kind} {rebuild}.{name} SET SCHEMA public").as_str())
            .await?;
    }
    sqlx::query(
        "INSERT INTO public.projection_checkpoints (projector, stream, last_sequence, updated_at) VALUES ($1, $2, $3, now())
         ON CONFLICT (projector) DO UPDATE SET last_sequence = EXCLUDED.last_sequence, updated_at = now()",
    )
    .bind(projector.product())
    .bind(projector.stream())
    .bind(at as i64)
    .execute(&mut *tx)
    .await?;
    tx.execute(format!("DROP SCHEMA {rebuild} CASCADE; DROP SCHEMA {retired} CASCADE").as_str())
        .await?;
    tx.commit().await?;
    Ok(at)
}
