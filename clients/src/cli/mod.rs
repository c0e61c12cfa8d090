//! The commands of `oak-addons`.

mod args;
mod compose;
mod config;
mod consent;
mod failure;
pub(crate) mod output;
mod progress;
mod servers;
mod signing;
mod trace;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::CommandFactory as _;
use futures::StreamExt as _;
use oak_addons::{
    AddonFilter, ClientError, ClientOptions, InstallOptions, ManagerClient, MarketplaceClient,
    RolloutOptions,
    proto::{
        engine::v1 as epb,
        marketplace::v1 as mpb,
        monitor::v1::{
            GetServiceLogsRequest, ListManagedServicesRequest,
            node_monitor_service_client::NodeMonitorServiceClient,
        },
    },
};

use self::{args::*, failure::*, output::Format, progress::Until, servers::*};
pub use self::{
    args::{Cli, EXIT_ERROR, EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE},
    failure::Failure,
};

/// Runs the command; the exit code on success.
pub async fn run(cli: Cli) -> Result<u8, Failure> {
    let trace = trace::CommandTrace::start(&trace::command_name());
    let traceparent = trace.as_ref().map(trace::CommandTrace::traceparent);
    let result = run_traced(cli, traceparent).await;
    if let Some(trace) = trace {
        trace
            .end(result.as_ref().err().map(ToString::to_string))
            .await;
    }
    result
}

