//! The monitor's end of the link to the manager: connect with jittered
//! exponential backoff, say hello, follow the desired state, send numbered
//! status reports and keep each until the manager acks it, re-sending what
//! is unacked after a reconnect.
//!
//! With several manager addresses (an active manager of the plane and its
//! standbys), a link that fails moves on to the next address at once; a
//! standby's refusal (UNAVAILABLE `STANDBY`) is not the manager failing,
//! so it does not lengthen the backoff: the monitor keeps asking every
//! [`STANDBY_RETRY`] until one of them is active.

mod outbox;

pub use self::outbox::{Report, ReportOutbox};

use std::{collections::BTreeMap, time::Duration};

use addons_server_kit::Shutdown;
use oakestra_addons_proto::engine::v1::{
    self as pb, monitor_link_service_client::MonitorLinkServiceClient, open_link_request,
    open_link_response,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{now, view::NodeView};

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// gRPC URLs of the plane's managers (the active one and its
    /// standbys), tried in turn; at least one.
    pub managers: Vec<String>,
    /// This node.
    pub node_id: String,
    /// This node's plane.
    pub plane: pb::Plane,
    /// This node's labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// How often to send a heartbeat.
    pub heartbeat: Duration,
    /// Reconnect delays (jittered).
    pub backoff: addons_backoff::Backoff,
    /// TLS and token for the manager.
    pub credentials: addons_server_kit::ClientCredentials,
}

/// What the reconciler sees of the link.
#[derive(Debug, Clone)]
pub struct LinkHandle {
    /// The newest desired state, `None` until the first one arrives.
    pub desired: watch::Receiver<Option<pb::DesiredState>>,
    /// Whether the link is up.
    pub connected: watch::Receiver<bool>,
}

/// Starts the link; it runs until `shutdown` fires. `view` tells the hello
/// what runs on the node right now; reports are taken from `outbox`.
pub fn spawn(
    settings: LinkSettings,
    view: watch::Receiver<NodeView>,
    outbox: ReportOutbox,
    shutdown: Shutdown,
) -> LinkHandle {
    let (desired_tx, desired_rx) = watch::channel(None);
    let (connected_tx, connected_rx) = watch::channel(false);
    tokio::spawn(run(
        settings,
        view,
        desired_tx,
        outbox,
        connected_tx,
        shutdown,
    ));
    LinkHandle {
        desired: desired_rx,
        connected: connected_rx,
    }
}

/// Reports not acked yet, in sequence order, at most one per installation:
/// a newer report about an installation supersedes an unacked older one.
#[derive(Debug, Default)]
struct Unacked {
    next_sequence: u64,
    reports: BTreeMap<u64, pb::StatusReport>,
}

impl Unacked {
    fn push(&mut self, installation_id: String, report: Report) -> pb::StatusReport {
        self.next_sequence = self.next_sequence.max(1);
        self.reports
            .retain(|_, report| report.installation_id != installation_id);
        let report = pb::StatusReport {
            sequence: self.next_sequence,
            installation_id,
            services: report.services,
            observe_time: Some(now()),
            verdict: report.verdict,
            traceparent: report.traceparent,
        };
        self.next_sequence += 1;
        self.reports.insert(report.sequence, report.clone());
        report
    }

    fn ack(&mut self, sequence: u64) {
        self.reports.retain(|seq, _| *seq > sequence);
        // Numbering continues above what the manager has stored.
        self.next_sequence = self.next_sequence.max(sequence + 1);
    }
}

