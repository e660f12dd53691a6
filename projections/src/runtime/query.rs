//! Reads of the runtime read model. Sandboxes come back as the API's messages, decoded from
//! the stored `view`; the gauges' counts come from the same rows.
use std::collections::{BTreeMap, HashMap};

use creto_domain::runtime::sandbox::Aggregate;
use creto_schemas::runtime::v1::{Sandbox, State};
use prost::Message;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::projector::metadata_json;
use super::state_name;
use crate::runner::ProjectionError;

/// Sandboxes listed when the caller asks for none (`limit` 0).
pub const DEFAULT_LIMIT: u32 = 100;
/// Most sandboxes one list returns.
pub const MAX_LIMIT: u32 = 1_000;

fn corrupt(e: prost::DecodeError) -> ProjectionError {
    ProjectionError::Database(sqlx::Error::Decode(e.into()))
}

/// One sandbox of `tenant`, as the API shows it. Another tenant's sandbox, or one still in
/// the warm pool, is not found.
pub async fn get_sandbox(
    pool: &PgPool,
    tenant: &str,
    sandbox_id: &str,
) -> Result<Option<Sandbox>, ProjectionError> {
    let view: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT view FROM sandboxes WHERE sandbox_id = $1 AND tenant = $2 AND NOT pooled",
    )
    .bind(sandbox_id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    view.map(|v| Sandbox::decode(v.as_slice()).map_err(corrupt))
        .transpose()
}

/// The sandboxes of `tenant` in one of `states` (any when empty; `UNSPECIFIED` is ignored)
/// whose metadata holds every pair of `metadata`, newest first (ties by id, so pages are
/// stable), at most `limit` (0: [`DEFAULT_LIMIT`]; capped at [`MAX_LIMIT`]). Warm-pool
/// sandboxes not claimed yet belong to no tenant and are never listed.
pub async fn list_sandboxes(
    pool: &PgPool,
    tenant: &str,
    states: &[State],
    metadata: &HashMap<String, String>,
    limit: u32,
) -> Result<Vec<Sandbox>, ProjectionError> {
    let limit = if limit == 0 {
        DEFAULT_LIMIT
    } else {
        limit.min(MAX_LIMIT)
    };
    let states: Vec<&str> = states
        .iter()
        .filter(|s| **s != State::Unspecified)
        .map(|s| state_name(*s))
        .collect();
    let mut q: QueryBuilder<Postgres> =
        QueryBuilder::new("SELECT view FROM sandboxes WHERE NOT pooled AND tenant = ");
    q.push_bind(tenant);
    if !states.is_empty() {
        q.push(" AND state = ANY(").push_bind(states).push(")");
    }
    if !metadata.is_empty() {
        q.push(" AND metadata @> ")
            .push_bind(metadata_json(metadata));
    }
    q.push(" ORDER BY created_at DESC, sandbox_id ASC LIMIT ")
        .push_bind(i64::from(limit));
    let rows: Vec<(Vec<u8>,)> = q.build_query_as().fetch_all(pool).await?;
    rows.into_iter()
        .map(|(view,)| Sandbox::decode(view.as_slice()).map_err(corrupt))
        .collect()
}

/// The gauges' counts over every sandbox (all nodes; a replica's own gauges count its node).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SandboxCounts {
    /// Sandboxes by state name, warm-pool ones included.
    pub by_state: BTreeMap<String, i64>,
    /// `runtime_sandbox_active{backend}`: cold or claimed sandboxes requested, provisioning
    /// or ready. Every backend seen has an entry, 0 included.
    pub active: BTreeMap<String, i64>,
    /// `runtime_warmpool_size{backend}`: warm-pool sandboxes ready and not claimed yet.
    pub warm_pool: BTreeMap<String, i64>,
}

impl SandboxCounts {
    fn add(&mut self, state: &str, backend: &str, pooled: bool, n: i64) {
        *self.by_state.entry(state.to_string()).or_default() += n;
        if backend.is_empty() {
            return;
        }
        let active = self.active.entry(backend.to_string()).or_default();
        if !pooled && matches!(state, "requested" | "provisioning" | "ready") {
            *active += n;
        }
        let warm = self.warm_pool.entry(backend.to_string()).or_default();
        if pooled && state == "ready" {
            *warm += n;
        }
    }

    /// The same counts from folded aggregates (what the gateways' view holds).
    pub fn of<'a>(sandboxes: impl IntoIterator<Item = &'a Aggregate>) -> Self {
        let mut counts = SandboxCounts::default();
        for agg in sandboxes {
            counts.add(state_name(agg.state()), &agg.view.backend, agg.pooled, 1);
        }
        counts
    }
}

/// The gauges' counts from the read model.
pub async fn count_by_state(pool: &PgPool) -> Result<SandboxCounts, ProjectionError> {
    let rows: Vec<(String, String, bool, i64)> =
        sqlx::query_as("SELECT state, backend, pooled, count(*) FROM sandboxes GROUP BY 1, 2, 3")
            .fetch_all(pool)
            .await?;
    let mut counts = SandboxCounts::default();
    for (state, backend, pooled, n) in rows {
        counts.add(&state, &backend, pooled, n);
    }
    Ok(counts)
}
