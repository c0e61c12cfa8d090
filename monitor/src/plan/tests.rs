//! Tests of the planner: one unit test per decision, then a model of a
//! node (one static core component, its replacement, the reconciler's
//! executor with failing runtime calls) driven by property tests. Over 500
//! lines because the model and the unit tests share their helpers; it is
//! test code only.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

const CORE: &str = "root_scheduler";
const REPLACEMENT: &str = "root_scheduler.addon";

fn core(task: Task, replaced_by: Option<&str>) -> Container {
    Container {
        id: CORE.into(),
        role: Role::Core {
            name: "scheduler".into(),
            is_static: true,
            replaced_by: replaced_by.map(str::to_owned),
        },
        task,
    }
}

fn addon(id: &str, installation: &str, service: &str, task: Task) -> Container {
    Container {
        id: id.into(),
        role: Role::Addon {
            installation: installation.into(),
            service: service.into(),
        },
        task,
    }
}

fn want(installation: &str, services: &[&str]) -> Want {
    Want {
        installation: installation.into(),
        running: true,
        keep_core_stopped: false,
        release: 1,
        services: services.iter().map(|s| (*s).to_owned()).collect(),
    }
}

struct Case {
    desired: Option<Vec<Want>>,
    containers: Vec<Container>,
    services: HashMap<String, ServiceMemory>,
    cores: HashMap<String, CoreMemory>,
    static_cores: BTreeSet<String>,
    now: Instant,
}

impl Case {
    fn new(desired: Option<Vec<Want>>, containers: Vec<Container>) -> Self {
        Self {
            desired,
            containers,
            services: HashMap::new(),
            cores: HashMap::new(),
            static_cores: BTreeSet::from(["scheduler".to_owned()]),
            now: Instant::now(),
        }
    }

    fn memory(mut self, id: &str, memory: ServiceMemory) -> Self {
        self.services.insert(id.into(), memory);
        self
    }

    fn plan(&self) -> Plan {
        plan(&Input {
            plane: "root",
            desired: self.desired.as_deref(),
            containers: &self.containers,
            services: &self.services,
            cores: &self.cores,
            static_cores: &self.static_cores,
            now: self.now,
        })
    }

    /// The actions that call the runtime.
    fn steps(&self) -> Vec<Action> {
        self.plan()
            .actions
            .into_iter()
            .filter(|a| !matches!(a, Action::Phase { .. }))
            .collect()
    }
}

fn run_core(stop_first: Option<&str>, restore: bool, start: bool) -> Action {
    Action::RunCore {
        core: CORE.into(),
        stop_first: stop_first.map(str::to_owned),
        restore,
        start,
    }
}

#[test]
fn before_the_first_desired_state_a_replaced_core_stays_as_it_is() {
    let case = Case::new(
        None,
        vec![
            core(Task::Absent, Some("i1")),
            addon(REPLACEMENT, "i1", "scheduler", Task::Exited(Some(1))),
            addon("root_other", "i9", "other", Task::Exited(Some(1))),
        ],
    );
    assert_eq!(case.steps(), []);
    // An unreplaced static core component is kept running.
    let case = Case::new(None, vec![core(Task::Exited(Some(1)), None)]);
    assert_eq!(case.steps(), [run_core(None, false, true)]);
}

#[test]
fn a_claim_creates_the_replacement_which_takes_the_core_over() {
    let case = Case::new(
        Some(vec![want("i1", &["scheduler", "helper"])]),
        vec![core(Task::Running, None)],
    );
    assert_eq!(
        case.steps(),
        [
            Action::Create {
                installation: "i1".into(),
                service: "scheduler".into(),
                id: REPLACEMENT.into(),
                replaces: Some(CORE.into()),
                supersedes: Vec::new(),
            },
            Action::Create {
                installation: "i1".into(),
                service: "helper".into(),
                id: "root_helper".into(),
                replaces: None,
                supersedes: Vec::new(),
            },
        ]
    );
}

