//! The embedded metering read model, on sled: the same facts as the PostgreSQL one (raw
//! accepted events deduplicated by tenant + subscription + id, hourly usage, meters, the
//! checkpoint), written in one atomic batch per projector batch. Queries scan the events of
//! one tenant and event type in time order and aggregate them with the domain's own meter
//! semantics (`creto_domain::metering::reference`), the definition the PostgreSQL SQL is
//! property-tested against.
//!
//! Keys (components length-prefixed, so any text is safe):
//! `c` → checkpoint; `i|tenant|sub|id` → sequence; `e|tenant|type|time|seq` → event;
//! `h|tenant|sub|type|hour` → (count, quantity); `m|tenant|slug` → meter.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use creto_domain::metering::{reference, IngestLimits, Meter, UsageRecord};
use creto_schemas::metering::v1 as pb;
use creto_streams::{Catalog, EventLog, StoredEvent, METERING};
use prost::Message as _;

use super::batch::{self, Added, LiveEffects};
use super::counters::Counters;
use super::decode::{meter_from_proto, meter_to_proto};
use super::projector::PRODUCT;
use super::query::{UsageQuery, UsageRow};
use super::read_model::{Key, MeteringReadModel, MonthTotal};
use crate::runner::{ApplyReport, ProjectionError, Projector};

const CHECKPOINT: &[u8] = b"c";

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
    /// The dimensions as JSON text.
    #[prost(string, tag = "5")]
    data: String,
    #[prost(int64, tag = "6")]
    recorded_at_micros: i64,
}

fn store_error(e: sled::Error) -> ProjectionError {
    ProjectionError::Embedded(e.to_string())
}

/// A key: a prefix byte, then each part as u16 length + bytes, then fixed-width suffixes.
fn key(prefix: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![prefix];
    for p in parts {
        k.extend_from_slice(&(p.len().min(u16::MAX as usize) as u16).to_be_bytes());
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// Order-preserving bytes of a time (micros since the epoch, sign bit flipped).
fn time_bytes(t: DateTime<Utc>) -> [u8; 8] {
    ((t.timestamp_micros() as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from(bytes: &[u8]) -> DateTime<Utc> {
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes);
    DateTime::from_timestamp_micros((u64::from_be_bytes(b) ^ (1 << 63)) as i64).unwrap_or_default()
}

fn u64_of(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

/// Splits the length-prefixed parts after the prefix byte; returns them and the rest.
fn parts(k: &[u8], n: usize) -> (Vec<String>, &[u8]) {
    let mut out = Vec::with_capacity(n);
    let mut at = 1;
    for _ in 0..n {
        let len = u16::from_be_bytes([k[at], k[at + 1]]) as usize;
        out.push(String::from_utf8_lossy(&k[at + 2..at + 2 + len]).into_owned());
        at += 2 + len;
    }
    (out, &k[at..])
}

fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .unwrap_or(t)
}

fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

/// Hourly totals: 8 bytes count, 8 bytes f64 quantity.
fn hourly_value(count: u64, quantity: f64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&count.to_be_bytes());
    v[8..].copy_from_slice(&quantity.to_be_bytes());
    v
}

fn hourly_of(v: &[u8]) -> (u64, f64) {
    let mut q = [0u8; 8];
    q.copy_from_slice(&v[8..16]);
    (u64_of(v), f64::from_be_bytes(q))
}

/// The embedded metering read model (the query side; [`SledProjector`] writes it).
pub struct SledReadModel {
    tree: sled::Tree,
    /// The most raw events one usage query holds ([`QUERY_EVENTS`] unless changed).
    query_events: usize,
    /// Usage queries reading at once ([`QUERIES_AT_ONCE`]): each may hold its budget.
    queries: Arc<tokio::sync::Semaphore>,
}

/// Usage queries the embedded store runs at once; the others wait their turn.
pub const QUERIES_AT_ONCE: usize = 2;

/// The most raw events one usage query holds on the embedded store, each in memory while it is
/// aggregated (a few hundred bytes apiece): past it, or past the query timeout PostgreSQL also
/// has, the query is refused with what to narrow, rather than taking the process's memory or a
/// worker thread for as long as it runs. Events of other subscriptions than a query's filter
/// names are skipped as they are read, and count only toward the time.
pub const QUERY_EVENTS: usize = 2_000_000;

impl SledReadModel {
    /// Opens the metering read model of the embedded store in `dir`.
    /// The most raw events one usage query reads (tests make it small).
    pub fn with_query_budget(mut self, events: usize) -> Self {
        self.query_events = events;
        self
    }

    pub fn open(dir: &Path) -> Result<SledReadModel, ProjectionError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            ProjectionError::Embedded(format!(
                "cannot open the embedded read models at {} ({e}); is another `enablement dev` using this directory?",
                dir.display()
            ))
        })?;
        Ok(SledReadModel {
            tree: db.open_tree("metering").map_err(store_error)?,
            query_events: QUERY_EVENTS,
            queries: Arc::new(tokio::sync::Semaphore::new(QUERIES_AT_ONCE)),
        })
    }

    /// The tree the metering read model lives in (`metering::billing::embedded` keeps its
    /// keys there too).
    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn checkpoint_now(&self) -> Result<u64, ProjectionError> {
        Ok(self
            .tree
            .get(CHECKPOINT)
            .map_err(store_error)?
            .map_or(0, |v| u64_of(&v)))
    }

    fn row_to_record(
        tenant: &str,
        event_type: &str,
        k: &[u8],
        v: &[u8],
    ) -> Option<(u64, UsageRecord)> {
        let (_, rest) = parts(k, 2);
        let time = time_from(&rest[..8]);
        let seq = u64_of(&rest[8..]);
        let row = EventRow::decode(v).ok()?;
        let dimensions = serde_json::from_str(&row.data).unwrap_or_default();
        Some((
            seq,
            UsageRecord {
                id: row.id,
                source: row.source,
                event_type: event_type.to_string(),
                subscription_id: row.subscription_id,
                tenant: tenant.to_string(),
                time,
                quantity: row.quantity,
                dimensions,
            },
        ))
    }
}

