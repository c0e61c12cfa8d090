//! How the CLI prints: aligned tables and relative times for people,
//! canonical proto3 JSON or YAML (proto field names) for programs, colours
//! only on a terminal and never with `NO_COLOR`.

use std::io::IsTerminal as _;

use oak_addons::{
    ClientError, json,
    proto::{engine::v1 as epb, marketplace::v1 as mpb},
};

/// The `--output` format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned tables and plain text.
    Table,
    /// JSON, one document (a list for listings).
    Json,
    /// YAML, one document.
    Yaml,
    /// Only the ids, one per line (for scripts).
    Id,
}

const ADDON: &str = "oakestra.addons.marketplace.v1.Addon";
const INSTALLATION: &str = "oakestra.addons.engine.v1.Installation";
const RELEASE: &str = "oakestra.addons.engine.v1.Release";

/// Colours when stdout is a terminal and `NO_COLOR` is not set.
pub fn colours() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn paint(text: &str, code: &str) -> String {
    if colours() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// The colour codes [`paint`] writes: the only control sequences the CLI
/// lets through to a terminal.
const OWN_CODES: &[&str] = &["0", "1", "31", "32", "33"];

/// `text` safe to print on a terminal: every control character (escape
/// sequences, carriage returns, line feeds, backspaces) is shown escaped
/// (`\u{1b}`), except the colour codes this CLI writes itself. Whatever a
/// publisher, an addon or a server wrote cannot move the cursor, hide a
/// line or fake one, e.g. over the privileges a consent prompt lists.
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '\x1b'
            && let Some(code) = rest
                .strip_prefix("\x1b[")
                .and_then(|after| after.split_once('m'))
                .map(|(code, _)| code)
                .filter(|code| OWN_CODES.contains(code))
        {
            let sequence = 3 + code.len();
            out.push_str(&rest[..sequence]);
            rest = &rest[sequence..];
            continue;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A status word, green when good, yellow while moving, red when bad.
pub fn status_word(word: &str) -> String {
    let code = match word {
        "APPROVED" | "ACTIVE" | "RUNNING" | "SERVING" => "32",
        "FAILED" | "FAILED_VERIFICATION" | "UNKNOWN" => "31",
        "PARTIALLY_ACTIVE" | "BACKOFF" | "UNDER_REVIEW" | "INSTALLING" | "DISABLING"
        | "PULLING" | "STARTING" | "STOPPING" | "PENDING" => "33",
        _ => "0",
    };
    paint(word, code)
}

/// Prints rows as a table with aligned columns (colour codes do not count
/// towards widths).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let visible = |text: &str| {
        let mut len = 0;
        let mut escape = false;
        for c in text.chars() {
            match (escape, c) {
                (false, '\x1b') => escape = true,
                (true, 'm') => escape = false,
                (true, _) => {}
                _ => len += 1,
            }
        }
        len
    };
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(visible(&shown(cell)));
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut text = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths[i].saturating_sub(visible(cell)) + 2;
                text.push_str(&" ".repeat(pad));
            }
        }
        println!("{}", text.trim_end());
    };
    line(header.iter().map(|h| paint(h, "1")).collect());
    for row in rows {
        line(row.iter().map(|cell| shown(cell)).collect());
    }
}