#[test]
fn a_core_started_behind_a_running_replacement_is_taken_over_again() {
    let case = Case::new(
        Some(vec![want("i1", &["scheduler"])]),
        vec![
            core(Task::Running, Some("i1")),
            addon(REPLACEMENT, "i1", "scheduler", Task::Running),
        ],
    );
    assert_eq!(
        case.steps(),
        [Action::TakeOver {
            core: CORE.into(),
            installation: "i1".into(),
        }]
    );
}

#[test]
fn a_replacement_given_up_on_gives_the_core_back_unless_kept_stopped() {
    let failed = ServiceMemory {
        installation: "i1".into(),
        failed: true,
        ..Default::default()
    };
    let containers = vec![
        core(Task::Absent, Some("i1")),
        addon(REPLACEMENT, "i1", "scheduler", Task::Exited(Some(3))),
    ];
    let case = Case::new(Some(vec![want("i1", &["scheduler"])]), containers.clone())
        .memory(REPLACEMENT, failed.clone());
    assert_eq!(case.steps(), [run_core(None, true, true)]);
    let mut kept = want("i1", &["scheduler"]);
    kept.keep_core_stopped = true;
    let case = Case::new(Some(vec![kept]), containers).memory(REPLACEMENT, failed);
    assert_eq!(case.steps(), []);
}

#[test]
fn uninstalling_a_replacement_removes_it_before_the_core_comes_back() {
    let mut gone = want("i1", &["scheduler"]);
    gone.running = false;
    let case = Case::new(
        Some(vec![gone]),
        vec![
            core(Task::Absent, Some("i1")),
            addon(REPLACEMENT, "i1", "scheduler", Task::Running),
        ],
    );
    assert_eq!(
        case.steps(),
        [
            Action::Remove {
                id: REPLACEMENT.into(),
                installation: Some("i1".into()),
                service: "scheduler".into(),
            },
            run_core(Some(REPLACEMENT), true, true),
        ]
    );
}

#[test]
fn a_second_claim_on_a_core_fails_and_touches_nothing() {
    let case = Case::new(
        Some(vec![want("i1", &["scheduler"]), want("i2", &["scheduler"])]),
        vec![
            core(Task::Absent, Some("i1")),
            addon(REPLACEMENT, "i1", "scheduler", Task::Running),
        ],
    );
    let plan = case.plan();
    assert!(plan.actions.contains(&Action::Phase {
        installation: "i2".into(),
        service: "scheduler".into(),
        id: REPLACEMENT.into(),
        phase: Phase::Failed,
        reason: format!("core component {CORE} is already replaced by installation i1"),
    }));
    assert_eq!(case.steps(), []);
}

#[test]
fn exits_are_counted_once_then_restarted_when_due() {
    let containers = vec![addon("root_web", "i1", "web", Task::Exited(Some(3)))];
    let desired = Some(vec![want("i1", &["web"])]);
    let case = Case::new(desired.clone(), containers.clone());
    assert_eq!(
        case.steps(),
        [Action::Exited {
            installation: "i1".into(),
            service: "web".into(),
            id: "root_web".into(),
            exit_code: Some(3),
        }]
    );
    let now = Instant::now();
    let waiting = |at| ServiceMemory {
        installation: "i1".into(),
        retry_at: Some(at),
        ..Default::default()
    };
    let mut case = Case::new(desired.clone(), containers.clone())
        .memory("root_web", waiting(now + Duration::from_secs(5)));
    case.now = now;
    assert_eq!(case.steps(), []);
    assert_eq!(case.plan().wake_at, Some(now + Duration::from_secs(5)));
    case.now = now + Duration::from_secs(5);
    assert_eq!(
        case.steps(),
        [Action::Start {
            installation: "i1".into(),
            service: "web".into(),
            id: "root_web".into(),
            restart: true,
            take_over: None,
        }]
    );
}

#[test]
fn a_prepared_container_that_never_started_is_started_not_counted() {
    let case = Case::new(
        Some(vec![want("i1", &["scheduler"])]),
        vec![
            core(Task::Running, None),
            addon(REPLACEMENT, "i1", "scheduler", Task::Created),
        ],
    )
    .memory(
        REPLACEMENT,
        ServiceMemory {
            installation: "i1".into(),
            never_started: true,
            ..Default::default()
        },
    );
    assert_eq!(
        case.steps(),
        [Action::Start {
            installation: "i1".into(),
            service: "scheduler".into(),
            id: REPLACEMENT.into(),
            restart: false,
            take_over: Some(CORE.into()),
        }]
    );
}

