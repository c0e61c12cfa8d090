//! How an installation's status follows from its services' statuses. Pure
//! functions, no I/O.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Health, Installation, InstallationStatus, ServicePhase, ServiceStatus};

/// Replaces what `node` reported earlier for the installation with
/// `services` and recomputes the installation's status. Entries for services
/// the addon does not have are dropped.
#[cfg(test)]
pub(crate) fn apply_report(
    installation: &mut Installation,
    node: &str,
    services: Vec<ServiceStatus>,
) {
    apply_reports(installation, vec![(node.to_owned(), services)]);
}

/// Applies many nodes' reports at once (a later report of a node replaces
/// an earlier one) and recomputes the status once: a batch costs one pass
/// over the installation's statuses, not one per report.
pub(crate) fn apply_reports(
    installation: &mut Installation,
    reports: Vec<(String, Vec<ServiceStatus>)>,
) {
    // While a release rolls out, a node may report either release's
    // services.
    let previous = installation
        .rollout
        .as_ref()
        .and_then(|r| crate::rollout::find(installation, r.from_release));
    let known: BTreeSet<&str> = installation
        .addon
        .services
        .iter()
        .chain(previous.iter().flat_map(|r| &r.addon.services))
        .map(|s| s.service_name.as_str())
        .collect();
    let mut latest: BTreeMap<String, Vec<ServiceStatus>> = BTreeMap::new();
    for (node, services) in reports {
        let fresh: Vec<ServiceStatus> = services
            .into_iter()
            .filter(|s| known.contains(s.service_name.as_str()))
            .map(|mut s| {
                s.node_id.clone_from(&node);
                s
            })
            .collect();
        latest.insert(node, fresh);
    }
    installation
        .services
        .retain(|s| !latest.contains_key(&s.node_id));
    installation.services.extend(latest.into_values().flatten());
    installation
        .services
        .sort_by(|a, b| (&a.service_name, &a.node_id).cmp(&(&b.service_name, &b.node_id)));
    recompute(installation);
}

/// Marks what `node` reported as unknown: its monitor is gone.
pub(crate) fn mark_disconnected(installation: &mut Installation, node: &str) -> bool {
    let mut changed = false;
    for service in installation
        .services
        .iter_mut()
        .filter(|s| s.node_id == node)
    {
        if service.phase != ServicePhase::Unknown && service.phase != ServicePhase::Removed {
            service.phase = ServicePhase::Unknown;
            service.reason = format!("the monitor of node {node} is disconnected");
            service.update_time = chrono::Utc::now();
            changed = true;
        }
    }
    if changed {
        recompute(installation);
    }
    changed
}

/// Drops what `node` reported: it was forgotten, or its labels no longer
/// match the installation's selector. An uninstall that waited for the
/// node names it in `unconfirmed_nodes`. Returns whether the record
/// changed.
pub(crate) fn forget_node(installation: &mut Installation, node: &str) -> bool {
    let before = installation.services.len();
    let unremoved = installation
        .services
        .iter()
        .any(|s| s.node_id == node && s.phase != ServicePhase::Removed);
    installation.services.retain(|s| s.node_id != node);
    let mut changed = installation.services.len() != before;
    changed |= installation.report_sequences.remove(node).is_some();
    if unremoved
        && installation.status == InstallationStatus::Disabling
        && !installation.unconfirmed_nodes.iter().any(|n| n == node)
    {
        installation.unconfirmed_nodes.push(node.to_owned());
    }
    changed |= crate::rollout::forget_node(installation, node, chrono::Utc::now());
    if changed {
        recompute(installation);
    }
    changed
}

/// Sets `status` and `status_message` from the services' statuses.
pub(crate) fn recompute(installation: &mut Installation) {
    let (status, message) = aggregate(installation);
    let (status, message) = crate::rollout::overlay(installation, status, message);
    installation.status = status;
    installation.status_message = message;
}

