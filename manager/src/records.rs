//! Installations and what each node reports about them, kept apart: one
//! record per installation (what was asked for, its aggregate status) and
//! one per installation and node (that node's services), so a report
//! writes what its node said and never every other node's statuses again.
//!
//! [`Installations`] puts them together again. The nodes' statuses are kept
//! in memory as well (seeded from their records at start; the manager is
//! their only writer), so every read comes back whole, with `services` and
//! `report_sequences` filled (hydrated), and the pure functions of
//! `status.rs` and `rollout.rs` work on whole installations. A write takes
//! the whole installation the closure changed and stores the nodes whose
//! statuses changed, then the installation record without them; the
//! record keeps the statuses that write changed in `changed`, which is what
//! watchers of a large plane follow. Writes of one installation are
//! serialised in-process (`records/writes.rs`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use addons_store::{Collection, Document, Filter, Page, Precondition, Store, Versioned};
use serde::{Deserialize, Serialize};

use crate::model::{Installation, InstallationStatus, ServiceStatus};

mod writes;

/// What one node reported about one installation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct NodeStatus {
    /// `<installation id>/<node id>`.
    id: String,
    installation_id: String,
    node_id: String,
    /// The node's services of the installation.
    services: Vec<ServiceStatus>,
    /// The sequence number of the node's last report applied.
    sequence: u64,
}

// Watchers follow the installation records, which say what changed.
addons_store::document!(NodeStatus in "node_statuses", unlogged;
    /// The installation, so one installation's records list by status.
    fn status(&self) -> String {
        self.installation_id.clone()
    }
);

/// A node's statuses of one installation, as stored.
#[derive(Debug, Clone, Default, PartialEq)]
struct Cached {
    /// Revision of its record.
    revision: u64,
    sequence: u64,
    services: Vec<ServiceStatus>,
}

/// What the manager holds of every installation's statuses.
#[derive(Debug, Default)]
struct Cache {
    /// Installation → node → what the node reported.
    nodes: HashMap<String, BTreeMap<String, Cached>>,
    /// Installation → the revision of its record these statuses go with:
    /// a read pairs a record only with the statuses of its revision.
    revisions: HashMap<String, u64>,
}

/// Installations with their nodes' statuses. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Installations {
    records: Collection<Installation>,
    nodes: Collection<NodeStatus>,
    cache: Arc<RwLock<Cache>>,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// One installation's write in a batch: the closure that changes it.
pub(crate) type Change<'a> =
    Box<dyn FnMut(&mut Installation) -> addons_store::Result<bool> + Send + 'a>;

impl Installations {
    /// Opens both collections and loads the nodes' statuses. Records
    /// written before statuses had records of their own move there.
    pub async fn open(store: &Store) -> anyhow::Result<Self> {
        let this = Self {
            records: store.collection().await?,
            nodes: store.collection().await?,
            cache: Arc::default(),
            locks: Arc::default(),
        };
        let statuses = this.nodes.list_all(&Filter::default()).await?;
        {
            let mut cache = this.write_cache();
            for record in statuses {
                let status = record.value;
                cache
                    .nodes
                    .entry(status.installation_id)
                    .or_default()
                    .insert(
                        status.node_id,
                        Cached {
                            revision: record.revision,
                            sequence: status.sequence,
                            services: status.services,
                        },
                    );
            }
        }
        let filter = Filter::default();
        let records = this.records.list_all(&filter).await?;
        this.write_cache().revisions.extend(
            records
                .iter()
                .map(|record| (record.value.id.clone(), record.revision)),
        );
        for record in records {
            let old = &record.value;
            if old.services.is_empty() && old.report_sequences.is_empty() {
                continue;
            }
            tracing::info!(id = %old.id, "moving an installation's node statuses to records of their own");
            let id = old.id.clone();
            let touched = BTreeSet::from([id.clone()]);
            this.store_batch(&mut BTreeMap::from([(id, record)]), &touched)
                .await?;
        }
        Ok(this)
    }

    /// Every installation record as stored, without the nodes' statuses:
    /// for readers that need only what was asked for (the desired state).
    pub(crate) async fn list_records(&self) -> addons_store::Result<Vec<Versioned<Installation>>> {
        self.records.list_all(&Filter::default()).await
    }

    /// The changes of installation records (as stored) from now on.
    pub(crate) fn watch_records(
        &self,
    ) -> tokio::sync::broadcast::Receiver<addons_store::Change<Installation>> {
        self.records.watch()
    }

    /// Follows the installations (`addons_store`'s follow loop): `initial`
    /// gives the snapshot, then every change `wanted` selects, as stored
    /// (each write's changed statuses in `changed`).
    pub(crate) async fn follow(
        &self,
        start: addons_store::Start,
        initial: impl AsyncFnOnce() -> addons_store::Result<Vec<Versioned<Installation>>>,
        wanted: impl Fn(&addons_store::Change<Installation>) -> bool,
        out: tokio::sync::mpsc::Sender<addons_store::Event<Installation>>,
        stop: impl Future<Output = ()>,
    ) -> addons_store::Result<addons_store::FollowEnd> {
        self.records
            .follow(
                start,
                async |_| initial().await,
                wanted,
                |_| false,
                out,
                stop,
            )
            .await
    }

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fills in the nodes' statuses of a stored record as they are now.
    pub(crate) fn hydrate(&self, installation: &mut Installation) {
        let cache = self.read_cache();
        fill(&cache, installation);
    }

