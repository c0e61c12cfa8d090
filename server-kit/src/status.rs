//! The one mapping from storage errors to gRPC statuses.

use addons_store::Error;
use tonic::{Code, Status};

/// Maps a storage error to the status a client should see. Errors the
/// client can act on keep their message; failures of the database are
/// logged here and reported as `UNAVAILABLE` (retryable) without internals.
pub fn store_error_to_status(err: Error) -> Status {
    match &err {
        Error::AlreadyExists { .. } => Status::already_exists(err.to_string()),
        Error::NotFound { .. } => Status::not_found(err.to_string()),
        Error::Conflict { .. } => Status::aborted(err.to_string()),
        Error::InvalidPageToken => {
            Status::invalid_argument("page_token: not a token this server handed out")
        }
        Error::Codec { .. } => {
            tracing::error!(error = %err, "stored record does not decode");
            Status::new(Code::Internal, "stored record is unreadable")
        }
        _ => {
            tracing::warn!(error = %err, "store operation failed");
            Status::unavailable("the store is unavailable, retry later")
        }
    }
}
