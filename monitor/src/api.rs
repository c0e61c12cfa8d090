//! The tonic adapter of `oakestra.addons.monitor.v1.NodeMonitorService`.

use std::path::PathBuf;

use addons_server_kit::{ApiError, MethodAccess, Role};
use oakestra_addons_proto::{
    engine::v1::{Plane, ServicePhase},
    monitor::v1::{
        self as pb,
        node_monitor_service_server::{NodeMonitorService, NodeMonitorServiceServer},
    },
};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::{
    Containerd,
    labels::{
        CORE_SOURCE, CORE_SOURCE_STATIC, INSTALLATION, MANAGED_BY, MANAGED_BY_VALUE, REPLACED_BY,
        REPLACES, SERVICE,
    },
    link::ReportOutbox,
    runtime::TaskState,
    view::NodeView,
};

/// Who may call the node API: viewers see what runs; logs, which may hold
/// secrets, need an operator.
pub const PERMISSIONS: &[MethodAccess] = &[
    MethodAccess {
        roles: &[Role::Viewer],
        methods: &["ListManagedServices", "GetRuntimeInfo"],
    },
    MethodAccess {
        roles: &[Role::Operator],
        methods: &["GetServiceLogs"],
    },
];

/// What the API reads of the running monitor.
#[derive(Debug, Clone)]
pub struct MonitorState {
    /// What the reconciler published after its last pass.
    pub view: watch::Receiver<NodeView>,
    /// Whether the link to the manager is up.
    pub connected: watch::Receiver<bool>,
    /// Reports waiting for the link.
    pub outbox: ReportOutbox,
    /// The newest desired state received.
    pub desired: watch::Receiver<Option<oakestra_addons_proto::engine::v1::DesiredState>>,
}

/// The node-local API of the monitor.
#[derive(Debug, Clone)]
pub struct NodeMonitorApi {
    containerd: Containerd,
    node_id: String,
    plane: Plane,
    state_dir: PathBuf,
    state: MonitorState,
}

impl NodeMonitorApi {
    /// The API of the monitor of `node_id` in `plane`, whose logs live under
    /// `state_dir`.
    pub fn new(
        containerd: Containerd,
        node_id: String,
        plane: Plane,
        state_dir: PathBuf,
        state: MonitorState,
    ) -> Self {
        Self {
            containerd,
            node_id,
            plane,
            state_dir,
            state,
        }
    }

    fn unavailable(err: crate::runtime::RuntimeError) -> Status {
        ApiError::new(Code::Unavailable, "CONTAINERD_UNAVAILABLE", err.to_string()).into()
    }

    /// The tonic service, with the servers' message size limits.
    pub fn into_service(self) -> NodeMonitorServiceServer<Self> {
        addons_server_kit::limited!(NodeMonitorServiceServer::new(self))
    }
}

