//! Background verification of addons under review.
//!
//! The queue is the database: every addon in `under_review` is pending work.
//! At start the verifier picks all of them up again, honouring each one's
//! `next_attempt_time`, so a crash or restart loses no verification. An
//! attempt inspects every service image on its registry (manifests and
//! configurations, never layers) and ends in one atomic update:
//!
//! - every image passed: each service's `resolved_image` is pinned by digest
//!   and the addon is `approved`;
//! - an image failed for good: `failed_verification`, with a reason per
//!   service;
//! - otherwise a registry could not answer: the addon stays `under_review`
//!   with `attempts`, `last_error` and `next_attempt_time`, retried with
//!   exponential backoff and jitter.
//!
//! The update names the revision the attempt started from; if the addon
//! changed meanwhile (re-verify, delete), the result is dropped and the
//! attempt runs again on the new state.
//!
//! Marketplace replicas sharing one store (MongoDB) each follow every
//! addon under review, whichever replica it was published on, so one that
//! dies leaves no work behind. Before an attempt, a replica *claims* it: a
//! conditional write of its name and an expiry into the record. The others
//! leave a claimed addon alone until the claim expires, so the registry
//! sees each attempt once.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use addons_backoff::Backoff;
use addons_server_kit::Shutdown;
use addons_store::{Change, ChangeKind, Collection, Filter, Precondition, Versioned};
use chrono::Utc;
use tokio::{
    sync::{
        broadcast::{self, error::RecvError},
        mpsc,
    },
    task::JoinSet,
    time::Instant,
};

use addons_server_kit::metrics::{
    BoundedValues, Metrics,
    kinds::{Counter, EncodeLabelSet, Family, Histogram, Latencies, latencies, long},
};

use crate::{
    model::{Addon, AddonStatus, Claim, ServiceVerification, SignatureCheck, Verification},
    registry::{CheckError, Registry},
};
use addons_signature::{Signed, TrustPolicy};

/// How verification runs.
#[derive(Debug, Clone)]
pub struct VerifierOptions {
    /// Addons verified at the same time.
    pub concurrency: usize,
    /// Delays between retries after a transient error (jittered, so
    /// retries of many addons spread out).
    pub backoff: Backoff,
    /// Where attempts and registry checks are counted.
    pub metrics: VerifierMetrics,
    /// This replica's name in its claims; unique per process.
    pub replica: String,
    /// How long a claim keeps other replicas off an attempt: longer than
    /// any attempt takes (the registry timeout bounds its checks).
    pub claim_for: Duration,
    /// Which keys must have signed which images; none: signatures are not
    /// checked.
    pub trust: Option<Arc<TrustPolicy>>,
}

impl Default for VerifierOptions {
    fn default() -> Self {
        Self {
            concurrency: 4,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            metrics: VerifierMetrics::default(),
            replica: addons_store::new_id(),
            claim_for: Duration::from_secs(120),
            trust: None,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabels {
    registry: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    registry: String,
    outcome: &'static str,
}

/// The verifier's metrics: attempts by outcome and their duration, and
/// the registry checks by registry (the first 64 registries seen; any
/// later one is `other`) and outcome.
#[derive(Debug, Clone)]
pub struct VerifierMetrics {
    attempts: Family<OutcomeLabels, Counter>,
    attempt_seconds: Histogram,
    checks: Family<CheckLabels, Counter>,
    check_seconds: Latencies<RegistryLabels>,
    registries: BoundedValues,
}

impl Default for VerifierMetrics {
    fn default() -> Self {
        Self::new(&Metrics::new())
    }
}

impl VerifierMetrics {
    /// The verifier's metrics, registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            attempts: metrics.add(
                "addons_verifications",
                "Verification attempts, by outcome: approved, failed (verification failed), retried (a registry could not answer)",
                Family::default(),
            ),
            attempt_seconds: metrics.add(
                "addons_verification_seconds",
                "Time of a verification attempt's registry checks",
                long(),
            ),
            checks: metrics.add(
                "addons_registry_checks",
                "Image checks on registries, by registry and outcome: ok, failed (for good), unavailable (to retry)",
                Family::default(),
            ),
            check_seconds: metrics.add(
                "addons_registry_check_seconds",
                "Time of one image check (manifests and configurations), by registry",
                latencies(),
            ),
            registries: BoundedValues::new(64),
        }
    }