/// How long ago `time` was, such as `5s ago`, `3m ago`, `2h ago`, `4d ago`.
pub fn ago(time: Option<&prost_types::Timestamp>) -> String {
    let Some(time) = time else {
        return "-".to_owned();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let secs = now - time.seconds;
    if secs < 0 {
        return format!("in {}", span(-secs));
    }
    format!("{} ago", span(secs))
}

fn span(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `ADDON_STATUS_APPROVED` → `APPROVED`.
pub fn addon_status(addon: &mpb::Addon) -> String {
    addon
        .status()
        .as_str_name()
        .trim_start_matches("ADDON_STATUS_")
        .to_owned()
}

/// `INSTALLATION_STATUS_ACTIVE` → `ACTIVE`.
pub fn installation_status(installation: &epb::Installation) -> String {
    installation
        .status()
        .as_str_name()
        .trim_start_matches("INSTALLATION_STATUS_")
        .to_owned()
}

/// `SERVICE_PHASE_RUNNING` → `RUNNING`.
pub fn phase(service: &epb::ServiceStatus) -> String {
    service
        .phase()
        .as_str_name()
        .trim_start_matches("SERVICE_PHASE_")
        .to_owned()
}

fn emit(value: serde_json::Value, format: Format) -> Result<(), ClientError> {
    match format {
        Format::Json => {
            let text = serde_json::to_string_pretty(&value)
                .map_err(|err| ClientError::Input(err.to_string()))?;
            println!("{text}");
        }
        Format::Yaml | Format::Table | Format::Id => {
            let text = serde_yaml_ng::to_string(&value)
                .map_err(|err| ClientError::Input(err.to_string()))?;
            print!("{text}");
        }
    }
    Ok(())
}

/// Prints addons: a table, or JSON/YAML (a list when `many`).
pub fn addons(list: &[mpb::Addon], format: Format, many: bool) -> Result<(), ClientError> {
    if format == Format::Id {
        list.iter().for_each(|a| println!("{}", a.id));
        return Ok(());
    }
    if format != Format::Table {
        let values = list
            .iter()
            .map(|a| json::to_json(a, ADDON))
            .collect::<Result<Vec<_>, _>>()?;
        return emit(single_or_list(values, many), format);
    }
    if !many && let Some(addon) = list.first() {
        addon_details(addon);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.name.clone(),
                a.version.clone(),
                status_word(&addon_status(a)),
                a.services.len().to_string(),
                ago(a.update_time.as_ref()),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "VERSION", "STATUS", "SERVICES", "UPDATED"],
        &rows,
    );
    Ok(())
}

fn single_or_list(mut values: Vec<serde_json::Value>, many: bool) -> serde_json::Value {
    if many || values.len() != 1 {
        serde_json::Value::Array(values)
    } else {
        values.remove(0)
    }
}

fn addon_details(addon: &mpb::Addon) {
    println!("ID:          {}", addon.id);
    println!("Name:        {}", shown(&addon.name));
    println!("Version:     {}", shown(&addon.version));
    if !addon.description.is_empty() {
        println!("Description: {}", shown(&addon.description));
    }
    println!("Status:      {}", status_word(&addon_status(addon)));
    println!("Created:     {}", ago(addon.create_time.as_ref()));
    println!("Updated:     {}", ago(addon.update_time.as_ref()));
    if let Some(v) = &addon.verification {
        if !v.reason.is_empty() {
            println!("Reason:      {}", shown(&v.reason));
        }
        if !v.last_error.is_empty() {
            println!(
                "Last error:  {} (attempt {}, next {})",
                shown(&v.last_error),
                v.attempts,
                ago(v.next_attempt_time.as_ref())
            );
        }
    }
    println!();
    let rows: Vec<Vec<String>> = addon
        .services
        .iter()
        .map(|s| {
            let check = addon
                .verification
                .as_ref()
                .and_then(|v| v.services.iter().find(|c| c.service_name == s.service_name));
            vec![
                s.service_name.clone(),
                if s.resolved_image.is_empty() {
                    s.image.clone()
                } else {
                    s.resolved_image.clone()
                },
                s.ports
                    .iter()
                    .map(|p| format!("{}:{}/{}", p.host_port, p.container_port, p.protocol))
                    .collect::<Vec<_>>()
                    .join(","),
                match check {
                    Some(c) if c.ok => "ok".to_owned(),
                    Some(c) => c.reason.clone(),
                    None => "-".to_owned(),
                },
            ]
        })
        .collect();
    table(&["SERVICE", "IMAGE", "PORTS", "VERIFICATION"], &rows);
    println!();
    if addon.required_privileges.is_empty() {
        println!("Privileges:  none");
    } else {
        println!("Privileges an install must grant:");
        privileges_table(&addon.required_privileges, |p| {
            addons_descriptor::Privilege::from(p.clone())
        });
    }
}

/// A table of privileges: the grant text (`KIND=VALUE`) and the service.
fn privileges_table<P>(list: &[P], convert: impl Fn(&P) -> addons_descriptor::Privilege) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let privilege = convert(p);
            vec![
                if privilege.by_policy {
                    format!("{} (by policy)", privilege.grant_text())
                } else {
                    privilege.grant_text()
                },
                if privilege.service_name.is_empty() {
                    "(any)".to_owned()
                } else {
                    privilege.service_name
                },
            ]
        })
        .collect();
    table(&["PRIVILEGE", "SERVICE"], &rows);
}

