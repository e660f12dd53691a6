//! PostgreSQL: connecting with errors that say what to do, migrations, blue/green schemas.
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The metering read-model DDL, re-run inside a fresh schema by a rebuild.
pub const METERING_DDL: &str = include_str!("../migrations/0002_metering.sql");
pub const CHECKPOINT_DDL: &str = include_str!("../migrations/0001_checkpoints.sql");
/// Corrections, plans and invoices: rebuilt with the metering read model.
pub const BILLING_DDL: &str = include_str!("../migrations/0005_billing.sql");
/// Byte-order keys for the tables of the two files above.
pub const METERING_KEYS_DDL: &str = include_str!("../migrations/0007_metering_byte_order_keys.sql");
/// Month-to-date usage per key, filled from `usage_hourly`.
pub const USAGE_MONTHLY_DDL: &str = include_str!("../migrations/0010_usage_monthly.sql");

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot reach PostgreSQL at {url} ({detail}); start PostgreSQL or set DATABASE_URL")]
    Unreachable { url: String, detail: String },
    #[error("DATABASE_URL {url} is not a valid PostgreSQL URL: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// The URL with any password hidden, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Connects, creating the database first if the server is up but the database is missing,
/// so that an empty server is enough. `PGPASSWORD` supplies a password the URL leaves out.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, PgError> {
    let shown = redact(url);
    let mut options = PgConnectOptions::from_str(url)
        .map_err(|e| PgError::BadUrl {
            url: shown.clone(),
            detail: e.to_string(),
        })?
        .log_statements(tracing::log::LevelFilter::Trace)
        .options([("timezone", "UTC")]);
    if let Ok(password) = std::env::var("PGPASSWORD") {
        if !url.contains('@') || !url.split('@').next().unwrap_or("").contains(':') {
            options = options.password(&password);
        }
    }
    let pool = || {
        PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
    };
    // One direct attempt first: a pool only reports "timed out", the connection says why.
    let probe = tokio::time::timeout(Duration::from_secs(5), options.connect()).await;
    match probe {
        Err(_) => {
            return Err(PgError::Unreachable {
                url: shown,
                detail: "timed out after 5 s".into(),
            })
        }
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("3D000") => {}
        Ok(Err(e)) => {
            return Err(PgError::Unreachable {
                url: shown,
                detail: e.to_string(),
            })
        }
        Ok(Ok(c)) => {
            let _ = c.close().await;
        }
    }
    match pool().connect_with(options.clone()).await {
        Ok(p) => Ok(p),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let database = options.get_database().unwrap_or("enablement").to_string();
            let admin = pool()
                .max_connections(1)
                .connect_with(options.clone().database("postgres"))
                .await
                .map_err(|e| PgError::Unreachable {
                    url: shown.clone(),
                    detail: e.to_string(),
                })?;
            let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
            if let Err(e) = admin.execute(create.as_str()).await {
                // Another process may have created it between our two attempts.
                if !e.to_string().contains("already exists") {
                    return Err(PgError::Unreachable {
                        url: shown,
                        detail: e.to_string(),
                    });
                }
            }
            tracing::info!(%database, "created database");
            pool()
                .connect_with(options)
                .await
                .map_err(|e| PgError::Unreachable {
                    url: shown,
                    detail: e.to_string(),
                })
        }
        Err(e) => Err(PgError::Unreachable {
            url: shown,
            detail: e.to_string(),
        }),
    }
}

pub async fn migrate(pool: &PgPool) -> Result<Vec<String>, PgError> {
    let before: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| PgError::Migration(e.to_string()))?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| !before.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect())
}

/// A valid, quoted schema identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
