//! Carrying out the planner's actions, one object at a time: an error is
//! recorded against the object it is about, and only an unreachable
//! containerd ends the pass.

use std::collections::HashMap;

use tracing::Instrument as _;

use oakestra_addons_proto::engine::v1::{self as pb, DesiredPresence};

use super::{Reconciler, services};
use addons_descriptor::policy::CoreRules;

use crate::{
    admission::{self, Refusal},
    error::MonitorError,
    network::Network,
    plan::Action,
    runtime::{ContainerInfo, Runtime},
};

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// Runs one action; an error about its object is recorded against it,
    /// and only an unreachable containerd is returned. An action that does
    /// something runs in a span of its own, which continues the trace of
    /// the call that asked for it (its installation's `traceparent`), so
    /// the containerd calls it makes join that trace.
    pub(super) async fn execute(
        &mut self,
        action: Action,
        specs: &Specs<'_>,
        infos: &HashMap<String, ContainerInfo>,
    ) -> Result<(), MonitorError> {
        match action_span(&action, specs) {
            Some(span) => self.execute_in(action, specs, infos).instrument(span).await,
            None => self.execute_in(action, specs, infos).await,
        }
    }

    async fn execute_in(
        &mut self,
        action: Action,
        specs: &Specs<'_>,
        infos: &HashMap<String, ContainerInfo>,
    ) -> Result<(), MonitorError> {
        let kind = action_kind(&action);
        let result = match action {
            Action::Phase {
                installation,
                service,
                id,
                phase,
                reason,
            } => {
                self.set_phase(&installation, &service, &id, phase.into(), reason);
                Ok(())
            }
            Action::Remove { .. } => Ok(()),
            Action::Create {
                installation,
                service,
                id,
                replaces,
                supersedes,
            } => {
                let Some((desired, spec)) = specs.get(&installation, &service) else {
                    return Ok(());
                };
                let core = replaces.as_ref().and_then(|core| infos.get(core));
                let result = match self.admit(desired, spec, replaces.is_some(), specs) {
                    Ok(limits) => {
                        self.create(desired, spec, &id, core, &supersedes, limits)
                            .await
                    }
                    Err(refusal) => Err(refusal.into()),
                };
                return self.attempted(kind, &installation, &service, &id, result);
            }
            Action::Start {
                installation,
                service,
                id,
                restart,
                take_over,
            } => {
                let spec = specs.get(&installation, &service).map(|(_, s)| s);
                let core = take_over.as_ref().and_then(|core| infos.get(core));
                let result = self
                    .start(&installation, &service, &id, restart, core, spec)
                    .await;
                return self.attempted(kind, &installation, &service, &id, result);
            }
            Action::Exited {
                installation,
                service,
                id,
                exit_code,
            } => {
                self.exited(&installation, &service, &id, exit_code);
                Ok(())
            }
            Action::TakeOver { core, installation } => match infos.get(&core) {
                Some(info) => {
                    let ports =
                        specs.ports_of_replacement(&self.cx.options.plane, &installation, info);
                    self.take_over(info, &installation, &ports).await
                }
                None => Ok(()),
            },
            Action::RunCore {
                core,
                stop_first,
                restore,
                start,
            } => match infos.get(&core) {
                Some(info) => {
                    self.run_core(info, stop_first.as_deref(), restore, start)
                        .await
                }
                None => Ok(()),
            },
        };
        self.cx.options.metrics.action(kind, result.is_ok());
        match result {
            Err(err) if err.is_unavailable() => Err(err),
            Err(err) => {
                tracing::warn!(error = %err, "reconcile step failed; retrying at the next pass");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Counts an attempt to create or start a service by its own outcome
    /// (one that waits for its image is no create yet), then records it
    /// against the service.
    fn attempted(
        &mut self,
        kind: &'static str,
        installation: &str,
        service: &str,
        id: &str,
        result: Result<(), MonitorError>,
    ) -> Result<(), MonitorError> {
        let pulling = result.is_ok()
            && self
                .tracked
                .get(id)
                .is_some_and(|t| t.status.phase() == pb::ServicePhase::Pulling);
        if !pulling {
            self.cx.options.metrics.action(kind, result.is_ok());
        }
        self.after_attempt(installation, service, id, result)
    }

    /// Stops and removes containers side by side: each may take its whole
    /// grace period.
    pub(super) async fn remove_all(&mut self, removals: Vec<Action>) -> Result<(), MonitorError> {
        let targets: Vec<(String, Option<String>)> = removals
            .into_iter()
            .filter_map(|action| match action {
                Action::Remove {
                    id, installation, ..
                } => Some((id, installation)),
                _ => None,
            })
            .collect();
        for (id, installation) in &targets {
            if installation.is_none() {
                tracing::info!(container = %id, "removing a container no desired installation wants");
            }
        }
        let results =
            futures::future::join_all(targets.iter().map(|(id, _)| self.cx.remove(id))).await;
        let mut unavailable = None;
        for ((id, installation), result) in targets.into_iter().zip(results) {
            self.cx.options.metrics.action("remove", result.is_ok());
            match result {
                Ok(()) => match installation {
                    Some(_) => {
                        if let Some(tracked) = self.tracked.get_mut(&id) {
                            tracked.set(pb::ServicePhase::Removed, "removed".into());
                        }
                    }
                    None => {
                        self.tracked.remove(&id);
                    }
                },
                Err(err) if err.is_unavailable() => unavailable = Some(err),
                Err(err) => {
                    tracing::warn!(container = %id, error = %err, "cannot remove container; retrying at the next pass");
                }
            }
        }
        unavailable.map_or(Ok(()), Err)
    }

    /// Deletes the named volumes of removed installations that asked for
    /// it, once none of their services is left.
    pub(super) fn purge_volumes(&self, desired: &pb::DesiredState) {
        for installation in &desired.installations {
            if installation.presence() == DesiredPresence::Running || !installation.purge_volumes {
                continue;
            }
            let gone = self
                .tracked
                .values()
                .filter(|t| t.installation_id == installation.installation_id)
                .all(|t| t.status.phase() == pb::ServicePhase::Removed);
            let volumes = match self.cx.state.volumes(&installation.installation_id) {
                Ok(volumes) => volumes,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot purge volumes");
                    continue;
                }
            };
            if gone
                && volumes.exists()
                && let Err(err) = std::fs::remove_dir_all(&volumes)
            {
                tracing::warn!(path = %volumes.display(), error = %err, "cannot delete volumes");
            }
        }
    }
}

/// The desired installations and services of a pass, by id and name.
pub(super) struct Specs<'a> {
    services: HashMap<(&'a str, &'a str), (&'a pb::DesiredInstallation, &'a pb::ServiceSpec)>,
}

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// Whether this node runs `spec` of `desired` (see [`admission`]); the
    /// limits it runs with when it does.
    fn admit(
        &self,
        desired: &pb::DesiredInstallation,
        spec: &pb::ServiceSpec,
        replaces_core: bool,
        specs: &Specs<'_>,
    ) -> Result<addons_descriptor::Resources, Refusal> {
        let policy = &self.cx.options.policy;
        let statics = &self.cx.options.core_components;
        let mut core = policy.core_rules(CoreRules::default());
        core.replace.extend(
            statics
                .iter()
                .filter(|c| c.replaceable)
                .map(|c| c.name.clone()),
        );
        core.inherit_environment.extend(
            statics
                .iter()
                .filter(|c| c.inherit_environment)
                .map(|c| c.name.clone()),
        );
        let mut in_use: Vec<(u16, String, String)> = statics
            .iter()
            .filter(|c| c.name != spec.service_name)
            .flat_map(|c| {
                let holder = format!("core component {}", c.name);
                c.port_mappings()
                    .into_iter()
                    .map(move |p| (p.host_port, p.protocol, holder.clone()))
            })
            .collect();
        for tracked in self.tracked.values() {
            if tracked.installation_id == desired.installation_id {
                continue;
            }
            let name = &tracked.status.service_name;
            if let Some((_, other)) = specs.get(&tracked.installation_id, name) {
                let holder = format!("service {name} of installation {}", tracked.installation_id);
                in_use.extend(
                    services::declared_ports(other)
                        .into_iter()
                        .map(|p| (p.host_port, p.protocol, holder.clone())),
                );
            }
        }
        let granted: Vec<addons_descriptor::Privilege> = desired
            .granted_privileges
            .iter()
            .cloned()
            .map(Into::into)
            .collect();
        admission::admit(
            admission::Node {
                policy,
                core: &core,
                reserved_ports: &self.cx.options.reserved_ports,
                ports_in_use: &in_use,
                trust: self.cx.options.trust.as_deref(),
            },
            desired.addon.as_ref().map_or("", |a| a.name.as_str()),
            &addons_descriptor::Service::from(spec.clone()),
            replaces_core,
            &granted,
        )
    }
}

