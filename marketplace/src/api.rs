//! The tonic adapter of `oakestra.addons.marketplace.v1.MarketplaceService`:
//! converts, delegates to [`Marketplace`], maps errors.

use addons_descriptor::{Descriptor, FieldViolation};
use addons_server_kit::{
    Identity, MethodAccess, Mutation, Requests, Role, Shutdown, WatchStream, watch_stream,
};
use addons_store::{ChangeKind, Event, Start};
use oakestra_addons_proto::marketplace::v1::{
    self as pb,
    marketplace_service_server::{MarketplaceService, MarketplaceServiceServer},
};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::{Error, Marketplace, convert};

/// How many events a watcher may have in flight before it is dropped.
const WATCH_BUFFER: usize = 64;

/// Who may call what: every role that views may read; publishing needs
/// `publisher`; deleting and reverifying need `publisher` (own addons only,
/// checked by the service) or `reviewer`; revoking needs `reviewer` (an
/// admin holds every role).
pub const PERMISSIONS: &[MethodAccess] = &[
    MethodAccess {
        roles: &[Role::Viewer],
        methods: &["GetAddon", "ListAddons", "WatchAddon", "WatchAddons"],
    },
    MethodAccess {
        roles: &[Role::Publisher],
        methods: &["PublishAddon"],
    },
    MethodAccess {
        roles: &[Role::Publisher, Role::Reviewer],
        methods: &["DeleteAddon", "ReverifyAddon"],
    },
    MethodAccess {
        roles: &[Role::Reviewer],
        methods: &["RevokeAddon"],
    },
];

/// Who calls: a reviewer (or admin, or anyone on a marketplace without
/// authentication) may change any addon, a publisher only its own.
fn caller_of(identity: &Identity) -> crate::service::Caller {
    crate::service::Caller {
        any: identity.has(Role::Reviewer),
        subject: identity.subject.clone(),
    }
}

/// The gRPC face of the marketplace.
#[derive(Debug, Clone)]
pub struct MarketplaceApi {
    core: Marketplace,
    requests: Requests,
    shutdown: Shutdown,
}

impl MarketplaceApi {
    /// Serves `core`, remembering mutating calls in `requests` for their
    /// retries; watch streams end when `shutdown` fires.
    pub fn new(core: Marketplace, requests: Requests, shutdown: Shutdown) -> Self {
        Self {
            core,
            requests,
            shutdown,
        }
    }

    /// The tonic service, with the servers' message size limits.
    pub fn into_service(self) -> MarketplaceServiceServer<Self> {
        addons_server_kit::limited!(MarketplaceServiceServer::new(self))
    }
}

fn required_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Error::required("id").into());
    }
    Ok(id)
}

/// Field paths of a publish's descriptor start at `addon.`.
fn in_addon(violations: Vec<FieldViolation>) -> Error {
    Error::Invalid(
        violations
            .into_iter()
            .map(|v| FieldViolation::new(format!("addon.{}", v.field), v.reason))
            .collect(),
    )
}

fn change_type(kind: ChangeKind) -> pb::ChangeType {
    match kind {
        ChangeKind::Added => pb::ChangeType::Added,
        ChangeKind::Modified => pb::ChangeType::Modified,
        ChangeKind::Deleted => pb::ChangeType::Deleted,
    }
}

/// The use cases of the unary calls (mutating ones behind
/// [`Requests::serve`]).
impl MarketplaceApi {
    async fn publish(
        &self,
        Mutation {
            identity, request, ..
        }: Mutation<'_, pb::PublishAddonRequest>,
    ) -> Result<pb::PublishAddonResponse, Status> {
        let addon = request
            .addon
            .clone()
            .ok_or_else(|| Error::required("addon"))?;
        if addon.encoded_len() > addons_descriptor::MAX_ENCODED_ADDON {
            return Err(Error::Invalid(vec![FieldViolation::new(
                "addon",
                format!(
                    "encodes to {} bytes, at most {} are accepted",
                    addon.encoded_len(),
                    addons_descriptor::MAX_ENCODED_ADDON
                ),
            )])
            .into());
        }
        let descriptor = Descriptor::from_proto(addon);
        let stored = self
            .core
            .publish(descriptor, &caller_of(identity))
            .await
            .map_err(|err| match err {
                Error::Invalid(violations) => in_addon(violations),
                other => other,
            })?;
        tracing::info!(id = %stored.value.id, name = %stored.value.descriptor.name, "addon published");
        Ok(pb::PublishAddonResponse {
            addon: Some(convert::addon_to_proto(stored)),
        })
    }

    async fn delete(
        &self,
        Mutation {
            identity, request, ..
        }: Mutation<'_, pb::DeleteAddonRequest>,
    ) -> Result<pb::DeleteAddonResponse, Status> {
        let id = required_id(&request.id)?;
        self.core
            .delete(id, request.expected_revision, &caller_of(identity))
            .await?;
        tracing::info!(%id, "addon deleted");
        Ok(pb::DeleteAddonResponse {})
    }

    async fn reverify(
        &self,
        Mutation {
            identity, request, ..
        }: Mutation<'_, pb::ReverifyAddonRequest>,
    ) -> Result<pb::ReverifyAddonResponse, Status> {
        let id = required_id(&request.id)?;
        let addon = self
            .core
            .reverify(id, request.expected_revision, &caller_of(identity))
            .await?;
        Ok(pb::ReverifyAddonResponse {
            addon: Some(convert::addon_to_proto(addon)),
        })
    }

