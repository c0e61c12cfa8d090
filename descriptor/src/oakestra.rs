//! Oakestra's marketplace descriptor format (the body of Oakestra's
//! `POST /api/v1/marketplace/addons`), read from JSON or YAML and turned
//! into the protobuf descriptor, so existing descriptors publish unchanged;
//! and written back from ours, for Oakestra's REST routes.
//!
//! Services have `service_name`, `image`, `command` as one string (split as
//! a shell would), `ports` as a `{"container": "host"}` map (`"53/udp"`
//! keys for UDP), `environment`, `volumes` as `"src:dst"` strings,
//! `networks` and `labels`; the top-level `volumes` and `networks` are
//! lists of objects or maps by name. Fields of ours are accepted on a
//! service as well: `privileged`, `inherit_core_environment` and
//! `resources` (`memory_bytes`, `cpu_millis`, `pids`). Unknown fields are an
//! error naming the field, as in Oakestra.

use std::collections::BTreeMap;

use oakestra_addons_proto::marketplace::v1 as pb;
use serde::Deserialize;

use crate::FieldViolation;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Descriptor {
    name: String,
    /// Not in Oakestra's schema: ours, optional (`1.0.0` when absent).
    #[serde(default)]
    version: String,
    #[serde(default)]
    description: String,
    services: Vec<Service>,
    #[serde(default)]
    volumes: Named<Volume>,
    #[serde(default)]
    networks: Named<Network>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    service_name: String,
    image: String,
    #[serde(default)]
    command: Option<Command>,
    #[serde(default)]
    networks: Vec<String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<String, Scalar>,
    #[serde(default)]
    environment: BTreeMap<String, Scalar>,
    #[serde(default)]
    labels: BTreeMap<String, Scalar>,
    #[serde(default)]
    privileged: bool,
    #[serde(default)]
    inherit_core_environment: bool,
    #[serde(default)]
    resources: Option<Resources>,
    #[serde(default)]
    health_check: Option<HealthCheck>,
}

/// `health_check`: ours, like compose's `healthcheck` but with an HTTP or
/// TCP probe; durations as `500ms`, `10s`, `5m` or a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheck {
    #[serde(default)]
    http: Option<HttpProbe>,
    #[serde(default)]
    tcp: Option<TcpProbe>,
    #[serde(default)]
    exec: Option<Command>,
    #[serde(default)]
    interval: Option<Scalar>,
    #[serde(default)]
    timeout: Option<Scalar>,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    start_period: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpProbe {
    port: u32,
    #[serde(default = "root_path")]
    path: String,
}

fn root_path() -> String {
    "/".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpProbe {
    port: u32,
}

/// A health check in the marketplace's form; the error names the field.
fn health_check(i: usize, check: HealthCheck) -> Result<pb::HealthCheck, FieldViolation> {
    let at = format!("services[{i}].health_check");
    let duration = |field: &str, value: Option<Scalar>| {
        value
            .map(|v| {
                parse_duration(&v.text())
                    .map_err(|err| FieldViolation::new(format!("{at}.{field}"), err))
                    .map(|d| prost_types::Duration::try_from(d).unwrap_or_default())
            })
            .transpose()
    };
    let probe = match (check.http, check.tcp, check.exec) {
        (Some(http), None, None) => pb::health_check::Probe::Http(pb::HttpProbe {
            port: http.port,
            path: http.path,
        }),
        (None, Some(tcp), None) => pb::health_check::Probe::Tcp(pb::TcpProbe { port: tcp.port }),
        (None, None, Some(exec)) => pb::health_check::Probe::Exec(pb::ExecProbe {
            command: match exec {
                Command::Args(args) => args,
                Command::Line(line) => shlex::split(&line).ok_or_else(|| {
                    FieldViolation::new(
                        format!("{at}.exec"),
                        format!("unbalanced quotes in `{line}`"),
                    )
                })?,
            },
        }),
        _ => {
            return Err(FieldViolation::new(
                at,
                "exactly one of `http`, `tcp` and `exec`",
            ));
        }
    };
    Ok(pb::HealthCheck {
        probe: Some(probe),
        interval: duration("interval", check.interval)?,
        timeout: duration("timeout", check.timeout)?,
        retries: check.retries,
        start_period: duration("start_period", check.start_period)?,
    })
}

/// `resources`: limits of the service's container.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    #[serde(default)]
    memory_bytes: u64,
    #[serde(default)]
    cpu_millis: u32,
    #[serde(default)]
    pids: u32,
}

