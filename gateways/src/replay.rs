//! `enablement replay metering --from-seq N | --from-time T [--to-seq M | --to-time T]`:
//! re-applies a range of the stream to the live read models, idempotently
//! ([`MeteringProjector::reapply`]): rows already there are skipped by their key, only rows
//! really inserted feed `usage_hourly`, and the checkpoint never moves.
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use creto_projections::metering::MeteringProjector;
use creto_projections::{ProjectionError, Projector};
use creto_streams::{EventLog, ReplayFrom, StoredEvent};
use futures::StreamExt;
use serde::Serialize;

/// A range of a stream, by sequence or by the time the log recorded the events.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeArgs {
    /// First sequence of the range.
    #[arg(long, conflicts_with = "from_time")]
    pub from_seq: Option<u64>,
    /// First recorded time of the range (RFC 3339).
    #[arg(long)]
    pub from_time: Option<DateTime<Utc>>,
    /// Last sequence of the range (inclusive).
    #[arg(long, conflicts_with = "to_time")]
    pub to_seq: Option<u64>,
    /// Last recorded time of the range (inclusive, RFC 3339).
    #[arg(long)]
    pub to_time: Option<DateTime<Utc>>,
}

impl RangeArgs {
    pub fn is_set(&self) -> bool {
        *self != RangeArgs::default()
    }

    pub fn from(&self) -> ReplayFrom {
        match (self.from_seq, self.from_time) {
            (Some(s), _) => ReplayFrom::Sequence(s.max(1)),
            (None, Some(t)) => ReplayFrom::Time(t),
            (None, None) => ReplayFrom::Start,
        }
    }

    /// Whether `e` is past the end of the range (the stream is read in order).
    pub fn past_end(&self, e: &StoredEvent) -> bool {
        self.to_seq.is_some_and(|s| e.sequence > s)
            || self.to_time.is_some_and(|t| e.recorded_at > t)
    }

    /// Opens the range on `stream`, and the sequence it ends at at the latest (for progress).
    pub async fn open(
        &self,
        log: &dyn EventLog,
        stream: &str,
    ) -> Result<
        (
            futures::stream::BoxStream<'static, Result<StoredEvent, creto_streams::LogError>>,
            u64,
        ),
        creto_streams::LogError,
    > {
        let last = log.stream_state(stream).await?.last_sequence;
        let to = self.to_seq.map_or(last, |s| s.min(last));
        let events = log.replay(stream, self.from(), Some(to), None).await?;
        Ok((events, to))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RangeProgress {
    pub at: u64,
    pub target: u64,
    pub events: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RangeReport {
    pub product: &'static str,
    /// First and last sequence re-applied (0 when the range was empty).
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// Events read in the range.
    pub events: u64,
    /// Rows inserted (missing before).
    pub inserted: u64,
    /// Rows already present (skipped).
    pub duplicates: u64,
    /// Invalid events in the range (already parked in the dead letters when first applied).
    pub invalid: u64,
    /// The live checkpoint before and after: unchanged by a re-apply.
    pub checkpoint: u64,
    pub elapsed_ms: u64,
    pub events_per_second: f64,
}

/// Re-applies `range` of the metering stream through `projector` (the live one), `batch`
/// events per transaction.
pub async fn reapply_metering(
    log: &Arc<dyn EventLog>,
    projector: &MeteringProjector,
    range: &RangeArgs,
    batch: usize,
    mut progress: impl FnMut(RangeProgress),
) -> Result<RangeReport, ProjectionError> {
    let started = Instant::now();
    let checkpoint = projector.checkpoint().await?;
    let (mut events, target) = range.open(&**log, projector.stream()).await?;
    let mut report = RangeReport {
        product: "metering",
        checkpoint,
        ..Default::default()
    };
    let mut buffer: Vec<StoredEvent> = Vec::with_capacity(batch);
    loop {
        let next = match events.next().await {
            Some(e) => Some(e?),
            None => None,
        };
        let next = next.filter(|e| !range.past_end(e));
        let end = next.is_none();
        if let Some(e) = next {
            if report.first_sequence == 0 {
                report.first_sequence = e.sequence;
            }
            buffer.push(e);
        }
        if buffer.len() >= batch.max(1) || (end && !buffer.is_empty()) {
            let r = projector.reapply(&buffer).await?;
            report.events += buffer.len() as u64;
            report.inserted += r.applied;
            report.duplicates += r.duplicates;
            report.invalid += r.dead_lettered;
            report.last_sequence = r.checkpoint;
            buffer.clear();
            progress(RangeProgress {
                at: report.last_sequence,
                target,
                events: report.events,
            });
        }
        if end {
            break;
        }
    }
    report.checkpoint = projector.checkpoint().await?.max(checkpoint);
    let elapsed = started.elapsed();
    report.elapsed_ms = elapsed.as_millis() as u64;
    report.events_per_second = (report.events as f64 / elapsed.as_secs_f64().max(1e-9)).round();
    Ok(report)
}

/// The CLI: progress bar (events/s, ETA), then the report; the Redis counters are resynced
/// from the read model afterwards (they are a projection of it).
pub async fn run_metering(
    log: Arc<dyn EventLog>,
    pool: sqlx::PgPool,
    redis: redis::aio::ConnectionManager,
    settings: &crate::config::Settings,
    range: &RangeArgs,
    batch: usize,
    json: bool,
) -> Result<RangeReport, ProjectionError> {
    let projector = MeteringProjector::new(
        pool.clone(),
        log.clone(),
        settings.catalog(),
        settings.limits,
    );
    let bar = crate::cli::progress_bar(
        json,
        "{spinner} metering re-apply [{bar:40}] {pos}/{len} seq  {msg}  ETA {eta}",
    );
    let started = Instant::now();
    let mut base: Option<u64> = None;
    let report = reapply_metering(&log, &projector, range, batch, |p| {
        // The bar runs over sequences of the range.
        let first = *base.get_or_insert(p.at.saturating_sub(p.events));
        bar.set_length(p.target.saturating_sub(first));
        bar.set_position(p.at.saturating_sub(first));
        bar.set_message(format!(
            "{:.0} events/s",
            p.events as f64 / started.elapsed().as_secs_f64().max(1e-9)
        ));
    })
    .await?;
    bar.finish_and_clear();
    if report.inserted > 0 {
        creto_projections::metering::counters::Counters::new(
            Arc::new(creto_projections::cache::RedisCache::new(vec![redis])),
            &settings.redis_prefix(),
        )
        .resync(&creto_projections::metering::PgReadModel::new(pool), None)
        .await;
    }
    Ok(report)
}

impl RangeReport {
    pub fn render(&self) -> String {
        format!(
            "metering re-applied sequences {}..={}: {} events in {:.1} s ({} events/s): {} rows inserted, {} already present, {} invalid (parked when first applied); live checkpoint {} (not moved by a re-apply)",
            self.first_sequence,
            self.last_sequence,
            self.events,
            self.elapsed_ms as f64 / 1000.0,
            self.events_per_second,
            self.inserted,
            self.duplicates,
            self.invalid,
            self.checkpoint
        )
    }
}