#[test]
fn removes_orphans_and_other_installations_containers() {
    let case = Case::new(
        Some(vec![want("i2", &["web"])]),
        vec![
            addon("root_web", "i1", "web", Task::Running),
            addon("root_old", "i0", "old", Task::Running),
        ],
    );
    assert_eq!(
        case.steps(),
        [
            Action::Remove {
                id: "root_web".into(),
                installation: None,
                service: "web".into(),
            },
            Action::Create {
                installation: "i2".into(),
                service: "web".into(),
                id: "root_web".into(),
                replaces: None,
                supersedes: Vec::new(),
            },
            Action::Remove {
                id: "root_old".into(),
                installation: None,
                service: "old".into(),
            },
        ]
    );
}

#[test]
fn waits_for_a_static_core_that_is_not_created_and_leaves_foreign_cores_alone() {
    let case = Case::new(Some(vec![want("i1", &["scheduler"])]), Vec::new());
    let plan = case.plan();
    assert!(matches!(
        plan.actions.as_slice(),
        [Action::Phase {
            phase: Phase::Pending,
            ..
        }]
    ));
    let mut foreign = core(Task::Exited(Some(0)), None);
    foreign.role = Role::Core {
        name: "api".into(),
        is_static: false,
        replaced_by: None,
    };
    let case = Case::new(Some(Vec::new()), vec![foreign]);
    assert_eq!(case.steps(), []);
}

#[test]
fn a_core_that_keeps_exiting_waits_for_its_backoff() {
    let now = Instant::now();
    let mut case = Case::new(Some(Vec::new()), vec![core(Task::Exited(Some(1)), None)]);
    case.now = now;
    case.cores.insert(
        CORE.into(),
        CoreMemory {
            next_start: Some(now + Duration::from_secs(2)),
        },
    );
    assert_eq!(case.steps(), []);
    assert_eq!(case.plan().wake_at, Some(now + Duration::from_secs(2)));
}

// A model of one node with one static core component, run by the planner
// and a model of the reconciler's executor, with failures injected into
// runtime calls.

const MAX_FAILURES: usize = 3;

#[derive(Debug, Clone)]
enum Event {
    /// A new desired state: running claims (installation number, keep the
    /// core stopped) in order, and one being removed.
    Desire(Vec<(u8, bool)>, Option<u8>),
    ExitCore,
    ExitReplacement,
    /// Someone outside the monitor starts the core component's task.
    OutsideStartCore,
    /// Runs a pass; each runtime call fails when its flag says so.
    Pass(Vec<bool>),
    Advance(u64),
    RestartMonitor,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => (
            proptest::collection::vec((0_u8..3, any::<bool>()), 0..3),
            proptest::option::of(0_u8..3)
        )
            .prop_map(|(claims, removing)| Event::Desire(claims, removing)),
        1 => Just(Event::ExitCore),
        4 => Just(Event::ExitReplacement),
        1 => Just(Event::OutsideStartCore),
        6 => proptest::collection::vec(proptest::bool::weighted(0.15), 0..8).prop_map(Event::Pass),
        3 => (0_u64..20_000).prop_map(Event::Advance),
        1 => Just(Event::RestartMonitor),
    ]
}

#[derive(Debug)]
struct Node {
    core_task: Task,
    replaced_by: Option<String>,
    /// The replacement: its installation and task.
    replacement: Option<(String, Task)>,
    /// What the reconciler remembers (persisted: it survives restarts).
    services: HashMap<String, ServiceMemory>,
    failures: HashMap<(String, String), usize>,
    cores: HashMap<String, CoreMemory>,
    desired: Option<Vec<Want>>,
    /// The last desired state the manager sent (the link resends it).
    last_desired: Vec<Want>,
    now: Instant,
}

