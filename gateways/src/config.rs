//! Configuration: flags, then environment, then an optional TOML file, then defaults.
use std::path::{Path, PathBuf};

use creto_domain::metering::IngestLimits;
use creto_streams::jetstream::NatsCredentials;
use serde::Deserialize;

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/enablement";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Connection settings shared by every subcommand (flags and their environment variables).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectArgs {
    /// NATS server with JetStream: a URL, or several separated by commas.
    #[arg(long, env = "NATS_URL", global = true, hide_env_values = true)]
    pub nats_url: Option<String>,
    /// A NATS `.creds` file (JWT mode: `nsc generate creds`).
    #[arg(
        long,
        env = "NATS_CREDS",
        global = true,
        conflicts_with = "nats_nkey_seed_file"
    )]
    pub nats_creds: Option<PathBuf>,
    /// A file holding the NATS user's nkey seed (`SU...`), for `ops/nats/accounts.conf`'s
    /// nkey users.
    #[arg(long, env = "NATS_NKEY_SEED_FILE", global = true)]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// PostgreSQL for the read models; the database is created if missing.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis for shared counters.
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Optional TOML file with the same settings (snake_case keys); flags and environment win.
    #[arg(long, env = "ENABLEMENT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Prefix for stream names, subjects and Redis keys, to run side by side with another
    /// environment on the same servers (tests use it).
    #[arg(long, env = "ENABLEMENT_NAMESPACE", global = true)]
    pub namespace: Option<String>,
    /// PostgreSQL connections per process.
    #[arg(long, env = "DATABASE_POOL_SIZE", global = true)]
    pub database_pool_size: Option<u32>,
    /// Redis connections per process (each multiplexes many requests).
    #[arg(long, env = "REDIS_POOL_SIZE", global = true)]
    pub redis_pool_size: Option<u32>,
    /// Replicas of each stream `streams init` creates: 1 on a single server, 3 on a cluster.
    #[arg(long, env = "ENABLEMENT_STREAM_REPLICAS", global = true)]
    pub stream_replicas: Option<usize>,
}

/// The optional file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    nats_url: Option<String>,
    database_url: Option<String>,
    redis_url: Option<String>,
    namespace: Option<String>,
    database_pool_size: Option<u32>,
    redis_pool_size: Option<u32>,
    stream_replicas: Option<usize>,
    late_window_hours: Option<i64>,
    max_event_bytes: Option<usize>,
    metrics_subscription_label_limit: Option<usize>,
    messaging_max_message_bytes: Option<usize>,
    messaging_max_ttl_hours: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub nats_url: String,
    pub nats_credentials: creto_streams::jetstream::NatsCredentials,
    pub database_url: String,
    pub redis_url: String,
    pub namespace: Option<String>,
    pub database_pool_size: u32,
    pub redis_pool_size: u32,
    pub stream_replicas: usize,
    pub limits: IngestLimits,
    /// Distinct `subscription_id` label values before the rest are counted as `other`.
    pub metrics_subscription_label_limit: usize,
    /// What a Send may carry: ciphertext size and message life.
    pub messaging: creto_domain::messaging::MessagingLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("config file {path} is not valid: {detail}")]
    Parse { path: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

impl Settings {
    pub fn resolve(args: &ConnectArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let pick = |flag: &Option<String>, file: Option<String>, default: &str| {
            flag.clone().or(file).unwrap_or_else(|| default.to_string())
        };
        let mut limits = IngestLimits::default();
        if let Some(h) = file.late_window_hours {
            // A typo must not quietly become another window (a negative one was 0: every
            // late event refused).
            if !(0..=24 * 366).contains(&h) {
                return Err(ConfigError::Invalid(format!(
                    "late_window_hours = {h}: choose 0 to 8784 (hours an event may arrive after its time)"
                )));
            }
            limits.late_window = chrono::Duration::hours(h);
        }
        if let Some(b) = file.max_event_bytes {
            limits.max_bytes = b;
        }
        let mut messaging = creto_domain::messaging::MessagingLimits::default();
        if let Some(b) = file.messaging_max_message_bytes {
            // The MESSAGING stream stores at most 1 MiB per message, envelope included.
            if !(1..=900 * 1024).contains(&b) {
                return Err(ConfigError::Invalid(format!(
                    "messaging_max_message_bytes = {b}: choose 1 to 921600 (the stream stores at most 1 MiB per message)"
                )));
            }
            messaging.max_ciphertext_bytes = b;
        }
        if let Some(h) = file.messaging_max_ttl_hours {
            if !(1..=24 * 365).contains(&h) {
                return Err(ConfigError::Invalid(format!(
                    "messaging_max_ttl_hours = {h}: choose 1 to 8760"
                )));
            }
            messaging.max_ttl = std::time::Duration::from_secs(h * 3600);
        }
        Ok(Settings {
            nats_url: pick(&args.nats_url, file.nats_url, DEFAULT_NATS_URL),
            nats_credentials: match (&args.nats_creds, &args.nats_nkey_seed_file) {
                (Some(creds), _) => NatsCredentials::CredsFile(creds.clone()),
                (None, Some(seed)) => NatsCredentials::NkeySeedFile(seed.clone()),
                (None, None) => NatsCredentials::None,
            },
            database_url: pick(&args.database_url, file.database_url, DEFAULT_DATABASE_URL),
            redis_url: pick(&args.redis_url, file.redis_url, DEFAULT_REDIS_URL),
            namespace: args
                .namespace
                .clone()
                .or(file.namespace)
                .filter(|n| !n.is_empty()),
            database_pool_size: args
                .database_pool_size
                .or(file.database_pool_size)
                .unwrap_or(10),
            redis_pool_size: args
                .redis_pool_size
                .or(file.redis_pool_size)
                .unwrap_or(4)
                .max(1),
            stream_replicas: args.stream_replicas.or(file.stream_replicas).unwrap_or(1),
            limits,
            metrics_subscription_label_limit: file
                .metrics_subscription_label_limit
                .unwrap_or(1_000),
            messaging,
        })
    }

    pub fn catalog(&self) -> creto_streams::Catalog {
        let catalog = match &self.namespace {
            Some(ns) => creto_streams::Catalog::namespaced(ns),
            None => creto_streams::Catalog::default(),
        };
        catalog.with_replicas(self.stream_replicas)
    }

    /// Prefix of Redis keys (empty without a namespace).
    pub fn redis_prefix(&self) -> String {
        self.namespace
            .as_ref()
            .map(|n| format!("{n}:"))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "nats_url = \"nats://file:4222\"\nredis_url = \"redis://file\"\nlate_window_hours = 2\nstream_replicas = 3\n").unwrap();
        let args = ConnectArgs {
            nats_url: Some("nats://flag:4222".into()),
            config: Some(path),
            ..Default::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.nats_url, "nats://flag:4222");
        assert_eq!(s.redis_url, "redis://file");
        assert_eq!(s.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(s.limits.late_window, chrono::Duration::hours(2));
        assert!(s.catalog().specs().iter().all(|spec| spec.replicas == 3));
    }

    #[test]
    fn unknown_keys_in_the_file_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "nats = \"typo\"\n").unwrap();
        let err = Settings::resolve(&ConnectArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
