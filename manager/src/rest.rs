//! Oakestra's Addons Manager REST routes, on the manager's gRPC port:
//!
//! - `GET /api/v1/addons[?status=S]`: the installations (`S` as Oakestra
//!   writes statuses: `installing`, `active`, `partially_active`, ...; and
//!   the dashboard's `enabled`, the running ones, and `error`, `failed`);
//! - `POST /api/v1/addons` with `{"marketplace_id": ...}`: install (201);
//!   ours besides: `accepted_privileges`, `node_selector`,
//!   `keep_core_stopped_on_failure`;
//! - `GET /api/v1/addons/{id}`: one installation;
//! - `DELETE /api/v1/addons/{id}`: uninstall (`disabling`), and once it is
//!   `disabled`, delete the record (with the addon's volumes).
//!
//! Each is a call of the manager's gRPC service made through the server's
//! own stack ([`addons_server_kit::rest`]): the same roles, validation,
//! consent to privileges and audit. `PATCH`, with which Oakestra's monitor
//! sets statuses, is refused: statuses come only from monitors over their
//! authenticated links.

use std::collections::BTreeMap;

use addons_descriptor::{Descriptor, oakestra};
use addons_server_kit::rest::{self, Grpc, Reply, RestCollection, RestRequest};
use http::{Method, StatusCode};
use oakestra_addons_proto::engine::v1::{self as pb, addons_manager_service_server::SERVICE_NAME};
use serde::Deserialize;

/// The routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManagerRest;

impl RestCollection for ManagerRest {
    const PREFIX: &'static str = "/api/v1/addons";

    async fn list(request: &RestRequest, grpc: &Grpc) -> Result<Reply, Reply> {
        let statuses = match request.query("status") {
            None | Some("") => Vec::new(),
            // Two filter buttons of Oakestra's dashboard name no status of
            // Oakestra's: they get the statuses they stand for.
            Some("enabled") => [
                pb::InstallationStatus::Active,
                pb::InstallationStatus::PartiallyActive,
                pb::InstallationStatus::Upgrading,
                pb::InstallationStatus::RolledBack,
            ]
            .map(i32::from)
            .to_vec(),
            Some("error") => vec![pb::InstallationStatus::Failed.into()],
            Some(name) => {
                let full = format!("{STATUS_PREFIX}{}", name.to_ascii_uppercase());
                match pb::InstallationStatus::from_str_name(&full)
                    .filter(|s| *s != pb::InstallationStatus::Unspecified)
                {
                    Some(status) => vec![status.into()],
                    None => {
                        return Err(Reply::invalid(
                            "query",
                            &[(
                                "status".to_owned(),
                                format!(
                                    "`{name}` is not a status: installing, active, partially_active, \
                                     failed, disabling, disabled, upgrading or rolled_back"
                                ),
                            )],
                        ));
                    }
                }
            }
        };
        rest::every_page(|page_token| {
            let request = pb::ListInstallationsRequest {
                statuses: statuses.clone(),
                page_size: 500,
                page_token,
            };
            async move {
                let page: pb::ListInstallationsResponse = grpc
                    .call(&method("ListInstallations"), request)
                    .await
                    .map_err(failed)?;
                let installations = page
                    .installations
                    .into_iter()
                    .map(installation_json)
                    .collect();
                Ok((installations, page.next_page_token))
            }
        })
        .await
    }

    async fn create(request: &RestRequest, grpc: &Grpc) -> Result<Reply, Reply> {
        let mut install = parse_install(&request.body)
            .map_err(|violation| Reply::invalid("json", &[violation]))?;
        install.request_id = request.idempotency_key.clone();
        let installed: pb::InstallAddonResponse = grpc
            .call(&method("InstallAddon"), install)
            .await
            .map_err(failed)?;
        Ok(Reply::json(
            StatusCode::CREATED,
            installation_json(installed.installation.unwrap_or_default()),
        ))
    }

    async fn get(id: String, grpc: &Grpc) -> Result<Reply, Reply> {
        fetch(id, grpc).await.map(|i| ok(installation_json(i)))
    }

