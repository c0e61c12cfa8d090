//! What a pass works with and never changes (containerd, the networks,
//! the state dir, the options, the node's id) and the container operations
//! that addon services and core components share: a container's runtime
//! spec and generated files, its task created with its host paths pinned,
//! its removal with everything it had on the host, its log rotated. Nothing
//! here reads or writes what the reconciler remembers, and nothing here
//! calls back into `services.rs` or `swap.rs`.

use std::path::{Path, PathBuf};

use oakestra_addons_proto::engine::v1 as pb;

use super::ReconcileOptions;
use crate::{
    error::MonitorError,
    network::Network,
    runtime::{PulledImage, RunSpec, Runtime, RuntimeError},
    state_dir::StateDir,
};

/// The reconciler's context.
pub(super) struct Context<R: Runtime, N: Network> {
    pub(super) runtime: R,
    pub(super) networks: N,
    pub(super) state: StateDir,
    pub(super) options: ReconcileOptions,
    pub(super) node_id: String,
}

impl<R: Runtime, N: Network> Context<R, N> {
    /// The container id of a service of this plane: `<plane>_<service>`.
    pub(super) fn container_id(&self, service: &str) -> String {
        format!("{}_{service}", self.options.plane)
    }

    /// Rotates container `id`'s log when it grew past `--log-max-bytes`.
    pub(super) fn rotate_log_of(&self, id: &str) {
        let rotated = self
            .state
            .log(id)
            .map_err(std::io::Error::other)
            .and_then(|log| rotate_log(&log, self.options.log_max_bytes));
        if let Err(err) = rotated {
            tracing::warn!(container = %id, error = %err, "cannot rotate log");
        }
    }

    /// Creates container `id`'s task with its host-path `binds` held to
    /// what was checked (see [`crate::host_paths`]): opened without links
    /// before, and found mounted in the created task after, or the task is
    /// deleted and the service refused.
    pub(super) async fn create_task_pinned(
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
}

/// The names a service is known by in hosts files: its own name and, when
/// that is not a DNS name, its DNS alias (`service_manager service-manager`).
pub(super) fn host_names(name: &str) -> String {
    let alias = addons_descriptor::dns_alias(name);
    if alias == name {
        alias
    } else {
        format!("{name} {alias}")
    }
}

pub(super) fn ensure_dir(dir: Option<&Path>) -> Result<(), MonitorError> {
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
pub(super) fn write_in_place(path: &Path, text: String) -> Result<(), MonitorError> {
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

/// The network a service joins when it names none.
pub(super) fn default_network() -> String {
    "oakestra".to_owned()
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