/// The status an installation has given its services' statuses:
///
/// - uninstalling: `DISABLED` once every service reported on any node is
///   removed, else `DISABLING`;
/// - otherwise, over every (service, node) pair of the nodes that
///   reported: all running → `ACTIVE`; some running → `PARTIALLY_ACTIVE`;
///   none running and every one failed for good → `FAILED`; else
///   `INSTALLING`. Pairs whose monitor is disconnected count as not running;
///   if every node is disconnected the status stays as it was.
pub(crate) fn aggregate(installation: &Installation) -> (InstallationStatus, String) {
    let services = &installation.services;
    match installation.status {
        InstallationStatus::Disabled => {
            return (
                InstallationStatus::Disabled,
                installation.status_message.clone(),
            );
        }
        InstallationStatus::Disabling => {
            let remaining: Vec<String> = services
                .iter()
                .filter(|s| s.phase != ServicePhase::Removed)
                .map(|s| format!("{} on {}", s.service_name, s.node_id))
                .collect();
            return if remaining.is_empty() && installation.unconfirmed_nodes.is_empty() {
                (
                    InstallationStatus::Disabled,
                    "every service is removed".to_owned(),
                )
            } else if remaining.is_empty() {
                (
                    InstallationStatus::Disabled,
                    format!(
                        "every service is removed; never confirmed by {} (forgotten)",
                        listed(&installation.unconfirmed_nodes)
                    ),
                )
            } else {
                (
                    InstallationStatus::Disabling,
                    format!("waiting for removal of {}", listed(&remaining)),
                )
            };
        }
        _ => {}
    }
    let expected: Vec<&str> = installation
        .addon
        .services
        .iter()
        .map(|s| s.service_name.as_str())
        .collect();
    let nodes: BTreeSet<&str> = services.iter().map(|s| s.node_id.as_str()).collect();
    if nodes.is_empty() {
        return (
            InstallationStatus::Installing,
            "waiting for a monitor to start the services".to_owned(),
        );
    }
    let by_pair: BTreeMap<(&str, &str), &ServiceStatus> = services
        .iter()
        .map(|s| ((s.service_name.as_str(), s.node_id.as_str()), s))
        .collect();
    let disconnected: BTreeSet<&str> = services
        .iter()
        .filter(|s| s.phase == ServicePhase::Unknown)
        .map(|s| s.node_id.as_str())
        .collect();
    if disconnected.len() == nodes.len() {
        return (
            installation.status,
            format!(
                "monitor of {} disconnected; last known: {}",
                listed(&disconnected),
                installation
                    .status_message
                    .split("; last known: ")
                    .last()
                    .unwrap_or_default()
            ),
        );
    }
    let mut running = 0;
    let mut failed = Vec::new();
    let mut waiting = Vec::new();
    let mut total = 0;
    for node in &nodes {
        for name in &expected {
            total += 1;
            match by_pair.get(&(*name, *node)).map(|s| (s.phase, s.health)) {
                Some((ServicePhase::Running, None | Some(Health::Healthy))) => running += 1,
                Some((ServicePhase::Running, Some(health))) => {
                    let what = if health == Health::Unhealthy {
                        "unhealthy"
                    } else {
                        "health check starting"
                    };
                    waiting.push(format!("{name} on {node} ({what})"));
                }
                Some((ServicePhase::Failed, _)) => {
                    let status = by_pair[&(*name, *node)];
                    let mut notes = Vec::new();
                    if let Some(code) = status.exit_code {
                        notes.push(format!("exit code {code}"));
                    }
                    if let Some(core) = &status.replaced_core_component {
                        notes.push(if installation.keep_core_stopped_on_failure {
                            format!("replaced core component {core} kept stopped")
                        } else {
                            format!("replaced core component {core} restored")
                        });
                    }
                    let detail = if notes.is_empty() {
                        format!("{name} on {node}")
                    } else {
                        format!("{name} on {node} ({})", notes.join("; "))
                    };
                    failed.push(detail);
                }
                _ => waiting.push(format!("{name} on {node}")),
            }
        }
    }
    let mut message = if running == total {
        format!("all {total} services running")
    } else if running > 0 {
        let mut parts = vec![format!("{running} of {total} services running")];
        if !failed.is_empty() {
            parts.push(format!("failed: {}", listed(&failed)));
        }
        if !waiting.is_empty() {
            parts.push(format!("not running yet: {}", listed(&waiting)));
        }
        parts.join("; ")
    } else if waiting.is_empty() {
        format!("every service failed: {}", listed(&failed))
    } else {
        format!("starting: {}", listed(&waiting))
    };
    if !disconnected.is_empty() {
        message.push_str(&format!(
            "; monitor of {} disconnected",
            listed(&disconnected)
        ));
    }
    let status = if running == total {
        InstallationStatus::Active
    } else if running > 0 {
        InstallationStatus::PartiallyActive
    } else if waiting.is_empty() {
        InstallationStatus::Failed
    } else {
        InstallationStatus::Installing
    };
    (status, message)
}

/// Most items a status message names; the rest are counted.
const LISTED: usize = 8;

