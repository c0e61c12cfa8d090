//! Health checks: each due HTTP or TCP probe runs on a thread of its own
//! that enters the container's network namespace (`/proc/<pid>/ns/net`),
//! so it reaches the service on its container port whatever its networks
//! are; an exec probe runs as a containerd exec in the task. The reconcile
//! loop never waits on one: results come back to it, and it wakes on them.
//!
//! [`CheckState`] is the pure part: failures in a row, the start period,
//! and the verdict.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use addons_descriptor::{HealthCheck, Probe};
use tokio::sync::mpsc;

use crate::runtime::Runtime;

/// What a health check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not found healthy yet.
    Starting,
    /// The last probe passed.
    Healthy,
    /// `retries` probes in a row failed.
    Unhealthy,
}

/// The check of one running task.
#[derive(Debug, Clone)]
pub struct CheckState {
    check: HealthCheck,
    /// The task's pid: a new task starts a new check.
    pid: u32,
    started: Instant,
    next_due: Instant,
    failures: u32,
    in_flight: bool,
    /// What the check says.
    pub health: Health,
    /// Why the last probe failed.
    pub last_error: String,
}

impl CheckState {
    /// A check of the task `pid` started at `now`; the first probe is due
    /// at once.
    pub fn new(check: HealthCheck, pid: u32, now: Instant) -> Self {
        Self {
            check,
            pid,
            started: now,
            next_due: now,
            failures: 0,
            in_flight: false,
            health: Health::Starting,
            last_error: String::new(),
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.check.interval_ms)
    }

    /// Takes a probe's result at `now`: a pass makes it healthy; a failure
    /// counts unless within the start period, and `retries` in a row make
    /// it unhealthy. Returns whether the health changed.
    pub fn on_result(&mut self, result: Result<(), String>, now: Instant) -> bool {
        self.in_flight = false;
        self.next_due = now + self.interval();
        let before = self.health;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.last_error.clear();
                self.health = Health::Healthy;
            }
            Err(err) => {
                self.last_error = err;
                let grace = Duration::from_millis(self.check.start_period_ms);
                if now.duration_since(self.started) >= grace {
                    self.failures += 1;
                }
                if self.failures >= self.check.retries {
                    self.health = Health::Unhealthy;
                }
            }
        }
        self.health != before
    }

    /// Whether a probe is due at `now` and none runs.
    pub fn due(&self, now: Instant) -> bool {
        !self.in_flight && now >= self.next_due
    }
}

/// The checks of the node's tasks, and the probes in flight.
#[derive(Debug)]
pub struct Checks {
    states: HashMap<String, CheckState>,
    results_tx: mpsc::UnboundedSender<(String, u32, Result<(), String>)>,
    results_rx: mpsc::UnboundedReceiver<(String, u32, Result<(), String>)>,
    done: Vec<(String, u32, Result<(), String>)>,
    /// Numbers exec probes, whose ids must be unique per task.
    execs: u64,
}

impl Default for Checks {
    fn default() -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        Self {
            states: HashMap::new(),
            results_tx,
            results_rx,
            done: Vec::new(),
            execs: 0,
        }
    }
}

impl Checks {
    /// Waits for a probe to finish (never, when none runs), keeping its
    /// result for the next pass.
    pub async fn finished(&mut self) {
        if let Some(result) = self.results_rx.recv().await {
            self.done.push(result);
        }
    }

    /// Applies finished probes; returns the ids whose health changed.
    pub fn collect(&mut self, now: Instant) -> Vec<String> {
        while let Ok(result) = self.results_rx.try_recv() {
            self.done.push(result);
        }
        let mut changed = Vec::new();
        for (id, pid, result) in std::mem::take(&mut self.done) {
            if let Some(state) = self.states.get_mut(&id)
                && state.pid == pid
                && state.on_result(result, now)
            {
                changed.push(id);
            }
        }
        changed
    }

    /// The check of container `id` whose task is `pid`: kept while the
    /// task and the check are the same, else started afresh.
    pub fn track(&mut self, id: &str, pid: u32, check: &HealthCheck, now: Instant) -> &CheckState {
        let fresh = self
            .states
            .get(id)
            .is_none_or(|s| s.pid != pid || s.check != *check);
        if fresh {
            self.states
                .insert(id.to_owned(), CheckState::new(check.clone(), pid, now));
        }
        &self.states[id]
    }

