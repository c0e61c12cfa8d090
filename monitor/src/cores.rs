//! Core components: the orchestrator's own containers on this node, which
//! an addon service of the same name replaces (a *plugin*) and which come
//! back when it goes.
//!
//! A core component is a container in the monitor's namespace, not one of
//! the monitor's addon containers, whose id is `<plane>_<name>` or that
//! carries the label `oakestra.io/core-component=<name>`. The monitor can
//! also run core components itself from a static file (`--core-components`),
//! the way a kubelet runs static pods. This module holds that file's format
//! and the pure rules of a swap; the reconciler acts on them.

use std::{collections::BTreeMap, path::Path};

use addons_descriptor::{is_name, names::NAME_RULE};
use serde::{Deserialize, Serialize};

use crate::{
    labels::{CORE_COMPONENT, MANAGED_BY},
    network::PortMapping,
    runtime::ContainerInfo,
};

/// The core components among `all` (every container of the namespace),
/// with their names: containers that are not the monitor's addon
/// containers, named `<plane>_<name>` or labelled with their name.
pub fn discover<'a>(all: &'a [ContainerInfo], plane: &str) -> Vec<(String, &'a ContainerInfo)> {
    let prefix = format!("{plane}_");
    all.iter()
        .filter(|c| !c.labels.contains_key(MANAGED_BY))
        .filter_map(|c| {
            let name = match c.labels.get(CORE_COMPONENT) {
                Some(name) => name.clone(),
                None => c.id.strip_prefix(&prefix)?.to_owned(),
            };
            (!name.is_empty()).then_some((name, c))
        })
        .collect()
}

/// One entry of the static core-components file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreComponentSpec {
    /// Name; the container id is `<plane>_<name>`.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Replaces the image's cmd: a list, or one string split on whitespace.
    #[serde(default)]
    pub command: Command,
    /// Environment added to the image's.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<CorePort>,
    /// Networks, `oakestra` when empty.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Whether an addon service may replace it (granted at install, and
    /// allowed here). Without it, only a `--policy` naming it allows that.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replaceable: bool,
    /// Whether its replacement may start with its environment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherit_environment: bool,
}

/// A command line, written as a list or as one string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    /// Not given: the image's cmd.
    #[default]
    None,
    /// One string, split on whitespace.
    Line(String),
    /// Arguments.
    Args(Vec<String>),
}

impl Command {
    /// The arguments.
    pub fn args(&self) -> Vec<String> {
        match self {
            Self::None => Vec::new(),
            Self::Line(line) => line.split_whitespace().map(str::to_owned).collect(),
            Self::Args(args) => args.clone(),
        }
    }
}

/// A published port of a core component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorePort {
    /// Port in the container.
    pub container_port: u16,
    /// Port on the node.
    pub host_port: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "tcp".to_owned()
}

impl CoreComponentSpec {
    /// The published ports as the network layer takes them.
    pub fn port_mappings(&self) -> Vec<PortMapping> {
        self.ports
            .iter()
            .map(|p| PortMapping {
                host_port: p.host_port,
                container_port: p.container_port,
                protocol: p.protocol.clone(),
            })
            .collect()
    }

