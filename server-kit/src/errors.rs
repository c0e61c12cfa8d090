//! Errors a program can act on (AIP-193): every status the servers make
//! carries a `google.rpc.ErrorInfo` with a stable reason and the domain
//! [`ERROR_DOMAIN`], plus the detail its code calls for.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// The `ErrorInfo.domain` of every error of the addons system.
pub const ERROR_DOMAIN: &str = "addons.oakestra.io";

/// Builds a status with its `ErrorInfo` and any further details.
#[derive(Debug)]
#[must_use = "an error does nothing until it is turned into a status"]
pub struct ApiError {
    code: Code,
    reason: &'static str,
    message: String,
    metadata: HashMap<String, String>,
    details: ErrorDetails,
}

impl ApiError {
    /// An error with `code`, the stable `reason` (UPPER_SNAKE_CASE) and a
    /// message for people.
    pub fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            metadata: HashMap::new(),
            details: ErrorDetails::new(),
        }
    }

    /// INVALID_ARGUMENT `INVALID_REQUEST` with one `BadRequest` violation per
    /// `(field path, reason)`.
    pub fn invalid<F: Into<String>, R: Into<String>>(
        message: impl Into<String>,
        violations: impl IntoIterator<Item = (F, R)>,
    ) -> Self {
        let mut error = Self::new(Code::InvalidArgument, "INVALID_REQUEST", message);
        for (field, reason) in violations {
            error.details.add_bad_request_violation(field, reason);
        }
        error
    }

    /// Adds an `ErrorInfo` metadata entry.
    pub fn metadata(mut self, key: &str, value: impl ToString) -> Self {
        self.metadata.insert(key.to_owned(), value.to_string());
        self
    }

    /// Adds a `BadRequest` field violation.
    pub fn violation(mut self, field: impl Into<String>, reason: impl Into<String>) -> Self {
        self.details.add_bad_request_violation(field, reason);
        self
    }

    /// Sets the `ResourceInfo` naming the resource the error is about.
    pub fn resource(mut self, resource_type: &str, name: impl Into<String>) -> Self {
        self.details
            .set_resource_info(resource_type, name, "", self.message.clone());
        self
    }

    /// Adds a `PreconditionFailure` violation.
    pub fn precondition(
        mut self,
        kind: &str,
        subject: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.details
            .add_precondition_failure_violation(kind, subject, description);
        self
    }

    /// The status.
    pub fn into_status(self) -> Status {
        let Self {
            code,
            reason,
            message,
            metadata,
            mut details,
        } = self;
        details.set_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.into_status()
    }
}

/// RESOURCE_EXHAUSTED `WATCH_TOO_SLOW` for a watcher that fell behind: it
/// resumes with `since_revision` = `resume_from` (also in the metadata).
pub fn watch_too_slow(resume_from: u64) -> Status {
    ApiError::new(
        Code::ResourceExhausted,
        "WATCH_TOO_SLOW",
        format!(
            "watcher fell too far behind the changes; watch again with since_revision {resume_from}"
        ),
    )
    .metadata("resume_from", resume_from)
    .into()
}

/// The stable reason of a status made by [`ApiError`], if it has one.
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .map(|info| info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_carries_its_reason_and_details() {
        let status = ApiError::invalid("bad", [("addon.name", "required")]).into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&status).as_deref(), Some("INVALID_REQUEST"));
        let details = status.get_error_details();
        let violations = &details.bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "addon.name");

        let status = ApiError::new(Code::Aborted, "REVISION_MISMATCH", "stale")
            .metadata("current_revision", 7)
            .into_status();
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["current_revision"], "7");

        let status = ApiError::new(Code::AlreadyExists, "ADDON_NAME_TAKEN", "taken")
            .resource("oakestra.addons.marketplace.v1.Addon", "01abc")
            .into_status();
        let resource = status.get_details_resource_info().unwrap();
        assert_eq!(resource.resource_name, "01abc");
    }
}