    /// Oakestra's DELETE: the first disables; on a disabled installation it
    /// deletes the record.
    async fn delete(id: String, grpc: &Grpc) -> Result<Reply, Reply> {
        let current = fetch(id.clone(), grpc).await?;
        let purge = current.status() == pb::InstallationStatus::Disabled;
        let uninstalled: pb::UninstallAddonResponse = grpc
            .call(
                &method("UninstallAddon"),
                pb::UninstallAddonRequest {
                    id: id.clone(),
                    purge,
                    request_id: String::new(),
                    expected_revision: Some(current.revision),
                },
            )
            .await
            .map_err(failed)?;
        Ok(ok(match uninstalled.installation {
            Some(installation) => installation_json(installation),
            None => serde_json::json!({ "_id": id, "message": "Addon deleted" }),
        }))
    }

    fn other_item_method(method: &Method) -> Reply {
        if method == Method::PATCH {
            Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "statuses come from the nodes' monitors over their links and cannot be set; \
                 DELETE uninstalls",
            )
        } else {
            Reply::method_not_allowed("GET, DELETE")
        }
    }
}

fn method(name: &str) -> String {
    format!("/{SERVICE_NAME}/{name}")
}

fn ok(body: serde_json::Value) -> Reply {
    Reply::json(StatusCode::OK, body)
}

fn failed(status: tonic::Status) -> Reply {
    Reply::from_status(&status, str::to_owned)
}

const STATUS_PREFIX: &str = "INSTALLATION_STATUS_";

/// The body of `POST /api/v1/addons`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallBody {
    marketplace_id: String,
    /// Some of Oakestra's clients send the status they ask for; a new
    /// installation always starts `installing`, so it is read and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<String>,
    #[serde(default)]
    accepted_privileges: Vec<PrivilegeBody>,
    #[serde(default)]
    node_selector: BTreeMap<String, String>,
    #[serde(default)]
    keep_core_stopped_on_failure: bool,
}

/// A privilege the caller accepts, as `GET` shows them: `kind` as
/// `host_path` (or `PRIVILEGE_KIND_HOST_PATH`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivilegeBody {
    kind: String,
    #[serde(default)]
    service_name: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    read_only: bool,
}

fn parse_install(body: &[u8]) -> Result<pb::InstallAddonRequest, (String, String)> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let body: InstallBody = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { String::new() } else { path };
        (field, err.into_inner().to_string())
    })?;
    let mut accepted = Vec::with_capacity(body.accepted_privileges.len());
    for (n, privilege) in body.accepted_privileges.into_iter().enumerate() {
        let upper = privilege.kind.to_ascii_uppercase();
        let full = if upper.starts_with("PRIVILEGE_KIND_") {
            upper
        } else {
            format!("PRIVILEGE_KIND_{upper}")
        };
        let kind = pb::PrivilegeKind::from_str_name(&full)
            .filter(|k| *k != pb::PrivilegeKind::Unspecified)
            .ok_or_else(|| {
                (
                    format!("accepted_privileges[{n}].kind"),
                    format!(
                        "`{}` is not a privilege: privileged, host_path, host_port, \
                         core_component, core_environment or keep_core_stopped",
                        privilege.kind
                    ),
                )
            })?;
        accepted.push(pb::Privilege {
            kind: kind.into(),
            service_name: privilege.service_name,
            value: privilege.value,
            read_only: privilege.read_only,
            granted_by_policy: false,
        });
    }
    Ok(pb::InstallAddonRequest {
        marketplace_id: body.marketplace_id,
        keep_core_stopped_on_failure: body.keep_core_stopped_on_failure,
        request_id: String::new(),
        accepted_privileges: accepted,
        node_selector: body.node_selector.into_iter().collect(),
    })
}

async fn fetch(id: String, grpc: &Grpc) -> Result<pb::Installation, Reply> {
    let found: pb::GetInstallationResponse = grpc
        .call(
            &method("GetInstallation"),
            pb::GetInstallationRequest { id },
        )
        .await
        .map_err(failed)?;
    Ok(found.installation.unwrap_or_default())
}

