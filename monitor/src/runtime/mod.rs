//! The monitor's handle on containerd's gRPC API: one connection helper,
//! the namespace (and, during pulls, the lease) added to every request in
//! one place, and the operations the monitor needs: pull and unpack images,
//! create, start, stop and remove containers, watch task exits.
//!
//! **Only this module talks to containerd.**

mod containers;
mod content;
mod pull;
mod seccomp;
mod spec;
mod tasks;
mod unpack;

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use containerd_client::services::v1::version_client::VersionClient;
use tokio::sync::Mutex;
use tonic::{Code, transport::Channel};

pub use self::{
    containers::{ContainerInfo, StoredSpec, TaskExit, TaskState},
    pull::{ImageConfig, PulledImage, RegistryAccess},
    spec::{RunSpec, build_spec},
};

/// What a container is made of: its id, the image it is made from, the
/// image's top snapshot (its own writable one goes on top), its runtime
/// spec and its labels.
#[derive(Debug)]
pub struct NewContainer<'a> {
    /// The container id.
    pub id: &'a str,
    /// The image reference.
    pub image: &'a str,
    /// The image's top snapshot.
    pub top_snapshot: &'a str,
    /// The OCI runtime spec.
    pub spec: &'a oci_spec::runtime::Spec,
    /// The container's labels.
    pub labels: HashMap<String, String>,
}

/// The update mask of an update that sets or clears one label: containerd
/// then leaves the other labels as they are.
fn label_mask(key: &str) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: vec![format!("labels.{key}")],
    }
}

