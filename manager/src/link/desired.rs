//! The plane's desired state: projected from the installation records,
//! kept current from the store's change feed, numbered by a persisted
//! generation, and cut into bounded chunks for the monitors.
//!
//! Entries are shared (`Arc`) between successive versions of the state, so
//! what changed between two versions is found by pointer, not by comparing
//! every installation's snapshot.

use std::{collections::BTreeMap, sync::Arc};

use addons_store::{ChangeKind, Collection};
use oakestra_addons_proto::engine::v1 as pb;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast::error::RecvError, watch};

use crate::{
    convert,
    model::{Installation, InstallationStatus, Plane},
    records::Installations,
};

/// The installations of one chunk add up to at most this many encoded
/// bytes, unless a single one is larger (at most the descriptor bound of
/// 1 MiB, well within the 4 MiB message limit).
pub(super) const CHUNK_BYTES: usize = 1 << 20;

/// The persisted generation counter of a plane's desired state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PlaneState {
    id: String,
    generation: u64,
}

// A counter, not something anyone watches.
addons_store::document!(PlaneState in "planes", unlogged);

/// The desired state as sent to monitors.
#[derive(Debug, Clone, Default)]
pub(super) struct Desired {
    pub(super) generation: u64,
    pub(super) installations: BTreeMap<String, Arc<pb::DesiredInstallation>>,
}

impl Desired {
    /// Projects the installation records.
    pub(super) fn from_records<'a>(records: impl IntoIterator<Item = &'a Installation>) -> Self {
        Self {
            generation: 0,
            installations: records
                .into_iter()
                .filter_map(desired_entry)
                .map(|entry| (entry.installation_id.clone(), Arc::new(entry)))
                .collect(),
        }
    }

    /// The whole state in one message, for monitors that take no chunks:
    /// what a node with `labels` runs.
    pub(super) fn to_proto(&self, labels: &Labels) -> pb::DesiredState {
        pb::DesiredState {
            generation: self.generation,
            installations: self
                .installations
                .values()
                .filter(|i| placed(i, labels))
                .map(|i| (**i).clone())
                .collect(),
        }
    }

    /// The ids of the installations a node with `labels` runs.
    pub(super) fn placed_ids<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = &'a String> {
        self.installations
            .iter()
            .filter(|(_, entry)| placed(entry, labels))
            .map(|(id, _)| id)
    }

    /// The whole state of a node with `labels` as a run of chunks, the
    /// first with `reset`.
    pub(super) fn full_chunks(&self, labels: &Labels) -> Vec<pb::DesiredStateChunk> {
        chunks(
            self.generation,
            true,
            self.installations
                .values()
                .filter(|i| placed(i, labels))
                .cloned()
                .collect(),
            Vec::new(),
        )
    }

    /// What changed for a node with `labels` since `earlier`, as a run of
    /// chunks; empty when nothing did.
    pub(super) fn chunks_since(
        &self,
        earlier: &Self,
        labels: &Labels,
    ) -> Vec<pb::DesiredStateChunk> {
        let upserts: Vec<Arc<pb::DesiredInstallation>> = self
            .installations
            .iter()
            .filter(|(_, entry)| placed(entry, labels))
            .filter(|(id, entry)| {
                earlier.installations.get(*id).is_none_or(|old| {
                    !placed(old, labels) || (!Arc::ptr_eq(old, entry) && old != *entry)
                })
            })
            .map(|(_, entry)| entry.clone())
            .collect();
        let removed: Vec<String> = earlier
            .installations
            .iter()
            .filter(|(_, old)| placed(old, labels))
            .filter(|(id, _)| {
                self.installations
                    .get(*id)
                    .is_none_or(|now| !placed(now, labels))
            })
            .map(|(id, _)| id.clone())
            .collect();
        if upserts.is_empty() && removed.is_empty() && self.generation == earlier.generation {
            return Vec::new();
        }
        chunks(self.generation, false, upserts, removed)
    }
}

/// A node's labels.
pub(super) type Labels = BTreeMap<String, String>;

/// Whether a node with `labels` runs `entry`.
fn placed(entry: &pb::DesiredInstallation, labels: &Labels) -> bool {
    addons_descriptor::labels::matches(&entry.node_selector, labels)
}

