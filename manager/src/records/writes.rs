//! Writes of installations: inserts, deletes and read-modify-writes of
//! whole installations, stored as their records and their nodes' statuses,
//! one batch per write, serialised per installation.

use super::*;

impl Installations {
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

    pub(super) fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
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
                    Err(err) => Err(err.clone()),
                },
                Some(Err(err)) => Err(err),
                None => unreachable!("every change has a result"),
            })
            .collect()
    }

    /// Writes the touched installations of a batch: node statuses, then
    /// records; each of `current` then has the revision it was stored at.
    pub(super) async fn store_batch(
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
        // The node statuses are made durable by the records' write below,
        // in the same opening of the database: an embedded store opened
        // again in between (after another writer's I/O error) has dropped
        // them, and the records' write is refused (found by the fault
        // campaign, seed 32).
        let epoch = self.nodes.epoch();
        let records_durability = if node_writes.is_empty() {
            addons_store::Durability::Now
        } else {
            addons_store::Durability::NowWith(epoch)
        };
        let written = if node_writes.is_empty() {
            Vec::new()
        } else {
            let ids: Vec<(String, String)> = node_writes
                .iter()
                .map(|w| (w.value.installation_id.clone(), w.value.node_id.clone()))
                .collect();
            // Durable with the installation records' write below.
            match self
                .nodes
                .write_many_with(node_writes, addons_store::Durability::WithNext)
                .await
            {
                Ok(written) => written,
                Err(err) => {
                    if matches!(
                        err,
                        addons_store::Error::Conflict { .. }
                            | addons_store::Error::AlreadyExists { .. }
                            | addons_store::Error::NotFound { .. }
                    ) {
                        self.read_node_statuses_again(ids).await;
                    }
                    return Err(err);
                }
            }
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
            .write_many_observed(record_writes, records_durability, |written| {
                self.remember(updates.take().unwrap_or_default(), written);
            })
            .await;
        if let Some(updates) = updates {
            // Not stored. The node statuses were written to be made durable
            // by this write: an embedded store opened again after its
            // failure (a full disk) has dropped them, a MongoDB has them.
            // Memory takes what the store holds, never what was only
            // written: a status shown and then lost would go back in time
            // for every reader (found by the fault campaign, seed 32).
            let touched = updates
                .into_iter()
                .map(|(id, node, _)| (id, node))
                .collect();
            self.read_node_statuses_again(touched).await;
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
    /// Takes into memory the node statuses the store holds for `ids`
    /// (installation, node), after a write of them was refused as a
    /// conflict or the records' write that was to make them durable
    /// failed. A conflict means memory and the store differ, as when a
    /// store opened again after an I/O error dropped writes that were not
    /// durable yet (found by the fault campaign, seed 32). The report is
    /// refused this time and the monitor sends it again; the next write
    /// starts from what is stored.
    async fn read_node_statuses_again(&self, ids: Vec<(String, String)>) {
        let mut updates = Vec::with_capacity(ids.len());
        for (id, node) in ids {
            match self.nodes.get(&status_id(&id, &node)).await {
                Ok(stored) => {
                    let cached = stored.map(|status| Cached {
                        revision: status.revision,
                        sequence: status.value.sequence,
                        services: status.value.services,
                    });
                    updates.push((id, node, cached));
                }
                Err(err) => {
                    tracing::warn!(installation = %id, %node, error = %err, "cannot read a node's statuses again");
                }
            }
        }
        self.remember(updates, &[]);
    }

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
        trace_parent,
        revoked,
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
        trace_parent: trace_parent.clone(),
        revoked: revoked.clone(),
    }
}
