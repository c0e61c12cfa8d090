//! Privileges: what an addon's services ask to be allowed on a node, derived
//! from the descriptor, and whether what an operator granted covers them.
//!
//! The marketplace shows them (`required_privileges`), the manager refuses
//! an install whose grants do not cover them, and each node checks again,
//! from the snapshot it runs, before it starts a service, so neither a
//! careless publisher nor a compromised manager gets more than the
//! operator said yes to.

use serde::{Deserialize, Serialize};

use crate::{Descriptor, MountSource, Service};

/// Names of Oakestra's core components (the `<plane>_<name>` containers of
/// its compose files). A service with one of these names replaces that
/// component where it runs, so it needs [`PrivilegeKind::CoreComponent`].
/// Nodes also know the core components they actually run and refuse a
/// replacement that was not granted, whatever its name.
pub const OAKESTRA_CORE_COMPONENTS: &[&str] = &[
    "scheduler",
    "resource_abstractor",
    "service_manager",
    "system_manager",
    "cloud_scheduler",
    "cluster_manager",
    "mongo",
    "mongo_net",
    "redis",
    "grafana",
    "prometheus",
    "loki",
    "promtail",
];

/// What a privilege lets an addon do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PrivilegeKind {
    /// Privileged mode: every capability and device, no seccomp.
    Privileged,
    /// Mount a path of the node.
    HostPath,
    /// Publish a port on the node.
    HostPort,
    /// Replace a core component.
    CoreComponent,
    /// Start with a replaced core component's environment.
    CoreEnvironment,
    /// Keep a replaced core component stopped when the replacement fails.
    KeepCoreStopped,
}

impl PrivilegeKind {
    /// Every kind.
    pub const ALL: [PrivilegeKind; 6] = [
        Self::Privileged,
        Self::HostPath,
        Self::HostPort,
        Self::CoreComponent,
        Self::CoreEnvironment,
        Self::KeepCoreStopped,
    ];

    /// The kind's name in grants and tables (`host-path`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::HostPath => "host-path",
            Self::HostPort => "host-port",
            Self::CoreComponent => "core-component",
            Self::CoreEnvironment => "core-environment",
            Self::KeepCoreStopped => "keep-core-stopped",
        }
    }
}

impl std::str::FromStr for PrivilegeKind {
    type Err = String;

    /// `host-path`, `host_path`, `HOST_PATH` or `PRIVILEGE_KIND_HOST_PATH`.
    fn from_str(text: &str) -> Result<Self, String> {
        let normal = text
            .trim()
            .to_ascii_lowercase()
            .replace('_', "-")
            .trim_start_matches("privilege-kind-")
            .to_owned();
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == normal)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("`{text}` is not a privilege kind ({})", names.join(", "))
            })
    }
}

/// One thing a service asks for, or one an operator grants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Privilege {
    /// The kind; `None` only for an unset kind read from a request, which
    /// validation refuses.
    pub kind: Option<PrivilegeKind>,
    /// The service; in a grant, empty means every service.
    pub service_name: String,
    /// Path, `PORT/PROTOCOL` or core component name; empty for privileged.
    pub value: String,
    /// For a host path: whether the mount is read-only.
    pub read_only: bool,
    /// In an installation's grants: given by the manager's policy
    /// (`consent`), not accepted by the caller. Never read from a request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_policy: bool,
}

impl Privilege {
    /// A privilege `kind` of `service` for `value`.
    pub fn new(kind: PrivilegeKind, service: &str, value: impl Into<String>) -> Self {
        Self {
            kind: Some(kind),
            service_name: service.to_owned(),
            value: value.into(),
            read_only: false,
            by_policy: false,
        }
    }

