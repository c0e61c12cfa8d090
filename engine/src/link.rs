//! The manager's end of the monitor link: one bidirectional stream per node.
//!
//! The desired state of the plane is kept in memory, built from the
//! installations at start and updated from the store's change feed, and
//! published through a `watch` channel: every link sends the newest snapshot
//! when it connects and whenever it changes, and a link that was busy simply
//! sends the latest one (level-triggered). Status reports are applied to the
//! installation record in one conditional write, which also records the
//! report's sequence number for its node; only then is the report acked, and
//! a re-sent report whose number is not above the recorded one changes
//! nothing.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use addons_server_kit::{ApiError, Shutdown};
use addons_store::{ChangeKind, Collection, Document, Filter, Precondition, Store};
use oakestra_addons_proto::engine::v1::{self as pb, open_link_request, open_link_response};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast::error::RecvError, mpsc, oneshot, watch};
use tonic::{Code, Status, Streaming};

use crate::{
    convert,
    model::{Installation, InstallationStatus, Plane},
    status,
};

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// A link with no message for this long is considered dead, and a dead
    /// link's node is shown as disconnected this long after it ended.
    pub heartbeat_timeout: Duration,
    /// How long a new link may take to say hello.
    pub hello_timeout: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// The persisted generation counter of a plane's desired state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlaneState {
    id: String,
    generation: u64,
}

impl Document for PlaneState {
    const COLLECTION: &'static str = "planes";
    // A counter, not something anyone watches.
    const LOGGED: bool = false;

    fn id(&self) -> &str {
        &self.id
    }

    fn unique_key(&self) -> Option<String> {
        None
    }

    fn status(&self) -> String {
        String::new()
    }
}

/// The desired state as sent to monitors.
#[derive(Debug, Clone, Default)]
struct Desired {
    generation: u64,
    installations: BTreeMap<String, pb::DesiredInstallation>,
}

impl Desired {
    fn to_proto(&self) -> pb::DesiredState {
        pb::DesiredState {
            generation: self.generation,
            installations: self.installations.values().cloned().collect(),
        }
    }
}

/// Shortest heartbeat interval a monitor may announce.
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest heartbeat interval a monitor may announce: a silent link is
/// dropped after three of them.
const MAX_HEARTBEAT: Duration = Duration::from_secs(300);

/// A link error with its `ErrorInfo` reason.
fn link_error(code: Code, reason: &'static str, message: impl Into<String>) -> Status {
    ApiError::new(code, reason, message).into()
}

/// INVALID_ARGUMENT `INVALID_REQUEST` about one field of a link message.
fn invalid(field: &str, reason: impl Into<String>) -> Status {
    let reason = reason.into();
    ApiError::invalid(format!("{field}: {reason}"), [(field, reason)]).into()
}

/// What monitors must do about an installation; `None` when nothing.
fn desired_entry(installation: &Installation) -> Option<pb::DesiredInstallation> {
    let presence = match installation.status {
        InstallationStatus::Disabled => return None,
        InstallationStatus::Disabling => pb::DesiredPresence::Removed,
        _ => pb::DesiredPresence::Running,
    };
    Some(pb::DesiredInstallation {
        installation_id: installation.id.clone(),
        addon: Some(installation.addon.clone().into_snapshot()),
        marketplace_id: installation.marketplace_id.clone(),
        presence: presence.into(),
        purge_volumes: installation.purge_requested,
        keep_core_stopped_on_failure: installation.keep_core_stopped_on_failure,
    })
}

/// A report waiting for its installation's next write.
#[derive(Debug)]
struct PendingReport {
    node: String,
    sequence: u64,
    services: Vec<crate::model::ServiceStatus>,
    done: oneshot::Sender<Result<(), Status>>,
}

/// The write queue of one installation.
#[derive(Debug, Default)]
struct Writer {
    queue: Mutex<Vec<PendingReport>>,
    turn: tokio::sync::Mutex<()>,
}

