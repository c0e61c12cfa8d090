//! How the CLI prints: aligned tables and relative times for people,
//! canonical proto3 JSON or YAML (proto field names) for programs, colours
//! only on a terminal and never with `NO_COLOR`.

use std::io::IsTerminal as _;

use oak_addons::{
    ClientError, json,
    proto::{engine::v1 as epb, marketplace::v1 as mpb},
};

mod addons;
mod installations;
mod nodes;

pub use self::{
    addons::addons,
    installations::{change_json, change_line, history, installations},
    nodes::{node, plane_nodes},
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

/// Prints a document as JSON or YAML.
pub(crate) fn document(value: &serde_json::Value, format: Format) -> Result<(), ClientError> {
    emit(value.clone(), format)
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

fn single_or_list(mut values: Vec<serde_json::Value>, many: bool) -> serde_json::Value {
    if many || values.len() != 1 {
        serde_json::Value::Array(values)
    } else {
        values.remove(0)
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
