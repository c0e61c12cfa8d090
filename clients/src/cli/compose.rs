//! `oak-addons core from-compose`: Oakestra's compose services as a
//! monitor's `--core-components` file, so the monitor runs the core
//! components itself and a plugin can replace them.
//!
//! Oakestra runs its orchestrators under `docker compose`, each component a
//! service whose `container_name` is `<plane>_<name>`. What a core
//! component entry holds (image, command, environment, published ports,
//! networks) is carried over; everything else is named in the notes, so an
//! operator knows what the monitor will not do for the component.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_yaml_ng::{Mapping, Value};

/// What the conversion made: the file's text and what it left behind.
#[derive(Debug, Default)]
pub struct Conversion {
    /// The `--core-components` file, YAML.
    pub yaml: String,
    /// Names of the core components in it.
    pub names: Vec<String>,
    /// What was not carried over, one line each.
    pub notes: Vec<String>,
}

/// How to convert.
#[derive(Debug, Default)]
pub struct Options<'a> {
    /// `root` or `cluster`: services named `<plane>_<name>` are taken.
    pub plane: &'a str,
    /// Only these services (by compose key, container name or core name);
    /// empty: every service of the plane.
    pub only: &'a [String],
    /// Image references by compose key or core name, for services built
    /// locally (`build:`).
    pub images: BTreeMap<String, String>,
    /// Mark every entry replaceable by a plugin.
    pub replaceable: bool,
}

/// One entry of a `--core-components` file (the monitor's format).
#[derive(Debug, Serialize)]
struct Entry {
    name: String,
    image: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    command: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    environment: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<Port>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    networks: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replaceable: bool,
}

#[derive(Debug, Serialize)]
struct Port {
    container_port: u16,
    host_port: u16,
    protocol: String,
}

/// Keys of a compose service that are carried over, or mean nothing to a
/// core component the monitor runs (`expose`: a container's ports are
/// reachable on its networks anyway).
const CARRIED: &[&str] = &[
    "image",
    "container_name",
    "command",
    "environment",
    "ports",
    "networks",
    "expose",
    "hostname",
    "labels",
    "logging",
    "restart",
];