/// What the reconciler needs of a container runtime. containerd is the
/// product's; unit tests use a recording fake.
pub trait Runtime: Clone + Send + Sync + 'static {
    /// The namespace containers live in.
    fn namespace(&self) -> &str;
    /// Every container of the namespace.
    fn list_containers(
        &self,
    ) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;
    /// The state of container `id`'s task.
    fn task_state(&self, id: &str) -> impl Future<Output = Result<TaskState, RuntimeError>> + Send;
    /// The state of every task, by container id (one call, where
    /// [`Runtime::task_state`] of each container would take one each); a
    /// container missing from it has no task.
    fn task_states(
        &self,
    ) -> impl Future<Output = Result<HashMap<String, TaskState>, RuntimeError>> + Send;
    /// Pulls and unpacks `image`, counting bytes in `progress`.
    fn pull(
        &self,
        image: &str,
        registry: &RegistryAccess,
        progress: Arc<AtomicU64>,
    ) -> impl Future<Output = Result<PulledImage, RuntimeError>> + Send;
    /// Creates a container (see [`NewContainer`]).
    fn create_container(
        &self,
        container: NewContainer<'_>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Creates container `id`'s task without starting it; returns its pid.
    fn create_task(
        &self,
        id: &str,
        log: &Path,
    ) -> impl Future<Output = Result<u32, RuntimeError>> + Send;
    /// Starts a created task.
    fn start_created_task(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<u32, RuntimeError>> + Send;
    /// Deletes an exited task; a missing one is fine.
    fn delete_task(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Stops a task: SIGTERM, SIGKILL after `grace`, then deletes it.
    fn stop_task(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Stops and removes container `id` and its snapshot.
    fn remove_container(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Runs `args` in container `id`'s running task; its exit status.
    fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<u32, RuntimeError>> + Send;
    /// Sets or removes a label of container `id`.
    fn set_label(
        &self,
        id: &str,
        key: &str,
        value: Option<&str>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

impl Runtime for Containerd {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn list_containers(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Containerd::list_containers(self, &[]).await
    }

    async fn task_state(&self, id: &str) -> Result<TaskState, RuntimeError> {
        Containerd::task_state(self, id).await
    }

    async fn task_states(&self) -> Result<HashMap<String, TaskState>, RuntimeError> {
        Containerd::task_states(self).await
    }

    async fn pull(
        &self,
        image: &str,
        registry: &RegistryAccess,
        progress: Arc<AtomicU64>,
    ) -> Result<PulledImage, RuntimeError> {
        Containerd::pull(self, image, registry, progress).await
    }

    async fn create_container(&self, container: NewContainer<'_>) -> Result<(), RuntimeError> {
        Containerd::create_container(self, container).await
    }

    async fn create_task(&self, id: &str, log: &Path) -> Result<u32, RuntimeError> {
        Containerd::create_task(self, id, log).await
    }

    async fn start_created_task(&self, id: &str) -> Result<u32, RuntimeError> {
        Containerd::start_created_task(self, id).await
    }

    async fn delete_task(&self, id: &str) -> Result<(), RuntimeError> {
        Containerd::delete_task(self, id).await
    }

    async fn stop_task(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        Containerd::stop_task(self, id, grace).await
    }

    async fn remove_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        Containerd::remove_container(self, id, grace).await
    }

    async fn set_label(
        &self,
        id: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), RuntimeError> {
        Containerd::set_label(self, id, key, value).await
    }

    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<u32, RuntimeError> {
        Containerd::exec(self, id, exec_id, args, timeout).await
    }
}

/// containerd's version, as its Version service reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// Release, such as `1.6.20`.
    pub version: String,
    /// Git revision of the build.
    pub revision: String,
}

/// Why a containerd operation failed.
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
    #[error("containerd call {call} failed: {}", .status.message())]
    Call {
        /// The call.
        call: &'static str,
        /// containerd's answer.
        status: tonic::Status,
    },
    /// The registry side of a pull failed.
    #[error("pulling {image}: {reason}")]
    Registry {
        /// The image.
        image: String,
        /// What went wrong.
        reason: String,
        /// Whether trying again later may help: the registry could not be
        /// reached, broke off, or answered 429 or 5xx.
        transient: bool,
    },
    /// The image cannot be run.
    #[error("image {image} cannot be run: {reason}")]
    InvalidImage {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// A command run in a container did not finish.
    #[error("command in {container}: {reason}")]
    Exec {
        /// The container.
        container: String,
        /// Why.
        reason: String,
    },
}

impl RuntimeError {
    fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Call { call, status }
    }

    /// The answer of `call`, where `code` means the state it asks for is
    /// already there (NOT_FOUND for a removal or a lookup, ALREADY_EXISTS
    /// for a creation): `None` then.
    fn unless<T>(
        answer: Result<tonic::Response<T>, tonic::Status>,
        call: &'static str,
        code: Code,
    ) -> Result<Option<T>, Self> {
        match answer {
            Ok(response) => Ok(Some(response.into_inner())),
            Err(status) if status.code() == code => Ok(None),
            Err(status) => Err(Self::Call { call, status }),
        }
    }

    /// Whether containerd answered NOT_FOUND.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Call { status, .. } if status.code() == Code::NotFound)
    }

    /// Whether containerd answered ALREADY_EXISTS.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Self::Call { status, .. } if status.code() == Code::AlreadyExists)
    }

    /// Whether containerd could not be reached (retry after reconnecting).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            // A dropped connection shows up as UNAVAILABLE, or as UNKNOWN
            // with a transport error.
            Self::Call { status, .. } => {
                status.code() == Code::Unavailable
                    || (status.code() == Code::Unknown && status.message().contains("transport"))
            }
            _ => false,
        }
    }
}

/// containerd at one socket, in one namespace. Cheap to clone; the
/// connection is made on first use and remade after containerd restarts.
#[derive(Debug, Clone)]
pub struct Containerd {
    socket: PathBuf,
    namespace: String,
    snapshotter: String,
    channel: std::sync::Arc<Mutex<Option<Channel>>>,
    /// One writer per blob: pulls run side by side, and two of them writing
    /// the same blob (images sharing a layer, or one image by tag and by
    /// digest) would collide on its write ref.
    writes: std::sync::Arc<std::sync::Mutex<HashMap<String, std::sync::Arc<Mutex<()>>>>>,
    /// The binary that writes task output (rotating by size as it writes),
    /// and the size per file; `None`: the shim appends to the file itself.
    log_writer: Option<(PathBuf, u64)>,
}

