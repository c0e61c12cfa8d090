//! Container networking through the standard CNI plugins (Debian's
//! `containernetworking-plugins`): every descriptor network is a bridge
//! network (`bridge` + `host-local` IPAM, then `portmap` for published ports
//! and `firewall`), each container gets a network namespace of its own, and
//! CNI DEL undoes all of it on removal.
//!
//! The monitor runs the plugins itself, following the CNI spec for network
//! configuration lists: each plugin gets the network's name and CNI version,
//! the previous plugin's result, and the runtime config it asks for. ADD
//! results are kept under the state dir, so DEL works after a monitor
//! restart too.

mod cni;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::cni::{create_netns, first_address, plugin_config, remove_netns};
use crate::state_dir::{StateDir, StateDirError};

const CNI_VERSION: &str = "0.4.0";

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A CNI plugin failed.
    #[error("CNI {command} of {plugin} for {container} on network {network} failed: {reason}")]
    Plugin {
        /// ADD or DEL.
        command: &'static str,
        /// The plugin.
        plugin: String,
        /// The container.
        container: String,
        /// The network.
        network: String,
        /// The plugin's message.
        reason: String,
    },
    /// Local state is inconsistent.
    #[error("network state: {0}")]
    State(String),
    /// The node's firewall could not be set up.
    #[error("firewall: {0}")]
    Firewall(String),
    /// A state file could not be read or written.
    #[error(transparent)]
    StateDir(#[from] StateDirError),
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Port on the node.
    pub host_port: u16,
    /// Port in the container.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// One network attachment of a container, as stored for DEL.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Attachment {
    network: String,
    ifname: String,
    ports: Vec<PortMapping>,
    result: Value,
    address: Option<String>,
}

/// Where the monitor's networks live on the host.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// Directory of the CNI plugin binaries.
    pub plugin_dir: PathBuf,
    /// Bridges are named `<prefix><n>` (at most 15 characters in all).
    pub bridge_prefix: String,
    /// Subnets are `<prefix>.<n>.0/24`, such as `10.89.1.0/24`.
    pub subnet_prefix: String,
}

/// What the reconciler needs of container networking. The CNI plugins are
/// the product's ([`Networks`]); unit tests use a recording fake.
pub trait Network: Send + Sync + 'static {
    /// Where container `id`'s network namespace is.
    fn netns_path(&self, id: &str) -> Result<PathBuf, NetworkError>;
    /// Attaches container `id` to `networks`, publishing `ports` on the
    /// first; returns its address on each.
    fn attach(
        &self,
        id: &str,
        networks: &[String],
        ports: &[PortMapping],
    ) -> impl std::future::Future<Output = Result<Vec<(String, String)>, NetworkError>> + Send;
    /// Replaces the ports container `id` publishes.
    fn set_ports(
        &self,
        id: &str,
        ports: &[PortMapping],
    ) -> impl std::future::Future<Output = Result<(), NetworkError>> + Send;
    /// Undoes [`Network::attach`].
    fn detach(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<(), NetworkError>> + Send;
    /// Container `id`'s address on each of its networks.
    fn addresses(&self, id: &str) -> Result<Vec<(String, String)>, NetworkError>;
    /// The ports container `id` publishes.
    fn ports(&self, id: &str) -> Result<Vec<PortMapping>, NetworkError>;
    /// The ids of the containers with an attachment on record.
    fn attached(&self) -> Result<Vec<String>, NetworkError>;
}

impl Network for Networks {
    fn netns_path(&self, id: &str) -> Result<PathBuf, NetworkError> {
        Networks::netns_path(self, id)
    }

    async fn attach(
        &self,
        id: &str,
        networks: &[String],
        ports: &[PortMapping],
    ) -> Result<Vec<(String, String)>, NetworkError> {
        Networks::attach(self, id, networks, ports).await
    }

    async fn set_ports(&self, id: &str, ports: &[PortMapping]) -> Result<(), NetworkError> {
        Networks::set_ports(self, id, ports).await
    }

    async fn detach(&self, id: &str) -> Result<(), NetworkError> {
        Networks::detach(self, id).await
    }

    fn addresses(&self, id: &str) -> Result<Vec<(String, String)>, NetworkError> {
        Networks::addresses(self, id)
    }

    fn ports(&self, id: &str) -> Result<Vec<PortMapping>, NetworkError> {
        Networks::ports(self, id)
    }

    fn attached(&self) -> Result<Vec<String>, NetworkError> {
        Networks::attached(self)
    }
}