    /// Reads a grant as the CLI takes it: `KIND=VALUE` (`host-path=/var/log`,
    /// `host-port=8080/tcp`, `core-component=scheduler`), `KIND` alone for
    /// `privileged`, and `host-path=PATH:ro` for a read-only path only. A
    /// grant is for every service of the addon.
    pub fn parse_grant(text: &str) -> Result<Self, String> {
        let (kind, value) = text.split_once('=').unwrap_or((text, ""));
        let kind: PrivilegeKind = kind.parse()?;
        let (value, read_only) = match (kind, value.strip_suffix(":ro")) {
            (PrivilegeKind::HostPath, Some(path)) => (path, true),
            _ => (value, false),
        };
        let mut grant = Self::new(kind, "", value);
        grant.read_only = read_only;
        if kind == PrivilegeKind::HostPort && !grant.value.contains('/') {
            grant.value.push_str("/tcp");
        }
        if kind != PrivilegeKind::Privileged && grant.value.is_empty() {
            return Err(format!("`{text}`: {} needs a value", kind.as_str()));
        }
        Ok(grant)
    }

    /// Whether this grant covers the need `needed`: same kind and value,
    /// for the same service or every service, and a read-write host path
    /// covers a read-only one (never the other way round).
    pub fn covers(&self, needed: &Privilege) -> bool {
        self.kind.is_some()
            && self.kind == needed.kind
            && self.value == needed.value
            && (self.service_name.is_empty() || self.service_name == needed.service_name)
            && (!self.read_only || needed.read_only)
    }

    /// `KIND=VALUE`, the form [`Privilege::parse_grant`] reads.
    pub fn grant_text(&self) -> String {
        let kind = self.kind.map_or("unspecified", PrivilegeKind::as_str);
        match self.kind {
            Some(PrivilegeKind::Privileged) => kind.to_owned(),
            Some(PrivilegeKind::HostPath) if self.read_only => format!("{kind}={}:ro", self.value),
            _ => format!("{kind}={}", self.value),
        }
    }
}

impl std::fmt::Display for Privilege {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.grant_text())?;
        if !self.service_name.is_empty() {
            write!(f, " (service {})", self.service_name)?;
        }
        Ok(())
    }
}

/// A host path as privileges and policies compare it: without trailing
/// slashes (`/` stays `/`).
pub fn normal_path(path: &str) -> String {
    // Repeated slashes name the same path: `/srv//x` is `/srv/x`.
    let mut normal = String::with_capacity(path.len());
    for (i, part) in path.split('/').enumerate() {
        if i == 0 || !part.is_empty() {
            if i > 0 {
                normal.push('/');
            }
            normal.push_str(part);
        }
    }
    if normal.is_empty() {
        "/".to_owned()
    } else {
        normal
    }
}

/// Whether a service named `name` replaces one of Oakestra's core
/// components where it runs.
pub fn is_core_name(name: &str) -> bool {
    OAKESTRA_CORE_COMPONENTS.contains(&name)
}

/// What `service` needs; `replaces_core` says whether it replaces a core
/// component of its name (from the well-known names, or on a node, from
/// the core components the node runs).
pub fn service_needs(service: &Service, replaces_core: bool) -> Vec<Privilege> {
    let name = service.service_name.as_str();
    let mut needs = Vec::new();
    if service.privileged {
        needs.push(Privilege::new(PrivilegeKind::Privileged, name, ""));
    }
    for mount in &service.mounts {
        if let MountSource::HostPath(path) = &mount.source {
            let mut need = Privilege::new(PrivilegeKind::HostPath, name, normal_path(path));
            need.read_only = mount.read_only;
            needs.push(need);
        }
    }
    for port in &service.ports {
        needs.push(Privilege::new(
            PrivilegeKind::HostPort,
            name,
            format!("{}/{}", port.host_port, port.protocol),
        ));
    }
    if replaces_core || service.inherit_core_environment {
        needs.push(Privilege::new(PrivilegeKind::CoreComponent, name, name));
    }
    if service.inherit_core_environment {
        needs.push(Privilege::new(PrivilegeKind::CoreEnvironment, name, name));
    }
    needs.sort();
    needs.dedup();
    needs
}

/// Every privilege the descriptor asks for, service by service: what the
/// marketplace shows as `required_privileges`.
pub fn required(addon: &Descriptor) -> Vec<Privilege> {
    addon
        .services
        .iter()
        .flat_map(|s| service_needs(s, is_core_name(&s.service_name)))
        .collect()
}

