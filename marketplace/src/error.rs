//! The marketplace's error type and its one mapping to gRPC statuses.

use addons_descriptor::FieldViolation;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt as _};

/// Why a marketplace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid; each entry is a field path and what is wrong.
    #[error("invalid addon: {}", summary(.0))]
    Invalid(Vec<FieldViolation>),
    /// No addon has the id.
    #[error("addon `{0}` not found")]
    NotFound(String),
    /// Another addon has the name.
    #[error("an addon named `{0}` already exists")]
    NameTaken(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] addons_store::Error),
}

fn summary(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// A request missing a required field.
    pub(crate) fn required(field: &str) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, "required")])
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(violations) => {
                let message = format!("invalid addon: {}", summary(&violations));
                let mut details = ErrorDetails::new();
                for violation in violations {
                    details.add_bad_request_violation(violation.field, violation.reason);
                }
                Status::with_error_details(tonic::Code::InvalidArgument, message, details)
            }
            Error::NotFound(_) => Status::not_found(err.to_string()),
            Error::NameTaken(_) => Status::already_exists(err.to_string()),
            Error::Store(err) => addons_server_kit::store_error_to_status(err),
        }
    }
}