async fn run(
    settings: LinkSettings,
    view: watch::Receiver<NodeView>,
    desired: watch::Sender<Option<pb::DesiredState>>,
    outbox: ReportOutbox,
    connected: watch::Sender<bool>,
    shutdown: Shutdown,
) {
    let reports = outbox;
    let mut unacked = Unacked::default();
    let mut failures = 0_u32;
    let mut next = 0_usize;
    let mut round_saw_standby = false;
    loop {
        let started = std::time::Instant::now();
        let manager = &settings.managers[next % settings.managers.len().max(1)];
        let node = NodeSide {
            view: &view,
            desired: &desired,
            reports: &reports,
            connected: &connected,
        };
        let result = session(&settings, manager, &node, &mut unacked, &shutdown).await;
        connected.send_replace(false);
        if shutdown.is_fired() {
            return;
        }
        let standby = match &result {
            Ok(()) => {
                tracing::info!(%manager, "manager closed the link");
                false
            }
            Err(err) if is_standby(err) => {
                tracing::debug!(%manager, error = %err, "a standby manager");
                true
            }
            Err(err) => {
                tracing::warn!(%manager, error = %err, "link to the manager failed");
                false
            }
        };
        // A link that stayed up for a while resets the backoff.
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        next = (next + 1) % settings.managers.len().max(1);
        round_saw_standby |= standby;
        let delay = if standby {
            STANDBY_RETRY
        } else if next != 0 {
            // Addresses left to try this round.
            Duration::ZERO
        } else if round_saw_standby {
            // A standby answered: the plane is between two active
            // managers, not down.
            STANDBY_RETRY
        } else {
            failures = failures.saturating_add(1);
            settings.backoff.jittered(failures - 1)
        };
        if next == 0 {
            round_saw_standby = false;
        }
        tokio::select! {
            () = shutdown.fired() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// A desired state from the manager, through the node's intake: what it
/// refuses is reported FAILED and kept from the reconciler.
fn accept(state: pb::DesiredState, node_id: &str, reports: &ReportOutbox) -> pb::DesiredState {
    let (state, refused) = crate::intake::take(state, node_id);
    for (installation_id, services) in refused {
        let report = Report {
            services,
            verdict: None,
            traceparent: String::new(),
        };
        reports.put(installation_id, report);
    }
    state
}

/// How soon a monitor asks again after a standby's refusal.
const STANDBY_RETRY: Duration = Duration::from_millis(250);

/// Whether a link failed because the manager reached stands by.
fn is_standby(err: &anyhow::Error) -> bool {
    err.downcast_ref::<tonic::Status>()
        .and_then(addons_server_kit::reason_of)
        .is_some_and(|reason| reason == "STANDBY")
}

/// What the link shares with the rest of the monitor.
#[derive(Clone, Copy)]
struct NodeSide<'a> {
    /// What runs on the node.
    view: &'a watch::Receiver<NodeView>,
    /// The desired state, for the reconciler.
    desired: &'a watch::Sender<Option<pb::DesiredState>>,
    /// Reports to send.
    reports: &'a ReportOutbox,
    /// Whether the link is up.
    connected: &'a watch::Sender<bool>,
}

async fn session(
    settings: &LinkSettings,
    manager: &str,
    node: &NodeSide<'_>,
    unacked: &mut Unacked,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let NodeSide {
        view,
        desired,
        reports,
        connected,
    } = *node;
    let channel = settings
        .credentials
        .endpoint(manager)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(64);
    // The pass that the handshake's desired state starts reports every
    // installation (before the hello, so that pass finds the request).
    reports.ask_for_everything();
    let hello = pb::Hello {
        node_id: settings.node_id.clone(),
        plane: settings.plane.into(),
        monitor_version: env!("CARGO_PKG_VERSION").to_owned(),
        observed: view.borrow().observed.clone(),
        applied_generation: desired.borrow().as_ref().map_or(0, |d| d.generation),
        heartbeat_interval: prost_types::Duration::try_from(settings.heartbeat).ok(),
        accepts_desired_state_chunks: true,
        labels: settings.labels.clone(),
    };
    tx.send(pb::OpenLinkRequest {
        message: Some(open_link_request::Message::Hello(hello)),
    })
    .await?;
    let mut inbound =
        MonitorLinkServiceClient::with_interceptor(channel, settings.credentials.authorize()?)
            .open_link(ReceiverStream::new(rx))
            .await?
            .into_inner();
    // The link opens with the desired state and an ack of what is stored.
    let mut assembler = Assembler::default();
    let mut handshake_acked = false;
    while !handshake_acked {
        let message = inbound
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("link closed during the handshake"))?;
        handshake_acked =
            inbound_message(message, &mut assembler, unacked, desired, settings, reports)?;
    }
    connected.send_replace(true);
    tracing::info!(%manager, "linked to the manager");
    for report in unacked.reports.values() {
        tx.send(pb::OpenLinkRequest {
            message: Some(open_link_request::Message::Report(report.clone())),
        })
        .await?;
    }
    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            () = shutdown.fired() => return Ok(()),
            _ = heartbeat.tick() => {
                tx.send(pb::OpenLinkRequest {
                    message: Some(open_link_request::Message::Heartbeat(pb::Heartbeat { send_time: Some(now()) })),
                })
                .await?;
            }
            () = reports.ready() => {
                for (installation_id, report) in reports.take() {
                    let report = unacked.push(installation_id, report);
                    tx.send(pb::OpenLinkRequest {
                        message: Some(open_link_request::Message::Report(report)),
                    })
                    .await?;
                }
            }
            message = inbound.message() => {
                let Some(message) = message? else { return Ok(()) };
                inbound_message(message, &mut assembler, unacked, desired, settings, reports)?;
            }
        }
    }
}

/// Takes one message from the manager: a desired state (whole, or a chunk
/// that completes one) goes through the intake to the reconciler, an ack
/// clears what it acknowledges. Returns whether it was an ack.
fn inbound_message(
    message: pb::OpenLinkResponse,
    assembler: &mut Assembler,
    unacked: &mut Unacked,
    desired: &watch::Sender<Option<pb::DesiredState>>,
    settings: &LinkSettings,
    reports: &ReportOutbox,
) -> anyhow::Result<bool> {
    let state = match message.message {
        Some(open_link_response::Message::DesiredState(state)) => Some(state),
        Some(open_link_response::Message::DesiredStateChunk(chunk)) => assembler.apply(chunk)?,
        Some(open_link_response::Message::Ack(ack)) => {
            unacked.ack(ack.sequence);
            return Ok(true);
        }
        None => None,
    };
    if let Some(state) = state {
        desired.send_replace(Some(accept(state, &settings.node_id, reports)));
    }
    Ok(false)
}

