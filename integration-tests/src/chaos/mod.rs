//! A randomized fault campaign: a workload and overlapping faults, both
//! chosen from one seed, on a marketplace, a manager and several nodes
//! (network namespaces, each with its own containerd and monitor); then,
//! once the faults stop, the invariants. `scripts/chaos.sh` runs one;
//! `tests/chaos.rs` runs short ones in CI.

pub mod check;
pub mod cluster;
pub mod faults;
pub mod history;
pub mod links;
pub mod proxy;
pub mod rng;
pub mod swap;
pub mod watch;
pub mod workload;

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde_json::json;

use self::{cluster::StoreKind, history::History, rng::Rng};

/// What a campaign runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Its seed: the same seed, the same choices.
    pub seed: u64,
    /// How long the faults and the workload go on.
    pub duration: Duration,
    /// How many nodes.
    pub nodes: usize,
    /// The manager's store; `None` lets the seed choose.
    pub store: Option<StoreKind>,
    /// Where the history goes.
    pub history: PathBuf,
    /// How long the system may take to converge after the last fault.
    pub settle: Duration,
    /// The test bridge's name and prefix (three octets).
    pub bridge: (String, String),
}

/// What a campaign found.
#[derive(Debug)]
pub struct Report {
    /// Its seed.
    pub seed: u64,
    /// Operations by kind and outcome.
    pub operations: std::collections::BTreeMap<(String, String), u64>,
    /// Faults by kind.
    pub faults: std::collections::BTreeMap<String, u64>,
    /// Invariant violations (none expected).
    pub violations: Vec<String>,
    /// Time from the last fault's end to convergence, if it converged.
    pub converged_after: Option<Duration>,
    /// The manager's store.
    pub store: StoreKind,
    /// Times the watcher watched again from its cursor, and started over.
    pub watch_resumed: (u64, u64),
    /// The swap gaps on undisturbed nodes.
    pub swap_gaps: swap::GapFigures,
}

impl Report {
    /// Operations in all.
    pub fn operation_count(&self) -> u64 {
        self.operations.values().sum()
    }

    /// Faults in all.
    pub fn fault_count(&self) -> u64 {
        self.faults.values().sum()
    }

    /// The summary, as text.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "seed {} (replay: scripts/chaos.sh --seed {}), store {:?}\n",
            self.seed, self.seed, self.store
        );
        text += &format!("operations: {}\n", self.operation_count());
        for ((kind, outcome), n) in &self.operations {
            text += &format!("  {kind:<10} {outcome:<24} {n}\n");
        }
        text += &format!("faults: {}\n", self.fault_count());
        for (kind, n) in &self.faults {
            text += &format!("  {kind:<20} {n}\n");
        }
        match self.converged_after {
            Some(after) => {
                text += &format!(
                    "converged {:.1} s after the last fault\n",
                    after.as_secs_f64()
                )
            }
            None => text += "did NOT converge\n",
        }
        let gaps = self.swap_gaps;
        text += &format!(
            "swap gaps (nobody on the core component's port, undisturbed nodes): {}, p50 {} ms, p99 {} ms, max {} ms\n",
            gaps.count,
            gaps.p50.as_millis(),
            gaps.p99.as_millis(),
            gaps.max.as_millis()
        );
        text += &format!(
            "watcher: resumed from its cursor {} times, started over {} times\n",
            self.watch_resumed.0, self.watch_resumed.1
        );
        text += &format!("invariant violations: {}\n", self.violations.len());
        for violation in &self.violations {
            text += &format!("  {violation}\n");
        }
        text
    }
}