/// Converts the compose file `text`; `env` answers `${VAR}` as compose
/// does from its environment.
pub fn convert(
    text: &str,
    options: &Options<'_>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Conversion, String> {
    let document: Value =
        serde_yaml_ng::from_str(text).map_err(|err| format!("not a compose file: {err}"))?;
    let services = document
        .get("services")
        .and_then(Value::as_mapping)
        .ok_or("not a compose file: no `services` map")?;
    let networks = document.get("networks").and_then(Value::as_mapping);
    let prefix = format!("{}_", options.plane);
    let mut out = Conversion::default();
    let mut entries = Vec::new();
    let mut found: Vec<&String> = Vec::new();
    for (key, service) in services {
        let key = key.as_str().unwrap_or_default();
        let service = service.as_mapping().cloned().unwrap_or_default();
        let container = text_of(&service, "container_name").unwrap_or_else(|| key.to_owned());
        let name = container.strip_prefix(&prefix).map(str::to_owned);
        let wanted = if options.only.is_empty() {
            true
        } else {
            let hit = options.only.iter().find(|o| {
                [key, container.as_str()].contains(&o.as_str()) || name.as_ref() == Some(o)
            });
            if let Some(hit) = hit {
                found.push(hit);
            }
            hit.is_some()
        };
        if !wanted {
            continue;
        }
        let Some(name) = name.filter(|n| addons_descriptor::is_name(n)) else {
            let note = format!(
                "{key}: left out: its container `{container}` is not named {prefix}<name>, which is how the monitor and plugins find core components"
            );
            if options.only.is_empty() {
                out.notes.push(note);
                continue;
            }
            return Err(note);
        };
        let at = |what: &str| format!("{key}: {what}");
        let expand = |text: &str, notes: &mut Vec<String>| {
            interpolate(text, env).unwrap_or_else(|unset| {
                for var in unset {
                    notes.push(at(&format!("${{{var}}} is not set; taken as empty")));
                }
                interpolate(text, &|var| Some(env(var).unwrap_or_default())).unwrap_or_default()
            })
        };
        let image = match options
            .images
            .get(key)
            .or_else(|| options.images.get(&name))
        {
            Some(image) => image.clone(),
            None => {
                if service.contains_key("build") {
                    return Err(at(
                        "is built locally (`build:`): push its image to a registry the node pulls from and pass --image KEY=REFERENCE",
                    ));
                }
                match text_of(&service, "image") {
                    Some(image) => expand(&image, &mut out.notes),
                    None => return Err(at("has no `image`")),
                }
            }
        };
        let command = match service.get("command") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(line)) => {
                let line = expand(line, &mut out.notes);
                shlex::split(&line).ok_or_else(|| at("`command` is not a command line"))?
            }
            Some(Value::Sequence(args)) => args
                .iter()
                .map(|arg| scalar(arg).map(|a| expand(&a, &mut out.notes)))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| at("`command` holds something other than strings"))?,
            Some(_) => return Err(at("`command` is neither a string nor a list")),
        };
        let mut environment = BTreeMap::new();
        match service.get("environment") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(list)) => {
                for item in list {
                    let item =
                        scalar(item).ok_or_else(|| at("`environment` holds a non-string"))?;
                    match item.split_once('=') {
                        Some((k, v)) => {
                            environment.insert(k.to_owned(), expand(v, &mut out.notes));
                        }
                        None => {
                            environment.insert(item.clone(), env(&item).unwrap_or_default());
                        }
                    }
                }
            }
            Some(Value::Mapping(map)) => {
                for (k, v) in map {
                    let k = scalar(k).ok_or_else(|| at("`environment` has a non-string key"))?;
                    let v = match v {
                        Value::Null => env(&k).unwrap_or_default(),
                        v => expand(
                            &scalar(v).ok_or_else(|| at("`environment` holds a non-string"))?,
                            &mut out.notes,
                        ),
                    };
                    environment.insert(k, v);
                }
            }
            Some(_) => return Err(at("`environment` is neither a list nor a map")),
        }
        let mut ports = Vec::new();
        if let Some(list) = service.get("ports").and_then(Value::as_sequence) {
            for port in list {
                match parse_port(port, &|t: &str| expand(t, &mut Vec::new())) {
                    Ok(Some(port)) => ports.push(port),
                    Ok(None) => out.notes.push(at(&format!(
                        "port {} publishes no fixed host port; left out",
                        shown(port)
                    ))),
                    Err(reason) => return Err(at(&reason)),
                }
            }
        }
        let networks = service_networks(&service, networks);
        for key_name in service.keys().filter_map(Value::as_str) {
            if !CARRIED.contains(&key_name) {
                out.notes.push(at(&format!(
                    "`{key_name}` is not carried over{}",
                    match key_name {
                        "volumes" => ": core components get no mounts; the monitor runs them with their image's file system",
                        "depends_on" => ": the monitor starts core components in the file's order, without waiting",
                        "healthcheck" => ": the monitor restarts a core component when it exits",
                        "network_mode" => ": core components join bridge networks",
                        _ => "",
                    }
                )));
            }
        }
        if let Some(hostname) = text_of(&service, "hostname")
            && hostname != container
        {
            out.notes.push(at(&format!(
                "hostname `{hostname}` is not kept: its hostname is `{}`",
                addons_descriptor::dns_alias(&name)
            )));
        }
        out.names.push(name.clone());
        entries.push(Entry {
            name,
            image,
            command,
            environment,
            ports,
            networks,
            replaceable: options.replaceable,
        });
    }
    if let Some(missing) = options.only.iter().find(|o| !found.contains(o)) {
        return Err(format!("no service `{missing}` in the compose file"));
    }
    if entries.is_empty() {
        return Err(format!(
            "no service of the compose file is named {prefix}<name>"
        ));
    }
    out.yaml = serde_yaml_ng::to_string(&entries).map_err(|err| err.to_string())?;
    Ok(out)
}

fn text_of(map: &Mapping, key: &str) -> Option<String> {
    map.get(key).and_then(scalar)
}

/// A string, number or boolean as text.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn shown(value: &Value) -> String {
    scalar(value).unwrap_or_else(|| {
        serde_yaml_ng::to_string(value)
            .unwrap_or_default()
            .trim()
            .replace('\n', " ")
    })
}