/// The links of every connected monitor, and the desired state they follow.
#[derive(Debug, Clone)]
pub struct LinkHub {
    installations: Collection<Installation>,
    plane: Plane,
    desired: watch::Receiver<Arc<Desired>>,
    connected: Arc<Mutex<HashMap<String, u64>>>,
    epochs: Arc<AtomicU64>,
    /// One writer at a time per installation: reports from many nodes for
    /// the same installation queue here and are written together, instead
    /// of racing on its revision.
    writers: Arc<Mutex<HashMap<String, Arc<Writer>>>>,
    options: LinkOptions,
    shutdown: Shutdown,
}

impl LinkHub {
    /// Builds the desired state of `plane` and keeps it current until
    /// `shutdown` fires. Nodes that reported before a restart and do not
    /// reconnect are shown as disconnected after the heartbeat timeout.
    pub async fn start(
        store: &Store,
        plane: Plane,
        options: LinkOptions,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        let installations: Collection<Installation> = store.collection().await?;
        let planes: Collection<PlaneState> = store.collection().await?;
        // Subscribe before reading, so no change falls between the two.
        let changes = installations.watch();
        let all = installations.list_all(&Filter::default()).await?;
        let mut desired = Desired {
            generation: 0,
            installations: all
                .iter()
                .filter_map(|record| desired_entry(&record.value))
                .map(|entry| (entry.installation_id.clone(), entry))
                .collect(),
        };
        desired.generation = bump_generation(&planes, plane).await?;
        let (tx, rx) = watch::channel(Arc::new(desired));
        let hub = Self {
            installations,
            plane,
            desired: rx,
            connected: Arc::default(),
            epochs: Arc::default(),
            writers: Arc::default(),
            options,
            shutdown,
        };
        tokio::spawn(hub.clone().follow(changes, planes, tx));
        let reported: std::collections::BTreeSet<String> = all
            .iter()
            .flat_map(|record| record.value.services.iter().map(|s| s.node_id.clone()))
            .collect();
        for node in reported {
            hub.mark_disconnected_later(node);
        }
        Ok(hub)
    }