impl Node {
    fn new() -> Self {
        Self {
            core_task: Task::Running,
            replaced_by: None,
            replacement: None,
            services: HashMap::new(),
            failures: HashMap::new(),
            cores: HashMap::new(),
            desired: None,
            last_desired: Vec::new(),
            now: Instant::now(),
        }
    }

    fn containers(&self) -> Vec<Container> {
        let mut containers = vec![core(self.core_task, self.replaced_by.as_deref())];
        if let Some((installation, task)) = &self.replacement {
            containers.push(addon(REPLACEMENT, installation, "scheduler", *task));
        }
        containers
    }

    fn both_running(&self) -> bool {
        self.core_task == Task::Running && matches!(self.replacement, Some((_, Task::Running)))
    }

    fn pass(&mut self, failures: &[bool]) {
        let containers = self.containers();
        let static_cores = BTreeSet::from(["scheduler".to_owned()]);
        let plan = plan(&Input {
            plane: "root",
            desired: self.desired.as_deref(),
            containers: &containers,
            services: &self.services,
            cores: &self.cores,
            static_cores: &static_cores,
            now: self.now,
        });
        let mut failures = failures.iter().copied();
        let mut fails = move || failures.next().unwrap_or(false);
        for action in plan.actions {
            let before = self.both_running();
            let shown = format!("{action:?}");
            self.execute(action, &mut fails);
            // The monitor never starts one while the other runs.
            assert!(
                before || !self.both_running(),
                "{shown} left core and replacement both running: {self:?}"
            );
        }
    }

    fn count_failure(&mut self, id: &str, installation: &str) {
        let count = self
            .failures
            .entry((id.to_owned(), installation.to_owned()))
            .or_default();
        *count += 1;
        let count = *count;
        let now = self.now;
        let memory = self.services.entry(id.to_owned()).or_default();
        if memory.installation != installation {
            // Memory is about one installation's service.
            *memory = ServiceMemory::default();
        }
        memory.installation = installation.to_owned();
        memory.never_started = false;
        if count > MAX_FAILURES {
            memory.failed = true;
            memory.retry_at = None;
        } else {
            memory.retry_at = Some(now + Duration::from_secs(1 << count));
        }
    }

    fn take_over(&mut self, installation: &str, fails: &mut impl FnMut() -> bool) -> bool {
        if fails() {
            return false;
        }
        self.replaced_by = Some(installation.to_owned());
        if fails() {
            // Labelled, but the core task did not stop.
            return false;
        }
        self.core_task = Task::Absent;
        true
    }

    fn execute(&mut self, action: Action, fails: &mut impl FnMut() -> bool) {
        match action {
            Action::Phase { .. } => {}
            Action::Remove { id, .. } => {
                if id == REPLACEMENT && !fails() {
                    self.replacement = None;
                }
            }
            Action::Create {
                installation,
                id,
                replaces,
                ..
            } => {
                if fails() {
                    self.count_failure(&id, &installation);
                    return;
                }
                self.replacement = Some((installation.clone(), Task::Created));
                let earlier = self
                    .services
                    .get(&id)
                    .filter(|m| m.installation == installation)
                    .cloned()
                    .unwrap_or_default();
                self.services.insert(
                    id.clone(),
                    ServiceMemory {
                        installation: installation.clone(),
                        never_started: true,
                        ..earlier
                    },
                );
                if replaces.is_some() && !self.take_over(&installation, fails) {
                    // The reconciler removes what it prepared.
                    self.replacement = None;
                    self.count_failure(&id, &installation);
                    return;
                }
                self.start_replacement(&id, &installation);
            }
            Action::Start {
                installation,
                id,
                take_over,
                ..
            } => {
                if take_over.is_some() && !self.take_over(&installation, fails) {
                    self.count_failure(&id, &installation);
                    return;
                }
                if fails() {
                    self.count_failure(&id, &installation);
                    return;
                }
                self.start_replacement(&id, &installation);
            }
            Action::Exited {
                installation, id, ..
            } => self.count_failure(&id, &installation),
            Action::TakeOver { installation, .. } => {
                self.take_over(&installation, fails);
            }
            Action::RunCore {
                stop_first,
                restore,
                start,
                ..
            } => {
                let holder = self.desired.iter().flatten().find(|w| w.running).cloned();
                if let Some(holder) = holder
                    && holder.keep_core_stopped
                {
                    assert!(
                        !restore,
                        "restored a core component its failed replacement keeps stopped: {self:?}"
                    );
                }
                if stop_first.is_some() {
                    if fails() {
                        return;
                    }
                    if let Some((_, task)) = &mut self.replacement {
                        *task = Task::Absent;
                    }
                }
                if restore {
                    if fails() {
                        return;
                    }
                    self.replaced_by = None;
                }
                if start && !fails() {
                    self.core_task = Task::Running;
                    self.cores.insert(
                        CORE.into(),
                        CoreMemory {
                            next_start: Some(self.now + Duration::from_secs(1)),
                        },
                    );
                }
            }
        }
    }

