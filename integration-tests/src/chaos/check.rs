//! The invariants a campaign checks once the faults stopped and the system
//! had time to settle: what each node runs in containerd is what the
//! manager's records say it should (no orphan, no missing service, the
//! release each record runs), the records' statuses match it, a request
//! retried with its id took effect once, no process panicked, and none
//! grew its memory or open files past a bound.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use addons_monitor::{
    labels,
    runtime::{Containerd, TaskState},
};
use oakestra_addons_proto::engine::v1::{self as pb, InstallationStatus};

use super::{
    cluster::Cluster,
    swap,
    workload::{Behaviour, Ledger, Published, list_installations},
};

/// Resident memory a server may reach, in KiB.
const MAX_RSS_KIB: u64 = 512 * 1024;
/// Open files a server may hold.
const MAX_FDS: usize = 512;

/// What runs on one node: its addon containers by installation, each with
/// its service, release and whether its task runs.
#[derive(Debug, Default)]
struct NodeView {
    labels: BTreeMap<String, String>,
    containers: Vec<(String, String, String, u64, bool)>,
    /// Whether the core component's task runs.
    core_running: bool,
    /// Who answers on the core component's port.
    serving: swap::Serving,
}

async fn node_views(cluster: &Cluster) -> Result<Vec<(String, NodeView)>, String> {
    let mut views = Vec::new();
    for node in &cluster.nodes {
        let mut node = node.lock().await;
        let id = node.host.node_id.clone();
        let labels = node.labels.clone();
        let runtime = Containerd::new(
            node.host.containerd().socket(),
            node.host.namespace(),
            "overlayfs".into(),
        );
        let listed = runtime
            .list_containers(&[(labels::MANAGED_BY, labels::MANAGED_BY_VALUE)])
            .await
            .map_err(|err| format!("{id}: list containers: {err}"))?;
        let core_running = matches!(
            runtime.task_state(&format!("root_{}", swap::CORE)).await,
            Ok(TaskState::Running(_))
        );
        let mut view = NodeView {
            labels,
            containers: Vec::new(),
            core_running,
            serving: swap::serving(node.host.address).await,
        };
        for container in listed {
            let Some(installation) = container.labels.get(labels::INSTALLATION) else {
                continue;
            };
            let service = container
                .labels
                .get(labels::SERVICE)
                .cloned()
                .unwrap_or_default();
            let release = container
                .labels
                .get(labels::RELEASE)
                .and_then(|r| r.parse().ok())
                .unwrap_or(1);
            let running = matches!(
                runtime.task_state(&container.id).await,
                Ok(TaskState::Running(_))
            );
            view.containers.push((
                container.id,
                installation.clone(),
                service,
                release,
                running,
            ));
        }
        views.push((id, view));
    }
    Ok(views)
}

fn placed(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What the last convergence check looked at.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Installation records, by status.
    pub statuses: BTreeMap<String, usize>,
    /// Addon containers on each node, and how many of them run.
    pub containers: BTreeMap<String, (usize, usize)>,
}