/// What an install needs: [`required`], plus keeping each replaced core
/// component stopped on failure when the install asks for that.
pub fn for_install(addon: &Descriptor, keep_core_stopped: bool) -> Vec<Privilege> {
    let mut needs = required(addon);
    if keep_core_stopped {
        let keep: Vec<Privilege> = needs
            .iter()
            .filter(|p| p.kind == Some(PrivilegeKind::CoreComponent))
            .map(|p| Privilege::new(PrivilegeKind::KeepCoreStopped, &p.service_name, &p.value))
            .collect();
        needs.extend(keep);
    }
    needs
}

/// The needs that no grant covers.
pub fn missing(needs: &[Privilege], granted: &[Privilege]) -> Vec<Privilege> {
    needs
        .iter()
        .filter(|need| !granted.iter().any(|grant| grant.covers(need)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mount, Port};

    fn service(name: &str) -> Service {
        Service {
            service_name: name.into(),
            image: "r/i:1".into(),
            ..Service::default()
        }
    }

    #[test]
    fn derives_every_privilege_a_descriptor_asks_for() {
        let mut host = service("host");
        host.privileged = true;
        host.mounts = vec![
            Mount::parse("/:/host").unwrap(),
            Mount::parse("/var/log/:/logs:ro").unwrap(),
            Mount::parse("data:/data").unwrap(),
        ];
        host.ports = vec![Port {
            container_port: 80,
            host_port: 8080,
            protocol: "tcp".into(),
        }];
        let mut scheduler = service("scheduler");
        scheduler.inherit_core_environment = true;
        let addon = Descriptor {
            name: "a".into(),
            services: vec![host, scheduler, service("plain")],
            ..Descriptor::default()
        };
        let texts: Vec<String> = required(&addon).iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "privileged (service host)",
                "host-path=/ (service host)",
                "host-path=/var/log:ro (service host)",
                "host-port=8080/tcp (service host)",
                "core-component=scheduler (service scheduler)",
                "core-environment=scheduler (service scheduler)",
            ]
        );
        let install = for_install(&addon, true);
        assert!(install.contains(&Privilege::new(
            PrivilegeKind::KeepCoreStopped,
            "scheduler",
            "scheduler"
        )));
    }

    #[test]
    fn grants_cover_what_they_name_and_no_more() {
        let mut read_only = Privilege::new(PrivilegeKind::HostPath, "s", "/var/log");
        read_only.read_only = true;
        let read_write = Privilege::new(PrivilegeKind::HostPath, "s", "/var/log");
        let any_rw = Privilege::parse_grant("host-path=/var/log").unwrap();
        let any_ro = Privilege::parse_grant("host_path=/var/log:ro").unwrap();
        assert!(any_rw.covers(&read_only) && any_rw.covers(&read_write));
        assert!(any_ro.covers(&read_only) && !any_ro.covers(&read_write));
        assert!(
            !Privilege::parse_grant("host-path=/var")
                .unwrap()
                .covers(&read_only)
        );
        let other_service = Privilege::new(PrivilegeKind::HostPath, "t", "/var/log");
        assert!(!other_service.covers(&read_write));
        let port = Privilege::parse_grant("HOST_PORT=8080").unwrap();
        assert_eq!(port.value, "8080/tcp");
        assert!(Privilege::parse_grant("PRIVILEGE_KIND_PRIVILEGED").is_ok());
        assert!(Privilege::parse_grant("root=yes").is_err());
        assert!(Privilege::parse_grant("host-path").is_err());
        assert_eq!(
            missing(&[read_only.clone(), read_write.clone()], &[any_ro]),
            [read_write]
        );
    }

    #[test]
    fn grant_text_round_trips() {
        for text in [
            "privileged",
            "host-path=/srv",
            "host-path=/srv:ro",
            "host-port=53/udp",
            "core-component=scheduler",
            "core-environment=scheduler",
            "keep-core-stopped=scheduler",
        ] {
            assert_eq!(Privilege::parse_grant(text).unwrap().grant_text(), text);
        }
    }
}
