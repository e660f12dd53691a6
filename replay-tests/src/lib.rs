//! Test harness: an isolated environment per test on the real services. Each gets its own
//! PostgreSQL database, stream namespace and Redis key prefix, so tests run in parallel and a
//! developer's data is never touched.
pub mod drills;
pub mod faulty_log;

use std::sync::Arc;
use std::time::Duration;

use creto_gateways::config::{ConnectArgs, Settings};
use creto_gateways::platform::{Platform, Stores};
use creto_gateways::server::{self, Running, ServeOptions};
use creto_schemas::metering::v1::metering_service_client::MeteringServiceClient;
use sqlx::Executor;
use tonic::transport::Channel;

/// Instantiates each `async fn name(env: &Env)` of a test file twice: `jetstream::name` on the
/// services and `embedded::name` on the embedded adapters, each with its own environment.
#[macro_export]
macro_rules! on_both_adapters {
    ($($name:ident),* $(,)?) => {
        mod jetstream {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let env = creto_replay_tests::Env::new().await;
                super::$name(&env).await;
                env.drop().await;
            })*
        }
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let env = creto_replay_tests::Env::embedded().await;
                super::$name(&env).await;
                env.drop().await;
            })*
        }
    };
}

/// A gateway on spare loopback ports.
fn spare_ports(projectors: bool) -> ServeOptions {
    ServeOptions {
        gateways: true,
        projectors,
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
    }
}

