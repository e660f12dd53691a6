//! Current-period usage counters in the cache (Redis, or in-process when embedded) under the
//! runbook's key shape `quota:{subscription_id}:{event_type}` (a hash: `month`, `quantity`,
//! `count`, `tenant`).
//!
//! Values are absolute totals read back from the read model after the commit, so writing them
//! twice is harmless; `metering:counters:sequence` records the checkpoint they reflect, and a
//! projector that finds the cache behind (a flush, a crash between commit and write, an
//! in-process cache after a restart) rebuilds them. A write read at an older checkpoint than
//! the recorded one is refused: a former leader's last write, delayed past a takeover, would
//! otherwise put back older totals (and an older mark) over the new leader's.
use std::sync::Arc;
use std::time::Duration;

use super::read_model::{Key, MeteringReadModel, MonthTotal};
use crate::cache::{Cache, CacheError, CacheWrite};
use crate::metrics;

/// Counters outlive the month they count by a margin, then expire.
const TTL: Duration = Duration::from_secs(40 * 24 * 3600);
/// At most one write of the counters per interval: each reads its keys' month back from the
/// read model (`usage_monthly`: one row per key), work that at ingest rates took a core from
/// the projection when done after every batch (then from `usage_hourly`, many rows per key).
/// Counters lag the read model by at most this much plus one write.
const WRITE_EVERY: Duration = Duration::from_secs(1);

/// What became of a write of counters.
enum Written {
    Done,
    /// The cache or the read model failed: tried again with the next batch.
    Failed,
    /// The counters reflect a later sequence than this write's: a newer projector (another
    /// instance that took over) wrote them, and this older state must not replace theirs.
    Superseded,
}

#[derive(Clone)]
pub struct Counters {
    cache: Arc<dyn Cache>,
    /// Key prefix (tests and side-by-side environments); empty in production.
    prefix: String,
}

/// Feeds the background writer.
#[derive(Clone)]
pub struct CounterWriter {
    tx: tokio::sync::mpsc::UnboundedSender<(Vec<Key>, u64)>,
}

impl CounterWriter {
    pub fn touched(&self, keys: Vec<Key>, sequence: u64) {
        // The writer only stops with the process; a send error then is harmless.
        let _ = self.tx.send((keys, sequence));
    }
}

impl Counters {
    pub fn new(cache: Arc<dyn Cache>, prefix: &str) -> Self {
        Counters {
            cache,
            prefix: prefix.to_string(),
        }
    }

    /// The runbook's `quota:{subscription_id}:{event_type}` for the default tenant; other
    /// tenants' keys carry the tenant first, so one tenant can never touch another's counter
    /// by reusing its subscription ids.
    pub fn key(&self, tenant: &str, subscription_id: &str, event_type: &str) -> String {
        if tenant == creto_domain::metering::event::DEFAULT_TENANT {
            format!("{}quota:{subscription_id}:{event_type}", self.prefix)
        } else {
            format!(
                "{}tenant:{tenant}:quota:{subscription_id}:{event_type}",
                self.prefix
            )
        }
    }

    fn sequence_key(&self) -> String {
        format!("{}metering:counters:sequence", self.prefix)
    }

    /// The writes of the totals.
    fn writes(&self, rows: Vec<MonthTotal>) -> Vec<CacheWrite> {
        let month = chrono::Utc::now().format("%Y-%m").to_string();
        rows.into_iter()
            .map(|r| {
                let (tenant, subscription, event_type) = r.key;
                CacheWrite::Hash {
                    key: self.key(&tenant, &subscription, &event_type),
                    fields: vec![
                        ("month".into(), month.clone()),
                        ("quantity".into(), r.quantity),
                        ("count".into(), r.count.to_string()),
                        ("tenant".into(), tenant),
                    ],
                    ttl: Some(TTL),
                }
            })
            .collect()
    }

    fn record(&self, op: &str, ok: bool) {
        metrics::METERING_REDIS_OPERATIONS
            .with_label_values(&[op, metrics::status(ok)])
            .inc();
    }