/// Prints installations: a table, or JSON/YAML (a list when `many`).
pub fn installations(
    list: &[epb::Installation],
    format: Format,
    many: bool,
) -> Result<(), ClientError> {
    if format == Format::Id {
        list.iter().for_each(|i| println!("{}", i.id));
        return Ok(());
    }
    if format != Format::Table {
        let values = list
            .iter()
            .map(|i| json::to_json(i, INSTALLATION))
            .collect::<Result<Vec<_>, _>>()?;
        return emit(single_or_list(values, many), format);
    }
    if !many && let Some(installation) = list.first() {
        installation_details(installation);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let running = i
                .services
                .iter()
                .filter(|s| s.phase() == epb::ServicePhase::Running)
                .count();
            vec![
                i.id.clone(),
                i.addon
                    .as_ref()
                    .map(|a| format!("{} {}", a.name, a.version))
                    .unwrap_or_default(),
                status_word(&installation_status(i)),
                format!(
                    "{running}/{}",
                    i.addon.as_ref().map_or(0, |a| a.services.len())
                ),
                ago(i.update_time.as_ref()),
                i.status_message.clone(),
            ]
        })
        .collect();
    table(
        &["ID", "ADDON", "STATUS", "RUNNING", "UPDATED", "MESSAGE"],
        &rows,
    );
    Ok(())
}

/// An installation's releases, oldest first.
pub fn history(i: &epb::Installation, format: Format) -> Result<(), ClientError> {
    match format {
        Format::Id => {
            i.history.iter().for_each(|r| println!("{}", r.number));
            Ok(())
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = i
                .history
                .iter()
                .map(|r| {
                    let mut outcome = r
                        .outcome()
                        .as_str_name()
                        .trim_start_matches("RELEASE_OUTCOME_")
                        .to_lowercase();
                    if r.number == i.release {
                        outcome.push_str(" (current)");
                    }
                    let mut note = r.reason.clone();
                    if r.rollback_of != 0 {
                        note = format!("rollback to {}; {note}", r.rollback_of);
                    }
                    vec![
                        r.number.to_string(),
                        r.version.clone(),
                        status_word(&outcome),
                        ago(r.create_time.as_ref()),
                        if r.requested_by.is_empty() {
                            "-".to_owned()
                        } else {
                            r.requested_by.clone()
                        },
                        r.images.join(" "),
                        note.trim_end_matches("; ").to_owned(),
                    ]
                })
                .collect();
            table(
                &[
                    "RELEASE", "VERSION", "OUTCOME", "WHEN", "BY", "IMAGES", "NOTE",
                ],
                &rows,
            );
            Ok(())
        }
        _ => {
            let values = i
                .history
                .iter()
                .map(|r| json::to_json(r, RELEASE))
                .collect::<Result<Vec<_>, _>>()?;
            emit(serde_json::Value::Array(values), format)
        }
    }
}

fn installation_details(i: &epb::Installation) {
    println!("ID:          {}", i.id);
    if let Some(addon) = &i.addon {
        println!(
            "Addon:       {} {} ({})",
            shown(&addon.name),
            shown(&addon.version),
            i.marketplace_id
        );
        println!("Release:     {}", i.release);
    }
    println!("Status:      {}", status_word(&installation_status(i)));
    println!("Message:     {}", shown(&i.status_message));
    println!("Installed:   {}", ago(i.create_time.as_ref()));
    println!("Updated:     {}", ago(i.update_time.as_ref()));
    println!();
    let rows: Vec<Vec<String>> = i
        .services
        .iter()
        .map(|s| {
            let mut reason = s.reason.clone();
            if !s.replaced_core_component.is_empty() {
                reason = format!("replaces {}; {reason}", s.replaced_core_component);
            }
            vec![
                s.service_name.clone(),
                s.node_id.clone(),
                status_word(&phase(s)),
                s.restart_count.to_string(),
                s.exit_code.map_or("-".to_owned(), |c| c.to_string()),
                reason,
            ]
        })
        .collect();
    table(
        &["SERVICE", "NODE", "PHASE", "RESTARTS", "EXIT", "REASON"],
        &rows,
    );
    if !i.granted_privileges.is_empty() {
        println!("\nGranted privileges:");
        privileges_table(&i.granted_privileges, |p| addons_descriptor::Privilege {
            by_policy: p.granted_by_policy,
            ..p.clone().into()
        });
    }
    for s in i.services.iter().filter(|s| !s.logs_tail.is_empty()) {
        println!(
            "\nLast lines of {} on {}:",
            shown(&s.service_name),
            shown(&s.node_id)
        );
        for line in &s.logs_tail {
            println!("  {}", shown(line));
        }
    }
}

