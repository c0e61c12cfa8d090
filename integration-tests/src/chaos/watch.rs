//! A watcher of every installation that goes through the whole campaign:
//! each time its stream breaks (the manager killed, paused past a
//! deadline, a connection cut) it watches again from the `sequence` of the
//! last event it got. The invariant: after the cursor, events come in
//! order and none is skipped, so the view built from them alone ends up
//! the manager's list. And from what the events show: a service given up
//! on a node (FAILED) is not started again at the same release there,
//! unless the node left its placement and came back (a relabel); a
//! monitor restarted in between keeps its failure window.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use oakestra_addons_proto::engine::v1::{
    self as pb, ChangeType, addons_manager_service_client::AddonsManagerServiceClient,
};
use tokio_stream::StreamExt as _;

use super::{cluster::Cluster, history::History, workload::list_installations};

/// What the watcher knows.
#[derive(Debug, Default)]
struct State {
    /// Each installation's status and release, from events alone.
    view: BTreeMap<String, (i32, u64)>,
    /// The last event's sequence: where the next watch starts.
    cursor: u64,
    /// How many times it watched again from its cursor.
    resumed: u64,
    /// How many times the manager would not resume and it started over.
    started_over: u64,
    /// Events out of order or repeated, services started after giving up.
    problems: Vec<String>,
    /// When each (installation, node, service, release) was first seen
    /// given up.
    given_up: BTreeMap<(String, String, String, u64), Duration>,
    /// The highest release each installation was seen at.
    highest_release: BTreeMap<String, u64>,
    /// Each service seen given up, or restarted more often than
    /// `--max-failures` allows, as first seen so.
    restarts: Vec<Restarts>,
    /// The services already in `restarts` for too many restarts.
    restarted_too_often: BTreeSet<(String, String, String, u64)>,
}

/// A service on a node as the first event showed it given up, or
/// restarted more often than the monitors' `--max-failures` allows.
#[derive(Debug, Clone)]
pub struct Restarts {
    /// The installation.
    pub installation: String,
    /// The marketplace id of the version it ran.
    pub marketplace_id: String,
    /// The node.
    pub node: String,
    /// The service.
    pub service: String,
    /// Its restarts then.
    pub restart_count: u32,
    /// Whether it was given up.
    pub given_up: bool,
}

impl State {
    /// Checks `installation`'s services against the ones given up.
    fn given_up(&mut self, installation: &pb::Installation, history: &History) {
        use pb::ServicePhase as Phase;
        let now = history.now();
        let highest = self
            .highest_release
            .entry(installation.id.clone())
            .or_default();
        *highest = (*highest).max(installation.release);
        let highest = *highest;
        // Only the newest release the installation was seen at: a node
        // whose trial of a new release failed goes back to the release
        // before, even one it had given up on (RELIABILITY.md, found and
        // left as it is).
        for service in installation
            .services
            .iter()
            .filter(|s| s.release == installation.release && s.release == highest)
        {
            let key = (
                installation.id.clone(),
                service.node_id.clone(),
                service.service_name.clone(),
                service.release,
            );
            let sighting = || Restarts {
                installation: installation.id.clone(),
                marketplace_id: installation.marketplace_id.clone(),
                node: service.node_id.clone(),
                service: service.service_name.clone(),
                restart_count: service.restart_count,
                given_up: service.phase() == Phase::Failed,
            };
            // A service restarted more often than it may be, given up or
            // not: a crash loop uninstalled before its end shows it too.
            if service.restart_count > super::cluster::MAX_FAILURES
                && self.restarted_too_often.insert(key.clone())
            {
                self.restarts.push(sighting());
            }
            match service.phase() {
                Phase::Failed => {
                    if let std::collections::btree_map::Entry::Vacant(entry) =
                        self.given_up.entry(key)
                    {
                        entry.insert(now);
                        self.restarts.push(sighting());
                    }
                }
                Phase::Pending
                | Phase::Pulling
                | Phase::Starting
                | Phase::Running
                | Phase::Backoff => {
                    let Some(since) = self.given_up.get(&key).copied() else {
                        continue;
                    };
                    if history.was_relabelled(&service.node_id, since, now) {
                        self.given_up.remove(&key);
                        continue;
                    }
                    self.problems.push(format!(
                        "{}/{} on {} at release {} was given up at {} ms and is {:?} at {} ms",
                        installation.id,
                        service.service_name,
                        service.node_id,
                        service.release,
                        since.as_millis(),
                        service.phase(),
                        now.as_millis()
                    ));
                    self.given_up.remove(&key);
                }
                _ => {}
            }
        }
    }
}

