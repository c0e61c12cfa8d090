//! Addon containers: made from a pulled image, a runtime spec and their
//! networks; started; removed with everything they had on the host.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
};

use oakestra_addons_proto::engine::v1::{self as pb, ServicePhase};

use super::{
    Reconciler,
    context::{default_network, ensure_dir, host_names, write_in_place},
};
use crate::{
    cores,
    error::MonitorError,
    labels::{
        ADDON, INSTALLATION, MANAGED_BY, MANAGED_BY_VALUE, PLANE, RELEASE, REPLACES, SERVICE,
    },
    network::Network,
    network::PortMapping,
    pull_tasks::PullState,
    runtime::{ContainerInfo, Runtime, RuntimeError, build_spec},
};

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// The image a service runs: pinned by the manager when it can be.
    fn image_of(service: &pb::ServiceSpec) -> &str {
        if service.resolved_image.is_empty() {
            &service.image
        } else {
            &service.resolved_image
        }
    }

    /// Makes the service's container and starts it; a replacement has its
    /// task created before it takes `core` over, and starts the moment the
    /// core task has exited. Waits (showing PULLING) while the image pulls.
    ///
    /// The service's containers of other releases (`supersedes`) keep
    /// running until the new one is prepared (container and task made);
    /// then they go, the new one takes their published ports and starts.
    /// A replacement shares its core component's namespace, so the core
    /// component never runs in between.
    pub(super) async fn create(
        &mut self,
        installation: &pb::DesiredInstallation,
        service: &pb::ServiceSpec,
        id: &str,
        core: Option<&ContainerInfo>,
        supersedes: &[String],
        limits: addons_descriptor::Resources,
    ) -> Result<(), MonitorError> {
        let installation_id = installation.installation_id.as_str();
        let name = service.service_name.as_str();
        self.track(installation_id, name, id)
            .status
            .replaced_core_component = core.map(|_| name.to_owned()).unwrap_or_default();
        let image = Self::image_of(service);
        let pulled = match self.pulls.get(image) {
            PullState::Ready(pulled) => pulled,
            PullState::Running(progress) => {
                let done = progress.load(std::sync::atomic::Ordering::Relaxed);
                let tracked = self.track(installation_id, name, id);
                tracked.status.pull_bytes_done = done;
                tracked.set(ServicePhase::Pulling, format!("pulling {image}"));
                if core.is_none() {
                    self.prepare_network(id, PreparedNetwork::of(service, supersedes))
                        .await;
                }
                return Ok(());
            }
            PullState::Failed(err) => return Err(MonitorError::Image(image_failure(image, &err))),
        };
        {
            let tracked = self.track(installation_id, name, id);
            if tracked.status.pull_bytes_total == 0 {
                tracked.status.pull_bytes_done = pulled.bytes_pulled;
                tracked.status.pull_bytes_total = pulled.bytes_pulled;
            }
        }
        self.set_phase(
            installation_id,
            name,
            id,
            ServicePhase::Starting,
            "starting".into(),
        );
        let mut run = self.cx.run_spec(installation_id, service, id, &pulled)?;
        run.limits = limits;
        let ports = declared_ports(service);
        if let Some(core) = core
            && service.inherit_core_environment
        {
            let declared: Vec<(String, String)> = service
                .environment
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            run.env = cores::merge_env(&core.env(), &pulled.config.env, &declared);
        }
        // A replacement joins its core component's network namespace: it
        // inherits the addresses, networks and published ports.
        match core.and_then(ContainerInfo::netns_path) {
            Some(netns) => run.netns = Some(netns),
            None => {
                let wanted = PreparedNetwork::of(service, supersedes);
                // Attached while the image pulled, as the service still
                // wants it: taken as it is.
                if self.prepared.remove(id).as_ref() != Some(&wanted) {
                    self.cx
                        .networks
                        .attach(id, &wanted.networks, &wanted.ports)
                        .await?;
                }
                run.netns = Some(self.cx.networks.netns_path(id)?);
            }
        }
        self.write_hosts(installation_id);
        let spec = build_spec(&run, self.cx.runtime.namespace()).map_err(|reason| {
            RuntimeError::InvalidImage {
                image: image.to_owned(),
                reason,
            }
        })?;
        let mut labels = HashMap::from([
            (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
            (INSTALLATION.to_owned(), installation_id.to_owned()),
            (SERVICE.to_owned(), name.to_owned()),
            (PLANE.to_owned(), self.cx.options.plane.clone()),
            (ADDON.to_owned(), installation.marketplace_id.clone()),
            (RELEASE.to_owned(), installation.release.max(1).to_string()),
        ]);
        if let Some(core) = core {
            labels.insert(REPLACES.to_owned(), core.id.clone());
        }
        let log = self.cx.state.log(id)?;
        ensure_dir(log.parent())?;
        let created = async {
            self.cx.runtime
                .create_container(crate::runtime::NewContainer { id, image, top_snapshot: &pulled.top_snapshot, spec: &spec, labels })
                .await?;
            self.cx.create_task_pinned(id, &log, &run.binds).await?;
            // Prepared, not started: a monitor that stops from here on
            // finds it STARTING, and its first start is no restart.
            self.persist(id);
            if !supersedes.is_empty() {
                crate::crash::point("upgrade:prepared");
                for old in supersedes {
                    self.cx.remove(old).await?;
                }
                tracing::info!(container = %id, old = ?supersedes, "took over from the service's other releases");
                crate::crash::point("upgrade:old-removed");
                if core.is_none() {
                    self.cx.networks.set_ports(id, &ports).await?;
                }
            }
            if let Some(core) = core {
                crate::crash::point("swap:prepared");
                self.take_over(core, installation_id, &ports).await?;
                crate::crash::point("swap:core-stopped");
            }
            self.cx.runtime.start_created_task(id).await?;
            Ok::<(), MonitorError>(())
        }
        .await;
        if let Err(err) = created {
            if let Err(cleanup) = self.cx.remove(id).await {
                tracing::warn!(container = %id, error = %cleanup, "cannot remove a container that failed to start");
            }
            return Err(err);
        }
        self.set_phase(
            installation_id,
            name,
            id,
            ServicePhase::Running,
            "running".into(),
        );
        Ok(())
    }

    /// Attaches container `id`'s networks while its image pulls, so the
    /// CNI plugins' time is not added to the start once the image is in.
    /// A failure is only logged: the attach when the container is made
    /// tries again and reports it.
    async fn prepare_network(&mut self, id: &str, network: PreparedNetwork) {
        if self.prepared.get(id) == Some(&network) {
            return;
        }
        self.prepared.remove(id);
        match self
            .cx
            .networks
            .attach(id, &network.networks, &network.ports)
            .await
        {
            Ok(_) => {
                self.prepared.insert(id.to_owned(), network);
            }
            Err(err) => {
                tracing::info!(container = %id, error = %err, "cannot attach the network while the image pulls; trying again at the start");
            }
        }
    }

    /// Takes down the networks of what has no container: prepared for a
    /// service no longer wanted here (uninstalled, given up, another
    /// release), or left by a monitor that stopped between an attach and
    /// the container it was for. `containers` are every container there
    /// is (listed before this pass made any); `running` the containers of
    /// the services the desired state wants running.
    pub(super) async fn detach_unused(
        &mut self,
        containers: &BTreeSet<&str>,
        running: &BTreeSet<String>,
    ) {
        let attached = match self.cx.networks.attached() {
            Ok(attached) => attached,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list network attachments");
                return;
            }
        };
        for id in attached {
            if containers.contains(id.as_str()) {
                continue;
            }
            let still_wanted = self.prepared.contains_key(&id)
                && running.contains(&id)
                && self
                    .tracked
                    .get(&id)
                    .is_some_and(|t| t.status.phase() != ServicePhase::Failed);
            if still_wanted {
                continue;
            }
            self.prepared.remove(&id);
            match self.cx.networks.detach(&id).await {
                Ok(()) => tracing::info!(container = %id, "took down the network of no container"),
                Err(err) => {
                    tracing::warn!(container = %id, error = %err, "cannot take down the network of no container");
                }
            }
        }
    }

    /// Starts an existing container's task: its first start (prepared
    /// before a monitor restart), or a restart after an exit. A replacement
    /// takes `core` over first.
    pub(super) async fn start(
        &mut self,
        installation: &str,
        service: &str,
        id: &str,
        restart: bool,
        core: Option<&ContainerInfo>,
        spec: Option<&pb::ServiceSpec>,
    ) -> Result<(), MonitorError> {
        if let Some(core) = core {
            let ports = spec.map(declared_ports).unwrap_or_default();
            self.take_over(core, installation, &ports).await?;
        } else if let Some(spec) = spec
            && !self.cx.networks.addresses(id)?.is_empty()
        {
            // Prepared while another release held the ports, and the
            // monitor stopped before they moved over: they move now.
            let ports = declared_ports(spec);
            if self.cx.networks.ports(id)? != ports {
                self.cx.networks.set_ports(id, &ports).await?;
            }
        }
        let log = self.cx.state.log(id)?;
        ensure_dir(log.parent())?;
        match self.cx.runtime.task_state(id).await? {
            crate::runtime::TaskState::Created if !restart => {
                self.cx.runtime.start_created_task(id).await?;
            }
            _ => {
                self.cx.runtime.delete_task(id).await?;
                // The binds of the container's own spec: what runc will
                // mount, checked again, since an addon may have changed
                // what lies beneath a host path since the last start.
                let binds = self
                    .cx
                    .runtime
                    .list_containers()
                    .await?
                    .iter()
                    .find(|info| info.id == id)
                    .map(spec_binds)
                    .unwrap_or_default();
                self.cx.create_task_pinned(id, &log, &binds).await?;
                self.cx.runtime.start_created_task(id).await?;
            }
        }
        let tracked = self.track(installation, service, id);
        if restart {
            tracked.status.restart_count += 1;
        }
        self.set_phase(
            installation,
            service,
            id,
            ServicePhase::Running,
            "running".into(),
        );
        Ok(())
    }

    /// Rewrites the hosts files of an installation's containers, in place
    /// (they are bind-mounted), so services on a shared network reach each
    /// other by service name.
    fn write_hosts(&self, installation: &str) {
        // (container id, service name, (network, address) pairs)
        type Member<'a> = (&'a str, &'a str, Vec<(String, String)>);
        let addresses = |id: &str| {
            self.cx.networks.addresses(id).unwrap_or_else(|err| {
                tracing::warn!(container = %id, error = %err, "cannot read network addresses");
                Vec::new()
            })
        };
        let members: Vec<Member<'_>> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.installation_id == installation)
            .map(|(id, t)| {
                let mut own = addresses(id);
                // A replacement (`<core id>.addon`) lives in its core
                // component's namespace.
                if own.is_empty()
                    && !t.status.replaced_core_component.is_empty()
                    && let Some(core_id) = id.strip_suffix(".addon")
                {
                    own = addresses(core_id);
                }
                (id.as_str(), t.status.service_name.as_str(), own)
            })
            .collect();
        for (id, name, own) in &members {
            let mut text = format!(
                "127.0.0.1\tlocalhost {}\n::1\tlocalhost ip6-localhost\n",
                host_names(name)
            );
            for (other_id, other_name, addresses) in &members {
                if other_id == id {
                    continue;
                }
                if let Some((_, address)) = addresses
                    .iter()
                    .find(|(network, _)| own.iter().any(|(mine, _)| mine == network))
                {
                    text.push_str(&format!("{address}\t{}\n", host_names(other_name)));
                }
            }
            let Ok(path) = self.cx.state.container_dir(id).map(|dir| dir.join("hosts")) else {
                continue;
            };
            if path.exists()
                && let Err(err) = write_in_place(&path, text)
            {
                tracing::warn!(error = %err, "cannot write hosts file");
            }
        }
    }
}

