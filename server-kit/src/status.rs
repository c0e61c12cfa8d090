//! The one mapping from storage errors to gRPC statuses.

use addons_store::Error;
use tonic::{Code, Status};

use crate::ApiError;

/// Maps a storage error to the status a client should see, with its
/// `ErrorInfo` reason. Errors the client can act on keep their message;
/// failures of the database are logged here and reported as `UNAVAILABLE`
/// `STORE_UNAVAILABLE` (retryable) without internals.
pub fn store_error_to_status(err: Error) -> Status {
    let error = match &err {
        Error::AlreadyExists { key, .. } => {
            ApiError::new(Code::AlreadyExists, "ALREADY_EXISTS", err.to_string())
                .resource("record", key.clone())
        }
        Error::NotFound { id, .. } => ApiError::new(Code::NotFound, "NOT_FOUND", err.to_string())
            .resource("record", id.clone()),
        Error::StaleRevision { id, current, .. } => {
            ApiError::new(Code::Aborted, "REVISION_MISMATCH", err.to_string())
                .metadata("current_revision", current)
                .resource("record", id.clone())
        }
        Error::Conflict { .. } => {
            ApiError::new(Code::Aborted, "CONCURRENT_MODIFICATION", err.to_string())
        }
        Error::InvalidPageToken => ApiError::new(
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
            "page_token: not a token this server handed out",
        )
        .violation("page_token", "not a token this server handed out"),
        Error::CursorOutOfRange { .. } => {
            ApiError::new(Code::OutOfRange, "WATCH_CURSOR_EXPIRED", err.to_string())
                .violation("since_revision", err.to_string())
        }
        Error::Codec { .. } => {
            tracing::error!(error = %err, "stored record does not decode");
            ApiError::new(
                Code::Internal,
                "RECORD_UNREADABLE",
                "stored record is unreadable",
            )
        }
        _ => {
            tracing::warn!(error = %err, "store operation failed");
            ApiError::new(
                Code::Unavailable,
                "STORE_UNAVAILABLE",
                "the store is unavailable, retry later",
            )
        }
    };
    error.into_status()
}
