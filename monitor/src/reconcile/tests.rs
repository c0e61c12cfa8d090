//! The reconciler's passes against a recording fake runtime and network:
//! one failing object never stops the others, a stalled pull delays no
//! restart, and every failure says which part failed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::{Duration, Instant},
};

use oakestra_addons_proto::engine::v1::{self as pb, DesiredPresence, ServicePhase};
use tokio::sync::watch;

use super::{ReconcileOptions, Reconciler};
use crate::view::NodeView;
use crate::{
    cores::CoreComponentSpec,
    labels::{
        CORE_COMPONENT, CORE_SOURCE, CORE_SOURCE_STATIC, CORE_SPEC_HASH, GIVEN_UP, INSTALLATION,
        MANAGED_BY, MANAGED_BY_VALUE, REPLACED_BY, REPLACES, SERVICE,
    },
    link::ReportOutbox,
    network::{Network, NetworkError, NetworkOptions, PortMapping},
    restarts::RestartPolicy,
    runtime::{
        ContainerInfo, ImageConfig, NewContainer, PulledImage, RegistryAccess, Runtime,
        RuntimeError, TaskState,
    },
};

#[derive(Debug, Clone)]
struct FakeContainer {
    image: String,
    labels: HashMap<String, String>,
    task: TaskState,
}

#[derive(Debug, Default)]
struct World {
    containers: BTreeMap<String, FakeContainer>,
    /// Every runtime and network call, as `op id`.
    calls: Vec<String>,
    /// Calls (`op id`) that fail.
    failing: Vec<String>,
    /// Images that pull; any other pull waits until `Fake::add_image`
    /// makes it one.
    images: Vec<String>,
    /// Containers with networks attached.
    attached: BTreeSet<String>,
}

/// A runtime and a network over one recorded world.
#[derive(Debug, Clone, Default)]
struct Fake {
    world: Arc<Mutex<World>>,
    /// Woken when an image is added.
    images_added: Arc<tokio::sync::Notify>,
}

impl Fake {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `image` one that pulls, ending the pulls that wait for it.
    fn add_image(&self, image: &str) {
        self.world().images.push(image.to_owned());
        self.images_added.notify_waiters();
    }

    fn call(&self, op: &str, id: &str) -> Result<(), RuntimeError> {
        let name = format!("{op} {id}");
        let mut world = self.world();
        world.calls.push(name.clone());
        if world.failing.contains(&name) {
            return Err(RuntimeError::Call {
                call: "fake",
                status: tonic::Status::internal(format!("{name} fails")),
            });
        }
        Ok(())
    }

    fn set_task(&self, id: &str, task: TaskState) {
        if let Some(container) = self.world().containers.get_mut(id) {
            container.task = task;
        }
    }

    fn task(&self, id: &str) -> Option<TaskState> {
        self.world().containers.get(id).map(|c| c.task)
    }

    fn add(&self, id: &str, labels: &[(&str, &str)], task: TaskState) {
        self.world().containers.insert(
            id.to_owned(),
            FakeContainer {
                image: "img".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                task,
            },
        );
    }
}

impl Runtime for Fake {
    fn namespace(&self) -> &str {
        "test"
    }

    async fn list_containers(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(self
            .world()
            .containers
            .iter()
            .map(|(id, c)| ContainerInfo {
                id: id.clone(),
                image: c.image.clone(),
                labels: c.labels.clone(),
                spec: None,
            })
            .collect())
    }

    async fn task_state(&self, id: &str) -> Result<TaskState, RuntimeError> {
        Ok(self.task(id).unwrap_or(TaskState::Absent))
    }

    async fn task_states(
        &self,
    ) -> Result<std::collections::HashMap<String, TaskState>, RuntimeError> {
        Ok(self
            .world()
            .containers
            .iter()
            .filter(|(_, c)| c.task != TaskState::Absent)
            .map(|(id, c)| (id.clone(), c.task))
            .collect())
    }

