//! Nodes as the CLI prints them: what a monitor runs, and a plane's nodes.

use super::*;

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
