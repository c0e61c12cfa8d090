//! What the monitor knows of each service: its status as reported, its
//! failures and its next restart, kept under the state dir so a monitor
//! restart neither resets counters and the failure window nor revives a
//! service it gave up on; and how that knowledge leaves the reconciler: the
//! report outbox, and the [`NodeView`](crate::view::NodeView) the node API
//! and the link's hello read.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use oakestra_addons_proto::engine::v1::{self as pb, ServicePhase};

use super::Reconciler;
use crate::{
    error::MonitorError,
    labels::{GIVEN_UP, INSTALLATION},
    network::Network,
    plan::{self, Container, Phase, ServiceMemory},
    restarts::{FailureHistory, RestartPolicy, Verdict, unix_millis},
    runtime::{ContainerInfo, Runtime},
    state_dir::StateDir,
};

/// The longest reason kept in a [`GIVEN_UP`] label (containerd allows
/// 4 KiB per label).
const GIVEN_UP_REASON_BYTES: usize = 1024;

/// What a [`GIVEN_UP`] label holds (JSON): enough to report the give-up as
/// it was.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct GiveUp {
    reason: String,
    restart_count: u32,
    #[serde(default)]
    exit_code: Option<i32>,
}

/// What the reconciler tracks per addon container.
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    pub(super) installation_id: String,
    pub(super) status: pb::ServiceStatus,
    history: FailureHistory,
    retry_at: Option<Instant>,
    /// Attempts failed in a row for the registry's or the node's reasons
    /// (not counted as failures of the service).
    uncounted_failures: usize,
    /// Whether what must survive a restart of the monitor could not be
    /// saved (a full disk): it is saved again at every pass until it is.
    unsaved: bool,
}

impl Tracked {
    /// The planner's view of it.
    pub(super) fn memory(&self) -> ServiceMemory {
        ServiceMemory {
            installation: self.installation_id.clone(),
            failed: self.status.phase() == ServicePhase::Failed,
            retry_at: self.retry_at,
            never_started: self.retry_at.is_none()
                && matches!(
                    self.status.phase(),
                    ServicePhase::Pending | ServicePhase::Pulling | ServicePhase::Starting
                ),
        }
    }

    /// When it is to be started again, after a failure.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Counts a failure by `policy`: back off (with `retrying(delay)` as the
    /// reason) or give up (`giving_up(count)`).
    fn fail(
        &mut self,
        policy: RestartPolicy,
        retrying: impl FnOnce(Duration) -> String,
        giving_up: impl FnOnce(usize) -> String,
    ) -> Verdict {
        let verdict = policy.on_failure(&mut self.history, SystemTime::now());
        match verdict {
            Verdict::RetryIn(delay) => {
                self.retry_at = Some(Instant::now() + delay);
                self.set(ServicePhase::Backoff, retrying(delay));
            }
            Verdict::GiveUp(count) => {
                self.retry_at = None;
                self.set(ServicePhase::Failed, giving_up(count));
            }
        }
        verdict
    }

    /// Sets phase and reason, stamping the time when either changed.
    pub(super) fn set(&mut self, phase: ServicePhase, reason: String) {
        if self.status.phase() != phase || self.status.reason != reason {
            self.status.phase = phase.into();
            self.status.reason = reason;
            self.status.update_time = Some(crate::now());
        }
    }
}

impl From<Phase> for ServicePhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Pending => Self::Pending,
            Phase::Running => Self::Running,
            Phase::Failed => Self::Failed,
            Phase::Stopping => Self::Stopping,
            Phase::Removed => Self::Removed,
        }
    }
}