    /// A stable hash of the entry: a static core container whose label
    /// differs was made from an older file and is recreated.
    pub fn hash(&self) -> String {
        use sha2::Digest as _;
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = sha2::Sha256::digest(json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Reads and checks the static core-components file: a YAML list of
/// entries. Every problem is reported with the entry it is in.
pub fn load(path: &Path) -> Result<Vec<CoreComponentSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    parse(&text).map_err(|err| format!("{}: {err}", path.display()))
}

/// Parses and checks the text of a core-components file.
pub fn parse(text: &str) -> Result<Vec<CoreComponentSpec>, String> {
    let specs: Vec<CoreComponentSpec> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_yaml_ng::from_str(text).map_err(|err| err.to_string())?
    };
    let mut names = std::collections::HashSet::new();
    let mut host_ports = std::collections::HashSet::new();
    for (i, spec) in specs.iter().enumerate() {
        let at = |field: &str| format!("[{i}].{field}");
        if !is_name(&spec.name) {
            return Err(format!(
                "{}: `{}` is not a name ({NAME_RULE})",
                at("name"),
                spec.name
            ));
        }
        if !names.insert(spec.name.clone()) {
            return Err(format!("{}: `{}` appears twice", at("name"), spec.name));
        }
        if spec.image.parse::<oci_client::Reference>().is_err() {
            return Err(format!(
                "{}: `{}` is not an image reference",
                at("image"),
                spec.image
            ));
        }
        for (j, port) in spec.ports.iter().enumerate() {
            let at = |field: &str| format!("[{i}].ports[{j}].{field}");
            if port.container_port == 0 {
                return Err(format!("{}: must be 1..65535", at("container_port")));
            }
            if port.host_port == 0 {
                return Err(format!("{}: must be 1..65535", at("host_port")));
            }
            if port.protocol != "tcp" && port.protocol != "udp" {
                return Err(format!(
                    "{}: `{}` is not tcp or udp",
                    at("protocol"),
                    port.protocol
                ));
            }
            if !host_ports.insert((port.host_port, port.protocol.clone())) {
                return Err(format!(
                    "{}: {}/{} is published twice",
                    at("host_port"),
                    port.host_port,
                    port.protocol
                ));
            }
        }
        for (j, network) in spec.networks.iter().enumerate() {
            if !is_name(network) {
                return Err(format!(
                    "[{i}].networks[{j}]: `{network}` is not a name ({NAME_RULE})"
                ));
            }
        }
        for key in spec.environment.keys() {
            if key.is_empty() || key.contains('=') {
                return Err(format!(
                    "{}: `{key}` is not a variable name",
                    at("environment")
                ));
            }
        }
    }
    Ok(specs)
}

/// The ports a replacement publishes: the core component's, except where
/// the addon names the same container port (and protocol), plus the
/// addon's own.
pub fn merge_ports(inherited: &[PortMapping], declared: &[PortMapping]) -> Vec<PortMapping> {
    let mut ports: Vec<PortMapping> = inherited
        .iter()
        .filter(|p| {
            !declared
                .iter()
                .any(|d| d.container_port == p.container_port && d.protocol == p.protocol)
        })
        .cloned()
        .collect();
    for port in declared {
        if !ports.contains(port) {
            ports.push(port.clone());
        }
    }
    ports
}

/// The environment of a replacement: the core component's first when the
/// service inherits it, then the image's, then the descriptor's; later
/// entries win.
pub fn merge_env(core: &[String], image: &[String], declared: &[(String, String)]) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |entry: String| {
        let key = entry.split('=').next().unwrap_or_default().to_owned();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(entry);
    };
    for entry in core.iter().chain(image) {
        set(entry.clone());
    }
    for (key, value) in declared {
        set(format!("{key}={value}"));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(host: u16, container: u16) -> PortMapping {
        PortMapping {
            host_port: host,
            container_port: container,
            protocol: "tcp".into(),
        }
    }

    #[test]
    fn parses_a_file() {
        let specs = parse(
            "- name: scheduler\n  image: 127.0.0.1:5000/sched:1\n  command: /bin/httpd -f -p 8080\n  environment: {MODE: core}\n  ports:\n  - {container_port: 8080, host_port: 18080}\n  networks: [oakestra]\n- name: api\n  image: busybox\n  command: [sleep, '1000']\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].command.args(), ["/bin/httpd", "-f", "-p", "8080"]);
        assert_eq!(specs[0].ports[0].protocol, "tcp");
        assert_eq!(specs[1].command.args(), ["sleep", "1000"]);
        assert_ne!(specs[0].hash(), specs[1].hash());
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_entries_naming_the_field() {
        let cases = [
            ("- name: _sched\n  image: x\n", "[0].name"),
            ("- name: a\n  image: x\n- name: a\n  image: y\n", "[1].name"),
            ("- name: a\n  image: 'UPPER CASE'\n", "[0].image"),
            (
                "- name: a\n  image: x\n  ports: [{container_port: 0, host_port: 1}]\n",
                "[0].ports[0].container_port",
            ),
            (
                "- name: a\n  image: x\n  ports: [{container_port: 1, host_port: 1, protocol: sctp}]\n",
                "[0].ports[0].protocol",
            ),
            (
                "- name: a\n  image: x\n  ports: [{container_port: 1, host_port: 9}]\n- name: b\n  image: x\n  ports: [{container_port: 2, host_port: 9}]\n",
                "[1].ports[0].host_port",
            ),
            ("- name: a\n  image: x\n  colour: red\n", "colour"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn declared_ports_win_on_the_same_container_port() {
        let merged = merge_ports(
            &[port(18080, 8080), port(19090, 9090)],
            &[port(28080, 8080), port(17000, 7000)],
        );
        assert_eq!(
            merged,
            [port(19090, 9090), port(28080, 8080), port(17000, 7000)]
        );
        assert_eq!(merge_ports(&[port(1, 2)], &[port(1, 2)]), [port(1, 2)]);
    }

    #[test]
    fn merges_environments_in_order() {
        let env = merge_env(
            &["PATH=/core".into(), "ROLE=core".into(), "TOKEN=t".into()],
            &["PATH=/bin".into()],
            &[("ROLE".into(), "addon".into())],
        );
        assert_eq!(env, ["TOKEN=t", "PATH=/bin", "ROLE=addon"]);
    }
}