    fn checked<T>(&self, image: &str, elapsed: Duration, result: &Result<T, CheckError>) {
        let registry = self.registries.get(
            image
                .parse::<oci_client::Reference>()
                .map(|reference| reference.registry().to_owned())
                .as_deref()
                .unwrap_or("invalid"),
        );
        let outcome = match result {
            Ok(_) => "ok",
            Err(CheckError::Definite { .. } | CheckError::Signature(_)) => "failed",
            Err(CheckError::Transient(_)) => "unavailable",
        };
        self.check_seconds
            .get_or_create(&RegistryLabels {
                registry: registry.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.checks
            .get_or_create(&CheckLabels { registry, outcome })
            .inc();
    }

    fn attempted(&self, outcome: &'static str, elapsed: Duration) {
        self.attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.attempt_seconds.observe(elapsed.as_secs_f64());
    }
}

/// Hands addon ids to the verifier. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VerifyQueue {
    wake: mpsc::UnboundedSender<String>,
    /// This replica and how long its claims last, where replicas share
    /// the store.
    claims: Option<(String, Duration)>,
}

impl VerifyQueue {
    /// A claim on an addon's next attempt by this replica, to store with a
    /// write that puts it in review (publish, reverify): the replica that
    /// takes the request verifies it, without a write of its own to claim
    /// it. None where no other replica shares the store.
    pub fn claim(&self) -> Option<Claim> {
        self.claims.as_ref().map(|(replica, claim_for)| Claim {
            owner: replica.clone(),
            expires: Utc::now()
                + chrono::Duration::from_std(*claim_for).unwrap_or(chrono::Duration::MAX),
        })
    }