/// The CNI plugins and the monitor's network state.
#[derive(Debug, Clone)]
pub struct Networks {
    options: NetworkOptions,
    plugin_dir: PathBuf,
    state_dir: PathBuf,
    /// The loopback guard is in place (checked once per process).
    loopback_guarded: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Networks {
    /// Networks as `options` say, with state under `state_dir/cni` and
    /// network namespaces under `state_dir/netns`.
    pub fn new(options: NetworkOptions, state_dir: &Path) -> Self {
        Self {
            plugin_dir: options.plugin_dir.clone(),
            options,
            state_dir: state_dir.to_owned(),
            loopback_guarded: Default::default(),
        }
    }

    /// The rule that keeps containers off the node's loopback. `portmap`
    /// with `snat` (which publishes ports on 127.0.0.1 too) sets
    /// `route_localnet` on the bridges, and the node then routes what
    /// arrives on them for 127.0.0.0/8 to its own loopback services
    /// (CVE-2020-8558). This drops it, as kube-proxy does, except the
    /// replies of connections the node made and what `portmap` translated.
    /// The comment names the subnets, so cleanups that look for them find
    /// it.
    fn loopback_rule(&self) -> Vec<String> {
        [
            "INPUT",
            "-i",
            &format!("{}+", self.options.bridge_prefix),
            "-d",
            "127.0.0.0/8",
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "RELATED,ESTABLISHED,DNAT",
            "-m",
            "comment",
            "--comment",
            &format!(
                "oakestra-addons {}.0.0/16: no container reaches the node's loopback",
                self.options.subnet_prefix
            ),
            "-j",
            "DROP",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Puts the loopback rule in place (unless `-C` finds it), once per
    /// process, before the first container is attached.
    async fn guard_loopback(&self) -> Result<(), NetworkError> {
        use std::sync::atomic::Ordering;
        if self.loopback_guarded.load(Ordering::Acquire) {
            return Ok(());
        }
        let rule = self.loopback_rule();
        let iptables = |action: &'static str| {
            let rule = rule.clone();
            async move {
                tokio::process::Command::new("iptables")
                    .arg("-w")
                    .arg(action)
                    .args(&rule)
                    .output()
                    .await
            }
        };
        let present = iptables("-C")
            .await
            .map_err(|err| NetworkError::Firewall(format!("cannot run iptables: {err}")))?;
        if !present.status.success() {
            let added = iptables("-I")
                .await
                .map_err(|err| NetworkError::Firewall(format!("cannot run iptables: {err}")))?;
            if !added.status.success() {
                return Err(NetworkError::Firewall(format!(
                    "cannot keep containers off the node's loopback: {}",
                    String::from_utf8_lossy(&added.stderr).trim()
                )));
            }
            tracing::info!("containers are kept off the node's loopback");
        }
        self.loopback_guarded.store(true, Ordering::Release);
        Ok(())
    }

    /// Where container `id`'s network namespace is.
    pub fn netns_path(&self, id: &str) -> Result<PathBuf, NetworkError> {
        Ok(StateDir::new(&self.state_dir).netns(id)?)
    }

    /// The CNI name of `network`: the plugins name their iptables chains
    /// after it and the container id, so it carries the bridge prefix to
    /// keep monitors with different prefixes on one host apart.
    fn cni_name(&self, network: &str) -> String {
        format!("{}-{network}", self.options.bridge_prefix)
    }

    fn cni_dir(&self) -> PathBuf {
        self.state_dir.join("cni")
    }

    fn attachments_path(&self, id: &str) -> Result<PathBuf, NetworkError> {
        Ok(StateDir::new(&self.state_dir).cni_attachments(id)?)
    }

    /// The subnet index of `network`, allocated on first use and kept.
    fn network_index(&self, network: &str) -> Result<u8, NetworkError> {
        let path = self.cni_dir().join("networks.json");
        let mut networks: BTreeMap<String, u8> = match StateDir::read_json(&path) {
            Ok(networks) => networks.unwrap_or_default(),
            Err(err @ StateDirError::Corrupt { .. }) => {
                // Rebuilt from the attachments, which hold every address in
                // use: a network in use keeps its subnet, so no subnet ever
                // goes to two networks.
                let rebuilt = self.indexes_in_use()?;
                tracing::warn!(error = %err, networks = ?rebuilt, "rebuilt the subnet index from the attachments");
                rebuilt
            }
            Err(err) => return Err(err.into()),
        };
        if let Some(index) = networks.get(network) {
            return Ok(*index);
        }
        let in_use = self.indexes_in_use()?;
        let index = (1..=250_u8)
            .find(|i| {
                !networks
                    .values()
                    .chain(in_use.values())
                    .any(|used| used == i)
            })
            .ok_or_else(|| NetworkError::State("no free subnet for another network".into()))?;
        networks.insert(network.to_owned(), index);
        StateDir::write_json(&path, &networks)?;
        Ok(index)
    }

    /// The attachment records on disk.
    fn records(&self) -> Result<Vec<PathBuf>, NetworkError> {
        let dir = self.cni_dir().join("containers");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => {
                return Err(StateDirError::Io {
                    action: "listing",
                    path: dir,
                    err,
                }
                .into());
            }
        };
        Ok(entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .collect())
    }

    /// The ids of the containers with an attachment on record.
    pub fn attached(&self) -> Result<Vec<String>, NetworkError> {
        Ok(self
            .records()?
            .iter()
            .filter_map(|path| path.file_stem()?.to_str().map(str::to_owned))
            .collect())
    }

    /// The subnet index of each network some attachment has an address in.
    fn indexes_in_use(&self) -> Result<BTreeMap<String, u8>, NetworkError> {
        let prefix = format!("{}.", self.options.subnet_prefix);
        let mut used = BTreeMap::new();
        for path in self.records()? {
            let attachments: Vec<Attachment> = StateDir::read_json(&path)?.unwrap_or_default();
            for attachment in attachments {
                let index = attachment
                    .address
                    .as_deref()
                    .and_then(|a| a.strip_prefix(&prefix))
                    .and_then(|rest| rest.split('.').next())
                    .and_then(|octet| octet.parse::<u8>().ok());
                if let Some(index) = index {
                    used.insert(attachment.network, index);
                }
            }
        }
        Ok(used)
    }

    /// The plugin list of `network`.
    fn plugins(&self, network: &str) -> Result<Vec<Value>, NetworkError> {
        let index = self.network_index(network)?;
        Ok(vec![
            json!({
                "type": "bridge",
                "bridge": format!("{}{index}", self.options.bridge_prefix),
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("{}.{index}.0/24", self.options.subnet_prefix) }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": self.cni_dir().join("ipam").display().to_string(),
                },
            }),
            json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }),
            json!({ "type": "firewall" }),
        ])
    }

    /// Creates container `id`'s network namespace and attaches it to
    /// `networks` in order (`eth0`, `eth1`, ...), publishing `ports` on the
    /// first. Returns the container's address on each network.
    pub async fn attach(
        &self,
        id: &str,
        networks: &[String],
        ports: &[PortMapping],
    ) -> Result<Vec<(String, String)>, NetworkError> {
        self.guard_loopback().await?;
        let netns = self.netns_path(id)?;
        // A container of this id is made anew: what an earlier one left
        // (its namespace, attachments a monitor that died never undid) is
        // undone first, or its interface and address would be taken.
        // Unrecorded attachments first, while the namespace is there to
        // say which addresses their rules are for.
        if netns.exists() || !self.load(id).unwrap_or_default().is_empty() {
            tracing::info!(container = %id, "clearing the network an earlier container of this id left");
            for (i, network) in networks.iter().enumerate() {
                self.del_unrecorded(id, &netns, network, &format!("eth{i}"))
                    .await;
            }
            let _ = self.detach(id).await;
        }
        if !netns.exists() {
            create_netns(&netns)?;
            // `lo` up, as every container runtime does: a service reaches
            // itself on 127.0.0.1, and so do its health probes.
            let loopback = json!({
                "cniVersion": CNI_VERSION,
                "name": "lo",
                "type": "loopback",
            });
            if let Err(err) = self.exec("ADD", id, &netns, "lo", "lo", loopback).await {
                remove_netns(&netns);
                return Err(err);
            }
        }
        let mut attachments: Vec<Attachment> = Vec::new();
        for (i, network) in networks.iter().enumerate() {
            let ifname = format!("eth{i}");
            let ports = if i == 0 { ports.to_vec() } else { Vec::new() };
            let mut added = self.add(id, &netns, network, &ifname, &ports).await;
            if let Err(err) = &added {
                // An attachment made and never recorded (its monitor died
                // between the two) holds this id's address: released with a
                // DEL, the ADD is tried once more.
                tracing::info!(container = %id, %network, error = %err, "CNI ADD failed; releasing what an earlier attachment may hold and trying again");
                self.del_unrecorded(id, &netns, network, &ifname).await;
                added = self.add(id, &netns, network, &ifname, &ports).await;
            }
            match added {
                Ok(result) => {
                    let address = first_address(&result);
                    attachments.push(Attachment {
                        network: network.clone(),
                        ifname,
                        ports,
                        result,
                        address,
                    });
                    self.save(id, &attachments)?;
                }
                Err(err) => {
                    let _ = self.detach(id).await;
                    return Err(err);
                }
            }
        }
        Ok(attachments
            .into_iter()
            .filter_map(|a| Some((a.network, a.address?)))
            .collect())
    }

    /// The addresses container `id` has on its networks, from the state.
    pub fn addresses(&self, id: &str) -> Result<Vec<(String, String)>, NetworkError> {
        Ok(self
            .load(id)?
            .into_iter()
            .filter_map(|a| Some((a.network, a.address?)))
            .collect())
    }

    /// The ports container `id` publishes, from the state.
    pub fn ports(&self, id: &str) -> Result<Vec<PortMapping>, NetworkError> {
        Ok(self
            .load(id)?
            .into_iter()
            .next()
            .map(|a| a.ports)
            .unwrap_or_default())
    }

    /// Replaces the ports container `id` publishes on its first network:
    /// `portmap` DEL with the old mappings, then ADD with `ports`, on the
    /// stored result of the attachment. Addresses and interfaces stay.
    pub async fn set_ports(&self, id: &str, ports: &[PortMapping]) -> Result<(), NetworkError> {
        let mut attachments = self.load(id)?;
        let Some(first) = attachments.first_mut() else {
            return Err(NetworkError::State(format!(
                "{id} has no network attachment to publish ports on"
            )));
        };
        if first.ports == ports {
            return Ok(());
        }
        let netns = self.netns_path(id)?;
        let portmap = self
            .plugins(&first.network)?
            .into_iter()
            .find(|p| p["type"] == "portmap")
            .ok_or_else(|| NetworkError::State("no portmap plugin".into()))?;
        let config = plugin_config(
            portmap.clone(),
            &self.cni_name(&first.network),
            Some(&first.result),
            &first.ports,
        );
        self.exec("DEL", id, &netns, &first.network, &first.ifname, config)
            .await?;
        first.ports = Vec::new();
        self.save(id, &attachments)?;
        let Some(first) = attachments.first_mut() else {
            return Ok(());
        };
        let config = plugin_config(
            portmap,
            &self.cni_name(&first.network),
            Some(&first.result),
            ports,
        );
        self.exec("ADD", id, &netns, &first.network, &first.ifname, config)
            .await?;
        first.ports = ports.to_vec();
        self.save(id, &attachments)
    }

    /// Undoes [`Networks::attach`]: CNI DEL on every attachment, in reverse,
    /// then the network namespace. Missing parts are fine.
    pub async fn detach(&self, id: &str) -> Result<(), NetworkError> {
        let netns = self.netns_path(id)?;
        let attachments = self.load(id)?;
        let mut first_error = None;
        for attachment in attachments.iter().rev() {
            if let Err(err) = self.del(id, &netns, attachment).await {
                tracing::warn!(container = %id, error = %err, "CNI DEL failed");
                first_error.get_or_insert(err);
            }
        }
        if first_error.is_none() {
            StateDir::remove(&self.attachments_path(id)?)?;
        }
        remove_netns(&netns);
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn save(&self, id: &str, attachments: &[Attachment]) -> Result<(), NetworkError> {
        Ok(StateDir::write_json(
            &self.attachments_path(id)?,
            attachments,
        )?)
    }

    fn load(&self, id: &str) -> Result<Vec<Attachment>, NetworkError> {
        Ok(StateDir::read_json(&self.attachments_path(id)?)?.unwrap_or_default())
    }

    async fn add(
        &self,
        id: &str,
        netns: &Path,
        network: &str,
        ifname: &str,
        ports: &[PortMapping],
    ) -> Result<Value, NetworkError> {
        let mut previous: Option<Value> = None;
        for plugin in self.plugins(network)? {
            let config = plugin_config(plugin, &self.cni_name(network), previous.as_ref(), ports);
            let result = self.exec("ADD", id, netns, network, ifname, config).await?;
            previous = Some(result);
        }
        Ok(previous.unwrap_or(Value::Null))
    }

    /// CNI DEL of `network` on `ifname` for an attachment with no record
    /// (no result, no ports): each plugin releases what it holds for the
    /// container id and interface, and what it does not hold is fine.
    async fn del_unrecorded(&self, id: &str, netns: &Path, network: &str, ifname: &str) {
        let Ok(mut plugins) = self.plugins(network) else {
            return;
        };
        plugins.reverse();
        for plugin in plugins {
            let config = plugin_config(plugin, &self.cni_name(network), None, &[]);
            if let Err(err) = self.exec("DEL", id, netns, network, ifname, config).await {
                tracing::debug!(container = %id, %network, error = %err, "CNI DEL of an unrecorded attachment");
            }
        }
    }

    async fn del(
        &self,
        id: &str,
        netns: &Path,
        attachment: &Attachment,
    ) -> Result<(), NetworkError> {
        let mut plugins = self.plugins(&attachment.network)?;
        plugins.reverse();
        for plugin in plugins {
            let config = plugin_config(
                plugin,
                &self.cni_name(&attachment.network),
                Some(&attachment.result),
                &attachment.ports,
            );
            self.exec(
                "DEL",
                id,
                netns,
                &attachment.network,
                &attachment.ifname,
                config,
            )
            .await?;
        }
        Ok(())
    }
}