/// The use cases of the calls.
impl NodeMonitorApi {
    async fn services(
        &self,
        _request: pb::ListManagedServicesRequest,
    ) -> Result<pb::ListManagedServicesResponse, Status> {
        let all = self
            .containerd
            .list_containers(&[])
            .await
            .map_err(Self::unavailable)?;
        let containers = all
            .iter()
            .filter(|c| c.labels.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE))
            .cloned();
        let mut services = Vec::new();
        let view = self.state.view.borrow().clone();
        for container in containers {
            // What the monitor reported, so the node and the manager agree;
            // the task's state for a container it has not decided about.
            let known = view.services.get(&container.id);
            let phase = match known {
                Some(status) => status.phase(),
                None => match self
                    .containerd
                    .task_state(&container.id)
                    .await
                    .map_err(Self::unavailable)?
                {
                    TaskState::Running(_) | TaskState::Paused => ServicePhase::Running,
                    _ => ServicePhase::Backoff,
                },
            };
            let reason = known.map(|s| s.reason.clone()).unwrap_or_default();
            services.push(pb::ManagedService {
                installation_id: container
                    .labels
                    .get(INSTALLATION)
                    .cloned()
                    .unwrap_or_default(),
                // A replacement is named like the core component it replaces.
                replaced_core_component: if container.labels.contains_key(REPLACES) {
                    container.labels.get(SERVICE).cloned().unwrap_or_default()
                } else {
                    String::new()
                },
                service_name: container.labels.get(SERVICE).cloned().unwrap_or_default(),
                container_id: container.id,
                phase: phase.into(),
                image: container.image,
                reason,
            });
        }
        services.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        let plane = self.plane.as_str();
        let mut core_components = Vec::new();
        for (name, container) in crate::cores::discover(&all, plane) {
            let running = matches!(
                self.containerd
                    .task_state(&container.id)
                    .await
                    .map_err(Self::unavailable)?,
                TaskState::Running(_) | TaskState::Paused
            );
            core_components.push(pb::CoreComponent {
                name,
                container_id: container.id.clone(),
                running,
                static_component: container.labels.get(CORE_SOURCE).map(String::as_str)
                    == Some(CORE_SOURCE_STATIC),
                replaced_by: container
                    .labels
                    .get(REPLACED_BY)
                    .cloned()
                    .unwrap_or_default(),
                image: container.image.clone(),
            });
        }
        core_components.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pb::ListManagedServicesResponse {
            services,
            core_components,
        })
    }

    async fn logs(
        &self,
        request: pb::GetServiceLogsRequest,
    ) -> Result<pb::GetServiceLogsResponse, Status> {
        // Both go into a containerd filter: only their plain forms.
        let id_error = addons_descriptor::validate_record_id(&request.installation_id).err();
        let bad: Vec<(&str, &str)> = [
            (
                "installation_id",
                id_error.is_some(),
                "required: an installation id (26 characters, a ULID)",
            ),
            (
                "service_name",
                !addons_descriptor::is_name(&request.service_name),
                "required: a service name (letters, digits, '_', '.' and '-', starting with a letter or a digit, at most 63 characters)",
            ),
        ]
        .into_iter()
        .filter(|(_, bad, _)| *bad)
        .map(|(field, _, reason)| (field, reason))
        .collect();
        if !bad.is_empty() {
            return Err(ApiError::invalid(
                "installation_id and service_name must be given in their plain forms",
                bad,
            )
            .into());
        }
        let lines = match request.tail_lines {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let containers = self
            .containerd
            .list_containers(&[
                (MANAGED_BY, MANAGED_BY_VALUE),
                (INSTALLATION, &request.installation_id),
                (SERVICE, &request.service_name),
            ])
            .await
            .map_err(Self::unavailable)?;
        let Some(container) = containers.first() else {
            return Err(ApiError::new(
                Code::NotFound,
                "SERVICE_NOT_FOUND",
                format!(
                    "service {} of installation {} does not run on this node",
                    request.service_name, request.installation_id
                ),
            )
            .into());
        };
        let path = crate::state_dir::StateDir::new(&self.state_dir)
            .log(&container.id)
            .map_err(|err| Status::internal(err.to_string()))?;
        let lines = tokio::task::spawn_blocking(move || crate::state_dir::tail(&path, lines))
            .await
            .map_err(|err| Status::internal(err.to_string()))?
            .map_err(|err| Status::internal(format!("cannot read the log: {err}")))?;
        Ok(pb::GetServiceLogsResponse { lines })
    }

    async fn runtime_info(
        &self,
        _request: pb::GetRuntimeInfoRequest,
    ) -> Result<pb::GetRuntimeInfoResponse, Status> {
        let mut info = pb::GetRuntimeInfoResponse {
            node_id: self.node_id.clone(),
            plane: self.plane.into(),
            containerd_socket: self.containerd.socket().display().to_string(),
            containerd_namespace: self.containerd.namespace().to_owned(),
            monitor_version: env!("CARGO_PKG_VERSION").to_owned(),
            completed_passes: self.state.view.borrow().completed_passes,
            applied_generation: self.state.view.borrow().applied_generation,
            manager_connected: *self.state.connected.borrow(),
            pending_reports: u32::try_from(self.state.outbox.len()).unwrap_or(u32::MAX),
            desired_generation: self
                .state
                .desired
                .borrow()
                .as_ref()
                .map_or(0, |d| d.generation),
            desired_installations: self.state.desired.borrow().as_ref().map_or(0, |d| {
                u32::try_from(d.installations.len()).unwrap_or(u32::MAX)
            }),
            ..Default::default()
        };
        match self.containerd.version().await {
            Ok(version) => {
                info.containerd_version = version.version;
                info.containerd_revision = version.revision;
            }
            Err(err) => info.containerd_error = err.to_string(),
        }
        Ok(info)
    }
}

#[tonic::async_trait]
impl NodeMonitorService for NodeMonitorApi {
    addons_server_kit::unary! {
        read list_managed_services(pb::ListManagedServicesRequest) -> pb::ListManagedServicesResponse = services;
        read get_service_logs(pb::GetServiceLogsRequest) -> pb::GetServiceLogsResponse = logs;
        read get_runtime_info(pb::GetRuntimeInfoRequest) -> pb::GetRuntimeInfoResponse = runtime_info;
    }
}
