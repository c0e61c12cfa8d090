//! The nodes of the plane: one record per node whose monitor linked (its
//! labels, monitor version, when it linked and when its link ended), the
//! listing operators read, and forgetting a node that is gone, by hand
//! (`ForgetNode`) or once it stayed disconnected for `--node-expiry`.
//!
//! Forgetting touches only the installations the node reported on
//! ([`super::presence`]), so its cost does not grow with the plane.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use addons_store::{Filter, Page, Precondition};
use chrono::{DateTime, Utc};
use oakestra_addons_proto::engine::v1 as pb;
use serde::{Deserialize, Serialize};

use super::{LinkHub, hello::ValidHello};
use crate::{Error, convert, model::Installation, status};

/// What the manager remembers of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct NodeRecord {
    /// The node id.
    pub(super) id: String,
    /// Its labels, as its last hello announced them.
    pub(super) labels: BTreeMap<String, String>,
    /// Its monitor's version.
    pub(super) monitor_version: String,
    /// When its monitor last linked.
    pub(super) connect_time: DateTime<Utc>,
    /// When its last link ended; `None` while linked.
    pub(super) disconnect_time: Option<DateTime<Utc>>,
}

// Read by listings, not watched.
addons_store::document!(NodeRecord in "nodes", unlogged);

/// Why a node is forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Forget {
    /// An operator asked (`ForgetNode`).
    Asked,
    /// It stayed disconnected past `--node-expiry`.
    Expired,
}

/// Listing page size when the request names none.
const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest listing page.
const MAX_PAGE_SIZE: usize = 500;

impl LinkHub {
    /// Records a node's hello. When its labels changed, the installations
    /// it reported on that its new labels no longer match drop its
    /// statuses: its monitor removes their services, which it no longer
    /// receives.
    pub(super) async fn node_linked(&self, hello: &ValidHello) -> Result<(), Error> {
        let now = Utc::now();
        let record = NodeRecord {
            id: hello.node.clone(),
            labels: hello.labels.clone(),
            monitor_version: hello.version.clone(),
            connect_time: now,
            disconnect_time: None,
        };
        let previous = self.nodes.get(&hello.node).await?;
        match &previous {
            Some(_) => {
                self.nodes.replace(record, &Precondition::none()).await?;
            }
            None => match self.nodes.insert(record.clone()).await {
                Err(addons_store::Error::AlreadyExists { .. }) => {
                    self.nodes.replace(record, &Precondition::none()).await?;
                }
                other => {
                    other?;
                }
            },
        }
        // At every hello, not only when the labels changed: a hello whose
        // set-up was cut short after the new labels were stored must not
        // leave statuses behind for the next one to miss.
        if previous.is_some() {
            for id in self.presence.installations_of(&hello.node) {
                let result = self
                    .installations
                    .modify(&id, |installation| {
                        if addons_descriptor::labels::matches(
                            &installation.node_selector,
                            &hello.labels,
                        ) {
                            return Ok(false);
                        }
                        Ok(status::forget_node(installation, &hello.node))
                    })
                    .await;
                self.after_node_change(&id, result).await?;
            }
        }
        Ok(())
    }

    /// Records that a node's link ended at `at`, and forgets the node if it
    /// does not link again within `--node-expiry`.
    pub(super) async fn node_unlinked(&self, node: &str, at: DateTime<Utc>) {
        let result = self
            .nodes
            .modify(node, |record| {
                if record.disconnect_time.is_some() || self.presence.is_connected(node) {
                    return Ok(false);
                }
                record.disconnect_time = Some(at);
                Ok(true)
            })
            .await;
        match result {
            Ok(record) => {
                if let Some(since) = record.value.disconnect_time {
                    self.expire_later(node.to_owned(), since);
                }
            }
            Err(addons_store::Error::NotFound { .. }) => {}
            Err(err) => tracing::warn!(%node, error = %err, "cannot record a node's disconnect"),
        }
    }

