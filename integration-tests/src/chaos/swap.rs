//! Hot swaps under faults: every node runs a core component ([`CORE`],
//! serving `core-scheduler` on [`PORT`]) that the addon [`PLUGIN`] replaces
//! where it is installed, and that comes back where it goes. The sampler
//! watches every node all along: who answers on the port, and whether the
//! core component and its replacement ever run at once in containerd.
//!
//! The invariant: never both, and never neither for longer than
//! [`GAP_BOUND`] on a node that no fault or restart touched meanwhile (a
//! node cut off cannot be seen; a monitor killed mid-swap finishes it when
//! it is back).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use addons_monitor::{
    labels,
    runtime::{Containerd, TaskState},
};
use serde_json::json;

use super::history::History;

/// The core component's name; the plugin's service has it too.
pub const CORE: &str = "scheduler";
/// The host port it publishes on every node.
pub const PORT: u16 = 18097;
/// The addon whose service replaces it.
pub const PLUGIN: &str = "scheduler-plus";
/// The longest time nobody may answer on an undisturbed node.
pub const GAP_BOUND: Duration = Duration::from_secs(5);

/// What the core component answers with.
pub const CORE_BODY: &str = "core-scheduler";
/// What its replacement answers with.
pub const PLUGIN_BODY: &str = "addon-scheduler";

/// The monitors' `--core-components` file: the scheduler, replaceable.
pub fn core_components_file(image: &str) -> String {
    let command = serde_json::to_string(&crate::images::http_server_command(CORE_BODY))
        .expect("a command is JSON");
    format!(
        "- name: {CORE}\n  image: {image}\n  command: {command}\n  replaceable: true\n  ports:\n  - container_port: 8080\n    host_port: {PORT}\n"
    )
}

/// Who answers on a node's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Serving {
    /// The core component.
    Core,
    /// Its replacement.
    Plugin,
    /// Nobody (or something else).
    #[default]
    Nobody,
}

/// Who answers on `address`'s port now.
pub async fn serving(address: Ipv4Addr) -> Serving {
    match crate::http_get_at(address, PORT, Duration::from_secs(1)).await {
        Ok(answer) if answer.contains(CORE_BODY) => Serving::Core,
        Ok(answer) if answer.contains(PLUGIN_BODY) => Serving::Plugin,
        _ => Serving::Nobody,
    }
}

/// A node the sampler watches.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Its node id.
    pub node: String,
    /// Its address.
    pub address: Ipv4Addr,
    /// Its containerd's socket.
    pub socket: PathBuf,
    /// Its monitor's containerd namespace.
    pub namespace: String,
}

/// A time nobody answered on a node.
#[derive(Debug, Clone)]
pub struct Gap {
    /// The node.
    pub node: String,
    /// From the first sample nobody answered...
    pub start: Duration,
    /// ... to the first one somebody did.
    pub end: Duration,
}

/// The sampler: one task per node, until stopped.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    gaps: Arc<Mutex<Vec<Gap>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Sampler {
    /// Starts watching `nodes`, each of which serves already.
    pub fn start(nodes: Vec<Watched>, history: Arc<History>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let gaps = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for node in nodes {
            let (stop, gaps, history) = (stop.clone(), gaps.clone(), history.clone());
            tasks.spawn(async move { watch(node, &stop, &gaps, &history).await });
        }
        Self { stop, gaps, tasks }
    }

    /// Stops it; the gaps it saw (one still open ends now).
    pub async fn stop(mut self) -> Vec<Gap> {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        std::mem::take(&mut *self.gaps.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

async fn watch(node: Watched, stop: &AtomicBool, gaps: &Mutex<Vec<Gap>>, history: &History) {
    let runtime = Containerd::new(
        node.socket.clone(),
        node.namespace.clone(),
        "overlayfs".into(),
    );
    let mut nobody_since = None;
    while !stop.load(Ordering::Relaxed) {
        let at = history.now();
        match (serving(node.address).await, nobody_since) {
            (Serving::Nobody, None) => nobody_since = Some(at),
            (Serving::Nobody, Some(_)) => {}
            (_, Some(start)) => {
                gaps.lock().unwrap_or_else(|e| e.into_inner()).push(Gap {
                    node: node.node.clone(),
                    start,
                    end: at,
                });
                nobody_since = None;
            }
            (_, None) => {}
        }
        if both_run(&runtime).await == Some(true) {
            history.violation(
                "swap",
                &format!(
                    "{} runs the core component {CORE} and its replacement at once at {} ms",
                    node.node,
                    at.as_millis()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    if let Some(start) = nobody_since {
        gaps.lock().unwrap_or_else(|e| e.into_inner()).push(Gap {
            node: node.node.clone(),
            start,
            end: history.now(),
        });
    }
}

/// Whether the core component's task and a replacement's task both run:
/// the core component seen running before and after a replacement is, so
/// that a swap between two reads is not taken for both. `None` when
/// containerd does not answer in time (paused, or restarting).
async fn both_run(runtime: &Containerd) -> Option<bool> {
    let core = format!("root_{CORE}");
    let running = |id: String| async move {
        let state = tokio::time::timeout(Duration::from_secs(1), runtime.task_state(&id))
            .await
            .ok()?;
        Some(matches!(state, Ok(TaskState::Running(_))))
    };
    if !running(core.clone()).await? {
        return Some(false);
    }
    let replacements = tokio::time::timeout(
        Duration::from_secs(1),
        runtime.list_containers(&[
            (labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
            (labels::SERVICE, CORE),
        ]),
    )
    .await
    .ok()?
    .ok()?;
    let mut any = false;
    for container in replacements {
        any |= running(container.id).await?;
    }
    Some(any && running(core).await?)
}

/// The figures of the gaps on undisturbed nodes: how many, and their
/// p50, p99 and longest.
#[derive(Debug, Clone, Copy, Default)]
pub struct GapFigures {
    /// How many.
    pub count: usize,
    /// Their median.
    pub p50: Duration,
    /// Their 99th percentile.
    pub p99: Duration,
    /// The longest.
    pub max: Duration,
}

/// The gaps longer than [`GAP_BOUND`] on nodes nothing disturbed
/// meanwhile, as violations; and the figures of all gaps on undisturbed
/// nodes (noted in the history too).
pub fn check_gaps(gaps: &[Gap], history: &History) -> (Vec<String>, GapFigures) {
    let mut undisturbed: Vec<Duration> = Vec::new();
    let mut problems = Vec::new();
    for gap in gaps {
        // A second before the gap: a restart's effects show a moment late.
        let from = gap.start.saturating_sub(Duration::from_secs(1));
        if history.was_disturbed(&gap.node, from, gap.end) {
            continue;
        }
        let length = gap.end.saturating_sub(gap.start);
        undisturbed.push(length);
        if length > GAP_BOUND {
            problems.push(format!(
                "nobody answered on {}'s port {PORT} for {:.1} s (from {} ms), with no fault on the node",
                gap.node,
                length.as_secs_f64(),
                gap.start.as_millis()
            ));
        }
    }
    undisturbed.sort();
    let at = |q: f64| {
        undisturbed
            .get(((undisturbed.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let figures = GapFigures {
        count: undisturbed.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: undisturbed.last().copied().unwrap_or_default(),
    };
    history.note(
        "swap gaps on undisturbed nodes",
        json!({
            "count": figures.count, "p50_ms": figures.p50.as_millis(),
            "p99_ms": figures.p99.as_millis(), "max_ms": figures.max.as_millis(),
            "all_gaps": gaps.len(),
        }),
    );
    (problems, figures)
}
