//! Reads of the oversight read model. Requests and policies come back as the API's messages,
//! decoded from the stored `view` / `definition`.
use creto_schemas::oversight::v1::{ApprovalRequest, Policy, Priority, State};
use prost::Message;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::state_name;
use crate::runner::ProjectionError;

/// Requests listed when the caller asks for none (`limit` 0).
pub const DEFAULT_LIMIT: u32 = 100;
/// Most requests one list returns.
pub const MAX_LIMIT: u32 = 1_000;

fn corrupt(e: prost::DecodeError) -> ProjectionError {
    ProjectionError::Database(sqlx::Error::Decode(e.into()))
}

/// The requests of `tenant`, filtered by state, priority and agent (`None`, or the
/// `UNSPECIFIED` value, means any), at most `limit` (0: [`DEFAULT_LIMIT`]; capped at
/// [`MAX_LIMIT`]).
///
/// Order: for `state = PENDING`, the approvers' queue: highest priority first, then oldest
/// first (what waits longest at the same urgency comes first). Otherwise (any other state, or
/// no state filter): newest first. Ties by request id, so pages are stable.
///
/// An escalated request is pending again at its next level: it is listed under `PENDING`
/// (`ESCALATED` is a transition, never a stored state).
pub async fn list_requests(
    pool: &PgPool,
    tenant: &str,
    state: Option<State>,
    priority: Option<Priority>,
    agent_id: Option<&str>,
    limit: u32,
) -> Result<Vec<ApprovalRequest>, ProjectionError> {
    let state = state.filter(|s| *s != State::Unspecified);
    let priority = priority.filter(|p| *p != Priority::Unspecified);
    let limit = if limit == 0 {
        DEFAULT_LIMIT
    } else {
        limit.min(MAX_LIMIT)
    };
    let mut q: QueryBuilder<Postgres> =
        QueryBuilder::new("SELECT view FROM oversight_requests WHERE tenant = ");
    q.push_bind(tenant);
    if let Some(s) = state {
        q.push(" AND state = ").push_bind(state_name(s));
    }
    if let Some(p) = priority {
        q.push(" AND priority_rank = ").push_bind(p as i16);
    }
    if let Some(agent) = agent_id {
        q.push(" AND agent_id = ").push_bind(agent);
    }
    if state == Some(State::Pending) {
        q.push(" ORDER BY priority_rank DESC, created_at ASC, request_id ASC");
    } else {
        q.push(" ORDER BY created_at DESC, request_id ASC");
    }
    q.push(" LIMIT ").push_bind(i64::from(limit));
    let rows: Vec<(Vec<u8>,)> = q.build_query_as().fetch_all(pool).await?;
    rows.into_iter()
        .map(|(view,)| ApprovalRequest::decode(view.as_slice()).map_err(corrupt))
        .collect()
}

/// One request of `tenant`, as the API shows it.
pub async fn get_request(
    pool: &PgPool,
    tenant: &str,
    request_id: &str,
) -> Result<Option<ApprovalRequest>, ProjectionError> {
    let view: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT view FROM oversight_requests WHERE tenant = $1 AND request_id = $2",
    )
    .bind(tenant)
    .bind(request_id)
    .fetch_optional(pool)
    .await?;
    view.map(|v| ApprovalRequest::decode(v.as_slice()).map_err(corrupt))
        .transpose()
}

/// The policies of `tenant` in their current definition, in the order they are matched:
/// highest precedence first, then by id.
pub async fn list_policies(pool: &PgPool, tenant: &str) -> Result<Vec<Policy>, ProjectionError> {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT definition FROM oversight_policies WHERE tenant = $1 AND NOT removed
         ORDER BY precedence DESC, policy_id ASC",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|d| Policy::decode(d.as_slice()).map_err(corrupt))
        .collect()
}
