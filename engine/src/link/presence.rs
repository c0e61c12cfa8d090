//! Which nodes are linked, and what each node reported on: kept in memory
//! (seeded from the records at start, then updated by every report this
//! manager writes, as the only writer of installation records), so a hello
//! and a dropped link cost the same however many installations exist.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{Error, model::Installation};

/// What the manager knows of one node's reports.
#[derive(Debug, Default)]
struct NodeReports {
    /// The highest report sequence number stored for it.
    last_sequence: u64,
    /// The installations it reported on.
    installations: BTreeSet<String>,
}

/// The linked nodes and their reports.
#[derive(Debug, Default)]
pub(super) struct Presence {
    /// Node → epoch of its current link.
    connected: Mutex<HashMap<String, u64>>,
    epochs: AtomicU64,
    nodes: Mutex<HashMap<String, NodeReports>>,
}

impl Presence {
    /// Seeded from the stored installations; returns the nodes that
    /// reported before.
    pub(super) fn seed<'a>(
        &self,
        records: impl IntoIterator<Item = &'a Installation>,
    ) -> Vec<String> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        for installation in records {
            for service in &installation.services {
                nodes
                    .entry(service.node_id.clone())
                    .or_default()
                    .installations
                    .insert(installation.id.clone());
            }
            for (node, sequence) in &installation.report_sequences {
                let entry = nodes.entry(node.clone()).or_default();
                entry.last_sequence = entry.last_sequence.max(*sequence);
                entry.installations.insert(installation.id.clone());
            }
        }
        nodes.keys().cloned().collect()
    }

    /// Registers a link of `node`; returns its epoch.
    pub(super) fn register(&self, node: &str) -> Result<u64, Error> {
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        let mut connected = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connected.contains_key(node) {
            return Err(Error::NodeAlreadyConnected(node.to_owned()));
        }
        connected.insert(node.to_owned(), epoch);
        Ok(epoch)
    }

    /// Ends the link of `node` with `epoch`, unless a newer one replaced it.
    pub(super) fn unregister(&self, node: &str, epoch: u64) {
        let mut connected = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connected.get(node) == Some(&epoch) {
            connected.remove(node);
        }
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
        let first = presence.register("n1").unwrap();
        assert!(matches!(
            presence.register("n1"),
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
}
