//! Addons as the CLI prints them.

use super::*;

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