/// What does not hold between the manager's records and the nodes, now
/// (empty when everything does), and what the check looked at.
pub async fn convergence(cluster: &Cluster, published: &[Published]) -> (Vec<String>, Seen) {
    let mut seen = Seen::default();
    let installations = match list_installations(
        &mut pb::addons_manager_service_client::AddonsManagerServiceClient::new(
            cluster.manager_channel(),
        ),
    )
    .await
    {
        Ok(all) => all,
        Err(status) => return (vec![format!("the manager does not list: {status}")], seen),
    };
    let views = match node_views(cluster).await {
        Ok(views) => views,
        Err(err) => return (vec![err], seen),
    };
    for installation in &installations {
        *seen
            .statuses
            .entry(format!("{:?}", installation.status()))
            .or_default() += 1;
    }
    for (node, view) in &views {
        let running = view.containers.iter().filter(|c| c.4).count();
        seen.containers
            .insert(node.clone(), (view.containers.len(), running));
    }
    let behaviour: HashMap<&str, Behaviour> = published
        .iter()
        .map(|p| (p.id.as_str(), p.behaviour))
        .collect();
    let mut problems = Vec::new();
    let known: BTreeSet<&str> = installations.iter().map(|i| i.id.as_str()).collect();
    for installation in &installations {
        let status = installation.status();
        let placed_somewhere = views
            .iter()
            .any(|(_, view)| placed(&installation.node_selector, &view.labels));
        // INSTALLING with no node to run it on is where it waits for one.
        let waiting = status == InstallationStatus::Installing && !placed_somewhere;
        if matches!(
            status,
            InstallationStatus::Installing
                | InstallationStatus::Disabling
                | InstallationStatus::Upgrading
        ) && !waiting
        {
            problems.push(format!(
                "{} is still {status:?}: {}",
                installation.id, installation.status_message
            ));
        }
        let services: BTreeSet<&str> = installation
            .addon
            .iter()
            .flat_map(|a| &a.services)
            .map(|s| s.service_name.as_str())
            .collect();
        let mut all_running = true;
        let mut any_placed = false;
        for (node, view) in &views {
            let here: Vec<_> = view
                .containers
                .iter()
                .filter(|c| c.1 == installation.id)
                .collect();
            let wanted = !matches!(
                status,
                InstallationStatus::Disabled | InstallationStatus::Disabling
            ) && placed(&installation.node_selector, &view.labels);
            if !wanted {
                if !here.is_empty() {
                    problems.push(format!(
                        "{node} runs {} of {} ({status:?}), not placed there",
                        here.len(),
                        installation.id
                    ));
                }
                continue;
            }
            any_placed = true;
            for service in &services {
                let of_service: Vec<_> = here.iter().filter(|c| c.2 == *service).collect();
                match of_service.as_slice() {
                    [one] => {
                        if one.3 != installation.release {
                            problems.push(format!(
                                "{node} runs release {} of {}/{service}, the record release {}",
                                one.3, installation.id, installation.release
                            ));
                        }
                        all_running &= one.4;
                    }
                    // Given up on (the record says so) leaves no container
                    // when the create itself failed for good.
                    [] if installation.services.iter().any(|s| {
                        &s.node_id == node
                            && s.service_name == *service
                            && s.phase() == pb::ServicePhase::Failed
                    }) =>
                    {
                        all_running = false;
                    }
                    [] => problems.push(format!("{node} lacks {}/{service}", installation.id)),
                    many => problems.push(format!(
                        "{node} has {} containers of {}/{service}",
                        many.len(),
                        installation.id
                    )),
                }
            }
        }
        // A version that runs until stopped is ACTIVE exactly when it runs
        // on every node it is placed on.
        let steady = matches!(
            behaviour.get(installation.marketplace_id.as_str()),
            Some(Behaviour::Good | Behaviour::FillsLogs)
        );
        if steady && any_placed && problems.is_empty() {
            // ROLLED_BACK says all runs: the release before a failed one.
            let active = matches!(
                status,
                InstallationStatus::Active | InstallationStatus::RolledBack
            );
            if active != all_running {
                let reported: Vec<String> = installation
                    .services
                    .iter()
                    .map(|s| {
                        format!(
                            "{}/{} {:?} ({})",
                            s.node_id,
                            s.service_name,
                            s.phase(),
                            s.reason
                        )
                    })
                    .collect();
                let labels: Vec<String> = views
                    .iter()
                    .map(|(node, view)| format!("{node} {:?}", view.labels))
                    .collect();
                problems.push(format!(
                    "{} is {status:?} ({}) while its containers {} run; selector {:?}, nodes {labels:?}, reported {reported:?}",
                    installation.id,
                    installation.status_message,
                    if all_running { "all" } else { "do not all" },
                    installation.node_selector
                ));
            }
        }
    }
    // Where the plugin is wanted, it runs and answers in the core
    // component's place; everywhere else the core component is back.
    for (node, view) in &views {
        let plugin = installations.iter().find(|i| {
            i.addon.as_ref().is_some_and(|a| a.name == swap::PLUGIN)
                && !matches!(
                    i.status(),
                    InstallationStatus::Disabled | InstallationStatus::Disabling
                )
                && placed(&i.node_selector, &view.labels)
        });
        let expected = match plugin {
            // Given up on here: whatever the monitor did is in its report.
            Some(i)
                if i.services
                    .iter()
                    .any(|s| &s.node_id == node && s.phase() == pb::ServicePhase::Failed) =>
            {
                None
            }
            Some(_) => Some((false, swap::Serving::Plugin)),
            None => Some((true, swap::Serving::Core)),
        };
        if let Some((core, serving)) = expected
            && (view.core_running, view.serving) != (core, serving)
        {
            problems.push(format!(
                "{node}: the core component {} runs {}, {:?} answers on its port; expected {core} and {serving:?}",
                swap::CORE,
                view.core_running,
                view.serving
            ));
        }
    }
    for (node, view) in &views {
        for container in &view.containers {
            if !known.contains(container.1.as_str()) {
                problems.push(format!(
                    "{node} runs {} of {}, which no record names",
                    container.0, container.1
                ));
            }
        }
    }
    (problems, seen)
}

