//! The privilege policy of a manager or a node (`--policy FILE`, YAML): what
//! may be granted at all, whatever an operator accepts. The manager checks
//! an install against its policy; each node checks every service against
//! its own before it starts it.
//!
//! ```yaml
//! privileged: false            # privileged containers
//! host_paths:                  # host paths under these prefixes
//!   - prefix: /var/log
//!   - prefix: /srv/addons
//!     writable: true           # read-write mounts too (default: read-only only)
//! host_ports: ["1024-65535"]   # ports or ranges that may be published
//! reserved_ports: [9090]       # never, on top of our own servers' ports
//! core_components:             # which may be replaced ("*": any)
//!   replace: [scheduler]
//!   inherit_environment: []    # whose environment a replacement may read
//! resources:
//!   default: {memory: 512Mi, pids: 1024}   # for services that set none
//!   max: {memory: 2Gi, cpu_millis: 2000, pids: 4096}
//! consent:                     # a manager's only: granted without asking
//!   addons: ["*"]              # to installs of these addons (default: any)
//!   host_ports: ["10000-20000/tcp"]   # ports or ranges, `/tcp` or `/udp`
//!   host_paths:
//!     - prefix: /srv/addons    # read-only mounts (writable: true for rw)
//!   core_components: []        # replacing these
//!   inherit_environment: []    # reading these replaced ones' environment
//!   privileged: false
//! ```
//!
//! What `consent` names is granted to an install that did not accept it,
//! recorded as granted by policy; it must still be allowed by the rest of
//! the policy, and anything it does not name still needs the caller's
//! consent. Keeping a replaced core component stopped is never consented
//! by policy.
//!
//! Without a file: nothing privileged, no host paths, host ports 1024 to
//! 65535 except our own servers' ports, the defaults above and no maximum.
//! Which core components may be replaced without a file is the caller's
//! default: any on the manager (each node decides), only those the node's
//! core-components file marks on a node.

use serde::{Deserialize, Deserializer};

use crate::{Privilege, PrivilegeKind, Resources, Service};

mod consent;

pub use self::consent::{Consent, PortRule};

/// The ports of our own servers (root-plane manager, marketplace, monitor,
/// cluster-plane manager), never given to an addon.
pub const OUR_PORTS: [u16; 4] = [11101, 11102, 11103, 11201];

/// A policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Whether privileged containers are allowed.
    pub privileged: bool,
    /// Host paths that may be mounted.
    pub host_paths: Vec<HostPathRule>,
    /// Host ports that may be published.
    pub host_ports: Vec<PortRange>,
    /// Ports never published, besides [`OUR_PORTS`] and the server's own.
    pub reserved_ports: Vec<u16>,
    /// Which core components may be replaced; `None`: the caller's default.
    pub core_components: Option<CoreRules>,
    /// Default and maximum limits of containers.
    pub resources: ResourceRules,
    /// Privileges an install receives without asking (a manager's policy
    /// only): what an operator consents to once, for clients that cannot
    /// consent, such as Oakestra's dashboard.
    pub consent: Consent,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            privileged: false,
            host_paths: Vec::new(),
            host_ports: default_host_ports(),
            reserved_ports: Vec::new(),
            core_components: None,
            resources: ResourceRules::default(),
            consent: Consent::default(),
        }
    }
}

fn default_host_ports() -> Vec<PortRange> {
    vec![PortRange {
        first: 1024,
        last: 65535,
    }]
}

/// Host paths under `prefix` may be mounted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPathRule {
    /// An absolute path; mounts of it or of anything below it match.
    pub prefix: String,
    /// Whether read-write mounts are allowed (otherwise read-only only).
    #[serde(default)]
    pub writable: bool,
}

/// A range of ports, written `8080` or `1024-65535`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port, included.
    pub last: u16,
}

/// A port rule as YAML writes it: a number, or text (a range, a protocol).
#[derive(Deserialize)]
#[serde(untagged)]
enum PortText {
    Port(u16),
    Text(String),
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = match PortText::deserialize(deserializer)? {
            PortText::Port(port) => return Ok(Self::new(port, port)),
            PortText::Text(text) => text,
        };
        let port = |t: &str| {
            t.trim()
                .parse::<u16>()
                .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a port or range")))
        };
        let range = match text.split_once('-') {
            Some((first, last)) => Self::new(port(first)?, port(last)?),
            None => {
                let single = port(&text)?;
                Self::new(single, single)
            }
        };
        if range.first == 0 || range.first > range.last {
            return Err(serde::de::Error::custom(format!(
                "`{text}` is not a range of ports from 1 up"
            )));
        }
        Ok(range)
    }
}

impl PortRange {
    fn new(first: u16, last: u16) -> Self {
        Self { first, last }
    }

    fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// Whether `path` is absolute, with no `.` or `..` segment.
fn is_plain_absolute(path: &str) -> bool {
    path.starts_with('/') && !path.split('/').any(|p| p == "." || p == "..")
}

/// Whether `path` is `prefix` or below it (both normal).
fn is_under(path: &str, prefix: &str) -> bool {
    path == prefix
        || prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Which core components may be replaced, and whose environment read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreRules {
    /// Names that may be replaced; `*` is any.
    #[serde(default)]
    pub replace: Vec<String>,
    /// Names whose environment a replacement may inherit; `*` is any.
    #[serde(default)]
    pub inherit_environment: Vec<String>,
}

impl CoreRules {
    /// Any component may be replaced and its environment read.
    pub fn any() -> Self {
        Self {
            replace: vec!["*".into()],
            inherit_environment: vec!["*".into()],
        }
    }

    fn allows(list: &[String], name: &str) -> bool {
        list.iter().any(|entry| entry == "*" || entry == name)
    }
}

/// Limits as a policy file writes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory: bytes, or a number with `Ki`, `Mi` or `Gi`.
    #[serde(default, deserialize_with = "memory")]
    pub memory: Option<u64>,
    /// Thousandths of a CPU.
    #[serde(default)]
    pub cpu_millis: Option<u32>,
    /// Processes and threads.
    #[serde(default)]
    pub pids: Option<u32>,
}

fn memory<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    let text = match Option::<Raw>::deserialize(deserializer)? {
        None => return Ok(None),
        Some(Raw::Bytes(bytes)) => return Ok(Some(bytes)),
        Some(Raw::Text(text)) => text,
    };
    parse_memory(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Reads `512Mi`, `2Gi`, `64Ki` or plain bytes.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("`{text}` is not a size such as 512Mi or 2Gi")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("`{text}` is not a size such as 512Mi or 2Gi"))
}

/// Default and maximum limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRules {
    /// For services that set none.
    #[serde(default = "default_limits")]
    pub default: Limits,
    /// No service may ask for more.
    #[serde(default)]
    pub max: Limits,
}

impl Default for ResourceRules {
    fn default() -> Self {
        Self {
            default: default_limits(),
            max: Limits::default(),
        }
    }
}

fn default_limits() -> Limits {
    Limits {
        memory: Some(512 << 20),
        cpu_millis: None,
        pids: Some(1024),
    }
}

/// A need the policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule, as the policy file names it (`host_paths`).
    pub rule: &'static str,
    /// The service.
    pub service_name: String,
    /// What is not allowed, and what would be.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "policy rule `{}`: {}", self.rule, self.message)
    }
}

