//! Corrections, plans and invoices in the embedded (sled) read model, in the same tree as the
//! usage rows (`metering::embedded`), under keys of their own:
//! `V|tenant|sub|event` → current correction; `W|tenant|sub|sequence` → audit line;
//! `U|tenant|sub|correction` → the sequence it was applied at (replays skip it);
//! `P|tenant|plan|version` → plan; `A|tenant|sub|effective_from` → attachment;
//! `I|tenant|number` → issued invoice; `J|tenant|sub|start|end` → its number.
use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Timelike, Utc};
use creto_domain::metering::pricing::{Period, Plan, PlanAssignment, PlanRef};
use creto_domain::metering::UsageRecord;
use creto_streams::StoredEvent;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use super::{BillingFact, BillingReadModel, CorrectionFact, CorrectionRecord, CorrectionState};
use crate::metering::embedded::SledReadModel;
use crate::runner::ProjectionError;

fn store_error(e: sled::Error) -> ProjectionError {
    ProjectionError::Embedded(e.to_string())
}

/// The key layout of `metering::embedded`: a prefix byte, then each part as u16 length + bytes.
fn key(prefix: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![prefix];
    for p in parts {
        k.extend_from_slice(&(p.len().min(u16::MAX as usize) as u16).to_be_bytes());
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn time_bytes(t: DateTime<Utc>) -> [u8; 8] {
    ((t.timestamp_micros() as u64) ^ (1 << 63)).to_be_bytes()
}

fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .unwrap_or(t)
}

fn hourly_value(count: u64, quantity: f64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&count.to_be_bytes());
    v[8..].copy_from_slice(&quantity.to_be_bytes());
    v
}

/// The usage row of `metering::embedded` (same tags).
#[derive(Clone, PartialEq, prost::Message)]
struct EventRow {
    #[prost(string, tag = "1")]
    subscription_id: String,
    #[prost(string, tag = "2")]
    id: String,
    #[prost(string, tag = "3")]
    source: String,
    #[prost(double, tag = "4")]
    quantity: f64,
    #[prost(string, tag = "5")]
    data: String,
    #[prost(int64, tag = "6")]
    recorded_at_micros: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredState {
    subscription_id: String,
    event_id: String,
    state: CorrectionState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredAttachment {
    plan: PlanRef,
    effective_from: DateTime<Utc>,
    sequence: u64,
}

/// Writes of one batch, readable before they are applied.
struct Staged<'a> {
    tree: &'a sled::Tree,
    changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Staged<'_> {
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, ProjectionError> {
        match self.changes.get(k) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(k).map_err(store_error)?.map(|v| v.to_vec())),
        }
    }

    fn insert(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.changes.insert(k, Some(v));
    }

    fn remove(&mut self, k: Vec<u8>) {
        self.changes.insert(k, None);
    }
}

/// Applies billing facts in log order into `writes` (applied with the checkpoint by the
/// caller). The usage rows of the same projector batch must already be in the tree. Returns
/// the facts applied.
pub fn apply(
    tree: &sled::Tree,
    facts: &[(BillingFact, &StoredEvent)],
    writes: &mut sled::Batch,
) -> Result<u64, ProjectionError> {
    let mut staged = Staged {
        tree,
        changes: BTreeMap::new(),
    };
    let mut applied = 0;
    for (fact, e) in facts {
        match fact {
            BillingFact::Correction(c) => {
                if apply_correction(&mut staged, c, e)? {
                    applied += 1;
                }
            }
            BillingFact::PlanDefined { tenant, plan } => {
                let mut k = key(b'P', &[tenant, &plan.id]);
                k.extend_from_slice(&plan.version.to_be_bytes());
                if staged.get(&k)?.is_none() {
                    staged.insert(k, serde_json::to_vec(plan).unwrap_or_default());
                    applied += 1;
                }
            }
            BillingFact::PlanAttached { tenant, attached } => {
                let mut k = key(b'A', &[tenant, &attached.subscription_id]);
                k.extend_from_slice(&time_bytes(attached.effective_from));
                let newer = match staged.get(&k)? {
                    Some(v) => serde_json::from_slice::<StoredAttachment>(&v)
                        .map_or(true, |a| a.sequence < e.sequence),
                    None => true,
                };
                if newer {
                    let stored = StoredAttachment {
                        plan: attached.plan.clone(),
                        effective_from: attached.effective_from,
                        sequence: e.sequence,
                    };
                    staged.insert(k, serde_json::to_vec(&stored).unwrap_or_default());
                    applied += 1;
                }
            }
            BillingFact::InvoiceIssued {
                tenant,
                document,
                invoice,
            } => {
                let Some(number_seq) = invoice.number_seq else {
                    continue;
                };
                let mut by_number = key(b'I', &[tenant]);
                by_number.extend_from_slice(&number_seq.to_be_bytes());
                let by_period =
                    period_key(tenant, &invoice.subscription_id, invoice.invoice.period);
                if staged.get(&by_number)?.is_none() && staged.get(&by_period)?.is_none() {
                    staged.insert(by_number, document.as_bytes().to_vec());
                    staged.insert(by_period, number_seq.to_be_bytes().to_vec());
                    applied += 1;
                }
            }
        }
    }
    for (k, v) in staged.changes {
        match v {
            Some(v) => writes.insert(k, v),
            None => writes.remove(k),
        }
    }
    Ok(applied)
}

