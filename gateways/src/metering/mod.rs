//! Metering's gRPC service: `creto.enablement.metering.v1.MeteringService`.

pub mod billing;
pub mod ingest;
pub mod quota;
pub mod service;

pub use service::MeteringGateway;

use creto_projections::ProjectionError;
use tonic::Status;

/// A read-model failure as the caller sees it: the read model is down, retry; except a value
/// of the request PostgreSQL refuses, which no retry mends: a text holding U+0000 (SQLSTATE
/// 22021), a parameter it does not take (22023, e.g. a time zone its tz database lacks).
fn db_status(e: ProjectionError) -> Status {
    if matches!(e, ProjectionError::QueryBudget(_)) {
        // The embedded store's own bound on a usage read: the same read fails again.
        return Status::resource_exhausted(format!(
            "{e}; narrow it (a shorter range or period, a subscription, fewer groups)"
        ));
    }
    match db_code(&e).as_deref() {
        Some("22021") => Status::invalid_argument(
            "a text in the request contains U+0000 (NUL), which cannot be stored or looked up; remove it",
        ),
        Some("22023") => Status::invalid_argument(format!(
            "the read model refused a value of this request: {e}; change it"
        )),
        _ => Status::unavailable(format!("the read model is unavailable: {e}; retry")),
    }
}

/// The SQLSTATE of a read-model failure, when PostgreSQL gave one.
fn db_code(e: &ProjectionError) -> Option<String> {
    match e {
        ProjectionError::Database(sqlx::Error::Database(d)) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}