    fn start_replacement(&mut self, id: &str, installation: &str) {
        if let Some((_, task)) = &mut self.replacement {
            *task = Task::Running;
        }
        let memory = self.services.entry(id.to_owned()).or_default();
        if memory.installation != installation {
            *memory = ServiceMemory::default();
        }
        memory.installation = installation.to_owned();
        memory.retry_at = None;
        memory.never_started = false;
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Desire(claims, removing) => {
                let mut wants: Vec<Want> = Vec::new();
                for (n, keep) in claims {
                    let installation = format!("i{n}");
                    if wants.iter().all(|w| w.installation != installation) {
                        let mut w = want(&installation, &["scheduler"]);
                        w.keep_core_stopped = keep;
                        wants.push(w);
                    }
                }
                if let Some(n) = removing {
                    let installation = format!("i{n}");
                    if wants.iter().all(|w| w.installation != installation) {
                        let mut w = want(&installation, &["scheduler"]);
                        w.running = false;
                        wants.push(w);
                    }
                }
                self.last_desired = wants.clone();
                self.desired = Some(wants);
            }
            Event::ExitCore => {
                if self.core_task == Task::Running {
                    self.core_task = Task::Exited(Some(1));
                }
            }
            Event::ExitReplacement => {
                if let Some((_, task @ Task::Running)) = &mut self.replacement {
                    *task = Task::Exited(Some(3));
                }
            }
            Event::OutsideStartCore => self.core_task = Task::Running,
            Event::Pass(failures) => {
                self.pass(&failures);
                // Whatever someone else did, a pass with no failing call
                // leaves them not both running.
                if failures.iter().all(|f| !f) {
                    assert!(!self.both_running(), "both run after a pass: {self:?}");
                }
            }
            Event::Advance(ms) => self.now += Duration::from_millis(ms),
            Event::RestartMonitor => {
                // Core backoff lives in memory only; the desired state comes
                // back with the next link.
                self.cores.clear();
                self.desired = None;
            }
        }
    }

    /// Lets the node settle with no more exits and no failing calls, then
    /// checks that exactly what should run runs.
    fn settle_and_check(&mut self) {
        if self.desired.is_none() {
            self.desired = Some(self.last_desired.clone());
        }
        for _ in 0..12 {
            self.now += Duration::from_secs(100);
            self.pass(&[]);
        }
        let desired = self.desired.clone().unwrap_or_default();
        let holder = desired.iter().find(|w| w.running);
        let failed = holder.is_some_and(|h| {
            self.services
                .get(REPLACEMENT)
                .is_some_and(|m| m.installation == h.installation && m.failed)
        });
        let replacement_runs = matches!(&self.replacement, Some((i, Task::Running)) if Some(i) == holder.map(|h| &h.installation));
        let core_runs = self.core_task == Task::Running;
        match holder {
            Some(_) if !failed => assert!(
                replacement_runs && !core_runs,
                "the replacement should run alone: {self:?}"
            ),
            // The core component stays as the failure left it: stopped if
            // it was replaced (checked at every restore), else running.
            Some(h) if h.keep_core_stopped => assert!(
                !replacement_runs,
                "the failed replacement should stay stopped: {self:?}"
            ),
            _ => assert!(
                core_runs
                    && self
                        .replacement
                        .as_ref()
                        .is_none_or(|(_, t)| *t != Task::Running),
                "the core component should run alone: {self:?}"
            ),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// For any sequence of desired states, task exits, failing runtime
    /// calls and monitor restarts, a core component and its replacement
    /// never both run, and once things calm down exactly the one that
    /// should run does.
    #[test]
    fn core_and_replacement_never_both_run_and_never_both_stay_stopped(
        events in proptest::collection::vec(event(), 1..80)
    ) {
        let mut node = Node::new();
        for event in events {
            node.apply(event);
        }
        node.settle_and_check();
    }
}

fn release(mut want: Want, release: u64) -> Want {
    want.release = release;
    want
}

#[test]
fn a_new_release_is_prepared_before_the_old_one_goes() {
    let case = Case::new(
        Some(vec![release(want("i1", &["web"]), 2)]),
        vec![addon("root_web", "i1", "web", Task::Running)],
    );
    assert_eq!(
        case.steps(),
        [Action::Create {
            installation: "i1".into(),
            service: "web".into(),
            id: "root_web.r2".into(),
            replaces: None,
            supersedes: vec!["root_web".into()],
        }],
        "the old container is not removed as an orphan"
    );
    // Back to release 1 (a rollback): the plain id again.
    let case = Case::new(
        Some(vec![want("i1", &["web"])]),
        vec![addon("root_web.r2", "i1", "web", Task::Running)],
    );
    assert_eq!(
        case.steps(),
        [Action::Create {
            installation: "i1".into(),
            service: "web".into(),
            id: "root_web".into(),
            replaces: None,
            supersedes: vec!["root_web.r2".into()],
        }]
    );
}

#[test]
fn a_plugin_goes_from_release_to_release_never_through_the_core() {
    let case = Case::new(
        Some(vec![release(want("i1", &["scheduler"]), 3)]),
        vec![
            core(Task::Absent, Some("i1")),
            addon(REPLACEMENT, "i1", "scheduler", Task::Running),
        ],
    );
    let steps = case.steps();
    assert_eq!(
        steps,
        [Action::Create {
            installation: "i1".into(),
            service: "scheduler".into(),
            id: format!("{REPLACEMENT}.r3"),
            replaces: Some(CORE.into()),
            supersedes: vec![REPLACEMENT.into()],
        }],
    );
    assert!(
        !steps.iter().any(|a| matches!(a, Action::RunCore { .. })),
        "the core component stays stopped"
    );
    // The new release failed for good: the core component comes back, the
    // old release's container stopped first.
    let case = Case::new(
        Some(vec![release(want("i1", &["scheduler"]), 3)]),
        vec![
            core(Task::Absent, Some("i1")),
            addon(
                &format!("{REPLACEMENT}.r3"),
                "i1",
                "scheduler",
                Task::Exited(Some(1)),
            ),
        ],
    )
    .memory(
        &format!("{REPLACEMENT}.r3"),
        ServiceMemory {
            installation: "i1".into(),
            failed: true,
            ..ServiceMemory::default()
        },
    );
    assert_eq!(case.steps(), [run_core(None, true, true)]);
}

#[test]
fn after_a_crash_mid_switch_the_old_release_goes_first() {
    let case = Case::new(
        Some(vec![release(want("i1", &["web"]), 2)]),
        vec![
            addon("root_web", "i1", "web", Task::Running),
            addon("root_web.r2", "i1", "web", Task::Created),
        ],
    )
    .memory(
        "root_web.r2",
        ServiceMemory {
            installation: "i1".into(),
            never_started: true,
            ..ServiceMemory::default()
        },
    );
    assert_eq!(
        case.steps(),
        [
            Action::Remove {
                id: "root_web".into(),
                installation: None,
                service: "web".into(),
            },
            Action::Start {
                installation: "i1".into(),
                service: "web".into(),
                id: "root_web.r2".into(),
                restart: false,
                take_over: None,
            },
        ]
    );
}