/// The embedded metering projector.
pub struct SledProjector {
    read_model: Arc<SledReadModel>,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    limits: IngestLimits,
    live: LiveEffects,
    /// Batches are applied one at a time (the runner never overlaps them; this makes it so).
    writing: tokio::sync::Mutex<()>,
}

impl SledProjector {
    pub fn new(
        read_model: Arc<SledReadModel>,
        log: Arc<dyn EventLog>,
        catalog: Catalog,
        limits: IngestLimits,
    ) -> Self {
        let stream = catalog.stream(METERING);
        SledProjector {
            live: LiveEffects::new(&stream),
            read_model,
            log,
            catalog,
            stream,
            limits,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Keeps the in-process usage counters current (spawns their writer task).
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.live = self.live.with_counters(counters, self.read_model.clone());
        self
    }

    pub fn with_label_limit(mut self, limit: usize) -> Self {
        self.live = self.live.with_label_limit(limit);
        self
    }
}

#[async_trait]
impl MeteringReadModel for SledReadModel {
    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.checkpoint_now()
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, ProjectionError> {
        let meter = &q.meter;
        let prefix = key(b'e', &[&q.tenant, &meter.event_type]);
        let mut from = prefix.clone();
        from.extend_from_slice(&time_bytes(q.from));
        let mut to = prefix;
        to.extend_from_slice(&time_bytes(q.to));
        // Read on the blocking pool: a long range is many store reads.
        let (tree, tenant, event_type) = (
            self.tree.clone(),
            q.tenant.clone(),
            meter.event_type.clone(),
        );
        let budget = self.query_events;
        let subscription = q
            .filters
            .iter()
            .find(|(k, _)| k == "subscription_id")
            .map(|(_, v)| v.clone());
        let turn = self
            .queries
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ProjectionError::Embedded(e.to_string()))?;
        let mut events = tokio::task::spawn_blocking(move || {
            // Held by the read itself: a caller that gives up does not end it, and must not
            // free its turn while it runs. Its time counts from its turn, not from the wait.
            let _turn = turn;
            let deadline = std::time::Instant::now()
                + std::time::Duration::from_secs(super::query::USAGE_QUERY_TIMEOUT_SECONDS);
            let mut events = Vec::new();
            for (read, kv) in tree.range(from..to).enumerate() {
                if read % 4096 == 0 && std::time::Instant::now() > deadline {
                    return Err(ProjectionError::QueryBudget(format!(
                        "took longer than {} s, the most one query may",
                        super::query::USAGE_QUERY_TIMEOUT_SECONDS
                    )));
                }
                let (k, v) = kv.map_err(store_error)?;
                let Some(event) = Self::row_to_record(&tenant, &event_type, &k, &v) else {
                    continue;
                };
                if subscription
                    .as_ref()
                    .is_some_and(|s| *s != event.1.subscription_id)
                {
                    continue;
                }
                if events.len() >= budget {
                    return Err(ProjectionError::QueryBudget(format!(
                        "holds more than {budget} events, the most one query holds on the embedded store"
                    )));
                }
                events.push(event);
            }
            Ok(events)
        })
        .await
        .map_err(|e| ProjectionError::Embedded(format!("usage query task: {e}")))??;
        // Log order decides ties (LATEST), as in PostgreSQL's ORDER BY stream_sequence.
        events.sort_by_key(|(seq, _)| *seq);
        // Voided events drop out, amended ones carry their new values.
        let events = super::billing::embedded::overlay(&self.tree, &q.tenant, events)?;
        let records: Vec<UsageRecord> = events.into_iter().map(|(_, r)| r).collect();
        Ok(reference::usage(
            &records,
            meter,
            q.from,
            q.to,
            q.window,
            q.tz,
            &q.group_by,
            &q.filters,
        )
        .into_iter()
        .map(|r| UsageRow {
            window_end: q.window.end(r.window_start, q.tz),
            window_start: r.window_start,
            group: r.group,
            value: r.value,
        })
        .collect())
    }

