//! The projector runtime: fetch a batch → apply it (rows and checkpoint in one transaction)
//! → ack. One active instance per projector (a Postgres advisory lock, or the embedded
//! store's directory lock); others wait as standbys. A batch that fails for a passing reason
//! (database down) is retried, never acked. An event the database refuses for what it holds
//! is found by halving the batch and set aside in the dead letters, so one bad event never
//! stops the projection of every other one.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use creto_streams::{AckMode, ConsumerSpec, EventLog, ReplayFrom, StoredEvent};
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("log error: {0}")]
    Log(#[from] creto_streams::LogError),
    #[error("embedded store error: {0}")]
    Embedded(String),
    #[error(
        "the {product} read models are at sequence {checkpoint}, past the end of the log \
         ({last}): the log lost its tail (a crash before it reached the disk, or a stream \
         recreated or restored under kept read models); events stored from now on would be \
         taken for applied ones. Rebuild the read models: `enablement replay {product} --rebuild`"
    )]
    AheadOfLog {
        product: String,
        checkpoint: u64,
        last: u64,
    },
    /// A read-model query past its budget (events read, or time): the same query fails the same
    /// way however often it is retried; the caller narrows it.
    #[error("the query {0}")]
    QueryBudget(String),
}

impl ProjectionError {
    /// The database's refusal of what the batch holds (SQLSTATE classes 22 data exception,
    /// 23 integrity constraint violation, 54 program limit exceeded): applying the same
    /// events again fails the same way, unlike a lost connection, a deadlock or a missing
    /// table during an upgrade. `None` for every other error.
    pub fn refusal(&self) -> Option<String> {
        let ProjectionError::Database(sqlx::Error::Database(e)) = self else {
            return None;
        };
        let code = e.code()?;
        matches!(code.get(..2), Some("22" | "23" | "54"))
            .then(|| format!("SQLSTATE {code}: {}", e.message()))
    }
}

/// How a projector instance knows it is the only active one.
#[derive(Clone)]
pub enum Leadership {
    /// A PostgreSQL session advisory lock: any number of processes, one active.
    Postgres(PgPool),
    /// The embedded store is opened by one process only (sled locks its directory).
    Process,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Events applied to the read model (after dropping those at or below the checkpoint).
    pub applied: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    /// Checkpoint after the batch.
    pub checkpoint: u64,
}

impl ApplyReport {
    /// This report followed by `later`'s, for the batch that held both.
    pub fn then(self, later: ApplyReport) -> ApplyReport {
        ApplyReport {
            applied: self.applied + later.applied,
            duplicates: self.duplicates + later.duplicates,
            dead_lettered: self.dead_lettered + later.dead_lettered,
            checkpoint: self.checkpoint.max(later.checkpoint),
        }
    }
}

#[async_trait]
pub trait Projector: Send + Sync + 'static {
    /// Product name: the `product` label and the checkpoint key.
    fn product(&self) -> &'static str;
    /// The stream it reads.
    fn stream(&self) -> &str;
    async fn checkpoint(&self) -> Result<u64, ProjectionError>;
    /// Applies the events after the checkpoint, in order, and moves the checkpoint to the last
    /// one, in one transaction.
    async fn apply(&self, events: &[StoredEvent]) -> Result<ApplyReport, ProjectionError>;
    /// Called once when this instance becomes the active one, before consuming.
    async fn on_activate(&self) -> Result<(), ProjectionError> {
        Ok(())
    }
    /// Moves the checkpoint past `event`, the next one after it, without applying it: the
    /// database refused it alone ([`ProjectionError::refusal`], said in `detail`). The live
    /// projector first parks it in the dead letters with reason `projection_failed`, to be
    /// re-driven once the cause is fixed; a rebuild only skips it. `false`: this projector
    /// cannot set events aside, and the runner retries as for any failure.
    async fn set_aside(
        &self,
        _event: &StoredEvent,
        _detail: &str,
    ) -> Result<bool, ProjectionError> {
        Ok(false)
    }
}

/// The dead-letter reason of an event the database refused ([`Projector::set_aside`]).
pub const PROJECTION_FAILED: &str = "projection_failed";

