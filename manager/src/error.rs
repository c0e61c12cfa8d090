//! The manager's error type and its one mapping to gRPC statuses, each with
//! the stable `ErrorInfo` reason the contract documents.

use addons_descriptor::FieldViolation;
use addons_server_kit::ApiError;
use tonic::{Code, Status};

/// The resource type of installations in `ResourceInfo` details.
const INSTALLATION: &str = "oakestra.addons.engine.v1.Installation";
/// The resource type of a node in error details.
const NODE: &str = "oakestra.addons.engine.v1.Node";
/// The resource type of marketplace addons in `ResourceInfo` details.
const ADDON: &str = "oakestra.addons.marketplace.v1.Addon";

/// Why a manager operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid.
    #[error("invalid request: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// No installation has the id.
    #[error("installation `{0}` not found")]
    NotFound(String),
    /// The marketplace does not know the addon.
    #[error("addon `{0}` not found in the marketplace")]
    AddonNotFound(String),
    /// The addon is not approved.
    #[error("addon `{marketplace_id}` is {status} and only approved addons can be installed")]
    NotApproved {
        /// The addon.
        marketplace_id: String,
        /// Its status, as the contract names it.
        status: String,
    },
    /// A service of the addon has no image pinned by digest.
    #[error("service `{service}` of addon `{marketplace_id}` has no image pinned by digest")]
    ImageNotPinned {
        /// The addon.
        marketplace_id: String,
        /// The service.
        service: String,
    },
    /// Another live installation already provides a service of that name.
    #[error(
        "service `{service}` is already provided by installation `{installation_id}` (addon `{addon}`)"
    )]
    ServiceNameTaken {
        /// The service name.
        service: String,
        /// The installation providing it.
        installation_id: String,
        /// That installation's addon name.
        addon: String,
    },
    /// The accepted privileges do not cover what the addon needs.
    #[error(
        "addon `{marketplace_id}` needs privileges that were not accepted: {}",
        .missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    PrivilegesNotAccepted {
        /// The addon.
        marketplace_id: String,
        /// What is needed and not accepted.
        missing: Vec<addons_descriptor::Privilege>,
    },
    /// The manager's policy does not allow what the addon needs.
    #[error(
        "addon `{marketplace_id}` is not allowed here: {}",
        .violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    PolicyViolation {
        /// The addon.
        marketplace_id: String,
        /// Each refused need, with its rule.
        violations: Vec<addons_descriptor::policy::Violation>,
    },
    /// Another live installation publishes the host port.
    #[error(
        "host port {port} of service `{service}` is published by service `{holder}` of installation `{installation_id}`"
    )]
    HostPortInUse {
        /// `PORT/PROTOCOL`.
        port: String,
        /// The service asking for it.
        service: String,
        /// The installation holding it.
        installation_id: String,
        /// Its service holding it.
        holder: String,
    },
    /// The addon is installed already.
    #[error("addon `{marketplace_id}` is already installed as installation `{installation_id}`")]
    AlreadyInstalled {
        /// The addon.
        marketplace_id: String,
        /// The live installation holding it.
        installation_id: String,
    },
    /// A rollout runs already.
    #[error("installation `{id}` is rolling out release {release}; wait for it to end")]
    RolloutInProgress {
        /// The installation.
        id: String,
        /// The release rolling out.
        release: u64,
    },
    /// The installation is being uninstalled.
    #[error("installation `{id}` is {status}")]
    NotRunning {
        /// The installation.
        id: String,
        /// Its status.
        status: &'static str,
    },
    /// The installation runs the version already.
    #[error("installation `{id}` runs version {version} already")]
    AlreadyAtVersion {
        /// The installation.
        id: String,
        /// The version.
        version: String,
    },
    /// The release is not in the kept history.
    #[error(
        "installation `{id}` has no release {release} to return to (current: {current}; kept: {kept:?})"
    )]
    ReleaseNotFound {
        /// The installation.
        id: String,
        /// The release asked for (0: the one before the current).
        release: u64,
        /// The releases kept.
        kept: Vec<u64>,
        /// The current release.
        current: u64,
    },
    /// The marketplace cannot be reached or failed.
    #[error("the marketplace is unavailable: {0}")]
    MarketplaceUnavailable(String),
    /// A new link sent no hello in time.
    #[error("no hello within {0:?}")]
    HelloTimeout(std::time::Duration),
    /// A link went silent.
    #[error("no message from node {node} for {after:?}")]
    HeartbeatTimeout {
        /// The node.
        node: String,
        /// How long it was silent.
        after: std::time::Duration,
    },
    /// A link's monitor took no message for as long as it may stay silent.
    #[error("the monitor took no message for {after:?}")]
    NotReading {
        /// How long it took none.
        after: std::time::Duration,
    },
    /// A monitor of another plane connected.
    #[error("this manager serves the {manager} plane; node {node} belongs to the {monitor} plane")]
    PlaneMismatch {
        /// The node.
        node: String,
        /// The manager's plane.
        manager: &'static str,
        /// The monitor's plane.
        monitor: &'static str,
    },
    /// The caller's identity is not the node it says hello as.
    #[error("{subject} may not link as node {node}")]
    NodeIdentityMismatch {
        /// The authenticated caller.
        subject: String,
        /// The node of the hello.
        node: String,
    },
    /// The node claims labels the manager's node-labels file does not give
    /// it.
    #[error("node {node} may not claim the labels {labels}")]
    LabelsNotAllowed {
        /// The node of the hello.
        node: String,
        /// The labels it may not claim, `KEY=VALUE`.
        labels: String,
    },
    /// A newer link of the same node and identity took over.
    #[error("a newer link of node {0} from the same identity replaced this one")]
    LinkReplaced(String),
    /// No such node.
    #[error("node {0} is not known")]
    NodeNotFound(String),
    /// The node's monitor is linked: it cannot be forgotten.
    #[error("the monitor of node {0} is connected; stop it before forgetting the node")]
    NodeConnected(String),
    /// A monitor of the node is linked already.
    #[error("a monitor of node {0} is connected already")]
    NodeAlreadyConnected(String),
    /// The manager is shutting down.
    #[error("the manager is shutting down; reconnect")]
    ShuttingDown,
    /// The monitor end of a link went away.
    #[error("the monitor went away")]
    MonitorGone,
    /// A status report could not be stored.
    #[error("cannot persist the report ({0}); reconnect and send it again")]
    ReportNotStored(String),
    /// A status report was lost before it was written.
    #[error("a status report was dropped")]
    ReportDropped,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] addons_store::Error),
}

