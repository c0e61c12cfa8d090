//! The one error type of the storage layer.

/// Result of a storage operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a storage operation failed. `Clone`, so the failure of a batch of
/// writes goes to each write of it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `--store` names no usable location.
    #[error("invalid store location: {reason}")]
    InvalidLocation {
        /// What is wrong with it.
        reason: String,
    },
    /// The database cannot be reached or opened.
    #[error("cannot open the store ({store}): {reason}")]
    Unavailable {
        /// Which store, without credentials.
        store: String,
        /// What went wrong.
        reason: String,
    },
    /// This process may no longer write (its fence said no, such as a
    /// manager that lost its plane's lease); nothing was written.
    #[error("this process may no longer write: {reason}")]
    Fenced {
        /// Why.
        reason: String,
    },
    /// Another record holds the id or the unique key.
    #[error("{collection} record with key `{key}` already exists")]
    AlreadyExists {
        /// Collection of the record.
        collection: String,
        /// The id or unique key that is taken.
        key: String,
    },
    /// No record has the id.
    #[error("{collection} record `{id}` not found")]
    NotFound {
        /// Collection searched.
        collection: String,
        /// The id looked for.
        id: String,
    },
    /// The record changed since it was read, or has another status than the
    /// write expected; nothing was written.
    #[error("record `{id}` changed concurrently: {reason}")]
    Conflict {
        /// The record.
        id: String,
        /// What did not match.
        reason: String,
    },
    /// The record is not at the revision the request expected; nothing was
    /// written.
    #[error("{collection} record `{id}` is at revision {current}, the request expected {expected}")]
    StaleRevision {
        /// Collection of the record.
        collection: String,
        /// The record.
        id: String,
        /// Its revision now.
        current: u64,
        /// The revision the request expected.
        expected: u64,
    },
    /// A change-log cursor whose changes are no longer all kept, or that is
    /// beyond the last change.
    #[error("cannot resume after change {since}: {reason}")]
    CursorOutOfRange {
        /// The cursor.
        since: u64,
        /// Why, and what to do.
        reason: String,
    },
    /// A page token that this store did not hand out.
    #[error("invalid page token")]
    InvalidPageToken,
    /// A stored record does not decode, or a record does not encode.
    #[error("cannot {action} {collection} record `{id}`: {source}")]
    Codec {
        /// `encode` or `decode`.
        action: &'static str,
        /// Collection of the record.
        collection: String,
        /// The record.
        id: String,
        /// The serde error.
        #[source]
        source: std::sync::Arc<serde_json::Error>,
    },
    /// The database failed an operation.
    #[error("store operation `{operation}` failed: {reason}")]
    Backend {
        /// What was being done.
        operation: &'static str,
        /// The database's error.
        reason: String,
    },
}

impl Error {
    pub(crate) fn backend(operation: &'static str, err: impl std::fmt::Display) -> Self {
        Self::Backend {
            operation,
            reason: err.to_string(),
        }
    }

    /// The kind of failure, in a word (`conflict`, `not_found`, ...): a
    /// bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidLocation { .. } => "invalid_location",
            Self::Unavailable { .. } => "unavailable",
            Self::Fenced { .. } => "fenced",
            Self::AlreadyExists { .. } => "already_exists",
            Self::NotFound { .. } => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::StaleRevision { .. } => "stale_revision",
            Self::CursorOutOfRange { .. } => "cursor_out_of_range",
            Self::InvalidPageToken => "invalid_page_token",
            Self::Codec { .. } => "codec",
            Self::Backend { .. } => "backend",
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Backend { .. })
    }
}
