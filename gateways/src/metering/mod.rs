//! Metering's gRPC service: `creto.enablement.metering.v1.MeteringService`.

pub mod billing;
pub mod ingest;
pub mod quota;
pub mod service;

pub use service::MeteringGateway;

use creto_projections::ProjectionError;
use tonic::Status;

/// A read-model failure as the caller sees it: the read model is down, retry; except what no
/// retry mends. PostgreSQL refusing a value of the request (SQLSTATE class 22: a text holding
/// U+0000, a time zone its own tz database lacks) is INVALID_ARGUMENT, and a query past one
/// of its limits (class 54, e.g. an array over 1 GB) RESOURCE_EXHAUSTED.
fn db_status(e: ProjectionError) -> Status {
    let code = match &e {
        ProjectionError::Database(sqlx::Error::Database(d)) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    match code.as_deref() {
        Some("22021") => Status::invalid_argument(
            "a text in the request contains U+0000 (NUL), which cannot be stored or looked up; remove it",
        ),
        Some(c) if c.starts_with("22") => Status::invalid_argument(format!(
            "the read model refused a value of this request: {e}; change it"
        )),
        Some("57014") => Status::deadline_exceeded(format!(
            "the read model gave up on this request after {} s; narrow it (a shorter range, a subscription, fewer groups)",
            creto_projections::metering::query::USAGE_QUERY_TIMEOUT_SECONDS
        )),
        Some(c) if c.starts_with("54") => Status::resource_exhausted(format!(
            "the read model cannot answer a request this large: {e}; narrow it (a shorter range, fewer groups)"
        )),
        _ => Status::unavailable(format!("the read model is unavailable: {e}; retry")),
    }
}