/// The networks a service's own container attaches to, and the host ports
/// it publishes on the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PreparedNetwork {
    networks: Vec<String>,
    ports: Vec<PortMapping>,
}

impl PreparedNetwork {
    fn of(service: &pb::ServiceSpec, supersedes: &[String]) -> Self {
        Self {
            networks: if service.networks.is_empty() {
                vec![default_network()]
            } else {
                service.networks.clone()
            },
            // The old release holds the host ports until it goes.
            ports: if supersedes.is_empty() {
                declared_ports(service)
            } else {
                Vec::new()
            },
        }
    }
}

/// The failure of a shared pull, as the error of one service.
fn image_failure(image: &str, err: &MonitorError) -> RuntimeError {
    RuntimeError::Registry {
        image: image.to_owned(),
        transient: err.is_transient_pull(),
        reason: match err {
            MonitorError::Image(inner) => inner.to_string(),
            other => other.to_string(),
        },
    }
}

/// The bind mounts of a container's stored spec.
fn spec_binds(info: &ContainerInfo) -> Vec<(PathBuf, String, bool)> {
    info.spec
        .iter()
        .flat_map(|spec| spec.binds())
        .map(|(source, target)| (PathBuf::from(source), target.to_owned(), false))
        .collect()
}

/// The ports a service's descriptor publishes.
pub(super) fn declared_ports(service: &pb::ServiceSpec) -> Vec<PortMapping> {
    service
        .ports
        .iter()
        .map(|p| PortMapping {
            host_port: u16::try_from(p.host_port).unwrap_or(0),
            container_port: u16::try_from(p.container_port).unwrap_or(0),
            protocol: if p.protocol() == pb::Protocol::Udp {
                "udp".into()
            } else {
                "tcp".into()
            },
        })
        .collect()
}