impl Containerd {
    /// Task output goes through `writer` (a copy of the monitor's binary),
    /// which starts a new file whenever one would pass `max_bytes`.
    #[must_use]
    pub fn with_log_writer(mut self, writer: PathBuf, max_bytes: u64) -> Self {
        self.log_writer = Some((writer, max_bytes));
        self
    }

    /// The log URI of a task writing to `log`.
    pub(crate) fn log_uri(&self, log: &std::path::Path) -> String {
        match &self.log_writer {
            Some((writer, max_bytes)) => crate::logwriter::uri(writer, log, *max_bytes),
            None => format!("file://{}", log.display()),
        }
    }

    /// containerd listening at `socket`; containers live in `namespace`
    /// and their root filesystems in `snapshotter`.
    pub fn new(socket: PathBuf, namespace: String, snapshotter: String) -> Self {
        Self {
            socket,
            namespace,
            snapshotter,
            channel: Default::default(),
            writes: Default::default(),
            log_writer: None,
        }
    }

    /// Path of the socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The namespace of the monitor's containers.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The snapshotter root filesystems are unpacked into.
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// The connection, made now if there is none.
    async fn channel(&self) -> Result<Channel, RuntimeError> {
        let mut guard = self.channel.lock().await;
        if let Some(channel) = guard.as_ref() {
            return Ok(channel.clone());
        }
        let connect = containerd_client::connect(&self.socket);
        let channel = match tokio::time::timeout(Duration::from_secs(3), connect).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(err)) => {
                return Err(RuntimeError::Connect {
                    socket: self.socket.display().to_string(),
                    reason: error_chain(&err),
                });
            }
            Err(_) => {
                return Err(RuntimeError::Connect {
                    socket: self.socket.display().to_string(),
                    reason: "timed out".to_owned(),
                });
            }
        };
        *guard = Some(channel.clone());
        Ok(channel)
    }

    /// Drops the connection, so the next call connects again (after
    /// containerd restarted, say).
    pub async fn reset(&self) {
        *self.channel.lock().await = None;
    }

    /// A request in the monitor's namespace.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        // Namespaces and lease ids are checked to be valid metadata when
        // the monitor starts and when leases are created.
        if let Ok(value) = self.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", value);
        }
        request
    }

    /// A request in the monitor's namespace, within `lease`: what it makes
    /// is safe from containerd's GC while the lease lives.
    fn leased<T>(&self, message: T, lease: &str) -> tonic::Request<T> {
        let mut request = self.request(message);
        if let Ok(value) = lease.parse() {
            request.metadata_mut().insert("containerd-lease", value);
        }
        request
    }

    /// Creates a lease that expires in an hour: resources made under it are
    /// safe from containerd's GC until they are referenced, and a monitor
    /// that dies midway leaves nothing GC cannot collect.
    async fn create_lease(&self) -> Result<String, RuntimeError> {
        use containerd_client::services::v1::{CreateRequest, leases_client::LeasesClient};
        let id = format!("oakestra-{:016x}", rand::random::<u64>());
        let labels = std::collections::HashMap::from([(
            "containerd.io/gc.expire".to_owned(),
            expiry_in_an_hour(),
        )]);
        LeasesClient::new(self.channel().await?)
            .create(self.request(CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(RuntimeError::call("Leases.Create"))?;
        Ok(id)
    }

    /// Releases a lease; failures only delay GC until the lease expires.
    async fn delete_lease(&self, id: &str) {
        use containerd_client::services::v1::{DeleteRequest, leases_client::LeasesClient};
        if let Ok(channel) = self.channel().await {
            let _ = LeasesClient::new(channel)
                .delete(self.request(DeleteRequest {
                    id: id.to_owned(),
                    sync: false,
                }))
                .await;
        }
    }

    /// Asks containerd for its version.
    pub async fn version(&self) -> Result<RuntimeVersion, RuntimeError> {
        let mut client = VersionClient::new(self.channel().await?);
        let response = client
            .version(())
            .await
            .map_err(RuntimeError::call("Version"))?
            .into_inner();
        Ok(RuntimeVersion {
            version: response.version,
            revision: response.revision,
        })
    }
}

/// One hour from now in RFC 3339.
fn expiry_in_an_hour() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    prost_types::Timestamp {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
    .to_string()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