/// What the watcher found.
#[derive(Debug)]
pub struct Finished {
    /// Events out of order or repeated, services started after giving up,
    /// differences between its view and the manager's list.
    pub problems: Vec<String>,
    /// Times it watched again from its cursor.
    pub resumed: u64,
    /// Times the manager would not resume and it started over.
    pub started_over: u64,
    /// Every service it saw given up, or restarted more often than
    /// `--max-failures` allows.
    pub restarts: Vec<Restarts>,
}

/// The watcher.
#[derive(Debug)]
pub struct Watcher {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts watching `cluster`'s manager.
    pub fn start(cluster: Arc<Cluster>, history: Arc<History>) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(follow(cluster, history, state.clone(), stop.clone()));
        Self { state, stop, task }
    }

    /// Stops it once its view is the manager's list (or after `within`),
    /// and says what did not hold: events out of order or repeated, and
    /// any difference left between its view and the list; with how many
    /// times it resumed and started over, and the services it saw given up.
    pub async fn finish(self, cluster: &Cluster, within: Duration) -> Finished {
        let deadline = tokio::time::Instant::now() + within;
        let mut difference = Vec::new();
        loop {
            let mut client = AddonsManagerServiceClient::new(cluster.manager_channel());
            if let Ok(all) = list_installations(&mut client).await {
                let listed: BTreeMap<String, (i32, u64)> = all
                    .into_iter()
                    .map(|i| (i.id, (i.status, i.release)))
                    .collect();
                let view = self.lock().view.clone();
                difference = differences(&view, &listed);
                if difference.is_empty() {
                    break;
                }
            }
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        let state = self.lock();
        let mut problems = state.problems.clone();
        problems.extend(difference);
        Finished {
            problems,
            resumed: state.resumed,
            started_over: state.started_over,
            restarts: state.restarts.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn differences(
    view: &BTreeMap<String, (i32, u64)>,
    listed: &BTreeMap<String, (i32, u64)>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, listed) in listed {
        match view.get(id) {
            Some(seen) if seen == listed => {}
            seen => problems.push(format!(
                "the watcher's view of {id} is {seen:?}, the list's (status, release) {listed:?}"
            )),
        }
    }
    for id in view.keys().filter(|id| !listed.contains_key(*id)) {
        problems.push(format!("the watcher still sees {id}, which the list lacks"));
    }
    problems
}

async fn follow(
    cluster: Arc<Cluster>,
    history: Arc<History>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    while !stop.load(Ordering::Relaxed) {
        let since = lock().cursor;
        let mut client = AddonsManagerServiceClient::new(cluster.manager_channel());
        let stream = client
            .watch_installations(pb::WatchInstallationsRequest {
                since_revision: since,
                ..Default::default()
            })
            .await;
        let mut stream = match stream {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                refused(&mut lock(), &status);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // From a snapshot, order holds from the marker on.
        let mut live = since != 0;
        if since == 0 {
            lock().view.clear();
        } else {
            lock().resumed += 1;
        }
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(message) => message,
                Err(status) => {
                    refused(&mut lock(), &status);
                    break;
                }
            };
            let mut state = lock();
            if message.in_sync {
                live = true;
                state.cursor = state.cursor.max(message.sequence);
                continue;
            }
            if live {
                if message.sequence <= state.cursor {
                    let problem = format!(
                        "event {} after {} (watching since {since})",
                        message.sequence, state.cursor
                    );
                    state.problems.push(problem);
                }
                state.cursor = message.sequence;
            }
            let kind = message.r#type();
            let Some(installation) = message.installation else {
                continue;
            };
            state.given_up(&installation, &history);
            match kind {
                ChangeType::Deleted => {
                    state.view.remove(&installation.id);
                }
                _ => {
                    state
                        .view
                        .insert(installation.id, (installation.status, installation.release));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A watch ended by `status`: one the manager cannot resume (its change
/// log no longer reaches the cursor) starts over from a snapshot.
fn refused(state: &mut State, status: &tonic::Status) {
    if matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
    ) && state.cursor != 0
    {
        state.cursor = 0;
        state.started_over += 1;
    }
}