/// The failures of a service and its pending restart, as stored
/// (wall-clock milliseconds).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Failures {
    /// The installation they are about.
    #[serde(default)]
    installation: String,
    #[serde(flatten)]
    history: FailureHistory,
    #[serde(default)]
    retry_at: Option<u64>,
}

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// The tracked state of container `id`, restored from the state dir
    /// when this run of the monitor has not seen it yet.
    pub(super) fn track(&mut self, installation: &str, service: &str, id: &str) -> &mut Tracked {
        // What the monitor knows is about one installation's service: a
        // container id that another installation takes over starts afresh.
        if self
            .tracked
            .get(id)
            .is_none_or(|t| t.installation_id != installation)
        {
            let tracked = self.restore(installation, service, id);
            self.tracked.insert(id.to_owned(), tracked);
        }
        let tracked = self.tracked.get_mut(id).unwrap_or_else(|| unreachable!());
        tracked.status.node_id.clone_from(&self.cx.node_id);
        tracked
    }

    /// What an earlier run of the monitor knew of container `id`. Files
    /// that cannot be read are rebuilt on the safe side, never read as
    /// empty: a lost failure history counts the restarts the status shows
    /// as recent failures, and a lost status of a service whose history
    /// spent its budget stays given up on.
    fn restore(&self, installation: &str, service: &str, id: &str) -> Tracked {
        let fresh = pb::ServiceStatus {
            service_name: service.to_owned(),
            container_id: id.to_owned(),
            node_id: self.cx.node_id.clone(),
            ..Default::default()
        };
        let status_path = self.cx.state.status_file(id).unwrap_or_default();
        let status = match StateDir::read(&status_path) {
            Ok(Some(bytes)) => <pb::ServiceStatus as prost::Message>::decode(bytes.as_slice())
                .map(Some)
                .map_err(|err| err.to_string()),
            Ok(None) => Ok(None),
            Err(err) => Err(err.to_string()),
        };
        let failures = self
            .cx
            .state
            .failures_file(id)
            .and_then(|path| StateDir::read_json::<Failures>(&path));
        if let Ok(Some(failures)) = &failures
            && failures.installation != installation
        {
            // Another installation's service had the container id.
            return Tracked {
                installation_id: installation.to_owned(),
                status: fresh,
                history: FailureHistory::default(),
                retry_at: None,
                uncounted_failures: 0,
                unsaved: false,
            };
        }
        let policy = self.cx.options.restart;
        let now_ms = unix_millis(SystemTime::now());
        let mut status = match status {
            Ok(Some(status)) if status.service_name == service => status,
            Ok(_) => fresh.clone(),
            Err(err) => {
                tracing::error!(path = %status_path.display(), error = %err, "unreadable service status; rebuilt from the failure history");
                fresh.clone()
            }
        };
        let (history, retry_at) = match failures {
            Ok(Some(failures)) => (failures.history, failures.retry_at),
            Ok(None) => (FailureHistory::default(), None),
            Err(err) => {
                tracing::error!(error = %err, "unreadable failure history; counting the restarts the status shows as recent failures");
                let counted = usize::try_from(status.restart_count)
                    .unwrap_or(usize::MAX)
                    .min(policy.max_failures);
                let history = FailureHistory {
                    at: vec![now_ms; counted],
                };
                (history, None)
            }
        };
        if status.phase == 0 && history.at.len() > policy.max_failures {
            status.phase = ServicePhase::Failed.into();
            status.reason = format!(
                "gave up after {} failures (before the monitor restarted)",
                history.at.len()
            );
        }
        // Wall-clock time, bounded: a clock that went back since must not
        // hold a restart for as long as it went back.
        let retry_at = retry_at.map(|at| Instant::now() + policy.resume_delay(at, now_ms));
        Tracked {
            installation_id: installation.to_owned(),
            status,
            history,
            retry_at,
            uncounted_failures: 0,
            unsaved: false,
        }
    }

    /// Saves what must survive a restart of the monitor. What cannot be
    /// saved (a full disk) is kept to be saved again by
    /// [`Self::persist_unsaved`].
    pub(super) fn persist(&mut self, id: &str) {
        let Some(tracked) = self.tracked.get(id) else {
            return;
        };
        let (Ok(dir), Ok(status_file), Ok(failures_file)) = (
            self.cx.state.container_dir(id),
            self.cx.state.status_file(id),
            self.cx.state.failures_file(id),
        ) else {
            return;
        };
        if !dir.is_dir() {
            return;
        }
        let bytes = prost::Message::encode_to_vec(&tracked.status);
        let retry_at = tracked.retry_at.map(|at| {
            unix_millis(SystemTime::now() + at.saturating_duration_since(Instant::now()))
        });
        let failures = Failures {
            installation: tracked.installation_id.clone(),
            history: tracked.history.clone(),
            retry_at,
        };
        let saved = crate::state_dir::write_atomic(&status_file, &bytes)
            .and_then(|()| StateDir::write_json(&failures_file, &failures));
        let unsaved = match saved {
            Ok(()) => false,
            Err(err) => {
                if !tracked.unsaved {
                    tracing::warn!(container = %id, error = %err, "cannot save service status; trying again at every pass");
                }
                true
            }
        };
        if let Some(tracked) = self.tracked.get_mut(id) {
            tracked.unsaved = unsaved;
        }
    }

    /// Saves again what could not be saved before: a service given up on
    /// while the node's disk was full stays given up on after a restart of
    /// the monitor that comes once the disk has room again.
    pub(super) fn persist_unsaved(&mut self) {
        let unsaved: Vec<String> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.unsaved)
            .map(|(id, _)| id.clone())
            .collect();
        for id in unsaved {
            self.persist(&id);
        }
    }

    /// Labels each container the monitor gave up on for spending its
    /// failure budget with [`GIVEN_UP`], where `containers` shows it
    /// unlabelled: the label lives in containerd, not under the state dir,
    /// so the give-up is kept even when the state dir could not be written.
    pub(super) async fn label_give_ups(
        &self,
        containers: &HashMap<String, ContainerInfo>,
    ) -> Result<(), MonitorError> {
        let max_failures = self.cx.options.restart.max_failures;
        for (id, tracked) in &self.tracked {
            let Some(info) = containers.get(id) else {
                continue;
            };
            let spent = tracked.status.phase() == ServicePhase::Failed
                && tracked.history.at.len() > max_failures;
            if !spent
                || info.labels.contains_key(GIVEN_UP)
                || info.labels.get(INSTALLATION) != Some(&tracked.installation_id)
            {
                continue;
            }
            let give_up = GiveUp {
                reason: crate::bounded(&tracked.status.reason, GIVEN_UP_REASON_BYTES).to_owned(),
                restart_count: tracked.status.restart_count,
                exit_code: tracked.status.exit_code,
            };
            let value = serde_json::to_string(&give_up).unwrap_or_default();
            match self.cx.runtime.set_label(id, GIVEN_UP, Some(&value)).await {
                Ok(()) => {}
                Err(err) if err.is_not_found() => {}
                Err(err) if err.is_unavailable() => return Err(err.into()),
                Err(err) => {
                    tracing::warn!(container = %id, error = %err, "cannot label a service given up on");
                }
            }
        }
        Ok(())
    }

    /// Gives up again on each service whose container carries
    /// [`GIVEN_UP`] for its installation, whatever the state dir says: a
    /// give-up the state dir could not keep.
    pub(super) fn restore_give_ups(&mut self, containers: &HashMap<String, ContainerInfo>) {
        for (id, tracked) in &mut self.tracked {
            let Some(info) = containers.get(id) else {
                continue;
            };
            let Some(label) = info.labels.get(GIVEN_UP) else {
                continue;
            };
            if tracked.status.phase() == ServicePhase::Failed
                || info.labels.get(INSTALLATION) != Some(&tracked.installation_id)
            {
                continue;
            }
            // A label that does not parse still says the service was
            // given up on.
            let give_up = serde_json::from_str(label).unwrap_or_else(|_| GiveUp {
                reason: "given up on (before the monitor restarted)".to_owned(),
                restart_count: 0,
                exit_code: None,
            });
            tracing::warn!(container = %id, "given up on before, as its label says; its saved status was older");
            tracked.retry_at = None;
            tracked.status.restart_count = tracked.status.restart_count.max(give_up.restart_count);
            tracked.status.exit_code = give_up.exit_code.or(tracked.status.exit_code);
            tracked.set(ServicePhase::Failed, give_up.reason);
        }
    }

    pub(super) fn set_phase(
        &mut self,
        installation: &str,
        service: &str,
        id: &str,
        phase: ServicePhase,
        reason: String,
    ) {
        let tracked = self.track(installation, service, id);
        tracked.installation_id = installation.to_owned();
        tracked.set(phase, reason);
        if phase == ServicePhase::Running {
            tracked.retry_at = None;
            tracked.uncounted_failures = 0;
        }
    }

    /// Counts an exit of the service's task and decides, by the restart
    /// policy, when to restart it or to give up.
    pub(super) fn exited(
        &mut self,
        installation: &str,
        service: &str,
        id: &str,
        exit_code: Option<i32>,
    ) {
        let log = self.cx.state.log(id).unwrap_or_default();
        let cause = self
            .unhealthy_stops
            .remove(id)
            .map(|reason| format!(" after it was stopped as {reason}"))
            .unwrap_or_default();
        let tracked = self.track(installation, service, id);
        tracked.status.exit_code = exit_code.or(tracked.status.exit_code);
        tracked.status.health = 0;
        let code = tracked
            .status
            .exit_code
            .map_or("unknown".to_owned(), |c| c.to_string());
        let code = format!("{code}{cause}");
        let policy = self.cx.options.restart;
        let tracked = self.track(installation, service, id);
        let verdict = tracked.fail(
            policy,
            |delay| format!("exited with code {code}; restarting in {delay:?}"),
            |count| {
                format!(
                    "exited {count} times within {:?}; last exit code {code}",
                    policy.window
                )
            },
        );
        let lines = if matches!(verdict, Verdict::GiveUp(_)) {
            50
        } else {
            20
        };
        tracked.status.logs_tail = super::context::tail(&log, lines);
        self.persist(id);
    }

    /// Records the outcome of an attempt to create or start a service: a
    /// failure counts against the restart policy like an exit does.
    pub(super) fn after_attempt(
        &mut self,
        installation: &str,
        service: &str,
        id: &str,
        result: Result<(), MonitorError>,
    ) -> Result<(), MonitorError> {
        let err = match result {
            Ok(()) => {
                self.persist(id);
                return Ok(());
            }
            Err(err) if err.is_unavailable() => return Err(err),
            Err(err) => err,
        };
        tracing::warn!(container = %id, error = %err, "cannot run service");
        if let Some(whose) = err.not_the_services() {
            // The registry's or the node's failure, not the service's:
            // back off and try again, for as long as it takes (a registry
            // down or a disk full for a moment must not leave the service
            // given up on this node).
            let policy = self.cx.options.restart;
            let tracked = self.track(installation, service, id);
            tracked.uncounted_failures += 1;
            let delay = policy.delay(tracked.uncounted_failures);
            tracked.retry_at = Some(Instant::now() + delay);
            tracked.set(
                ServicePhase::Backoff,
                format!("{err}; retrying in {delay:?} ({whose}: not counted)"),
            );
            self.persist(id);
            return Ok(());
        }
        if err.is_final() {
            let tracked = self.track(installation, service, id);
            tracked.retry_at = None;
            tracked.set(ServicePhase::Failed, err.to_string());
            return Ok(());
        }
        let policy = self.cx.options.restart;
        self.track(installation, service, id).fail(
            policy,
            |delay| format!("{err}; retrying in {delay:?}"),
            |count| format!("gave up after {count} failures: {err}"),
        );
        self.persist(id);
        Ok(())
    }

    /// Puts the statuses of every installation that changed since its last
    /// report into the outbox (of every one, when a new link asked).
    pub(super) fn report_all(&mut self, desired: Option<&pb::DesiredState>) {
        let Some(desired) = desired else {
            return;
        };
        if self.outbox.everything_asked() {
            self.reported.clear();
        }
        for installation in &desired.installations {
            let id = &installation.installation_id;
            // A service the monitor has not decided about yet has no phase
            // to report.
            // Only the release this node runs: a container of another
            // release is on its way out.
            let mut services: Vec<pb::ServiceStatus> = self
                .tracked
                .iter()
                .filter(|(cid, t)| {
                    &t.installation_id == id && t.status.phase != 0 && self.current.contains(*cid)
                })
                .map(|(_, t)| t.status.clone())
                .collect();
            let verdict = self.trials.get(id).map(crate::release::Trial::verdict);
            services.sort_by(|a, b| a.service_name.cmp(&b.service_name));
            let unchanged = self.reported.get(id).is_some_and(|last| {
                last.verdict == verdict
                    && last.services.len() == services.len()
                    && last.services.iter().zip(&services).all(|(a, b)| {
                        (
                            a.phase,
                            &a.reason,
                            a.restart_count,
                            a.exit_code,
                            a.pull_bytes_done,
                            a.health,
                        ) == (
                            b.phase,
                            &b.reason,
                            b.restart_count,
                            b.exit_code,
                            b.pull_bytes_done,
                            b.health,
                        )
                    })
            });
            if unchanged || services.is_empty() {
                continue;
            }
            let ids: Vec<String> = self
                .tracked
                .iter()
                .filter(|(_, t)| &t.installation_id == id)
                .map(|(cid, _)| cid.clone())
                .collect();
            for cid in ids {
                self.persist(&cid);
            }
            let report = crate::link::Report {
                services,
                verdict,
                traceparent: installation.traceparent.clone(),
            };
            self.reported.insert(id.clone(), report.clone());
            self.outbox.put(id.clone(), report);
        }
    }

    /// Publishes what the node runs and what the monitor reported about
    /// it, after a pass.
    pub(super) fn publish_view(
        &self,
        containers: &[Container],
        desired: Option<&pb::DesiredState>,
    ) {
        let observed = containers
            .iter()
            .filter_map(|c| match &c.role {
                plan::Role::Addon {
                    installation,
                    service,
                } => Some(pb::ObservedService {
                    installation_id: installation.clone(),
                    service_name: service.clone(),
                    container_id: c.id.clone(),
                    phase: match self.tracked.get(&c.id) {
                        Some(t) => t.status.phase,
                        None if c.task == plan::Task::Running => ServicePhase::Running.into(),
                        None => ServicePhase::Backoff.into(),
                    },
                }),
                plan::Role::Core { .. } => None,
            })
            .collect();
        let services = self
            .tracked
            .iter()
            .filter(|(_, t)| t.status.phase != 0)
            .map(|(id, t)| (id.clone(), t.status.clone()))
            .collect();
        self.view.send_modify(|view| {
            view.completed_passes += 1;
            view.applied_generation = desired.map_or(0, |d| d.generation);
            view.services = services;
            view.observed = observed;
        });
    }
}