/// Authentication explicitly off: every caller is an admin of tenant `default`.
fn no_auth() -> std::sync::Arc<creto_gateways::auth::layer::Auth> {
    creto_gateways::auth::AuthArgs::disabled()
        .build(None)
        .unwrap()
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Removes one message from a JetStream stream, as an operator would with `nats stream rmm`.
pub async fn remove_message(stream: &str, sequence: u64) {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let s = js.get_stream(stream).await.unwrap();
    assert!(
        s.delete_message(sequence).await.unwrap(),
        "{stream} {sequence}"
    );
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct Env {
    pub name: String,
    pub settings: Settings,
    pub platform: Arc<Platform>,
    /// The data directory of an embedded environment, removed with it.
    dir: Option<tempfile::TempDir>,
}

impl Env {
    /// A fresh environment: database created and migrated, streams created.
    pub async fn new() -> Env {
        let name = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let database_url = admin_url()
            .rsplit_once('/')
            .map(|(base, _)| format!("{base}/enablement_{name}"))
            .unwrap();
        let args = ConnectArgs {
            nats_url: Some(nats_url()),
            database_url: Some(database_url),
            redis_url: Some(
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            ),
            namespace: Some(name.clone()),
            database_pool_size: Some(8),
            redis_pool_size: Some(2),
            stream_replicas: None,
            config: None,
            ..Default::default()
        };
        let settings = Settings::resolve(&args).unwrap();
        let platform = Arc::new(
            Platform::connect(settings.clone())
                .await
                .expect("services reachable (run .ci/services.sh)"),
        );
        platform
            .log
            .ensure_streams(&platform.catalog.specs())
            .await
            .unwrap();
        Env {
            name,
            settings,
            platform,
            dir: None,
        }
    }

    /// A fresh embedded environment (sled log and read models, in-process cache) in a
    /// temporary directory: the adapters of `enablement dev`.
    pub async fn embedded() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("enablement-dev-")
            .tempdir()
            .unwrap();
        let settings = Settings::resolve(&ConnectArgs::default()).unwrap();
        let platform = Arc::new(
            Platform::open_embedded(settings.clone(), dir.path())
                .await
                .expect("embedded stores open"),
        );
        Env {
            name: "embedded".into(),
            settings,
            platform,
            dir: Some(dir),
        }
    }

    /// The PostgreSQL pool of an environment on the services.
    pub fn pool(&self) -> &sqlx::PgPool {
        self.platform
            .pool()
            .expect("this test needs PostgreSQL: use Env::new(), not Env::embedded()")
    }

    pub fn subject(&self, logical: &str) -> String {
        self.platform.catalog.subject(logical)
    }

    /// Starts metering (gateway + projector) on spare ports, explicitly unauthenticated
    /// (every caller is an admin of tenant `default`): for tests of other concerns.
    pub async fn start_metering(
        &self,
        projectors: bool,
    ) -> (Running, MeteringServiceClient<Channel>) {
        let auth = no_auth();
        let running = self.start_metering_with(projectors, auth).await;
        let url = format!("http://{}", running.grpc_addr.unwrap());
        let client = MeteringServiceClient::connect(url).await.unwrap();
        (running, client)
    }

    /// Starts metering with the given authentication, authorization and rate limits.
    pub async fn start_metering_with(
        &self,
        projectors: bool,
        auth: std::sync::Arc<creto_gateways::auth::layer::Auth>,
    ) -> Running {
        server::start_metering(self.platform.clone(), spare_ports(projectors), auth)
            .await
            .unwrap()
    }

    /// Starts the messaging gateway on spare ports, explicitly unauthenticated (every caller is
    /// an admin of tenant `default`); returns it and its URL.
    pub async fn start_messaging(&self) -> (Running, String) {
        let auth = no_auth();
        let running = self.start_messaging_with(auth).await;
        let url = format!("http://{}", running.grpc_addr.unwrap());
        (running, url)
    }

    /// Starts the messaging gateway with the given authentication and authorization.
    pub async fn start_messaging_with(
        &self,
        auth: std::sync::Arc<creto_gateways::auth::layer::Auth>,
    ) -> Running {
        server::start_messaging(self.platform.clone(), spare_ports(false), auth)
            .await
            .unwrap()
    }

    /// Starts the oversight gateway (view, timers) on spare ports, explicitly unauthenticated
    /// (every caller is an admin of tenant `default`); returns it and its URL.
    pub async fn start_oversight(&self) -> (Running, String) {
        let running = self.start_oversight_notifying(Default::default()).await;
        let url = format!("http://{}", running.grpc_addr.unwrap());
        (running, url)
    }

    /// [`Self::start_oversight`], announcing requests on `notify`'s channels.
    pub async fn start_oversight_notifying(
        &self,
        notify: creto_gateways::oversight::notify::NotifyConfig,
    ) -> Running {
        self.start_oversight_with(no_auth(), notify).await
    }

    /// [`Self::start_oversight_notifying`] on `platform` ([`Self::platform_with_log`]).
    pub async fn start_oversight_on(
        &self,
        platform: Arc<Platform>,
        notify: creto_gateways::oversight::notify::NotifyConfig,
    ) -> Running {
        server::start_oversight(platform, spare_ports(false), no_auth(), notify)
            .await
            .unwrap()
    }

    /// Starts oversight with the given authentication and notification channels.
    pub async fn start_oversight_with(
        &self,
        auth: std::sync::Arc<creto_gateways::auth::layer::Auth>,
        notify: creto_gateways::oversight::notify::NotifyConfig,
    ) -> Running {
        server::start_oversight(self.platform.clone(), spare_ports(false), auth, notify)
            .await
            .unwrap()
    }

    /// The runtime on spare ports with sandboxes under `dir`, warm pool `pool` (`base=1`).
    pub async fn start_runtime(&self, dir: &std::path::Path, pool: &str) -> (Running, String) {
        let running = self.start_runtime_with(dir, pool, no_auth()).await;
        let url = format!("http://{}", running.grpc_addr.unwrap());
        (running, url)
    }

    pub async fn start_runtime_with(
        &self,
        dir: &std::path::Path,
        pool: &str,
        auth: std::sync::Arc<creto_gateways::auth::layer::Auth>,
    ) -> Running {
        self.runtime_on(dir, pool, auth, Default::default()).await
    }

    /// [`Self::start_runtime`] without a warm pool, with limits other than the defaults.
    pub async fn start_runtime_limited(
        &self,
        dir: &std::path::Path,
        limits: creto_domain::runtime::sandbox::RuntimeLimits,
    ) -> (Running, String) {
        let running = self.runtime_on(dir, "", no_auth(), limits).await;
        let url = format!("http://{}", running.grpc_addr.unwrap());
        (running, url)
    }

    /// [`Self::start_runtime`] (no warm pool) on `platform`, this environment's with another
    /// log ([`Self::platform_with_log`]).
    pub async fn start_runtime_on(
        &self,
        platform: Arc<Platform>,
        dir: &std::path::Path,
    ) -> (Running, String) {
        let running = self
            .runtime_on_platform(platform, dir, "", no_auth(), Default::default())
            .await;
        let url = format!("http://{}", running.grpc_addr.unwrap());
        (running, url)
    }

    /// This environment's platform with `log` in place of its own (to inject faults).
    pub fn platform_with_log(&self, log: Arc<dyn creto_streams::EventLog>) -> Arc<Platform> {
        let p = &self.platform;
        Arc::new(Platform {
            settings: p.settings.clone(),
            catalog: p.catalog.clone(),
            log,
            cache: p.cache.clone(),
            metering: p.metering.clone(),
            archive: p.archive.clone(),
            stores: p.stores.clone(),
        })
    }

    async fn runtime_on(
        &self,
        dir: &std::path::Path,
        pool: &str,
        auth: std::sync::Arc<creto_gateways::auth::layer::Auth>,
        limits: creto_domain::runtime::sandbox::RuntimeLimits,
    ) -> Running {
        self.runtime_on_platform(self.platform.clone(), dir, pool, auth, limits)
            .await
    }

    async fn runtime_on_platform(
        &self,
        platform: Arc<Platform>,
        dir: &std::path::Path,
        pool: &str,
        auth: std::sync::Arc<creto_gateways::auth::layer::Auth>,
        limits: creto_domain::runtime::sandbox::RuntimeLimits,
    ) -> Running {
        let config = creto_gateways::runtime::config::RuntimeConfig {
            dir: dir.to_path_buf(),
            node: "test-node".into(),
            backend: "bwrap".into(),
            templates_dir: None,
            pool: creto_gateways::runtime::config::parse_pool(pool).unwrap(),
            attestation_key: None,
            limits,
            // The platform's deny list but for loopback: the tests' services listen on
            // 127.0.0.2 (runtime_containment checks the list itself).
            egress_deny: creto_gateways::runtime::backend::default_egress_deny_except(&[
                "127.0.0.0/8",
            ]),
        };
        // Checkpoints in the platform's archive: a directory when embedded; on the services, a
        // bucket of the local S3 server (the test command runs one).
        let checkpoints = match &self.platform.archive {
            Some(archive) => Some(archive.clone()),
            None => Some(
                std::sync::Arc::new(test_archive("runtime-checkpoints").await)
                    as std::sync::Arc<dyn creto_projections::archive::Archive>,
            ),
        };
        server::start_runtime(platform, spare_ports(false), auth, config, checkpoints)
            .await
            .unwrap()
    }

    /// The first step of `enablement replay metering --rebuild` on this environment: the side
    /// schema (dropped first with `restart`) and the projector that loads it.
    pub async fn prepare_rebuild(
        &self,
        restart: bool,
    ) -> creto_projections::metering::MeteringProjector {
        creto_projections::rebuild::prepare_metering(
            self.pool(),
            self.platform.log.clone(),
            self.platform.catalog.clone(),
            self.settings.limits,
            restart,
        )
        .await
        .unwrap()
    }

    /// A whole rebuild from scratch, as the CLI runs it (prepare, catch up in batches of
    /// `batch`, switch over); returns the sequence the readers were switched at.
    pub async fn rebuild_metering(&self, batch: usize) -> u64 {
        let log = self.platform.log.clone();
        let p = self.prepare_rebuild(true).await;
        creto_projections::rebuild::catch_up(&log, &p, None, batch, |_| {})
            .await
            .unwrap();
        creto_projections::rebuild::switch_over(self.pool(), &log, &p)
            .await
            .unwrap()
    }

    /// Waits until the metering projection has applied `sequence`.
    pub async fn wait_applied(&self, sequence: u64) {
        let at = creto_projections::metering::read_model::wait_for(
            &*self.platform.metering,
            sequence,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(
            at >= sequence,
            "projection stuck at {at}, wanted {sequence}"
        );
    }

    /// Deletes `stream` and creates it again, empty: a lost or recreated stream.
    pub async fn recreate_stream(&self, stream: &str) {
        self.platform.log.delete_stream(stream).await.unwrap();
        self.platform
            .log
            .ensure_streams(&self.platform.catalog.specs())
            .await
            .unwrap();
    }

    /// Removes the database, streams and cache keys (or the embedded data directory).
    pub async fn drop(self) {
        for spec in self.platform.catalog.specs() {
            let _ = self.platform.log.delete_stream(&spec.name).await;
        }
        let Stores::Services { pool, redis } = &self.platform.stores else {
            return; // the temporary directory goes with `self.dir`
        };
        let keys = self
            .platform
            .cache
            .keys(&self.settings.redis_prefix())
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let mut redis = redis.clone();
            let _: redis::RedisResult<()> =
                redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
        }
        pool.close().await;
        if let Ok(admin) = sqlx::PgPool::connect(&admin_url()).await {
            let _ = admin
                .execute(
                    format!(
                        "DROP DATABASE IF EXISTS enablement_{} WITH (FORCE)",
                        self.name
                    )
                    .as_str(),
                )
                .await;
        }
        drop(self.dir);
    }
}

/// An S3 archive on the local S3 server the test command starts (moto, S3_ENDPOINT or
/// 127.0.0.1:5000, any credentials), with `bucket` created.
pub async fn test_archive(bucket: &str) -> creto_projections::archive::S3Archive {
    use creto_projections::archive::{S3Archive, S3Settings};
    let archive = S3Archive::new(S3Settings {
        endpoint: Some(
            std::env::var("S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into()),
        ),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        force_path_style: true,
    });
    archive
        .ensure_bucket()
        .await
        .expect("S3 reachable (bash .ci/services.sh starts one)");
    archive
}

/// Runs `projector` on the environment's log in small batches (3 events: an aggregate's events
/// span several batches, and share some) until the returned sender says stop.
pub fn run_projector(
    env: &Env,
    projector: Arc<dyn creto_projections::Projector>,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    use creto_projections::runner::{self, Leadership, RunnerConfig};
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(runner::run(
        env.platform.log.clone(),
        Leadership::Postgres(env.pool().clone()),
        projector,
        RunnerConfig {
            batch: 3,
            wait: Duration::from_millis(50),
        },
        stop_rx,
    ));
    let task = tokio::spawn(async move { task.await.unwrap().unwrap() });
    (stop, task)
}

/// Waits (30 s at most) until `projector`'s checkpoint is exactly `sequence`.
pub async fn wait_checkpoint(projector: &dyn creto_projections::Projector, sequence: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let at = projector.checkpoint().await.unwrap();
        if at >= sequence {
            assert_eq!(at, sequence);
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "projection stuck at {at}, wanted {sequence}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checksum of each of `tables` (name, order) and `product`'s checkpoint.
pub async fn checksums(
    pool: &sqlx::PgPool,
    tables: &[(&str, &str)],
    product: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (table, order) in tables {
        out.push((table.to_string(), checksum(pool, table, order).await));
    }
    let checkpoint: i64 =
        sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoints WHERE projector = $1")
            .bind(product)
            .fetch_one(pool)
            .await
            .unwrap();
    out.push(("checkpoint".into(), checkpoint.to_string()));
    out
}

/// Every event of a stream of the environment's catalog (`OVERSIGHT`, `RUNTIME`, ...).
pub async fn stream_events(env: &Env, logical: &str) -> Vec<creto_streams::StoredEvent> {
    replay_all(env, logical, None).await
}

/// Every event of stream `logical` on the logical subject `subject`.
pub async fn subject_events(
    env: &Env,
    logical: &str,
    subject: &str,
) -> Vec<creto_streams::StoredEvent> {
    replay_all(env, logical, Some(&env.subject(subject))).await
}

async fn replay_all(
    env: &Env,
    logical: &str,
    filter: Option<&str>,
) -> Vec<creto_streams::StoredEvent> {
    use futures::TryStreamExt;
    env.platform
        .log
        .replay(
            &env.platform.catalog.stream(logical),
            creto_streams::ReplayFrom::Start,
            None,
            filter,
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Checksum of every row of a table, in primary-key order.
pub async fn checksum(pool: &sqlx::PgPool, table: &str, order_by: &str) -> String {
    sqlx::query_scalar(&format!("SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY {order_by})), 'empty') FROM {table} t"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A benchmark's baseline for a rebuild: a raw ordered pull consumer reading every message of
/// `logical`'s stream (`METERING`, `OVERSIGHT`, ...), decoding nothing. Returns how many it
/// read and how long that took, the consumer's creation included.
pub async fn raw_read(env: &Env, logical: &str) -> (u64, std::time::Duration) {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let started = std::time::Instant::now();
    let stream = js
        .get_stream(env.platform.catalog.stream(logical))
        .await
        .unwrap();
    let n = stream.cached_info().state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..n {
        std::hint::black_box(messages.next().await.unwrap().unwrap().payload.len());
    }
    (n, started.elapsed())
}

/// `enablement replay oversight|runtime --rebuild` on this environment (`logical` is
/// `OVERSIGHT` or `RUNTIME`): every table of the product made again from its stream in one
/// transaction. Returns the checkpoint reached.
pub async fn rebuild_whole(env: &Env, logical: &str) -> u64 {
    use creto_projections::{oversight, runtime};
    let (pool, log, catalog) = (env.pool(), &env.platform.log, &env.platform.catalog);
    match logical {
        creto_streams::OVERSIGHT => oversight::rebuild(pool, log.clone(), catalog.clone()).await,
        creto_streams::RUNTIME => runtime::rebuild(pool, log.clone(), catalog.clone()).await,
        other => panic!("{other} is not rebuilt whole"),
    }
    .unwrap()
}

/// The tables [`rebuild_whole`] makes again.
fn whole_tables(logical: &str) -> &'static [&'static str] {
    match logical {
        creto_streams::OVERSIGHT => creto_projections::oversight::TABLES,
        creto_streams::RUNTIME => creto_projections::runtime::TABLES,
        other => panic!("{other} is not rebuilt whole"),
    }
}

/// [`rebuild_whole`] next to [`raw_read`] of the product's stream. The rebuild runs twice:
/// the second must leave every table as the first did (row checksums), so the figure is for a
/// rebuild that really rebuilt.
pub async fn whole_rebuild_rate(env: &Env, logical: &str) {
    let tables = whole_tables(logical);
    let (n, raw) = raw_read(env, logical).await;
    let started = std::time::Instant::now();
    let checkpoint = rebuild_whole(env, logical).await;
    let rebuilt = started.elapsed();
    let first = table_checksums(env.pool(), tables).await;
    assert_eq!(rebuild_whole(env, logical).await, checkpoint);
    assert_eq!(
        table_checksums(env.pool(), tables).await,
        first,
        "a second rebuild changed the tables"
    );
    let rate = |d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "rebuild {logical}: {n} events | raw ordered consumer {:>9.0} ev/s | replay --rebuild {:>9.0} ev/s ({:.2} s) | ratio {:.2}",
        rate(raw),
        rate(rebuilt),
        rebuilt.as_secs_f64(),
        raw.as_secs_f64() / rebuilt.as_secs_f64()
    );
}

/// A checksum of each of `tables`, over its rows in text order.
async fn table_checksums(pool: &sqlx::PgPool, tables: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for t in tables {
        out.push(checksum(pool, t, "t::text").await);
    }
    out
}

/// Checksums of the metering read models.
pub async fn metering_checksums(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (table, order) in [
        ("metering_events", "tenant, subscription_id, event_id"),
        ("usage_hourly", "tenant, subscription_id, event_type, hour"),
        (
            "usage_monthly",
            "tenant, subscription_id, event_type, month",
        ),
        ("meters", "tenant, slug"),
    ] {
        out.push((table.to_string(), checksum(pool, table, order).await));
    }
    out
}

/// Rows where `usage_monthly` differs from `usage_hourly` summed by UTC month (either side
/// missing counts too): 0 when the projector, corrections and rebuilds kept them in step.
pub async fn monthly_rollup_mismatches(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT tenant, subscription_id, event_type, date_trunc('month', hour, 'UTC') AS month,
                   sum(event_count) AS event_count, sum(quantity_sum) AS quantity_sum
            FROM usage_hourly GROUP BY 1, 2, 3, 4
         ) h FULL JOIN usage_monthly m USING (tenant, subscription_id, event_type, month)
         WHERE h.event_count IS DISTINCT FROM m.event_count OR h.quantity_sum IS DISTINCT FROM m.quantity_sum",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Publishes `(subscription, CloudEvent JSON)` pairs over NATS as producers do, to
/// `metering.events.<subscription>` in the env's namespace, awaiting acks in chunks (async-nats
/// bounds the acks in flight); returns the last stream sequence.
pub async fn publish_events(env: &Env, events: impl IntoIterator<Item = (String, String)>) -> u64 {
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut acks = Vec::with_capacity(500);
    let mut last = 0;
    for (subscription, payload) in events {
        acks.push(
            js.publish(
                env.subject(&format!("metering.events.{subscription}")),
                payload.into(),
            )
            .await
            .unwrap(),
        );
        if acks.len() == 500 {
            for a in acks.drain(..) {
                last = last.max(a.await.unwrap().sequence);
            }
        }
    }
    for a in acks {
        last = last.max(a.await.unwrap().sequence);
    }
    last
}

/// The text a gateway's metrics port serves.
pub async fn metrics_text(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A CloudEvent as JSON text.
pub fn cloud_event(
    id: &str,
    subscription: &str,
    event_type: &str,
    time: chrono::DateTime<chrono::Utc>,
    data: serde_json::Value,
) -> String {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "test", "type": event_type,
        "subject": subscription, "time": time.to_rfc3339(), "data": data,
    })
    .to_string()
}