fn period_key(tenant: &str, subscription_id: &str, period: Period) -> Vec<u8> {
    let mut k = key(b'J', &[tenant, subscription_id]);
    k.extend_from_slice(&time_bytes(period.start));
    k.extend_from_slice(&time_bytes(period.end));
    k
}

fn state_key(tenant: &str, subscription_id: &str, event_id: &str) -> Vec<u8> {
    key(b'V', &[tenant, subscription_id, event_id])
}

fn read_state(staged: &Staged<'_>, k: &[u8]) -> Result<CorrectionState, ProjectionError> {
    Ok(staged
        .get(k)?
        .and_then(|v| serde_json::from_slice::<StoredState>(&v).ok())
        .map(|s| s.state)
        .unwrap_or_default())
}

fn apply_correction(
    staged: &mut Staged<'_>,
    c: &CorrectionFact,
    e: &StoredEvent,
) -> Result<bool, ProjectionError> {
    let audit = key(b'U', &[&c.tenant, &c.subscription_id, &c.correction_id]);
    if staged.get(&audit)?.is_some() {
        return Ok(false);
    }
    let sk = state_key(&c.tenant, &c.subscription_id, &c.event_id);
    let mut state = read_state(staged, &sk)?;
    let applied = state.apply(c);
    if applied {
        let stored = StoredState {
            subscription_id: c.subscription_id.clone(),
            event_id: c.event_id.clone(),
            state,
        };
        staged.insert(sk, serde_json::to_vec(&stored).unwrap_or_default());
        let exists = staged
            .get(&key(b'i', &[&c.tenant, &c.subscription_id, &c.event_id]))?
            .is_some();
        if exists {
            recompute_hour(staged, c)?;
        }
    }
    let record = CorrectionRecord {
        correction_id: c.correction_id.clone(),
        kind: c.kind,
        subscription_id: c.subscription_id.clone(),
        event_id: c.event_id.clone(),
        quantity: c.quantity,
        data: c.data.clone(),
        reason: c.reason.clone(),
        applied,
        recorded_at: e.recorded_at,
        sequence: e.sequence,
    };
    let mut audit_key = key(b'W', &[&c.tenant, &c.subscription_id]);
    audit_key.extend_from_slice(&e.sequence.to_be_bytes());
    // The id marker (for idempotency) and the line in log order (for listing).
    staged.insert(audit, e.sequence.to_be_bytes().to_vec());
    staged.insert(audit_key, serde_json::to_vec(&record).unwrap_or_default());
    Ok(applied)
}

/// Recomputes the hourly total of the corrected event's hour from its rows as corrected.
fn recompute_hour(staged: &mut Staged<'_>, c: &CorrectionFact) -> Result<(), ProjectionError> {
    let hour = hour_of(c.occurred_at);
    let prefix = key(b'e', &[&c.tenant, &c.event_type]);
    let mut from = prefix.clone();
    from.extend_from_slice(&time_bytes(hour));
    let mut to = prefix;
    to.extend_from_slice(&time_bytes(hour + TimeDelta::hours(1)));
    let (mut count, mut quantity) = (0u64, 0.0f64);
    for kv in staged.tree.range(from..to) {
        let (_, v) = kv.map_err(store_error)?;
        let Ok(row) = EventRow::decode(v.as_ref()) else {
            continue;
        };
        if row.subscription_id != c.subscription_id {
            continue;
        }
        let state = read_state(staged, &state_key(&c.tenant, &row.subscription_id, &row.id))?;
        if state.voided {
            continue;
        }
        count += 1;
        quantity += state.quantity.unwrap_or(row.quantity);
    }
    let mut hk = key(b'h', &[&c.tenant, &c.subscription_id, &c.event_type]);
    hk.extend_from_slice(&time_bytes(hour));
    if count == 0 {
        staged.remove(hk);
    } else {
        staged.insert(hk, hourly_value(count, quantity).to_vec());
    }
    Ok(())
}