/// Applies `events` as [`Projector::apply`] does, except when the database refuses the batch
/// for what it holds: then the batch is halved, and halved again, until the one event refused
/// alone is found and set aside ([`Projector::set_aside`]); everything around it is applied.
/// One bad event costs about two transactions per halving (13 for a batch of 5,000). The
/// checkpoint in the report is the furthest reached.
pub fn apply_setting_aside<'a>(
    projector: &'a dyn Projector,
    events: &'a [StoredEvent],
) -> futures::future::BoxFuture<'a, Result<ApplyReport, ProjectionError>> {
    Box::pin(async move {
        let error = match projector.apply(events).await {
            Ok(report) => return Ok(report),
            Err(e) => e,
        };
        let Some(detail) = error.refusal() else {
            return Err(error);
        };
        if let [event] = events {
            tracing::error!(
                product = projector.product(),
                sequence = event.sequence,
                subject = %event.subject,
                %detail,
                "the database refuses this event; setting it aside"
            );
            return match projector.set_aside(event, &detail).await? {
                true => Ok(ApplyReport {
                    dead_lettered: 1,
                    checkpoint: event.sequence,
                    ..Default::default()
                }),
                false => Err(error),
            };
        }
        let (first, second) = events.split_at(events.len() / 2);
        let a = apply_setting_aside(projector, first).await?;
        let b = apply_setting_aside(projector, second).await?;
        Ok(a.then(b))
    })
}

/// How the runner batches.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    pub batch: usize,
    pub wait: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            batch: 5_000,
            wait: Duration::from_millis(500),
        }
    }
}

/// How often the active instance checks that its lock's connection is still there.
const LEADER_CHECK: Duration = Duration::from_secs(5);

fn lock_key(product: &str) -> i64 {
    // Stable across builds and processes (not Rust's randomized hasher).
    product.bytes().fold(0x0043_5245_544f_i64, |h, b| {
        h.wrapping_mul(31).wrapping_add(b as i64)
    })
}

/// Takes the advisory lock of `product` on a dedicated connection, waiting as a standby while
/// another instance holds it. The connection is detached from the pool so that if this task
/// dies, the connection closes and the lock is released, instead of going back to the pool
/// still held. `None`: shut down while waiting.
async fn lead(
    pool: &PgPool,
    product: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<sqlx::PgConnection>, ProjectionError> {
    let mut leader = pool.acquire().await?.detach();
    // The lock outlives a leader whose machine died (no FIN reaches PostgreSQL) for as long as
    // the server takes to see the connection is dead: two hours with the kernel's keepalive
    // defaults. Probing an idle connection every few seconds lets a standby take over in
    // about 20 s instead. (Settings of this session only; ignored over a Unix socket.)
    sqlx::query(
        "SELECT set_config('tcp_keepalives_idle', '5', false),
                set_config('tcp_keepalives_interval', '5', false),
                set_config('tcp_keepalives_count', '3', false)",
    )
    .execute(&mut leader)
    .await?;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key(product))
            .fetch_one(&mut leader)
            .await?;
        if got {
            return Ok(Some(leader));
        }
        tracing::info!(product, "another instance is projecting; standing by");
        // Only the active instance knows the lag: a former leader standing by must not go on
        // exporting its last value, which would set off ProjectorStalled. (One that fails
        // and restarts keeps it: a projector that crashes in a loop is stalled.)
        metrics::PROJECTOR_LAG.with_label_values(&[product]).set(0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return Ok(None),
        }
    }
}