/// Runs the command; its calls carry `traceparent` (the command's span).
async fn run_traced(mut cli: Cli, traceparent: Option<String>) -> Result<u8, Failure> {
    if let Command::Config(_) = &cli.command {
        let Command::Config(command) = std::mem::replace(
            &mut cli.command,
            Command::Config(ConfigCommand::GetContexts),
        ) else {
            unreachable!()
        };
        return configure(&cli, command);
    }
    if let Command::Core(CoreCommand::FromCompose {
        file,
        plane,
        services,
        images,
        replaceable,
    }) = &cli.command
    {
        return from_compose(file, plane, services, images, *replaceable);
    }
    // Registries and key files only: no server is needed.
    match &cli.command {
        Command::Sign {
            image,
            key,
            registry,
        } => return signing::sign(image, key, registry, cli.output).await,
        Command::Verify {
            image,
            key,
            registry,
        } => return signing::verify(image, key, registry, cli.output).await,
        Command::GenerateKeyPair { output_key_prefix } => {
            return signing::generate_key_pair(output_key_prefix);
        }
        _ => {}
    }
    let (servers, credentials) = resolve(&mut cli)?;
    let options = ClientOptions {
        timeout: cli.timeout,
        credentials,
        traceparent,
        ..ClientOptions::default()
    };
    let format = cli.output;
    let timing = (cli.wait_timeout, cli.settle);
    let marketplace = || {
        let options = servers.options(0, &servers.marketplace, &options);
        MarketplaceClient::connect(&servers.marketplace, &options).map_err(failed("marketplace"))
    };
    let manager = || {
        let options = servers.options(1, &servers.manager, &options);
        ManagerClient::connect(&servers.manager, &options).map_err(failed("manager"))
    };
    let monitor_options = || servers.options(2, &servers.monitor, &options);
    match cli.command {
        Command::Marketplace(command) => {
            let client = marketplace()?;
            match command {
                MarketplaceCommand::Publish { file, wait } => {
                    let (text, name) = if file.as_os_str() == "-" {
                        let mut text = String::new();
                        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                            .map_err(|err| Failure::usage(format!("stdin: {err}")))?;
                        (text, "stdin".to_owned())
                    } else {
                        let text = std::fs::read_to_string(&file).map_err(|err| {
                            Failure::usage(format!("cannot read {}: {err}", file.display()))
                        })?;
                        (text, file.display().to_string())
                    };
                    let addon = oak_addons::oakestra::parse_descriptor(&text, &name)
                        .map_err(|err| Failure::usage(err.to_string()))?;
                    let published = client
                        .publish(addon)
                        .await
                        .map_err(failed("publish failed"))?;
                    if wait {
                        return wait_verified(&client, published, format, cli.wait_timeout).await;
                    }
                    output::addons(&[published], format, false).map_err(failed("output"))?;
                }
                MarketplaceCommand::List { all, name } => {
                    let filter = AddonFilter {
                        name,
                        ..if all {
                            AddonFilter::all()
                        } else {
                            AddonFilter::default()
                        }
                    };
                    let addons: Vec<mpb::Addon> = collect(client.list(filter))
                        .await
                        .map_err(failed("listing addons failed"))?;
                    output::addons(&addons, format, true).map_err(failed("output"))?;
                }
                MarketplaceCommand::Get { id } => {
                    let addon = client
                        .get(&id)
                        .await
                        .map_err(failed(&format!("addon {id}")))?;
                    output::addons(&[addon], format, false).map_err(failed("output"))?;
                }
                MarketplaceCommand::Delete { id } => {
                    client
                        .delete(&id)
                        .await
                        .map_err(failed(&format!("deleting addon {id} failed")))?;
                    if format == Format::Table {
                        println!("deleted addon {id}");
                    }
                }
                MarketplaceCommand::Revoke { id, reason } => {
                    let addon = client
                        .revoke(&id, &reason)
                        .await
                        .map_err(failed(&format!("revoking addon {id} failed")))?;
                    output::addons(&[addon], format, false).map_err(failed("output"))?;
                }
                MarketplaceCommand::Reverify { id, wait } => {
                    let addon = client
                        .reverify(&id)
                        .await
                        .map_err(failed(&format!("reverifying addon {id} failed")))?;
                    if wait {
                        return wait_verified(&client, addon, format, cli.wait_timeout).await;
                    }
                    output::addons(&[addon], format, false).map_err(failed("output"))?;
                }
            }
        }
        Command::Install {
            marketplace_id,
            wait,
            keep_core_stopped_on_failure,
            grant_all,
            grants,
            node_selector,
        } => {
            let addon = marketplace()?
                .get(&marketplace_id)
                .await
                .map_err(failed(&format!("reading addon {marketplace_id} failed")))?;
            let accepted_privileges =
                consent::decide(&addon, keep_core_stopped_on_failure, grant_all, &grants)?;
            let client = manager()?;
            let installation = client
                .install(
                    &marketplace_id,
                    InstallOptions {
                        keep_core_stopped_on_failure,
                        accepted_privileges,
                        node_selector: node_selector.into_iter().collect(),
                    },
                )
                .await
                .map_err(failed(&format!("installing addon {marketplace_id} failed")))?;
            let until = wait.then_some(Until::Settled);
            return progress::installation(&client, installation, until, format, timing).await;
        }
        Command::Upgrade {
            id,
            version,
            wait,
            max_parallel,
            min_healthy_time,
            grant_all,
            grants,
        } => {
            let client = manager()?;
            let current = client
                .get(&id)
                .await
                .map_err(failed(&format!("installation {id}")))?;
            let name = current
                .addon
                .as_ref()
                .map(|a| a.name.clone())
                .unwrap_or_default();
            let versions = collect(marketplace()?.list(AddonFilter {
                name: Some(name.clone()),
                statuses: Vec::new(),
            }))
            .await
            .map_err(failed(&format!("listing the versions of {name}")))?;
            let Some(addon) = versions.into_iter().find(|a| a.version == version) else {
                return Err(Failure::usage(format!(
                    "addon {name} has no approved version {version}"
                )));
            };
            let held: Vec<addons_descriptor::Privilege> = current
                .granted_privileges
                .iter()
                .cloned()
                .map(Into::into)
                .collect();
            let accepted_privileges = consent::decide_beyond(
                &addon,
                current.keep_core_stopped_on_failure,
                grant_all,
                &grants,
                &held,
            )?;
            let installation = client
                .upgrade(
                    &id,
                    &version,
                    RolloutOptions {
                        accepted_privileges,
                        max_parallel,
                        min_healthy_time,
                    },
                )
                .await
                .map_err(failed(&format!("upgrading {id} to {version} failed")))?;
            let until = wait.then_some(Until::RolledOut);
            return progress::installation(&client, installation, until, format, timing).await;
        }
        Command::Rollback {
            id,
            release,
            wait,
            max_parallel,
            min_healthy_time,
        } => {
            let client = manager()?;
            let installation = client
                .rollback(
                    &id,
                    release.unwrap_or(0),
                    RolloutOptions {
                        accepted_privileges: Vec::new(),
                        max_parallel,
                        min_healthy_time,
                    },
                )
                .await
                .map_err(failed(&format!("rolling {id} back failed")))?;
            let until = wait.then_some(Until::RolledOut);
            return progress::installation(&client, installation, until, format, timing).await;
        }
        Command::History { id } => {
            let installation = manager()?
                .get(&id)
                .await
                .map_err(failed(&format!("installation {id}")))?;
            output::history(&installation, format).map_err(failed("output"))?;
        }
        Command::Uninstall { id, purge, wait } => {
            let client = manager()?;
            let installation = client
                .uninstall(&id, purge)
                .await
                .map_err(failed(&format!("uninstalling {id} failed")))?;
            let until = wait.then_some(Until::Removed);
            return progress::installation(&client, installation, until, format, timing).await;
        }
        Command::Nodes => {
            let nodes: Vec<epb::Node> = collect(manager()?.list_nodes())
                .await
                .map_err(failed("listing nodes failed"))?;
            output::plane_nodes(&nodes, format, true).map_err(failed("output"))?;
        }
        Command::ForgetNode { node } => {
            let forgotten = manager()?
                .forget_node(&node)
                .await
                .map_err(failed(&format!("forgetting node {node} failed")))?;
            if format == Format::Table {
                println!("forgot node {}", forgotten.node_id);
            } else {
                output::plane_nodes(&[forgotten], format, false).map_err(failed("output"))?;
            }
        }
        Command::List { status, addon } => {
            let client = manager()?;
            let statuses = status;
            let mut list: Vec<epb::Installation> = collect(client.list(statuses))
                .await
                .map_err(failed("listing installations failed"))?;
            if let Some(addon) = addon {
                list.retain(|i| {
                    i.marketplace_id == addon || i.addon.as_ref().is_some_and(|a| a.name == addon)
                });
            }
            output::installations(&list, format, true).map_err(failed("output"))?;
        }
        Command::Get { id } => {
            let installation = manager()?
                .get(&id)
                .await
                .map_err(failed(&format!("installation {id}")))?;
            output::installations(&[installation], format, false).map_err(failed("output"))?;
        }
        Command::Watch { ids } => {
            let client = manager()?;
            let mut events = Box::pin(client.watch(ids));
            while let Some(event) = events.next().await {
                let event = event.map_err(failed("watch"))?;
                let line = match format {
                    Format::Table => output::change_line(&event.installation, event.deleted),
                    Format::Id => event.installation.id.clone(),
                    _ => output::change_json(&event.installation, event.deleted)
                        .map_err(failed("output"))?,
                };
                println!("{line}");
            }
        }
        Command::Logs { id, service, tail } => {
            let channel = oak_addons::auth_channel(&servers.monitor, &monitor_options())
                .map_err(failed("monitor"))?;
            let lines = tokio::time::timeout(
                options.timeout,
                NodeMonitorServiceClient::new(channel).get_service_logs(GetServiceLogsRequest {
                    installation_id: id.clone(),
                    service_name: service.clone(),
                    tail_lines: tail,
                }),
            )
            .await
            .map_err(|_| {
                Failure::error(format!(
                    "logs of {service}: no answer from {}",
                    servers.monitor
                ))
            })?
            .map_err(|status| failed(&format!("logs of {service}"))(status.into()))?
            .into_inner()
            .lines;
            match format {
                Format::Table | Format::Id => {
                    // What an addon wrote reaches a terminal escaped.
                    let raw = !std::io::IsTerminal::is_terminal(&std::io::stdout());
                    for line in lines {
                        if raw {
                            println!("{line}");
                        } else {
                            println!("{}", output::shown(&line));
                        }
                    }
                }
                Format::Json => println!("{}", serde_json::json!({ "lines": lines })),
                Format::Yaml => {
                    print!(
                        "{}",
                        serde_yaml_ng::to_string(&serde_json::json!({ "lines": lines }))
                            .unwrap_or_default()
                    )
                }
            }
        }
        Command::Node => {
            let channel = oak_addons::auth_channel(&servers.monitor, &monitor_options())
                .map_err(failed("monitor"))?;
            let node = tokio::time::timeout(
                options.timeout,
                NodeMonitorServiceClient::new(channel)
                    .list_managed_services(ListManagedServicesRequest {}),
            )
            .await
            .map_err(|_| Failure::error(format!("node: no answer from {}", servers.monitor)))?
            .map_err(|status| failed(&format!("node at {}", servers.monitor))(status.into()))?
            .into_inner();
            output::node(&node, format).map_err(failed("output"))?;
        }
        Command::Probe { url } => {
            let channel = oak_addons::channel_with(&url, &options).map_err(failed(&url))?;
            let services = tokio::time::timeout(options.timeout, oak_addons::probe(channel))
                .await
                .map_err(|_| {
                    Failure::error(format!("{url}: no answer within {:?}", options.timeout))
                })?
                .map_err(|status| failed(&url)(status.into()))?;
            let rows: Vec<Vec<String>> = services
                .into_iter()
                .map(|s| vec![s.name, output::status_word(&s.status)])
                .collect();
            output::table(&["SERVICE", "HEALTH"], &rows);
        }
        // Handled before any connection is made.
        Command::Config(_)
        | Command::Core(_)
        | Command::Sign { .. }
        | Command::Verify { .. }
        | Command::GenerateKeyPair { .. } => {}
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "oak-addons",
                &mut std::io::stdout(),
            );
        }
    }
    Ok(EXIT_OK)
}

