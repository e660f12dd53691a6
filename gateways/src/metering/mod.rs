//! Metering's gRPC service: `creto.enablement.metering.v1.MeteringService`.

pub mod billing;
pub mod ingest;
pub mod quota;
pub mod service;

pub use service::MeteringGateway;

use creto_projections::ProjectionError;
use tonic::Status;

/// A read-model failure as the caller sees it: the read model is down, retry; except a text
/// parameter holding U+0000, which PostgreSQL refuses (SQLSTATE 22021) and no retry mends.
fn db_status(e: ProjectionError) -> Status {
    match &e {
        ProjectionError::Database(sqlx::Error::Database(d))
            if d.code().as_deref() == Some("22021") =>
        {
            Status::invalid_argument(
                "a text in the request contains U+0000 (NUL), which cannot be stored or looked up; remove it",
            )
        }
        _ => Status::unavailable(format!("the read model is unavailable: {e}; retry")),
    }
}
