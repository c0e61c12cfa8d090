//! Installations, their history and their changes as the CLI prints them.

use super::*;

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
                match &i.revoked {
                    // The warning first: the addon was withdrawn.
                    Some(revoked) => format!(
                        "ADDON REVOKED{}: {}{}",
                        if revoked.uninstalled {
                            " (uninstalled)"
                        } else {
                            ""
                        },
                        revoked.reason,
                        if i.status_message.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", i.status_message)
                        }
                    ),
                    None => i.status_message.clone(),
                },
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