/// Applies the tenant's corrections to usage rows read for a query: voided rows go, amended
/// ones take their new quantity and dimensions.
pub fn overlay(
    tree: &sled::Tree,
    tenant: &str,
    events: Vec<(u64, UsageRecord)>,
) -> Result<Vec<(u64, UsageRecord)>, ProjectionError> {
    let mut states: HashMap<(String, String), CorrectionState> = HashMap::new();
    for kv in tree.scan_prefix(key(b'V', &[tenant])) {
        let (_, v) = kv.map_err(store_error)?;
        if let Ok(s) = serde_json::from_slice::<StoredState>(&v) {
            states.insert((s.subscription_id, s.event_id), s.state);
        }
    }
    if states.is_empty() {
        return Ok(events);
    }
    Ok(events
        .into_iter()
        .filter_map(
            |(seq, r)| match states.get(&(r.subscription_id.clone(), r.id.clone())) {
                Some(state) => state.effective(r).map(|r| (seq, r)),
                None => Some((seq, r)),
            },
        )
        .collect())
}

#[async_trait]
impl BillingReadModel for SledReadModel {
    async fn event_sequence(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<Option<u64>, ProjectionError> {
        Ok(self
            .tree()
            .get(key(b'i', &[tenant, subscription_id, event_id]))
            .map_err(store_error)?
            .filter(|v| v.len() >= 8)
            .map(|v| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v[..8]);
                u64::from_be_bytes(b)
            }))
    }

    async fn correction_state(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<Option<CorrectionState>, ProjectionError> {
        Ok(self
            .tree()
            .get(state_key(tenant, subscription_id, event_id))
            .map_err(store_error)?
            .and_then(|v| serde_json::from_slice::<StoredState>(&v).ok())
            .map(|s| s.state))
    }

    async fn corrections(
        &self,
        tenant: &str,
        subscription_id: &str,
    ) -> Result<Vec<CorrectionRecord>, ProjectionError> {
        let mut out = Vec::new();
        for kv in self
            .tree()
            .scan_prefix(key(b'W', &[tenant, subscription_id]))
        {
            let (_, v) = kv.map_err(store_error)?;
            if let Ok(r) = serde_json::from_slice::<CorrectionRecord>(&v) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.sequence);
        Ok(out)
    }

    async fn plan(
        &self,
        tenant: &str,
        plan_id: &str,
        version: u32,
    ) -> Result<Option<Plan>, ProjectionError> {
        let mut k = key(b'P', &[tenant, plan_id]);
        k.extend_from_slice(&version.to_be_bytes());
        Ok(self
            .tree()
            .get(k)
            .map_err(store_error)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    async fn assignments(
        &self,
        tenant: &str,
        subscription_id: &str,
    ) -> Result<Vec<PlanAssignment>, ProjectionError> {
        let mut out = Vec::new();
        for kv in self
            .tree()
            .scan_prefix(key(b'A', &[tenant, subscription_id]))
        {
            let (_, v) = kv.map_err(store_error)?;
            if let Ok(a) = serde_json::from_slice::<StoredAttachment>(&v) {
                out.push(PlanAssignment {
                    plan: a.plan,
                    effective_from: a.effective_from,
                });
            }
        }
        Ok(out)
    }

    async fn invoice(&self, tenant: &str, number: &str) -> Result<Option<String>, ProjectionError> {
        let Some(seq) = number
            .strip_prefix(&format!("INV-{tenant}-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return Ok(None);
        };
        let mut k = key(b'I', &[tenant]);
        k.extend_from_slice(&seq.to_be_bytes());
        Ok(self
            .tree()
            .get(k)
            .map_err(store_error)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            // `INV-t-1` and `INV-t-000001` parse alike: only the exact number is this one.
            .filter(|doc| {
                serde_json::from_str::<super::InvoiceDocument>(doc)
                    .is_ok_and(|d| d.number.as_deref() == Some(number))
            }))
    }

    async fn invoices(
        &self,
        tenant: &str,
        subscription_id: Option<&str>,
    ) -> Result<Vec<String>, ProjectionError> {
        let mut out = Vec::new();
        for kv in self.tree().scan_prefix(key(b'I', &[tenant])) {
            let (_, v) = kv.map_err(store_error)?;
            let doc = String::from_utf8_lossy(&v).into_owned();
            let keep = subscription_id.is_none_or(|sub| {
                serde_json::from_str::<super::InvoiceDocument>(&doc)
                    .is_ok_and(|d| d.subscription_id == sub)
            });
            if keep {
                out.push(doc);
            }
        }
        Ok(out)
    }
}
