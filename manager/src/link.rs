//! The manager's end of the monitor link: one bidirectional stream per
//! node, in parts, one per job:
//! - `desired.rs`: the plane's desired state, projected from the
//!   installations at start, followed through the store's change feed,
//!   numbered by a persisted generation, and cut into bounded chunks;
//! - `session.rs`: one link, from its hello (checked by `hello.rs`) to its
//!   end: the desired state whole or in chunks and changes, acks,
//!   heartbeats;
//! - `reports.rs`: status reports, written by one writer task in batches
//!   (group commit across installations), each acked once durable;
//! - `presence.rs`: which nodes are linked and what each reported on, so
//!   a hello and a dropped link cost the same however many installations
//!   there are;
//! - `nodes.rs`: the plane's node records, their listing and forgetting a
//!   node that is gone.

mod desired;
#[doc(hidden)]
pub mod fuzzing;
mod hello;
mod nodes;
mod presence;
mod reports;
mod session;

use std::{sync::Arc, time::Duration};

use addons_server_kit::Shutdown;
use addons_store::{Collection, Store};
use tokio::sync::watch;

pub use self::hello::NodeLabels;
use self::{
    desired::{Desired, PlaneState},
    presence::Presence,
    reports::Writer,
};
use crate::{model::Plane, records::Installations, status};

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// A link with no message for this long is considered dead, and a dead
    /// link's node is shown as disconnected this long after it ended.
    pub heartbeat_timeout: Duration,
    /// How long a new link may take to say hello.
    pub hello_timeout: Duration,
    /// A node whose monitor stays disconnected this long is forgotten.
    pub node_expiry: Duration,
    /// The labels each node may claim; `None`: nodes are believed.
    pub node_labels: Option<Arc<NodeLabels>>,
    /// Where links and reports are counted.
    pub metrics: crate::ManagerMetrics,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            node_expiry: Duration::from_secs(3600),
            node_labels: None,
            metrics: crate::ManagerMetrics::default(),
        }
    }
}

/// The links of every connected monitor, and the desired state they follow.
#[derive(Debug, Clone)]
pub struct LinkHub {
    installations: Installations,
    nodes: Collection<nodes::NodeRecord>,
    plane: Plane,
    desired: watch::Receiver<Arc<Desired>>,
    presence: Arc<Presence>,
    /// Reports waiting for the next group commit.
    writer: Arc<Writer>,
    options: LinkOptions,
    shutdown: Shutdown,
}

impl LinkHub {
    /// Builds the desired state of `plane` and keeps it current until
    /// `shutdown` fires. Nodes that reported before a restart and do not
    /// reconnect are shown as disconnected after the heartbeat timeout.
    pub async fn start(
        store: &Store,
        installations: Installations,
        plane: Plane,
        options: LinkOptions,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        let planes: Collection<PlaneState> = store.collection().await?;
        // Subscribe before reading, so no change falls between the two.
        let changes = installations.watch_records();
        let all = installations.list_records().await?;
        let mut desired = Desired::from_records(all.iter().map(|r| &r.value));
        let tally =
            crate::metrics::Tally::new(options.metrics.clone(), all.iter().map(|r| &r.value));
        desired.generation = desired::bump_generation(&planes, plane).await?;
        options
            .metrics
            .desired_generation
            .set(i64::try_from(desired.generation).unwrap_or(i64::MAX));
        let (tx, rx) = watch::channel(Arc::new(desired));
        let presence = Arc::new(Presence::default());
        let reported = presence.seed(installations.reported());
        let hub = Self {
            installations,
            nodes: store.collection().await?,
            plane,
            desired: rx,
            presence,
            writer: Arc::default(),
            options,
            shutdown: shutdown.clone(),
        };
        hub.clone().spawn_writer()?;
        tokio::spawn(desired::follow(
            hub.installations.clone(),
            changes,
            planes,
            plane,
            tx,
            tally,
            shutdown,
        ));
        hub.seed_nodes(&reported).await?;
        for node in reported {
            hub.mark_disconnected_later(node);
        }
        Ok(hub)
    }

    /// A page of the plane's nodes, in id order, and the next page's token.
    pub async fn list_nodes(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<oakestra_addons_proto::engine::v1::Node>, Option<String>), crate::Error> {
        self.list_nodes_page(page_size, page_token).await
    }

    /// Forgets a node whose monitor is not linked (`ForgetNode`).
    pub async fn forget(
        &self,
        node: &str,
    ) -> Result<oakestra_addons_proto::engine::v1::Node, crate::Error> {
        self.forget_node(node, nodes::Forget::Asked).await
    }

    /// After the heartbeat timeout, shows `node`'s services as unknown
    /// unless its monitor reconnected. Touches only the installations the
    /// node reported on.
    fn mark_disconnected_later(&self, node: String) {
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = hub.shutdown.fired() => return,
                () = tokio::time::sleep(hub.options.heartbeat_timeout) => {}
            }
            if hub.presence.is_connected(&node) {
                return;
            }
            for id in hub.presence.installations_of(&node) {
                let result = hub
                    .installations
                    .modify(&id, |installation| {
                        if hub.presence.is_connected(&node) {
                            return Ok(false);
                        }
                        Ok(status::mark_disconnected(installation, &node))
                    })
                    .await;
                match result {
                    Ok(_) => {}
                    Err(addons_store::Error::NotFound { .. }) => {
                        hub.presence.forget_installation(&id);
                    }
                    Err(err) => {
                        tracing::warn!(%node, error = %err, "cannot mark a disconnected node");
                    }
                }
            }
            tracing::info!(%node, "node shown as disconnected");
        });
    }
}
