//! The tonic adapters of `oakestra.addons.engine.v1`: convert, delegate to
//! [`Manager`], map errors.

use addons_descriptor::FieldViolation;
use addons_server_kit::{
    Identity, MethodAccess, Mutation, Requests, Role, Shutdown, WatchStream, audit, watch_stream,
};
use addons_store::{ChangeKind, Event, Start};
use oakestra_addons_proto::engine::v1::{
    self as pb,
    addons_manager_service_server::{AddonsManagerService, AddonsManagerServiceServer},
    monitor_link_service_server::{MonitorLinkService, MonitorLinkServiceServer},
};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    Error, Manager, convert,
    link::LinkHub,
    service::{Install, Rollout},
};

/// How many changes a watcher may have in flight before it is dropped.
const WATCH_BUFFER: usize = 256;

/// Who may call what on the manager: viewers read, operators change.
pub const MANAGER_PERMISSIONS: &[MethodAccess] = &[
    MethodAccess {
        roles: &[Role::Viewer],
        methods: &[
            "GetInstallation",
            "ListInstallations",
            "WatchInstallations",
            "ListNodes",
        ],
    },
    MethodAccess {
        roles: &[Role::Operator],
        methods: &[
            "InstallAddon",
            "UninstallAddon",
            "UpgradeInstallation",
            "RollbackInstallation",
            "ForgetNode",
        ],
    },
];

/// Only nodes open the monitor link (and only as themselves, checked by
/// the link).
pub const LINK_PERMISSIONS: &[MethodAccess] = &[MethodAccess {
    roles: &[Role::Node],
    methods: &["OpenLink"],
}];

/// The gRPC face of the manager's install API.
#[derive(Debug, Clone)]
pub struct ManagerApi {
    core: Manager,
    nodes: LinkHub,
    requests: Requests,
    shutdown: Shutdown,
}

impl ManagerApi {
    /// Serves `core` and the nodes linked to `nodes`, remembering mutating
    /// calls in `requests` for their retries; watch streams end when
    /// `shutdown` fires.
    pub fn new(core: Manager, nodes: LinkHub, requests: Requests, shutdown: Shutdown) -> Self {
        Self {
            core,
            nodes,
            requests,
            shutdown,
        }
    }

    /// The tonic service, with the servers' message size limits.
    pub fn into_service(self) -> AddonsManagerServiceServer<Self> {
        addons_server_kit::limited!(AddonsManagerServiceServer::new(self))
    }
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Error::required(field).into());
    }
    Ok(value)
}

fn change_type(kind: ChangeKind) -> pb::ChangeType {
    match kind {
        ChangeKind::Added => pb::ChangeType::Added,
        ChangeKind::Modified => pb::ChangeType::Modified,
        ChangeKind::Deleted => pb::ChangeType::Deleted,
    }
}

fn accepted(privileges: &[pb::Privilege]) -> Vec<addons_descriptor::Privilege> {
    privileges.iter().cloned().map(Into::into).collect()
}

/// What an upgrade or rollback request asks of its rollout, checked:
/// the privileges it accepts, its options (max parallel, min healthy time,
/// progress deadline) and the revision it expects.
fn rollout<'a>(
    identity: &'a Identity,
    accepted_privileges: &[pb::Privilege],
    (max_parallel, min_healthy_time, progress_deadline): (
        u32,
        Option<prost_types::Duration>,
        Option<prost_types::Duration>,
    ),
    expected_revision: Option<u64>,
) -> Result<Rollout<'a>, Error> {
    Ok(Rollout {
        accepted: accepted(accepted_privileges),
        options: rollout_options(max_parallel, min_healthy_time, progress_deadline)?,
        expected_revision,
        requested_by: &identity.subject,
    })
}

/// The rollout options of an upgrade or rollback request, checked.
fn rollout_options(
    max_parallel: u32,
    min_healthy_time: Option<prost_types::Duration>,
    progress_deadline: Option<prost_types::Duration>,
) -> Result<crate::rollout::RolloutOptions, Error> {
    use crate::rollout::{
        DEFAULT_DEADLINE_MARGIN, DEFAULT_MIN_HEALTHY_TIME, MAX_MIN_HEALTHY_TIME,
        MAX_PROGRESS_DEADLINE,
    };
    let mut violations = Vec::new();
    let mut duration = |field: &str, value: Option<prost_types::Duration>, max: Duration| {
        let value = value?;
        match Duration::try_from(value) {
            Ok(d) if d <= max => Some(d),
            _ => {
                violations.push(FieldViolation::new(
                    field,
                    format!("must be between 0 and {max:?}"),
                ));
                None
            }
        }
    };
    let min_healthy_time = duration("min_healthy_time", min_healthy_time, MAX_MIN_HEALTHY_TIME)
        .unwrap_or(DEFAULT_MIN_HEALTHY_TIME);
    let progress_deadline = duration(
        "progress_deadline",
        progress_deadline,
        MAX_PROGRESS_DEADLINE,
    )
    .unwrap_or(min_healthy_time + DEFAULT_DEADLINE_MARGIN);
    if progress_deadline <= min_healthy_time {
        violations.push(FieldViolation::new(
            "progress_deadline",
            "must be longer than min_healthy_time",
        ));
    }
    if max_parallel > 10_000 {
        violations.push(FieldViolation::new("max_parallel", "at most 10000"));
    }
    if !violations.is_empty() {
        return Err(Error::Invalid(violations));
    }
    Ok(crate::rollout::RolloutOptions {
        max_parallel: max_parallel.max(1),
        min_healthy_time,
        progress_deadline,
    })
}

