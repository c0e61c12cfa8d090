//! What a client call can fail with, and how to say it in one line.

use tonic::Code;
use tonic_types::StatusExt as _;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not a valid endpoint.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error (or could not be reached, as
    /// `UNAVAILABLE`).
    #[error("{}", describe(.0))]
    Status(#[from] tonic::Status),
    /// The input could not be used (a descriptor file, say).
    #[error("{0}")]
    Input(String),
}

impl ClientError {
    /// The gRPC code, if the server (or the transport) gave one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// One line for a status: its code, its `ErrorInfo` reason, its message,
/// and the field violations it carries, such as
/// `INVALID_ARGUMENT (INVALID_REQUEST): invalid request (addon.services[0].image: required)`.
pub fn describe(status: &tonic::Status) -> String {
    let code = match status.get_details_error_info() {
        Some(info) if !info.reason.is_empty() => {
            format!("{} ({})", code_name(status.code()), info.reason)
        }
        _ => code_name(status.code()).to_owned(),
    };
    let mut message = status.message().trim().replace('\n', " ");
    if message.is_empty() {
        message = "no message".to_owned();
    }
    let details = status.get_error_details();
    if let Some(bad) = details.bad_request() {
        let violations: Vec<String> = bad
            .field_violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        if !violations.is_empty() {
            // The message often already lists them; say them once.
            let listed = violations.iter().all(|v| message.contains(v.as_str()));
            if !listed {
                message = format!("{message} ({})", violations.join("; "));
            }
        }
    }
    format!("{code}: {message}")
}

pub use oakestra_addons_proto::code_name;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn says_code_message_and_violations_once() {
        let status = tonic::Status::with_error_details(
            Code::InvalidArgument,
            "invalid addon",
            ErrorDetails::with_bad_request_violation("services[0].image", "must not be empty"),
        );
        assert_eq!(
            describe(&status),
            "INVALID_ARGUMENT: invalid addon (services[0].image: must not be empty)"
        );
        let listed = tonic::Status::with_error_details(
            Code::InvalidArgument,
            "invalid: name: must not be empty",
            ErrorDetails::with_bad_request_violation("name", "must not be empty"),
        );
        assert_eq!(
            describe(&listed),
            "INVALID_ARGUMENT: invalid: name: must not be empty"
        );
        assert_eq!(
            describe(&tonic::Status::unavailable("")),
            "UNAVAILABLE: no message"
        );
    }
}