    async fn pull(
        &self,
        image: &str,
        _registry: &RegistryAccess,
        _progress: Arc<AtomicU64>,
    ) -> Result<PulledImage, RuntimeError> {
        self.call("pull", image)?;
        loop {
            // Registered before the check, so an image added in between
            // still wakes it.
            let added = self.images_added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            if self.world().images.iter().any(|i| i == image) {
                break;
            }
            added.await;
        }
        Ok(PulledImage {
            name: image.to_owned(),
            top_snapshot: "sha256:top".into(),
            config: ImageConfig {
                cmd: vec!["/bin/run".into()],
                ..ImageConfig::default()
            },
            bytes_pulled: 1,
        })
    }

    async fn create_container(
        &self,
        NewContainer {
            id, image, labels, ..
        }: NewContainer<'_>,
    ) -> Result<(), RuntimeError> {
        self.call("create", id)?;
        self.world().containers.insert(
            id.to_owned(),
            FakeContainer {
                image: image.to_owned(),
                labels,
                task: TaskState::Absent,
            },
        );
        Ok(())
    }

    async fn create_task(&self, id: &str, _log: &Path) -> Result<u32, RuntimeError> {
        self.call("create-task", id)?;
        self.set_task(id, TaskState::Created);
        // The test process stands in for the task: its root is the host's.
        Ok(std::process::id())
    }

    async fn start_created_task(&self, id: &str) -> Result<u32, RuntimeError> {
        self.call("start", id)?;
        self.set_task(id, TaskState::Running(1));
        Ok(1)
    }

    async fn delete_task(&self, id: &str) -> Result<(), RuntimeError> {
        self.call("delete-task", id)?;
        self.set_task(id, TaskState::Absent);
        Ok(())
    }

    async fn stop_task(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        self.call("stop", id)?;
        self.set_task(id, TaskState::Absent);
        Ok(())
    }

    async fn remove_container(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        self.call("remove", id)?;
        self.world().containers.remove(id);
        Ok(())
    }

    async fn exec(
        &self,
        id: &str,
        _exec_id: &str,
        _args: &[String],
        _timeout: Duration,
    ) -> Result<u32, RuntimeError> {
        self.call("exec", id)?;
        Ok(0)
    }

    async fn set_label(
        &self,
        id: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), RuntimeError> {
        self.call("label", id)?;
        if let Some(container) = self.world().containers.get_mut(id) {
            match value {
                Some(value) => container.labels.insert(key.to_owned(), value.to_owned()),
                None => container.labels.remove(key),
            };
        }
        Ok(())
    }
}

impl Network for Fake {
    fn netns_path(&self, id: &str) -> Result<PathBuf, crate::network::NetworkError> {
        Ok(PathBuf::from("/nonexistent/netns").join(id))
    }

    async fn attach(
        &self,
        id: &str,
        networks: &[String],
        _ports: &[PortMapping],
    ) -> Result<Vec<(String, String)>, NetworkError> {
        self.call("attach", id)
            .map_err(|err| NetworkError::Plugin {
                command: "ADD",
                plugin: "bridge".into(),
                container: id.to_owned(),
                network: networks.first().cloned().unwrap_or_default(),
                reason: err.to_string(),
            })?;
        self.world().attached.insert(id.to_owned());
        Ok(Vec::new())
    }

    async fn set_ports(&self, id: &str, _ports: &[PortMapping]) -> Result<(), NetworkError> {
        self.call("ports", id)
            .map_err(|err| NetworkError::State(err.to_string()))
    }

    async fn detach(&self, id: &str) -> Result<(), NetworkError> {
        self.call("detach", id)
            .map_err(|err| NetworkError::State(err.to_string()))?;
        self.world().attached.remove(id);
        Ok(())
    }

    fn addresses(&self, _id: &str) -> Result<Vec<(String, String)>, NetworkError> {
        Ok(Vec::new())
    }

    fn ports(&self, _id: &str) -> Result<Vec<PortMapping>, NetworkError> {
        Ok(Vec::new())
    }

    fn attached(&self) -> Result<Vec<String>, NetworkError> {
        Ok(self.world().attached.iter().cloned().collect())
    }
}

fn scheduler_spec() -> CoreComponentSpec {
    crate::cores::parse("- name: scheduler\n  image: img\n")
        .unwrap()
        .remove(0)
}