    /// Starts the probe of `id` if it is due (an exec probe through
    /// `runtime`); returns when the next one is.
    pub fn probe_if_due<R: Runtime>(
        &mut self,
        id: &str,
        now: Instant,
        runtime: &R,
    ) -> Option<Instant> {
        let state = self.states.get_mut(id)?;
        if state.due(now) {
            state.in_flight = true;
            let (pid, probe) = (state.pid, state.check.probe.clone());
            let timeout = Duration::from_millis(state.check.timeout_ms);
            let tx = self.results_tx.clone();
            let id = id.to_owned();
            if let Probe::Exec { command } = probe {
                self.execs += 1;
                let exec_id = format!("health-{}", self.execs);
                let runtime = runtime.clone();
                tokio::spawn(async move {
                    let result = match runtime.exec(&id, &exec_id, &command, timeout).await {
                        Ok(0) => Ok(()),
                        Ok(code) => Err(format!("`{}` exited with {code}", command.join(" "))),
                        Err(err) => Err(err.to_string()),
                    };
                    let _ = tx.send((id, pid, result));
                });
                return None;
            }
            // A thread of its own: it enters the container's network
            // namespace, which must not leak into a shared pool thread.
            let spawned = std::thread::Builder::new()
                .name("health-probe".into())
                .spawn(move || {
                    let result = probe_in_netns(pid, &probe, timeout);
                    let _ = tx.send((id, pid, result));
                });
            if let Err(err) = spawned {
                state.in_flight = false;
                state.next_due = now + state.interval();
                tracing::warn!(error = %err, "cannot start a health probe");
            }
            return None;
        }
        (!state.in_flight).then_some(state.next_due)
    }

    /// The check of `id`, if it has one.
    pub fn get(&self, id: &str) -> Option<&CheckState> {
        self.states.get(id)
    }

    /// Forgets every check but those of `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.states.retain(|id, _| keep(id));
    }
}

/// Runs `probe` against 127.0.0.1 inside the network namespace of process
/// `pid` (the monitor brings `lo` up in every namespace it makes).
/// Blocking; call it on a thread that exits afterwards.
fn probe_in_netns(pid: u32, probe: &Probe, timeout: Duration) -> Result<(), String> {
    let path = format!("/proc/{pid}/ns/net");
    let netns = std::fs::File::open(&path).map_err(|err| format!("cannot open {path}: {err}"))?;
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|err| format!("cannot enter the container's network namespace: {err}"))?;
    let port = match probe {
        Probe::Http { port, .. } | Probe::Tcp { port } => *port,
        Probe::Exec { .. } => return Err("an exec probe runs through containerd".into()),
    };
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|err| format!("connecting to {address}: {err}"))?;
    let Probe::Http { path, .. } = probe else {
        return Ok(());
    };
    let io = |err: std::io::Error| format!("GET {path} on port {port}: {err}");
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: addons-monitor\r\n\r\n")
                .as_bytes(),
        )
        .map_err(io)?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < head.len() && !head[..read].contains(&b'\n') {
        match stream.read(&mut head[read..]).map_err(io)? {
            0 => break,
            n => read += n,
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let code: Option<u16> = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    match code {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} on port {port} answered {code}")),
        None => Err(format!("GET {path} on port {port}: not an HTTP answer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp { port: 80 },
            interval_ms: 1000,
            timeout_ms: 500,
            retries,
            start_period_ms,
        }
    }

    #[test]
    fn unhealthy_after_retries_in_a_row_outside_the_start_period() {
        let start = Instant::now();
        let mut state = CheckState::new(check(2, 5000), 7, start);
        assert!(state.due(start));
        let fail = || Err("refused".to_owned());
        // Within the start period: failures do not count.
        assert!(!state.on_result(fail(), start + Duration::from_secs(1)));
        assert!(!state.on_result(fail(), start + Duration::from_secs(2)));
        assert_eq!(state.health, Health::Starting);
        assert!(!state.due(start + Duration::from_millis(2500)));
        assert!(state.due(start + Duration::from_secs(3)));
        assert!(!state.on_result(fail(), start + Duration::from_secs(6)));
        assert!(state.on_result(fail(), start + Duration::from_secs(7)));
        assert_eq!(state.health, Health::Unhealthy);
        assert_eq!(state.last_error, "refused");
        assert!(state.on_result(Ok(()), start + Duration::from_secs(8)));
        assert_eq!(state.health, Health::Healthy);
        // One failure after healthy is not enough.
        assert!(!state.on_result(fail(), start + Duration::from_secs(9)));
        assert_eq!(state.health, Health::Healthy);
    }

    #[test]
    fn a_new_task_or_check_starts_afresh() {
        let now = Instant::now();
        let mut checks = Checks::default();
        checks.track("c", 1, &check(1, 0), now);
        checks.states.get_mut("c").unwrap().health = Health::Healthy;
        assert_eq!(
            checks.track("c", 1, &check(1, 0), now).health,
            Health::Healthy
        );
        assert_eq!(
            checks.track("c", 2, &check(1, 0), now).health,
            Health::Starting
        );
        checks.states.get_mut("c").unwrap().health = Health::Healthy;
        assert_eq!(
            checks.track("c", 2, &check(3, 0), now).health,
            Health::Starting
        );
    }
}
