//! Validation of published descriptors.

use std::collections::{HashMap, HashSet};

use crate::{
    Descriptor, FieldViolation, MountSource, Service,
    names::{NAME_RULE, dns_alias, is_name},
};

/// Bounds that keep any request from making the server allocate without
/// limit; the contract documents each of them.
pub const MAX_SERVICES: usize = 32;
const MAX_DESCRIPTION: usize = 4096;
/// Longest version string.
const MAX_VERSION: usize = 64;
/// Most entries of any list or map of a descriptor (arguments, environment,
/// labels, ports, mounts, networks, volumes, driver options).
pub const MAX_ENTRIES: usize = 128;
/// Longest command argument, environment or label value, or path.
pub const MAX_ARGUMENT: usize = 4096;
const MAX_VALUE: usize = MAX_ARGUMENT;
const MAX_LABEL_KEY: usize = 256;
/// Largest encoded `Addon` message a publish accepts.
pub const MAX_ENCODED_ADDON: usize = 1024 * 1024;
/// Network every service joins when it names none.
pub const DEFAULT_NETWORK: &str = "oakestra";

#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldViolation::new(field, reason));
    }

    fn into_result(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

fn check_name(v: &mut Violations, field: &str, name: &str) {
    if name.is_empty() {
        v.add(field, "required");
    } else if !is_name(name) {
        v.add(field, format!("must be a name: {NAME_RULE}"));
    }
}

/// Length of a record identifier: a ULID.
const RECORD_ID_LEN: usize = 26;

/// Checks a record identifier as the stores hand them out
/// (`addons_store::new_id`): a ULID in lowercase Crockford base32. The
/// monitor takes installation and addon ids only in this form, so an id can
/// never name a path, a label or a container outside its own.
pub fn validate_record_id(id: &str) -> Result<(), String> {
    let crockford = |b: u8| {
        b.is_ascii_digit() || (b.is_ascii_lowercase() && !matches!(b, b'i' | b'l' | b'o' | b'u'))
    };
    if id.len() == RECORD_ID_LEN && id.bytes().all(crockford) && id.as_bytes()[0] <= b'7' {
        Ok(())
    } else {
        Err(format!(
            "not an identifier: {RECORD_ID_LEN} characters of lowercase Crockford base32 (a ULID), got {}",
            quoted(id)
        ))
    }
}

/// `text` quoted for a message, control characters escaped and at most 64
/// characters shown: what a stranger wrote never reaches a terminal raw.
pub fn quoted(text: &str) -> String {
    let shown: String = text.chars().take(64).collect();
    let more = if shown.len() < text.len() { "…" } else { "" };
    format!("{:?}{more}", shown)
}

/// Whether `text` holds a control character (C0, DEL or C1): none may be in
/// a descriptor, so nothing a publisher wrote can move a terminal's cursor
/// or hide a line of a consent prompt.
pub fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

fn is_env_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks a published descriptor; returns every violation with its field
/// path, so a developer sees all of them at once. Image references are only
/// checked for length and whitespace; see [`validate_with`].
pub fn validate(addon: &Descriptor) -> Result<(), Vec<FieldViolation>> {
    validate_with(addon, &|_| Ok(()))
}

/// Like [`validate`], with `image_check` judging each image reference's
/// grammar (the marketplace passes its registry client's parser).
pub fn validate_with(
    addon: &Descriptor,
    image_check: &dyn Fn(&str) -> Result<(), String>,
) -> Result<(), Vec<FieldViolation>> {
    let mut v = Violations::default();
    check_controls(&mut v, addon);
    check_name(&mut v, "name", &addon.name);
    if addon.version.len() > MAX_VERSION {
        v.add("version", format!("at most {MAX_VERSION} bytes"));
    } else if let Err(err) = semver::Version::parse(&addon.version) {
        v.add(
            "version",
            format!("not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.2.0): {err}"),
        );
    }
    if addon.description.len() > MAX_DESCRIPTION {
        v.add("description", format!("at most {MAX_DESCRIPTION} bytes"));
    }
    if addon.services.is_empty() {
        v.add("services", "at least one service is required");
    }
    if addon.services.len() > MAX_SERVICES {
        v.add("services", format!("at most {MAX_SERVICES} services"));
    }
    for (field, len) in [
        ("volumes", addon.volumes.len()),
        ("networks", addon.networks.len()),
    ] {
        if len > MAX_ENTRIES {
            v.add(field, format!("at most {MAX_ENTRIES} entries"));
        }
    }
    let volumes: HashSet<&str> = addon.volumes.iter().map(|vol| vol.name.as_str()).collect();
    let networks: HashSet<&str> = addon.networks.iter().map(|n| n.name.as_str()).collect();
    for (i, volume) in addon.volumes.iter().enumerate().take(MAX_ENTRIES) {
        check_name(&mut v, &format!("volumes[{i}].name"), &volume.name);
        for (field, map) in [
            ("driver_opts", &volume.driver_opts),
            ("labels", &volume.labels),
        ] {
            if map.len() > MAX_ENTRIES {
                v.add(
                    format!("volumes[{i}].{field}"),
                    format!("at most {MAX_ENTRIES} entries"),
                );
            }
            check_entries(&mut v, &format!("volumes[{i}].{field}"), map);
        }
    }
    for (i, network) in addon.networks.iter().enumerate() {
        check_name(&mut v, &format!("networks[{i}].name"), &network.name);
    }
    let mut names = HashSet::new();
    let mut aliases = HashMap::new();
    let mut host_ports = HashSet::new();
    for (i, service) in addon.services.iter().take(MAX_SERVICES).enumerate() {
        let at = format!("services[{i}]");
        check_name(&mut v, &format!("{at}.service_name"), &service.service_name);
        if !service.service_name.is_empty() && !names.insert(service.service_name.as_str()) {
            v.add(
                format!("{at}.service_name"),
                "used by another service of the addon",
            );
        } else if is_name(&service.service_name)
            && let Some(other) = aliases.insert(dns_alias(&service.service_name), i)
        {
            v.add(
                format!("{at}.service_name"),
                format!(
                    "has the DNS name `{}` of services[{other}]: names that differ only in case, '_' or '.' cannot share an addon",
                    dns_alias(&service.service_name)
                ),
            );
        }
        check_service(&mut v, &at, service, &volumes, &networks, &mut host_ports);
        if let Some(check) = &service.health_check {
            check_health(&mut v, &format!("{at}.health_check"), check);
        }
        if !service.image.is_empty()
            && let Err(reason) = image_check(&service.image)
        {
            v.add(
                format!("{at}.image"),
                format!("not an image reference: {reason}"),
            );
        }
    }
    v.into_result()
}

/// Refuses control characters in every string of the descriptor; command
/// arguments and environment values (scripts, multi-line settings) may hold
/// tabs and line feeds, and nothing else below U+0020.
fn check_controls(v: &mut Violations, addon: &Descriptor) {
    let mut strict = |field: String, text: &str| {
        if has_control(text) {
            v.0.push(FieldViolation::new(
                field,
                "must not hold control characters",
            ));
        }
    };
    strict("name".into(), &addon.name);
    strict("version".into(), &addon.version);
    strict("description".into(), &addon.description);
    for (i, volume) in addon.volumes.iter().enumerate().take(MAX_ENTRIES) {
        strict(format!("volumes[{i}].name"), &volume.name);
        strict(format!("volumes[{i}].driver"), &volume.driver);
        for (field, map) in [
            ("driver_opts", &volume.driver_opts),
            ("labels", &volume.labels),
        ] {
            for (key, value) in map.iter().take(MAX_ENTRIES) {
                strict(format!("volumes[{i}].{field}"), key);
                strict(format!("volumes[{i}].{field}[{}]", quoted(key)), value);
            }
        }
    }
    for (i, network) in addon.networks.iter().enumerate().take(MAX_ENTRIES) {
        strict(format!("networks[{i}].name"), &network.name);
    }
    let data = |text: &str| {
        text.chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
    };
    let mut loose = Vec::new();
    for (i, service) in addon.services.iter().enumerate().take(MAX_SERVICES) {
        let at = format!("services[{i}]");
        strict(format!("{at}.service_name"), &service.service_name);
        strict(format!("{at}.image"), &service.image);
        if let Some(resolved) = &service.resolved_image {
            strict(format!("{at}.resolved_image"), resolved);
        }
        for (j, network) in service.networks.iter().enumerate().take(MAX_ENTRIES) {
            strict(format!("{at}.networks[{j}]"), network);
        }
        for (j, mount) in service.mounts.iter().enumerate().take(MAX_ENTRIES) {
            let (MountSource::Volume(source) | MountSource::HostPath(source)) = &mount.source;
            strict(format!("{at}.mounts[{j}].source"), source);
            strict(format!("{at}.mounts[{j}].target"), &mount.target);
        }
        for (key, value) in service.labels.iter().take(MAX_ENTRIES) {
            strict(format!("{at}.labels"), key);
            strict(format!("{at}.labels[{}]", quoted(key)), value);
        }
        for (key, value) in service.environment.iter().take(MAX_ENTRIES) {
            if data(value) {
                loose.push(format!("{at}.environment[{}]", quoted(key)));
            }
        }
        for (j, argument) in service.command.iter().enumerate().take(MAX_ENTRIES) {
            if data(argument) {
                loose.push(format!("{at}.command[{j}]"));
            }
        }
        match service.health_check.as_ref().map(|check| &check.probe) {
            Some(crate::Probe::Http { path, .. }) => {
                strict(format!("{at}.health_check.http.path"), path);
            }
            Some(crate::Probe::Exec { command }) => {
                for (j, argument) in command.iter().enumerate().take(64) {
                    if data(argument) {
                        loose.push(format!("{at}.health_check.exec.command[{j}]"));
                    }
                }
            }
            _ => {}
        }
    }
    for field in loose {
        v.add(
            field,
            "must not hold control characters other than tab and line feed",
        );
    }
}

/// A health check's bounds.
fn check_health(v: &mut Violations, at: &str, check: &crate::HealthCheck) {
    const SECOND: u64 = 1000;
    const HOUR: u64 = 3600 * SECOND;
    match &check.probe {
        crate::Probe::Http { port, path } => {
            if *port == 0 {
                v.add(format!("{at}.http.port"), "must be 1..65535");
            }
            if !path.starts_with('/') || path.len() > 1024 || path.chars().any(char::is_whitespace)
            {
                v.add(
                    format!("{at}.http.path"),
                    "must start with `/`, have no whitespace and be at most 1024 bytes",
                );
            }
        }
        crate::Probe::Tcp { port } => {
            if *port == 0 {
                v.add(
                    format!("{at}.tcp.port"),
                    "must be 1..65535 (a health check needs an http, tcp or exec probe)",
                );
            }
        }
        crate::Probe::Exec { command } => {
            if command.is_empty()
                || command.len() > 64
                || command.iter().any(|a| a.len() > MAX_ARGUMENT)
            {
                v.add(
                    format!("{at}.exec.command"),
                    format!("1 to 64 arguments of at most {MAX_ARGUMENT} bytes"),
                );
            }
        }
    }
    if !(SECOND..=HOUR).contains(&check.interval_ms) {
        v.add(format!("{at}.interval"), "must be 1s to 1h");
    }
    if check.timeout_ms < 100 || check.timeout_ms > check.interval_ms {
        v.add(format!("{at}.timeout"), "must be 100ms to the interval");
    }
    if check.retries == 0 || check.retries > 100 {
        v.add(format!("{at}.retries"), "must be 1 to 100");
    }
    if check.start_period_ms > HOUR {
        v.add(format!("{at}.start_period"), "at most 1h");
    }
}

/// Keys of 1 to 256 bytes and values of at most 4096 (labels, driver
/// options).
fn check_entries(v: &mut Violations, at: &str, map: &std::collections::BTreeMap<String, String>) {
    for (key, value) in map {
        if key.is_empty() || key.len() > MAX_LABEL_KEY || value.len() > MAX_VALUE {
            v.add(
                format!("{at}[{key}]"),
                format!("keys must be 1..={MAX_LABEL_KEY} bytes and values at most {MAX_VALUE}"),
            );
        }
    }
}

/// An absolute path without `..`, of at most 4096 bytes.
fn check_path(v: &mut Violations, field: &str, path: &str) {
    if !path.starts_with('/')
        || path.len() > MAX_ARGUMENT
        || path.split('/').any(|p| p == ".." || p == ".")
    {
        v.add(
            field,
            format!("must be an absolute path without '..' or '.', at most {MAX_ARGUMENT} bytes"),
        );
    }
}

fn check_service<'a>(
    v: &mut Violations,
    at: &str,
    service: &'a Service,
    volumes: &HashSet<&str>,
    networks: &HashSet<&str>,
    host_ports: &mut HashSet<(u16, &'a str)>,
) {
    if service.image.is_empty() {
        v.add(format!("{at}.image"), "required");
    } else if service.image.len() > 512 || service.image.contains(char::is_whitespace) {
        v.add(
            format!("{at}.image"),
            "not an image reference: too long or has whitespace",
        );
    }
    if let Some(signature) = &service.image_signature {
        if signature.payload.len() > 8 << 10 {
            v.add(format!("{at}.image_signature.payload"), "at most 8 KiB");
        }
        if signature.signature.len() > 1024 {
            v.add(
                format!("{at}.image_signature.signature"),
                "at most 1024 bytes",
            );
        }
        if signature.key_fingerprint.len() > 128 {
            v.add(
                format!("{at}.image_signature.key_fingerprint"),
                "at most 128 bytes",
            );
        }
    }
    if service.resources.memory_bytes.is_some_and(|m| m < 4 << 20) {
        v.add(
            format!("{at}.resources.memory_bytes"),
            "at least 4 MiB (4194304) when set",
        );
    }
    if service.resources.cpu_millis.is_some_and(|c| c > 1_000_000) {
        v.add(
            format!("{at}.resources.cpu_millis"),
            "at most 1000000 (a thousand CPUs)",
        );
    }
    if service.resources.pids.is_some_and(|p| p > 4_194_304) {
        v.add(format!("{at}.resources.pids"), "at most 4194304");
    }
    for (field, len) in [
        ("command", service.command.len()),
        ("environment", service.environment.len()),
        ("labels", service.labels.len()),
        ("ports", service.ports.len()),
        ("mounts", service.mounts.len()),
        ("networks", service.networks.len()),
    ] {
        if len > MAX_ENTRIES {
            v.add(
                format!("{at}.{field}"),
                format!("at most {MAX_ENTRIES} entries"),
            );
        }
    }
    for (j, argument) in service.command.iter().enumerate().take(MAX_ENTRIES) {
        if argument.len() > MAX_ARGUMENT {
            v.add(
                format!("{at}.command[{j}]"),
                format!("at most {MAX_ARGUMENT} bytes"),
            );
        }
    }
    for (key, value) in &service.environment {
        if !is_env_name(key) {
            v.add(
                format!("{at}.environment[{key}]"),
                "not a variable name: letters, digits and '_', not starting with a digit",
            );
        }
        if value.len() > MAX_VALUE {
            v.add(
                format!("{at}.environment[{key}]"),
                format!("value over {MAX_VALUE} bytes"),
            );
        }
    }
    check_entries(v, &format!("{at}.labels"), &service.labels);
    for (j, port) in service.ports.iter().enumerate() {
        let field = format!("{at}.ports[{j}]");
        if port.container_port == 0 {
            v.add(format!("{field}.container_port"), "must be 1..65535");
        }
        if port.host_port == 0 {
            v.add(format!("{field}.host_port"), "must be 1..65535");
        } else if !host_ports.insert((port.host_port, port.protocol.as_str())) {
            v.add(format!("{field}.host_port"), "used twice within the addon");
        }
        if port.protocol != "tcp" && port.protocol != "udp" {
            v.add(format!("{field}.protocol"), "must be tcp or udp");
        }
    }
    for (j, mount) in service.mounts.iter().enumerate() {
        let field = format!("{at}.mounts[{j}]");
        check_path(v, &format!("{field}.target"), &mount.target);
        match &mount.source {
            MountSource::HostPath(path) => check_path(v, &format!("{field}.host_path"), path),
            MountSource::Volume(name) if name.is_empty() => {
                v.add(field, "one of `volume` or `host_path` is required");
            }
            MountSource::Volume(name) => {
                if !volumes.contains(name.as_str()) {
                    v.add(
                        format!("{field}.volume"),
                        format!("volume `{name}` is not declared in the addon's volumes"),
                    );
                }
            }
        }
    }
    for (j, network) in service.networks.iter().enumerate() {
        if network != DEFAULT_NETWORK && !networks.contains(network.as_str()) {
            v.add(
                format!("{at}.networks[{j}]"),
                format!("network `{network}` is not declared in the addon's networks"),
            );
        }
    }
}

#[cfg(test)]
mod tests;