/// [`rollout`] of an upgrade or a rollback request: both carry the same
/// fields.
macro_rules! rollout_of {
    ($identity:expr, $request:expr) => {
        rollout(
            $identity,
            &$request.accepted_privileges,
            (
                $request.max_parallel,
                $request.min_healthy_time,
                $request.progress_deadline,
            ),
            $request.expected_revision,
        )
    };
}

/// Most ids one watch may select.
const MAX_WATCH_IDS: usize = 500;

/// The use cases of the unary calls (mutating ones behind
/// [`Requests::serve`]).
impl ManagerApi {
    async fn install(
        &self,
        Mutation {
            identity,
            request_id,
            request,
        }: Mutation<'_, pb::InstallAddonRequest>,
    ) -> Result<pb::InstallAddonResponse, Status> {
        let marketplace_id = required("marketplace_id", &request.marketplace_id)?;
        let installation = self
            .core
            .install(Install {
                marketplace_id,
                keep_core_stopped_on_failure: request.keep_core_stopped_on_failure,
                accepted: accepted(&request.accepted_privileges),
                node_selector: request.node_selector.clone().into_iter().collect(),
                request_id: Some(request_id).filter(|id| !id.is_empty()),
                requested_by: &identity.subject,
            })
            .await?;
        tracing::info!(id = %installation.value.id, %marketplace_id, "addon installed");
        Ok(pb::InstallAddonResponse {
            installation: Some(convert::installation_to_proto(installation)),
        })
    }

    async fn upgrade(
        &self,
        Mutation {
            identity, request, ..
        }: Mutation<'_, pb::UpgradeInstallationRequest>,
    ) -> Result<pb::UpgradeInstallationResponse, Status> {
        let id = required("id", &request.id)?;
        let version = required("version", &request.version)?;
        let rollout = rollout_of!(identity, request)?;
        let installation = self.core.upgrade(id, version, rollout).await?;
        tracing::info!(%id, %version, release = installation.value.release, "upgrade started");
        Ok(pb::UpgradeInstallationResponse {
            installation: Some(convert::installation_to_proto(installation)),
        })
    }

    async fn rollback(
        &self,
        Mutation {
            identity, request, ..
        }: Mutation<'_, pb::RollbackInstallationRequest>,
    ) -> Result<pb::RollbackInstallationResponse, Status> {
        let id = required("id", &request.id)?;
        let rollout = rollout_of!(identity, request)?;
        let installation = self.core.rollback(id, request.release, rollout).await?;
        tracing::info!(%id, release = installation.value.release, "rollback started");
        Ok(pb::RollbackInstallationResponse {
            installation: Some(convert::installation_to_proto(installation)),
        })
    }

    async fn uninstall(
        &self,
        Mutation { request, .. }: Mutation<'_, pb::UninstallAddonRequest>,
    ) -> Result<pb::UninstallAddonResponse, Status> {
        let id = required("id", &request.id)?;
        let installation = self
            .core
            .uninstall(id, request.purge, request.expected_revision)
            .await?;
        Ok(pb::UninstallAddonResponse {
            installation: installation.map(convert::installation_to_proto),
        })
    }

    async fn get(
        &self,
        request: pb::GetInstallationRequest,
    ) -> Result<pb::GetInstallationResponse, Status> {
        let installation = self.core.get(required("id", &request.id)?).await?;
        Ok(pb::GetInstallationResponse {
            installation: Some(convert::installation_to_proto(installation)),
        })
    }

    async fn nodes(&self, request: pb::ListNodesRequest) -> Result<pb::ListNodesResponse, Status> {
        let page_size = usize::try_from(request.page_size)
            .map_err(|_| Error::invalid("page_size", "must not be negative"))?;
        let token = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let (nodes, next) = self.nodes.list_nodes(page_size, token).await?;
        Ok(pb::ListNodesResponse {
            nodes,
            next_page_token: next.unwrap_or_default(),
        })
    }

