//! The tonic adapter of `oakestra.addons.monitor.v1.NodeMonitorService`.

use oakestra_addons_proto::{
    engine::v1::Plane,
    monitor::v1::{
        self as pb,
        node_monitor_service_server::{NodeMonitorService, NodeMonitorServiceServer},
    },
};
use tonic::{Request, Response, Status};

use crate::Containerd;

/// The node-local API of the monitor.
#[derive(Debug, Clone)]
pub struct NodeMonitorApi {
    containerd: Containerd,
    node_id: String,
    plane: Plane,
}

impl NodeMonitorApi {
    /// The API of the monitor of `node_id` in `plane`.
    pub fn new(containerd: Containerd, node_id: String, plane: Plane) -> Self {
        Self {
            containerd,
            node_id,
            plane,
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> NodeMonitorServiceServer<Self> {
        NodeMonitorServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl NodeMonitorService for NodeMonitorApi {
    async fn list_managed_services(
        &self,
        _request: Request<pb::ListManagedServicesRequest>,
    ) -> Result<Response<pb::ListManagedServicesResponse>, Status> {
        Err(Status::unimplemented(
            "this monitor does not run addons yet: the containerd reconciler is not implemented",
        ))
    }

    async fn get_service_logs(
        &self,
        _request: Request<pb::GetServiceLogsRequest>,
    ) -> Result<Response<pb::GetServiceLogsResponse>, Status> {
        Err(Status::unimplemented(
            "this monitor does not run addons yet: there are no service logs",
        ))
    }

    async fn get_runtime_info(
        &self,
        _request: Request<pb::GetRuntimeInfoRequest>,
    ) -> Result<Response<pb::GetRuntimeInfoResponse>, Status> {
        let mut info = pb::GetRuntimeInfoResponse {
            node_id: self.node_id.clone(),
            plane: self.plane.into(),
            containerd_socket: self.containerd.socket().display().to_string(),
            namespace: self.containerd.namespace().to_owned(),
            monitor_version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        };
        match self.containerd.version().await {
            Ok(version) => {
                info.containerd_version = version.version;
                info.containerd_revision = version.revision;
            }
            Err(err) => info.containerd_error = err.to_string(),
        }
        Ok(Response::new(info))
    }
}
