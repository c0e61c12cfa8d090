//! The marketplace's error type and its one mapping to gRPC statuses, each
//! with the stable `ErrorInfo` reason the contract documents.

use addons_descriptor::FieldViolation;
use addons_server_kit::ApiError;
use tonic::{Code, Status};

/// The resource type named in `ResourceInfo` details.
const ADDON: &str = "oakestra.addons.marketplace.v1.Addon";

/// Why a marketplace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid; each entry is a field path and what is wrong.
    #[error("invalid request: {}", summary(.0))]
    Invalid(Vec<FieldViolation>),
    /// No addon has the id.
    #[error("addon `{0}` not found")]
    NotFound(String),
    /// A publisher touched an addon someone else published.
    #[error(
        "addon `{id}` was published by {owner}; only its publisher or a reviewer may change it"
    )]
    NotOwner {
        /// The addon.
        id: String,
        /// Who published it.
        owner: String,
    },
    /// The name already has this version.
    #[error("version {version} of addon `{name}` already exists (`{existing_id}`)")]
    NameTaken {
        /// The name.
        name: String,
        /// The version.
        version: String,
        /// The addon holding it.
        existing_id: String,
    },
    /// A new version must be higher than every published one.
    #[error(
        "version {version} of addon `{name}` is not higher than its highest published version {highest}"
    )]
    VersionNotNewer {
        /// The name.
        name: String,
        /// The version asked for.
        version: String,
        /// The highest published version.
        highest: String,
        /// The addon holding it.
        highest_id: String,
    },
    /// The addon was revoked: it is never reviewed again.
    #[error("addon `{0}` is revoked; it is never reviewed again")]
    Revoked(String),
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
        let message = err.to_string();
        match err {
            Error::Invalid(violations) => {
                ApiError::invalid(message, violations.into_iter().map(|v| (v.field, v.reason)))
                    .into()
            }
            Error::NotFound(id) => ApiError::new(Code::NotFound, "ADDON_NOT_FOUND", message)
                .resource(ADDON, id)
                .into(),
            Error::NotOwner { id, .. } => {
                ApiError::new(Code::PermissionDenied, "NOT_OWNER", message)
                    .resource(ADDON, id)
                    .into()
            }
            Error::NameTaken { existing_id, .. } => {
                ApiError::new(Code::AlreadyExists, "ADDON_NAME_TAKEN", message)
                    .resource(ADDON, existing_id)
                    .into()
            }
            Error::VersionNotNewer {
                highest,
                highest_id,
                ..
            } => ApiError::new(Code::FailedPrecondition, "VERSION_NOT_NEWER", message)
                .metadata("highest_version", highest)
                .resource(ADDON, highest_id)
                .into(),
            Error::Revoked(id) => ApiError::new(Code::FailedPrecondition, "ADDON_REVOKED", message)
                .resource(ADDON, id)
                .into(),
            Error::Store(err) => addons_server_kit::store_error_to_status(err),
        }
    }
}
