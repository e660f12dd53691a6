//! Connections to the services the platform runs on, each failing with the URL that failed
//! and what to do about it.
use std::sync::Arc;
use std::time::Duration;

use creto_projections::postgres;
use creto_streams::jetstream::JetStreamLog;
use creto_streams::{Catalog, EventLog};
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Nats(String),
    #[error("{0}")]
    Postgres(#[from] postgres::PgError),
    #[error("cannot reach Redis at {url} ({detail}); start redis-server or set REDIS_URL")]
    Redis { url: String, detail: String },
}

pub struct Platform {
    pub settings: Settings,
    pub catalog: Catalog,
    pub log: Arc<dyn EventLog>,
    pub pool: PgPool,
    pub redis: ConnectionManager,
}

pub async fn connect_log(settings: &Settings) -> Result<Arc<dyn EventLog>, ConnectError> {
    let log = JetStreamLog::connect(&settings.nats_url, settings.catalog())
        .await
        .map_err(|e| {
            ConnectError::Nats(
                e.to_string()
                    .trim_start_matches("log unavailable: ")
                    .to_string(),
            )
        })?;
    Ok(Arc::new(log))
}

pub async fn connect_postgres(settings: &Settings) -> Result<PgPool, ConnectError> {
    let pool = postgres::connect(&settings.database_url, settings.database_pool_size).await?;
    postgres::migrate(&pool).await?;
    Ok(pool)
}

pub async fn connect_redis(settings: &Settings) -> Result<ConnectionManager, ConnectError> {
    let err = |detail: String| ConnectError::Redis {
        url: postgres::redact(&settings.redis_url),
        detail,
    };
    let client =
        redis::Client::open(settings.redis_url.as_str()).map_err(|e| err(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(5), client.get_connection_manager()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => Err(err("timed out after 5 s".into())),
    }
}

impl Platform {
    /// Connects to NATS, Redis, then PostgreSQL (creating and migrating the database last, so
    /// an unreachable service fails the start before anything is written).
    pub async fn connect(settings: Settings) -> Result<Platform, ConnectError> {
        let log = connect_log(&settings).await?;
        let redis = connect_redis(&settings).await?;
        let pool = connect_postgres(&settings).await?;
        Ok(Platform {
            catalog: settings.catalog(),
            settings,
            log,
            pool,
            redis,
        })
    }
}