/// `core from-compose`.
fn from_compose(
    file: &std::path::Path,
    plane: &str,
    services: &[String],
    images: &[String],
    replaceable: bool,
) -> Result<u8, Failure> {
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|err| Failure::usage(format!("stdin: {err}")))?;
        text
    } else {
        std::fs::read_to_string(file)
            .map_err(|err| Failure::usage(format!("cannot read {}: {err}", file.display())))?
    };
    let images = images
        .iter()
        .map(|entry| {
            entry
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Failure::usage(format!("--image `{entry}` is not NAME=REFERENCE")))
        })
        .collect::<Result<std::collections::BTreeMap<_, _>, _>>()?;
    let options = compose::Options {
        plane,
        only: services,
        images,
        replaceable,
    };
    let conversion = compose::convert(&text, &options, &|var| std::env::var(var).ok())
        .map_err(|err| Failure::error(format!("{}: {err}", file.display())))?;
    for note in &conversion.notes {
        eprintln!("note: {}", output::shown(note));
    }
    eprintln!(
        "{} core component(s): {}",
        conversion.names.len(),
        conversion.names.join(", ")
    );
    print!("{}", conversion.yaml);
    Ok(EXIT_OK)
}

async fn collect<T>(
    stream: impl futures::Stream<Item = Result<T, ClientError>>,
) -> Result<Vec<T>, ClientError> {
    let mut stream = Box::pin(stream);
    let mut items = Vec::new();
    while let Some(item) = stream.next().await {
        items.push(item?);
    }
    Ok(items)
}