/// A port as compose writes it: `HOST:CONTAINER[/PROTO]`, with an address
/// in front, or the long form. `None`: no fixed host port.
fn parse_port(value: &Value, interpolate: &dyn Fn(&str) -> String) -> Result<Option<Port>, String> {
    let number = |text: &str| -> Result<u16, String> {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port `{text}` is not a port (ranges are not carried over)"))
    };
    let protocol = |p: &str| match p {
        "tcp" | "udp" => Ok(p.to_owned()),
        other => Err(format!("protocol `{other}` is not tcp or udp")),
    };
    if let Value::Mapping(long) = value {
        let target = text_of(long, "target").ok_or("a long-form port needs `target`")?;
        let Some(published) = text_of(long, "published") else {
            return Ok(None);
        };
        return Ok(Some(Port {
            container_port: number(&interpolate(&target))?,
            host_port: number(&interpolate(&published))?,
            protocol: protocol(&text_of(long, "protocol").unwrap_or_else(|| "tcp".into()))?,
        }));
    }
    let text = interpolate(&scalar(value).ok_or("a port is neither text nor a map")?);
    let (text, proto) = match text.split_once('/') {
        Some((text, proto)) => (text.to_owned(), protocol(proto)?),
        None => (text, "tcp".to_owned()),
    };
    let parts: Vec<&str> = text.rsplitn(3, ':').collect();
    match parts.as_slice() {
        [_container] => Ok(None),
        [container, "", ..] => {
            number(container)?;
            Ok(None)
        }
        [container, host, ..] => Ok(Some(Port {
            container_port: number(container)?,
            host_port: number(host)?,
            protocol: proto,
        })),
        [] => Err("an empty port".into()),
    }
}

/// The networks a service joins, by the names the monitor knows them:
/// compose's `default` is the file's default network (Oakestra names it
/// `oakestra`).
fn service_networks(service: &Mapping, top: Option<&Mapping>) -> Vec<String> {
    let real_name = |key: &str| {
        top.and_then(|t| t.get(key))
            .and_then(Value::as_mapping)
            .and_then(|n| text_of(n, "name"))
            .unwrap_or_else(|| {
                if key == "default" {
                    addons_descriptor::DEFAULT_NETWORK.to_owned()
                } else {
                    key.to_owned()
                }
            })
    };
    let keys: Vec<String> = match service.get("networks") {
        Some(Value::Sequence(list)) => list.iter().filter_map(scalar).collect(),
        Some(Value::Mapping(map)) => map.keys().filter_map(scalar).collect(),
        _ => vec!["default".to_owned()],
    };
    let mut names: Vec<String> = keys.iter().map(|k| real_name(k)).collect();
    names.dedup();
    names
}

