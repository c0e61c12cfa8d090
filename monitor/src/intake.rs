//! What the monitor takes from the link. The manager is not trusted with
//! the node: a compromised manager, or anyone on a plaintext link, could
//! otherwise name a path with an installation id (`../../..`) or a
//! container with a service name. So every installation of the desired
//! state is checked here, as strictly as the marketplace checks a publish
//! and with the same functions, before the reconciler sees it:
//!
//! - installation and addon ids in the stores' id form only (a ULID);
//! - the addon snapshot (and the previous release's, during a rollout) by
//!   the descriptor's rules: names, paths, sizes, control characters;
//! - the node selector by the label rules.
//!
//! An installation that fails is kept out of the desired state and, when
//! its id is sound, reported FAILED with the violations, so the operator
//! sees why. What privileges a service needs is never taken from the
//! manager: [`crate::admission`] derives them on the node from the spec.

use addons_descriptor::{Descriptor, FieldViolation, labels::validate_labels, validate_record_id};
use oakestra_addons_proto::engine::v1::{self as pb, ServicePhase};

/// Most violations named in a refusal's reason.
const MAX_NAMED: usize = 8;

/// An installation the node will not act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Its id as sent, shown escaped.
    pub installation_id: String,
    /// Whether the id itself is sound (only then is it reported).
    pub id_sound: bool,
    /// Its services' names as sent (at most the descriptor's bound).
    pub services: Vec<String>,
    /// Every violation, with its field path.
    pub violations: Vec<FieldViolation>,
}

impl Refusal {
    /// The violations in one line, at most `MAX_NAMED` of them.
    pub fn reason(&self) -> String {
        let mut named: Vec<String> = self
            .violations
            .iter()
            .take(MAX_NAMED)
            .map(ToString::to_string)
            .collect();
        if self.violations.len() > MAX_NAMED {
            named.push(format!("and {} more", self.violations.len() - MAX_NAMED));
        }
        format!("refused by the node: {}", named.join("; "))
    }
}

/// Checks one installation of the desired state.
pub fn check(installation: &pb::DesiredInstallation) -> Result<(), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if let Err(reason) = validate_record_id(&installation.installation_id) {
        violations.push(FieldViolation::new("installation_id", reason));
    }
    if let Err(reason) = validate_record_id(&installation.marketplace_id) {
        violations.push(FieldViolation::new("marketplace_id", reason));
    }
    match &installation.addon {
        Some(addon) => snapshot(&mut violations, "addon", addon),
        None if installation.presence() == pb::DesiredPresence::Running => {
            violations.push(FieldViolation::new("addon", "required"));
        }
        None => {}
    }
    if let Some(previous) = installation
        .rollout
        .as_ref()
        .and_then(|r| r.previous_addon.as_ref())
    {
        snapshot(&mut violations, "rollout.previous_addon", previous);
    }
    violations.extend(validate_labels(
        &installation.node_selector,
        "node_selector",
    ));
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

fn snapshot(violations: &mut Vec<FieldViolation>, at: &str, addon: &pb::AddonSnapshot) {
    if let Err(found) = addon_violations(addon) {
        violations.extend(
            found
                .into_iter()
                .map(|v| FieldViolation::new(format!("{at}.{}", v.field), v.reason)),
        );
    }
}

