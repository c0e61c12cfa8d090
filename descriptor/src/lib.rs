//! The addon descriptor: what an addon developer publishes and what an
//! installation runs. The marketplace stores it with its review state, the
//! manager snapshots it at install time, and clients build it from Oakestra's
//! JSON format. Field names follow Oakestra's marketplace schema.

mod convert;
pub mod labels;
pub mod names;
pub mod oakestra;
pub mod policy;
pub mod privileges;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::names::{dns_alias, is_name};
pub use crate::privileges::{Privilege, PrivilegeKind};
pub use crate::validate::{
    DEFAULT_NETWORK, MAX_ARGUMENT, MAX_ENCODED_ADDON, MAX_ENTRIES, MAX_SERVICES, has_control,
    quoted, validate, validate_record_id, validate_with,
};

/// A field that breaks a rule, by its path in the request
/// (`services[1].ports[0].host_port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request message.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The fields every list request shares, checked: `statuses` (enum numbers,
/// each turned into a status by `status`) and `page_size` (not negative).
pub fn list_request<S>(
    statuses: &[i32],
    page_size: i32,
    status: impl Fn(i32) -> Option<S>,
) -> Result<(Vec<S>, usize), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let mut known = Vec::new();
    for (i, value) in statuses.iter().enumerate() {
        match status(*value) {
            Some(status) => known.push(status),
            None => violations.push(FieldViolation::new(
                format!("statuses[{i}]"),
                "not a status (UNSPECIFIED is not accepted; leave the list empty for the default)",
            )),
        }
    }
    let page_size = usize::try_from(page_size).unwrap_or_else(|_| {
        violations.push(FieldViolation::new("page_size", "must not be negative"));
        0
    });
    if violations.is_empty() {
        Ok((known, page_size))
    } else {
        Err(violations)
    }
}

impl std::fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// The version of a descriptor that names none (every Oakestra descriptor).
pub const DEFAULT_VERSION: &str = "1.0.0";

fn default_version() -> String {
    DEFAULT_VERSION.to_owned()
}

/// An addon as its developer describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    /// The addon's name ([`names::is_name`]); with `version`, unique in
    /// the marketplace.
    pub name: String,
    /// A semantic version (`1.2.0`, `2.0.0-rc.1`); [`DEFAULT_VERSION`] when
    /// the publisher names none.
    #[serde(default = "default_version")]
    pub version: String,
    /// Free text.
    pub description: String,
    /// The services, at least one.
    pub services: Vec<Service>,
    /// Named volumes the services may mount.
    pub volumes: Vec<Volume>,
    /// Networks besides the default `oakestra`.
    pub networks: Vec<Network>,
}

impl Default for Descriptor {
    fn default() -> Self {
        Self {
            name: String::new(),
            version: default_version(),
            description: String::new(),
            services: Vec::new(),
            volumes: Vec::new(),
            networks: Vec::new(),
        }
    }
}

impl Descriptor {
    /// The version as a semantic version, when it is one (validation
    /// refuses a descriptor whose version is not).
    pub fn semver(&self) -> Option<semver::Version> {
        semver::Version::parse(&self.version).ok()
    }
}

/// One service of an addon: a container to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Name, unique within the addon; naming a core component replaces it.
    pub service_name: String,
    /// Image reference as published.
    pub image: String,
    /// Command and arguments; empty means the image's.
    pub command: Vec<String>,
    /// Environment variables.
    pub environment: BTreeMap<String, String>,
    /// Ports published on the node.
    pub ports: Vec<Port>,
    /// What is mounted into the container.
    pub mounts: Vec<Mount>,
    /// Networks joined; empty means `oakestra`.
    pub networks: Vec<String>,
    /// Container labels.
    pub labels: BTreeMap<String, String>,
    /// The image pinned by digest, once verification approved it.
    pub resolved_image: Option<String>,
    /// Whether the container asks for privileged mode.
    pub privileged: bool,
    /// Whether a replacing service inherits the core component's environment.
    pub inherit_core_environment: bool,
    /// Limits of the container; unset ones take the node policy's defaults.
    pub resources: Resources,
    /// How the node checks that the service works, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// The signature of `resolved_image` the marketplace verified, if its
    /// trust policy checked one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_signature: Option<ImageSignature>,
}