    /// Forgets `node` once it has been disconnected since `since` for the
    /// node expiry, unless it linked again in between.
    pub(super) fn expire_later(&self, node: String, since: DateTime<Utc>) {
        let hub = self.clone();
        tokio::spawn(async move {
            let elapsed = (Utc::now() - since).to_std().unwrap_or(Duration::ZERO);
            let left = hub.options.node_expiry.saturating_sub(elapsed);
            tokio::select! {
                () = hub.shutdown.fired() => return,
                () = tokio::time::sleep(left) => {}
            }
            match hub.nodes.get(&node).await {
                Ok(Some(record)) if record.value.disconnect_time == Some(since) => {}
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(%node, error = %err, "cannot read a node to expire it");
                    return;
                }
            }
            match hub.forget_node(&node, Forget::Expired).await {
                Ok(_) => {
                    tracing::info!(%node, expiry = ?hub.options.node_expiry, "node forgotten: disconnected past the node expiry");
                }
                Err(Error::NodeConnected(_)) => {}
                Err(err) => tracing::warn!(%node, error = %err, "cannot forget an expired node"),
            }
        });
    }

    /// At start: every known node is disconnected until it links again;
    /// those that were linked when the manager stopped count from now.
    /// Nodes that reported before node records existed get one.
    pub(super) async fn seed_nodes(&self, reported: &[String]) -> anyhow::Result<()> {
        let now = Utc::now();
        let known = self.nodes.list_all(&Filter::default()).await?;
        let mut seen = std::collections::HashSet::new();
        for record in known {
            let mut record = record.value;
            let id = record.id.clone();
            seen.insert(id.clone());
            let since = match record.disconnect_time {
                Some(since) => since,
                None => {
                    // Linked when the manager stopped: disconnected from now.
                    record.disconnect_time = Some(now);
                    self.nodes.replace(record, &Precondition::none()).await?;
                    now
                }
            };
            self.expire_later(id, since);
        }
        for node in reported.iter().filter(|n| !seen.contains(*n)) {
            let record = NodeRecord {
                id: node.clone(),
                labels: BTreeMap::new(),
                monitor_version: String::new(),
                connect_time: now,
                disconnect_time: Some(now),
            };
            if let Err(err) = self.nodes.insert(record).await {
                tracing::warn!(%node, error = %err, "cannot record a node");
            }
            self.expire_later(node.clone(), now);
        }
        Ok(())
    }

    /// Forgets a node whose monitor is not linked: its statuses leave every
    /// installation it reported on, an uninstall that waited for it
    /// completes naming it, a rollout goes on without it, and its record
    /// goes. Returns the node as it was.
    pub(super) async fn forget_node(&self, node: &str, why: Forget) -> Result<pb::Node, Error> {
        if self.presence.is_connected(node) {
            return Err(Error::NodeConnected(node.to_owned()));
        }
        let record = self.nodes.get(node).await?;
        let installations = self.presence.installations_of(node);
        if record.is_none() && installations.is_empty() {
            return Err(Error::NodeNotFound(node.to_owned()));
        }
        let shown = self
            .node_to_proto(record.map(|r| r.value), node, &mut HashMap::new())
            .await?;
        for id in installations {
            let result = self
                .installations
                .modify(&id, |installation| {
                    if self.presence.is_connected(node) {
                        return Ok(false);
                    }
                    Ok(status::forget_node(installation, node))
                })
                .await;
            self.after_node_change(&id, result).await?;
        }
        if self.presence.is_connected(node) {
            // It linked while being forgotten: it is a node again.
            return Err(Error::NodeConnected(node.to_owned()));
        }
        self.nodes.delete(node, &Precondition::none()).await?;
        self.presence.forget_node(node);
        tracing::info!(%node, ?why, "node forgotten");
        Ok(shown)
    }

    /// Completes a purge an installation change made due, and forgets an
    /// installation that is gone.
    async fn after_node_change(
        &self,
        id: &str,
        result: addons_store::Result<addons_store::Versioned<Installation>>,
    ) -> Result<(), Error> {
        match result {
            Ok(record) => {
                self.installations.purge_if_done(&record).await?;
                Ok(())
            }
            Err(addons_store::Error::NotFound { .. }) => {
                self.presence.forget_installation(id);
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// A page of the plane's nodes, in id order: the nodes of a page
    /// mostly run the same installations, whose names are read once.
    pub(super) async fn list_nodes_page(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<pb::Node>, Option<String>), Error> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let Page {
            items,
            next_page_token,
        } = self
            .nodes
            .list(&Filter::default(), page_size, page_token)
            .await?;
        let mut cache = HashMap::new();
        let mut nodes = Vec::with_capacity(items.len());
        for record in items {
            let id = record.value.id.clone();
            nodes.push(
                self.node_to_proto(Some(record.value), &id, &mut cache)
                    .await?,
            );
        }
        Ok((nodes, next_page_token))
    }

    /// A node as the API shows it, with what it runs.
    async fn node_to_proto(
        &self,
        record: Option<NodeRecord>,
        node: &str,
        cache: &mut HashMap<String, Option<String>>,
    ) -> Result<pb::Node, Error> {
        let connected = self.presence.is_connected(node);
        let mut shown = pb::Node {
            node_id: node.to_owned(),
            connected,
            ..Default::default()
        };
        if let Some(record) = record {
            shown.labels = record.labels;
            shown.monitor_version = record.monitor_version;
            shown.connect_time = Some(convert::timestamp(record.connect_time));
            if !connected && let Some(since) = record.disconnect_time {
                shown.disconnect_time = Some(convert::timestamp(since));
                if let Ok(expiry) = chrono::Duration::from_std(self.options.node_expiry) {
                    shown.expire_time = Some(convert::timestamp(since + expiry));
                }
            }
        }
        for id in self.presence.installations_of(node) {
            if !cache.contains_key(&id) {
                let name = self
                    .installations
                    .get(&id)
                    .await?
                    .map(|r| r.value.addon.name);
                cache.insert(id.clone(), name);
            }
            let Some(Some(addon_name)) = cache.get(&id) else {
                continue;
            };
            let services: Vec<pb::ServiceStatus> = self
                .installations
                .node_services(&id, node)
                .into_iter()
                .map(convert::service_status_to_proto)
                .collect();
            if services.is_empty() {
                continue;
            }
            shown.installations.push(pb::NodeInstallation {
                installation_id: id,
                addon_name: addon_name.clone(),
                services,
            });
        }
        Ok(shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Plane, ServicePhase, ServiceStatus},
        records::{Installations, tests::store},
        status::tests::{installation, status},
    };

    fn zone(zone: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("zone".to_owned(), zone.to_owned())])
    }

    /// Found by the fault campaign (seed 13): a hello whose set-up was cut
    /// short after it stored the node's new labels left the node's
    /// statuses on an installation those labels no longer place there; the
    /// next hello, with the same labels, saw no change and kept them, so
    /// the installation stayed PARTIALLY_ACTIVE with a "disconnected"
    /// service for good.
    #[tokio::test]
    async fn a_hello_drops_what_its_labels_no_longer_place_even_when_they_are_stored_already() {
        let (store, _dir) = store().await;
        let installations = Installations::open(&store).await.unwrap();
        let id = installations
            .insert(Installation {
                node_selector: zone("b"),
                ..installation(&["api"])
            })
            .await
            .unwrap()
            .value
            .id;
        // node-0 runs it, in zone b.
        installations
            .modify(&id, |i| {
                i.report_sequences.insert("node-0".into(), 1);
                let running = ServiceStatus {
                    node_id: "node-0".into(),
                    ..status("api", ServicePhase::Running)
                };
                status::apply_report(i, "node-0", vec![running]);
                Ok(true)
            })
            .await
            .unwrap();
        let hub = LinkHub::start(
            &store,
            installations.clone(),
            Plane::Root,
            super::super::LinkOptions::default(),
            addons_server_kit::Shutdown::new(),
        )
        .await
        .unwrap();
        // What the hello cut short left: node-0 moved to zone a, recorded.
        let moved = NodeRecord {
            id: "node-0".into(),
            labels: zone("a"),
            monitor_version: String::new(),
            connect_time: Utc::now(),
            disconnect_time: Some(Utc::now()),
        };
        hub.nodes
            .replace(moved, &Precondition::none())
            .await
            .unwrap();
        // Its next hello carries the labels stored already.
        let hello = ValidHello {
            node: "node-0".into(),
            plane: Plane::Root,
            heartbeat: Duration::from_secs(1),
            accepts_chunks: true,
            version: String::new(),
            observed: 0,
            labels: zone("a"),
        };
        hub.node_linked(&hello).await.unwrap();
        let after = installations.require(&id).await.unwrap().value;
        assert!(
            after.services.iter().all(|s| s.node_id != "node-0"),
            "node-0's status stays on an installation for zone b: {:?}",
            after.services
        );
    }
}