/// `command`: Oakestra's one string, or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Command {
    Line(String),
    Args(Vec<String>),
}

/// A string, number or boolean, as JSON and YAML files write values.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Integer(n) => n.to_string(),
            Self::Float(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

/// Top-level volumes and networks: a list of objects with a `name`, or a
/// map from name to object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Named<T> {
    List(Vec<T>),
    Map(BTreeMap<String, Option<T>>),
}

impl<T> Default for Named<T> {
    fn default() -> Self {
        Self::List(Vec::new())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Volume {
    #[serde(default)]
    name: String,
    #[serde(default)]
    driver: String,
    #[serde(default)]
    driver_opts: BTreeMap<String, Scalar>,
    #[serde(default)]
    labels: BTreeMap<String, Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Network {
    #[serde(default)]
    name: String,
    #[serde(default)]
    driver: String,
    #[serde(default)]
    enable_ipv6: bool,
}

fn strings(map: BTreeMap<String, Scalar>) -> BTreeMap<String, String> {
    map.into_iter().map(|(k, v)| (k, v.text())).collect()
}

/// Reads an Oakestra descriptor from JSON or YAML text (`name` is used in
/// errors, such as the file's path).
pub fn parse_descriptor(text: &str, name: &str) -> Result<pb::Addon, String> {
    let result = if text.trim_start().starts_with('{') {
        from_deserializer(&mut serde_json::Deserializer::from_str(text))
    } else {
        from_deserializer(serde_yaml_ng::Deserializer::from_str(text))
    };
    result.map_err(|violation| match violation.field.as_str() {
        "" => format!("{name}: {}", violation.reason),
        field => format!("{name}: {field}: {}", violation.reason),
    })
}

/// Reads an Oakestra descriptor from JSON, such as the body of Oakestra's
/// `POST /api/v1/marketplace/addons`; what is wrong names the field (empty
/// when the body as a whole is).
pub fn from_json(body: &[u8]) -> Result<pb::Addon, FieldViolation> {
    from_deserializer(&mut serde_json::Deserializer::from_slice(body))
}

fn from_deserializer<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<pb::Addon, FieldViolation> {
    let descriptor: Descriptor = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { String::new() } else { path };
        FieldViolation::new(field, err.into_inner().to_string())
    })?;
    into_proto(descriptor)
}

/// Reads a duration such as `500ms`, `10s`, `5m`, `1h` or a number of
/// seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let invalid = || format!("`{text}` is not a duration such as 500ms, 10s, 5m or 1h");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let seconds = |factor: u64| number.checked_mul(factor).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" | "" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        _ => None,
    }
    .ok_or_else(invalid)
}

/// An addon's services, volumes and networks in Oakestra's JSON shape:
/// what its REST routes answer with, beside the fields of the record.
pub fn descriptor_json(
    descriptor: &crate::Descriptor,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    out.insert("name".into(), descriptor.name.clone().into());
    out.insert("version".into(), descriptor.version.clone().into());
    out.insert("description".into(), descriptor.description.clone().into());
    out.insert(
        "services".into(),
        descriptor.services.iter().map(service_json).collect(),
    );
    out.insert(
        "volumes".into(),
        descriptor
            .volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name,
                    "driver": v.driver,
                    "driver_opts": v.driver_opts,
                    "labels": v.labels,
                })
            })
            .collect(),
    );
    out.insert(
        "networks".into(),
        descriptor
            .networks
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "driver": n.driver,
                    "enable_ipv6": n.enable_ipv6,
                })
            })
            .collect(),
    );
    out
}

/// A service in Oakestra's JSON shape: `command` as one string, `ports` as
/// a `{"container[/udp]": "host"}` map, `volumes` as `src:dst[:ro]`; our
/// own fields only where they are set.
pub fn service_json(service: &crate::Service) -> serde_json::Value {
    let ports: serde_json::Map<String, serde_json::Value> = service
        .ports
        .iter()
        .map(|p| {
            let key = if p.protocol == "udp" {
                format!("{}/udp", p.container_port)
            } else {
                p.container_port.to_string()
            };
            (key, p.host_port.to_string().into())
        })
        .collect();
    let command = shlex::try_join(service.command.iter().map(String::as_str))
        .unwrap_or_else(|_| service.command.join(" "));
    let mut out = serde_json::json!({
        "service_name": service.service_name,
        "image": service.image,
        "command": command,
        "networks": service.networks,
        "volumes": service.mounts.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": ports,
        "environment": service.environment,
        "labels": service.labels,
    });
    if service.privileged {
        out["privileged"] = true.into();
    }
    if service.inherit_core_environment {
        out["inherit_core_environment"] = true.into();
    }
    if let Some(resolved) = &service.resolved_image {
        out["resolved_image"] = resolved.clone().into();
    }
    out
}

