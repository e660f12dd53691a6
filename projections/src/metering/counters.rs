//! Current-period usage counters in Redis under the runbook's key shape
//! `quota:{subscription_id}:{event_type}` (a hash: `month`, `quantity`, `count`, `tenant`).
//!
//! Values are absolute totals read back from Postgres after the commit, so writing them twice
//! is harmless; `metering:counters:sequence` records the checkpoint they reflect, and a
//! projector that finds Redis behind (a flush, a crash between commit and write) rebuilds them.
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::metrics;

#[derive(Clone)]
pub struct Counters {
    redis: ConnectionManager,
    /// Key prefix (tests and side-by-side environments); empty in production.
    prefix: String,
}

type Row = (String, String, String, i64, String);
/// (tenant, subscription_id, event_type)
pub type Key = (String, String, String);

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

const MONTH_TOTALS: &str = "SELECT h.tenant, h.subscription_id, h.event_type, sum(h.event_count)::int8, sum(h.quantity_sum)::text
     FROM usage_hourly h
     JOIN (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[], $3::text[])) AS k(tenant, subscription_id, event_type)
       ON (h.tenant, h.subscription_id, h.event_type) = (k.tenant, k.subscription_id, k.event_type)
     WHERE h.hour >= date_trunc('month', now(), 'UTC')
     GROUP BY 1, 2, 3";

const ALL_MONTH_TOTALS: &str =
    "SELECT tenant, subscription_id, event_type, sum(event_count)::int8, sum(quantity_sum)::text
     FROM usage_hourly WHERE hour >= date_trunc('month', now(), 'UTC') GROUP BY 1, 2, 3";

impl Counters {
    pub fn new(redis: ConnectionManager, prefix: &str) -> Self {
        Counters {
            redis,
            prefix: prefix.to_string(),
        }
    }

    pub fn key(&self, subscription_id: &str, event_type: &str) -> String {
        format!("{}quota:{subscription_id}:{event_type}", self.prefix)
    }

    fn sequence_key(&self) -> String {
        format!("{}metering:counters:sequence", self.prefix)
    }

    async fn write(&self, rows: Vec<Row>, sequence: u64) -> redis::RedisResult<()> {
        let month = chrono::Utc::now().format("%Y-%m").to_string();
        let mut pipe = redis::pipe();
        for (tenant, subscription, event_type, count, quantity) in rows {
            let key = self.key(&subscription, &event_type);
            pipe.hset_multiple(
                &key,
                &[
                    ("month", month.as_str()),
                    ("quantity", &quantity),
                    ("count", &count.to_string()),
                    ("tenant", &tenant),
                ],
            )
            .ignore()
            .expire(&key, 40 * 24 * 3600)
            .ignore();
        }
        pipe.set(self.sequence_key(), sequence).ignore();
        let mut conn = self.redis.clone();
        pipe.query_async::<()>(&mut conn).await
    }

    fn record(&self, op: &str, ok: bool) {
        metrics::METERING_REDIS_OPERATIONS
            .with_label_values(&[op, metrics::status(ok)])
            .inc();
    }

    /// Writes the month-to-date totals of the keys a batch touched.
    pub async fn refresh(&self, pool: &PgPool, keys: &[(String, String, String)], sequence: u64) {
        let (t, s, e): (Vec<_>, Vec<_>, Vec<_>) =
            keys.iter()
                .cloned()
                .fold((vec![], vec![], vec![]), |mut acc, k| {
                    acc.0.push(k.0);
                    acc.1.push(k.1);
                    acc.2.push(k.2);
                    acc
                });
        let rows: Result<Vec<Row>, _> = sqlx::query_as(MONTH_TOTALS)
            .bind(&t)
            .bind(&s)
            .bind(&e)
            .fetch_all(pool)
            .await;
        match rows {
            Ok(rows) => {
                let ok = self.write(rows, sequence).await;
                if let Err(e) = &ok {
                    tracing::warn!(error = %e, "redis counters not updated; they will be rebuilt");
                }
                self.record("set", ok.is_ok());
            }
            Err(e) => tracing::warn!(error = %e, "month totals query failed"),
        }
    }

    /// Starts the single background writer the projector feeds after each commit. Requests
    /// that pile up while it works are merged, so Redis never slows the projection down and one
    /// writer means a later write always reflects a later state.
    pub fn spawn_writer(&self, pool: PgPool) -> CounterWriter {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<Key>, u64)>();
        let counters = self.clone();
        tokio::spawn(async move {
            while let Some((keys, mut sequence)) = rx.recv().await {
                let mut merged: std::collections::HashSet<Key> = keys.into_iter().collect();
                while let Ok((more, s)) = rx.try_recv() {
                    merged.extend(more);
                    sequence = sequence.max(s);
                }
                let keys: Vec<Key> = merged.into_iter().collect();
                for chunk in keys.chunks(5_000) {
                    counters.refresh(&pool, chunk, sequence).await;
                }
            }
        });
        CounterWriter { tx }
    }

    /// Rebuilds every current-month counter when Redis does not reflect `checkpoint`.
    pub async fn resync_if_behind(&self, pool: &PgPool, checkpoint: u64) {
        let mut conn = self.redis.clone();
        let at: Option<u64> = redis::cmd("GET")
            .arg(self.sequence_key())
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        self.record("get", true);
        if at == Some(checkpoint) {
            return;
        }
        match sqlx::query_as::<_, Row>(ALL_MONTH_TOTALS)
            .fetch_all(pool)
            .await
        {
            Ok(rows) => {
                let n = rows.len();
                let ok = self.write(rows, checkpoint).await;
                self.record("set", ok.is_ok());
                tracing::info!(
                    keys = n,
                    checkpoint,
                    "redis counters rebuilt from usage_hourly"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot rebuild redis counters"),
        }
    }

    /// Reads one counter: (month, quantity, count).
    pub async fn get(
        &self,
        subscription_id: &str,
        event_type: &str,
    ) -> redis::RedisResult<Option<(String, String, i64)>> {
        let mut conn = self.redis.clone();
        let v: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key(subscription_id, event_type))
            .query_async(&mut conn)
            .await?;
        Ok(match (v.get("month"), v.get("quantity"), v.get("count")) {
            (Some(m), Some(q), Some(c)) => Some((m.clone(), q.clone(), c.parse().unwrap_or(0))),
            _ => None,
        })
    }
}