fn reconciler(fake: &Fake, state: &Path) -> Reconciler<Fake, Fake> {
    let options = ReconcileOptions {
        plane: "root".into(),
        state_dir: state.to_owned(),
        registry: RegistryAccess::default(),
        pull_timeout: Duration::from_secs(3600),
        resync: Duration::from_secs(10),
        stop_grace: Duration::from_secs(1),
        restart: RestartPolicy {
            backoff: addons_backoff::Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(1),
            ),
            max_failures: 5,
            window: Duration::from_secs(60),
        },
        network: NetworkOptions {
            plugin_dir: "/nonexistent".into(),
            bridge_prefix: "t".into(),
            subnet_prefix: "10.1".into(),
        },
        log_max_bytes: 1 << 20,
        core_components: vec![scheduler_spec()],
        policy: Default::default(),
        trust: None,
        reserved_ports: Vec::new(),
        metrics: crate::metrics::MonitorMetrics::default(),
    };
    let (view, _) = watch::channel(NodeView::default());
    Reconciler::with_network(
        fake.clone(),
        fake.clone(),
        options,
        "node-1".into(),
        ReportOutbox::default(),
        view,
    )
}

/// An installation: its id, presence, and `(service, image)` pairs.
type Installation<'a> = (&'a str, DesiredPresence, Vec<(&'a str, &'a str)>);

