//! The manager's error type and its one mapping to gRPC statuses.

use addons_descriptor::FieldViolation;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// Why a manager operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid.
    #[error("invalid request: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// No installation has the id.
    #[error("installation `{0}` not found")]
    NotFound(String),
    /// The marketplace does not know the addon.
    #[error("addon `{0}` not found in the marketplace")]
    AddonNotFound(String),
    /// The addon cannot be installed in its current state.
    #[error("{0}")]
    NotInstallable(String),
    /// The addon is installed already.
    #[error("addon `{marketplace_id}` is already installed as installation `{installation_id}`")]
    AlreadyInstalled {
        /// The addon.
        marketplace_id: String,
        /// The live installation holding it.
        installation_id: String,
    },
    /// The marketplace cannot be reached or failed.
    #[error("the marketplace is unavailable: {0}")]
    MarketplaceUnavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] addons_store::Error),
}

impl Error {
    pub(crate) fn required(field: &str) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, "required")])
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for violation in violations {
                    details.add_bad_request_violation(violation.field, violation.reason);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(_) | Error::AddonNotFound(_) => Status::not_found(message),
            Error::NotInstallable(_) => Status::failed_precondition(message),
            Error::AlreadyInstalled { .. } => Status::already_exists(message),
            Error::MarketplaceUnavailable(_) => Status::unavailable(message),
            Error::Store(err) => addons_server_kit::store_error_to_status(err),
        }
    }
}
