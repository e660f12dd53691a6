//! The one ingestion path of usage events, shared by the gRPC `IngestEvents` and by
//! `enablement backfill metering`: validate each event (the domain's rules), drop the ids seen
//! earlier in the same submission or already applied by the read model, and append the rest
//! (the log's duplicate window catches the ids appended but not yet applied).
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use creto_domain::metering::{self, IngestLimits, Invalid, RawUsageEvent, UsageRecord};
use creto_projections::metering::read_model::MeteringReadModel;
use creto_projections::ProjectionError;
use creto_streams::{AppendEvent, EventLog, LogError};

use crate::telemetry;

/// `(tenant, subscription_id, event id)`: the idempotency key of a usage event.
pub type EventKey = (String, String, String);

/// Validates one raw event the way live ingestion does (`now`: the platform clock).
pub fn validate(
    raw: Result<RawUsageEvent, Invalid>,
    now: DateTime<Utc>,
    size: usize,
    limits: &IngestLimits,
) -> Result<UsageRecord, Invalid> {
    let record = raw.and_then(|raw| metering::event::validate(raw, None, now, size, limits))?;
    clear_of_the_window_edges(&record, now, limits)?;
    Ok(record)
}

/// How close to either end of the time window this side refuses an event itself.
pub const WINDOW_EDGE: chrono::Duration = chrono::Duration::seconds(60);

/// The projector checks the time window again against the log's clock (`recorded_at`: later,
/// and another machine's): an event this side let through within moments of an edge could be
/// refused there after the caller was answered ACCEPTED, and never billed. So the edges
/// themselves are refused here, with what to do.
fn clear_of_the_window_edges(
    record: &UsageRecord,
    now: DateTime<Utc>,
    limits: &IngestLimits,
) -> Result<(), Invalid> {
    // At most half of each side: a window of a few seconds keeps its middle.
    let (late, ahead) = (
        WINDOW_EDGE.min(limits.late_window / 2),
        WINDOW_EDGE.min(limits.max_future / 2),
    );
    let edge = |reason, what: &str, margin: chrono::Duration| Invalid {
        reason,
        detail: format!(
            "`time` {} is within {} s of the {what} end of the accepted window ({} h back, {} s \
             ahead): the log's clock decides there; send it with a time clear of the edge",
            record.time,
            margin.num_seconds(),
            limits.late_window.num_hours(),
            limits.max_future.num_seconds()
        ),
    };
    if record.time < now - limits.late_window + late {
        return Err(edge(metering::InvalidReason::TimeTooOld, "late", late));
    }
    if record.time > now + limits.max_future - ahead {
        return Err(edge(metering::InvalidReason::TimeInFuture, "future", ahead));
    }
    Ok(())
}

/// A valid event ready to append.
pub struct Candidate {
    pub record: UsageRecord,
    pub append: AppendEvent,
}

impl Candidate {
    fn key(&self) -> EventKey {
        (
            self.record.tenant.clone(),
            self.record.subscription_id.clone(),
            self.record.id.clone(),
        )
    }
}

/// Why an event counted as a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DuplicateOf {
    /// The same key earlier in this submission (this call, or this backfill).
    Submission,
    /// The read model already holds the key (applied long ago, past the duplicate window).
    Applied,
    /// The log's duplicate window (appended recently, maybe not applied yet).
    Log,
}