    /// Keeps the desired state current from the installations' changes.
    async fn follow(
        self,
        mut changes: tokio::sync::broadcast::Receiver<addons_store::Change<Installation>>,
        planes: Collection<PlaneState>,
        tx: watch::Sender<Arc<Desired>>,
    ) {
        let mut current = (**tx.borrow()).clone();
        loop {
            let changed = tokio::select! {
                () = self.shutdown.fired() => return,
                received = changes.recv() => match received {
                    Ok(change) => {
                        let id = change.record.value.id.clone();
                        let entry = match change.kind {
                            ChangeKind::Deleted => None,
                            ChangeKind::Added | ChangeKind::Modified => desired_entry(&change.record.value),
                        };
                        if current.installations.get(&id) == entry.as_ref() {
                            false
                        } else {
                            match entry {
                                Some(entry) => current.installations.insert(id, entry),
                                None => current.installations.remove(&id),
                            };
                            true
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        // Missed changes: rebuild from the store.
                        match self.installations.list_all(&Filter::default()).await {
                            Ok(all) => {
                                current.installations = all
                                    .iter()
                                    .filter_map(|record| desired_entry(&record.value))
                                    .map(|entry| (entry.installation_id.clone(), entry))
                                    .collect();
                                true
                            }
                            Err(err) => {
                                tracing::error!(error = %err, "cannot rebuild the desired state");
                                false
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            if !changed {
                continue;
            }
            match bump_generation(&planes, self.plane).await {
                Ok(generation) => current.generation = generation,
                // Still strictly greater than what monitors saw.
                Err(err) => {
                    tracing::warn!(error = %err, "cannot persist the desired state's generation");
                    current.generation += 1;
                }
            }
            tx.send_replace(Arc::new(current.clone()));
        }
    }

    /// Serves one link: checks the hello, then runs the link in a task and
    /// returns the stream of messages to the monitor.
    pub async fn connect(
        &self,
        mut inbound: Streaming<pb::OpenLinkRequest>,
    ) -> Result<mpsc::Receiver<Result<pb::OpenLinkResponse, Status>>, Status> {
        let first = tokio::time::timeout(self.options.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                link_error(
                    Code::DeadlineExceeded,
                    "HELLO_TIMEOUT",
                    "no hello within the hello timeout",
                )
            })??;
        let hello = match first.and_then(|m| m.message) {
            Some(open_link_request::Message::Hello(hello)) => hello,
            Some(_) => {
                return Err(invalid(
                    "hello",
                    "the first message of a link must be a hello",
                ));
            }
            None => {
                return Err(invalid(
                    "hello",
                    "the link closed or sent an empty message before its hello",
                ));
            }
        };
        let node = hello.node_id.trim().to_owned();
        if node.is_empty() || node.len() > 253 || node.contains(char::is_whitespace) {
            return Err(invalid(
                "hello.node_id",
                "required, at most 253 characters, no whitespace",
            ));
        }
        let plane = match pb::Plane::try_from(hello.plane).unwrap_or_default() {
            pb::Plane::Root => Plane::Root,
            pb::Plane::Cluster => Plane::Cluster,
            pb::Plane::Unspecified => {
                return Err(invalid(
                    "hello.plane",
                    "required (PLANE_ROOT or PLANE_CLUSTER)",
                ));
            }
        };
        if plane != self.plane {
            let message = format!(
                "this manager serves the {} plane; node {node} belongs to the {} plane",
                convert::plane_name(self.plane),
                convert::plane_name(plane),
            );
            return Err(
                ApiError::new(Code::FailedPrecondition, "PLANE_MISMATCH", message)
                    .precondition(
                        "PLANE",
                        format!("nodes/{node}"),
                        format!(
                            "connect the monitor to the manager of the {} plane",
                            convert::plane_name(plane)
                        ),
                    )
                    .into(),
            );
        }
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut connected = self
                .connected
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if connected.contains_key(&node) {
                return Err(link_error(
                    Code::AlreadyExists,
                    "NODE_ALREADY_CONNECTED",
                    format!("a monitor of node {node} is connected already"),
                ));
            }
            connected.insert(node.clone(), epoch);
        }
        let interval = hello
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::ZERO);
        if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&interval) {
            return Err(invalid(
                "hello.heartbeat_interval",
                format!("required, {MIN_HEARTBEAT:?} to {MAX_HEARTBEAT:?}"),
            ));
        }
        let heartbeat_timeout = self.options.heartbeat_timeout.max(interval * 3);
        tracing::info!(%node, version = %hello.monitor_version, observed = hello.observed.len(), "monitor connected");
        let (tx, rx) = mpsc::channel(16);
        let hub = self.clone();
        tokio::spawn(async move {
            let end = hub.run_link(&node, inbound, &tx, heartbeat_timeout).await;
            if let Err(status) = end {
                tracing::info!(%node, code = ?status.code(), reason = status.message(), "monitor link ended");
                let _ = tx.send(Err(status)).await;
            } else {
                tracing::info!(%node, "monitor link ended");
            }
            hub.unregister(&node, epoch);
            hub.mark_disconnected_later(node);
        });
        Ok(rx)
    }

    async fn run_link(
        &self,
        node: &str,
        mut inbound: Streaming<pb::OpenLinkRequest>,
        tx: &mpsc::Sender<Result<pb::OpenLinkResponse, Status>>,
        heartbeat_timeout: Duration,
    ) -> Result<(), Status> {
        let mut desired = self.desired.clone();
        let send = |message: open_link_response::Message| async move {
            tx.send(Ok(pb::OpenLinkResponse {
                message: Some(message),
            }))
            .await
            .map_err(|_| link_error(Code::Cancelled, "MONITOR_GONE", "the monitor went away"))
        };
        let snapshot = desired.borrow_and_update().to_proto();
        send(open_link_response::Message::DesiredState(snapshot)).await?;
        // Tell the monitor where its numbering stands here (0: nothing
        // stored), so a restarted monitor continues above what is stored
        // instead of being ignored.
        let stored = self.last_sequence(node).await?;
        send(open_link_response::Message::Ack(pb::Ack {
            sequence: stored,
        }))
        .await?;
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.fired() => {
                    return Err(link_error(Code::Unavailable, "SHUTTING_DOWN", "the manager is shutting down; reconnect"));
                }
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Err(link_error(Code::Unavailable, "SHUTTING_DOWN", "the manager is shutting down; reconnect"));
                    }
                    let snapshot = desired.borrow_and_update().to_proto();
                    send(open_link_response::Message::DesiredState(snapshot)).await?;
                }
                received = tokio::time::timeout(heartbeat_timeout, inbound.message()) => {
                    let message = match received {
                        Err(_) => return Err(link_error(
                            Code::DeadlineExceeded,
                            "HEARTBEAT_TIMEOUT",
                            format!("no message from node {node} for {heartbeat_timeout:?}"),
                        )),
                        Ok(Err(status)) => return Err(status),
                        Ok(Ok(None)) => return Ok(()),
                        Ok(Ok(Some(message))) => message,
                    };
                    match message.message {
                        Some(open_link_request::Message::Heartbeat(_)) => {}
                        Some(open_link_request::Message::Report(report)) => {
                            let sequence = report.sequence;
                            self.apply_report(node, report).await?;
                            send(open_link_response::Message::Ack(pb::Ack { sequence })).await?;
                        }
                        Some(open_link_request::Message::Hello(_)) => {
                            return Err(invalid("hello", "a link says hello once"));
                        }
                        None => return Err(invalid("message", "empty message on the link")),
                    }
                }
            }
        }
    }

    /// Persists a report; returns once it is durable (or known to be a
    /// re-send, or about an installation that no longer exists).
    async fn apply_report(&self, node: &str, report: pb::StatusReport) -> Result<(), Status> {
        if report.sequence == 0 {
            return Err(invalid("report.sequence", "starts at 1"));
        }
        if report.installation_id.is_empty() {
            return Err(invalid("report.installation_id", "required"));
        }
        let services = report
            .services
            .into_iter()
            .map(convert::service_status_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|field| invalid("report.services", field.to_string()))?;
        let (done, outcome) = oneshot::channel();
        let writer = self
            .writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(report.installation_id.clone())
            .or_default()
            .clone();
        writer
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(PendingReport {
                node: node.to_owned(),
                sequence: report.sequence,
                services,
                done,
            });
        {
            // Group commit: whoever holds the turn writes every report queued
            // for the installation so far in one store write; the others
            // find theirs already answered.
            let _turn = writer.turn.lock().await;
            let batch: Vec<PendingReport> = std::mem::take(
                &mut *writer
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            if !batch.is_empty() {
                let result = self.write_batch(&report.installation_id, &batch).await;
                for pending in batch {
                    let _ = pending.done.send(result.clone());
                }
            }
        }
        outcome.await.unwrap_or_else(|_| {
            Err(link_error(
                Code::Internal,
                "REPORT_DROPPED",
                "a status report was dropped",
            ))
        })
    }

    /// Applies queued reports for one installation in one conditional write.
    async fn write_batch(&self, id: &str, batch: &[PendingReport]) -> Result<(), Status> {
        let result = self
            .installations
            .modify(id, |installation| {
                let mut changed = false;
                for pending in batch {
                    if installation
                        .report_sequences
                        .get(&pending.node)
                        .is_some_and(|applied| *applied >= pending.sequence)
                    {
                        continue;
                    }
                    installation
                        .report_sequences
                        .insert(pending.node.clone(), pending.sequence);
                    status::apply_report(installation, &pending.node, pending.services.clone());
                    changed = true;
                }
                if changed {
                    installation.update_time = chrono::Utc::now();
                }
                Ok(changed)
            })
            .await;
        match result {
            Ok(record) => {
                if record.value.status == InstallationStatus::Disabled
                    && record.value.purge_requested
                {
                    let condition =
                        Precondition::status_in([InstallationStatus::Disabled.as_str()]);
                    if let Err(err) = self
                        .installations
                        .delete(&record.value.id, &condition)
                        .await
                    {
                        tracing::warn!(id = %record.value.id, error = %err, "cannot purge installation");
                    }
                }
                Ok(())
            }
            // Purged meanwhile: nothing to record.
            Err(addons_store::Error::NotFound { .. }) => {
                self.writers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(id);
                Ok(())
            }
            Err(err) => {
                tracing::warn!(%id, error = %err, "cannot persist status reports");
                Err(link_error(
                    Code::Unavailable,
                    "STORE_UNAVAILABLE",
                    "cannot persist the report; reconnect and send it again",
                ))
            }
        }
    }

    /// The highest report sequence number stored for `node`.
    async fn last_sequence(&self, node: &str) -> Result<u64, Status> {
        let all = self
            .installations
            .list_all(&Filter::default())
            .await
            .map_err(|err| {
                tracing::warn!(%node, error = %err, "cannot read report sequences");
                link_error(
                    Code::Unavailable,
                    "STORE_UNAVAILABLE",
                    "the store is unavailable; reconnect",
                )
            })?;
        Ok(all
            .iter()
            .filter_map(|record| record.value.report_sequences.get(node).copied())
            .max()
            .unwrap_or(0))
    }

    fn unregister(&self, node: &str, epoch: u64) {
        let mut connected = self
            .connected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if connected.get(node) == Some(&epoch) {
            connected.remove(node);
        }
    }

    fn is_connected(&self, node: &str) -> bool {
        self.connected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(node)
    }

    /// After the heartbeat timeout, shows `node`'s services as unknown
    /// unless its monitor reconnected.
    fn mark_disconnected_later(&self, node: String) {
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = hub.shutdown.fired() => return,
                () = tokio::time::sleep(hub.options.heartbeat_timeout) => {}
            }
            if hub.is_connected(&node) {
                return;
            }
            let all = match hub.installations.list_all(&Filter::default()).await {
                Ok(all) => all,
                Err(err) => {
                    tracing::warn!(%node, error = %err, "cannot mark a disconnected node");
                    return;
                }
            };
            for record in all {
                if !record.value.services.iter().any(|s| s.node_id == node) {
                    continue;
                }
                let result = hub
                    .installations
                    .modify(&record.value.id, |installation| {
                        if hub.is_connected(&node) {
                            return Ok(false);
                        }
                        Ok(status::mark_disconnected(installation, &node))
                    })
                    .await;
                if let Err(err) = result {
                    tracing::warn!(%node, error = %err, "cannot mark a disconnected node");
                }
            }
            tracing::info!(%node, "node shown as disconnected");
        });
    }
}

async fn bump_generation(planes: &Collection<PlaneState>, plane: Plane) -> anyhow::Result<u64> {
    let id = convert::plane_name(plane);
    match planes
        .modify(id, |state| {
            state.generation += 1;
            Ok(true)
        })
        .await
    {
        Ok(record) => Ok(record.value.generation),
        Err(addons_store::Error::NotFound { .. }) => {
            let state = PlaneState {
                id: id.to_owned(),
                generation: 1,
            };
            match planes.insert(state).await {
                Ok(record) => Ok(record.value.generation),
                // Created concurrently: bump that one.
                Err(addons_store::Error::AlreadyExists { .. }) => {
                    Box::pin(bump_generation(planes, plane)).await
                }
                Err(err) => Err(err.into()),
            }
        }
        Err(err) => Err(err.into()),
    }
}
