//! What the platform runs on: either the services (NATS JetStream, PostgreSQL, Redis), each
//! connection failing with the URL that failed and what to do about it, or the embedded
//! default (sled and in-process memory under one data directory). Every port has both.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use creto_projections::archive::{Archive, LocalDirArchive, S3Archive, S3Settings};
use creto_projections::cache::{Cache, MemoryCache, RedisCache};
use creto_projections::metering::counters::Counters;
use creto_projections::metering::embedded::{SledProjector, SledReadModel};
use creto_projections::metering::{MeteringProjector, MeteringReadModel, PgReadModel};
use creto_projections::postgres;
use creto_projections::runner::Leadership;
use creto_projections::Projector;
use creto_streams::embedded::SledLog;
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
    #[error("{0}")]
    Embedded(String),
}

/// The adapters behind the ports.
#[derive(Clone)]
pub enum Stores {
    /// NATS JetStream, PostgreSQL and Redis.
    Services {
        pool: PgPool,
        redis: ConnectionManager,
    },
    /// The embedded default: everything in this process, under `dir`.
    Embedded {
        dir: PathBuf,
        metering: Arc<SledReadModel>,
    },
}

pub struct Platform {
    pub settings: Settings,
    pub catalog: Catalog,
    pub log: Arc<dyn EventLog>,
    pub cache: Arc<dyn Cache>,
    pub metering: Arc<dyn MeteringReadModel>,
    /// Where audit exports and backups go: S3 when `S3_BUCKET` is set, a local directory
    /// when embedded.
    pub archive: Option<Arc<dyn Archive>>,
    pub stores: Stores,
}

pub async fn connect_log(settings: &Settings) -> Result<Arc<dyn EventLog>, ConnectError> {
    let log = JetStreamLog::connect(
        &settings.nats_url,
        &settings.nats_credentials,
        settings.catalog(),
    )
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

/// `REDIS_POOL_SIZE` connections: the one already checked, and more of the same.
async fn redis_pool(
    settings: &Settings,
    first: &ConnectionManager,
) -> Result<Vec<ConnectionManager>, ConnectError> {
    let mut pool = vec![first.clone()];
    while pool.len() < settings.redis_pool_size as usize {
        pool.push(connect_redis(settings).await?);
    }
    Ok(pool)
}

impl Platform {
    /// Connects to NATS, Redis, then PostgreSQL (creating and migrating the database last, so
    /// an unreachable service fails the start before anything is written).
    pub async fn connect(settings: Settings) -> Result<Platform, ConnectError> {
        let log = connect_log(&settings).await?;
        let redis = connect_redis(&settings).await?;
        let redis_pool = redis_pool(&settings, &redis).await?;
        let pool = connect_postgres(&settings).await?;
        Ok(Platform {
            catalog: settings.catalog(),
            settings,
            log,
            cache: Arc::new(RedisCache::new(redis_pool)),
            metering: Arc::new(PgReadModel::new(pool.clone())),
            archive: S3Settings::from_env()
                .map(|s| Arc::new(S3Archive::new(s)) as Arc<dyn Archive>),
            stores: Stores::Services { pool, redis },
        })
    }

    /// Opens the embedded default under `dir` (created if missing, owner-only): the log in `dir/log`,
    /// the read models in `dir/read-models`, the archive in `dir/archive`, the cache in
    /// memory. Streams are created.
    pub async fn open_embedded(settings: Settings, dir: &Path) -> Result<Platform, ConnectError> {
        let embedded = |e: &dyn std::fmt::Display| ConnectError::Embedded(e.to_string());
        create_private_dir(dir).map_err(|e| {
            ConnectError::Embedded(format!(
                "cannot create the data directory {} ({e}); choose another with --data-dir",
                dir.display()
            ))
        })?;
        let catalog = settings.catalog();
        let log = SledLog::open(&dir.join("log"), catalog.clone()).map_err(|e| embedded(&e))?;
        log.ensure_streams(&catalog.specs())
            .await
            .map_err(|e| embedded(&e))?;
        let metering =
            Arc::new(SledReadModel::open(&dir.join("read-models")).map_err(|e| embedded(&e))?);
        Ok(Platform {
            catalog,
            settings,
            log: Arc::new(log),
            cache: Arc::new(MemoryCache::new()),
            metering: metering.clone(),
            archive: Some(Arc::new(LocalDirArchive::new(dir.join("archive")))),
            stores: Stores::Embedded {
                dir: dir.to_path_buf(),
                metering,
            },
        })
    }

    /// The PostgreSQL pool, when running on the services.
    pub fn pool(&self) -> Option<&PgPool> {
        match &self.stores {
            Stores::Services { pool, .. } => Some(pool),
            Stores::Embedded { .. } => None,
        }
    }

    pub fn leadership(&self) -> Leadership {
        match &self.stores {
            Stores::Services { pool, .. } => Leadership::Postgres(pool.clone()),
            Stores::Embedded { .. } => Leadership::Process,
        }
    }

    /// The live metering projector for these stores, with its usage counters.
    pub fn metering_projector(&self) -> Arc<dyn Projector> {
        let s = &self.settings;
        let counters = Counters::new(self.cache.clone(), &s.redis_prefix());
        match &self.stores {
            Stores::Services { pool, .. } => Arc::new(
                MeteringProjector::new(
                    pool.clone(),
                    self.log.clone(),
                    self.catalog.clone(),
                    s.limits,
                )
                .with_counters(counters)
                .with_label_limit(s.metrics_subscription_label_limit),
            ),
            Stores::Embedded { metering, .. } => Arc::new(
                SledProjector::new(
                    metering.clone(),
                    self.log.clone(),
                    self.catalog.clone(),
                    s.limits,
                )
                .with_counters(counters)
                .with_label_limit(s.metrics_subscription_label_limit),
            ),
        }
    }
}

/// Creates `dir` and its missing parents readable by their owner only: the embedded default
/// keeps every tenant's events, the read models, the archive (runtime checkpoints included)
/// and its secrets there, which the services keep behind PostgreSQL's, NATS's and S3's access
/// control. A directory that exists is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}
