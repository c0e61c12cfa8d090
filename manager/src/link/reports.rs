//! Status reports: one writer task applies them in batches (group commit):
//! the reports that arrive while a batch is written go together in the
//! next, one write of every installation they touch (`modify_many`), each
//! installation's reports in one change that also records each node's
//! report sequence number. Only then is each report acked, and a re-sent
//! report whose number is not above the recorded one changes nothing.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use anyhow::Context as _;
use oakestra_addons_proto::engine::v1 as pb;
use tokio::sync::oneshot;

use super::LinkHub;
use crate::{
    Error, convert,
    model::{Installation, InstallationStatus},
    records::Change,
    rollout::{self, Verdict},
    status,
};

/// A report waiting for its installation's next write.
#[derive(Debug)]
struct PendingReport {
    installation: String,
    report: Report,
    done: oneshot::Sender<Result<(), String>>,
}

/// What a report says, checked.
#[derive(Debug)]
struct Report {
    node: String,
    sequence: u64,
    services: Vec<crate::model::ServiceStatus>,
    verdict: Option<(u64, Verdict)>,
    /// The link placed the installation on the node.
    placed: bool,
    /// The node's labels, as its hello gave them.
    labels: std::sync::Arc<std::collections::BTreeMap<String, String>>,
    /// The link it came on.
    epoch: u64,
}

/// Reports waiting for the writer task, which wakes when one comes.
#[derive(Debug, Default)]
pub(super) struct Writer {
    queue: Mutex<Vec<PendingReport>>,
    wake: tokio::sync::Notify,
    /// Reports dropped because they were about installations never placed
    /// on their node.
    refused: std::sync::atomic::AtomicU64,
}

/// Most reports one group commit writes.
const MAX_BATCH: usize = 2048;

/// A report's services and its verdict on a rolling-out release.
type Checked = (
    Vec<crate::model::ServiceStatus>,
    Option<(u64, Verdict)>,
    pb::StatusReport,
);

/// Checks what a report says and converts its statuses and verdict; the
/// report comes back without them.
pub(super) fn check_report(mut report: pb::StatusReport) -> Result<Checked, Error> {
    if report.sequence == 0 {
        return Err(Error::invalid("report.sequence", "starts at 1"));
    }
    if report.installation_id.is_empty() {
        return Err(Error::required("report.installation_id"));
    }
    let services = std::mem::take(&mut report.services)
        .into_iter()
        .map(convert::service_status_from_proto)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|field| Error::invalid("report.services", field.to_string()))?;
    let verdict = match report.verdict.take() {
        None => None,
        Some(verdict) => {
            let state = match pb::ReleaseVerdictState::try_from(verdict.state) {
                Ok(pb::ReleaseVerdictState::Progressing) => Verdict::Progressing,
                Ok(pb::ReleaseVerdictState::Healthy) => Verdict::Healthy,
                Ok(pb::ReleaseVerdictState::Failed) => {
                    let mut reason = verdict.reason;
                    if reason.len() > 4096 {
                        let mut end = 4096;
                        while !reason.is_char_boundary(end) {
                            end -= 1;
                        }
                        reason.truncate(end);
                    }
                    Verdict::Failed(reason)
                }
                _ => {
                    return Err(Error::invalid(
                        "report.verdict.state",
                        "PROGRESSING, HEALTHY or FAILED",
                    ));
                }
            };
            Some((verdict.release, state))
        }
    };
    Ok((services, verdict, report))
}

impl LinkHub {
    /// Hands a report to the writer task; the receiver answers once it is
    /// durable (or known to be a re-send, or about an installation that no
    /// longer exists), with why not otherwise.
    pub(super) fn enqueue_report(
        &self,
        (node, epoch): (&str, u64),
        report: pb::StatusReport,
        placed: bool,
        labels: &std::sync::Arc<std::collections::BTreeMap<String, String>>,
    ) -> Result<oneshot::Receiver<Result<(), String>>, Error> {
        let (services, verdict, report) = check_report(report)?;
        let (done, outcome) = oneshot::channel();
        self.writer
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(PendingReport {
                installation: report.installation_id.clone(),
                report: Report {
                    node: node.to_owned(),
                    sequence: report.sequence,
                    services,
                    verdict,
                    placed,
                    labels: labels.clone(),
                    epoch,
                },
                done,
            });
        self.writer.wake.notify_one();
        Ok(outcome)
    }

    /// Starts the writer task on a thread of its own. Under a burst of
    /// reports the runtime's workers are busy reading links, and a task
    /// woken after each store step would queue behind them; the writer is
    /// what every link waits for, so it does not queue.
    pub(super) fn spawn_writer(self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("status-writer-io")
            .build()
            .context("cannot build the status writer's runtime")?;
        std::thread::Builder::new()
            .name("status-writer".to_owned())
            .spawn(move || runtime.block_on(self.write_reports()))
            .context("cannot start the status writer")?;
        Ok(())
    }