fn desired(installations: Vec<Installation<'_>>) -> pb::DesiredState {
    pb::DesiredState {
        generation: 1,
        installations: installations
            .into_iter()
            .map(|(id, presence, services)| pb::DesiredInstallation {
                installation_id: id.into(),
                presence: presence.into(),
                addon: Some(pb::AddonSnapshot {
                    services: services
                        .into_iter()
                        .map(|(name, image)| pb::ServiceSpec {
                            service_name: name.into(),
                            image: image.into(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    }
}

fn addon_labels<'a>(installation: &'a str, service: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (MANAGED_BY, MANAGED_BY_VALUE),
        (INSTALLATION, installation),
        (SERVICE, service),
    ]
}

async fn pass(reconciler: &mut Reconciler<Fake, Fake>, state: &pb::DesiredState) {
    tokio::time::timeout(Duration::from_secs(5), reconciler.pass(Some(state)))
        .await
        .expect("a pass never waits for a pull")
        .expect("the pass completes");
}

/// One container that cannot be removed does not keep a core component
/// from coming back in the same pass.
#[tokio::test]
async fn a_failing_removal_does_not_stop_a_core_restore() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let hash = scheduler_spec().hash();
    fake.add(
        "root_scheduler",
        &[
            (CORE_COMPONENT, "scheduler"),
            (CORE_SOURCE, CORE_SOURCE_STATIC),
            (CORE_SPEC_HASH, &hash),
            (REPLACED_BY, "i1"),
        ],
        TaskState::Absent,
    );
    let mut replacement = addon_labels("i1", "scheduler");
    replacement.push((REPLACES, "root_scheduler"));
    fake.add("root_scheduler.addon", &replacement, TaskState::Running(2));
    fake.add(
        "root_stuck",
        &addon_labels("i0", "stuck"),
        TaskState::Running(3),
    );
    fake.world().failing.push("remove root_stuck".into());
    let mut reconciler = reconciler(&fake, state.path());
    let uninstalled = desired(vec![(
        "i1",
        DesiredPresence::Removed,
        vec![("scheduler", "img")],
    )]);
    pass(&mut reconciler, &uninstalled).await;
    assert_eq!(fake.task("root_scheduler"), Some(TaskState::Running(1)));
    assert!(fake.task("root_scheduler.addon").is_none());
    assert!(fake.task("root_stuck").is_some(), "still there, to retry");
    let world = fake.world();
    assert!(
        !world.containers["root_scheduler"]
            .labels
            .contains_key(REPLACED_BY)
    );
    let at = |call: &str| {
        world
            .calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("no {call}: {:?}", world.calls))
    };
    // Never both running: the replacement's task stops before the core
    // starts. The core's task is made before that stop, and the slower
    // removal of the replacement's container comes after the start.
    let prepared = at("create-task root_scheduler");
    let stopped = at("stop root_scheduler.addon");
    let started = at("start root_scheduler");
    let removed = at("remove root_scheduler.addon");
    assert!(
        prepared < stopped && stopped < started && started < removed,
        "{:?}",
        world.calls
    );
}

/// A pull that never ends holds up its own service only: another service
/// is restarted, pass after pass.
#[tokio::test]
async fn a_stalled_pull_delays_no_restart() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.world().images.push("ok".into());
    fake.add(
        "root_api",
        &addon_labels("i1", "api"),
        TaskState::Stopped(1),
    );
    let mut reconciler = reconciler(&fake, state.path());
    let wanted = desired(vec![(
        "i1",
        DesiredPresence::Running,
        vec![("api", "ok"), ("web", "stalls")],
    )]);
    // The exit is counted; the restart is due a millisecond later.
    pass(&mut reconciler, &wanted).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    pass(&mut reconciler, &wanted).await;
    assert_eq!(fake.task("root_api"), Some(TaskState::Running(1)));
    let web = &reconciler.tracked["root_web"].status;
    assert_eq!(web.phase(), ServicePhase::Pulling, "{web:?}");
    let api = &reconciler.tracked["root_api"].status;
    assert_eq!((api.phase(), api.restart_count), (ServicePhase::Running, 1));
}

/// An exit counted in a pass has the next pass due at its restart, not at
/// the next resync (10 s here): the pass says when.
#[tokio::test]
async fn a_counted_exit_has_the_next_pass_due_at_its_restart() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.world().images.push("ok".into());
    fake.add(
        "root_api",
        &addon_labels("i1", "api"),
        TaskState::Stopped(1),
    );
    let mut reconciler = reconciler(&fake, state.path());
    let wanted = desired(vec![("i1", DesiredPresence::Running, vec![("api", "ok")])]);
    let wake = reconciler.pass(Some(&wanted)).await.unwrap();
    let api = &reconciler.tracked["root_api"].status;
    assert_eq!(api.phase(), ServicePhase::Backoff, "{api:?}");
    // The policy's delay is 1 ms.
    let wake = wake.expect("the pass names when the restart is due");
    assert!(
        wake <= Instant::now() + Duration::from_millis(1),
        "{wake:?}"
    );
    tokio::time::sleep_until(wake.into()).await;
    pass(&mut reconciler, &wanted).await;
    assert_eq!(fake.task("root_api"), Some(TaskState::Running(1)));
}

/// A service's network is attached while its image pulls, once: the
/// container made when the image is in takes it as it is.
#[tokio::test]
async fn the_network_is_attached_while_the_image_pulls() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut reconciler = reconciler(&fake, state.path());
    let wanted = desired(vec![(
        "i1",
        DesiredPresence::Running,
        vec![("web", "late")],
    )]);
    pass(&mut reconciler, &wanted).await;
    assert_eq!(
        reconciler.tracked["root_web"].status.phase(),
        ServicePhase::Pulling
    );
    assert!(fake.world().attached.contains("root_web"));
    assert!(fake.task("root_web").is_none(), "no container yet");
    // Passes while the pull runs attach nothing more.
    pass(&mut reconciler, &wanted).await;
    fake.add_image("late");
    let image = tokio::time::timeout(Duration::from_secs(5), reconciler.pulls.finished())
        .await
        .unwrap();
    assert_eq!(image, "late");
    pass(&mut reconciler, &wanted).await;
    assert_eq!(fake.task("root_web"), Some(TaskState::Running(1)));
    let world = fake.world();
    let attaches = world
        .calls
        .iter()
        .filter(|c| *c == "attach root_web")
        .count();
    assert_eq!(attaches, 1, "{:?}", world.calls);
    assert!(
        !world.calls.iter().any(|c| c == "detach root_web"),
        "{:?}",
        world.calls
    );
}

