//! The `consent` section of a manager's policy: privileges installs
//! receive without asking.

use serde::{Deserialize, Deserializer};

use super::{CoreRules, HostPathRule, PortRange, PortText, is_plain_absolute, is_under};
use crate::{Privilege, PrivilegeKind};

/// Privileges given to installs without asking.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Consent {
    /// Names of the addons whose installs receive them; `*` is any.
    pub addons: Vec<String>,
    /// Privileged mode.
    pub privileged: bool,
    /// Host paths under these prefixes (read-only unless `writable`).
    pub host_paths: Vec<HostPathRule>,
    /// Host ports in these ranges.
    pub host_ports: Vec<PortRule>,
    /// Replacing these core components; `*` is any.
    pub core_components: Vec<String>,
    /// Reading these replaced core components' environment; `*` is any.
    pub inherit_environment: Vec<String>,
}

impl Default for Consent {
    fn default() -> Self {
        Self {
            addons: any_addon(),
            privileged: false,
            host_paths: Vec::new(),
            host_ports: Vec::new(),
            core_components: Vec::new(),
            inherit_environment: Vec::new(),
        }
    }
}

fn any_addon() -> Vec<String> {
    vec!["*".into()]
}

impl Consent {
    /// Whether an install of addon `addon` receives `need` without asking.
    pub fn covers(&self, addon: &str, need: &Privilege) -> bool {
        if !CoreRules::allows(&self.addons, addon) {
            return false;
        }
        match need.kind {
            None | Some(PrivilegeKind::KeepCoreStopped) => false,
            Some(PrivilegeKind::Privileged) => self.privileged,
            Some(PrivilegeKind::HostPath) => {
                let path = crate::privileges::normal_path(&need.value);
                is_plain_absolute(&path)
                    && self.host_paths.iter().any(|rule| {
                        is_under(&path, &crate::privileges::normal_path(&rule.prefix))
                            && (rule.writable || need.read_only)
                    })
            }
            Some(PrivilegeKind::HostPort) => {
                let (port, protocol) = need.value.split_once('/').unwrap_or((&need.value, "tcp"));
                port.parse::<u16>().is_ok_and(|port| {
                    self.host_ports.iter().any(|rule| {
                        rule.ports.contains(port)
                            && rule.protocol.as_deref().is_none_or(|p| p == protocol)
                    })
                })
            }
            Some(PrivilegeKind::CoreComponent) => {
                CoreRules::allows(&self.core_components, &need.value)
            }
            Some(PrivilegeKind::CoreEnvironment) => {
                CoreRules::allows(&self.inherit_environment, &need.value)
            }
        }
    }

    /// What of `needs` an install of `addon` receives by this consent,
    /// marked as granted by policy.
    pub fn grants(&self, addon: &str, needs: &[Privilege]) -> Vec<Privilege> {
        needs
            .iter()
            .filter(|need| self.covers(addon, need))
            .map(|need| Privilege {
                by_policy: true,
                ..need.clone()
            })
            .collect()
    }
}

/// Ports consented to: `10000-20000/tcp`, `8080` (either protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// The ports.
    pub ports: PortRange,
    /// `tcp` or `udp`; `None`: both.
    pub protocol: Option<String>,
}

impl<'de> Deserialize<'de> for PortRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = match PortText::deserialize(deserializer)? {
            PortText::Port(port) => port.to_string(),
            PortText::Text(text) => text,
        };
        let (range, protocol) = match text.split_once('/') {
            Some((range, protocol)) if matches!(protocol, "tcp" | "udp") => {
                (range, Some(protocol.to_owned()))
            }
            Some(_) => {
                return Err(serde::de::Error::custom(format!(
                    "`{text}`: the protocol is tcp or udp"
                )));
            }
            None => (text.as_str(), None),
        };
        let ports =
            PortRange::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(range))?;
        Ok(Self { ports, protocol })
    }
}