/// An installation in the shape of Oakestra's addon records (`_id`,
/// `marketplace_id`, `status`, `services` as the marketplace's, and
/// `status_details.failed_services`), with our fields beside.
fn installation_json(installation: pb::Installation) -> serde_json::Value {
    let status = rest::enum_name(installation.status().as_str_name(), STATUS_PREFIX);
    let mut failed: Vec<&str> = installation
        .services
        .iter()
        .filter(|s| s.phase() == pb::ServicePhase::Failed)
        .map(|s| s.service_name.as_str())
        .collect();
    failed.sort_unstable();
    failed.dedup();
    let mut out = serde_json::Map::new();
    out.insert("_id".into(), installation.id.clone().into());
    out.insert(
        "marketplace_id".into(),
        installation.marketplace_id.clone().into(),
    );
    out.insert("status".into(), status.into());
    out.insert(
        "status_message".into(),
        installation.status_message.clone().into(),
    );
    out.insert(
        "status_details".into(),
        serde_json::json!({ "failed_services": failed }),
    );
    out.insert(
        "service_statuses".into(),
        installation
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "service_name": s.service_name,
                    "node_id": s.node_id,
                    "phase": rest::enum_name(s.phase().as_str_name(), "SERVICE_PHASE_"),
                    "health": rest::enum_name(s.health().as_str_name(), "SERVICE_HEALTH_"),
                    "reason": s.reason,
                    "restart_count": s.restart_count,
                    "replaced_core_component": s.replaced_core_component,
                })
            })
            .collect(),
    );
    out.insert(
        "plane".into(),
        rest::enum_name(installation.plane().as_str_name(), "PLANE_").into(),
    );
    out.insert("release".into(), installation.release.into());
    out.insert("revision".into(), installation.revision.into());
    // The warning that the marketplace revoked the addon.
    if let Some(revoked) = &installation.revoked {
        out.insert(
            "revoked".into(),
            serde_json::json!({
                "reason": revoked.reason,
                "time": rest::timestamp(revoked.time.as_ref()),
                "uninstalled": revoked.uninstalled,
            }),
        );
    }
    out.insert(
        "node_selector".into(),
        serde_json::json!(installation.node_selector),
    );
    out.insert(
        "unconfirmed_nodes".into(),
        installation.unconfirmed_nodes.clone().into(),
    );
    out.insert(
        "granted_privileges".into(),
        installation
            .granted_privileges
            .iter()
            .map(|p| {
                let mut json = rest::privilege_json(
                    p.kind().as_str_name(),
                    &p.service_name,
                    &p.value,
                    p.read_only,
                );
                json["granted_by_policy"] = p.granted_by_policy.into();
                json
            })
            .collect(),
    );
    out.insert(
        "create_time".into(),
        rest::timestamp(installation.create_time.as_ref()),
    );
    out.insert(
        "update_time".into(),
        rest::timestamp(installation.update_time.as_ref()),
    );
    if let Some(snapshot) = installation.addon {
        out.extend(oakestra::descriptor_json(&Descriptor::from_snapshot(
            snapshot,
        )));
    }
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_oakestra_install_bodies() {
        let install =
            parse_install(br#"{"marketplace_id": "m1", "status": "installing"}"#).unwrap();
        assert_eq!(install.marketplace_id, "m1");
        assert!(install.accepted_privileges.is_empty());
        let install = parse_install(
            br#"{"marketplace_id": "m1", "accepted_privileges": [{"kind": "host_path", "value": "/", "read_only": true}, {"kind": "PRIVILEGE_KIND_PRIVILEGED"}]}"#,
        )
        .unwrap();
        assert_eq!(
            install.accepted_privileges[0].kind(),
            pb::PrivilegeKind::HostPath
        );
        assert!(install.accepted_privileges[0].read_only);
        assert_eq!(
            install.accepted_privileges[1].kind(),
            pb::PrivilegeKind::Privileged
        );
        let (field, reason) =
            parse_install(br#"{"marketplace_id": "m1", "replicas": 2}"#).unwrap_err();
        assert_eq!(field, "replicas");
        assert!(reason.contains("unknown field `replicas`"), "{reason}");
        let (field, _) = parse_install(br#"{"accepted_privileges": []}"#).unwrap_err();
        assert_eq!(field, "");
        let (field, reason) = parse_install(
            br#"{"marketplace_id": "m1", "accepted_privileges": [{"kind": "root"}]}"#,
        )
        .unwrap_err();
        assert_eq!(field, "accepted_privileges[0].kind");
        assert!(reason.contains("`root` is not a privilege"), "{reason}");
    }
}