impl DuplicateOf {
    pub fn as_str(&self) -> &'static str {
        match self {
            DuplicateOf::Submission => "same_submission",
            DuplicateOf::Applied => "already_applied",
            DuplicateOf::Log => "log_duplicate_window",
        }
    }

    pub fn sentence(&self) -> &'static str {
        match self {
            DuplicateOf::Submission => "same id as an earlier event of this batch",
            DuplicateOf::Applied => "this id was already accepted for this subscription",
            DuplicateOf::Log => "this id was appended moments ago",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Appended at `sequence` (0 in a dry run).
    Accepted {
        sequence: u64,
    },
    /// `sequence` is the original's when known (0 otherwise).
    Duplicate {
        sequence: u64,
        of: DuplicateOf,
    },
    Rejected(Invalid),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the read model is unavailable: {0}; retry")]
    ReadModel(#[from] ProjectionError),
    #[error("{0}; retry the whole batch: events already appended will come back as duplicates")]
    Log(#[from] LogError),
}

/// Keys submitted earlier in the same submission and their sequence (0 until known). One
/// gRPC call uses a fresh one; a backfill keeps one across its batches.
pub type Seen = HashMap<EventKey, u64>;

/// Dedupes and appends `items` (the validation result of each event, in order); with
/// `dry_run` nothing is appended. Returns one outcome per item, in order.
pub async fn submit(
    log: &dyn EventLog,
    read_model: &dyn MeteringReadModel,
    items: Vec<Result<Candidate, Invalid>>,
    seen: &mut Seen,
    dry_run: bool,
) -> Result<Vec<Outcome>, SubmitError> {
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(items.len());
    // index in `items` → its key, for the events still candidates
    let mut pending: Vec<(usize, Candidate)> = Vec::new();
    // key → index of its first occurrence in this call (sequences resolved after the append)
    let mut first_here: HashMap<EventKey, usize> = HashMap::new();
    let mut later_copies: Vec<(usize, usize)> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Err(invalid) => outcomes.push(Some(Outcome::Rejected(invalid))),
            Ok(c) => {
                let key = c.key();
                if let Some(&sequence) = seen.get(&key) {
                    outcomes.push(Some(Outcome::Duplicate {
                        sequence,
                        of: DuplicateOf::Submission,
                    }));
                } else if let Some(&first) = first_here.get(&key) {
                    later_copies.push((i, first));
                    outcomes.push(None);
                } else {
                    first_here.insert(key, i);
                    pending.push((i, c));
                    outcomes.push(None);
                }
            }
        }
    }

    // Ids applied long ago (past the log's duplicate window) are still duplicates.
    let mut by_tenant: HashMap<&str, Vec<(String, String)>> = HashMap::new();
    for (_, c) in &pending {
        by_tenant
            .entry(c.record.tenant.as_str())
            .or_default()
            .push((c.record.subscription_id.clone(), c.record.id.clone()));
    }
    let mut known: HashSet<EventKey> = HashSet::new();
    for (tenant, keys) in by_tenant {
        for (sub, id) in read_model.existing_ids(tenant, &keys).await? {
            known.insert((tenant.to_string(), sub, id));
        }
    }
    let mut to_append = Vec::new();
    let mut to_append_index = Vec::new();
    for (i, c) in pending {
        let key = c.key();
        if known.contains(&key) {
            outcomes[i] = Some(Outcome::Duplicate {
                sequence: 0,
                of: DuplicateOf::Applied,
            });
            seen.insert(key, 0);
        } else {
            to_append_index.push((i, key));
            to_append.push(c.append);
        }
    }

    if dry_run {
        for (i, key) in to_append_index {
            outcomes[i] = Some(Outcome::Accepted { sequence: 0 });
            seen.insert(key, 0);
        }
    } else {
        let appended = telemetry::append_batch(log, "metering.events", to_append).await;
        let mut failed = None;
        for (r, (i, key)) in appended.into_iter().zip(to_append_index) {
            match r {
                Ok(a) => {
                    outcomes[i] = Some(if a.is_duplicate() {
                        Outcome::Duplicate {
                            sequence: a.sequence(),
                            of: DuplicateOf::Log,
                        }
                    } else {
                        Outcome::Accepted {
                            sequence: a.sequence(),
                        }
                    });
                    seen.insert(key, a.sequence());
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(SubmitError::Log(e));
        }
    }
    // Later copies within this call point at their first occurrence's sequence.
    for (i, first) in later_copies {
        let sequence = match &outcomes[first] {
            Some(Outcome::Accepted { sequence } | Outcome::Duplicate { sequence, .. }) => *sequence,
            _ => 0,
        };
        outcomes[i] = Some(Outcome::Duplicate {
            sequence,
            of: DuplicateOf::Submission,
        });
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every item has an outcome"))
        .collect())
}
