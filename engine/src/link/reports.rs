//! Status reports: each is applied to its installation's record in one
//! conditional write that also records the report's sequence number for
//! its node; only then is it acked, and a re-sent report whose number is
//! not above the recorded one changes nothing. Reports of many nodes about
//! one installation are written together (group commit) instead of racing
//! on its revision.

use std::sync::{Mutex, PoisonError};

use addons_store::Precondition;
use oakestra_addons_proto::engine::v1 as pb;
use tokio::sync::oneshot;

use super::LinkHub;
use crate::{
    Error, convert,
    model::InstallationStatus,
    rollout::{self, Verdict},
    status,
};

/// A report waiting for its installation's next write.
#[derive(Debug)]
struct PendingReport {
    node: String,
    sequence: u64,
    services: Vec<crate::model::ServiceStatus>,
    verdict: Option<(u64, Verdict)>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The write queue of one installation.
#[derive(Debug, Default)]
pub(super) struct Writer {
    queue: Mutex<Vec<PendingReport>>,
    turn: tokio::sync::Mutex<()>,
}

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
    /// Persists a report; returns once it is durable (or known to be a
    /// re-send, or about an installation that no longer exists).
    pub(super) async fn apply_report(
        &self,
        node: &str,
        report: pb::StatusReport,
    ) -> Result<(), Error> {
        let (services, verdict, report) = check_report(report)?;
        let (done, outcome) = oneshot::channel();
        let writer = self
            .writers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(report.installation_id.clone())
            .or_default()
            .clone();
        writer
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(PendingReport {
                node: node.to_owned(),
                sequence: report.sequence,
                services,
                verdict,
                done,
            });
        {
            // Group commit: whoever holds the turn writes every report queued
            // for the installation so far in one store write; the others
            // find theirs already answered.
            let _turn = writer.turn.lock().await;
            let batch: Vec<PendingReport> =
                std::mem::take(&mut *writer.queue.lock().unwrap_or_else(PoisonError::into_inner));
            if !batch.is_empty() {
                let result = self.write_batch(&report.installation_id, &batch).await;
                if result.is_ok() {
                    for pending in &batch {
                        self.presence.stored(
                            &pending.node,
                            &report.installation_id,
                            pending.sequence,
                        );
                    }
                }
                let shared = result.map_err(|err| err.to_string());
                for pending in batch {
                    let _ = pending.done.send(shared.clone());
                }
            }
        }
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => {
                tracing::warn!(%node, error = %message, "cannot persist status reports");
                Err(Error::ReportNotStored(message))
            }
            Err(_) => Err(Error::ReportDropped),
        }
    }

    /// Applies queued reports for one installation in one conditional write.
    async fn write_batch(&self, id: &str, batch: &[PendingReport]) -> Result<(), Error> {
        let result = self
            .installations
            .modify(id, |installation| {
                // Only an installation in the desired state is a node's to
                // report on: anything else (a late report, or a forgery) is
                // acked and not stored.
                if installation.status == InstallationStatus::Disabled {
                    return Ok(false);
                }
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
                    if let Some((release, verdict)) = &pending.verdict
                        && rollout::on_verdict(
                            installation,
                            &pending.node,
                            *release,
                            verdict,
                            chrono::Utc::now(),
                        )
                    {
                        status::recompute(installation);
                    }
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
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(id);
                self.presence.forget_installation(id);
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }
}
