//! Status reports on their way to the manager: the newest per installation.
//!
//! The reconciler puts a report and goes on, whether the link is up or not;
//! a newer report about the same installation replaces the older one. So
//! the outbox never holds more than one report per installation, and a long
//! manager outage never stops the reconciler. The link takes what is there
//! whenever it is up.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use oakestra_addons_proto::engine::v1 as pb;
use tokio::sync::Notify;

/// What the node says about one installation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Its services' statuses on the node.
    pub services: Vec<pb::ServiceStatus>,
    /// While a release rolls out on the node: how it goes.
    pub verdict: Option<pb::ReleaseVerdict>,
    /// The trace of the call whose work it tells of (its installation's
    /// `traceparent`); empty: none.
    pub traceparent: String,
}

/// Reports waiting for the link, the newest per installation.
#[derive(Debug, Clone, Default)]
pub struct ReportOutbox {
    pending: Arc<Mutex<BTreeMap<String, Report>>>,
    ready: Arc<Notify>,
    everything: Arc<AtomicBool>,
}

impl ReportOutbox {
    /// Puts the newest statuses of `installation`'s services on this node,
    /// replacing any not taken yet. Never waits.
    pub fn put(&self, installation: String, report: Report) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(installation, report);
        self.ready.notify_one();
    }

    /// Takes every waiting report, in installation order.
    pub fn take(&self) -> Vec<(String, Report)> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
            .into_iter()
            .collect()
    }

    /// Waits until something was put since the last wait.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Asks for a report about every installation, changed or not: a new
    /// link starts with them, so the manager's records say what the node
    /// runs whatever it missed or marked while the node was away (its
    /// services shown as disconnected, say).
    pub fn ask_for_everything(&self) {
        self.everything.store(true, Ordering::SeqCst);
    }

    /// Whether a report about every installation was asked for since the
    /// last call.
    pub fn everything_asked(&self) -> bool {
        self.everything.swap(false, Ordering::SeqCst)
    }

    /// How many reports wait.
    pub fn len(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no report waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(reason: &str) -> Report {
        Report {
            services: vec![pb::ServiceStatus {
                reason: reason.into(),
                ..Default::default()
            }],
            verdict: None,
            traceparent: String::new(),
        }
    }

    #[tokio::test]
    async fn keeps_the_newest_per_installation_and_never_waits() {
        let outbox = ReportOutbox::default();
        // Far more puts than any channel would hold: none of them waits.
        for i in 0..100_000 {
            outbox.put(format!("i{}", i % 3), status(&i.to_string()));
        }
        assert_eq!(outbox.len(), 3);
        outbox.ready().await;
        let taken = outbox.take();
        assert_eq!(
            taken
                .iter()
                .map(|(id, r)| (id.as_str(), r.services[0].reason.as_str()))
                .collect::<Vec<_>>(),
            [("i0", "99999"), ("i1", "99997"), ("i2", "99998")]
        );
        assert!(outbox.is_empty());
    }
}