/// The network attached for a pull goes when its service is no longer
/// wanted before its container was made; so does one that no container
/// has (a monitor stopped between an attach and the container).
#[tokio::test]
async fn networks_of_no_container_are_taken_down() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.world().attached.insert("root_left".into());
    fake.add(
        "root_kept",
        &addon_labels("i0", "kept"),
        TaskState::Running(2),
    );
    fake.world().attached.insert("root_kept".into());
    fake.world().images.push("ok".into());
    let mut reconciler = reconciler(&fake, state.path());
    let kept = ("i0", DesiredPresence::Running, vec![("kept", "ok")]);
    let wanted = desired(vec![
        kept.clone(),
        ("i1", DesiredPresence::Running, vec![("web", "late")]),
    ]);
    pass(&mut reconciler, &wanted).await;
    {
        let world = fake.world();
        assert!(world.attached.contains("root_web"));
        assert!(!world.attached.contains("root_left"), "{:?}", world.calls);
    }
    let removed = desired(vec![
        kept,
        ("i1", DesiredPresence::Removed, vec![("web", "late")]),
    ]);
    pass(&mut reconciler, &removed).await;
    let world = fake.world();
    assert!(!world.attached.contains("root_web"), "{:?}", world.calls);
    // A container's network stays while the container does.
    assert!(world.attached.contains("root_kept"), "{:?}", world.calls);
}

/// A CNI failure reads as one, not as an image that cannot run, and counts
/// against the restart policy.
#[tokio::test]
async fn failures_say_which_part_failed() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.world().images.push("ok".into());
    fake.world().failing.push("attach root_web".into());
    let mut reconciler = reconciler(&fake, state.path());
    let wanted = desired(vec![("i1", DesiredPresence::Running, vec![("web", "ok")])]);
    // The first pass starts the pull; once it is in, the create fails.
    pass(&mut reconciler, &wanted).await;
    let image = tokio::time::timeout(Duration::from_secs(5), reconciler.pulls.finished())
        .await
        .unwrap();
    assert_eq!(image, "ok");
    pass(&mut reconciler, &wanted).await;
    let web = &reconciler.tracked["root_web"].status;
    assert_eq!(web.phase(), ServicePhase::Backoff, "{web:?}");
    assert!(
        web.reason
            .starts_with("network: CNI ADD of bridge for root_web"),
        "{web:?}"
    );
    assert!(fake.task("root_web").is_none(), "nothing half made is left");
}

/// A service record that does not parse is rebuilt on the safe side: a
/// lost failure history counts the restarts the status shows, and a lost
/// status of a service whose budget is spent stays given up on.
#[tokio::test]
async fn unreadable_records_never_reset_a_service() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut reconciler = reconciler(&fake, state.path());
    let web = reconciler.cx.state.container_dir("root_web").unwrap();
    std::fs::create_dir_all(&web).unwrap();
    let status = pb::ServiceStatus {
        service_name: "web".into(),
        phase: ServicePhase::Backoff.into(),
        restart_count: 5,
        ..Default::default()
    };
    std::fs::write(
        web.join("status.pb"),
        prost::Message::encode_to_vec(&status),
    )
    .unwrap();
    std::fs::write(
        web.join("failures.json"),
        "{\"installation\": \"i1\", \"at\": [1,",
    )
    .unwrap();
    // Five failures counted: the next exit spends the budget of five.
    reconciler.exited("i1", "web", "root_web", Some(1));
    let web = &reconciler.tracked["root_web"].status;
    assert_eq!(web.phase(), ServicePhase::Failed, "{web:?}");

    let api = reconciler.cx.state.container_dir("root_api").unwrap();
    std::fs::create_dir_all(&api).unwrap();
    std::fs::write(api.join("status.pb"), b"\xff\xff\xff").unwrap();
    std::fs::write(
        api.join("failures.json"),
        "{\"installation\": \"i1\", \"at\": [1, 2, 3, 4, 5, 6]}",
    )
    .unwrap();
    let api = reconciler.track("i1", "api", "root_api").memory();
    assert!(api.failed, "{api:?}");
}

