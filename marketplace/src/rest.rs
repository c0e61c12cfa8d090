//! Oakestra's marketplace REST routes, on the marketplace's gRPC port, for
//! Oakestra's dashboard and its users' scripts:
//!
//! - `GET /api/v1/marketplace/addons[?name=N]`: the approved addons;
//! - `POST /api/v1/marketplace/addons`: publish an Oakestra descriptor (201,
//!   the stored addon, `under_review`);
//! - `GET /api/v1/marketplace/addons/{id}`: one addon, in any status;
//! - `DELETE /api/v1/marketplace/addons/{id}`.
//!
//! Each is a call of [`MarketplaceService`](pb::marketplace_service_server)
//! made through the server's own stack ([`addons_server_kit::rest`]), so the
//! same roles, validation and audit apply. Addons come back in Oakestra's
//! shape (`_id`, `status` as `under_review`, `approved` or
//! `verification_failed`) with our fields beside.

use addons_descriptor::{Descriptor, oakestra};
use addons_server_kit::rest::{self, Grpc, Reply, RestCollection, RestRequest};
use http::StatusCode;
use oakestra_addons_proto::marketplace::v1::{
    self as pb, marketplace_service_server::SERVICE_NAME,
};

/// The routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct MarketplaceRest;

impl RestCollection for MarketplaceRest {
    const PREFIX: &'static str = "/api/v1/marketplace/addons";

    async fn list(request: &RestRequest, grpc: &Grpc) -> Result<Reply, Reply> {
        let name = request.query("name").unwrap_or_default().to_owned();
        rest::every_page(|page_token| {
            let request = pb::ListAddonsRequest {
                // Oakestra lists only approved addons, as ours does by default.
                statuses: Vec::new(),
                name: name.clone(),
                page_size: 500,
                page_token,
            };
            async move {
                let page: pb::ListAddonsResponse = grpc
                    .call(&method("ListAddons"), request)
                    .await
                    .map_err(failed)?;
                let addons = page.addons.into_iter().map(addon_json).collect();
                Ok((addons, page.next_page_token))
            }
        })
        .await
    }

    async fn create(request: &RestRequest, grpc: &Grpc) -> Result<Reply, Reply> {
        let addon = oakestra::from_json(&request.body)
            .map_err(|violation| Reply::invalid("json", &[(violation.field, violation.reason)]))?;
        let published: pb::PublishAddonResponse = grpc
            .call(
                &method("PublishAddon"),
                pb::PublishAddonRequest {
                    addon: Some(addon),
                    request_id: request.idempotency_key.clone(),
                },
            )
            .await
            .map_err(failed)?;
        let addon = published.addon.unwrap_or_default();
        Ok(Reply::json(StatusCode::CREATED, addon_json(addon)))
    }

    async fn get(id: String, grpc: &Grpc) -> Result<Reply, Reply> {
        let found: pb::GetAddonResponse = grpc
            .call(&method("GetAddon"), pb::GetAddonRequest { id })
            .await
            .map_err(failed)?;
        Ok(Reply::json(
            StatusCode::OK,
            addon_json(found.addon.unwrap_or_default()),
        ))
    }

    async fn delete(id: String, grpc: &Grpc) -> Result<Reply, Reply> {
        let _: pb::DeleteAddonResponse = grpc
            .call(
                &method("DeleteAddon"),
                pb::DeleteAddonRequest {
                    id: id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(failed)?;
        Ok(Reply::json(
            StatusCode::OK,
            serde_json::json!({ "_id": id, "message": "Addon deleted" }),
        ))
    }
}

fn method(name: &str) -> String {
    format!("/{SERVICE_NAME}/{name}")
}

/// A gRPC error as Oakestra's; request fields lose the `addon.` of the
/// gRPC message, so they name the descriptor's.
fn failed(status: tonic::Status) -> Reply {
    Reply::from_status(&status, |field| {
        field.strip_prefix("addon.").unwrap_or(field).to_owned()
    })
}

/// Oakestra's name of a status; the failure is `verification_failed`, as
/// its code writes it.
fn status_name(status: pb::AddonStatus) -> &'static str {
    match status {
        pb::AddonStatus::Unspecified => "unspecified",
        pb::AddonStatus::UnderReview => "under_review",
        pb::AddonStatus::Approved => "approved",
        pb::AddonStatus::FailedVerification => "verification_failed",
        pb::AddonStatus::Revoked => "revoked",
    }
}

/// An addon in Oakestra's shape, with our fields beside.
fn addon_json(addon: pb::Addon) -> serde_json::Value {
    let status = status_name(addon.status());
    let mut out = serde_json::Map::new();
    out.insert("_id".into(), addon.id.clone().into());
    out.insert("status".into(), status.into());
    // Why verification failed, when it did.
    out.insert(
        "status_message".into(),
        addon
            .verification
            .as_ref()
            .map(|v| v.last_error.clone())
            .unwrap_or_default()
            .into(),
    );
    out.insert("owner".into(), addon.owner.clone().into());
    // Per image, who signed it and when that was checked; the failure
    // code of one that did not pass.
    out.insert(
        "images".into(),
        addon
            .verification
            .iter()
            .flat_map(|v| &v.services)
            .map(|s| {
                serde_json::json!({
                    "service_name": s.service_name,
                    "image": s.image,
                    "resolved_image": s.resolved_image,
                    "ok": s.ok,
                    "reason": s.reason,
                    "reason_code": s.reason_code,
                    "signed_by": s.signed_by,
                    "key_fingerprint": s.key_fingerprint,
                    "signature_check_time": rest::timestamp(s.signature_check_time.as_ref()),
                })
            })
            .collect(),
    );
    if let Some(revocation) = &addon.revocation {
        out.insert(
            "revocation".into(),
            serde_json::json!({
                "reason": revocation.reason,
                "revoked_by": revocation.revoked_by,
                "revoke_time": rest::timestamp(revocation.revoke_time.as_ref()),
            }),
        );
    }
    out.insert("revision".into(), addon.revision.into());
    out.insert(
        "create_time".into(),
        rest::timestamp(addon.create_time.as_ref()),
    );
    out.insert(
        "update_time".into(),
        rest::timestamp(addon.update_time.as_ref()),
    );
    out.insert(
        "required_privileges".into(),
        addon
            .required_privileges
            .iter()
            .map(|p| {
                rest::privilege_json(
                    p.kind().as_str_name(),
                    &p.service_name,
                    &p.value,
                    p.read_only,
                )
            })
            .collect(),
    );
    out.extend(oakestra::descriptor_json(&Descriptor::from_proto(addon)));
    serde_json::Value::Object(out)
}