/// Whether each install request took effect at most once: every answer to
/// one request id names the same installation, a request sent again after
/// its answer was not refused, and the installations no answer named are
/// no more than the requests that went unanswered.
pub async fn exactly_once(cluster: &Cluster, ledger: &Ledger) -> Vec<String> {
    let mut problems = ledger.refused_retries.clone();
    let mut answered = BTreeSet::new();
    for (request, named) in &ledger.installs {
        let distinct: BTreeSet<&String> = named.iter().collect();
        if distinct.len() > 1 {
            problems.push(format!("request {request} made installations {distinct:?}"));
        }
        answered.extend(distinct.into_iter().cloned());
    }
    if let Ok(all) = list_installations(
        &mut pb::addons_manager_service_client::AddonsManagerServiceClient::new(
            cluster.manager_channel(),
        ),
    )
    .await
    {
        let unnamed: Vec<&str> = all
            .iter()
            .map(|i| i.id.as_str())
            .filter(|id| !answered.contains(*id))
            .collect();
        if unnamed.len() > ledger.unanswered_installs {
            problems.push(format!(
                "{} installations no answer named ({unnamed:?}), for {} unanswered requests",
                unnamed.len(),
                ledger.unanswered_installs
            ));
        }
    }
    problems
}

/// Services of crashing versions restarted more often than the failure
/// count allows, given up or not: a monitor restarted meanwhile forgot its
/// failure window. Both as the watcher saw each, at any time of the
/// campaign, and as the manager lists them at the end.
pub async fn failure_window(
    cluster: &Cluster,
    published: &[Published],
    restarts: &[super::watch::Restarts],
) -> Vec<String> {
    let crashes: BTreeSet<&str> = published
        .iter()
        .filter(|p| matches!(p.behaviour, Behaviour::Crashes | Behaviour::CrashesLater))
        .map(|p| p.id.as_str())
        .collect();
    let mut seen: Vec<(String, String, String, u32, bool)> = restarts
        .iter()
        .filter(|r| crashes.contains(r.marketplace_id.as_str()))
        .map(|r| {
            (
                r.installation.clone(),
                r.service.clone(),
                r.node.clone(),
                r.restart_count,
                r.given_up,
            )
        })
        .collect();
    let Ok(all) = list_installations(
        &mut pb::addons_manager_service_client::AddonsManagerServiceClient::new(
            cluster.manager_channel(),
        ),
    )
    .await
    else {
        return vec!["the manager does not list".to_owned()];
    };
    for installation in all
        .iter()
        .filter(|i| crashes.contains(i.marketplace_id.as_str()))
    {
        for service in installation
            .services
            .iter()
            .filter(|s| s.release == installation.release)
        {
            seen.push((
                installation.id.clone(),
                service.service_name.clone(),
                service.node_id.clone(),
                service.restart_count,
                service.phase() == pb::ServicePhase::Failed,
            ));
        }
    }
    let mut problems = Vec::new();
    let mut told = BTreeSet::new();
    for (installation, service, node, restarts, given_up) in seen {
        if restarts > super::cluster::MAX_FAILURES
            && told.insert((installation.clone(), service.clone(), node.clone()))
        {
            let when = if given_up {
                "before it was given up"
            } else {
                "and was not given up"
            };
            problems.push(format!(
                "{installation}/{service} on {node} was restarted {restarts} times {when} (at most {})",
                super::cluster::MAX_FAILURES
            ));
        }
    }
    problems
}

/// Panics in any process's log.
pub fn panics(logs: &[(String, String)]) -> Vec<String> {
    logs.iter()
        .flat_map(|(name, log)| {
            log.lines()
                .filter(|line| line.contains("panicked at"))
                .map(move |line| format!("{name}: {line}"))
        })
        .collect()
}

/// Processes past the memory or open-file bounds.
pub async fn bounds(cluster: &Cluster) -> Vec<String> {
    let mut pids = Vec::new();
    if let Some(server) = cluster.manager.lock().await.as_ref() {
        pids.push(("addons-manager".to_owned(), server.pid()));
    }
    if let Some(server) = cluster.marketplace.lock().await.as_ref() {
        pids.push(("addons-marketplace".to_owned(), server.pid()));
    }
    for node in &cluster.nodes {
        let mut node = node.lock().await;
        let id = node.host.node_id.clone();
        if let Some(monitor) = node.host.monitor_if_running() {
            pids.push((format!("addons-monitor {id}"), monitor.pid()));
        }
        if let Some(pid) = node.host.containerd().pid() {
            pids.push((format!("containerd {id}"), pid));
        }
    }
    let mut problems = Vec::new();
    for (name, pid) in pids {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        if fds > MAX_FDS {
            problems.push(format!("{name} holds {fds} open files"));
        }
        if rss > MAX_RSS_KIB {
            problems.push(format!("{name} uses {rss} KiB"));
        }
    }
    problems
}
