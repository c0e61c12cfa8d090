//! The planner: a pure function from what the monitor wants and sees to
//! what it must do, including the one decision that matters most on a
//! node: which of a core component and its replacement runs.
//!
//! It knows nothing of containerd, files or time beyond the `now` it is
//! given; the reconciler gathers its input, runs the actions in order, and
//! plans again at the next wake-up. Rules that keep a core component and its
//! replacement from running together live in the shape of the actions:
//! every start of a replacement carries the core component to stop first
//! ([`Action::Create`], [`Action::Start`]), and every start of a core
//! component carries the replacement to stop first ([`Action::RunCore`]);
//! the reconciler does not start one if stopping the other failed.

mod model;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Instant,
};

pub use self::model::{Container, CoreMemory, Input, Role, ServiceMemory, Task, Want};

/// The phase a service is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for something outside the service.
    Pending,
    /// Running.
    Running,
    /// Given up on.
    Failed,
    /// Being removed.
    Stopping,
    /// Gone.
    Removed,
}

/// One step for the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Shows a service in a phase; no runtime call.
    Phase {
        /// Its installation.
        installation: String,
        /// The service.
        service: String,
        /// Its container id.
        id: String,
        /// The phase.
        phase: Phase,
        /// Why.
        reason: String,
    },
    /// Stops and removes an addon container.
    Remove {
        /// The container.
        id: String,
        /// The installation it belongs to, if it is that installation's
        /// removal (not an orphan's).
        installation: Option<String>,
        /// Its service.
        service: String,
    },
    /// Makes the service's container (image, networks, spec) and starts it.
    /// A replacement has its task created first, then takes `replaces` over
    /// (stops it), then starts. The containers of the service's other
    /// releases (`supersedes`) are removed only once the new one is
    /// prepared, right before it starts.
    Create {
        /// Its installation.
        installation: String,
        /// The service.
        service: String,
        /// The container id.
        id: String,
        /// The core container it replaces.
        replaces: Option<String>,
        /// The service's containers of other releases.
        supersedes: Vec<String>,
    },
    /// Counts an exit of the service's task: the restart policy decides
    /// when to start it again, or to give up.
    Exited {
        /// Its installation.
        installation: String,
        /// The service.
        service: String,
        /// The container.
        id: String,
        /// Its exit code when known.
        exit_code: Option<i32>,
    },
    /// Starts the existing container's task, after taking `take_over` over
    /// (a replacement whose core component is not stopped and labelled).
    Start {
        /// Its installation.
        installation: String,
        /// The service.
        service: String,
        /// The container.
        id: String,
        /// After an exit (counts as a restart), or a first start.
        restart: bool,
        /// The core container to stop first.
        take_over: Option<String>,
    },
    /// A running replacement whose core component is not stopped and
    /// labelled: stop and label it.
    TakeOver {
        /// The core container.
        core: String,
        /// The installation replacing it.
        installation: String,
    },
    /// Runs a core component: first stops `stop_first` (its replacement's
    /// task), then, when `restore`, puts its ports back and clears its
    /// label, then starts its task if `start`.
    RunCore {
        /// The core container.
        core: String,
        /// A live replacement task to stop first.
        stop_first: Option<String>,
        /// It was replaced: undo the swap.
        restore: bool,
        /// Its task must be started.
        start: bool,
    },
}

/// The actions of one pass, in order, and when to plan again at the latest
/// (a restart or core start that is not due yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// When a waiting restart becomes due.
    pub wake_at: Option<Instant>,
}

impl Plan {
    fn wake(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    fn phase(&mut self, installation: &str, service: &str, id: &str, phase: Phase, reason: String) {
        self.actions.push(Action::Phase {
            installation: installation.to_owned(),
            service: service.to_owned(),
            id: id.to_owned(),
            phase,
            reason,
        });
    }
}

/// A core component as the planner sees it.
struct CoreView<'a> {
    container: &'a Container,
    is_static: bool,
    replaced_by: Option<&'a str>,
}

impl CoreView<'_> {
    fn replacement_id(&self) -> String {
        replacement_id(&self.container.id)
    }
}

/// The container id of the replacement of core container `core_id`, in
/// release 1.
pub fn replacement_id(core_id: &str) -> String {
    format!("{core_id}.addon")
}

/// The id of a service's container in `release`: release 1 (and 0, from a
/// manager that predates releases) keeps the plain id, so containers made
/// before releases are adopted; later releases get their own, so two can
/// exist side by side while one takes over from the other.
pub fn release_id(base: &str, release: u64) -> String {
    if release <= 1 {
        base.to_owned()
    } else {
        format!("{base}.r{release}")
    }
}

