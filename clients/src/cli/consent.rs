//! Consent at install: the CLI shows every privilege the addon needs and
//! grants them only when the operator says so: `--grant-all`, repeated
//! `--grant KIND=VALUE`, or "y" at the prompt on a terminal. Without any of
//! these and without a terminal it refuses, naming what must be granted.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use addons_descriptor::{Descriptor, Privilege, privileges};
use oak_addons::proto::{engine::v1 as epb, marketplace::v1 as mpb};

use super::Failure;

/// The privileges to accept for installing `addon`, asking on a terminal.
pub(super) fn decide(
    addon: &mpb::Addon,
    keep_core_stopped: bool,
    grant_all: bool,
    grants: &[String],
) -> Result<Vec<epb::Privilege>, Failure> {
    decide_beyond(addon, keep_core_stopped, grant_all, grants, &[])
}

/// The privileges to accept for moving to `addon` from a release that was
/// granted `held`: only what `held` does not cover is asked for.
pub(super) fn decide_beyond(
    addon: &mpb::Addon,
    keep_core_stopped: bool,
    grant_all: bool,
    grants: &[String],
    held: &[Privilege],
) -> Result<Vec<epb::Privilege>, Failure> {
    let all = privileges::for_install(&Descriptor::from_proto(addon.clone()), keep_core_stopped);
    let needs = privileges::missing(&all, held);
    let mut granted = grants
        .iter()
        .map(|text| {
            Privilege::parse_grant(text).map_err(|err| Failure::usage(format!("--grant {err}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if needs.is_empty() {
        return Ok(granted.into_iter().map(Into::into).collect());
    }
    let missing = privileges::missing(&needs, &granted);
    if grant_all || missing.is_empty() {
        if grant_all {
            granted.extend(needs);
        }
        return Ok(granted.into_iter().map(Into::into).collect());
    }
    let mut stderr = std::io::stderr();
    let _ = writeln!(
        stderr,
        "Addon {} {} ({}) needs these privileges on every node it runs on:",
        addon.name, addon.version, addon.id
    );
    for need in &needs {
        let mark = if missing.contains(need) { " " } else { "✓" };
        let _ = writeln!(
            stderr,
            "  {mark} {:<40} service {}",
            need.grant_text(),
            need.service_name
        );
    }
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let _ = write!(stderr, "Grant these privileges? [y/N] ");
        let _ = stderr.flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|err| Failure::usage(format!("cannot read the answer: {err}")))?;
        if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            granted.extend(missing);
            return Ok(granted.into_iter().map(Into::into).collect());
        }
        return Err(Failure::usage("refused: the privileges were not granted"));
    }
    let flags: Vec<String> = missing
        .iter()
        .map(|need| format!("--grant {}", need.grant_text()))
        .collect();
    Err(Failure::usage(format!(
        "refused: addon {} {} ({}) needs privileges that were not granted; pass --grant-all or {}",
        addon.name,
        addon.version,
        addon.id,
        flags.join(" ")
    )))
}