/// Runs `projector` until `shutdown` turns true.
pub async fn run(
    log: Arc<dyn EventLog>,
    leadership: Leadership,
    projector: Arc<dyn Projector>,
    config: RunnerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProjectionError> {
    let product = projector.product();
    // Held for as long as we run.
    let mut leader = match leadership {
        Leadership::Postgres(pool) => match lead(&pool, product, &mut shutdown).await? {
            Some(connection) => Some(connection),
            None => return Ok(()),
        },
        Leadership::Process => None,
    };
    projector.on_activate().await?;

    // The checkpoint in the read model is the truth. The durable consumer is always recreated at
    // checkpoint + 1: one left over from a dead instance may hold prefetched, unacked messages
    // that would only come back after ack_wait, behind newer ones, and be skipped.
    let durable = format!("projector-{product}");
    let checkpoint = projector.checkpoint().await?;
    let last = log.last_sequence(projector.stream()).await?;
    if checkpoint > last {
        return Err(ProjectionError::AheadOfLog {
            product: product.to_string(),
            checkpoint,
            last,
        });
    }
    let mut consumer = open_at(&*log, projector.stream(), &durable, checkpoint).await?;
    tracing::info!(product, checkpoint, "projector active");

    let mut last_lag_update = Instant::now() - Duration::from_secs(10);
    // Consumers whose pending count this instance exports.
    let mut exported: BTreeSet<String> = BTreeSet::new();
    let mut applied_to = checkpoint;
    // Nothing delivered yet by this consumer, opened at `applied_to` + 1.
    let mut fresh = true;
    let mut leader_checked = Instant::now();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if leader_checked.elapsed() >= LEADER_CHECK {
            still_leading(&mut leader, product).await?;
            leader_checked = Instant::now();
        }
        let batch = tokio::select! {
            b = consumer.fetch(config.batch, config.wait) => b?,
            _ = shutdown.changed() => return Ok(()),
        };
        if last_lag_update.elapsed() > Duration::from_secs(2) || batch.is_empty() {
            if let Ok(state) = log.stream_state(projector.stream()).await {
                metrics::PROJECTOR_LAG
                    .with_label_values(&[product])
                    .set(state.last_sequence.saturating_sub(applied_to) as i64);
                metrics::STREAM_MESSAGES
                    .with_label_values(&[projector.stream()])
                    .set(state.messages as i64);
                // Durable consumers only: a replay's ordered consumer is gone in a moment,
                // and its series would stay at its last value until the process ends.
                let now: BTreeSet<String> = state
                    .consumers
                    .iter()
                    .filter(|c| c.durable)
                    .map(|c| {
                        metrics::CONSUMER_PENDING
                            .with_label_values(&[projector.stream(), &c.name])
                            .set(c.pending as i64);
                        c.name.clone()
                    })
                    .collect();
                for gone in exported.difference(&now) {
                    let _ =
                        metrics::CONSUMER_PENDING.remove_label_values(&[projector.stream(), gone]);
                }
                exported = now;
            }
            last_lag_update = Instant::now();
        }
        if batch.is_empty() {
            continue;
        }
        let first_delivery = std::mem::replace(&mut fresh, false);
        let mut events: Vec<StoredEvent> = batch
            .iter()
            .map(|d| d.event.clone())
            .filter(|e| e.sequence > applied_to)
            .collect();
        match events.first() {
            None => {
                batch.last().expect("not empty").ack().await?;
                continue;
            }
            Some(first) if first.sequence != applied_to + 1 => {
                // A consumer opened at the checkpoint delivers the first event the stream
                // holds after it: a hole there is events removed from the stream (`nats
                // stream rmm`, a purge by subject), and waiting for them would stop the
                // projection for good. Unless the stream still holds one of them: deliveries
                // lost on the way (a connection cut during the first pull), which the ack of
                // this batch would cover for good. A hole later on is always a restart.
                let (from, to) = (applied_to + 1, first.sequence - 1);
                if first_delivery && !holds_any(&*log, projector.stream(), from, to).await? {
                    tracing::warn!(
                        product,
                        from,
                        to,
                        "events removed from the stream before they were projected; going on"
                    );
                } else {
                    tracing::warn!(
                        product,
                        expected = from,
                        got = first.sequence,
                        "gap in deliveries; repositioning the consumer"
                    );
                    drop(batch);
                    consumer = open_at(&*log, projector.stream(), &durable, applied_to).await?;
                    fresh = true;
                    continue;
                }
            }
            Some(_) => {}
        }
        // The same inside the batch: deliveries lost on the way (a connection cut mid-batch)
        // leave a hole the cumulative ack would cover for good. Only what comes before it is
        // projected; then the consumer starts again after it.
        let lost = lost_in_delivery(&*log, projector.stream(), &events).await?;
        if let Some(cut) = lost {
            tracing::warn!(
                product,
                expected = events[cut - 1].sequence + 1,
                got = events[cut].sequence,
                "deliveries skipped events the stream holds; repositioning the consumer after the batch's first part"
            );
            events.truncate(cut);
        }
        let through = events.last().expect("not empty").sequence;
        let mut backoff = Duration::from_millis(100);
        // `project {product}`, parented or linked to the traces in the events' traceparent.
        let span = crate::trace_context::batch_span(product, &events);
        let report = loop {
            let started = Instant::now();
            // Batches commit without waiting for the WAL flush: a PostgreSQL crash loses the
            // last ones whole, checkpoint included, while this loop still counts them applied.
            // Applying the next batch over the hole would move the checkpoint past them for
            // good; the read model's own checkpoint says where to start again.
            let attempt = async {
                let stored = projector.checkpoint().await?;
                if stored < applied_to {
                    return Ok(Err(stored));
                }
                apply_setting_aside(&*projector, &events).await.map(Ok)
            };
            match attempt.instrument(span.clone()).await {
                Ok(Ok(report)) => {
                    metrics::PROJECTOR_BATCH_SECONDS
                        .with_label_values(&[product])
                        .observe(started.elapsed().as_secs_f64());
                    break Ok(report);
                }
                Ok(Err(stored)) => {
                    tracing::warn!(
                        product,
                        stored,
                        applied_to,
                        "the read model lost its last batches (a PostgreSQL crash before they reached the disk); applying again from its checkpoint"
                    );
                    break Err(stored);
                }
                Err(e) => {
                    tracing::error!(product, error = %e, "batch failed; retrying");
                    // Where a PostgreSQL failover keeps it: the lock may have died with it.
                    still_leading(&mut leader, product).await?;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        let report = match report {
            Ok(report) => report,
            Err(stored) => {
                applied_to = stored;
                drop(batch);
                consumer = open_at(&*log, projector.stream(), &durable, applied_to).await?;
                fresh = true;
                continue;
            }
        };
        // Acking the last applied delivery acks all before it (cumulative mode).
        let applied = batch.iter().rev().find(|d| d.event.sequence == through);
        applied.expect("a delivery of each event").ack().await?;
        applied_to = report.checkpoint;
        metrics::PROJECTOR_APPLIED
            .with_label_values(&[product])
            .inc_by(report.applied);
        if lost.is_some() {
            drop(batch);
            consumer = open_at(&*log, projector.stream(), &durable, applied_to).await?;
            fresh = true;
        }
    }
}

/// Where deliveries skipped an event the stream still holds: the index of the first event
/// after the hole. A hole of events removed from the stream (`nats stream rmm`, a purge by
/// subject) is not one: nothing would ever deliver them.
async fn lost_in_delivery(
    log: &dyn EventLog,
    stream: &str,
    events: &[StoredEvent],
) -> Result<Option<usize>, ProjectionError> {
    for (i, pair) in events.windows(2).enumerate() {
        let (missing, next) = (pair[0].sequence + 1, pair[1].sequence);
        if missing == next {
            continue;
        }
        if holds_any(log, stream, missing, next - 1).await? {
            return Ok(Some(i + 1));
        }
    }
    Ok(None)
}

/// Whether the stream still holds any event of `from..=to` (a removed one beside a lost one
/// counts): one read for a hole of one, a replay of the hole (a consumer on JetStream) for more.
async fn holds_any(
    log: &dyn EventLog,
    stream: &str,
    from: u64,
    to: u64,
) -> Result<bool, ProjectionError> {
    if from == to {
        return Ok(log.get(stream, from).await?.is_some());
    }
    let mut events = log
        .replay(stream, ReplayFrom::Sequence(from), Some(to), None)
        .await?;
    Ok(futures::TryStreamExt::try_next(&mut events)
        .await?
        .is_some())
}

/// Fails when the connection that holds the leader's lock is gone. The lock lives as long as
/// its connection: dead (an idle cut, a failover), the lock is gone and a standby takes it,
/// and this instance stops instead of projecting beside it (each would recreate the other's
/// consumer, and run the live effects twice).
async fn still_leading(
    leader: &mut Option<sqlx::PgConnection>,
    product: &str,
) -> Result<(), ProjectionError> {
    if let Some(connection) = leader.as_mut() {
        // A connection to a server that vanished answers nothing until the kernel gives up
        // on it: bounded, so that this instance stops rather than hangs.
        let answered = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::query("SELECT 1").execute(&mut *connection),
        )
        .await;
        match answered {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(product, error = %e, "the leader's connection is gone; stopping");
                return Err(e.into());
            }
            Err(_) => {
                tracing::error!(product, "the leader's connection does not answer; stopping");
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the leader's lock connection did not answer within 10 s",
                ))
                .into());
            }
        }
    }
    Ok(())
}

async fn open_at(
    log: &dyn EventLog,
    stream: &str,
    durable: &str,
    checkpoint: u64,
) -> Result<Box<dyn creto_streams::DurableConsumer>, ProjectionError> {
    log.delete_consumer(stream, durable).await?;
    let spec = ConsumerSpec {
        ack: AckMode::Cumulative,
        ack_wait: Duration::from_secs(60),
        start: ReplayFrom::Sequence(checkpoint + 1),
        ..ConsumerSpec::new(durable)
    };
    Ok(log.consumer(stream, spec).await?)
}
