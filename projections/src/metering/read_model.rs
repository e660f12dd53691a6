//! The metering read-model port: what the gateway and the quota counters read. PostgreSQL in
//! production ([`PgReadModel`], SQL in `query`), sled in the embedded default
//! (`metering::embedded`). Both answer the same property tests.
use std::time::{Duration, Instant};

use async_trait::async_trait;
use creto_domain::metering::Meter;
use sqlx::PgPool;

use super::query::{self, UsageQuery, UsageRow};
use crate::runner::ProjectionError;

/// (tenant, subscription_id, event_type)
pub type Key = (String, String, String);

/// Month-to-date usage of one key (UTC calendar month).
#[derive(Debug, Clone, PartialEq)]
pub struct MonthTotal {
    pub key: Key,
    pub count: i64,
    /// Decimal text: exact in PostgreSQL, shortest round-trip of the f64 sum embedded.
    pub quantity: String,
}

#[async_trait]
pub trait MeteringReadModel: Send + Sync + 'static {
    /// Last stream sequence applied.
    async fn checkpoint(&self) -> Result<u64, ProjectionError>;
    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, ProjectionError>;
    async fn meter(&self, tenant: &str, slug: &str) -> Result<Option<Meter>, ProjectionError>;
    async fn meters(&self, tenant: &str) -> Result<Vec<Meter>, ProjectionError>;
    /// Which (subscription, id) pairs of `tenant` were already applied: lets the gateway
    /// answer "duplicate" for an id seen long after the log's duplicate window.
    async fn existing_ids(
        &self,
        tenant: &str,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ProjectionError>;
    /// Month-to-date totals of `keys`, zero for a key without usage this month (all keys with
    /// usage when `None`).
    async fn month_totals(&self, keys: Option<&[Key]>) -> Result<Vec<MonthTotal>, ProjectionError>;
    /// Corrections, plans and invoices (`metering::billing`).
    fn billing(&self) -> &dyn super::billing::BillingReadModel;
}

/// Waits until the read model has applied `sequence` or `deadline` passes; returns where it is.
pub async fn wait_for(
    read_model: &dyn MeteringReadModel,
    sequence: u64,
    deadline: Duration,
) -> Result<u64, ProjectionError> {
    let until = Instant::now() + deadline;
    loop {
        let at = read_model.checkpoint().await?;
        if at >= sequence || Instant::now() >= until {
            return Ok(at);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The PostgreSQL read model (schema `public`).
#[derive(Clone)]
pub struct PgReadModel {
    pub pool: PgPool,
    /// Usage queries at once: half the pool, so that slow ones leave connections to the
    /// ingestion path's duplicate lookups and the billing reads.
    usage_queries: std::sync::Arc<tokio::sync::Semaphore>,
}

impl PgReadModel {
    pub fn new(pool: PgPool) -> Self {
        let permits = (pool.options().get_max_connections() as usize / 2).max(1);
        PgReadModel {
            pool,
            usage_queries: std::sync::Arc::new(tokio::sync::Semaphore::new(permits)),
        }
    }
}

#[async_trait]
impl MeteringReadModel for PgReadModel {
    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        super::batch::live_checkpoint(&self.pool).await
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, ProjectionError> {
        let _turn = self
            .usage_queries
            .acquire()
            .await
            .expect("the semaphore is never closed");
        Ok(query::usage(&self.pool, q).await?)
    }

    async fn meter(&self, tenant: &str, slug: &str) -> Result<Option<Meter>, ProjectionError> {
        Ok(query::meter(&self.pool, tenant, slug).await?)
    }

    async fn meters(&self, tenant: &str) -> Result<Vec<Meter>, ProjectionError> {
        Ok(query::meters(&self.pool, tenant).await?)
    }

    async fn existing_ids(
        &self,
        tenant: &str,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ProjectionError> {
        Ok(query::existing_ids(&self.pool, tenant, keys).await?)
    }

    async fn month_totals(&self, keys: Option<&[Key]>) -> Result<Vec<MonthTotal>, ProjectionError> {
        Ok(query::month_totals(&self.pool, keys).await?)
    }

    fn billing(&self) -> &dyn super::billing::BillingReadModel {
        self
    }
}
