//! Containers: create (with their writable snapshot), label, list and
//! remove. Their tasks are in `tasks.rs`.

use std::{collections::HashMap, time::Duration};

use containerd_client::services::v1::{
    Container, CreateContainerRequest, DeleteContainerRequest, ListContainersRequest,
    UpdateContainerRequest,
    container::Runtime,
    containers_client::ContainersClient,
    snapshots::{PrepareSnapshotRequest, snapshots_client::SnapshotsClient},
};

use super::{Containerd, NewContainer, RuntimeError};

/// A container as containerd lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Its id.
    pub id: String,
    /// The image it was created from.
    pub image: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its OCI runtime spec, when it is JSON.
    pub spec: Option<serde_json::Value>,
}

impl ContainerInfo {
    /// The network namespace path the container's spec joins, if any.
    pub fn netns_path(&self) -> Option<std::path::PathBuf> {
        self.spec
            .as_ref()?
            .pointer("/linux/namespaces")?
            .as_array()?
            .iter()
            .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
            .get("path")?
            .as_str()
            .filter(|path| !path.is_empty())
            .map(std::path::PathBuf::from)
    }

    /// The environment of the container's process.
    pub fn env(&self) -> Vec<String> {
        self.spec
            .as_ref()
            .and_then(|spec| spec.pointer("/process/env"))
            .and_then(|env| env.as_array())
            .map(|env| {
                env.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The state of a container's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// No task.
    Absent,
    /// Created, not started.
    Created,
    /// Running, with this pid.
    Running(u32),
    /// Exited with this status; the task still exists.
    Stopped(u32),
    /// Paused or pausing.
    Paused,
}

/// A task exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExit {
    /// The container.
    pub container_id: String,
    /// Its exit status.
    pub exit_status: u32,
}

const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

impl Containerd {
    /// Creates a container with its own writable snapshot on top of its
    /// image's.
    #[tracing::instrument(name = "containerd.create_container", skip_all, fields(otel.kind = "client", container = %container.id))]
    pub async fn create_container(&self, container: NewContainer<'_>) -> Result<(), RuntimeError> {
        // Under a lease until the container record references the snapshot.
        let lease = self.create_lease().await?;
        let result = self.create_container_within_lease(container, &lease).await;
        self.delete_lease(&lease).await;
        result
    }

    async fn create_container_within_lease(
        &self,
        NewContainer {
            id,
            image,
            top_snapshot,
            spec,
            labels,
        }: NewContainer<'_>,
        lease: &str,
    ) -> Result<(), RuntimeError> {
        let channel = self.channel().await?;
        let prepared = SnapshotsClient::new(channel.clone())
            .prepare(self.leased(
                PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: id.to_owned(),
                    parent: top_snapshot.to_owned(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await;
        // One left over from an earlier attempt is reused.
        RuntimeError::unless(prepared, "Snapshots.Prepare", tonic::Code::AlreadyExists)?;
        let spec = serde_json::to_vec(spec).map_err(|err| RuntimeError::InvalidImage {
            image: image.to_owned(),
            reason: format!("runtime spec does not encode: {err}"),
        })?;
        let container = Container {
            id: id.to_owned(),
            labels,
            image: image.to_owned(),
            runtime: Some(Runtime {
                name: RUNTIME.to_owned(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE.to_owned(),
                value: spec,
            }),
            snapshotter: self.snapshotter.clone(),
            snapshot_key: id.to_owned(),
            ..Container::default()
        };
        ContainersClient::new(channel)
            .create(self.leased(
                CreateContainerRequest {
                    container: Some(container),
                },
                lease,
            ))
            .await
            .map_err(RuntimeError::call("Containers.Create"))?;
        Ok(())
    }

    /// Removes container `id`: its task (stopped within `grace`), the
    /// container and its snapshot. Missing parts are fine.
    #[tracing::instrument(name = "containerd.remove_container", skip_all, fields(otel.kind = "client", container = %id))]
    pub async fn remove_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.stop_task(id, grace).await?;
        let mut containers = ContainersClient::new(self.channel().await?);
        let answer = containers
            .delete(self.request(DeleteContainerRequest { id: id.to_owned() }))
            .await;
        RuntimeError::unless(answer, "Containers.Delete", tonic::Code::NotFound)?;
        self.remove_snapshot(id).await
    }

    /// Sets label `key` of container `id` to `value`, or removes it.
    pub async fn set_label(
        &self,
        id: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), RuntimeError> {
        let mut labels = HashMap::new();
        if let Some(value) = value {
            labels.insert(key.to_owned(), value.to_owned());
        }
        ContainersClient::new(self.channel().await?)
            .update(self.request(UpdateContainerRequest {
                container: Some(Container {
                    id: id.to_owned(),
                    labels,
                    ..Container::default()
                }),
                update_mask: Some(super::label_mask(key)),
            }))
            .await
            .map_err(RuntimeError::call("Containers.Update"))?;
        Ok(())
    }

    /// The containers whose labels match every `key=value` in `labels`.
    pub async fn list_containers(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let filter = labels
            .iter()
            .map(|(key, value)| format!("labels.\"{key}\"=={value}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut containers = ContainersClient::new(self.channel().await?);
        let response = containers
            .list(self.request(ListContainersRequest {
                filters: if filter.is_empty() {
                    Vec::new()
                } else {
                    vec![filter]
                },
            }))
            .await
            .map_err(RuntimeError::call("Containers.List"))?
            .into_inner();
        Ok(response
            .containers
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id,
                image: c.image,
                labels: c.labels,
                spec: c
                    .spec
                    .and_then(|spec| serde_json::from_slice(&spec.value).ok()),
            })
            .collect())
    }
}