    async fn meter(&self, tenant: &str, slug: &str) -> Result<Option<Meter>, ProjectionError> {
        Ok(self
            .tree
            .get(key(b'm', &[tenant, slug]))
            .map_err(store_error)?
            .and_then(|v| pb::Meter::decode(v.as_ref()).ok())
            .and_then(|m| meter_from_proto(&m).ok()))
    }

    async fn meters(&self, tenant: &str) -> Result<Vec<Meter>, ProjectionError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(key(b'm', &[tenant])) {
            let (_, v) = kv.map_err(store_error)?;
            if let Some(m) = pb::Meter::decode(v.as_ref())
                .ok()
                .and_then(|m| meter_from_proto(&m).ok())
            {
                out.push(m);
            }
        }
        // By slug, as PostgreSQL answers: the store's keys are length-prefixed, and came back
        // shortest slug first.
        out.sort_by(|a, b| a.slug.cmp(&b.slug));
        Ok(out)
    }

    async fn existing_ids(
        &self,
        tenant: &str,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ProjectionError> {
        let mut out = Vec::new();
        for (sub, id) in keys {
            if self
                .tree
                .contains_key(key(b'i', &[tenant, sub, id]))
                .map_err(store_error)?
            {
                out.push((sub.clone(), id.clone()));
            }
        }
        Ok(out)
    }

    async fn month_totals(&self, keys: Option<&[Key]>) -> Result<Vec<MonthTotal>, ProjectionError> {
        let since = time_bytes(month_start(Utc::now()));
        // Every key asked for is answered, zero when its month holds nothing (a key whose
        // events were all voided must read zero, not keep its total).
        let mut totals: BTreeMap<Key, (u64, f64)> = keys
            .unwrap_or_default()
            .iter()
            .map(|k| (k.clone(), (0, 0.0)))
            .collect();
        let mut add = |k: &[u8], v: &[u8]| {
            let (p, rest) = parts(k, 3);
            if rest[..8] >= since[..] {
                let (c, q) = hourly_of(v);
                let t = totals
                    .entry((p[0].clone(), p[1].clone(), p[2].clone()))
                    .or_default();
                t.0 += c;
                t.1 += q;
            }
        };
        match keys {
            Some(keys) => {
                // From the month's first hour on: a key's earlier hours are never read.
                for (tenant, sub, event_type) in keys {
                    let prefix = key(b'h', &[tenant, sub, event_type]);
                    let from = [prefix.as_slice(), &since].concat();
                    for kv in self.tree.range(from..) {
                        let (k, v) = kv.map_err(store_error)?;
                        if !k.starts_with(&prefix) {
                            break;
                        }
                        add(&k, &v);
                    }
                }
            }
            None => {
                for kv in self.tree.scan_prefix([b'h']) {
                    let (k, v) = kv.map_err(store_error)?;
                    add(&k, &v);
                }
            }
        }
        Ok(totals
            .into_iter()
            .map(|(key, (count, quantity))| MonthTotal {
                key,
                count: count as i64,
                quantity: quantity.to_string(),
            })
            .collect())
    }

    fn billing(&self) -> &dyn super::billing::BillingReadModel {
        self
    }
}