/// The node checks what it runs itself: a replacement of a core component
/// that the grants do not cover, or that the node does not allow, is FAILED
/// with the reason before anything is pulled, and the core keeps running.
#[tokio::test]
async fn a_node_refuses_what_was_not_granted_or_is_not_allowed() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let hash = scheduler_spec().hash();
    fake.add(
        "root_scheduler",
        &[
            (CORE_COMPONENT, "scheduler"),
            (CORE_SOURCE, CORE_SOURCE_STATIC),
            (CORE_SPEC_HASH, &hash),
        ],
        TaskState::Running(1),
    );
    fake.world().images.push("img".into());
    let mut reconciler = reconciler(&fake, state.path());
    let mut wanted = desired(vec![(
        "i1",
        DesiredPresence::Running,
        vec![("scheduler", "img")],
    )]);
    pass(&mut reconciler, &wanted).await;
    let status = &reconciler.tracked["root_scheduler.addon"].status;
    assert_eq!(status.phase(), ServicePhase::Failed, "{status:?}");
    assert_eq!(
        status.reason,
        "refused: not granted: core-component=scheduler"
    );
    // Granted, but this node's core-components file does not mark the
    // scheduler replaceable.
    wanted.installations[0].granted_privileges = vec![
        addons_descriptor::Privilege::parse_grant("core-component=scheduler")
            .unwrap()
            .into(),
    ];
    reconciler.tracked.clear();
    pass(&mut reconciler, &wanted).await;
    let status = &reconciler.tracked["root_scheduler.addon"].status;
    assert_eq!(status.phase(), ServicePhase::Failed, "{status:?}");
    assert!(
        status.reason.contains("core_components.replace"),
        "{status:?}"
    );
    assert_eq!(fake.task("root_scheduler"), Some(TaskState::Running(1)));
    assert!(fake.task("root_scheduler.addon").is_none());
    let world = fake.world();
    assert!(
        !world.calls.iter().any(|c| c.starts_with("pull")),
        "nothing pulled for a refused service: {:?}",
        world.calls
    );
}

/// A service given up on while the state dir cannot be written (a full
/// disk) stays given up on: the give-up is labelled on its container in
/// containerd, which a monitor started afresh reads, and its status is
/// saved at the first pass that can.
#[tokio::test]
async fn a_give_up_the_state_dir_cannot_keep_is_kept() {
    let state = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.add(
        "root_web",
        &addon_labels("i1", "web"),
        TaskState::Stopped(3),
    );
    fake.world().images.push("img".into());
    let wanted = desired(vec![("i1", DesiredPresence::Running, vec![("web", "img")])]);
    let mut first = reconciler(&fake, state.path());
    first.track("i1", "web", "root_web");
    // The status file cannot be written: its temporary file's name is
    // taken by a directory.
    let dir = first.cx.state.container_dir("root_web").unwrap();
    let blocker = dir.join(format!("status.pb.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&blocker).unwrap();
    for _ in 0..6 {
        first.exited("i1", "web", "root_web", Some(3));
    }
    assert_eq!(
        first.tracked["root_web"].status.phase(),
        ServicePhase::Failed
    );
    pass(&mut first, &wanted).await;
    assert!(!dir.join("status.pb").exists(), "nothing could be saved");
    let given_up = first.tracked["root_web"].status.clone();
    assert!(
        fake.world().containers["root_web"]
            .labels
            .contains_key(GIVEN_UP)
    );

    // A monitor started afresh, the state dir still without the give-up:
    // the label keeps it, and the service is not started again.
    let mut afresh = reconciler(&fake, state.path());
    pass(&mut afresh, &wanted).await;
    let web = &afresh.tracked["root_web"].status;
    assert_eq!(web.phase(), ServicePhase::Failed, "{web:?}");
    assert_eq!(
        (&web.reason, web.restart_count, web.exit_code),
        (&given_up.reason, given_up.restart_count, Some(3)),
        "reported as it was: {web:?}"
    );
    assert!(
        !fake.world().calls.iter().any(|c| c.starts_with("start")),
        "started again: {:?}",
        fake.world().calls
    );

    // Room again: the first pass saves what could not be saved.
    std::fs::remove_dir(&blocker).unwrap();
    pass(&mut first, &wanted).await;
    let saved = std::fs::read(dir.join("status.pb")).unwrap();
    let saved = <pb::ServiceStatus as prost::Message>::decode(saved.as_slice()).unwrap();
    assert_eq!(saved.phase(), ServicePhase::Failed, "{saved:?}");
}
