//! The first message of a link, checked once into a [`ValidHello`].

use std::{collections::BTreeMap, time::Duration};

use oakestra_addons_proto::engine::v1 as pb;

use crate::{Error, model::Plane};

/// Shortest heartbeat interval a monitor may announce.
pub(super) const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest heartbeat interval a monitor may announce: a silent link is
/// dropped after three of them, so a dead or fake link goes within three
/// minutes.
pub(super) const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

/// The labels each node may claim, from the manager's `--node-labels` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLabels {
    /// Per node id.
    #[serde(default)]
    nodes: BTreeMap<String, BTreeMap<String, String>>,
    /// For every node not named; without it, none.
    #[serde(default)]
    default: BTreeMap<String, String>,
}

impl NodeLabels {
    /// Parses the file's text.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let parsed: Self = serde_yaml_ng::from_str(text).map_err(|err| err.to_string())?;
        for (node, labels) in parsed
            .nodes
            .iter()
            .map(|(n, l)| (n.as_str(), l))
            .chain([("default", &parsed.default)])
        {
            if let Some(violation) =
                addons_descriptor::labels::validate_labels(labels, node).first()
            {
                return Err(format!("{}: {}", violation.field, violation.reason));
            }
        }
        Ok(parsed)
    }

    /// Reads and parses the file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read the node labels {}: {err}", path.display()))?;
        Self::from_yaml(&text).map_err(|err| format!("node labels {}: {err}", path.display()))
    }

    /// Whether `node` may claim each of `labels`.
    pub(super) fn check(&self, node: &str, labels: &BTreeMap<String, String>) -> Result<(), Error> {
        let allowed = self.nodes.get(node).unwrap_or(&self.default);
        let refused: Vec<String> = labels
            .iter()
            .filter(|(key, value)| allowed.get(*key) != Some(*value))
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        if refused.is_empty() {
            Ok(())
        } else {
            Err(Error::LabelsNotAllowed {
                node: node.to_owned(),
                labels: refused.join(", "),
            })
        }
    }
}

/// A hello that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ValidHello {
    /// The node, trimmed.
    pub(super) node: String,
    /// Its plane.
    pub(super) plane: Plane,
    /// Its heartbeat interval.
    pub(super) heartbeat: Duration,
    /// Whether it takes the desired state in chunks.
    pub(super) accepts_chunks: bool,
    /// The monitor's version.
    pub(super) version: String,
    /// How many services it runs.
    pub(super) observed: usize,
    /// Its labels.
    pub(super) labels: std::collections::BTreeMap<String, String>,
}

impl TryFrom<pb::Hello> for ValidHello {
    type Error = Error;

    fn try_from(hello: pb::Hello) -> Result<Self, Error> {
        let node = hello.node_id.trim().to_owned();
        if node.is_empty() || node.len() > 253 || node.contains(char::is_whitespace) {
            return Err(Error::invalid(
                "hello.node_id",
                "required, at most 253 characters, no whitespace",
            ));
        }
        let plane = match pb::Plane::try_from(hello.plane).unwrap_or_default() {
            pb::Plane::Root => Plane::Root,
            pb::Plane::Cluster => Plane::Cluster,
            pb::Plane::Unspecified => {
                return Err(Error::invalid(
                    "hello.plane",
                    "required (PLANE_ROOT or PLANE_CLUSTER)",
                ));
            }
        };
        let heartbeat = hello
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::ZERO);
        if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&heartbeat) {
            return Err(Error::invalid(
                "hello.heartbeat_interval",
                format!("required, {MIN_HEARTBEAT:?} to {MAX_HEARTBEAT:?}"),
            ));
        }
        let violations = addons_descriptor::labels::validate_labels(&hello.labels, "hello.labels");
        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        if hello.monitor_version.len() > 128 {
            return Err(Error::invalid("hello.monitor_version", "at most 128 bytes"));
        }
        Ok(Self {
            node,
            plane,
            heartbeat,
            accepts_chunks: hello.accepts_desired_state_chunks,
            version: hello.monitor_version,
            observed: hello.observed.len(),
            labels: hello.labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_claims_only_the_labels_it_is_given() {
        let allowed = NodeLabels::from_yaml(
            "nodes:\n  node-a: {zone: a, tier: edge}\ndefault: {tier: edge}\n",
        )
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(allowed.check("node-a", &labels(&[("zone", "a")])).is_ok());
        assert!(allowed.check("node-a", &labels(&[])).is_ok());
        assert!(
            allowed
                .check("node-b", &labels(&[("tier", "edge")]))
                .is_ok()
        );
        let refused = allowed
            .check("node-b", &labels(&[("zone", "a"), ("tier", "edge")]))
            .unwrap_err();
        assert!(refused.to_string().contains("zone=a"), "{refused}");
        assert!(allowed.check("node-a", &labels(&[("zone", "b")])).is_err());
        assert!(NodeLabels::from_yaml("nodes: {n: {\"bad key!\": x}}").is_err());
        assert!(NodeLabels::from_yaml("other: 1").is_err());
    }

    fn hello() -> pb::Hello {
        pb::Hello {
            node_id: " node-1 ".into(),
            plane: pb::Plane::Root.into(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::Invalid(violations) => violations[0].field.clone(),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn checks_every_field() {
        let valid = ValidHello::try_from(hello()).unwrap();
        assert_eq!(
            (valid.node.as_str(), valid.plane, valid.heartbeat),
            ("node-1", Plane::Root, Duration::from_secs(5))
        );
        type Spoil = fn(&mut pb::Hello);
        let cases: [(Spoil, &str); 7] = [
            (
                |h| {
                    h.labels.insert("zone".into(), "a b".into());
                },
                "hello.labels[zone]",
            ),
            (
                |h| h.monitor_version = "v".repeat(129),
                "hello.monitor_version",
            ),
            (|h| h.node_id = "a b".into(), "hello.node_id"),
            (|h| h.node_id = "x".repeat(254), "hello.node_id"),
            (|h| h.plane = 0, "hello.plane"),
            (|h| h.heartbeat_interval = None, "hello.heartbeat_interval"),
            (
                |h| {
                    h.heartbeat_interval = Some(prost_types::Duration {
                        seconds: i64::from(u32::MAX),
                        nanos: 0,
                    })
                },
                "hello.heartbeat_interval",
            ),
        ];
        for (spoil, field) in cases {
            let mut bad = hello();
            spoil(&mut bad);
            assert_eq!(field_of(ValidHello::try_from(bad).unwrap_err()), field);
        }
    }
}
