//! Conversions between the protobuf messages and the manager's records.

use addons_store::Versioned;
use oakestra_addons_proto::engine::v1 as pb;

use crate::model::{
    Health, Installation, InstallationStatus, NodeState, Plane, Release, ReleaseOutcome, Rollout,
    ServicePhase, ServiceStatus,
};

pub(crate) use addons_server_kit::timestamp;

impl From<InstallationStatus> for pb::InstallationStatus {
    fn from(status: InstallationStatus) -> Self {
        match status {
            InstallationStatus::Installing => Self::Installing,
            InstallationStatus::Active => Self::Active,
            InstallationStatus::PartiallyActive => Self::PartiallyActive,
            InstallationStatus::Failed => Self::Failed,
            InstallationStatus::Disabling => Self::Disabling,
            InstallationStatus::Disabled => Self::Disabled,
            InstallationStatus::Upgrading => Self::Upgrading,
            InstallationStatus::RolledBack => Self::RolledBack,
        }
    }
}

/// Maps a requested status; `None` for UNSPECIFIED and unknown values.
pub(crate) fn status_from_proto(value: i32) -> Option<InstallationStatus> {
    Some(match pb::InstallationStatus::try_from(value).ok()? {
        pb::InstallationStatus::Unspecified => return None,
        pb::InstallationStatus::Installing => InstallationStatus::Installing,
        pb::InstallationStatus::Active => InstallationStatus::Active,
        pb::InstallationStatus::PartiallyActive => InstallationStatus::PartiallyActive,
        pb::InstallationStatus::Failed => InstallationStatus::Failed,
        pb::InstallationStatus::Disabling => InstallationStatus::Disabling,
        pb::InstallationStatus::Disabled => InstallationStatus::Disabled,
        pb::InstallationStatus::Upgrading => InstallationStatus::Upgrading,
        pb::InstallationStatus::RolledBack => InstallationStatus::RolledBack,
    })
}

impl From<Plane> for pb::Plane {
    fn from(plane: Plane) -> Self {
        match plane {
            Plane::Root => Self::Root,
            Plane::Cluster => Self::Cluster,
        }
    }
}

impl From<ServicePhase> for pb::ServicePhase {
    fn from(phase: ServicePhase) -> Self {
        match phase {
            ServicePhase::Pending => Self::Pending,
            ServicePhase::Pulling => Self::Pulling,
            ServicePhase::Starting => Self::Starting,
            ServicePhase::Running => Self::Running,
            ServicePhase::Backoff => Self::Backoff,
            ServicePhase::Failed => Self::Failed,
            ServicePhase::Stopping => Self::Stopping,
            ServicePhase::Removed => Self::Removed,
            ServicePhase::Unknown => Self::Unknown,
        }
    }
}

pub(crate) fn service_status_to_proto(s: ServiceStatus) -> pb::ServiceStatus {
    pb::ServiceStatus {
        service_name: s.service_name,
        phase: pb::ServicePhase::from(s.phase).into(),
        container_id: s.container_id,
        node_id: s.node_id,
        restart_count: s.restart_count,
        exit_code: s.exit_code,
        reason: s.reason,
        logs_tail: s.logs_tail,
        replaced_core_component: s.replaced_core_component.unwrap_or_default(),
        update_time: Some(timestamp(s.update_time)),
        pull_bytes_done: s.pull_bytes_done,
        pull_bytes_total: s.pull_bytes_total,
        release: s.release,
        health: match s.health {
            None => pb::ServiceHealth::Unspecified,
            Some(Health::Starting) => pb::ServiceHealth::Starting,
            Some(Health::Healthy) => pb::ServiceHealth::Healthy,
            Some(Health::Unhealthy) => pb::ServiceHealth::Unhealthy,
        }
        .into(),
    }
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or_default()
}

fn release_to_proto(r: Release) -> pb::Release {
    pb::Release {
        number: r.number,
        version: r.addon.version.clone(),
        marketplace_id: r.marketplace_id,
        images: r
            .addon
            .services
            .iter()
            .map(|s| {
                format!(
                    "{}={}",
                    s.service_name,
                    s.resolved_image.as_deref().unwrap_or(&s.image)
                )
            })
            .collect(),
        create_time: Some(timestamp(r.create_time)),
        requested_by: r.requested_by,
        outcome: match r.outcome {
            ReleaseOutcome::InProgress => pb::ReleaseOutcome::InProgress,
            ReleaseOutcome::Deployed => pb::ReleaseOutcome::Deployed,
            ReleaseOutcome::Superseded => pb::ReleaseOutcome::Superseded,
            ReleaseOutcome::RolledBack => pb::ReleaseOutcome::RolledBack,
        }
        .into(),
        reason: r.reason,
        rollback_of: r.rollback_of.unwrap_or_default(),
    }
}

