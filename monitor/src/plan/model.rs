//! What the planner takes: the node's containers and their tasks, the
//! desired installations, and what the monitor remembers between passes.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use crate::runtime::TaskState;

/// A container's task, as the planner needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// No task.
    Absent,
    /// Created, not started.
    Created,
    /// Running (or paused).
    Running,
    /// Exited, with its code when known.
    Exited(Option<i32>),
}

impl Task {
    /// Whether the process exists and may run: running, paused or created.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Running | Self::Created)
    }
}

impl From<TaskState> for Task {
    fn from(state: TaskState) -> Self {
        match state {
            TaskState::Absent => Self::Absent,
            TaskState::Created => Self::Created,
            TaskState::Running(_) | TaskState::Paused => Self::Running,
            TaskState::Stopped(code) => Self::Exited(i32::try_from(code).ok()),
        }
    }
}

/// What a container is to the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// One of the monitor's addon containers.
    Addon {
        /// The installation it was made for.
        installation: String,
        /// Its service.
        service: String,
    },
    /// A core component.
    Core {
        /// Its name, which a replacing service has.
        name: String,
        /// The monitor runs it from the static file.
        is_static: bool,
        /// The installation replacing it, as its label says.
        replaced_by: Option<String>,
    },
}

/// A container the monitor sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Its id.
    pub id: String,
    /// What it is.
    pub role: Role,
    /// Its task.
    pub task: Task,
}

/// One installation of the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// Its id.
    pub installation: String,
    /// Whether its services must run (else be removed).
    pub running: bool,
    /// Leave a replaced core component stopped when the replacement fails.
    pub keep_core_stopped: bool,
    /// The installation release to run; its containers' ids carry it.
    pub release: u64,
    /// Its services' names.
    pub services: Vec<String>,
}

/// What the monitor remembers of an addon container between passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceMemory {
    /// The installation the memory is about.
    pub installation: String,
    /// Given up on: it is not started again.
    pub failed: bool,
    /// A failure was counted; the next attempt is due at this time.
    pub retry_at: Option<Instant>,
    /// Prepared and never started (a monitor restart in the middle of a
    /// start): starting it is not a restart.
    pub never_started: bool,
}

/// What the monitor remembers of a core component it keeps running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreMemory {
    /// It exited after its last start; the next start is due at this time.
    pub next_start: Option<Instant>,
}

/// Everything the planner looks at.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// `root` or `cluster`: an addon container's id is `<plane>_<service>`.
    pub plane: &'a str,
    /// The desired state; `None` until the first one arrives.
    pub desired: Option<&'a [Want]>,
    /// The monitor's addon containers and the core components.
    pub containers: &'a [Container],
    /// Memory per addon container id.
    pub services: &'a HashMap<String, ServiceMemory>,
    /// Memory per core container id.
    pub cores: &'a HashMap<String, CoreMemory>,
    /// Names in the static core-components file.
    pub static_cores: &'a BTreeSet<String>,
    /// The time of the pass.
    pub now: Instant,
}
