//! Why a command failed, and its exit code.

use super::*;

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub struct Failure {
    pub(crate) message: String,
    pub(crate) code: u8,
    /// The server's error, with every detail, for `--output json|yaml`.
    pub(crate) status: Option<tonic::Status>,
}

impl Failure {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        self.code
    }

    /// The server's error as JSON (code, reason, message, every detail), when
    /// the failure came from a server.
    pub fn details_json(&self) -> Option<serde_json::Value> {
        self.status.as_ref().map(oak_addons::json::status_to_json)
    }

    pub(crate) fn error(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_ERROR,
            status: None,
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_USAGE,
            status: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A client error about `what`, as one line.
pub(crate) fn failed(what: &str) -> impl FnOnce(ClientError) -> Failure + '_ {
    move |err| Failure {
        code: match err {
            ClientError::Status(_) => EXIT_ERROR,
            ClientError::InvalidUrl { .. } | ClientError::Input(_) => EXIT_USAGE,
        },
        message: format!("{what}: {err}"),
        status: match &err {
            ClientError::Status(status) => Some(status.clone()),
            _ => None,
        },
    }
}