impl Error {
    /// A storage error, with the store's not-found as installation `id`'s.
    pub(crate) fn not_found_as(id: &str) -> impl FnOnce(addons_store::Error) -> Self + '_ {
        move |err| match err {
            addons_store::Error::NotFound { .. } => Self::NotFound(id.to_owned()),
            err => err.into(),
        }
    }

    pub(crate) fn required(field: &str) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, "required")])
    }

    /// An invalid request about one field.
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, reason)])
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        let error = match err {
            Error::Invalid(violations) => ApiError::invalid(
                message,
                violations.into_iter().map(|v| (v.field, v.reason)),
            ),
            Error::NotFound(id) => ApiError::new(Code::NotFound, "INSTALLATION_NOT_FOUND", message)
                .resource(INSTALLATION, id),
            Error::AddonNotFound(id) => {
                ApiError::new(Code::NotFound, "ADDON_NOT_FOUND", message).resource(ADDON, id)
            }
            Error::NotApproved {
                marketplace_id,
                status,
            } => ApiError::new(Code::FailedPrecondition, "ADDON_NOT_APPROVED", message.clone())
                .precondition("STATUS", format!("addons/{marketplace_id}"), format!(
                    "the addon is {status}; it must be ADDON_STATUS_APPROVED"
                )),
            Error::ImageNotPinned {
                marketplace_id,
                service,
            } => ApiError::new(Code::FailedPrecondition, "IMAGE_NOT_PINNED", message.clone())
                .precondition(
                    "IMAGE",
                    format!("addons/{marketplace_id}/services/{service}"),
                    "the image is not pinned by digest; reverify the addon",
                ),
            Error::ServiceNameTaken {
                service,
                installation_id,
                ..
            } => ApiError::new(Code::FailedPrecondition, "SERVICE_NAME_TAKEN", message.clone())
                .precondition(
                    "SERVICE_NAME",
                    format!("installations/{installation_id}/services/{service}"),
                    "a live installation of another addon provides a service of this name; uninstall it first",
                ),
            Error::PrivilegesNotAccepted {
                marketplace_id,
                missing,
            } => each_service(
                ApiError::new(Code::FailedPrecondition, "PRIVILEGES_NOT_ACCEPTED", message.clone()),
                ("missing", "PRIVILEGE", &marketplace_id),
                missing.iter().map(|need| (need.grant_text(), &need.service_name, format!("accept {}", need.grant_text()))),
            ),
            Error::PolicyViolation {
                marketplace_id,
                violations,
            } => each_service(
                ApiError::new(Code::FailedPrecondition, "POLICY_VIOLATION", message.clone()),
                ("rules", "POLICY", &marketplace_id),
                violations.iter().map(|v| (v.rule.to_string(), &v.service_name, v.to_string())),
            ),
            Error::RolloutInProgress { id, release } => {
                ApiError::new(Code::FailedPrecondition, "ROLLOUT_IN_PROGRESS", message.clone())
                    .metadata("release", release)
                    .precondition(
                        "ROLLOUT",
                        format!("installations/{id}"),
                        "a release is rolling out; wait for it to end",
                    )
            }
            Error::NotRunning { id, status } => {
                ApiError::new(Code::FailedPrecondition, "INSTALLATION_NOT_RUNNING", message.clone())
                    .precondition(
                        "STATUS",
                        format!("installations/{id}"),
                        format!("the installation is {status}"),
                    )
            }
            Error::AlreadyAtVersion { id, version } => {
                ApiError::new(Code::FailedPrecondition, "ALREADY_AT_VERSION", message.clone())
                    .precondition(
                        "VERSION",
                        format!("installations/{id}"),
                        format!("the installation runs {version} already"),
                    )
            }
            Error::ReleaseNotFound { id, .. } => {
                ApiError::new(Code::NotFound, "RELEASE_NOT_FOUND", message).resource(INSTALLATION, id)
            }
            Error::HostPortInUse {
                installation_id,
                service,
                port,
                ..
            } => ApiError::new(Code::FailedPrecondition, "HOST_PORT_IN_USE", message.clone())
                .precondition(
                    "HOST_PORT",
                    format!("installations/{installation_id}/services/{service}/ports/{port}"),
                    "another live installation publishes this host port; uninstall it first",
                ),
            Error::AlreadyInstalled {
                installation_id, ..
            } => ApiError::new(Code::AlreadyExists, "ADDON_ALREADY_INSTALLED", message)
                .resource(INSTALLATION, installation_id),
            Error::MarketplaceUnavailable(_) => {
                ApiError::new(Code::Unavailable, "MARKETPLACE_UNAVAILABLE", message)
            }
            Error::HelloTimeout(_) => {
                ApiError::new(Code::DeadlineExceeded, "HELLO_TIMEOUT", message)
            }
            Error::HeartbeatTimeout { .. } | Error::NotReading { .. } => {
                ApiError::new(Code::DeadlineExceeded, "HEARTBEAT_TIMEOUT", message)
            }
            Error::PlaneMismatch { node, monitor, .. } => {
                ApiError::new(Code::FailedPrecondition, "PLANE_MISMATCH", message.clone())
                    .precondition(
                        "PLANE",
                        format!("nodes/{node}"),
                        format!("connect the monitor to the manager of the {monitor} plane"),
                    )
            }
            Error::NodeIdentityMismatch { .. } => {
                ApiError::new(Code::PermissionDenied, "NODE_IDENTITY_MISMATCH", message)
            }
            Error::LabelsNotAllowed { .. } => {
                ApiError::new(Code::PermissionDenied, "LABELS_NOT_ALLOWED", message)
            }
            Error::LinkReplaced(_) => ApiError::new(Code::Aborted, "LINK_REPLACED", message),
            Error::NodeNotFound(node) => {
                ApiError::new(Code::NotFound, "NODE_NOT_FOUND", message).resource(NODE, node)
            }
            Error::NodeConnected(node) => {
                ApiError::new(Code::FailedPrecondition, "NODE_CONNECTED", message.clone())
                    .precondition(
                        "CONNECTED",
                        format!("nodes/{node}"),
                        "the node's monitor is linked; stop it first",
                    )
            }
            Error::NodeAlreadyConnected(_) => {
                ApiError::new(Code::AlreadyExists, "NODE_ALREADY_CONNECTED", message)
            }
            Error::ShuttingDown => ApiError::new(Code::Unavailable, "SHUTTING_DOWN", message),
            Error::MonitorGone => ApiError::new(Code::Cancelled, "MONITOR_GONE", message),
            Error::ReportDropped => ApiError::new(Code::Internal, "REPORT_DROPPED", message),
            Error::ReportNotStored(_) => {
                ApiError::new(Code::Unavailable, "STORE_UNAVAILABLE", message)
            }
            Error::Store(err) => return addons_server_kit::store_error_to_status(err),
        };
        error.into()
    }
}

/// `error` about services of addon `marketplace_id`: each item's name (in
/// the metadata `key`, comma-separated) and, per item, a precondition
/// violation of `kind` on the service with the item's description.
fn each_service<'a>(
    error: ApiError,
    (key, kind, marketplace_id): (&str, &str, &str),
    items: impl Iterator<Item = (String, &'a String, String)> + Clone,
) -> ApiError {
    let names: Vec<String> = items.clone().map(|(name, _, _)| name).collect();
    items.fold(
        error.metadata(key, names.join(",")),
        |error, (_, service, description)| {
            error.precondition(
                kind,
                format!("addons/{marketplace_id}/services/{service}"),
                description,
            )
        },
    )
}
