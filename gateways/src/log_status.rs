//! How the event log's errors reach a gRPC caller, the same for every product.
use creto_streams::LogError;
use tonic::Status;

pub fn log_status(e: LogError) -> Status {
    match e {
        LogError::Unavailable(m) => {
            Status::unavailable(format!("the event log is unavailable: {m}; retry"))
        }
        LogError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
        LogError::Conflict { .. } => Status::aborted(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}
