//! The metrics port: `/metrics` (Prometheus text) and `/health` (each dependency's state),
//! plus the dependency checker that also drives gRPC health.
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use axum::{http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use prometheus::{
    register_int_counter, register_int_gauge, register_int_gauge_vec, Encoder, IntCounter,
    IntGauge, IntGaugeVec,
};
use tokio::sync::watch;

use crate::platform::Platform;

static POOL_ACTIVE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "postgres_pool_connections_active",
        "PostgreSQL connections in use"
    )
    .unwrap()
});
static POOL_IDLE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "postgres_pool_connections_idle",
        "Idle PostgreSQL connections"
    )
    .unwrap()
});
static POOL_MAX: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("postgres_pool_connections_max", "PostgreSQL pool size").unwrap()
});
static PG_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "postgres_connection_errors_total",
        "Failed PostgreSQL health checks"
    )
    .unwrap()
});
static REDIS_UP: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("redis_up", "1 when Redis answers PING").unwrap());
static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "enablement_build_info",
        "Build of the running binary",
        &["version"]
    )
    .unwrap()
});

/// State of each dependency, shared by `/health` and gRPC health.
#[derive(Clone, Default)]
pub struct Health(Arc<RwLock<Dependencies>>);

#[derive(Default)]
struct Dependencies {
    states: BTreeMap<&'static str, String>,
    /// Reported, but the process serves without them (the cache: its keys are rebuilt), so
    /// they do not take it out of service.
    optional: std::collections::BTreeSet<&'static str>,
}

impl Health {
    pub fn set(&self, dependency: &'static str, state: impl Into<String>) {
        self.0
            .write()
            .unwrap()
            .states
            .insert(dependency, state.into());
    }
    /// As [`Health::set`], for a dependency the process serves without.
    pub fn set_optional(&self, dependency: &'static str, state: impl Into<String>) {
        let mut d = self.0.write().unwrap();
        d.optional.insert(dependency);
        d.states.insert(dependency, state.into());
    }
    /// Every dependency the process needs is up: it serves. Not before the first check has
    /// said anything (nothing checked is not "all up").
    pub fn all_up(&self) -> bool {
        let d = self.0.read().unwrap();
        !d.states.is_empty()
            && d.states
                .iter()
                .all(|(k, s)| s == "up" || d.optional.contains(k))
    }
    /// Every dependency, optional ones included, is up.
    fn everything_up(&self) -> bool {
        self.0.read().unwrap().states.values().all(|s| s == "up")
    }
    pub fn snapshot(&self) -> BTreeMap<&'static str, String> {
        self.0.read().unwrap().states.clone()
    }
}

/// Makes every shared family visible on `/metrics` before it is first used.
pub fn register_metrics() {
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    crate::grpc_metrics::register();
    crate::auth::authz_remote::register_metrics();
    std::sync::LazyLock::force(&crate::auth::RATE_LIMITED);
    use creto_projections::metrics as m;
    for reason in creto_domain::metering::InvalidReason::ALL {
        m::METERING_INVALID.with_label_values(&[reason.as_str()]);
    }
    m::METERING_AGGREGATION_SECONDS.with_label_values(&["projection_batch"]);
    m::METERING_POSTGRES_QUERIES.with_label_values(&["projection_batch", "success"]);
    m::METERING_REDIS_OPERATIONS.with_label_values(&["set", "success"]);
    let _ = &*m::METERING_INVOICE_GENERATION; // draft, issued, failed
    m::PROJECTOR_APPLIED.with_label_values(&["metering"]);
    m::PROJECTOR_LAG.with_label_values(&["metering"]);
    m::PROJECTOR_BATCH_SECONDS.with_label_values(&["metering"]);
    let _ = &*m::METERING_EVENTS;
    let _ = &*m::DEADLETTERS;
    let _ = &*m::STREAM_MESSAGES;
    let _ = &*m::CONSUMER_PENDING;
}

async fn metrics() -> impl IntoResponse {
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    let _ = encoder.encode(&prometheus::gather(), &mut out);
    ([("content-type", encoder.format_type().to_string())], out)
}

pub fn router(health: Health) -> Router {
    Router::new().route("/metrics", get(metrics)).route(
        "/health",
        get(move || {
            let health = health.clone();
            async move {
                let deps = health.snapshot();
                let up = health.all_up();
                // 503 (out of service) only for what the process needs; "degraded" says an
                // optional dependency (the cache) is down as well.
                let status = if health.everything_up() {
                    "ok"
                } else {
                    "degraded"
                };
                let body = serde_json::json!({ "status": status, "dependencies": deps });
                (
                    if up {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    },
                    Json(body),
                )
            }
        }),
    )
}