fn rollout_to_proto(r: Rollout) -> pb::Rollout {
    pb::Rollout {
        from_release: r.from_release,
        to_release: r.to_release,
        nodes: r
            .nodes
            .into_iter()
            .map(|n| pb::NodeRollout {
                node_id: n.node_id,
                state: match n.state {
                    NodeState::Waiting => pb::NodeRolloutState::Waiting,
                    NodeState::Upgrading => pb::NodeRolloutState::Upgrading,
                    NodeState::Healthy => pb::NodeRolloutState::Healthy,
                    NodeState::Failed => pb::NodeRolloutState::Failed,
                }
                .into(),
                since: Some(timestamp(n.since)),
                reason: n.reason,
            })
            .collect(),
        max_parallel: r.max_parallel,
        min_healthy_time: Some(duration(r.min_healthy_time)),
        progress_deadline: Some(duration(r.progress_deadline)),
    }
}

pub(crate) fn installation_to_proto(record: Versioned<Installation>) -> pb::Installation {
    let installation = record.value;
    pb::Installation {
        id: installation.id,
        addon: Some(installation.addon.into_snapshot()),
        marketplace_id: installation.marketplace_id,
        status: pb::InstallationStatus::from(installation.status).into(),
        status_message: installation.status_message,
        services: installation
            .services
            .into_iter()
            .map(service_status_to_proto)
            .collect(),
        create_time: Some(timestamp(installation.create_time)),
        update_time: Some(timestamp(installation.update_time)),
        revision: record.revision,
        plane: pb::Plane::from(installation.plane).into(),
        keep_core_stopped_on_failure: installation.keep_core_stopped_on_failure,
        granted_privileges: installation
            .granted_privileges
            .into_iter()
            .map(privilege_to_proto)
            .collect(),
        release: installation.release,
        history: installation
            .history
            .into_iter()
            .map(release_to_proto)
            .collect(),
        rollout: installation.rollout.map(rollout_to_proto),
        node_selector: installation.node_selector.into_iter().collect(),
        unconfirmed_nodes: installation.unconfirmed_nodes,
        revoked: installation.revoked.map(|r| pb::AddonRevocation {
            reason: r.reason,
            time: Some(timestamp(r.time)),
            uninstalled: r.uninstalled,
        }),
    }
}

/// The plane's name in logs, messages and ids.
pub(crate) fn plane_name(plane: Plane) -> &'static str {
    pb::Plane::from(plane).as_str()
}

/// A reported service status; the error names the field that is wrong.
pub(crate) fn service_status_from_proto(s: pb::ServiceStatus) -> Result<ServiceStatus, String> {
    let phase = match pb::ServicePhase::try_from(s.phase)
        .map_err(|_| format!("unknown phase {}", s.phase))?
    {
        pb::ServicePhase::Unspecified => {
            return Err(format!("phase of `{}` is required", s.service_name));
        }
        pb::ServicePhase::Pending => ServicePhase::Pending,
        pb::ServicePhase::Pulling => ServicePhase::Pulling,
        pb::ServicePhase::Starting => ServicePhase::Starting,
        pb::ServicePhase::Running => ServicePhase::Running,
        pb::ServicePhase::Backoff => ServicePhase::Backoff,
        pb::ServicePhase::Failed => ServicePhase::Failed,
        pb::ServicePhase::Stopping => ServicePhase::Stopping,
        pb::ServicePhase::Removed => ServicePhase::Removed,
        pb::ServicePhase::Unknown => ServicePhase::Unknown,
    };
    if s.service_name.is_empty() {
        return Err("service_name is required".to_owned());
    }
    // Bound what one report can make the manager store.
    const MAX_LOG_LINES: usize = 100;
    const MAX_TEXT: usize = 4096;
    let clip = |mut text: String| {
        if text.len() > MAX_TEXT {
            let mut end = MAX_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    };
    let skip = s.logs_tail.len().saturating_sub(MAX_LOG_LINES);
    Ok(ServiceStatus {
        service_name: s.service_name,
        phase,
        container_id: clip(s.container_id),
        node_id: String::new(),
        restart_count: s.restart_count,
        exit_code: s.exit_code,
        reason: clip(s.reason),
        logs_tail: s.logs_tail.into_iter().skip(skip).map(clip).collect(),
        replaced_core_component: Some(s.replaced_core_component).filter(|c| !c.is_empty()),
        update_time: s
            .update_time
            .and_then(|t| {
                chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
            })
            .unwrap_or_else(chrono::Utc::now),
        pull_bytes_done: s.pull_bytes_done,
        pull_bytes_total: s.pull_bytes_total,
        release: s.release,
        health: match pb::ServiceHealth::try_from(s.health) {
            Ok(pb::ServiceHealth::Starting) => Some(Health::Starting),
            Ok(pb::ServiceHealth::Healthy) => Some(Health::Healthy),
            Ok(pb::ServiceHealth::Unhealthy) => Some(Health::Unhealthy),
            // Unset, or a value this manager does not know: no check.
            _ => None,
        },
    })
}

/// A grant of an installation, saying whether the policy gave it.
pub fn privilege_to_proto(privilege: addons_descriptor::Privilege) -> pb::Privilege {
    let granted_by_policy = privilege.by_policy;
    pb::Privilege {
        granted_by_policy,
        ..privilege.into()
    }
}