fn addon_violations(addon: &pb::AddonSnapshot) -> Result<(), Vec<FieldViolation>> {
    let descriptor = Descriptor::from_snapshot(addon.clone());
    let mut violations = addons_descriptor::validate(&descriptor)
        .err()
        .unwrap_or_default();
    for (i, service) in addon.services.iter().enumerate() {
        // What the node pulls: pinned by digest, by the manager.
        let pinned = &service.resolved_image;
        if !pinned.is_empty() && (pinned.len() > 512 || !pinned.contains("@sha256:")) {
            violations.push(FieldViolation::new(
                format!("services[{i}].resolved_image"),
                "must be an image reference pinned by a sha256 digest, at most 512 bytes",
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Splits a desired state into what the node acts on and what it refuses.
pub fn sift(mut state: pb::DesiredState) -> (pb::DesiredState, Vec<Refusal>) {
    let mut refused = Vec::new();
    state
        .installations
        .retain(|installation| match check(installation) {
            Ok(()) => true,
            Err(violations) => {
                refused.push(Refusal {
                    installation_id: installation.installation_id.clone(),
                    id_sound: validate_record_id(&installation.installation_id).is_ok(),
                    services: installation
                        .addon
                        .iter()
                        .flat_map(|a| &a.services)
                        .take(addons_descriptor::MAX_SERVICES)
                        .map(|s| s.service_name.clone())
                        .collect(),
                    violations,
                });
                false
            }
        });
    (state, refused)
}

/// Takes a desired state from the link: logs what is refused and returns
/// the rest, with the FAILED statuses to report for each refused
/// installation whose id is sound (by installation id).
pub fn take(
    state: pb::DesiredState,
    node_id: &str,
) -> (pb::DesiredState, Vec<(String, Vec<pb::ServiceStatus>)>) {
    let (state, refused) = sift(state);
    let mut failed = Vec::new();
    for refusal in refused {
        let reason = refusal.reason();
        tracing::warn!(
            installation = %addons_descriptor::quoted(&refusal.installation_id),
            %reason,
            "refused an installation of the desired state"
        );
        if !refusal.id_sound {
            continue;
        }
        let services = if refusal.services.is_empty() {
            vec![String::new()]
        } else {
            refusal.services
        };
        let statuses = services
            .into_iter()
            .map(|service_name| pb::ServiceStatus {
                service_name,
                phase: ServicePhase::Failed.into(),
                node_id: node_id.to_owned(),
                reason: reason.clone(),
                update_time: Some(crate::now()),
                ..Default::default()
            })
            .collect();
        failed.push((refusal.installation_id, statuses));
    }
    (state, failed)
}

/// Entry points for the fuzz targets (`fuzz/`). Not an API.
pub mod fuzzing {
    use oakestra_addons_proto::engine::v1 as pb;
    use prost::Message as _;

    use crate::state_dir::StateDir;

    /// A desired state (whole, or a chunk) as the link hands it over,
    /// through the intake; panics if what passes names a path outside the
    /// state dir.
    pub fn desired(data: &[u8]) {
        let state = match pb::DesiredState::decode(data) {
            Ok(state) => state,
            Err(_) => match pb::DesiredStateChunk::decode(data) {
                Ok(chunk) => pb::DesiredState {
                    generation: chunk.generation,
                    installations: chunk.upserts,
                },
                Err(_) => return,
            },
        };
        let (kept, refused) = super::sift(state);
        for refusal in &refused {
            let _ = refusal.reason();
        }
        let root = std::path::Path::new("/state");
        let dir = StateDir::new(root);
        for installation in &kept.installations {
            let id = &installation.installation_id;
            let addon = installation.addon.as_ref();
            let volumes = addon.iter().flat_map(|a| &a.volumes);
            for volume in volumes {
                let path = dir
                    .volume(id, &volume.name)
                    .expect("a kept installation's volume has a path");
                assert!(inside(root, &path), "{}", path.display());
            }
            for service in addon.iter().flat_map(|a| &a.services) {
                let container = format!("root_{}", service.service_name);
                for path in [dir.log(&container), dir.container_dir(&container)] {
                    let path = path.expect("a kept service has its files");
                    assert!(inside(root, &path), "{}", path.display());
                }
            }
        }
    }

    /// Whether `path` stays under `root`, with no `..` on the way.
    fn inside(root: &std::path::Path, path: &std::path::Path) -> bool {
        path.starts_with(root)
            && path
                .components()
                .all(|c| !matches!(c, std::path::Component::ParentDir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "01jb8n1m3q9x6c2v4t7w0y5z8k";

    fn installation(id: &str, service: &str, volume: &str) -> pb::DesiredInstallation {
        pb::DesiredInstallation {
            installation_id: id.into(),
            marketplace_id: ID.into(),
            presence: pb::DesiredPresence::Running.into(),
            addon: Some(pb::AddonSnapshot {
                name: "a".into(),
                version: "1.0.0".into(),
                services: vec![pb::ServiceSpec {
                    service_name: service.into(),
                    image: "r/i:1".into(),
                    resolved_image: "r/i@sha256:00".into(),
                    mounts: vec![pb::Mount {
                        source: Some(pb::mount::Source::Volume(volume.into())),
                        target: "/data".into(),
                        read_only: false,
                    }],
                    ..Default::default()
                }],
                volumes: vec![pb::VolumeSpec {
                    name: volume.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn takes_sound_installations_and_refuses_hostile_ones() {
        assert_eq!(check(&installation(ID, "web", "data")), Ok(()));
        for (id, service, volume, field) in [
            ("../../../../..", "web", "etc", "installation_id"),
            ("", "web", "data", "installation_id"),
            (
                "01JB8N1M3Q9X6C2V4T7W0Y5Z8K",
                "web",
                "data",
                "installation_id",
            ),
            (ID, "../web", "data", "addon.services[0].service_name"),
            (ID, "web/x", "data", "addon.services[0].service_name"),
            (ID, "web", "..", "addon.volumes[0].name"),
            (ID, "web\u{1b}[2K", "data", "addon.services[0].service_name"),
        ] {
            let violations = check(&installation(id, service, volume)).unwrap_err();
            assert!(
                violations.iter().any(|v| v.field == field),
                "{id:?} {service:?} {volume:?}: {violations:?}"
            );
        }
        let mut unpinned = installation(ID, "web", "data");
        unpinned.addon.as_mut().unwrap().services[0].resolved_image = "r/i:latest".into();
        assert!(check(&unpinned).is_err());
        let mut host = installation(ID, "web", "data");
        host.addon.as_mut().unwrap().services[0].mounts[0].source =
            Some(pb::mount::Source::HostPath("/srv/addons/../../etc".into()));
        assert!(check(&host).is_err());
    }

    #[test]
    fn the_fuzz_entry_takes_any_bytes() {
        use prost::Message as _;
        fuzzing::desired(b"");
        fuzzing::desired(&[0xff; 64]);
        let state = pb::DesiredState {
            generation: 1,
            installations: vec![
                installation(ID, "web", "data"),
                installation("..", "x", ".."),
            ],
        };
        fuzzing::desired(&state.encode_to_vec());
    }

    #[test]
    fn sifting_keeps_order_and_reports_only_sound_ids() {
        let state = pb::DesiredState {
            generation: 3,
            installations: vec![
                installation(ID, "web", "data"),
                installation("../..", "web", "etc"),
                installation("01jb8n1m3q9x6c2v4t7w0y5z8m", "../x", "data"),
            ],
        };
        let (kept, failed) = take(state, "n1");
        assert_eq!(kept.generation, 3);
        assert_eq!(kept.installations.len(), 1);
        assert_eq!(failed.len(), 1);
        let (id, services) = &failed[0];
        assert_eq!(id, "01jb8n1m3q9x6c2v4t7w0y5z8m");
        assert_eq!(services[0].phase(), ServicePhase::Failed);
        assert!(
            services[0].reason.contains("service_name"),
            "{}",
            services[0].reason
        );
    }
}
