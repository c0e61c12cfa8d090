//! Which nodes are linked, and what each node reported on: kept in memory
//! (seeded from the records at start, then updated by every report this
//! manager writes, as the only writer of installation records), so a hello
//! and a dropped link cost the same however many installations exist.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::Error;

/// What the manager knows of one node's reports.
#[derive(Debug, Default)]
struct NodeReports {
    /// The highest report sequence number stored for it.
    last_sequence: u64,
    /// The installations it reported on.
    installations: BTreeSet<String>,
}

/// The current link of a node.
#[derive(Debug)]
struct Link {
    epoch: u64,
    /// Who opened it; empty without authentication.
    subject: String,
    /// Fired when a newer link of the same identity replaces it.
    replaced: Arc<tokio::sync::Notify>,
}

/// The linked nodes and their reports.
#[derive(Debug, Default)]
pub(super) struct Presence {
    /// Node → its current link.
    connected: Mutex<HashMap<String, Link>>,
    epochs: AtomicU64,
    nodes: Mutex<HashMap<String, NodeReports>>,
}

impl Presence {
    /// Seeded from the stored statuses, as (installation, node, last
    /// sequence); returns the nodes that reported before.
    pub(super) fn seed(
        &self,
        reported: impl IntoIterator<Item = (String, String, u64)>,
    ) -> Vec<String> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        for (installation, node, sequence) in reported {
            let entry = nodes.entry(node).or_default();
            entry.last_sequence = entry.last_sequence.max(sequence);
            entry.installations.insert(installation);
        }
        nodes.keys().cloned().collect()
    }

    /// Registers a link of `node` opened by `subject` (empty without
    /// authentication); returns its epoch and what fires when a newer link
    /// replaces it. A link of an authenticated identity replaces that
    /// identity's earlier link of the node (a half-open stream behind a
    /// sidecar must not lock the node out); any other second link is
    /// refused.
    pub(super) fn register(
        &self,
        node: &str,
        subject: &str,
    ) -> Result<(u64, Arc<tokio::sync::Notify>), Error> {
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        let mut connected = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = connected.get(node) {
            if subject.is_empty() || current.subject != subject {
                return Err(Error::NodeAlreadyConnected(node.to_owned()));
            }
            current.replaced.notify_one();
        }
        let replaced = Arc::new(tokio::sync::Notify::new());
        connected.insert(
            node.to_owned(),
            Link {
                epoch,
                subject: subject.to_owned(),
                replaced: replaced.clone(),
            },
        );
        Ok((epoch, replaced))
    }

    /// Ends the link of `node` with `epoch`, unless a newer one replaced it.
    pub(super) fn unregister(&self, node: &str, epoch: u64) {
        let mut connected = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connected.get(node).is_some_and(|link| link.epoch == epoch) {
            connected.remove(node);
        }
    }

    /// Whether the link of `node` with `epoch` is its current one.
    pub(super) fn is_current(&self, node: &str, epoch: u64) -> bool {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .is_some_and(|link| link.epoch == epoch)
    }

    /// Whether `node` is linked.
    pub(super) fn is_connected(&self, node: &str) -> bool {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(node)
    }

    /// The highest report sequence number stored for `node`.
    pub(super) fn last_sequence(&self, node: &str) -> u64 {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .map_or(0, |n| n.last_sequence)
    }

    /// Notes that a report of `node` about `installation` is stored.
    pub(super) fn stored(&self, node: &str, installation: &str, sequence: u64) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = nodes.entry(node.to_owned()).or_default();
        entry.last_sequence = entry.last_sequence.max(sequence);
        entry.installations.insert(installation.to_owned());
    }

    /// The installations `node` reported on.
    pub(super) fn installations_of(&self, node: &str) -> Vec<String> {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .map(|n| n.installations.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a node: what it reported on and its sequence numbers.
    pub(super) fn forget_node(&self, node: &str) {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(node);
    }

    /// Forgets an installation that is gone.
    pub(super) fn forget_installation(&self, installation: &str) {
        for node in self
            .nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values_mut()
        {
            node.installations.remove(installation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_link_per_node_and_sequences_only_grow() {
        let presence = Presence::default();
        let (first, _) = presence.register("n1", "").unwrap();
        assert!(matches!(
            presence.register("n1", ""),
            Err(Error::NodeAlreadyConnected(_))
        ));
        presence.unregister("n1", first + 100);
        assert!(presence.is_connected("n1"), "a stale epoch changes nothing");
        presence.unregister("n1", first);
        assert!(!presence.is_connected("n1"));
        presence.stored("n1", "i1", 5);
        presence.stored("n1", "i2", 3);
        assert_eq!(presence.last_sequence("n1"), 5);
        assert_eq!(presence.installations_of("n1"), ["i1", "i2"]);
        presence.forget_installation("i1");
        assert_eq!(presence.installations_of("n1"), ["i2"]);
        assert_eq!(presence.last_sequence("other"), 0);
    }

    #[tokio::test]
    async fn the_same_identity_replaces_its_link_and_no_other_does() {
        let presence = Presence::default();
        let (first, replaced) = presence.register("n1", "n1").unwrap();
        assert!(matches!(
            presence.register("n1", "n2"),
            Err(Error::NodeAlreadyConnected(_))
        ));
        let (second, _) = presence.register("n1", "n1").unwrap();
        replaced.notified().await;
        presence.unregister("n1", first);
        assert!(
            presence.is_connected("n1"),
            "the old link's end removes nothing"
        );
        presence.unregister("n1", second);
        assert!(!presence.is_connected("n1"));
    }
}