impl Policy {
    /// Reads a policy file's text.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let policy: Self = serde_yaml_ng::from_str(text).map_err(|err| err.to_string())?;
        for (field, rules) in [
            ("host_paths", &policy.host_paths),
            ("consent.host_paths", &policy.consent.host_paths),
        ] {
            for rule in rules {
                if !rule.prefix.starts_with('/') || rule.prefix.split('/').any(|part| part == "..")
                {
                    return Err(format!(
                        "{field}: `{}` is not an absolute path without `..`",
                        rule.prefix
                    ));
                }
            }
        }
        Ok(policy)
    }

    /// The policy of `--policy PATH`, or the default without one; the error
    /// names the file.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read the policy {}: {err}", path.display()))?;
        Self::from_yaml(&text).map_err(|err| format!("{}: {err}", path.display()))
    }

    /// The core rules in force: the file's, else `default`.
    pub fn core_rules(&self, default: CoreRules) -> CoreRules {
        self.core_components.clone().unwrap_or(default)
    }

    /// Whether `need` is allowed; `reserved` are the server's own ports and
    /// `core` the core rules in force.
    pub fn check(
        &self,
        need: &Privilege,
        reserved: &[u16],
        core: &CoreRules,
    ) -> Result<(), Violation> {
        let service = &need.service_name;
        let violation = |rule: &'static str, message: String| Violation {
            rule,
            service_name: service.clone(),
            message,
        };
        match need.kind {
            None => Err(violation("kind", "a privilege without a kind".into())),
            Some(PrivilegeKind::Privileged) => {
                if self.privileged {
                    Ok(())
                } else {
                    Err(violation(
                        "privileged",
                        format!("service {service} asks for privileged mode, which is not allowed"),
                    ))
                }
            }
            Some(PrivilegeKind::HostPath) => {
                let path = crate::privileges::normal_path(&need.value);
                // Compared as strings, `/srv/addons/../../etc` would be
                // under `/srv/addons`: such a path is never allowed.
                if !is_plain_absolute(&path) {
                    return Err(violation(
                        "host_paths",
                        format!(
                            "service {service} mounts host path {} with `.` or `..` segments or not absolute",
                            crate::quoted(&path)
                        ),
                    ));
                }
                let allowed = self.host_paths.iter().any(|rule| {
                    is_under(&path, &crate::privileges::normal_path(&rule.prefix))
                        && (rule.writable || need.read_only)
                });
                if allowed {
                    Ok(())
                } else {
                    let mode = if need.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    };
                    let prefixes: Vec<String> = self
                        .host_paths
                        .iter()
                        .map(|r| {
                            format!("{}{}", r.prefix, if r.writable { " (rw)" } else { " (ro)" })
                        })
                        .collect();
                    Err(violation(
                        "host_paths",
                        format!(
                            "service {service} mounts host path {path} {mode}; allowed: {}",
                            if prefixes.is_empty() {
                                "none".to_owned()
                            } else {
                                prefixes.join(", ")
                            }
                        ),
                    ))
                }
            }
            Some(PrivilegeKind::HostPort) => {
                let port: u16 = need
                    .value
                    .split('/')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                if OUR_PORTS.contains(&port)
                    || reserved.contains(&port)
                    || self.reserved_ports.contains(&port)
                {
                    return Err(violation(
                        "reserved_ports",
                        format!("service {service} publishes host port {port}, which is reserved"),
                    ));
                }
                if self.host_ports.iter().any(|range| range.contains(port)) {
                    Ok(())
                } else {
                    let ranges: Vec<String> = self
                        .host_ports
                        .iter()
                        .map(|r| {
                            if r.first == r.last {
                                r.first.to_string()
                            } else {
                                format!("{}-{}", r.first, r.last)
                            }
                        })
                        .collect();
                    Err(violation(
                        "host_ports",
                        format!(
                            "service {service} publishes host port {port}; allowed: {}",
                            if ranges.is_empty() {
                                "none".to_owned()
                            } else {
                                ranges.join(", ")
                            }
                        ),
                    ))
                }
            }
            Some(PrivilegeKind::CoreComponent | PrivilegeKind::KeepCoreStopped) => {
                if CoreRules::allows(&core.replace, &need.value) {
                    Ok(())
                } else {
                    Err(violation(
                        "core_components.replace",
                        format!(
                            "service {service} would replace core component {}, which is not replaceable here",
                            need.value
                        ),
                    ))
                }
            }
            Some(PrivilegeKind::CoreEnvironment) => {
                if CoreRules::allows(&core.inherit_environment, &need.value) {
                    Ok(())
                } else {
                    Err(violation(
                        "core_components.inherit_environment",
                        format!(
                            "service {service} would read core component {}'s environment, which is not allowed here",
                            need.value
                        ),
                    ))
                }
            }
        }
    }

    /// Every need the policy refuses.
    pub fn check_all(
        &self,
        needs: &[Privilege],
        reserved: &[u16],
        core: &CoreRules,
    ) -> Vec<Violation> {
        needs
            .iter()
            .filter_map(|need| self.check(need, reserved, core).err())
            .collect()
    }

    /// The limits `service` runs with: what it asks for, else the default;
    /// refused when it asks for more than the maximum.
    pub fn limits(&self, service: &Service) -> Result<Resources, Violation> {
        let asked = service.resources;
        let defaults = self.resources.default;
        let max = self.resources.max;
        let name = &service.service_name;
        let over = |what: &str, asked: String, max: String| Violation {
            rule: "resources.max",
            service_name: name.clone(),
            message: format!("service {name} asks for {what} {asked}; the maximum is {max}"),
        };
        let pick = |asked: Option<u64>, default: Option<u64>, max: Option<u64>| match (asked, max) {
            (Some(a), Some(m)) if a > m => Err((a, m)),
            (Some(a), _) => Ok(Some(a)),
            (None, _) => Ok(match (default, max) {
                (Some(d), Some(m)) => Some(d.min(m)),
                (d, m) => d.or(m),
            }),
        };
        let memory = pick(asked.memory_bytes, defaults.memory, max.memory)
            .map_err(|(a, m)| over("memory", format!("{a} bytes"), format!("{m} bytes")))?;
        let cpu = pick(
            asked.cpu_millis.map(u64::from),
            defaults.cpu_millis.map(u64::from),
            max.cpu_millis.map(u64::from),
        )
        .map_err(|(a, m)| over("CPU", format!("{a} millicpus"), format!("{m} millicpus")))?;
        let pids = pick(
            asked.pids.map(u64::from),
            defaults.pids.map(u64::from),
            max.pids.map(u64::from),
        )
        .map_err(|(a, m)| over("pids", a.to_string(), m.to_string()))?;
        Ok(Resources {
            memory_bytes: memory,
            cpu_millis: cpu.and_then(|c| u32::try_from(c).ok()),
            pids: pids.and_then(|p| u32::try_from(p).ok()),
        })
    }
}

#[cfg(test)]
mod tests;
