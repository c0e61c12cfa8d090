//! The monitor's error: each variant says which part failed, so a status
//! reason reads "network ...", "state dir ...", "image ..." or "containerd
//! ...", and the reconciler can tell what to retry.

use crate::{network::NetworkError, runtime::RuntimeError, state_dir::StateDirError};

/// Why the monitor could not do something.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// containerd failed or could not be reached.
    #[error("containerd: {0}")]
    Runtime(#[source] RuntimeError),
    /// The image could not be pulled or cannot be run.
    #[error("image: {0}")]
    Image(#[source] RuntimeError),
    /// A pull took longer than the pull timeout.
    #[error("image: pulling {image} timed out after {after:?}")]
    PullTimeout {
        /// The image.
        image: String,
        /// The pull timeout.
        after: std::time::Duration,
    },
    /// A CNI plugin or the network state failed.
    #[error("network: {0}")]
    Network(#[from] NetworkError),
    /// A file under the state dir could not be read or written.
    #[error("state dir: {0}")]
    StateDir(#[from] StateDirError),
    /// The node does not run the service: not granted, against the node's
    /// policy, or its host port is taken. Final until the desired state
    /// changes.
    #[error("refused: {0}")]
    Refused(#[from] crate::admission::Refusal),
}

impl From<RuntimeError> for MonitorError {
    fn from(err: RuntimeError) -> Self {
        match err {
            RuntimeError::Registry { .. } | RuntimeError::InvalidImage { .. } => Self::Image(err),
            _ => Self::Runtime(err),
        }
    }
}

impl MonitorError {
    /// Whether containerd could not be reached: the pass stops and the
    /// connection is made again, instead of counting a failure against a
    /// service.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Runtime(err) if err.is_unavailable())
    }

    /// Whether a pull failed in a way trying again later may help: the
    /// registry could not be reached, broke off, answered 429 or 5xx, or
    /// the pull timed out. Such a failure is the registry's, not the
    /// service's: it is retried, with backoff, without counting.
    pub fn is_transient_pull(&self) -> bool {
        matches!(
            self,
            Self::Image(RuntimeError::Registry {
                transient: true,
                ..
            }) | Self::PullTimeout { .. }
        )
    }

    /// Whose failure it is, when it is not the service's: the registry's,
    /// for a pull trying again may help ([`Self::is_transient_pull`]), or
    /// the node's, for a file of its own state dir that could not be
    /// written or read (a full or failing disk). Such a failure is retried,
    /// with backoff, for as long as it takes, without counting against the
    /// service.
    pub fn not_the_services(&self) -> Option<&'static str> {
        if self.is_transient_pull() {
            Some("the registry's failure")
        } else if matches!(self, Self::StateDir(StateDirError::Io { .. })) {
            Some("the node's failure")
        } else {
            None
        }
    }

    /// Whether trying again cannot help: the node refused the service.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Refused(_))
    }
}