/// Puts the desired state together from its chunks: a run that starts
/// with `reset` replaces the state, any other run changes it, and the state
/// is handed on only when a run is complete.
#[derive(Debug, Default)]
struct Assembler {
    installations: BTreeMap<String, pb::DesiredInstallation>,
    /// A full sync began on this link.
    synced: bool,
}

impl Assembler {
    /// Applies one chunk; returns the whole state when its run completes.
    fn apply(&mut self, chunk: pb::DesiredStateChunk) -> anyhow::Result<Option<pb::DesiredState>> {
        if chunk.reset {
            self.installations.clear();
            self.synced = true;
        } else if !self.synced {
            anyhow::bail!("the manager sent desired-state changes before the full state");
        }
        for id in &chunk.removed_installation_ids {
            self.installations.remove(id);
        }
        for upsert in chunk.upserts {
            self.installations
                .insert(upsert.installation_id.clone(), upsert);
        }
        Ok(chunk.complete.then(|| pb::DesiredState {
            generation: chunk.generation,
            installations: self.installations.values().cloned().collect(),
        }))
    }
}

/// Says in `works` whether the link to the manager is up, or down for no
/// longer than `grace` (a relink takes less): a node is not ready only
/// when its manager has been out of reach for a while. Ends when
/// `shutdown` fires.
pub fn watch_link_readiness(
    mut connected: watch::Receiver<bool>,
    works: watch::Sender<bool>,
    grace: std::time::Duration,
    shutdown: addons_server_kit::Shutdown,
) {
    tokio::spawn(async move {
        loop {
            let up = *connected.borrow_and_update();
            if up {
                works.send_replace(true);
            } else {
                tokio::select! {
                    () = shutdown.fired() => return,
                    () = tokio::time::sleep(grace) => {
                        if !*connected.borrow() {
                            tracing::warn!(?grace, "the link to the manager has been down too long: not ready");
                            works.send_replace(false);
                        }
                    }
                    changed = connected.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                () = shutdown.fired() => return,
                changed = connected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installation(id: &str) -> pb::DesiredInstallation {
        pb::DesiredInstallation {
            installation_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn assembles_the_desired_state_from_runs_of_chunks() {
        let mut assembler = Assembler::default();
        let change = pb::DesiredStateChunk {
            generation: 1,
            complete: true,
            ..Default::default()
        };
        assert!(
            assembler.apply(change).is_err(),
            "changes need a full state first"
        );
        let first = pb::DesiredStateChunk {
            generation: 2,
            reset: true,
            upserts: vec![installation("a"), installation("b")],
            ..Default::default()
        };
        assert_eq!(assembler.apply(first).unwrap(), None, "not complete yet");
        let last = pb::DesiredStateChunk {
            generation: 2,
            upserts: vec![installation("c")],
            complete: true,
            ..Default::default()
        };
        let state = assembler.apply(last).unwrap().unwrap();
        assert_eq!(state.generation, 2);
        assert_eq!(state.installations.len(), 3);
        let change = pb::DesiredStateChunk {
            generation: 3,
            upserts: vec![installation("d")],
            removed_installation_ids: vec!["a".into()],
            complete: true,
            ..Default::default()
        };
        let state = assembler.apply(change).unwrap().unwrap();
        let ids: Vec<&str> = state
            .installations
            .iter()
            .map(|i| i.installation_id.as_str())
            .collect();
        assert_eq!((state.generation, ids), (3, vec!["b", "c", "d"]));
        // A new full sync replaces everything.
        let reset = pb::DesiredStateChunk {
            generation: 4,
            reset: true,
            complete: true,
            ..Default::default()
        };
        assert!(
            assembler
                .apply(reset)
                .unwrap()
                .unwrap()
                .installations
                .is_empty()
        );
    }

    #[test]
    fn unacked_keeps_the_newest_report_per_installation_and_numbers_above_acks() {
        let mut unacked = Unacked::default();
        assert_eq!(unacked.push("a".into(), Report::default()).sequence, 1);
        assert_eq!(unacked.push("b".into(), Report::default()).sequence, 2);
        assert_eq!(unacked.push("a".into(), Report::default()).sequence, 3);
        assert_eq!(unacked.reports.keys().copied().collect::<Vec<_>>(), [2, 3]);
        unacked.ack(2);
        assert_eq!(unacked.reports.keys().copied().collect::<Vec<_>>(), [3]);
        // A manager that stored more (a restarted monitor) moves numbering up.
        unacked.ack(10);
        assert!(unacked.reports.is_empty());
        assert_eq!(unacked.push("a".into(), Report::default()).sequence, 11);
    }
}