    async fn list(
        &self,
        request: pb::ListInstallationsRequest,
    ) -> Result<pb::ListInstallationsResponse, Status> {
        let (statuses, page_size) = addons_descriptor::list_request(
            &request.statuses,
            request.page_size,
            convert::status_from_proto,
        )
        .map_err(Error::Invalid)?;
        let token = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let page = self.core.list(&statuses, page_size, token).await?;
        Ok(pb::ListInstallationsResponse {
            installations: page
                .items
                .into_iter()
                .map(convert::installation_to_proto)
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl AddonsManagerService for ManagerApi {
    addons_server_kit::unary! {
        mutating install_addon(pb::InstallAddonRequest) -> pb::InstallAddonResponse = install;
        mutating upgrade_installation(pb::UpgradeInstallationRequest) -> pb::UpgradeInstallationResponse = upgrade;
        mutating rollback_installation(pb::RollbackInstallationRequest) -> pb::RollbackInstallationResponse = rollback;
        mutating uninstall_addon(pb::UninstallAddonRequest) -> pb::UninstallAddonResponse = uninstall;
        read get_installation(pb::GetInstallationRequest) -> pb::GetInstallationResponse = get;
        read list_nodes(pb::ListNodesRequest) -> pb::ListNodesResponse = nodes;
        read list_installations(pb::ListInstallationsRequest) -> pb::ListInstallationsResponse = list;
    }

    async fn forget_node(
        &self,
        request: Request<pb::ForgetNodeRequest>,
    ) -> Result<Response<pb::ForgetNodeResponse>, Status> {
        let identity = Identity::of(&request);
        let request = request.into_inner();
        let outcome = async {
            let node = required("node_id", &request.node_id)?;
            let node = self.nodes.forget(node).await?;
            Ok(pb::ForgetNodeResponse { node: Some(node) })
        }
        .await;
        audit(&identity, "ForgetNode", &request.node_id, &outcome);
        outcome.map(Response::new)
    }

    type WatchInstallationsStream = WatchStream<pb::WatchInstallationsResponse>;

    async fn watch_installations(
        &self,
        request: Request<pb::WatchInstallationsRequest>,
    ) -> Result<Response<Self::WatchInstallationsStream>, Status> {
        let request = request.into_inner();
        let ids = request.ids;
        if ids.len() > MAX_WATCH_IDS {
            return Err(Error::Invalid(vec![FieldViolation::new(
                "ids",
                format!("at most {MAX_WATCH_IDS} ids"),
            )])
            .into());
        }
        if let Some(i) = ids.iter().position(String::is_empty) {
            return Err(
                Error::Invalid(vec![FieldViolation::new(format!("ids[{i}]"), "empty")]).into(),
            );
        }
        let start = match request.since_revision {
            0 => {
                // Unknown ids fail the call itself, before the stream starts.
                for id in &ids {
                    self.core.get(id).await?;
                }
                Start::Snapshot
            }
            since => Start::After(since),
        };
        let core = self.core.clone();
        let shutdown = self.shutdown.clone();
        let whole = self.core.clone();
        let changed_only = request.changed_services_only;
        let stream = watch_stream(
            WATCH_BUFFER,
            move |tx| async move { core.watch(ids, start, tx, shutdown.fired()).await },
            move |event| match event {
                Event::Change(mut change) => {
                    let installation = &mut change.record.value;
                    if !changed_only {
                        whole.hydrate(installation);
                    } else if installation.services.is_empty() {
                        installation.services = std::mem::take(&mut installation.changed);
                    }
                    pb::WatchInstallationsResponse {
                        r#type: change_type(change.kind).into(),
                        sequence: change.seq,
                        installation: Some(convert::installation_to_proto(change.record)),
                        in_sync: false,
                    }
                }
                Event::InSync(sequence) => pb::WatchInstallationsResponse {
                    sequence,
                    in_sync: true,
                    ..pb::WatchInstallationsResponse::default()
                },
            },
        );
        Ok(Response::new(stream))
    }
}

/// The manager's end of the monitor link.
#[derive(Debug, Clone)]
pub struct MonitorLinkApi {
    hub: LinkHub,
}

impl MonitorLinkApi {
    /// Serves links through `hub`.
    pub fn new(hub: LinkHub) -> Self {
        Self { hub }
    }

    /// The tonic service, with the servers' message size limits.
    pub fn into_service(self) -> MonitorLinkServiceServer<Self> {
        addons_server_kit::limited!(MonitorLinkServiceServer::new(self))
    }
}

#[tonic::async_trait]
impl MonitorLinkService for MonitorLinkApi {
    type OpenLinkStream = WatchStream<pb::OpenLinkResponse>;

    async fn open_link(
        &self,
        request: Request<Streaming<pb::OpenLinkRequest>>,
    ) -> Result<Response<Self::OpenLinkStream>, Status> {
        let identity = addons_server_kit::Identity::of(&request);
        let outbound = self.hub.connect(identity, request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}
