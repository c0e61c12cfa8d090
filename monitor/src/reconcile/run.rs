//! The trigger loop: a pass whenever anything may have changed (a new
//! desired state, a task exit from containerd's event stream, a finished
//! pull or health check, a restart or verdict that became due, the
//! periodic resync), and never more than one at a time.

use std::time::{Duration, Instant};

use addons_server_kit::Shutdown;
use futures::StreamExt as _;
use oakestra_addons_proto::engine::v1 as pb;
use tokio::sync::watch;

use super::{ReconcileOptions, Reconciler};
use crate::link::ReportOutbox;
use crate::view::NodeView;

/// Runs the reconciler until `shutdown` fires. Addon containers keep
/// running when it stops.
pub async fn run(
    runtime: crate::Containerd,
    options: ReconcileOptions,
    node_id: String,
    mut desired: watch::Receiver<Option<pb::DesiredState>>,
    outbox: ReportOutbox,
    view: watch::Sender<NodeView>,
    shutdown: Shutdown,
) {
    let mut reconciler = Reconciler::new(runtime, options, node_id, outbox, view);
    let mut resync = tokio::time::interval(reconciler.cx.options.resync);
    let mut exits = None;
    loop {
        if exits.is_none() {
            match reconciler.cx.runtime.task_exits().await {
                Ok(stream) => exits = Some(stream),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot subscribe to containerd's task exits; retrying at the next resync");
                    reconciler.cx.runtime.reset().await;
                }
            }
        }
        let state = desired.borrow_and_update().clone();
        let started = Instant::now();
        let passed = reconciler.pass(state.as_ref()).await;
        reconciler
            .cx
            .options
            .metrics
            .pass(passed.is_ok(), started.elapsed());
        let wake_at = match passed {
            Ok(wake_at) => wake_at,
            Err(err) => {
                tracing::warn!(error = %err, "reconcile pass failed; retrying at the next resync");
                if err.is_unavailable() {
                    reconciler.cx.runtime.reset().await;
                    exits = None;
                }
                None
            }
        };
        // While pulls run, pass twice a second to report their progress.
        let progress_tick = reconciler
            .pulls
            .any_running()
            .then(|| Instant::now() + Duration::from_millis(500));
        let wake_at = [wake_at, progress_tick].into_iter().flatten().min();
        tokio::select! {
            () = shutdown.fired() => return,
            changed = desired.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            exit = async {
                match exits.as_mut() {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            } => {
                match exit {
                    Some(Ok(exit)) => tracing::debug!(container = %exit.container_id, status = exit.exit_status, "task exited"),
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "containerd's event stream failed");
                        exits = None;
                    }
                    None => exits = None,
                }
            }
            _ = resync.tick() => {}
            image = reconciler.pulls.finished() => tracing::debug!(%image, "pull finished"),
            () = reconciler.health.finished() => {}
            () = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}