/// Follows verification until the addon leaves UNDER_REVIEW.
async fn wait_verified(
    client: &MarketplaceClient,
    addon: mpb::Addon,
    format: Format,
    patience: Duration,
) -> Result<u8, Failure> {
    let id = addon.id.clone();
    let mut last_error = HashMap::new();
    let mut updates = Box::pin(client.watch(&id));
    let done = tokio::time::timeout(patience, async {
        let mut current = addon;
        loop {
            if current.status() != mpb::AddonStatus::UnderReview {
                return Ok(current);
            }
            if let Some(v) = &current.verification
                && !v.last_error.is_empty()
                && last_error
                    .insert(v.attempts, v.last_error.clone())
                    .is_none()
            {
                eprintln!(
                    "verifying {id}: attempt {} failed: {}; retrying",
                    v.attempts,
                    output::shown(&v.last_error)
                );
            }
            match updates.next().await {
                Some(Ok(addon)) => current = addon,
                Some(Err(err)) => return Err(failed(&format!("watching addon {id}"))(err)),
                None => {
                    return Err(Failure::error(format!(
                        "watching addon {id}: the stream ended"
                    )));
                }
            }
        }
    })
    .await
    .map_err(|_| {
        Failure::error(format!(
            "addon {id} is still under review after {patience:?}"
        ))
    })??;
    output::addons(std::slice::from_ref(&done), format, false).map_err(failed("output"))?;
    if done.status() == mpb::AddonStatus::FailedVerification {
        let reason = done
            .verification
            .as_ref()
            .map(|v| v.reason.clone())
            .unwrap_or_default();
        eprintln!(
            "error: addon {id} failed verification: {}",
            output::shown(&reason)
        );
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}