/// Cuts upserts into chunks of at most [`CHUNK_BYTES`] (and at least one
/// installation); removals go with the first chunk.
fn chunks(
    generation: u64,
    reset: bool,
    upserts: Vec<Arc<pb::DesiredInstallation>>,
    removed: Vec<String>,
) -> Vec<pb::DesiredStateChunk> {
    let mut chunks = vec![pb::DesiredStateChunk {
        generation,
        reset,
        upserts: Vec::new(),
        removed_installation_ids: removed,
        complete: false,
    }];
    let mut bytes = 0;
    for entry in upserts {
        let size = entry.encoded_len();
        let current = chunks.last_mut().unwrap_or_else(|| unreachable!());
        if !current.upserts.is_empty() && bytes + size > CHUNK_BYTES {
            chunks.push(pb::DesiredStateChunk {
                generation,
                ..Default::default()
            });
            bytes = 0;
        }
        bytes += size;
        chunks
            .last_mut()
            .unwrap_or_else(|| unreachable!())
            .upserts
            .push((*entry).clone());
    }
    if let Some(last) = chunks.last_mut() {
        last.complete = true;
    }
    chunks
}

/// What monitors must do about an installation; `None` when nothing.
pub(super) fn desired_entry(installation: &Installation) -> Option<pb::DesiredInstallation> {
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
        granted_privileges: installation
            .granted_privileges
            .iter()
            .cloned()
            .map(Into::into)
            .collect(),
        release: installation.release,
        traceparent: installation.trace_parent.clone().unwrap_or_default(),
        rollout: installation.rollout.as_ref().and_then(|rollout| {
            let previous = crate::rollout::find(installation, rollout.from_release)?;
            Some(pb::RolloutPlan {
                previous_release: previous.number,
                previous_addon: Some(previous.addon.clone().into_snapshot()),
                previous_granted_privileges: previous
                    .granted_privileges
                    .iter()
                    .cloned()
                    .map(Into::into)
                    .collect(),
                target_nodes: crate::rollout::targets(rollout),
                min_healthy_time: prost_types::Duration::try_from(rollout.min_healthy_time).ok(),
            })
        }),
        node_selector: installation
            .node_selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// Keeps the desired state current from the installations' changes until
/// the feed closes or `shutdown` fires.
pub(super) async fn follow(
    installations: Installations,
    mut changes: tokio::sync::broadcast::Receiver<addons_store::Change<Installation>>,
    planes: Collection<PlaneState>,
    plane: Plane,
    tx: watch::Sender<Arc<Desired>>,
    mut tally: crate::metrics::Tally,
    shutdown: addons_server_kit::Shutdown,
) {
    let mut current = (**tx.borrow()).clone();
    loop {
        let changed = tokio::select! {
            () = shutdown.fired() => return,
            received = changes.recv() => match received {
                Ok(change) => {
                    let id = change.record.value.id.clone();
                    let record = match change.kind {
                        ChangeKind::Deleted => None,
                        ChangeKind::Added | ChangeKind::Modified => Some(&change.record.value),
                    };
                    tally.saw(&id, record);
                    let entry = record.and_then(desired_entry);
                    if current.installations.get(&id).map(|e| &**e) == entry.as_ref() {
                        false
                    } else {
                        match entry {
                            Some(entry) => current.installations.insert(id, Arc::new(entry)),
                            None => current.installations.remove(&id),
                        };
                        true
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    // Missed changes: rebuild from the store.
                    match installations.list_records().await {
                        Ok(all) => {
                            let records: Vec<&Installation> = all.iter().map(|r| &r.value).collect();
                            tally.saw_all(&records);
                            let rebuilt = Desired::from_records(records.iter().copied());
                            // Unchanged entries keep their Arc, so links send
                            // only what really changed.
                            for (id, entry) in rebuilt.installations {
                                if current.installations.get(&id) != Some(&entry) {
                                    current.installations.insert(id, entry);
                                }
                            }
                            let all_ids: std::collections::BTreeSet<&str> =
                                all.iter().map(|r| r.value.id.as_str()).collect();
                            current.installations.retain(|id, _| all_ids.contains(id.as_str()));
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
        match bump_generation(&planes, plane).await {
            Ok(generation) => current.generation = generation,
            // Still strictly greater than what monitors saw.
            Err(err) => {
                tracing::warn!(error = %err, "cannot persist the desired state's generation");
                current.generation += 1;
            }
        }
        tally
            .metrics()
            .desired_generation
            .set(i64::try_from(current.generation).unwrap_or(i64::MAX));
        tx.send_replace(Arc::new(current.clone()));
    }
}

/// Increments and returns the plane's persisted generation.
pub(super) async fn bump_generation(
    planes: &Collection<PlaneState>,
    plane: Plane,
) -> anyhow::Result<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, payload: usize) -> Arc<pb::DesiredInstallation> {
        Arc::new(pb::DesiredInstallation {
            installation_id: id.into(),
            marketplace_id: "x".repeat(payload),
            ..Default::default()
        })
    }

    /// Applies chunks the way a monitor does.
    fn apply(
        state: &mut BTreeMap<String, pb::DesiredInstallation>,
        chunks: &[pb::DesiredStateChunk],
    ) {
        for chunk in chunks {
            if chunk.reset {
                state.clear();
            }
            for id in &chunk.removed_installation_ids {
                state.remove(id);
            }
            for upsert in &chunk.upserts {
                state.insert(upsert.installation_id.clone(), upsert.clone());
            }
        }
    }

    #[test]
    fn chunks_stay_bounded_and_add_up_to_the_state() {
        let desired = Desired {
            generation: 7,
            installations: (0..200)
                .map(|i| (format!("i{i:03}"), entry(&format!("i{i:03}"), 45_000)))
                .collect(),
        };
        let chunks = desired.full_chunks(&Labels::new());
        assert!(chunks.len() >= 9, "{} chunks", chunks.len());
        assert!(chunks[0].reset && chunks.iter().skip(1).all(|c| !c.reset));
        assert!(chunks.last().unwrap().complete);
        assert!(chunks.iter().rev().skip(1).all(|c| !c.complete));
        assert!(chunks.iter().all(|c| c.generation == 7));
        assert!(chunks.iter().all(|c| c.encoded_len() <= CHUNK_BYTES + 1024));
        let mut state = BTreeMap::new();
        apply(&mut state, &chunks);
        assert_eq!(state.len(), 200);
        // One installation larger than a chunk still goes, alone.
        let big = Desired {
            generation: 1,
            installations: [("big".to_owned(), entry("big", CHUNK_BYTES + 10))].into(),
        };
        assert_eq!(big.full_chunks(&Labels::new()).len(), 1);
    }

    #[test]
    fn sends_only_what_changed() {
        let a = entry("a", 10);
        let b = entry("b", 10);
        let earlier = Desired {
            generation: 1,
            installations: [("a".to_owned(), a.clone()), ("b".to_owned(), b)].into(),
        };
        let later = Desired {
            generation: 2,
            installations: [("a".to_owned(), a), ("c".to_owned(), entry("c", 10))].into(),
        };
        let chunks = later.chunks_since(&earlier, &Labels::new());
        assert_eq!(chunks.len(), 1);
        let chunk = &chunks[0];
        assert!(!chunk.reset && chunk.complete);
        assert_eq!(chunk.removed_installation_ids, ["b"]);
        assert_eq!(
            chunk
                .upserts
                .iter()
                .map(|u| u.installation_id.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        let mut state = BTreeMap::new();
        apply(&mut state, &earlier.full_chunks(&Labels::new()));
        apply(&mut state, &chunks);
        assert_eq!(state.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert!(later.chunks_since(&later, &Labels::new()).is_empty());
    }

    #[test]
    fn a_node_gets_only_what_its_labels_place() {
        let placed_on = |id: &str, zone: &str| {
            Arc::new(pb::DesiredInstallation {
                installation_id: id.into(),
                node_selector: [("zone".to_owned(), zone.to_owned())].into(),
                ..Default::default()
            })
        };
        let state = Desired {
            generation: 3,
            installations: [
                ("all".to_owned(), entry("all", 10)),
                ("edge".to_owned(), placed_on("edge", "edge")),
                ("cloud".to_owned(), placed_on("cloud", "cloud")),
            ]
            .into(),
        };
        let node: Labels = [
            ("zone".to_owned(), "edge".to_owned()),
            ("gpu".to_owned(), "yes".to_owned()),
        ]
        .into();
        let ids = |chunks: &[pb::DesiredStateChunk]| {
            let mut got = BTreeMap::new();
            apply(&mut got, chunks);
            got.into_keys().collect::<Vec<_>>()
        };
        assert_eq!(ids(&state.full_chunks(&node)), ["all", "edge"]);
        assert_eq!(ids(&state.full_chunks(&Labels::new())), ["all"]);
        let whole: Vec<String> = state
            .to_proto(&node)
            .installations
            .into_iter()
            .map(|i| i.installation_id)
            .collect();
        assert_eq!(whole, ["all", "edge"]);
        // A change to an installation placed elsewhere sends this node
        // nothing; one placed here goes, and one that moves away is removed.
        let mut later = state.clone();
        later.generation = 4;
        later
            .installations
            .insert("cloud".into(), placed_on("cloud", "cloud2"));
        let chunks = later.chunks_since(&state, &node);
        assert!(
            chunks
                .iter()
                .all(|c| c.upserts.is_empty() && c.removed_installation_ids.is_empty())
        );
        later
            .installations
            .insert("edge".into(), placed_on("edge", "cloud"));
        let chunks = later.chunks_since(&state, &node);
        assert_eq!(chunks[0].removed_installation_ids, ["edge"]);
        assert!(chunks[0].upserts.is_empty());
        assert!(later.chunks_since(&later, &node).is_empty());
    }
}
