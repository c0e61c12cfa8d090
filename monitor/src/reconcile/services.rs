//! Addon containers: made from a pulled image, a runtime spec and their
//! networks; started; removed with everything they had on the host.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use oakestra_addons_proto::engine::v1::{self as pb, ServicePhase};

use super::Reconciler;
use crate::{
    cores,
    error::MonitorError,
    labels::{
        ADDON, INSTALLATION, MANAGED_BY, MANAGED_BY_VALUE, PLANE, RELEASE, REPLACES, SERVICE,
    },
    network::Network,
    network::PortMapping,
    pull_tasks::PullState,
    runtime::{ContainerInfo, PulledImage, RunSpec, Runtime, RuntimeError, build_spec},
    state_dir::StateDir,
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
        let mut run = self.run_spec(installation_id, service, id, &pulled)?;
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
                let networks = if service.networks.is_empty() {
                    vec![default_network()]
                } else {
                    service.networks.clone()
                };
                // The old release holds the host ports until it goes.
                let first = if supersedes.is_empty() {
                    ports.as_slice()
                } else {
                    &[]
                };
                self.networks.attach(id, &networks, first).await?;
                run.netns = Some(self.networks.netns_path(id)?);
            }
        }
        self.write_hosts(installation_id);
        let spec = build_spec(&run, self.runtime.namespace()).map_err(|reason| {
            RuntimeError::InvalidImage {
                image: image.to_owned(),
                reason,
            }
        })?;
        let mut labels = HashMap::from([
            (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
            (INSTALLATION.to_owned(), installation_id.to_owned()),
            (SERVICE.to_owned(), name.to_owned()),
            (PLANE.to_owned(), self.options.plane.clone()),
            (ADDON.to_owned(), installation.marketplace_id.clone()),
            (RELEASE.to_owned(), installation.release.max(1).to_string()),
        ]);
        if let Some(core) = core {
            labels.insert(REPLACES.to_owned(), core.id.clone());
        }
        let log = self.state.log(id)?;
        ensure_dir(log.parent())?;
        let created = async {
            self.runtime
                .create_container(id, image, &pulled.top_snapshot, &spec, labels)
                .await?;
            self.create_task_pinned(id, &log, &run.binds).await?;
            // Prepared, not started: a monitor that stops from here on
            // finds it STARTING, and its first start is no restart.
            self.persist(id);
            if !supersedes.is_empty() {
                crate::crash::point("upgrade:prepared");
                for old in supersedes {
                    self.remove(old).await?;
                }
                tracing::info!(container = %id, old = ?supersedes, "took over from the service's other releases");
                crate::crash::point("upgrade:old-removed");
                if core.is_none() {
                    self.networks.set_ports(id, &ports).await?;
                }
            }
            if let Some(core) = core {
                crate::crash::point("swap:prepared");
                self.take_over(core, installation_id, &ports).await?;
                crate::crash::point("swap:core-stopped");
            }
            self.runtime.start_created_task(id).await?;
            Ok::<(), MonitorError>(())
        }
        .await;
        if let Err(err) = created {
            if let Err(cleanup) = self.remove(id).await {
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
            && !self.networks.addresses(id)?.is_empty()
        {
            // Prepared while another release held the ports, and the
            // monitor stopped before they moved over: they move now.
            let ports = declared_ports(spec);
            if self.networks.ports(id)? != ports {
                self.networks.set_ports(id, &ports).await?;
            }
        }
        let log = self.state.log(id)?;
        ensure_dir(log.parent())?;
        match self.runtime.task_state(id).await? {
            crate::runtime::TaskState::Created if !restart => {
                self.runtime.start_created_task(id).await?;
            }
            _ => {
                self.runtime.delete_task(id).await?;
                // The binds of the container's own spec: what runc will
                // mount, checked again, since an addon may have changed
                // what lies beneath a host path since the last start.
                let binds = self
                    .runtime
                    .list_containers()
                    .await?
                    .iter()
                    .find(|info| info.id == id)
                    .map(spec_binds)
                    .unwrap_or_default();
                self.create_task_pinned(id, &log, &binds).await?;
                self.runtime.start_created_task(id).await?;
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

    /// Creates container `id`'s task with its host-path `binds` held to
    /// what was checked (see [`crate::host_paths`]): opened without links
    /// before, and found mounted in the created task after, or the task is
    /// deleted and the service refused.
    async fn create_task_pinned(
        &self,
        id: &str,
        log: &Path,
        binds: &[(PathBuf, String, bool)],
    ) -> Result<(), MonitorError> {
        let pinned = crate::host_paths::pin(host_binds(binds, self.state.root()))
            .map_err(crate::admission::Refusal::HostPath)?;
        let pid = self.runtime.create_task(id, log).await?;
        if let Err(err) = pinned.verify(pid) {
            self.runtime.delete_task(id).await?;
            return Err(crate::admission::Refusal::HostPath(err).into());
        }
        Ok(())
    }

    /// Stops and removes a container, its network attachments and files.
    pub(super) async fn remove(&self, id: &str) -> Result<(), MonitorError> {
        self.runtime
            .remove_container(id, self.options.stop_grace)
            .await?;
        self.networks.detach(id).await?;
        let dir = self.state.container_dir(id)?;
        if dir.exists()
            && let Err(err) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(path = %dir.display(), error = %err, "cannot remove container files");
        }
        Ok(())
    }

    /// The runtime spec of a service: the image's process, the
    /// descriptor's command and environment, generated files and volumes.
    pub(super) fn run_spec(
        &self,
        installation: &str,
        service: &pb::ServiceSpec,
        id: &str,
        pulled: &PulledImage,
    ) -> Result<RunSpec, MonitorError> {
        let invalid = |reason: String| {
            MonitorError::Image(RuntimeError::InvalidImage {
                image: service.image.clone(),
                reason,
            })
        };
        let mut args = pulled.config.entrypoint.clone();
        args.extend(if service.command.is_empty() {
            pulled.config.cmd.clone()
        } else {
            service.command.clone()
        });
        if args.is_empty() {
            return Err(invalid(
                "nothing to run: no entrypoint, cmd or command".into(),
            ));
        }
        let mut env: Vec<String> = pulled.config.env.clone();
        for (key, value) in &service.environment {
            env.retain(|entry| !entry.starts_with(&format!("{key}=")));
            env.push(format!("{key}={value}"));
        }
        let files = self.state.container_dir(id)?;
        ensure_dir(Some(&files))?;
        // Bind-mounted into the container: written in place, never renamed.
        let hosts = files.join("hosts");
        write_in_place(
            &hosts,
            format!(
                "127.0.0.1\tlocalhost {names}\n::1\tlocalhost ip6-localhost\n",
                names = host_names(&service.service_name)
            ),
        )?;
        let resolv = files.join("resolv.conf");
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        write_in_place(&resolv, host_resolv)?;
        let mut binds = vec![
            (hosts, "/etc/hosts".to_owned(), true),
            (resolv, "/etc/resolv.conf".to_owned(), true),
        ];
        for mount in &service.mounts {
            let source = match &mount.source {
                Some(pb::mount::Source::HostPath(path)) => PathBuf::from(path),
                Some(pb::mount::Source::Volume(name)) => {
                    let dir = self.state.volume(installation, name)?;
                    ensure_dir(Some(&dir))?;
                    // The container's user, whoever it is, may enter it.
                    set_mode(&dir, 0o755)?;
                    dir
                }
                _ => return Err(invalid(format!("bad mount of `{}`", mount.target))),
            };
            binds.push((source, mount.target.clone(), mount.read_only));
        }
        Ok(RunSpec {
            id: id.to_owned(),
            // The kernel takes any hostname; resolvers and many programs
            // take only DNS names.
            hostname: addons_descriptor::dns_alias(&service.service_name),
            args,
            env,
            cwd: pulled.config.working_dir.clone(),
            binds,
            privileged: service.privileged,
            netns: None,
            user: pulled.config.user.clone(),
            limits: addons_descriptor::Resources::default(),
        })
    }

    /// Rewrites the hosts files of an installation's containers, in place
    /// (they are bind-mounted), so services on a shared network reach each
    /// other by service name.
    fn write_hosts(&self, installation: &str) {
        // (container id, service name, (network, address) pairs)
        type Member<'a> = (&'a str, &'a str, Vec<(String, String)>);
        let addresses = |id: &str| {
            self.networks.addresses(id).unwrap_or_else(|err| {
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
            let Ok(path) = self.state.container_dir(id).map(|dir| dir.join("hosts")) else {
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

/// The names a service is known by in hosts files: its own name and, when
/// that is not a DNS name, its DNS alias (`service_manager service-manager`).
fn host_names(name: &str) -> String {
    let alias = addons_descriptor::dns_alias(name);
    if alias == name {
        alias
    } else {
        format!("{name} {alias}")
    }
}

/// The failure of a shared pull, as the error of one service.
fn image_failure(image: &str, err: &MonitorError) -> RuntimeError {
    RuntimeError::Registry {
        image: image.to_owned(),
        reason: match err {
            MonitorError::Image(inner) => inner.to_string(),
            other => other.to_string(),
        },
    }
}

fn ensure_dir(dir: Option<&Path>) -> Result<(), MonitorError> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|err| crate::state_dir::StateDirError::Io {
            action: "creating",
            path: dir.to_owned(),
            err,
        })?;
    }
    Ok(())
}

/// Writes a file bind-mounted into a container (hosts, resolv.conf), which
/// the container's user, whoever it is, reads: 0644 under the monitor's
/// umask of 077.
fn write_in_place(path: &Path, text: String) -> Result<(), MonitorError> {
    std::fs::write(path, text).map_err(|err| {
        MonitorError::StateDir(crate::state_dir::StateDirError::Io {
            action: "writing",
            path: path.to_owned(),
            err,
        })
    })?;
    set_mode(path, 0o644)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), MonitorError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|err| {
        MonitorError::StateDir(crate::state_dir::StateDirError::Io {
            action: "setting the mode of",
            path: path.to_owned(),
            err,
        })
    })
}

/// The binds of a run spec that come from the host, not from the state
/// dir (generated files, named volumes): the granted host paths.
fn host_binds<'a>(
    binds: &'a [(PathBuf, String, bool)],
    state: &'a Path,
) -> impl Iterator<Item = (&'a Path, &'a str)> {
    binds
        .iter()
        .filter(move |(source, _, _)| !source.starts_with(state))
        .map(|(source, target, _)| (source.as_path(), target.as_str()))
}

/// The bind mounts of a container's stored spec.
fn spec_binds(info: &ContainerInfo) -> Vec<(PathBuf, String, bool)> {
    let mounts = info
        .spec
        .as_ref()
        .and_then(|spec| spec.pointer("/mounts"))
        .and_then(|mounts| mounts.as_array());
    mounts
        .into_iter()
        .flatten()
        .filter(|m| m.get("type").and_then(|t| t.as_str()) == Some("bind"))
        .filter_map(|m| {
            let source = m.get("source")?.as_str()?;
            let target = m.get("destination")?.as_str()?;
            Some((PathBuf::from(source), target.to_owned(), false))
        })
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

/// The network a service joins when it names none.
pub(super) fn default_network() -> String {
    "oakestra".to_owned()
}

/// Rotates container `id`'s log when it grew past `max_bytes`.
pub(super) fn rotate_log_of(state: &StateDir, id: &str, max_bytes: u64) {
    let rotated = state
        .log(id)
        .map_err(std::io::Error::other)
        .and_then(|log| rotate_log(&log, max_bytes));
    if let Err(err) = rotated {
        tracing::warn!(container = %id, error = %err, "cannot rotate log");
    }
}

/// Keeps a log under `max_bytes`: past it, the log is copied to `.1`
/// (replacing the previous one) and truncated in place. The shim appends
/// (`O_APPEND`), so it goes on writing at the new end; lines written between
/// the copy and the truncation are lost, as with logrotate's copytruncate.
fn rotate_log(path: &Path, max_bytes: u64) -> std::io::Result<bool> {
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err),
    };
    if size <= max_bytes {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    std::fs::copy(path, PathBuf::from(rotated))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// The last `lines` lines of a log file.
pub(super) fn tail(path: &Path, lines: usize) -> Vec<String> {
    crate::state_dir::tail(path, lines).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_logs_past_the_cap() {
        let dir = std::env::temp_dir().join(format!("rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("root_x.log");
        assert!(!rotate_log(&log, 10).unwrap(), "no log, nothing to do");
        std::fs::write(&log, "0123456789").unwrap();
        assert!(!rotate_log(&log, 10).unwrap(), "at the cap is fine");
        std::fs::write(&log, "0123456789abc\n").unwrap();
        assert!(rotate_log(&log, 10).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("root_x.log.1")).unwrap(),
            "0123456789abc\n"
        );
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(tail(&dir.join("root_x.log.1"), 1), ["0123456789abc"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
