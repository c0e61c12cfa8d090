//! The monitor's handle on containerd's gRPC API.

use std::{path::PathBuf, time::Duration};

use containerd_client::services::v1::version_client::VersionClient;
use tonic::transport::Channel;

/// containerd's version, as its Version service reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// Release, such as `1.6.20`.
    pub version: String,
    /// Git revision of the build.
    pub revision: String,
}

/// Why containerd could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket does not answer.
    #[error("cannot connect to containerd at {socket}: {reason}")]
    Connect {
        /// Path of the socket.
        socket: String,
        /// What went wrong.
        reason: String,
    },
    /// A call failed.
    #[error("containerd call {call} failed: {status}")]
    Call {
        /// The call.
        call: &'static str,
        /// containerd's answer.
        status: tonic::Status,
    },
}

/// containerd at one socket, in one namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    socket: PathBuf,
    namespace: String,
}

impl Containerd {
    /// containerd listening at `socket`; containers live in `namespace`.
    pub fn new(socket: PathBuf, namespace: String) -> Self {
        Self { socket, namespace }
    }

    /// Path of the socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The namespace of the monitor's containers.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn channel(&self) -> Result<Channel, RuntimeError> {
        let connect = containerd_client::connect(&self.socket);
        match tokio::time::timeout(Duration::from_secs(3), connect).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(err)) => Err(RuntimeError::Connect {
                socket: self.socket.display().to_string(),
                reason: err.to_string(),
            }),
            Err(_) => Err(RuntimeError::Connect {
                socket: self.socket.display().to_string(),
                reason: "timed out".to_owned(),
            }),
        }
    }

    /// Asks containerd for its version.
    pub async fn version(&self) -> Result<RuntimeVersion, RuntimeError> {
        let mut client = VersionClient::new(self.channel().await?);
        let response = client
            .version(())
            .await
            .map_err(|status| RuntimeError::Call {
                call: "Version",
                status,
            })?
            .into_inner();
        Ok(RuntimeVersion {
            version: response.version,
            revision: response.revision,
        })
    }
}