#[async_trait]
impl Projector for SledProjector {
    fn product(&self) -> &'static str {
        PRODUCT
    }

    fn stream(&self) -> &str {
        &self.stream
    }

    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.read_model.checkpoint_now()
    }

    async fn on_activate(&self) -> Result<(), ProjectionError> {
        self.live
            .activate(&*self.read_model, self.read_model.checkpoint_now()?)
            .await;
        Ok(())
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<ApplyReport, ProjectionError> {
        let started = std::time::Instant::now();
        let _writing = self.writing.lock().await;
        let checkpoint = self.read_model.checkpoint_now()?;
        let Some(last) = events.last().filter(|l| l.sequence > checkpoint) else {
            return Ok(ApplyReport {
                checkpoint,
                ..Default::default()
            });
        };
        let sorted = batch::sort(
            events,
            checkpoint,
            &self.catalog,
            &self.limits,
            &*self.log,
            0,
        )
        .await?;
        let mut report = ApplyReport {
            checkpoint: last.sequence,
            dead_lettered: sorted.invalid.len() as u64,
            ..Default::default()
        };
        let mut writes = sled::Batch::default();
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut hourly: HashMap<Vec<u8>, (u64, f64)> = HashMap::new();
        let mut added: HashMap<Key, u64> = HashMap::new();
        for (r, e) in sorted.usage {
            let id = key(b'i', &[&r.tenant, &r.subscription_id, &r.id]);
            // First occurrence wins, in log order, however late the duplicate comes.
            if seen.contains(&id)
                || self
                    .read_model
                    .tree
                    .contains_key(&id)
                    .map_err(store_error)?
            {
                report.duplicates += 1;
                continue;
            }
            writes.insert(id.clone(), &e.sequence.to_be_bytes());
            seen.insert(id);
            let mut ek = key(b'e', &[&r.tenant, &r.event_type]);
            ek.extend_from_slice(&time_bytes(r.time));
            ek.extend_from_slice(&e.sequence.to_be_bytes());
            let row = EventRow {
                subscription_id: r.subscription_id.clone(),
                id: r.id.clone(),
                source: r.source.clone(),
                quantity: r.quantity,
                data: serde_json::Value::Object(r.dimensions).to_string(),
                recorded_at_micros: e.recorded_at.timestamp_micros(),
            };
            writes.insert(ek, row.encode_to_vec());
            let mut hk = key(b'h', &[&r.tenant, &r.subscription_id, &r.event_type]);
            hk.extend_from_slice(&time_bytes(hour_of(r.time)));
            let total = match hourly.get_mut(&hk) {
                Some(t) => t,
                None => {
                    let stored = self
                        .read_model
                        .tree
                        .get(&hk)
                        .map_err(store_error)?
                        .map_or((0, 0.0), |v| hourly_of(&v));
                    hourly.entry(hk).or_insert(stored)
                }
            };
            total.0 += 1;
            total.1 += r.quantity;
            *added
                .entry((r.tenant, r.subscription_id, r.event_type))
                .or_default() += 1;
            report.applied += 1;
        }
        for (hk, (count, quantity)) in hourly {
            writes.insert(hk, &hourly_value(count, quantity));
        }
        for (meter, tenant, _) in &sorted.meters {
            // The first definition of a slug wins, as in the log.
            let mk = key(b'm', &[tenant, &meter.slug]);
            if !seen.contains(&mk)
                && !self
                    .read_model
                    .tree
                    .contains_key(&mk)
                    .map_err(store_error)?
            {
                writes.insert(mk.clone(), meter_to_proto(meter).encode_to_vec());
                seen.insert(mk);
            }
            report.applied += 1;
        }
        if !sorted.billing.is_empty() {
            // Usage first (corrections read the rows they correct); re-applied after a crash,
            // it is all duplicates. The corrections then commit with the checkpoint.
            let usage = std::mem::take(&mut writes);
            self.read_model
                .tree
                .apply_batch(usage)
                .map_err(store_error)?;
            report.applied += super::billing::embedded::apply(
                &self.read_model.tree,
                &sorted.billing,
                &mut writes,
            )?;
            for key in sorted.billing.iter().filter_map(|(f, _)| f.usage_key()) {
                added.entry(key).or_default();
            }
        }
        writes.insert(CHECKPOINT, &last.sequence.to_be_bytes());
        self.read_model
            .tree
            .apply_batch(writes)
            .map_err(store_error)?;
        self.live.committed(
            added
                .into_iter()
                .map(|(key, events)| Added { key, events })
                .collect(),
            &sorted.invalid,
            last.sequence,
            started,
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_hour(tree: &sled::Tree, k: [&str; 3], hour: DateTime<Utc>, count: u64, quantity: f64) {
        let mut hk = key(b'h', &k);
        hk.extend_from_slice(&time_bytes(hour));
        tree.insert(hk, &hourly_value(count, quantity)).unwrap();
    }

    /// A query that would hold more raw events than the budget is refused, not held in memory;
    /// other subscriptions' events do not count against one that names its subscription.
    #[tokio::test]
    async fn a_usage_query_past_its_budget_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let start = Utc::now() - chrono::Duration::hours(2);
        for (case, budget, filter, expected) in [
            (0, 100, None, Some(30.0)),
            (1, 10, None, None),
            (2, 10, Some("sub-b"), Some(5.0)),
        ] {
            let model = SledReadModel::open(&dir.path().join(case.to_string()))
                .unwrap()
                .with_query_budget(budget);
            for i in 0..30u64 {
                let mut ek = key(b'e', &["default", "api.call"]);
                ek.extend_from_slice(&time_bytes(start + chrono::Duration::seconds(i as i64)));
                ek.extend_from_slice(&(i + 1).to_be_bytes());
                let row = EventRow {
                    subscription_id: if i % 6 == 5 { "sub-b" } else { "sub" }.into(),
                    id: format!("e{i}"),
                    source: "test".into(),
                    quantity: 1.0,
                    data: "{}".into(),
                    recorded_at_micros: 0,
                };
                model.tree.insert(ek, row.encode_to_vec()).unwrap();
            }
            let query = UsageQuery {
                tenant: "default".into(),
                meter: super::super::query::quantity_meter("api.call"),
                from: start - chrono::Duration::hours(1),
                to: start + chrono::Duration::hours(1),
                window: creto_domain::metering::Window::Day,
                tz: chrono_tz::UTC,
                group_by: Vec::new(),
                filters: filter
                    .map(|f| vec![("subscription_id".to_string(), f.to_string())])
                    .unwrap_or_default(),
            };
            match (model.usage(&query).await, expected) {
                (Ok(rows), Some(sum)) => {
                    assert_eq!(rows.iter().map(|r| r.value).sum::<f64>(), sum)
                }
                (Err(ProjectionError::QueryBudget(why)), None) => {
                    assert!(why.contains("more than 10 events"), "{why}")
                }
                (other, _) => panic!("budget {budget}: {other:?}"),
            }
        }
    }

    /// A key's month is read from the month's first hour to the key's last: its earlier hours
    /// and the next key's hours are left out.
    #[tokio::test]
    async fn month_totals_read_the_month_of_each_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let model = SledReadModel::open(dir.path()).unwrap();
        let start = month_start(Utc::now());
        let a = ["default", "sub", "llm.tokens"];
        let b = ["default", "sub-2", "llm.tokens"];
        put_hour(
            &model.tree,
            a,
            start - chrono::Duration::hours(1),
            100,
            100.0,
        );
        put_hour(&model.tree, a, start, 1, 2.0);
        put_hour(&model.tree, a, start + chrono::Duration::hours(5), 3, 4.0);
        put_hour(&model.tree, b, start - chrono::Duration::days(3), 50, 50.0);
        put_hour(&model.tree, b, start + chrono::Duration::hours(1), 7, 8.0);
        let keys: Vec<Key> = [a, b]
            .iter()
            .map(|k| (k[0].to_string(), k[1].to_string(), k[2].to_string()))
            .collect();
        let got: Vec<(String, i64, String)> = model
            .month_totals(Some(&keys))
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.key.1, t.count, t.quantity))
            .collect();
        assert_eq!(
            got,
            vec![
                ("sub".to_string(), 4, "6".to_string()),
                ("sub-2".to_string(), 7, "8".to_string())
            ]
        );
        // Every key at once (the resync) agrees.
        let all: Vec<(String, i64)> = model
            .month_totals(None)
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.key.1, t.count))
            .collect();
        assert_eq!(all, vec![("sub".to_string(), 4), ("sub-2".to_string(), 7)]);
    }
}