/// Runs a campaign.
pub async fn run(options: Options) -> Report {
    let mut rng = Rng::new(options.seed);
    let store = options.store.unwrap_or(if rng.chance(0.5) {
        StoreKind::Mongo
    } else {
        StoreKind::Embedded
    });
    let history = Arc::new(History::create(&options.history).expect("create the history file"));
    history.header(json!({
        "seed": options.seed, "duration_s": options.duration.as_secs(),
        "nodes": options.nodes, "store": format!("{store:?}"),
    }));
    let cluster =
        cluster::Cluster::start(&options.bridge.0, &options.bridge.1, options.nodes, store).await;
    let mut workload = workload::Workload::new(cluster.clone(), history.clone(), rng.fork(1));
    workload.seed().await;
    // Every node's core component answers before the sampler starts.
    for node in cluster.watched().await {
        let deadline = history.now() + Duration::from_secs(60);
        while swap::serving(node.address).await != swap::Serving::Core {
            assert!(
                history.now() < deadline,
                "{}'s core component does not answer",
                node.node
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let sampler = swap::Sampler::start(cluster.watched().await, history.clone());
    let watcher = watch::Watcher::start(cluster.clone(), history.clone());
    let links = links::Sampler::start(cluster.clone(), history.clone());
    history.note("start", json!({}));
    let until = history.now() + options.duration;
    let faults = tokio::spawn(faults::inject(
        cluster.clone(),
        history.clone(),
        rng.fork(2),
        until,
    ));
    while history.now() < until {
        workload.step().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    faults.await.expect("the fault injector does not panic");
    history.note("faults ended", json!({}));

    // Settle: every record matches what every node runs.
    let last_fault = history.last_fault_end().unwrap_or_else(|| history.now());
    let deadline = history.now() + options.settle;
    let mut converged_after = None;
    let mut problems = Vec::new();
    while history.now() < deadline {
        let seen;
        (problems, seen) = check::convergence(&cluster, workload.published()).await;
        history.note(
            "convergence check",
            json!({
                "problems": problems.len(), "statuses": seen.statuses,
                "containers (all, running)": seen.containers,
            }),
        );
        if problems.is_empty() {
            converged_after = Some(history.now().saturating_sub(last_fault));
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for problem in &problems {
        history.violation("converges", problem);
    }
    let (gap_problems, swap_gaps) = swap::check_gaps(&sampler.stop().await, &history);
    for problem in gap_problems {
        history.violation("swap", &problem);
    }
    for problem in links::check(&links.stop().await, &history) {
        history.violation("linked_shown_disconnected", &problem);
    }
    let watched = watcher.finish(&cluster, Duration::from_secs(30)).await;
    for problem in &watched.problems {
        history.violation("watch", problem);
    }
    let (resumed, started_over) = (watched.resumed, watched.started_over);
    for problem in check::failure_window(&cluster, workload.published(), &watched.restarts).await {
        history.violation("failure_window", &problem);
    }
    for problem in check::exactly_once(&cluster, &workload.ledger).await {
        history.violation("exactly_once", &problem);
    }
    let logs = cluster.all_logs().await;
    for problem in check::panics(&logs) {
        history.violation("no_panics", &problem);
    }
    for problem in check::bounds(&cluster).await {
        history.violation("bounds", &problem);
    }
    // A failing run keeps every process's log beside its history.
    if !history.violations().is_empty() {
        let dir = options.history.with_extension("logs");
        if std::fs::create_dir_all(&dir).is_ok() {
            for (n, (name, log)) in logs.iter().enumerate() {
                let file = format!("{n:03}-{}.log", name.replace(' ', "-"));
                let _ = std::fs::write(dir.join(file), log);
            }
            history.note("logs kept", json!({"dir": dir.display().to_string()}));
        }
    }
    let report = Report {
        seed: options.seed,
        operations: history.operations(),
        faults: history.faults(),
        violations: history.violations(),
        converged_after,
        store,
        watch_resumed: (resumed, started_over),
        swap_gaps,
    };
    history.note(
        "summary",
        json!({
            "operations": report.operation_count(), "faults": report.fault_count(),
            "violations": report.violations.len(),
            "converged_after_s": converged_after.map(|d| d.as_secs_f64()),
        }),
    );
    report
}