    /// Asks for a verification of `id` now. The addon's status in the store
    /// decides whether one runs.
    pub fn enqueue(&self, id: &str) {
        // A closed channel means the verifier stopped at shutdown; the addon
        // stays under review and is picked up at the next start.
        let _ = self.wake.send(id.to_owned());
    }
}

/// What one attempt decided.
enum Outcome {
    /// Final, or nothing to do.
    Done,
    /// Try again at this time.
    RetryAt(Instant),
    /// The addon changed under the attempt: run again now.
    Again,
}

/// When this replica should next attempt `addon`, under review: when its
/// retry is due, or when another replica's claim on it expires. `None`
/// while this replica holds the claim.
fn due_at(addon: &Addon, replica: &str) -> Option<Instant> {
    let verification = &addon.verification;
    match &verification.claim {
        Some(claim) if claim.owner == replica => None,
        Some(claim) if claim.expires > Utc::now() => Some(instant_of(claim.expires)),
        _ => Some(
            verification
                .next_attempt_time
                .map(instant_of)
                .unwrap_or_else(Instant::now),
        ),
    }
}

/// Every addon under review, by when it is due.
async fn pending(
    addons: &Collection<Addon>,
    options: &VerifierOptions,
    shutdown: &Shutdown,
) -> Option<HashMap<String, Instant>> {
    let under_review = Filter {
        statuses: vec![AddonStatus::UnderReview.as_str().to_owned()],
        ..Filter::default()
    };
    loop {
        match addons.list_all(&under_review).await {
            Ok(pending) => {
                return Some(
                    pending
                        .into_iter()
                        .filter_map(|record| {
                            let at = due_at(&record.value, &options.replica)?;
                            Some((record.value.id, at))
                        })
                        .collect(),
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot list addons under review; retrying");
                tokio::select! {
                    () = shutdown.fired() => return None,
                    () = tokio::time::sleep(options.backoff.base()) => {}
                }
            }
        }
    }
}

/// Starts the verifier: it resumes every addon under review and then takes
/// ids from the returned queue until `shutdown` fires.
pub fn spawn(
    addons: Collection<Addon>,
    registry: Arc<Registry>,
    options: VerifierOptions,
    shutdown: Shutdown,
) -> VerifyQueue {
    let (wake, rx) = mpsc::unbounded_channel();
    let claims = addons
        .shared()
        .then(|| (options.replica.clone(), options.claim_for));
    tokio::spawn(run(addons, registry, options, rx, shutdown));
    VerifyQueue { wake, claims }
}

async fn run(
    addons: Collection<Addon>,
    registry: Arc<Registry>,
    options: VerifierOptions,
    mut wake: mpsc::UnboundedReceiver<String>,
    shutdown: Shutdown,
) {
    // Where other replicas share the store, their publishes and expired
    // claims are this replica's work too.
    let mut others = addons.shared().then(|| addons.watch());
    let Some(mut due) = pending(&addons, &options, &shutdown).await else {
        return;
    };
    tracing::info!(pending = due.len(), "verification resumed");
    let mut running: JoinSet<(String, Outcome)> = JoinSet::new();
    let mut busy: HashSet<String> = HashSet::new();
    // Ids asked for again while an attempt for them runs.
    let mut again: HashSet<String> = HashSet::new();
    loop {
        let now = Instant::now();
        let mut ready: Vec<String> = due
            .iter()
            .filter(|(id, at)| **at <= now && !busy.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        ready.sort();
        for id in ready
            .into_iter()
            .take(options.concurrency.saturating_sub(busy.len()))
        {
            due.remove(&id);
            busy.insert(id.clone());
            let addons = addons.clone();
            let registry = registry.clone();
            let options = options.clone();
            running.spawn(async move {
                let outcome = attempt(&addons, &registry, &options, &id).await;
                (id, outcome)
            });
        }
        let next = due
            .iter()
            .filter(|(id, _)| !busy.contains(*id))
            .map(|(_, at)| *at)
            .min();
        let at_capacity = busy.len() >= options.concurrency;
        tokio::select! {
            () = shutdown.fired() => break,
            Some(id) = wake.recv() => {
                if busy.contains(&id) {
                    again.insert(id);
                } else {
                    due.insert(id, Instant::now());
                }
            }
            Some(joined) = running.join_next(), if !running.is_empty() => {
                let Ok((id, outcome)) = joined else { continue };
                busy.remove(&id);
                let asked_again = again.remove(&id);
                match outcome {
                    Outcome::Again => { due.insert(id, Instant::now()); }
                    _ if asked_again => { due.insert(id, Instant::now()); }
                    Outcome::RetryAt(at) => { due.insert(id, at); }
                    Outcome::Done => {}
                }
            }
            () = sleep_until(next), if next.is_some() && !at_capacity => {}
            received = next_change(&mut others), if others.is_some() => match received {
                Ok(change) => {
                    let addon = &change.record.value;
                    if change.kind != ChangeKind::Deleted
                        && addon.status == AddonStatus::UnderReview
                        && !busy.contains(&addon.id)
                        && let Some(at) = due_at(addon, &options.replica)
                    {
                        due.insert(addon.id.clone(), at);
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    let Some(all) = pending(&addons, &options, &shutdown).await else { break };
                    for (id, at) in all {
                        if !busy.contains(&id) {
                            due.insert(id, at);
                        }
                    }
                }
                Err(RecvError::Closed) => others = None,
            },
        }
    }
    running.abort_all();
}

async fn next_change(
    changes: &mut Option<broadcast::Receiver<Change<Addon>>>,
) -> Result<Change<Addon>, RecvError> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn instant_of(time: chrono::DateTime<Utc>) -> Instant {
    let wait = (time - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    Instant::now() + wait
}

/// What nodes are sent of a verified signature.
fn image_signature(signed: &Signed) -> addons_descriptor::ImageSignature {
    addons_descriptor::ImageSignature {
        // A payload that passed is JSON, so UTF-8.
        payload: String::from_utf8_lossy(&signed.candidate.payload).into_owned(),
        signature: signed.candidate.signature.clone(),
        key_fingerprint: signed.fingerprint.clone(),
    }
}

/// The delay before retry number `attempts` (1 is the first).
fn backoff(options: &VerifierOptions, attempts: u32) -> Duration {
    options.backoff.jittered(attempts.saturating_sub(1))
}

/// Claims the next attempt at `current` for this replica, or says when to
/// look again: another replica holds an unexpired claim, or the addon
/// changed.
async fn claim(
    addons: &Collection<Addon>,
    options: &VerifierOptions,
    current: Versioned<Addon>,
) -> Result<Versioned<Addon>, Outcome> {
    if let Some(claim) = &current.value.verification.claim
        && claim.expires > Utc::now()
    {
        if claim.owner == options.replica {
            // Claimed with the write that put it in review, or with this
            // replica's last attempt.
            return Ok(current);
        }
        return Err(Outcome::RetryAt(instant_of(claim.expires)));
    }
    let mut addon = current.value;
    addon.verification.claim = Some(Claim {
        owner: options.replica.clone(),
        expires: Utc::now()
            + chrono::Duration::from_std(options.claim_for).unwrap_or(chrono::Duration::MAX),
    });
    let condition = Precondition {
        revision: Some(current.revision),
        status_in: vec![AddonStatus::UnderReview.as_str().to_owned()],
    };
    let id = addon.id.clone();
    match addons.replace(addon, &condition).await {
        Ok(claimed) => Ok(claimed),
        Err(addons_store::Error::Conflict { .. }) => Err(Outcome::Again),
        Err(addons_store::Error::NotFound { .. }) => Err(Outcome::Done),
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot claim a verification");
            Err(Outcome::RetryAt(Instant::now() + options.backoff.base()))
        }
    }
}

async fn attempt(
    addons: &Collection<Addon>,
    registry: &Registry,
    options: &VerifierOptions,
    id: &str,
) -> Outcome {
    let current = match addons.get_latest(id).await {
        Ok(Some(record)) if record.value.status == AddonStatus::UnderReview => record,
        Ok(_) => return Outcome::Done,
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot load addon to verify");
            return Outcome::RetryAt(Instant::now() + options.backoff.base());
        }
    };
    let current = if addons.shared() {
        match claim(addons, options, current).await {
            Ok(claimed) => claimed,
            Err(outcome) => return outcome,
        }
    } else {
        current
    };
    let started = std::time::Instant::now();
    let checks = current
        .value
        .descriptor
        .services
        .iter()
        .map(|service| async {
            // An approved version back in review keeps its pins: the check
            // is that each pinned digest still resolves, never what the tag
            // points to now.
            let reference = service.resolved_image.as_deref().unwrap_or(&service.image);
            let start = std::time::Instant::now();
            let result = match registry
                .inspect(reference, !service.command.is_empty())
                .await
            {
                Ok(inspection) => match options.trust.as_deref() {
                    Some(trust) => registry
                        .check_signature(trust, &current.value.descriptor.name, &inspection)
                        .await
                        .map(|signed| (inspection, signed)),
                    None => Ok((inspection, None)),
                },
                Err(err) => Err(err),
            };
            options.metrics.checked(reference, start.elapsed(), &result);
            result
        });
    let all = futures::future::join_all(checks);
    let results = if addons.shared() {
        // A claimed attempt ends well before its claim does, or another
        // replica could start the same one.
        let within = options.claim_for * 2 / 3;
        match tokio::time::timeout(within, all).await {
            Ok(results) => results,
            Err(_) => {
                let late = format!("the registry checks took longer than {within:?}");
                current
                    .value
                    .descriptor
                    .services
                    .iter()
                    .map(|_| Err(CheckError::Transient(late.clone())))
                    .collect()
            }
        }
    } else {
        all.await
    };
    let checked_in = started.elapsed();

    let mut addon = current.value.clone();
    let now = Utc::now();
    let attempts = addon.verification.attempts + 1;
    let mut services = Vec::new();
    let mut definite = Vec::new();
    let mut transient = None;
    for (service, result) in addon.descriptor.services.iter().zip(&results) {
        let mut verdict = ServiceVerification {
            service_name: service.service_name.clone(),
            image: service.image.clone(),
            ..ServiceVerification::default()
        };
        match result {
            Ok((inspection, signed)) => {
                verdict.ok = true;
                verdict.resolved_image = Some(inspection.resolved.clone());
                verdict.platforms = inspection.platforms.clone();
                verdict.bytes_fetched = inspection.bytes_fetched;
                verdict.signature = signed.as_ref().map(|signed| SignatureCheck {
                    key_name: signed.key_name.clone(),
                    key_fingerprint: signed.fingerprint.clone(),
                    check_time: now,
                });
            }
            Err(CheckError::Signature(refusal)) => {
                let reason = refusal.to_string();
                verdict.reason = Some(reason.clone());
                verdict.reason_code = Some(refusal.code.as_str().to_owned());
                definite.push(format!("{}: {reason}", service.service_name));
            }
            Err(CheckError::Definite {
                reason,
                bytes_fetched,
            }) => {
                let reason = match &service.resolved_image {
                    Some(pinned) => format!(
                        "the registry lost pinned image {pinned} (the approved digest no longer resolves): {reason}"
                    ),
                    None => reason.clone(),
                };
                verdict.reason = Some(reason.clone());
                verdict.reason_code = Some("IMAGE_INVALID".to_owned());
                verdict.bytes_fetched = *bytes_fetched;
                definite.push(format!("{}: {reason}", service.service_name));
            }
            Err(CheckError::Transient(reason)) => {
                verdict.reason = Some(reason.clone());
                transient.get_or_insert_with(|| reason.clone());
            }
        }
        services.push(verdict);
    }
    // A definite failure or approval completes the attempt; a transient
    // error schedules the next one.
    let (last_error, retry_in, reason) = if !definite.is_empty() {
        addon.status = AddonStatus::FailedVerification;
        (None, None, Some(definite.join("; ")))
    } else if let Some(error) = transient {
        (Some(error), Some(backoff(options, attempts)), None)
    } else {
        for ((service, verdict), result) in addon
            .descriptor
            .services
            .iter_mut()
            .zip(&services)
            .zip(&results)
        {
            service.resolved_image = verdict.resolved_image.clone();
            service.image_signature = match result {
                Ok((_, Some(signed))) => Some(image_signature(signed)),
                _ => None,
            };
        }
        addon.status = AddonStatus::Approved;
        (None, None, None)
    };
    addon.verification = Verification {
        attempts,
        last_error,
        next_attempt_time: retry_in.map(|delay| now + delay),
        complete_time: retry_in.is_none().then_some(now),
        services,
        reason,
        // This replica keeps the addon it retries: the claim lasts until
        // the next attempt is over.
        claim: match (retry_in, addons.shared()) {
            (Some(delay), true) => Some(Claim {
                owner: options.replica.clone(),
                expires: now
                    + delay
                    + chrono::Duration::from_std(options.claim_for)
                        .unwrap_or(chrono::Duration::MAX),
            }),
            _ => None,
        },
    };
    let outcome = match retry_in {
        Some(delay) => Outcome::RetryAt(Instant::now() + delay),
        None => Outcome::Done,
    };
    addon.update_time = now;
    let condition = Precondition {
        revision: Some(current.revision),
        status_in: vec![AddonStatus::UnderReview.as_str().to_owned()],
    };
    match addons.replace(addon, &condition).await {
        Ok(stored) => {
            let outcome_label = match (retry_in, stored.value.status) {
                (Some(_), _) => "retried",
                (None, AddonStatus::Approved) => "approved",
                (None, _) => "failed",
            };
            options.metrics.attempted(outcome_label, checked_in);
            tracing::info!(
                %id,
                status = stored.value.status.as_str(),
                attempts,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "verification attempt finished"
            );
            outcome
        }
        Err(addons_store::Error::Conflict { .. }) => Outcome::Again,
        Err(addons_store::Error::NotFound { .. }) => Outcome::Done,
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot store verification result");
            Outcome::RetryAt(Instant::now() + options.backoff.base())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let options = VerifierOptions {
            concurrency: 1,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            ..VerifierOptions::default()
        };
        for attempts in 1..40 {
            let full =
                Duration::from_secs(1 << (attempts - 1).min(20)).min(Duration::from_secs(30));
            let delay = backoff(&options, attempts);
            assert!(delay <= full && delay >= full / 2, "{attempts}: {delay:?}");
        }
    }
}
