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
//! serialised in-process.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use addons_store::{Collection, Document, Filter, Page, Precondition, Store, Versioned};
use serde::{Deserialize, Serialize};

use crate::model::{Installation, InstallationStatus, ServiceStatus};

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

impl Document for NodeStatus {
    const COLLECTION: &'static str = "node_statuses";
    // Watchers follow the installation records, which say what changed.
    const LOGGED: bool = false;

    fn id(&self) -> &str {
        &self.id
    }

    fn unique_key(&self) -> Option<String> {
        None
    }

    /// The installation, so one installation's records list by status.
    fn status(&self) -> String {
        self.installation_id.clone()
    }
}

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

    /// The installation records as stored, without the nodes' statuses:
    /// for readers that need only what was asked for (the desired state).
    pub(crate) fn records(&self) -> &Collection<Installation> {
        &self.records
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
        match self.records.get(id).await? {
            Some(record) => self.whole(record).await,
            None => Ok(None),
        }
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
        match self.records.by_unique_key(unique_key).await? {
            Some(record) => self.whole(record).await,
            None => Ok(None),
        }
    }

    /// Stores a new installation (it has no statuses yet).
    pub(crate) async fn insert(
        &self,
        installation: Installation,
    ) -> addons_store::Result<Versioned<Installation>> {
        let stored = self.records.insert(installation).await?;
        self.write_cache()
            .revisions
            .insert(stored.value.id.clone(), stored.revision);
        Ok(stored)
    }

    /// Deletes an installation that is disabled and whose uninstall asked
    /// for a purge (with its nodes' statuses); whether it was due, and so
    /// is gone now.
    pub(crate) async fn purge_if_done(
        &self,
        record: &Versioned<Installation>,
    ) -> addons_store::Result<bool> {
        if record.value.status != InstallationStatus::Disabled || !record.value.purge_requested {
            return Ok(false);
        }
        let condition = Precondition::status_in([InstallationStatus::Disabled.as_str()]);
        self.delete(&record.value.id, &condition).await?;
        Ok(true)
    }

    /// Deletes an installation if `condition` holds, and its nodes'
    /// statuses.
    pub(crate) async fn delete(
        &self,
        id: &str,
        condition: &Precondition,
    ) -> addons_store::Result<bool> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let deleted = self.records.delete(id, condition).await?;
        if deleted {
            let nodes: Vec<String> = self
                .read_cache()
                .nodes
                .get(id)
                .map(|n| n.keys().cloned().collect())
                .unwrap_or_default();
            for node in nodes {
                self.nodes
                    .delete(&status_id(id, &node), &Precondition::none())
                    .await?;
            }
            let mut cache = self.write_cache();
            cache.nodes.remove(id);
            cache.revisions.remove(id);
            self.locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(id);
        }
        Ok(deleted)
    }

    fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// Read-modify-write of a whole installation.
    pub(crate) async fn modify<F>(
        &self,
        id: &str,
        change: F,
    ) -> addons_store::Result<Versioned<Installation>>
    where
        F: FnMut(&mut Installation) -> addons_store::Result<bool> + Send,
    {
        self.modify_at(id, None, change).await
    }

    /// Read-modify-write of a whole installation that must be at
    /// `expected_revision` when one is given
    /// ([`addons_store::Error::StaleRevision`] otherwise).
    pub(crate) async fn modify_at<F>(
        &self,
        id: &str,
        expected_revision: Option<u64>,
        change: F,
    ) -> addons_store::Result<Versioned<Installation>>
    where
        F: FnMut(&mut Installation) -> addons_store::Result<bool> + Send,
    {
        let mut results = self
            .modify_many(vec![(id.to_owned(), expected_revision, Box::new(change))])
            .await;
        results
            .pop()
            .unwrap_or_else(|| unreachable!("one result per change"))
    }

    /// Changes several installations with their nodes' statuses in three
    /// store writes: every changed node status, then every installation
    /// record, then their change-log entries. One result per change, in
    /// order. A change whose installation is gone or at another revision
    /// fails alone.
    pub(crate) async fn modify_many(
        &self,
        changes: Vec<(String, Option<u64>, Change<'_>)>,
    ) -> Vec<addons_store::Result<Versioned<Installation>>> {
        // Hold every installation's lock, in id order (no deadlock between
        // two batches).
        let mut ids: Vec<String> = changes.iter().map(|(id, _, _)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        let locks: Vec<_> = ids.iter().map(|id| self.lock_of(id)).collect();
        let mut held = Vec::with_capacity(locks.len());
        for lock in &locks {
            held.push(lock.lock().await);
        }
        // Per change: the installation it ends with, or why it failed.
        let mut results: Vec<Option<Result<String, addons_store::Error>>> =
            changes.iter().map(|_| None).collect();
        // The current state of each installation as the batch goes on.
        let mut current: BTreeMap<String, Versioned<Installation>> = BTreeMap::new();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for (n, (id, expected, mut change)) in changes.into_iter().enumerate() {
            if !current.contains_key(&id) {
                match self.records.get(&id).await {
                    Ok(Some(record)) => {
                        current.insert(id.clone(), self.hydrated(record));
                    }
                    Ok(None) => {
                        results[n] = Some(Err(addons_store::Error::NotFound {
                            collection: Installation::COLLECTION.to_owned(),
                            id,
                        }));
                        continue;
                    }
                    Err(err) => {
                        results[n] = Some(Err(err));
                        continue;
                    }
                }
            }
            let Some(record) = current.get_mut(&id) else {
                continue;
            };
            if let Some(expected) = expected
                && expected != record.revision
            {
                results[n] = Some(Err(addons_store::Error::StaleRevision {
                    collection: Installation::COLLECTION.to_owned(),
                    id,
                    current: record.revision,
                    expected,
                }));
                continue;
            }
            // In place: a change that returns `Ok(false)` or an error has
            // left the installation as it found it.
            match change(&mut record.value) {
                Ok(true) => {
                    touched.insert(id.clone());
                }
                Ok(false) => {}
                Err(err) => {
                    results[n] = Some(Err(err));
                    continue;
                }
            }
            results[n] = Some(Ok(id));
        }
        let outcome = self.store_batch(&mut current, &touched).await;
        // Each installation goes to its last change's result; earlier
        // changes of the same installation get a copy.
        let mut uses: HashMap<String, usize> = HashMap::new();
        for id in results.iter().flatten().flatten() {
            *uses.entry(id.clone()).or_default() += 1;
        }
        results
            .into_iter()
            .map(|result| match result {
                Some(Ok(id)) => match &outcome {
                    Ok(()) => {
                        let left = uses.get_mut(&id).map_or(0, |n| {
                            *n -= 1;
                            *n
                        });
                        let whole = if left == 0 {
                            current.remove(&id)
                        } else {
                            current.get(&id).cloned()
                        };
                        whole.ok_or_else(|| addons_store::Error::NotFound {
                            collection: Installation::COLLECTION.to_owned(),
                            id,
                        })
                    }
                    Err(err) => Err(clone_error(err)),
                },
                Some(Err(err)) => Err(err),
                None => unreachable!("every change has a result"),
            })
            .collect()
    }

    /// Writes the touched installations of a batch: node statuses, then
    /// records; each of `current` then has the revision it was stored at.
    async fn store_batch(
        &self,
        current: &mut BTreeMap<String, Versioned<Installation>>,
        touched: &BTreeSet<String>,
    ) -> addons_store::Result<()> {
        let mut node_writes = Vec::new();
        let mut node_deletes = Vec::new();
        let mut record_writes = Vec::new();
        let mut cache_updates: Vec<(String, String, Option<Cached>)> = Vec::new();
        {
            let cache = self.read_cache();
            for id in touched {
                let whole = &current[id];
                let before = cache.nodes.get(id);
                let mut after: BTreeMap<&str, Vec<&ServiceStatus>> = BTreeMap::new();
                for service in &whole.value.services {
                    after
                        .entry(service.node_id.as_str())
                        .or_default()
                        .push(service);
                }
                for node in whole.value.report_sequences.keys() {
                    after.entry(node.as_str()).or_default();
                }
                let mut changed = Vec::new();
                for (node, services) in &after {
                    let sequence = whole
                        .value
                        .report_sequences
                        .get(*node)
                        .copied()
                        .unwrap_or(0);
                    let old = before.and_then(|b| b.get(*node));
                    if old.is_some_and(|o| {
                        o.sequence == sequence
                            && o.services.len() == services.len()
                            && o.services.iter().zip(services).all(|(a, b)| a == *b)
                    }) {
                        continue;
                    }
                    let services: Vec<ServiceStatus> =
                        services.iter().map(|s| (*s).clone()).collect();
                    let revision = old.map_or(1, |o| o.revision + 1);
                    node_writes.push(Versioned {
                        revision,
                        value: NodeStatus {
                            id: status_id(id, node),
                            installation_id: id.clone(),
                            node_id: (*node).to_owned(),
                            services: services.clone(),
                            sequence,
                        },
                    });
                    changed.extend(services);
                }
                for node in before.into_iter().flat_map(|b| b.keys()) {
                    if !after.contains_key(node.as_str()) {
                        node_deletes.push(status_id(id, node));
                        cache_updates.push((id.clone(), node.clone(), None));
                    }
                }
                let mut stored = stripped(&whole.value);
                stored.changed = changed;
                record_writes.push(Versioned {
                    revision: whole.revision + 1,
                    value: stored,
                });
            }
        }
        let written = if node_writes.is_empty() {
            Vec::new()
        } else {
            // Durable with the installation records' write below.
            self.nodes
                .write_many_with(node_writes, addons_store::Durability::WithNext)
                .await?
        };
        for status in written {
            let Versioned { revision, value } = status;
            cache_updates.push((
                value.installation_id,
                value.node_id,
                Some(Cached {
                    revision,
                    sequence: value.sequence,
                    services: value.services,
                }),
            ));
        }
        for id in &node_deletes {
            self.nodes.delete(id, &Precondition::none()).await?;
        }
        // The statuses and the records' revisions change in memory in one
        // step, once both are stored and before watchers hear of the
        // records: a read never pairs a record with another revision's
        // statuses.
        let mut updates = Some(cache_updates);
        let written = self
            .records
            .write_many_observed(record_writes, addons_store::Durability::Now, |written| {
                self.remember(updates.take().unwrap_or_default(), written);
            })
            .await;
        if let Some(updates) = updates {
            // Not stored: the node statuses are, so memory follows them.
            self.remember(updates, &[]);
        }
        for record in written? {
            if let Some(whole) = current.get_mut(&record.value.id) {
                whole.revision = record.revision;
            }
        }
        Ok(())
    }
}

impl Installations {
    /// Takes stored node statuses and installation records into memory, in
    /// one step.
    fn remember(
        &self,
        updates: Vec<(String, String, Option<Cached>)>,
        records: &[Versioned<Installation>],
    ) {
        let mut cache = self.write_cache();
        for (id, node, update) in updates {
            match update {
                Some(cached) => {
                    cache.nodes.entry(id).or_default().insert(node, cached);
                }
                None => {
                    if let Some(nodes) = cache.nodes.get_mut(&id) {
                        nodes.remove(&node);
                    }
                }
            }
        }
        for record in records {
            cache
                .revisions
                .insert(record.value.id.clone(), record.revision);
        }
    }
}

/// An installation as its record stores it: without the nodes' statuses.
fn stripped(whole: &Installation) -> Installation {
    let Installation {
        id,
        marketplace_id,
        addon,
        plane,
        status,
        status_message,
        services: _,
        report_sequences: _,
        changed: _,
        purge_requested,
        keep_core_stopped_on_failure,
        granted_privileges,
        request_id,
        create_time,
        update_time,
        release,
        history,
        rollout,
        rolled_back,
        node_selector,
        unconfirmed_nodes,
    } = whole;
    Installation {
        id: id.clone(),
        marketplace_id: marketplace_id.clone(),
        addon: addon.clone(),
        plane: *plane,
        status: *status,
        status_message: status_message.clone(),
        services: Vec::new(),
        report_sequences: BTreeMap::new(),
        changed: Vec::new(),
        purge_requested: *purge_requested,
        keep_core_stopped_on_failure: *keep_core_stopped_on_failure,
        granted_privileges: granted_privileges.clone(),
        request_id: request_id.clone(),
        create_time: *create_time,
        update_time: *update_time,
        release: *release,
        history: history.clone(),
        rollout: rollout.clone(),
        rolled_back: rolled_back.clone(),
        node_selector: node_selector.clone(),
        unconfirmed_nodes: unconfirmed_nodes.clone(),
    }
}

/// The id of a node's status record of an installation.
fn status_id(installation: &str, node: &str) -> String {
    format!("{installation}/{node}")
}

/// Store errors are not `Clone`; a batch's failure goes to each of its
/// changes as the same kind of error.
fn clone_error(err: &addons_store::Error) -> addons_store::Error {
    use addons_store::Error;
    match err {
        Error::NotFound { collection, id } => Error::NotFound {
            collection: collection.clone(),
            id: id.clone(),
        },
        Error::Conflict { id, reason } => Error::Conflict {
            id: id.clone(),
            reason: reason.clone(),
        },
        Error::StaleRevision {
            collection,
            id,
            current,
            expected,
        } => Error::StaleRevision {
            collection: collection.clone(),
            id: id.clone(),
            current: *current,
            expected: *expected,
        },
        Error::Unavailable { store, reason } => Error::Unavailable {
            store: store.clone(),
            reason: reason.clone(),
        },
        Error::AlreadyExists { collection, key } => Error::AlreadyExists {
            collection: collection.clone(),
            key: key.clone(),
        },
        other => Error::Backend {
            operation: "write",
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::ServicePhase,
        status::tests::{installation, status},
    };

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let location = format!("embedded:{}/store.redb", dir.path().display())
            .parse()
            .unwrap();
        let store = Store::open(&location, &addons_store::OpenOptions::new("test"))
            .await
            .unwrap();
        (store, dir)
    }

    fn on(node: &str, phase: ServicePhase) -> ServiceStatus {
        ServiceStatus {
            node_id: node.into(),
            ..status("api", phase)
        }
    }

    #[tokio::test]
    async fn a_write_stores_only_the_nodes_that_changed() {
        let (store, _dir) = store().await;
        let installations = Installations::open(&store).await.unwrap();
        let inserted = installations.insert(installation(&["api"])).await.unwrap();
        let id = inserted.value.id.clone();
        let nodes: Collection<NodeStatus> = store.collection().await.unwrap();
        let mut changes = nodes.watch();
        // Two nodes report.
        let both = installations
            .modify(&id, |i| {
                for node in ["n1", "n2"] {
                    i.report_sequences.insert(node.into(), 1);
                    crate::status::apply_report(i, node, vec![on(node, ServicePhase::Running)]);
                }
                Ok(true)
            })
            .await
            .unwrap();
        assert_eq!(both.value.services.len(), 2);
        assert_eq!(both.value.status, crate::model::InstallationStatus::Active);
        // A record read before that write is never shown with its
        // statuses: it is read again.
        let again = installations
            .whole(inserted.clone())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.revision, again.value.services.len()), (2, 2));
        let stored = installations.records().require(&id).await.unwrap();
        assert!(
            stored.value.services.is_empty(),
            "the record holds no statuses"
        );
        assert_eq!(stored.value.changed.len(), 2, "it says what changed");
        assert_eq!(changes.recv().await.unwrap().record.value.node_id, "n1");
        assert_eq!(changes.recv().await.unwrap().record.value.node_id, "n2");
        // One node reports again: only its record is written.
        let after = installations
            .modify(&id, |i| {
                i.report_sequences.insert("n2".into(), 2);
                crate::status::apply_report(i, "n2", vec![on("n2", ServicePhase::Backoff)]);
                Ok(true)
            })
            .await
            .unwrap();
        assert_eq!(after.revision, 3);
        let next = changes.recv().await.unwrap().record;
        assert_eq!((next.value.node_id.as_str(), next.revision), ("n2", 2));
        assert!(changes.try_recv().is_err(), "n1 was not written again");
        let stored = installations.records().require(&id).await.unwrap();
        assert_eq!(stored.value.changed.len(), 1);
        assert_eq!(stored.value.changed[0].node_id, "n2");
        // A stale expected revision changes nothing.
        let stale = installations
            .modify_at(&id, Some(1), |_| Ok(true))
            .await
            .unwrap_err();
        assert!(matches!(stale, addons_store::Error::StaleRevision { .. }));
        // Reopened, the statuses come back whole, with their sequences.
        drop(installations);
        let reopened = Installations::open(&store).await.unwrap();
        let whole = reopened.require(&id).await.unwrap();
        assert_eq!(whole.value.services, after.value.services);
        assert_eq!(whole.value.report_sequences.get("n2"), Some(&2));
        assert_eq!(
            reopened.reported().len(),
            2,
            "presence is seeded from the records"
        );
        // Deleting the installation deletes its nodes' statuses.
        assert!(reopened.delete(&id, &Precondition::none()).await.unwrap());
        assert!(nodes.list_all(&Filter::default()).await.unwrap().is_empty());
        assert!(reopened.reported().is_empty());
    }

    #[tokio::test]
    async fn statuses_kept_in_an_old_record_move_to_records_of_their_own() {
        let (store, _dir) = store().await;
        let records: Collection<Installation> = store.collection().await.unwrap();
        let mut old = installation(&["api"]);
        old.services = vec![on("n1", ServicePhase::Running)];
        old.report_sequences.insert("n1".into(), 7);
        let id = records.insert(old).await.unwrap().value.id;
        let installations = Installations::open(&store).await.unwrap();
        let stored = records.require(&id).await.unwrap();
        assert!(stored.value.services.is_empty() && stored.value.report_sequences.is_empty());
        let whole = installations.require(&id).await.unwrap();
        assert_eq!(whole.value.services.len(), 1);
        assert_eq!(whole.value.report_sequences.get("n1"), Some(&7));
    }

    #[tokio::test]
    async fn a_batch_fails_each_change_alone() {
        let (store, _dir) = store().await;
        let installations = Installations::open(&store).await.unwrap();
        let a = installations.insert(installation(&["api"])).await.unwrap();
        let changes: Vec<(String, Option<u64>, Change<'_>)> = vec![
            (
                a.value.id.clone(),
                None,
                Box::new(|_: &mut Installation| Ok(true)),
            ),
            (
                "missing".into(),
                None,
                Box::new(|_: &mut Installation| Ok(true)),
            ),
            (
                a.value.id.clone(),
                Some(99),
                Box::new(|_: &mut Installation| Ok(true)),
            ),
            (
                a.value.id.clone(),
                None,
                Box::new(|_: &mut Installation| Ok(false)),
            ),
        ];
        let results = installations.modify_many(changes).await;
        assert_eq!(results[0].as_ref().unwrap().revision, 2);
        assert!(matches!(
            results[1],
            Err(addons_store::Error::NotFound { .. })
        ));
        assert!(matches!(
            results[2],
            Err(addons_store::Error::StaleRevision { .. })
        ));
        assert_eq!(results[3].as_ref().unwrap().revision, 2);
    }
}
