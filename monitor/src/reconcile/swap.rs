//! Core components: the static ones the monitor creates from its file, the
//! swap (a replacement takes a core component over), and the restore.
//!
//! A swap keeps the core container, labels it `oakestra.io/replaced-by`,
//! stops its task and publishes the replacement's ports from its network
//! namespace; a swap record under the state dir holds the ports to put back.
//! The record is written before the label, so a swap whose record cannot be
//! written does not happen.

use std::{collections::HashMap, time::Instant};

use oakestra_addons_proto::engine::v1 as pb;

use super::{Reconciler, context::default_network};
use crate::{
    cores::{self, CoreComponentSpec},
    error::MonitorError,
    labels::{CORE_COMPONENT, CORE_SOURCE, CORE_SOURCE_STATIC, CORE_SPEC_HASH, PLANE, REPLACED_BY},
    network::Network,
    network::PortMapping,
    plan::{CoreMemory, replacement_id},
    pull_tasks::PullState,
    runtime::{ContainerInfo, PulledImage, Runtime, RuntimeError, TaskState, build_spec},
    state_dir::{StateDir, StateDirError},
};

/// Starts of a core component the monitor keeps running.
#[derive(Debug, Clone, Copy)]
pub(super) struct CoreStarts {
    /// Starts in a row that did not last.
    count: usize,
    /// Last start.
    last: Instant,
    /// Earliest next start.
    next: Instant,
}

impl CoreStarts {
    pub(super) fn memory(&self) -> CoreMemory {
        CoreMemory {
            next_start: Some(self.next),
        }
    }
}