/// Oakestra's `src:dst[:ro]` volume strings as mounts.
fn mounts(service: usize, volumes: &[String]) -> Result<Vec<pb::Mount>, FieldViolation> {
    volumes
        .iter()
        .enumerate()
        .map(|(j, text)| {
            let mount = crate::Mount::parse(text).map_err(|reason| {
                FieldViolation::new(
                    format!("services[{service}].volumes[{j}]"),
                    format!("`{text}`: {reason}"),
                )
            })?;
            Ok(pb::Mount {
                source: Some(match mount.source {
                    crate::MountSource::HostPath(path) => pb::mount::Source::HostPath(path),
                    crate::MountSource::Volume(name) => pb::mount::Source::Volume(name),
                }),
                target: mount.target,
                read_only: mount.read_only,
            })
        })
        .collect()
}

fn into_proto(descriptor: Descriptor) -> Result<pb::Addon, FieldViolation> {
    let mut services = Vec::new();
    for (i, service) in descriptor.services.into_iter().enumerate() {
        let command = match service.command {
            None => Vec::new(),
            Some(Command::Args(args)) => args,
            Some(Command::Line(line)) => shlex::split(&line).ok_or_else(|| {
                FieldViolation::new(
                    format!("services[{i}].command"),
                    format!("unbalanced quotes in `{line}`"),
                )
            })?,
        };
        let mut ports = Vec::new();
        for (container, host) in service.ports {
            let (port, protocol) = match container.split_once('/') {
                Some((port, protocol)) => (port, protocol.to_owned()),
                None => (container.as_str(), "tcp".to_owned()),
            };
            let protocol = match protocol.to_ascii_lowercase().as_str() {
                "tcp" => pb::Protocol::Tcp,
                "udp" => pb::Protocol::Udp,
                other => {
                    return Err(FieldViolation::new(
                        format!("services[{i}].ports"),
                        format!("`{container}` has protocol `{other}`; tcp or udp"),
                    ));
                }
            }
            .into();
            let container_port = port.trim().parse::<u32>().map_err(|_| {
                FieldViolation::new(
                    format!("services[{i}].ports"),
                    format!("`{container}` is not a container port"),
                )
            })?;
            let host = host.text();
            let host_port = host.trim().parse::<u32>().map_err(|_| {
                FieldViolation::new(
                    format!("services[{i}].ports.{container}"),
                    format!("`{host}` is not a host port"),
                )
            })?;
            ports.push(pb::PortMapping {
                container_port,
                host_port,
                protocol,
            });
        }
        services.push(pb::ServiceSpec {
            service_name: service.service_name,
            image: service.image,
            command,
            environment: strings(service.environment),
            ports,
            mounts: mounts(i, &service.volumes)?,
            networks: service.networks,
            labels: strings(service.labels),
            privileged: service.privileged,
            inherit_core_environment: service.inherit_core_environment,
            resources: service.resources.map(|r| pb::Resources {
                memory_bytes: r.memory_bytes,
                cpu_millis: r.cpu_millis,
                pids: r.pids,
            }),
            health_check: service
                .health_check
                .map(|check| health_check(i, check))
                .transpose()?,
            ..Default::default()
        });
    }
    let volumes = match descriptor.volumes {
        Named::List(list) => list,
        Named::Map(map) => map
            .into_iter()
            .map(|(name, v)| Volume {
                name,
                ..v.unwrap_or_default()
            })
            .collect(),
    }
    .into_iter()
    .map(|v| pb::VolumeSpec {
        name: v.name,
        driver: v.driver,
        driver_opts: strings(v.driver_opts),
        labels: strings(v.labels),
    })
    .collect();
    let networks = match descriptor.networks {
        Named::List(list) => list,
        Named::Map(map) => map
            .into_iter()
            .map(|(name, n)| Network {
                name,
                ..n.unwrap_or_default()
            })
            .collect(),
    }
    .into_iter()
    .map(|n| pb::NetworkSpec {
        name: n.name,
        driver: n.driver,
        enable_ipv6: n.enable_ipv6,
    })
    .collect();
    Ok(pb::Addon {
        name: descriptor.name,
        version: descriptor.version,
        description: descriptor.description,
        services,
        volumes,
        networks,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