/// A cosign signature of an image: the simple-signing payload as signed,
/// and the signature over it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSignature {
    /// The payload, JSON naming the digest and repository.
    pub payload: String,
    /// Base64 of the signature over `payload`.
    pub signature: String,
    /// `sha256:<hex>` of the DER public key that made it.
    pub key_fingerprint: String,
}

/// A service's health check, as compose files declare one: a probe run
/// every `interval`; the service is unhealthy after `retries` failures in a
/// row, failures within `start_period` of a start not counting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What is checked.
    pub probe: Probe,
    /// Between two probes, in milliseconds.
    pub interval_ms: u64,
    /// Longest a probe may take, in milliseconds.
    pub timeout_ms: u64,
    /// Failures in a row that make the service unhealthy.
    pub retries: u32,
    /// After a start, failures do not count for this long, in milliseconds.
    pub start_period_ms: u64,
}

/// Default time between probes.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 10_000;
/// Default probe timeout.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 5_000;
/// Default failures in a row before unhealthy.
pub const DEFAULT_HEALTH_RETRIES: u32 = 3;

/// What a health check probes, inside the container's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `GET path` on `port`: a 2xx or 3xx answer is healthy.
    Http {
        /// The container port.
        port: u16,
        /// The path, starting with `/`.
        path: String,
    },
    /// A TCP connection to `port` is accepted.
    Tcp {
        /// The container port.
        port: u16,
    },
    /// `command` run in the container exits 0.
    Exec {
        /// The command and its arguments.
        command: Vec<String>,
    },
}

/// Limits of a container; `None` is "not set".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU.
    pub cpu_millis: Option<u32>,
    /// Largest number of processes and threads.
    pub pids: Option<u32>,
}

/// A port published on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// Port in the container.
    pub container_port: u16,
    /// Port on the node.
    pub host_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// A mount of a named volume or a host path into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// What is mounted.
    pub source: MountSource,
    /// Absolute path in the container.
    pub target: String,
    /// Whether the container may only read it.
    pub read_only: bool,
}

/// What a [`Mount`] mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountSource {
    /// A named volume declared in the addon.
    Volume(String),
    /// An absolute path on the node.
    HostPath(String),
}

impl Mount {
    /// Reads the `src:dst[:ro|:rw]` form of Oakestra's descriptors and the
    /// CLI: `src` is a host path when it starts with `/`, else a volume name.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (src, dst, read_only) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            [_, _, _] => return Err("mode must be ro or rw".to_owned()),
            _ => return Err("must be src:dst, src:dst:ro or src:dst:rw".to_owned()),
        };
        if src.is_empty() || dst.is_empty() {
            return Err("must be src:dst, src:dst:ro or src:dst:rw".to_owned());
        }
        let source = if src.starts_with('/') {
            MountSource::HostPath(src.to_owned())
        } else {
            MountSource::Volume(src.to_owned())
        };
        Ok(Self {
            source,
            target: dst.to_owned(),
            read_only,
        })
    }
}

impl std::fmt::Display for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (MountSource::Volume(src) | MountSource::HostPath(src)) = &self.source;
        write!(f, "{src}:{}", self.target)?;
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

/// A named volume shared by the services of an addon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// Name services refer to.
    pub name: String,
    /// Driver, `local` by default.
    pub driver: String,
    /// Driver options.
    pub driver_opts: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A network the services of an addon may join.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Network {
    /// Name services refer to.
    pub name: String,
    /// Driver, `bridge` by default.
    pub driver: String,
    /// Whether it has IPv6 addresses too.
    pub enable_ipv6: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_list_requests_with_field_paths() {
        let status = |n: i32| (1..=3).contains(&n).then_some(n);
        assert_eq!(list_request(&[1, 3], 20, status), Ok((vec![1, 3], 20)));
        assert_eq!(list_request(&[], 0, status), Ok((vec![], 0)));
        assert_eq!(
            list_request(&[2, 9], -1, status),
            Err(vec![
                FieldViolation::new(
                    "statuses[1]",
                    "not a status (UNSPECIFIED is not accepted; leave the list empty for the default)"
                ),
                FieldViolation::new("page_size", "must not be negative"),
            ])
        );
    }
}