impl<'a> Specs<'a> {
    pub(super) fn new(desired: Option<&'a pb::DesiredState>) -> Self {
        let services = desired
            .into_iter()
            .flat_map(|d| &d.installations)
            .flat_map(|i| {
                i.addon.iter().flat_map(|a| &a.services).map(move |s| {
                    (
                        (i.installation_id.as_str(), s.service_name.as_str()),
                        (i, s),
                    )
                })
            })
            .collect();
        Self { services }
    }

    /// The `traceparent` of `installation`, if the desired state has it.
    pub(super) fn traceparent_of(&self, installation: &str) -> Option<&'a str> {
        self.services
            .iter()
            .find(|((id, _), _)| *id == installation)
            .map(|(_, (desired, _))| desired.traceparent.as_str())
    }

    fn get(
        &self,
        installation: &str,
        service: &str,
    ) -> Option<(&'a pb::DesiredInstallation, &'a pb::ServiceSpec)> {
        self.services.get(&(installation, service)).copied()
    }

    /// The ports the replacement of core component `core` declares.
    fn ports_of_replacement(
        &self,
        plane: &str,
        installation: &str,
        core: &ContainerInfo,
    ) -> Vec<crate::network::PortMapping> {
        let name = core
            .labels
            .get(crate::labels::CORE_COMPONENT)
            .cloned()
            .or_else(|| {
                core.id
                    .strip_prefix(&format!("{plane}_"))
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        self.get(installation, &name)
            .map(|(_, spec)| services::declared_ports(spec))
            .unwrap_or_default()
    }
}

/// The span of an action that does something (not a phase or an exit
/// seen), a child of its installation's `traceparent` when it has one.
fn action_span(action: &Action, specs: &Specs<'_>) -> Option<tracing::Span> {
    let (installation, service) = match action {
        Action::Create {
            installation,
            service,
            ..
        }
        | Action::Start {
            installation,
            service,
            ..
        } => (installation.as_str(), Some(service.as_str())),
        Action::TakeOver { installation, .. } => (installation.as_str(), None),
        Action::RunCore { .. } => ("", None),
        Action::Phase { .. } | Action::Exited { .. } | Action::Remove { .. } => return None,
    };
    let kind = action_kind(action);
    let span = tracing::info_span!(
        "reconcile.action",
        otel.name = %format_args!("reconcile {kind}"),
        installation,
        service = service.unwrap_or_default(),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let traceparent = service
        .and_then(|service| specs.get(installation, service))
        .map(|(desired, _)| desired.traceparent.as_str())
        .or_else(|| specs.traceparent_of(installation))
        .unwrap_or_default();
    addons_server_kit::continue_trace(&span, traceparent);
    Some(span)
}

/// An action's kind, as the metrics name it.
fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::Phase { .. } => "phase",
        Action::Remove { .. } => "remove",
        Action::Create {
            replaces: Some(_), ..
        } => "swap",
        Action::Create { .. } => "create",
        Action::Start { restart: true, .. } => "restart",
        Action::Start { .. } => "start",
        Action::Exited { .. } => "exited",
        Action::TakeOver { .. } => "take_over",
        Action::RunCore { restore: true, .. } => "restore",
        Action::RunCore { .. } => "run_core",
    }
}