/// What a swap keeps to undo it: the ports the core component published
/// before its replacement changed them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SwapRecord {
    installation_id: String,
    ports: Vec<PortMapping>,
}

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// Creates the containers of the static core components that have none
    /// (or one made from an older entry), and removes static ones no longer
    /// in the file. Does not start them. Returns whether anything changed.
    pub(super) async fn ensure_static_cores(
        &mut self,
        all: &[ContainerInfo],
    ) -> Result<bool, MonitorError> {
        let mut changed = false;
        for container in all {
            let Some(name) = container.labels.get(CORE_COMPONENT) else {
                continue;
            };
            if container.labels.get(CORE_SOURCE).map(String::as_str) == Some(CORE_SOURCE_STATIC)
                && !container.labels.contains_key(REPLACED_BY)
                && !self.static_names.contains(name)
            {
                tracing::info!(container = %container.id, "removing a core component no longer in the core-components file");
                self.cx.remove(&container.id).await?;
                self.core_starts.remove(&container.id);
                changed = true;
            }
        }
        for spec in self.cx.options.core_components.clone() {
            let id = self.cx.container_id(&spec.name);
            if let Some(container) = all.iter().find(|c| c.id == id) {
                if container.labels.get(CORE_SOURCE).map(String::as_str) != Some(CORE_SOURCE_STATIC)
                {
                    // Someone else's container has the id: leave it alone.
                    continue;
                }
                if container.labels.get(CORE_SPEC_HASH) == Some(&spec.hash())
                    || container.labels.contains_key(REPLACED_BY)
                {
                    continue;
                }
                tracing::info!(container = %id, "core component changed in the file; recreating it");
                self.cx.remove(&id).await?;
                changed = true;
            }
            let pulled = match self.pulls.get(&spec.image) {
                PullState::Ready(pulled) => pulled,
                PullState::Running(_) => continue,
                PullState::Failed(err) => {
                    tracing::warn!(container = %id, error = %err, "cannot pull core component; retrying");
                    continue;
                }
            };
            match self.create_static_core(&spec, &id, &pulled).await {
                Ok(()) => changed = true,
                Err(err) if err.is_unavailable() => return Err(err),
                Err(err) => {
                    tracing::warn!(container = %id, error = %err, "cannot create core component; retrying");
                }
            }
        }
        Ok(changed)
    }

    async fn create_static_core(
        &mut self,
        spec: &CoreComponentSpec,
        id: &str,
        pulled: &PulledImage,
    ) -> Result<(), MonitorError> {
        let service = pb::ServiceSpec {
            service_name: spec.name.clone(),
            image: spec.image.clone(),
            command: spec.command.args(),
            environment: spec
                .environment
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        };
        let mut run = self.cx.run_spec("core", &service, id, pulled)?;
        let networks = if spec.networks.is_empty() {
            vec![default_network()]
        } else {
            spec.networks.clone()
        };
        self.cx
            .networks
            .attach(id, &networks, &spec.port_mappings())
            .await?;
        run.netns = Some(self.cx.networks.netns_path(id)?);
        let oci = build_spec(&run, self.cx.runtime.namespace()).map_err(|reason| {
            RuntimeError::InvalidImage {
                image: spec.image.clone(),
                reason,
            }
        })?;
        let labels = HashMap::from([
            (CORE_COMPONENT.to_owned(), spec.name.clone()),
            (CORE_SOURCE.to_owned(), CORE_SOURCE_STATIC.to_owned()),
            (CORE_SPEC_HASH.to_owned(), spec.hash()),
            (PLANE.to_owned(), self.cx.options.plane.clone()),
        ]);
        if let Err(err) = self
            .cx
            .runtime
            .create_container(crate::runtime::NewContainer {
                id,
                image: &spec.image,
                top_snapshot: &pulled.top_snapshot,
                spec: &oci,
                labels,
            })
            .await
        {
            if let Err(cleanup) = self.cx.remove(id).await {
                tracing::warn!(container = %id, error = %cleanup, "cannot clean up a core component that failed to be created");
            }
            return Err(err.into());
        }
        tracing::info!(container = %id, "created core component");
        Ok(())
    }

    /// Stops core component `core` for `installation`'s replacement: writes
    /// the swap record, labels it replaced (its container and snapshot
    /// stay), stops its task gracefully, and publishes the inherited ports
    /// merged with the replacement's `declared` ones from its namespace.
    pub(super) async fn take_over(
        &mut self,
        core: &ContainerInfo,
        installation: &str,
        declared: &[PortMapping],
    ) -> Result<(), MonitorError> {
        let record_path = self.cx.state.swap_record(&core.id)?;
        if core.labels.get(REPLACED_BY).map(String::as_str) != Some(installation) {
            if StateDir::read_json::<SwapRecord>(&record_path)
                .ok()
                .flatten()
                .is_none()
            {
                let record = SwapRecord {
                    installation_id: installation.to_owned(),
                    ports: self.original_ports(core)?,
                };
                StateDir::write_json(&record_path, &record)?;
            }
            self.cx
                .runtime
                .set_label(&core.id, REPLACED_BY, Some(installation))
                .await?;
            tracing::info!(container = %core.id, %installation, "replacing core component");
        }
        match self.cx.runtime.task_state(&core.id).await? {
            TaskState::Absent => {}
            TaskState::Stopped(_) => self.cx.runtime.delete_task(&core.id).await?,
            _ => {
                self.cx
                    .runtime
                    .stop_task(&core.id, self.cx.options.stop_grace)
                    .await?;
            }
        }
        self.core_starts.remove(&core.id);
        let ports = cores::merge_ports(&self.original_ports(core)?, declared);
        if !self.cx.networks.addresses(&core.id)?.is_empty()
            && let Err(err) = self.cx.networks.set_ports(&core.id, &ports).await
        {
            tracing::warn!(container = %core.id, error = %err, "cannot publish the replacement's ports");
        }
        Ok(())
    }

    /// The ports core component `core` published before any swap: from its
    /// swap record, else (not swapped yet) from its attachment. A corrupt
    /// record of a static core component is rebuilt from its entry in the
    /// file; of any other, it is an error naming the file.
    fn original_ports(&self, core: &ContainerInfo) -> Result<Vec<PortMapping>, MonitorError> {
        let path = self.cx.state.swap_record(&core.id)?;
        match StateDir::read_json::<SwapRecord>(&path) {
            Ok(Some(record)) => Ok(record.ports),
            Ok(None) => Ok(self.cx.networks.ports(&core.id)?),
            Err(err @ StateDirError::Corrupt { .. }) => {
                let name = core.labels.get(CORE_COMPONENT);
                let spec = self
                    .cx
                    .options
                    .core_components
                    .iter()
                    .find(|s| Some(&s.name) == name)
                    .filter(|_| {
                        core.labels.get(CORE_SOURCE).map(String::as_str) == Some(CORE_SOURCE_STATIC)
                    });
                match spec {
                    Some(spec) => {
                        tracing::warn!(error = %err, "rebuilt the swap record from the core-components file");
                        Ok(spec.port_mappings())
                    }
                    None => Err(err.into()),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Runs core component `core`: stops its replacement's live task
    /// first (and goes no further if that fails), undoes the swap when
    /// `restore`, and starts it when `start`.
    pub(super) async fn run_core(
        &mut self,
        core: &ContainerInfo,
        stop_first: Option<&str>,
        restore: bool,
        start: bool,
    ) -> Result<(), MonitorError> {
        // The core's task is made before its replacement stops, as a
        // swap prepares the replacement: only its start lies in the gap on
        // the port. Made, not started, it runs nothing and holds no port;
        // if it cannot be made, the replacement keeps running.
        if start && stop_first.is_some() {
            self.prepare_core(&core.id).await?;
            crate::crash::point("restore:core-prepared");
        }
        // Never both running: the replacement's task goes first (it shares
        // the network namespace, and the ports).
        if let Some(replacement) = stop_first {
            self.cx
                .runtime
                .stop_task(replacement, self.cx.options.stop_grace)
                .await?;
        }
        if restore {
            crate::crash::point("restore:replacement-stopped");
            match self.original_ports(core) {
                Ok(ports) => {
                    if !self.cx.networks.addresses(&core.id)?.is_empty() {
                        self.cx.networks.set_ports(&core.id, &ports).await?;
                    }
                }
                // The core component comes back all the same, with the
                // ports it has now.
                Err(err) => {
                    tracing::error!(container = %core.id, error = %err, "cannot put the core component's ports back");
                }
            }
        }
        if start {
            self.start_core(&core.id).await?;
        }
        if restore {
            crate::crash::point("restore:core-started");
            self.cx
                .runtime
                .set_label(&core.id, REPLACED_BY, None)
                .await?;
            StateDir::remove(&self.cx.state.swap_record(&core.id)?)?;
            tracing::info!(container = %core.id, "restored core component");
            // The replacement of any release.
            let replacement = replacement_id(&core.id);
            for (_, tracked) in self
                .tracked
                .iter_mut()
                .filter(|(id, _)| id.starts_with(replacement.as_str()))
            {
                if tracked.status.phase() == pb::ServicePhase::Failed
                    && !tracked.status.reason.contains("restored")
                {
                    let reason = format!(
                        "{}; replaced core component {} restored",
                        tracked.status.reason, core.id
                    );
                    tracked.set(pb::ServicePhase::Failed, reason);
                }
            }
        }
        Ok(())
    }

    /// Makes a core component's task, not started, unless it has one
    /// made already.
    async fn prepare_core(&mut self, id: &str) -> Result<(), MonitorError> {
        if self.cx.runtime.task_state(id).await? == TaskState::Created {
            return Ok(());
        }
        let log = self.cx.state.log(id)?;
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|err| StateDirError::Io {
                action: "creating",
                path: dir.to_owned(),
                err,
            })?;
        }
        self.cx.runtime.delete_task(id).await?;
        let _pid = self.cx.runtime.create_task(id, &log).await?;
        Ok(())
    }

    /// Starts a core component's task, counting starts for its backoff.
    async fn start_core(&mut self, id: &str) -> Result<(), MonitorError> {
        self.prepare_core(id).await?;
        self.cx.runtime.start_created_task(id).await?;
        let now = Instant::now();
        let count = match self.core_starts.get(id) {
            // It ran longer than the longest backoff: a fresh start.
            Some(starts)
                if now.duration_since(starts.last) <= self.cx.options.restart.backoff.max() =>
            {
                starts.count + 1
            }
            _ => 0,
        };
        self.core_starts.insert(
            id.to_owned(),
            CoreStarts {
                count,
                last: now,
                next: now + self.cx.options.restart.delay(count),
            },
        );
        tracing::info!(container = %id, "started core component");
        Ok(())
    }
}
