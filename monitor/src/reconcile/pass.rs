//! One pass: what the node shows and what the monitor remembers, given to
//! the pure [`plan`](crate::plan), and the plan's actions done in order
//! (phases, then removals side by side, then the rest), then health checks,
//! volumes, memory pruned and statuses reported.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use oakestra_addons_proto::engine::v1::{self as pb, DesiredPresence};

use super::{Reconciler, actions::Specs, status::Tracked};
use crate::{
    cores,
    error::MonitorError,
    labels::{
        CORE_SOURCE, CORE_SOURCE_STATIC, INSTALLATION, MANAGED_BY, MANAGED_BY_VALUE, REPLACED_BY,
        SERVICE,
    },
    network::Network,
    plan::{self, Action, Container, Role},
    release,
    runtime::{ContainerInfo, Runtime, TaskState},
    state_dir::StateDir,
};

/// The installations of the desired state as the planner takes them.
fn wants(desired: &pb::DesiredState) -> Vec<plan::Want> {
    desired
        .installations
        .iter()
        .map(|i| plan::Want {
            installation: i.installation_id.clone(),
            running: i.presence() == DesiredPresence::Running,
            keep_core_stopped: i.keep_core_stopped_on_failure,
            release: i.release,
            services: i
                .addon
                .iter()
                .flat_map(|a| &a.services)
                .map(|s| s.service_name.clone())
                .collect(),
        })
        .collect()
}

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// One pass over the desired state as this node runs it (see
    /// [`release::resolve`]); returns when to pass again at the latest.
    pub(super) async fn pass(
        &mut self,
        desired: Option<&pb::DesiredState>,
    ) -> Result<Option<Instant>, MonitorError> {
        let resolved = desired.map(|d| {
            self.load_trials();
            let wanted = release::wanted_trials(d, &self.cx.node_id, &self.trials);
            // Trials no longer wanted go with their files.
            for ended in self.trials.keys().filter(|id| !wanted.contains_key(*id)) {
                if let Err(err) = self
                    .cx
                    .state
                    .trial(ended)
                    .and_then(|path| StateDir::remove(&path))
                {
                    tracing::warn!(error = %err, "cannot remove a finished release trial");
                }
            }
            self.trials = wanted;
            release::resolve(d, &self.cx.node_id, &self.trials)
        });
        let wake_at = self.pass_resolved(resolved.as_ref()).await?;
        let judged = match desired {
            Some(desired) => {
                let judged = self.judge_trials(desired);
                // A verdict reached in this pass leaves with the statuses.
                self.report_all(resolved.as_ref());
                judged
            }
            None => None,
        };
        Ok([wake_at, judged].into_iter().flatten().min())
    }

    /// One pass over `desired`, as this node runs it.
    async fn pass_resolved(
        &mut self,
        desired: Option<&pb::DesiredState>,
    ) -> Result<Option<Instant>, MonitorError> {
        let mut all = self.cx.runtime.list_containers().await?;
        if self.ensure_static_cores(&all).await? {
            all = self.cx.runtime.list_containers().await?;
        }
        // Every task's state in one call, read after the containers: a
        // container made in between has no task yet (as it would read).
        let tasks = self.cx.runtime.task_states().await?;
        let mut containers = Vec::new();
        let mut infos: HashMap<String, ContainerInfo> = HashMap::new();
        let cores = cores::discover(&all, &self.cx.options.plane);
        for info in &all {
            let role = if info.labels.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE)
            {
                Role::Addon {
                    installation: info.labels.get(INSTALLATION).cloned().unwrap_or_default(),
                    service: info.labels.get(SERVICE).cloned().unwrap_or_default(),
                }
            } else if let Some((name, _)) = cores.iter().find(|(_, c)| c.id == info.id) {
                Role::Core {
                    name: name.clone(),
                    is_static: info.labels.get(CORE_SOURCE).map(String::as_str)
                        == Some(CORE_SOURCE_STATIC),
                    replaced_by: info.labels.get(REPLACED_BY).cloned(),
                }
            } else {
                continue;
            };
            let task = tasks
                .get(&info.id)
                .copied()
                .unwrap_or(TaskState::Absent)
                .into();
            containers.push(Container {
                id: info.id.clone(),
                role,
                task,
            });
            infos.insert(info.id.clone(), info.clone());
        }
        for container in &containers {
            self.cx.rotate_log_of(&container.id);
        }
        let wants = desired.map(wants);
        // What an earlier run of the monitor knew of the services it may
        // act on: counters, failures and pending restarts.
        if let Some(desired) = desired {
            self.current.clear();
            let mut running = BTreeSet::new();
            for installation in &desired.installations {
                for service in installation.addon.iter().flat_map(|a| &a.services) {
                    let base = match cores.iter().find(|(name, _)| *name == service.service_name) {
                        Some((_, core)) => plan::replacement_id(&core.id),
                        None => self.cx.container_id(&service.service_name),
                    };
                    let id = plan::release_id(&base, installation.release);
                    self.track(&installation.installation_id, &service.service_name, &id)
                        .status
                        .release = installation.release;
                    if installation.presence() == DesiredPresence::Running {
                        running.insert(id.clone());
                    }
                    self.current.insert(id);
                }
            }
            self.restore_give_ups(&infos);
            let existing = all.iter().map(|info| info.id.as_str()).collect();
            self.detach_unused(&existing, &running).await;
        }
        let now = Instant::now();
        let memory = self
            .tracked
            .iter()
            .map(|(id, t)| (id.clone(), t.memory()))
            .collect();
        let core_memory = self
            .core_starts
            .iter()
            .map(|(id, s)| (id.clone(), s.memory()))
            .collect();
        let plan = plan::plan(&plan::Input {
            plane: &self.cx.options.plane,
            desired: wants.as_deref(),
            containers: &containers,
            services: &memory,
            cores: &core_memory,
            static_cores: &self.static_names,
            now,
        });
        let specs = Specs::new(desired);
        // Phases first and reported, so the manager sees "removing" before
        // removals that may take their grace period; then core components
        // coming back; then removals, side by side; then everything else in
        // order.
        let (phases, rest): (Vec<Action>, Vec<Action>) = plan
            .actions
            .into_iter()
            .partition(|a| matches!(a, Action::Phase { .. }));
        for action in phases {
            self.execute(action, &specs, &infos).await?;
        }
        self.report_all(desired);
        // A core component whose replacement goes comes back before the
        // replacement's container is removed: its run stops the
        // replacement's task first, then starts it, so the gap on its port
        // is one stop and one start, and the removal (snapshot, files),
        // slower, comes after.
        let (restores, rest): (Vec<Action>, Vec<Action>) = rest.into_iter().partition(|a| {
            matches!(
                a,
                Action::RunCore {
                    stop_first: Some(_),
                    ..
                }
            )
        });
        for action in restores {
            self.execute(action, &specs, &infos).await?;
        }
        let (removals, rest): (Vec<Action>, Vec<Action>) = rest
            .into_iter()
            .partition(|a| matches!(a, Action::Remove { .. }));
        self.remove_all(removals).await?;
        for action in rest {
            self.execute(action, &specs, &infos).await?;
        }
        let health_wake = match desired {
            Some(desired) => self.check_health(desired).await?,
            None => None,
        };
        if let Some(desired) = desired {
            self.purge_volumes(desired);
            let ids: BTreeSet<&str> = desired
                .installations
                .iter()
                .map(|i| i.installation_id.as_str())
                .collect();
            // Other releases' containers are tracked until they are gone
            // (seen gone at the start of a pass).
            let current = &self.current;
            self.tracked.retain(|id, t| {
                ids.contains(t.installation_id.as_str())
                    && (current.contains(id) || containers.iter().any(|c| &c.id == id))
            });
            self.reported.retain(|id, _| ids.contains(id.as_str()));
        }
        self.persist_unsaved();
        self.label_give_ups(&infos).await?;
        self.report_all(desired);
        self.publish_view(&containers, desired);
        // A failure counted in this pass (an exit, a start that failed)
        // set its retry after the plan was made: the next pass is due at
        // the first retry too, not at the next resync. Only retries after
        // the plan's `now`: those before it were due, and acted on.
        let retry_wake = self
            .tracked
            .values()
            .filter_map(Tracked::retry_at)
            .filter(|at| *at > now)
            .min();
        Ok([plan.wake_at, health_wake, retry_wake]
            .into_iter()
            .flatten()
            .min())
    }
}