/// Plans one pass.
pub fn plan(input: &Input<'_>) -> Plan {
    let mut plan = Plan::default();
    let mut cores: BTreeMap<&str, CoreView<'_>> = BTreeMap::new();
    let mut addons: BTreeMap<&str, (&Container, &str, &str)> = BTreeMap::new();
    for container in input.containers {
        match &container.role {
            Role::Core {
                name,
                is_static,
                replaced_by,
            } => {
                cores.entry(name.as_str()).or_insert(CoreView {
                    container,
                    is_static: *is_static,
                    replaced_by: replaced_by.as_deref(),
                });
            }
            Role::Addon {
                installation,
                service,
            } => {
                addons.insert(&container.id, (container, installation, service));
            }
        }
    }
    let Some(desired) = input.desired else {
        // Nothing is known to be unwanted yet, and a swap stays as it is:
        // unreplaced static core components are kept running, and a
        // replaced one that someone started beside its running
        // replacement is stopped again.
        for (name, core) in &cores {
            match core.replaced_by {
                None if core.is_static => plan_core_run(input, &mut plan, core, None, false),
                None => {}
                Some(holder) => {
                    let replacement_runs = addons
                        .values()
                        .any(|(c, i, s)| *i == holder && s == name && c.task == Task::Running);
                    if replacement_runs && core.container.task.is_live() {
                        plan.actions.push(Action::TakeOver {
                            core: core.container.id.clone(),
                            installation: holder.to_owned(),
                        });
                    }
                }
            }
        }
        return plan;
    };
    // Which running installation replaces which core component: the
    // manager refuses a second claim, so the first one is the only one.
    let mut claims: HashMap<&str, &Want> = HashMap::new();
    for want in desired.iter().filter(|w| w.running) {
        for service in &want.services {
            if cores.contains_key(service.as_str()) {
                claims.entry(service.as_str()).or_insert(want);
            }
        }
    }
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut removing: BTreeSet<&str> = BTreeSet::new();
    for want in desired {
        for service in &want.services {
            let core = cores.get(service.as_str());
            let base = match core {
                Some(core) => core.replacement_id(),
                None => format!("{}_{service}", input.plane),
            };
            let id = release_id(&base, want.release);
            if !want.running {
                let mut any = false;
                for (container, _, _) in addons.values().filter(|(_, installation, name)| {
                    *installation == want.installation && *name == service
                }) {
                    any = true;
                    removing.insert(&container.id);
                    plan.phase(
                        &want.installation,
                        service,
                        &container.id,
                        Phase::Stopping,
                        "removing".into(),
                    );
                    plan.actions.push(Action::Remove {
                        id: container.id.clone(),
                        installation: Some(want.installation.clone()),
                        service: service.clone(),
                    });
                }
                if !any {
                    plan.phase(
                        &want.installation,
                        service,
                        &id,
                        Phase::Removed,
                        "removed".into(),
                    );
                }
                continue;
            }
            wanted.insert(id.clone());
            if core.is_none() && input.static_cores.contains(service) {
                // A static core component whose container is not created
                // yet (its image may not pull): the service replaces it once
                // it exists, never runs beside it under its id.
                plan.phase(
                    &want.installation,
                    service,
                    &id,
                    Phase::Pending,
                    format!("waiting for core component {id} to be created"),
                );
                continue;
            }
            if let Some(core) = core {
                let holder = claims[service.as_str()];
                if holder.installation != want.installation {
                    plan.phase(
                        &want.installation,
                        service,
                        &id,
                        Phase::Failed,
                        format!(
                            "core component {} is already replaced by installation {}",
                            core.container.id, holder.installation
                        ),
                    );
                    continue;
                }
            }
            let mut existing = addons.get(id.as_str()).map(|(c, _, _)| *c);
            if let Some((container, owner, _)) = addons.get(id.as_str())
                && *owner != want.installation
            {
                // Made for an installation that went while the monitor was
                // away (a service name is free again once its installation
                // is purged): never adopt another installation's container.
                plan.actions.push(Action::Remove {
                    id: container.id.clone(),
                    installation: None,
                    service: service.clone(),
                });
                removing.insert(&container.id);
                existing = None;
            }
            // The service's containers of other releases: kept while the
            // new one is prepared, removed right before it starts.
            let superseded: Vec<&str> = addons
                .iter()
                .filter(|(old, (_, owner, name))| {
                    *owner == want.installation && *name == service && **old != id
                })
                .map(|(old, _)| *old)
                .collect();
            for old in &superseded {
                if existing.is_some() {
                    // The new release's container exists (a monitor stopped
                    // in the middle of a switch): the others go first.
                    plan.actions.push(Action::Remove {
                        id: (*old).to_owned(),
                        installation: None,
                        service: service.clone(),
                    });
                    removing.insert(old);
                } else {
                    wanted.insert((*old).to_owned());
                }
            }
            let memory = input
                .services
                .get(&id)
                .filter(|m| m.installation == want.installation);
            if memory.is_some_and(|m| m.failed) {
                continue;
            }
            let retry_at = memory.and_then(|m| m.retry_at);
            let take_over = core.and_then(|core| {
                (core.replaced_by != Some(want.installation.as_str())
                    || core.container.task.is_live())
                .then(|| core.container.id.clone())
            });
            let Some(container) = existing else {
                match retry_at {
                    Some(at) if at > input.now => plan.wake(at),
                    _ => plan.actions.push(Action::Create {
                        installation: want.installation.clone(),
                        service: service.clone(),
                        id: id.clone(),
                        replaces: core.map(|c| c.container.id.clone()),
                        supersedes: superseded.iter().map(|s| (*s).to_owned()).collect(),
                    }),
                }
                continue;
            };
            let never_started = memory.is_some_and(|m| m.never_started);
            match container.task {
                Task::Running => {
                    if let Some(core) = take_over {
                        // Whatever happened since (a monitor restart in the
                        // middle of a swap, someone starting it), the core
                        // task stops.
                        plan.actions.push(Action::TakeOver {
                            core,
                            installation: want.installation.clone(),
                        });
                    }
                    plan.phase(
                        &want.installation,
                        service,
                        &id,
                        Phase::Running,
                        "running".into(),
                    );
                }
                Task::Created | Task::Absent if never_started && retry_at.is_none() => {
                    plan.actions.push(Action::Start {
                        installation: want.installation.clone(),
                        service: service.clone(),
                        id: id.clone(),
                        restart: false,
                        take_over,
                    });
                }
                Task::Created | Task::Absent | Task::Exited(_) => match retry_at {
                    None => plan.actions.push(Action::Exited {
                        installation: want.installation.clone(),
                        service: service.clone(),
                        id: id.clone(),
                        exit_code: match container.task {
                            Task::Exited(code) => code,
                            _ => None,
                        },
                    }),
                    Some(at) if at <= input.now => plan.actions.push(Action::Start {
                        installation: want.installation.clone(),
                        service: service.clone(),
                        id: id.clone(),
                        restart: true,
                        take_over,
                    }),
                    Some(at) => plan.wake(at),
                },
            }
        }
    }
    // Orphans: addon containers that no desired installation wants.
    for (id, (_, _, service)) in &addons {
        if !wanted.contains(*id) && !removing.contains(id) {
            plan.actions.push(Action::Remove {
                id: (*id).to_owned(),
                installation: None,
                service: (*service).to_owned(),
            });
        }
    }
    // Core components no running replacement holds come back.
    for (name, core) in &cores {
        let holder = claims.get(name);
        if let Some(holder) = holder {
            let replacement = release_id(&core.replacement_id(), holder.release);
            let failed = input
                .services
                .get(&replacement)
                .is_some_and(|m| m.installation == holder.installation && m.failed);
            if !failed || holder.keep_core_stopped {
                continue;
            }
        }
        if !core.is_static && core.replaced_by.is_none() {
            // Someone else's container, never swapped by the monitor.
            continue;
        }
        let stop_first = addons
            .values()
            .find(|(c, _, service)| service == name && c.task.is_live())
            .map(|(c, _, _)| c.id.clone());
        plan_core_run(
            input,
            &mut plan,
            core,
            stop_first,
            core.replaced_by.is_some(),
        );
    }
    plan
}

/// Keeps a core component running: starts it unless it runs or waits for
/// its backoff, and undoes its swap first when `restore`.
fn plan_core_run(
    input: &Input<'_>,
    plan: &mut Plan,
    core: &CoreView<'_>,
    stop_first: Option<String>,
    restore: bool,
) {
    let start = match core.container.task {
        Task::Running => false,
        Task::Created => true,
        Task::Absent | Task::Exited(_) => match input
            .cores
            .get(&core.container.id)
            .and_then(|m| m.next_start)
        {
            Some(at) if at > input.now => {
                plan.wake(at);
                false
            }
            _ => true,
        },
    };
    if start || restore || stop_first.is_some() {
        plan.actions.push(Action::RunCore {
            core: core.container.id.clone(),
            stop_first,
            restore,
            start,
        });
    }
}

#[cfg(test)]
mod tests;
