//! Nodes shown disconnected while they are linked: the manager marks a
//! node's services unknown once its link has been silent past the
//! heartbeat timeout, and only the node's reports on a new link correct
//! that. The sampler asks the manager every second which nodes are linked
//! (and since when) and what each installation shows of them.
//!
//! The invariant: a node linked for [`LINKED_FOR`] is not shown
//! disconnected, unless something touched it, the manager or the store
//! meanwhile (a report the store cannot take waits for it).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use oakestra_addons_proto::engine::v1::{
    self as pb, addons_manager_service_client::AddonsManagerServiceClient,
};

use super::{cluster::Cluster, history::History, workload::list_installations};

/// How long a node may be linked and still shown disconnected: its
/// monitor's first report on a link comes within a second or two.
pub const LINKED_FOR: Duration = Duration::from_secs(10);

/// One sight of a linked node shown disconnected.
#[derive(Debug, Clone)]
pub struct Sight {
    node: String,
    installation: String,
    /// When the node's link began, in campaign time.
    linked_since: Duration,
    /// When it was seen.
    at: Duration,
}

/// The sampler.
#[derive(Debug)]
pub struct Sampler {
    sights: Arc<Mutex<Vec<Sight>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `cluster`'s manager.
    pub fn start(cluster: Arc<Cluster>, history: Arc<History>) -> Self {
        let sights = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(sample(cluster, history, sights.clone(), stop.clone()));
        Self { sights, stop, task }
    }

    /// Stops it; what it saw.
    pub async fn stop(self) -> Vec<Sight> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        std::mem::take(&mut *self.sights.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

async fn sample(
    cluster: Arc<Cluster>,
    history: Arc<History>,
    sights: Arc<Mutex<Vec<Sight>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut client = AddonsManagerServiceClient::new(cluster.manager_channel());
        let Ok(nodes) = client
            .list_nodes(pb::ListNodesRequest {
                page_size: 500,
                ..Default::default()
            })
            .await
        else {
            continue;
        };
        let Ok(installations) = list_installations(&mut client).await else {
            continue;
        };
        let now = history.now();
        let wall = SystemTime::now();
        let linked: Vec<(String, Duration)> = nodes
            .into_inner()
            .nodes
            .into_iter()
            .filter(|n| n.connected)
            .filter_map(|n| {
                let since = n.connect_time?;
                let since = SystemTime::UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(since.seconds).ok()?,
                        u32::try_from(since.nanos).ok()?,
                    );
                // Linked this long before now, in campaign time.
                let ago = wall.duration_since(since).unwrap_or_default();
                Some((n.node_id, now.saturating_sub(ago)))
            })
            .collect();
        let mut seen = Vec::new();
        for installation in &installations {
            for service in &installation.services {
                if service.phase() != pb::ServicePhase::Unknown {
                    continue;
                }
                if let Some((node, since)) = linked.iter().find(|(n, _)| *n == service.node_id)
                    && now.saturating_sub(*since) >= LINKED_FOR
                {
                    seen.push(Sight {
                        node: node.clone(),
                        installation: installation.id.clone(),
                        linked_since: *since,
                        at: now,
                    });
                }
            }
        }
        sights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(seen);
    }
}

/// The sights no disturbance explains: nothing touched the node, the
/// manager or the store from a second before its link began until it was
/// seen. One problem per node and link.
pub fn check(sights: &[Sight], history: &History) -> Vec<String> {
    let mut problems = Vec::new();
    let mut told = std::collections::BTreeSet::new();
    for sight in sights {
        let from = sight.linked_since.saturating_sub(Duration::from_secs(1));
        if ["manager", "store", sight.node.as_str()]
            .iter()
            .any(|target| history.was_disturbed(target, from, sight.at))
        {
            continue;
        }
        if told.insert((sight.node.clone(), sight.linked_since)) {
            problems.push(format!(
                "{} linked since {} ms is shown disconnected in {} at {} ms",
                sight.node,
                sight.linked_since.as_millis(),
                sight.installation,
                sight.at.as_millis()
            ));
        }
    }
    problems
}