    /// The writer task: group commit. While one batch is written, the
    /// reports that arrive meanwhile queue up and go together in the next,
    /// so the writes per report shrink as the load grows. Runs until
    /// shutdown.
    pub(super) async fn write_reports(self) {
        loop {
            tokio::select! {
                () = self.shutdown.fired() => return,
                () = self.writer.wake.notified() => {}
            }
            loop {
                let batch: Vec<PendingReport> = {
                    let mut queue = self
                        .writer
                        .queue
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    let take = queue.len().min(MAX_BATCH);
                    queue.drain(..take).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let started = std::time::Instant::now();
                let reports = batch.len();
                self.write_batch(batch).await;
                tracing::debug!(reports, took = ?started.elapsed(), "status reports written");
            }
        }
    }

    /// Applies a batch of reports, each installation's in one change, and
    /// answers each report.
    async fn write_batch(&self, batch: Vec<PendingReport>) {
        // A report whose link ended before it was written is not: the
        // node's next link may carry other labels (what it placed there
        // was dropped at its hello), and the monitor sends every report
        // again on it.
        let (batch, ended): (Vec<PendingReport>, Vec<PendingReport>) = batch
            .into_iter()
            .partition(|p| self.presence.is_current(&p.report.node, p.report.epoch));
        for pending in ended {
            self.options.metrics.dropped("not_stored");
            let _ = pending
                .done
                .send(Err("its link ended before it was stored".to_owned()));
        }
        // Per installation: what its reports say (moved into its change),
        // and who waits for each.
        type Waiting = (String, u64, oneshot::Sender<Result<(), String>>);
        let mut by_installation: BTreeMap<String, (Vec<Report>, Vec<Waiting>)> = BTreeMap::new();
        for PendingReport {
            installation,
            report,
            done,
        } in batch
        {
            let entry = by_installation.entry(installation).or_default();
            entry.1.push((report.node.clone(), report.sequence, done));
            entry.0.push(report);
        }
        let mut waiting = Vec::with_capacity(by_installation.len());
        let mut changes: Vec<(String, Option<u64>, Change<'_>)> =
            Vec::with_capacity(by_installation.len());
        for (id, (mut reports, acks)) in by_installation {
            waiting.push((id.clone(), acks));
            let writer = self.writer.clone();
            let metrics = self.options.metrics.clone();
            let change: Change<'_> = Box::new(move |installation: &mut Installation| {
                for (node, refused) in not_placed(installation, &mut reports) {
                    metrics.dropped("not_placed");
                    let total = writer
                        .refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    tracing::warn!(
                        target: "audit",
                        subject = %node,
                        method = "OpenLink/Report",
                        resource = %installation.id,
                        outcome = "DROPPED",
                        reason = "REPORT_NOT_PLACED",
                        sequence = refused,
                        refused_total = total,
                    );
                }
                Ok(apply_reports(installation, &mut reports))
            });
            changes.push((id, None, change));
        }
        let results = self.installations.modify_many(changes).await;
        for ((id, reports), result) in waiting.into_iter().zip(results) {
            let outcome = match result {
                Ok(record) => {
                    if let Err(err) = self.installations.purge_if_done(&record).await {
                        tracing::warn!(%id, error = %err, "cannot purge installation");
                    }
                    Ok(())
                }
                // Purged meanwhile: nothing to record.
                Err(addons_store::Error::NotFound { .. }) => {
                    self.presence.forget_installation(&id);
                    Ok(())
                }
                Err(err) => Err(err.to_string()),
            };
            for (node, sequence, done) in reports {
                if outcome.is_ok() {
                    self.presence.stored(&node, &id, sequence);
                }
                let _ = done.send(outcome.clone());
            }
        }
    }
}

/// Takes out the reports of nodes the installation is not placed on: a
/// node that was not sent the installation on its link, whose labels the
/// installation's selector does not match, and that has no report stored
/// about it from before, has nothing to say about it. A compromised node
/// could otherwise write any installation's statuses and steer rollouts.
/// Returns each dropped report's node and sequence.
fn not_placed(installation: &Installation, reports: &mut Vec<Report>) -> Vec<(String, u64)> {
    let mut dropped = Vec::new();
    reports.retain(|report| {
        let known = report.placed
            || addons_descriptor::labels::matches(&installation.node_selector, &report.labels)
            || installation.report_sequences.contains_key(&report.node);
        if !known {
            dropped.push((report.node.clone(), report.sequence));
        }
        known
    });
    dropped
}

/// Applies one installation's queued reports (their statuses move into
/// it); whether anything changed.
fn apply_reports(installation: &mut Installation, reports: &mut [Report]) -> bool {
    // Only an installation in the desired state is a node's to report on:
    // anything else (a late report, or a forgery) is acked and not stored.
    if installation.status == InstallationStatus::Disabled {
        return false;
    }
    let mut fresh = Vec::new();
    let mut verdicts = Vec::new();
    for pending in reports {
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
        fresh.push((pending.node.clone(), std::mem::take(&mut pending.services)));
        if let Some((release, verdict)) = &pending.verdict {
            verdicts.push((pending.node.as_str(), *release, verdict));
        }
    }
    if fresh.is_empty() {
        return false;
    }
    status::apply_reports(installation, fresh);
    let now = chrono::Utc::now();
    let mut moved = false;
    for (node, release, verdict) in verdicts {
        moved |= rollout::on_verdict(installation, node, release, verdict, now);
    }
    if moved {
        status::recompute(installation);
    }
    installation.update_time = now;
    true
}