    async fn revoke(
        &self,
        Mutation {
            identity, request, ..
        }: Mutation<'_, pb::RevokeAddonRequest>,
    ) -> Result<pb::RevokeAddonResponse, Status> {
        let id = required_id(&request.id)?;
        let reason = request.reason.trim();
        if reason.is_empty() {
            return Err(Error::required("reason").into());
        }
        if reason.len() > 1024 || reason.chars().any(|c| c.is_control() && c != '\n') {
            return Err(Error::Invalid(vec![FieldViolation::new(
                "reason",
                "at most 1024 bytes, without control characters",
            )])
            .into());
        }
        let addon = self
            .core
            .revoke(id, reason, request.expected_revision, &caller_of(identity))
            .await?;
        tracing::warn!(%id, reason, by = %identity.subject, "addon revoked");
        Ok(pb::RevokeAddonResponse {
            addon: Some(convert::addon_to_proto(addon)),
        })
    }

    async fn get(&self, request: pb::GetAddonRequest) -> Result<pb::GetAddonResponse, Status> {
        let addon = self
            .core
            .get_view(required_id(&request.id)?, convert::addon_view)
            .await?;
        Ok(pb::GetAddonResponse {
            addon: Some((*addon).clone()),
        })
    }

    async fn list(&self, request: pb::ListAddonsRequest) -> Result<pb::ListAddonsResponse, Status> {
        let (statuses, page_size) = addons_descriptor::list_request(
            &request.statuses,
            request.page_size,
            convert::status_from_proto,
        )
        .map_err(Error::Invalid)?;
        let name = Some(request.name.as_str()).filter(|n| !n.is_empty());
        let token = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let (addons, next) = self
            .core
            .list_views(&statuses, name, page_size, token, convert::addon_view)
            .await?;
        Ok(pb::ListAddonsResponse {
            addons: addons.iter().map(|addon| (**addon).clone()).collect(),
            next_page_token: next.unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl MarketplaceService for MarketplaceApi {
    addons_server_kit::unary! {
        mutating publish_addon(pb::PublishAddonRequest) -> pb::PublishAddonResponse = publish;
        mutating delete_addon(pb::DeleteAddonRequest) -> pb::DeleteAddonResponse = delete;
        mutating reverify_addon(pb::ReverifyAddonRequest) -> pb::ReverifyAddonResponse = reverify;
        mutating revoke_addon(pb::RevokeAddonRequest) -> pb::RevokeAddonResponse = revoke;
        read get_addon(pb::GetAddonRequest) -> pb::GetAddonResponse = get;
        read list_addons(pb::ListAddonsRequest) -> pb::ListAddonsResponse = list;
    }

    type WatchAddonStream = WatchStream<pb::WatchAddonResponse>;

    async fn watch_addon(
        &self,
        request: Request<pb::WatchAddonRequest>,
    ) -> Result<Response<Self::WatchAddonStream>, Status> {
        let request = request.into_inner();
        let id = required_id(&request.id)?.to_owned();
        let start = match request.since_revision {
            0 => {
                // An unknown addon fails the call itself, before the stream.
                self.core.get(&id).await?;
                Start::Snapshot
            }
            since => Start::After(since),
        };
        let core = self.core.clone();
        let shutdown = self.shutdown.clone();
        let stream = watch_stream(
            WATCH_BUFFER,
            move |tx| async move { core.watch(&id, start, tx, shutdown.fired()).await },
            |event| match event {
                Event::Change(change) => pb::WatchAddonResponse {
                    r#type: change_type(change.kind).into(),
                    sequence: change.seq,
                    addon: Some(convert::addon_to_proto(change.record)),
                    in_sync: false,
                },
                Event::InSync(sequence) => pb::WatchAddonResponse {
                    sequence,
                    in_sync: true,
                    ..pb::WatchAddonResponse::default()
                },
            },
        );
        Ok(Response::new(stream))
    }

    type WatchAddonsStream = WatchStream<pb::WatchAddonsResponse>;

    async fn watch_addons(
        &self,
        request: Request<pb::WatchAddonsRequest>,
    ) -> Result<Response<Self::WatchAddonsStream>, Status> {
        let request = request.into_inner();
        if request.name.len() > addons_descriptor::names::MAX_NAME {
            return Err(Error::Invalid(vec![addons_descriptor::FieldViolation::new(
                "name",
                format!("at most {} bytes", addons_descriptor::names::MAX_NAME),
            )])
            .into());
        }
        let name = Some(request.name).filter(|name| !name.is_empty());
        let start = match request.since_revision {
            0 => Start::Snapshot,
            since => Start::After(since),
        };
        let core = self.core.clone();
        let shutdown = self.shutdown.clone();
        let stream = watch_stream(
            WATCH_BUFFER,
            move |tx| async move {
                core.watch_all(name.as_deref(), start, tx, shutdown.fired())
                    .await
            },
            |event| match event {
                Event::Change(change) => pb::WatchAddonsResponse {
                    r#type: change_type(change.kind).into(),
                    sequence: change.seq,
                    addon: Some(convert::addon_to_proto(change.record)),
                    in_sync: false,
                },
                Event::InSync(sequence) => pb::WatchAddonsResponse {
                    sequence,
                    in_sync: true,
                    ..pb::WatchAddonsResponse::default()
                },
            },
        );
        Ok(Response::new(stream))
    }
}