/// Prints what a node's monitor runs.
pub fn node(
    node: &oak_addons::proto::monitor::v1::ListManagedServicesResponse,
    format: Format,
) -> Result<(), ClientError> {
    match format {
        Format::Json | Format::Yaml => {
            let value = json::to_json(
                node,
                "oakestra.addons.monitor.v1.ListManagedServicesResponse",
            )?;
            emit(value, format)
        }
        Format::Id => {
            node.services
                .iter()
                .map(|s| &s.container_id)
                .chain(node.core_components.iter().map(|c| &c.container_id))
                .for_each(|id| println!("{id}"));
            Ok(())
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = node
                .services
                .iter()
                .map(|s| {
                    vec![
                        s.container_id.clone(),
                        s.installation_id.clone(),
                        s.service_name.clone(),
                        status_word(s.phase().as_str_name().trim_start_matches("SERVICE_PHASE_")),
                        if s.replaced_core_component.is_empty() {
                            "-".to_owned()
                        } else {
                            s.replaced_core_component.clone()
                        },
                    ]
                })
                .collect();
            table(
                &["CONTAINER", "INSTALLATION", "SERVICE", "PHASE", "REPLACES"],
                &rows,
            );
            println!();
            let rows: Vec<Vec<String>> = node
                .core_components
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.container_id.clone(),
                        status_word(if c.running { "RUNNING" } else { "STOPPED" }),
                        if c.static_component {
                            "static file"
                        } else {
                            "found"
                        }
                        .to_owned(),
                        if c.replaced_by.is_empty() {
                            "-".to_owned()
                        } else {
                            c.replaced_by.clone()
                        },
                    ]
                })
                .collect();
            table(
                &[
                    "CORE COMPONENT",
                    "CONTAINER",
                    "TASK",
                    "SOURCE",
                    "REPLACED BY",
                ],
                &rows,
            );
            Ok(())
        }
    }
}

/// Prints the plane's nodes: a table, or JSON/YAML (a list when `many`).
pub fn plane_nodes(list: &[epb::Node], format: Format, many: bool) -> Result<(), ClientError> {
    match format {
        Format::Id => {
            list.iter().for_each(|n| println!("{}", n.node_id));
            Ok(())
        }
        Format::Json | Format::Yaml => {
            let values = list
                .iter()
                .map(|n| json::to_json(n, "oakestra.addons.engine.v1.Node"))
                .collect::<Result<Vec<_>, _>>()?;
            emit(single_or_list(values, many), format)
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|n| {
                    let (running, total) = n.installations.iter().flat_map(|i| &i.services).fold(
                        (0, 0),
                        |(running, total), s| {
                            let up = s.phase() == epb::ServicePhase::Running;
                            (running + usize::from(up), total + 1)
                        },
                    );
                    let labels: Vec<String> =
                        n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        n.node_id.clone(),
                        if n.connected {
                            status_word("CONNECTED")
                        } else {
                            status_word("DISCONNECTED")
                        },
                        if n.connected {
                            ago(n.connect_time.as_ref())
                        } else {
                            ago(n.disconnect_time.as_ref())
                        },
                        if n.connected {
                            "-".to_owned()
                        } else {
                            ago(n.expire_time.as_ref())
                        },
                        if labels.is_empty() {
                            "-".to_owned()
                        } else {
                            labels.join(",")
                        },
                        format!("{running}/{total}"),
                        n.monitor_version.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "NODE",
                    "LINK",
                    "SINCE",
                    "FORGOTTEN",
                    "LABELS",
                    "RUNNING",
                    "MONITOR",
                ],
                &rows,
            );
            Ok(())
        }
    }
}

/// One line about a change, for `watch`.
pub fn change_line(i: &epb::Installation, deleted: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let clock = format!(
        "{:02}:{:02}:{:02}",
        (now / 3600) % 24,
        (now / 60) % 60,
        now % 60
    );
    let status = if deleted {
        status_word("DELETED")
    } else {
        status_word(&installation_status(i))
    };
    format!(
        "{clock}  {}  {}  {}  {}",
        shown(&i.id),
        shown(i.addon.as_ref().map(|a| a.name.as_str()).unwrap_or("-")),
        status,
        shown(&i.status_message)
    )
}

/// An installation event as one JSON line, for `watch -o json`.
pub fn change_json(i: &epb::Installation, deleted: bool) -> Result<String, ClientError> {
    let value = serde_json::json!({
        "installation": json::to_json(i, INSTALLATION)?,
        "deleted": deleted,
    });
    serde_json::to_string(&value).map_err(|err| ClientError::Input(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_colours_reach_a_terminal() {
        assert_eq!(shown("plain"), "plain");
        assert_eq!(
            shown("\x1b[32mACTIVE\x1b[0m"),
            "\x1b[32mACTIVE\x1b[0m",
            "our colours pass"
        );
        assert_eq!(shown("a\x1b[8mhidden"), "a\\u{1b}[8mhidden");
        assert_eq!(shown("x\r\ny\t"), "x\\r\\ny\\t");
        assert_eq!(shown("\x1b]0;title\x07"), "\\u{1b}]0;title\\u{7}");
        assert_eq!(shown("\x1b["), "\\u{1b}[");
    }
}