/// `a, b, c`, or the first [`LISTED`] and how many more: a message stays
/// short however many nodes a plane has.
fn listed<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let items: Vec<S> = items.into_iter().collect();
    let shown: Vec<&str> = items.iter().take(LISTED).map(AsRef::as_ref).collect();
    match items.len() - shown.len() {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use addons_descriptor::{Descriptor, Service};

    use super::*;
    use crate::model::Plane;

    pub(crate) fn installation(services: &[&str]) -> Installation {
        Installation {
            id: "i1".into(),
            marketplace_id: "m1".into(),
            addon: Descriptor {
                name: "a".into(),
                services: services
                    .iter()
                    .map(|name| Service {
                        service_name: (*name).into(),
                        ..Service::default()
                    })
                    .collect(),
                ..Descriptor::default()
            },
            plane: Plane::Root,
            status: InstallationStatus::Installing,
            status_message: String::new(),
            services: Vec::new(),
            report_sequences: Default::default(),
            changed: Vec::new(),
            purge_requested: false,
            granted_privileges: Vec::new(),
            keep_core_stopped_on_failure: false,
            request_id: None,
            create_time: chrono::Utc::now(),
            update_time: chrono::Utc::now(),
            release: 1,
            history: Vec::new(),
            rollout: None,
            rolled_back: None,
            revoked: None,
            node_selector: Default::default(),
            unconfirmed_nodes: Vec::new(),
            trace_parent: None,
        }
    }

    pub(crate) fn status(name: &str, phase: ServicePhase) -> ServiceStatus {
        ServiceStatus {
            service_name: name.into(),
            phase,
            container_id: format!("root_{name}"),
            node_id: String::new(),
            restart_count: 0,
            exit_code: (phase == ServicePhase::Failed).then_some(3),
            reason: String::new(),
            logs_tail: Vec::new(),
            replaced_core_component: None,
            update_time: chrono::Utc::now(),
            pull_bytes_done: 0,
            pull_bytes_total: 0,
            release: 0,
            health: None,
        }
    }

    #[test]
    fn says_when_a_replaced_core_component_came_back() {
        let mut i = installation(&["scheduler"]);
        let mut failed = status("scheduler", ServicePhase::Failed);
        failed.node_id = "n1".into();
        failed.replaced_core_component = Some("root_scheduler".into());
        apply_report(&mut i, "n1", vec![failed.clone()]);
        assert_eq!(i.status, InstallationStatus::Failed);
        assert!(
            i.status_message.contains(
                "scheduler on n1 (exit code 3; replaced core component root_scheduler restored)"
            ),
            "{}",
            i.status_message
        );
        i.keep_core_stopped_on_failure = true;
        apply_report(&mut i, "n1", vec![failed]);
        assert!(
            i.status_message.contains("root_scheduler kept stopped"),
            "{}",
            i.status_message
        );
    }

    #[test]
    fn a_running_service_counts_only_once_healthy() {
        let mut i = installation(&["web"]);
        let mut web = status("web", ServicePhase::Running);
        web.health = Some(Health::Starting);
        apply_report(&mut i, "n1", vec![web.clone()]);
        assert_eq!(i.status, InstallationStatus::Installing);
        web.health = Some(Health::Unhealthy);
        apply_report(&mut i, "n1", vec![web.clone()]);
        assert_eq!(i.status, InstallationStatus::Installing);
        assert!(
            i.status_message.contains("web on n1 (unhealthy)"),
            "{}",
            i.status_message
        );
        web.health = Some(Health::Healthy);
        apply_report(&mut i, "n1", vec![web]);
        assert_eq!(i.status, InstallationStatus::Active);
    }

    #[test]
    fn follows_the_services() {
        use ServicePhase::*;
        let mut i = installation(&["api", "worker"]);
        assert_eq!(aggregate(&i).0, InstallationStatus::Installing);
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Pulling), status("worker", Pending)],
        );
        assert_eq!(i.status, InstallationStatus::Installing);
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Running), status("worker", Starting)],
        );
        assert_eq!(i.status, InstallationStatus::PartiallyActive);
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Running), status("worker", Running)],
        );
        assert_eq!(i.status, InstallationStatus::Active);
        assert_eq!(i.status_message, "all 2 services running");
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Running), status("worker", Failed)],
        );
        assert_eq!(i.status, InstallationStatus::PartiallyActive);
        assert!(
            i.status_message.contains("worker on n1 (exit code 3)"),
            "{}",
            i.status_message
        );
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Failed), status("worker", Failed)],
        );
        assert_eq!(i.status, InstallationStatus::Failed);
        // Crash-looping but not given up yet is not failed.
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Backoff), status("worker", Failed)],
        );
        assert_eq!(i.status, InstallationStatus::Installing);
    }

    #[test]
    fn counts_every_node_and_ignores_unknown_services() {
        use ServicePhase::*;
        let mut i = installation(&["api"]);
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Running), status("ghost", Running)],
        );
        assert_eq!(i.services.len(), 1, "unknown service dropped");
        assert_eq!(i.status, InstallationStatus::Active);
        apply_report(&mut i, "n2", vec![status("api", Starting)]);
        assert_eq!(i.status, InstallationStatus::PartiallyActive);
        assert_eq!(i.services.len(), 2);
        assert_eq!(
            i.services[1].node_id, "n2",
            "node comes from the link, not the report"
        );
    }

    #[test]
    fn a_disconnected_monitor_is_shown_and_keeps_the_status() {
        use ServicePhase::*;
        let mut i = installation(&["api"]);
        apply_report(&mut i, "n1", vec![status("api", Running)]);
        assert!(mark_disconnected(&mut i, "n1"));
        assert_eq!(i.services[0].phase, Unknown);
        assert_eq!(
            i.status,
            InstallationStatus::Active,
            "last known status stays"
        );
        assert!(
            i.status_message.contains("disconnected"),
            "{}",
            i.status_message
        );
        assert!(
            !mark_disconnected(&mut i, "n1"),
            "marking twice changes nothing"
        );
        apply_report(&mut i, "n2", vec![status("api", Running)]);
        assert_eq!(i.status, InstallationStatus::PartiallyActive);
    }

    #[test]
    fn uninstall_ends_when_every_service_is_removed() {
        use ServicePhase::*;
        let mut i = installation(&["api", "worker"]);
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Running), status("worker", Running)],
        );
        i.status = InstallationStatus::Disabling;
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Removed), status("worker", Stopping)],
        );
        assert_eq!(i.status, InstallationStatus::Disabling);
        assert!(i.status_message.contains("worker on n1"));
        apply_report(
            &mut i,
            "n1",
            vec![status("api", Removed), status("worker", Removed)],
        );
        assert_eq!(i.status, InstallationStatus::Disabled);
        // Reports after that change nothing about the status.
        apply_report(&mut i, "n1", vec![status("api", Running)]);
        assert_eq!(i.status, InstallationStatus::Disabled);
    }

    #[test]
    fn a_forgotten_node_stops_counting_and_an_uninstall_names_it() {
        use ServicePhase::*;
        let mut i = installation(&["api"]);
        for node in ["n1", "n2", "n3"] {
            i.report_sequences.insert(node.into(), 4);
            apply_report(&mut i, node, vec![status("api", Running)]);
        }
        assert!(mark_disconnected(&mut i, "n3"));
        assert_eq!(i.status, InstallationStatus::PartiallyActive);
        // Forgotten while the addon runs: it simply stops counting.
        let mut running = i.clone();
        assert!(forget_node(&mut running, "n3"));
        assert_eq!(running.status, InstallationStatus::Active);
        assert!(running.unconfirmed_nodes.is_empty());
        assert!(!running.report_sequences.contains_key("n3"));
        assert!(
            !forget_node(&mut running, "n3"),
            "a second time changes nothing"
        );

        i.status = InstallationStatus::Disabling;
        for node in ["n1", "n2"] {
            apply_report(&mut i, node, vec![status("api", Removed)]);
        }
        assert_eq!(i.status, InstallationStatus::Disabling);
        assert!(
            i.status_message.contains("api on n3"),
            "{}",
            i.status_message
        );
        assert!(forget_node(&mut i, "n3"));
        assert_eq!(i.status, InstallationStatus::Disabled);
        assert_eq!(i.unconfirmed_nodes, ["n3"]);
        assert!(
            i.status_message.contains("never confirmed by n3"),
            "{}",
            i.status_message
        );
        // A node that had confirmed is not named when forgotten afterwards.
        assert!(forget_node(&mut i, "n1"));
        assert_eq!(i.unconfirmed_nodes, ["n3"]);
    }

    #[test]
    fn a_message_stays_short_on_a_large_plane() {
        use ServicePhase::*;
        let mut i = installation(&["api"]);
        for n in 0..1000 {
            apply_report(&mut i, &format!("n{n:04}"), vec![status("api", Pending)]);
        }
        assert_eq!(i.status, InstallationStatus::Installing);
        assert!(i.status_message.len() < 300, "{}", i.status_message);
        assert!(
            i.status_message.ends_with("and 992 more"),
            "{}",
            i.status_message
        );
        for n in 0..1000 {
            assert!(mark_disconnected(&mut i, &format!("n{n:04}")) || n == 999);
        }
        assert!(i.status_message.len() < 400, "{}", i.status_message);
    }
}