/// Compose's interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`; the names of unset variables without a default.
fn interpolate(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Vec<String>> {
    let mut out = String::new();
    let mut unset = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(braced) = rest.strip_prefix('{') {
            let Some(end) = braced.find('}') else {
                out.push_str("${");
                rest = braced;
                continue;
            };
            let inner = &braced[..end];
            rest = &braced[end + 1..];
            let (var, default, empty_too) = if let Some((v, d)) = inner.split_once(":-") {
                (v, Some(d), true)
            } else if let Some((v, d)) = inner.split_once('-') {
                (v, Some(d), false)
            } else {
                (inner, None, false)
            };
            match (env(var), default) {
                (Some(value), Some(d)) if empty_too && value.is_empty() => out.push_str(d),
                (Some(value), _) => out.push_str(&value),
                (None, Some(d)) => out.push_str(d),
                (None, None) => unset.push(var.to_owned()),
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                out.push('$');
                continue;
            }
            match env(&rest[..end]) {
                Some(value) => out.push_str(&value),
                None => unset.push(rest[..end].to_owned()),
            }
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    if unset.is_empty() {
        Ok(out)
    } else {
        Err(unset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Oakestra's cluster orchestrator compose file.
    const CLUSTER: &str = r#"
services:
  mqtt:
    image: eclipse-mosquitto:2.0
    container_name: mqtt
    ports: ["10003:10003"]
  cluster_service_manager:
    image: ghcr.io/oakestra/oakestra-net/cluster-service-manager:latest
    container_name: cluster_service_manager
    hostname: cluster_service_manager
    expose: ["10110"]
    ports:
      - "10110:10110"
    environment:
      - MY_PORT=10110
      - ROOT_SERVICE_MANAGER_URL=${SYSTEM_MANAGER_URL}
      - CLUSTER_NAME=${CLUSTER_NAME:-cluster1}
    depends_on: [mqtt]
  cluster_scheduler:
    image: cluster_scheduler
    build: ../scheduler/
    container_name: cluster_scheduler
    ports: ["10105:10105"]
    environment:
      - API_PORT=10105
    command: sh -c 'exec scheduler --port "$$API_PORT"'
  prometheus:
    image: prom/prometheus
    container_name: prometheus
    ports: [10009:9090]
networks:
  default:
    name: oakestra
"#;

    #[test]
    fn converts_oakestra_cluster_services() {
        let images = BTreeMap::from([(
            "cluster_scheduler".to_owned(),
            "registry.example/cluster_scheduler:1".to_owned(),
        )]);
        let options = Options {
            plane: "cluster",
            images,
            replaceable: true,
            ..Options::default()
        };
        let env = |var: &str| (var == "SYSTEM_MANAGER_URL").then(|| "10.0.0.1".to_owned());
        let out = convert(CLUSTER, &options, &env).unwrap();
        assert_eq!(out.names, ["service_manager", "scheduler"]);
        let entries: Value = serde_yaml_ng::from_str(&out.yaml).unwrap();
        let manager = &entries[0];
        assert_eq!(manager["name"], "service_manager");
        assert_eq!(
            manager["environment"]["ROOT_SERVICE_MANAGER_URL"],
            "10.0.0.1"
        );
        assert_eq!(manager["environment"]["CLUSTER_NAME"], "cluster1");
        assert_eq!(manager["ports"][0]["host_port"], 10110);
        assert_eq!(manager["networks"][0], "oakestra");
        assert_eq!(manager["replaceable"], true);
        let scheduler = &entries[1];
        assert_eq!(scheduler["image"], "registry.example/cluster_scheduler:1");
        assert_eq!(
            scheduler["command"],
            serde_yaml_ng::to_value(["sh", "-c", "exec scheduler --port \"$API_PORT\""]).unwrap()
        );
        let notes = out.notes.join("\n");
        assert!(notes.contains("mqtt: left out"), "{notes}");
        assert!(
            notes.contains("`depends_on` is not carried over"),
            "{notes}"
        );
        assert!(!notes.contains("expose"), "{notes}");
    }

    #[test]
    fn names_what_it_cannot_do() {
        let options = Options {
            plane: "cluster",
            ..Options::default()
        };
        let none = |_: &str| None;
        let err = convert(CLUSTER, &options, &none).unwrap_err();
        assert!(err.contains("cluster_scheduler: is built locally"), "{err}");
        let only = ["service_manager".to_owned()];
        let options = Options {
            plane: "cluster",
            only: &only,
            ..Options::default()
        };
        let out = convert(CLUSTER, &options, &none).unwrap();
        assert_eq!(out.names, ["service_manager"]);
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("${SYSTEM_MANAGER_URL} is not set"))
        );
        let only = ["mqtt".to_owned()];
        let options = Options {
            plane: "cluster",
            only: &only,
            ..Options::default()
        };
        assert!(
            convert(CLUSTER, &options, &none)
                .unwrap_err()
                .contains("not named cluster_<name>")
        );
        let only = ["nothing".to_owned()];
        let options = Options {
            plane: "cluster",
            only: &only,
            ..Options::default()
        };
        assert!(
            convert(CLUSTER, &options, &none)
                .unwrap_err()
                .contains("no service `nothing`")
        );
        assert!(convert("services: [", &options, &none).is_err());
    }

    #[test]
    fn reads_every_port_form() {
        let parse = |v: Value| parse_port(&v, &|t: &str| t.to_owned());
        let port = |h: u16, c: u16, p: &str| (h, c, p.to_owned());
        let got = |v: Value| {
            parse(v)
                .unwrap()
                .map(|p| (p.host_port, p.container_port, p.protocol))
        };
        assert_eq!(got("10110:10110".into()), Some(port(10110, 10110, "tcp")));
        assert_eq!(
            got("127.0.0.1:80:8080/udp".into()),
            Some(port(80, 8080, "udp"))
        );
        assert_eq!(got("8080".into()), None);
        assert_eq!(
            got(serde_yaml_ng::from_str("{target: 80, published: 8080}").unwrap()),
            Some(port(8080, 80, "tcp"))
        );
        assert!(parse("1000-1010:1000-1010".into()).is_err());
        assert!(parse("80:80/sctp".into()).is_err());
    }

    #[test]
    fn interpolates_as_compose_does() {
        let env = |v: &str| match v {
            "A" => Some("a".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(interpolate("$A-${A}-$$A", &env).unwrap(), "a-a-$A");
        assert_eq!(
            interpolate("${EMPTY:-d}|${EMPTY-d}|${NO-d}", &env).unwrap(),
            "d||d"
        );
        assert_eq!(interpolate("${NO}$NO2", &env).unwrap_err(), ["NO", "NO2"]);
    }
}