    /// Writes the month-to-date totals of the keys a batch touched, read after the commit of
    /// `sequence`, unless the counters already reflect a later one (see [`Written`]).
    async fn refresh(
        &self,
        read_model: &dyn MeteringReadModel,
        keys: &[Key],
        sequence: u64,
    ) -> Written {
        let rows = match read_model.month_totals(Some(keys)).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "month totals query failed; retried with the next batch");
                return Written::Failed;
            }
        };
        let written = self
            .cache
            .write_unless_past(&self.sequence_key(), sequence, self.writes(rows), false)
            .await;
        self.record("set", written.is_ok());
        match written {
            Ok(true) => Written::Done,
            Ok(false) => Written::Superseded,
            Err(e) => {
                tracing::warn!(error = %e, "usage counters not updated; retried with the next batch");
                Written::Failed
            }
        }
    }

    /// Records that every counter reflects the log up to `sequence`, unless a later one.
    async fn mark(&self, sequence: u64) {
        let ok = self
            .cache
            .write_unless_past(&self.sequence_key(), sequence, Vec::new(), true)
            .await;
        self.record("set", ok.is_ok());
    }

    /// Starts the single background writer the projector feeds after each commit. Requests
    /// that pile up while it works, or within `WRITE_EVERY` of its last write, are merged,
    /// so the cache never slows the projection down and one writer means a later write always
    /// reflects a later state.
    pub fn spawn_writer(&self, read_model: Arc<dyn MeteringReadModel>) -> CounterWriter {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<Key>, u64)>();
        let counters = self.clone();
        tokio::spawn(async move {
            let mut last_write = tokio::time::Instant::now() - WRITE_EVERY;
            // Keys whose refresh failed: written with the next batch's, and until they are,
            // the stored sequence stays behind (an activation then rebuilds every counter).
            let mut failed: std::collections::HashSet<Key> = Default::default();
            while let Some((keys, mut sequence)) = rx.recv().await {
                tokio::time::sleep_until(last_write + WRITE_EVERY).await;
                last_write = tokio::time::Instant::now();
                let mut merged: std::collections::HashSet<Key> = keys.into_iter().collect();
                merged.extend(failed.drain());
                while let Ok((more, s)) = rx.try_recv() {
                    merged.extend(more);
                    sequence = sequence.max(s);
                }
                let keys: Vec<Key> = merged.into_iter().collect();
                let mut superseded = false;
                for chunk in keys.chunks(5_000) {
                    match counters.refresh(&*read_model, chunk, sequence).await {
                        Written::Done => {}
                        Written::Failed => failed.extend(chunk.iter().cloned()),
                        Written::Superseded => superseded = true,
                    }
                }
                if superseded {
                    // The counters reflect a later sequence: another instance projects now
                    // (this one's writes are older than its), or this one applies again what
                    // a database crash lost (its own later writes stand). Failed keys are
                    // kept for the next write either way.
                    tracing::info!(sequence, "usage counters already reflect a later sequence");
                } else if failed.is_empty() {
                    counters.mark(sequence).await;
                }
            }
        });
        CounterWriter { tx }
    }

    /// Rebuilds every current-month counter when the cache does not reflect `checkpoint`.
    pub async fn resync_if_behind(&self, read_model: &dyn MeteringReadModel, checkpoint: u64) {
        let at = self.cache.get(&self.sequence_key()).await;
        self.record("get", at.is_ok());
        if at.ok().flatten().and_then(|s| s.parse::<u64>().ok()) == Some(checkpoint) {
            return;
        }
        self.resync(read_model, Some(checkpoint)).await;
    }

    /// Rebuilds every current-month counter from the read model, whatever the counters
    /// reflected (a log recreated from zero included). With `checkpoint`, records that they
    /// reflect it; without, leaves the mark to the live projector (a CLI that changed the
    /// tables under it: a rebuild's switch, a re-applied range).
    pub async fn resync(&self, read_model: &dyn MeteringReadModel, checkpoint: Option<u64>) {
        match read_model.month_totals(None).await {
            Ok(rows) => {
                let n = rows.len();
                let mut writes = self.writes(rows);
                if let Some(checkpoint) = checkpoint {
                    writes.push(CacheWrite::Set {
                        key: self.sequence_key(),
                        value: checkpoint.to_string(),
                    });
                }
                let ok = self.cache.write(writes).await;
                self.record("set", ok.is_ok());
                tracing::info!(
                    keys = n,
                    checkpoint,
                    "usage counters rebuilt from the read model"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot rebuild usage counters"),
        }
    }

    /// Reads one counter: (month, quantity, count).
    pub async fn get(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_type: &str,
    ) -> Result<Option<(String, String, i64)>, CacheError> {
        let v = self
            .cache
            .hash(&self.key(tenant, subscription_id, event_type))
            .await?;
        Ok(match (v.get("month"), v.get("quantity"), v.get("count")) {
            (Some(m), Some(q), Some(c)) => Some((m.clone(), q.clone(), c.parse().unwrap_or(0))),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MemoryCache;
    use crate::metering::embedded::SledReadModel;

    /// Two writers of the same counters, as a former leader and the one that took over: the
    /// former's last write, at an older sequence, arrives after the new one's and is refused
    /// (it used to put the mark back, and with it older totals).
    #[tokio::test]
    async fn a_former_leaders_late_write_does_not_replace_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let read_model: Arc<dyn MeteringReadModel> =
            Arc::new(SledReadModel::open(dir.path()).unwrap());
        let counters = Counters::new(Arc::new(MemoryCache::new()), "t:");
        let key: Key = ("default".into(), "sub".into(), "calls".into());
        let mark = || async { counters.cache.get(&counters.sequence_key()).await.unwrap() };
        let (former, newer) = (
            counters.spawn_writer(read_model.clone()),
            counters.spawn_writer(read_model.clone()),
        );
        newer.touched(vec![key.clone()], 10);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while mark().await.as_deref() != Some("10") {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", mark().await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        former.touched(vec![key.clone()], 3);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(mark().await.as_deref(), Some("10"));
        // Led again later, it writes again.
        former.touched(vec![key], 11);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while mark().await.as_deref() != Some("11") {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", mark().await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