/// What a product's process depends on: its stream, and PostgreSQL and the cache when it uses
/// them. `postgres_pool_*` and `redis_up` are exported only by processes that check them: a
/// `redis_up` of 0 where Redis is never used would page for nothing (`RedisDown`).
pub struct Needs {
    pub stream: &'static str,
    pub postgres: bool,
    pub cache: bool,
    /// Something of the process's own that must be ready before it takes traffic (metering's
    /// quota book, warming from the log): its name, and whether it is ready.
    pub warming: Option<(&'static str, Ready)>,
}

/// Whether something a process warms up is ready (see [`Needs::warming`]).
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// How long one dependency check may take: a server that accepts and never answers (a
/// blackholed Redis, a stuck PostgreSQL) is down, and must not hold the other checks back.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `check`, failed with "no answer" past [`PROBE_TIMEOUT`].
async fn probe<T, E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// Checks the log (the product's stream), and PostgreSQL and the cache when the product uses
/// them, every few seconds until `shutdown`.
pub async fn watch_dependencies(
    platform: Arc<Platform>,
    health: Health,
    needs: Needs,
    mut shutdown: watch::Receiver<bool>,
) {
    if needs.postgres {
        PG_ERRORS.get(); // a zero before the first error
    }
    loop {
        let stream = platform.catalog.stream(needs.stream);
        // Named after what runs behind each port, as operators know them.
        let (log_name, cache_name) = match &platform.stores {
            crate::platform::Stores::Services { .. } => ("nats", "redis"),
            crate::platform::Stores::Embedded { .. } => ("embedded_log", "memory_cache"),
        };
        health.set(
            log_name,
            // The stream's info alone (not its consumers' listing): a cheap look.
            match probe(platform.log.last_sequence(&stream)).await {
                Ok(_) => "up".to_string(),
                Err(e) => format!("down: {e}"),
            },
        );
        if needs.postgres {
            if let crate::platform::Stores::Services { pool, .. } = &platform.stores {
                // The wait for a pool connection is not the server's answer (a busy pool is
                // not a down database): bounded by the pool's own acquire timeout, not counted.
                let answered = match pool.acquire().await {
                    Ok(mut connection) => probe(sqlx::query("SELECT 1").execute(&mut *connection))
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e.to_string()),
                };
                match answered {
                    Ok(_) => health.set("postgres", "up"),
                    Err(e) => {
                        PG_ERRORS.inc();
                        health.set("postgres", format!("down: {e}"));
                    }
                }
                let size = pool.size() as i64;
                let idle = pool.num_idle() as i64;
                POOL_ACTIVE.set(size - idle);
                POOL_IDLE.set(idle);
                POOL_MAX.set(platform.settings.database_pool_size as i64);
            }
        }
        if let Some((name, ready)) = &needs.warming {
            health.set(name, if ready() { "up" } else { "warming" });
        }
        if needs.cache {
            let pong = probe(platform.cache.ping()).await;
            REDIS_UP.set(pong.is_ok() as i64);
            // Optional: without Redis, quota checks and ingestion go on (the book is in
            // memory, the counters are rewritten when it is back); taking every metering pod
            // out of its Service would turn a cache outage into an ingestion outage.
            health.set_optional(
                cache_name,
                match pong {
                    Ok(_) => "up".to_string(),
                    Err(e) => format!("down: {e}"),
                },
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dependency that accepts and never answers is down after the probe's time, instead of
    /// holding every check (and its last "up") for ever.
    #[tokio::test(start_paused = true)]
    async fn a_check_without_an_answer_is_down() {
        let never = std::future::pending::<Result<(), String>>();
        let e = probe(never).await.unwrap_err();
        assert!(e.starts_with("no answer within"), "{e}");
    }

    #[test]
    fn an_optional_dependency_down_degrades_without_taking_the_process_out() {
        let h = Health::default();
        assert!(!h.all_up(), "nothing checked yet");
        h.set("nats", "up");
        h.set_optional("redis", "down: connection refused");
        assert!(h.all_up(), "serves without the cache");
        assert!(!h.everything_up(), "but says so");
        h.set("nats", "down: timed out");
        assert!(!h.all_up());
        h.set("nats", "up");
        h.set_optional("redis", "up");
        assert!(h.everything_up());
    }
}