    /// Fills in the statuses that go with the record's revision; `false`
    /// (and nothing filled) when the statuses in memory belong to another
    /// revision: a write of the installation is between its two steps.
    fn hydrate_at(&self, record: &mut Versioned<Installation>) -> bool {
        let cache = self.read_cache();
        let current = cache.revisions.get(&record.value.id).copied();
        if current.is_some_and(|revision| revision != record.revision) {
            return false;
        }
        fill(&cache, &mut record.value);
        true
    }

    /// A stored record with the statuses of its revision: when a write of
    /// it is under way, waits for the write and reads it again.
    async fn whole(
        &self,
        mut record: Versioned<Installation>,
    ) -> addons_store::Result<Option<Versioned<Installation>>> {
        for _ in 0..8 {
            if self.hydrate_at(&mut record) {
                return Ok(Some(record));
            }
            let lock = self.lock_of(&record.value.id);
            drop(lock.lock().await);
            match self.records.get(&record.value.id).await? {
                Some(again) => record = again,
                None => return Ok(None),
            }
        }
        // Written again and again meanwhile: the statuses as they are now.
        self.hydrate(&mut record.value);
        Ok(Some(record))
    }

    async fn whole_all(
        &self,
        records: Vec<Versioned<Installation>>,
    ) -> addons_store::Result<Vec<Versioned<Installation>>> {
        let mut all = Vec::with_capacity(records.len());
        for record in records {
            if let Some(whole) = self.whole(record).await? {
                all.push(whole);
            }
        }
        Ok(all)
    }
}

/// Fills `installation` with the statuses in `cache`.
fn fill(cache: &Cache, installation: &mut Installation) {
    installation.changed.clear();
    installation.services.clear();
    installation.report_sequences.clear();
    {
        let Some(nodes) = cache.nodes.get(&installation.id) else {
            return;
        };
        for (node, cached) in nodes {
            installation
                .services
                .extend(cached.services.iter().cloned());
            if cached.sequence > 0 {
                installation
                    .report_sequences
                    .insert(node.clone(), cached.sequence);
            }
        }
    }
    installation
        .services
        .sort_by(|a, b| (&a.service_name, &a.node_id).cmp(&(&b.service_name, &b.node_id)));
}

impl Installations {
    fn hydrated(&self, mut record: Versioned<Installation>) -> Versioned<Installation> {
        self.hydrate(&mut record.value);
        record
    }

    /// The services `node` reported for installation `id`.
    pub(crate) fn node_services(&self, id: &str, node: &str) -> Vec<ServiceStatus> {
        self.read_cache()
            .nodes
            .get(id)
            .and_then(|nodes| nodes.get(node))
            .map(|cached| cached.services.clone())
            .unwrap_or_default()
    }

    /// Every (installation, node, last sequence) with a status record.
    pub(crate) fn reported(&self) -> Vec<(String, String, u64)> {
        self.read_cache()
            .nodes
            .iter()
            .flat_map(|(id, nodes)| {
                nodes
                    .iter()
                    .map(move |(node, cached)| (id.clone(), node.clone(), cached.sequence))
            })
            .collect()
    }

    /// One installation, whole.
    pub(crate) async fn get(
        &self,
        id: &str,
    ) -> addons_store::Result<Option<Versioned<Installation>>> {
        self.whole_if(self.records.get(id).await?).await
    }

    /// One installation, whole, or [`addons_store::Error::NotFound`].
    pub(crate) async fn require(&self, id: &str) -> addons_store::Result<Versioned<Installation>> {
        let record = self.records.require(id).await?;
        self.whole(record)
            .await?
            .ok_or_else(|| addons_store::Error::NotFound {
                collection: Installation::COLLECTION.to_owned(),
                id: id.to_owned(),
            })
    }

    /// A page of installations, whole.
    pub(crate) async fn list(
        &self,
        filter: &Filter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> addons_store::Result<Page<Installation>> {
        let page = self.records.list(filter, page_size, page_token).await?;
        Ok(Page {
            items: self.whole_all(page.items).await?,
            next_page_token: page.next_page_token,
        })
    }

    /// Every installation matching `filter`, whole.
    pub(crate) async fn list_all(
        &self,
        filter: &Filter,
    ) -> addons_store::Result<Vec<Versioned<Installation>>> {
        let all = self.records.list_all(filter).await?;
        self.whole_all(all).await
    }

    /// The live installation holding `unique_key`, whole.
    pub(crate) async fn by_unique_key(
        &self,
        unique_key: &str,
    ) -> addons_store::Result<Option<Versioned<Installation>>> {
        self.whole_if(self.records.by_unique_key(unique_key).await?)
            .await
    }

    /// `record` whole, if there is one.
    async fn whole_if(
        &self,
        record: Option<Versioned<Installation>>,
    ) -> addons_store::Result<Option<Versioned<Installation>>> {
        match record {
            Some(record) => self.whole(record).await,
            None => Ok(None),
        }
    }
}

/// The id of a node's status record of an installation.
fn status_id(installation: &str, node: &str) -> String {
    format!("{installation}/{node}")
}

#[cfg(test)]
pub(crate) mod tests;
