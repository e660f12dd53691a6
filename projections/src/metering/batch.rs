//! What every metering projector does around its store: sort a batch into usage, meter
//! definitions and invalid events (parked in the dead letters), and, after the commit, count
//! metrics and feed the usage counters. The PostgreSQL and embedded projectors differ only
//! in how they write.
use std::time::Instant;

use creto_domain::metering::{IngestLimits, Meter, UsageRecord};
use creto_streams::{deadletter, Catalog, EventLog, StoredEvent, METERING};

use super::counters::{CounterWriter, Counters};
use super::decode::{decode, Decoded};
use super::read_model::{Key, MeteringReadModel};
use crate::metrics::{self, LabelBudget};
use crate::runner::ProjectionError;

/// A batch sorted by what it holds.
#[derive(Default)]
pub struct Sorted<'a> {
    pub usage: Vec<(UsageRecord, &'a StoredEvent)>,
    /// (meter, tenant, sequence)
    pub meters: Vec<(Meter, String, u64)>,
    /// Reasons of the events parked in the dead letters.
    pub invalid: Vec<&'static str>,
    /// Corrections, plans, attachments, issued invoices, in log order.
    pub billing: Vec<(super::billing::BillingFact, &'a StoredEvent)>,
}

/// Decodes the events after `checkpoint`; invalid ones after `parked_through` are parked in
/// the dead letters before the batch commits. A letter's id comes from the event's sequence,
/// so a retried batch parks it once, but only within the log's duplicate window: a rebuild,
/// reading events the live projector parked long ago, passes the live checkpoint.
pub async fn sort<'a>(
    events: &'a [StoredEvent],
    checkpoint: u64,
    catalog: &Catalog,
    limits: &IngestLimits,
    log: &dyn EventLog,
    parked_through: u64,
) -> Result<Sorted<'a>, ProjectionError> {
    let mut sorted = Sorted::default();
    for e in events.iter().filter(|e| e.sequence > checkpoint) {
        match decode(e, catalog, limits) {
            Decoded::Marker | Decoded::Quota => {}
            Decoded::Usage(r) => sorted.usage.push((r, e)),
            Decoded::Billing(fact) => sorted.billing.push((fact, e)),
            Decoded::MeterDefined { meter, tenant } => {
                sorted.meters.push((meter, tenant, e.sequence))
            }
            Decoded::Invalid(invalid) => {
                if e.sequence > parked_through {
                    park(log, catalog, e, &invalid).await?;
                }
                sorted.invalid.push(invalid.reason.as_str());
            }
        }
    }
    Ok(sorted)
}

/// Parks an invalid event in the dead letters with its reason. The letter's id comes from the
/// event's sequence: parked twice within the log's duplicate window, it is stored once.
pub async fn park(
    log: &dyn EventLog,
    catalog: &Catalog,
    e: &StoredEvent,
    invalid: &creto_domain::metering::Invalid,
) -> Result<(), ProjectionError> {
    let letter = deadletter::letter(
        e,
        &catalog.deadletter_subject(METERING),
        invalid.reason.as_str(),
        &invalid.detail,
        1,
    );
    log.append(letter).await?;
    Ok(())
}

/// The live projector's checkpoint (what queries wait for); a rebuild parks only the invalid
/// events past it (the live projector parked the others), and switches over once close to it.
pub async fn live_checkpoint<'c>(conn: impl sqlx::PgExecutor<'c>) -> Result<u64, ProjectionError> {
    let live: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM public.projection_checkpoints WHERE projector = $1",
    )
    .bind(super::projector::PRODUCT)
    .fetch_optional(conn)
    .await?;
    Ok(live.unwrap_or(0) as u64)
}

/// Usage events a batch really added (duplicates excluded), per key.
#[derive(Debug, Clone)]
pub struct Added {
    pub key: Key,
    pub events: u64,
}

/// Effects of the live projector only: a rebuild must not count events a second time.
pub struct LiveEffects {
    stream: String,
    /// `subscription_id` label values (configurable).
    labels: LabelBudget,
    /// `event_type` label values: chosen by producers too, so bounded the same way.
    event_types: LabelBudget,
    counters: Option<(Counters, CounterWriter)>,
}

/// Distinct `event_type` label values of `metering_events_total` before the rest are `other`.
pub const EVENT_TYPE_LABELS: usize = 200;

impl LiveEffects {
    pub fn new(stream: &str) -> Self {
        LiveEffects {
            stream: stream.to_string(),
            labels: LabelBudget::new(1_000),
            event_types: LabelBudget::new(EVENT_TYPE_LABELS),
            counters: None,
        }
    }

    /// Keeps the usage counters current (spawns their writer task).
    pub fn with_counters(
        mut self,
        counters: Counters,
        read_model: std::sync::Arc<dyn MeteringReadModel>,
    ) -> Self {
        let writer = counters.spawn_writer(read_model);
        self.counters = Some((counters, writer));
        self
    }

    pub fn with_label_limit(mut self, limit: usize) -> Self {
        self.labels = LabelBudget::new(limit);
        self
    }

    /// Called once the projector becomes active: counters lost with the cache are rebuilt.
    pub async fn activate(&self, read_model: &dyn MeteringReadModel, checkpoint: u64) {
        if let Some((c, _)) = &self.counters {
            c.resync_if_behind(read_model, checkpoint).await;
        }
    }

    /// After an event was set aside: the counters' writer learns the sequence was passed.
    pub fn skipped(&self, sequence: u64) {
        if let Some((_, writer)) = &self.counters {
            writer.touched(Vec::new(), sequence);
        }
    }

    /// After a commit: metrics, then the counters of the keys the batch changed.
    pub fn committed(
        &self,
        added: Vec<Added>,
        invalid: &[&'static str],
        last_sequence: u64,
        started: Instant,
    ) {
        for reason in invalid {
            metrics::METERING_INVALID.with_label_values(&[reason]).inc();
            metrics::DEADLETTERS
                .with_label_values(&[self.stream.as_str(), reason])
                .inc();
        }
        let mut keys = Vec::with_capacity(added.len());
        for a in added {
            metrics::METERING_EVENTS
                .with_label_values(&[
                    self.labels.label(&a.key.1),
                    self.event_types.label(&a.key.2),
                ])
                .inc_by(a.events);
            keys.push(a.key);
        }
        metrics::METERING_AGGREGATION_SECONDS
            .with_label_values(&["projection_batch"])
            .observe(started.elapsed().as_secs_f64());
        if let Some((_, writer)) = &self.counters {
            writer.touched(keys, last_sequence);
        }
    }
}
