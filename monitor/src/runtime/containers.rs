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
    /// What the monitor reads of its OCI runtime spec, when it is JSON.
    pub spec: Option<StoredSpec>,
}

/// The parts of a container's stored OCI runtime spec the monitor reads;
/// the rest (the seccomp profile, tens of KiB) is skipped as it is parsed,
/// so listing many containers costs little memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct StoredSpec {
    #[serde(default)]
    process: Option<StoredProcess>,
    #[serde(default)]
    linux: Option<StoredLinux>,
    #[serde(default)]
    mounts: Option<Vec<StoredMount>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
struct StoredProcess {
    #[serde(default)]
    env: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
struct StoredLinux {
    #[serde(default)]
    namespaces: Option<Vec<StoredNamespace>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
struct StoredNamespace {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
struct StoredMount {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    destination: Option<String>,
}

impl StoredSpec {
    /// Reads a stored spec; `None` when it is not a JSON spec.
    pub fn parse(json: &[u8]) -> Option<Self> {
        serde_json::from_slice(json).ok()
    }

    /// Its bind mounts: (source, destination).
    pub fn binds(&self) -> impl Iterator<Item = (&str, &str)> {
        self.mounts
            .iter()
            .flatten()
            .filter(|m| m.kind.as_deref() == Some("bind"))
            .filter_map(|m| Some((m.source.as_deref()?, m.destination.as_deref()?)))
    }
}

impl ContainerInfo {
    /// The network namespace path the container's spec joins, if any.
    pub fn netns_path(&self) -> Option<std::path::PathBuf> {
        self.spec
            .as_ref()?
            .linux
            .as_ref()?
            .namespaces
            .as_ref()?
            .iter()
            .find(|ns| ns.kind.as_deref() == Some("network"))?
            .path
            .as_deref()
            .filter(|path| !path.is_empty())
            .map(std::path::PathBuf::from)
    }

    /// The environment of the container's process.
    pub fn env(&self) -> Vec<String> {
        self.spec
            .as_ref()
            .and_then(|spec| spec.process.as_ref())
            .and_then(|process| process.env.clone())
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
    /// When the task exited, as the shim that reaped it recorded.
    pub exited_at: Option<std::time::SystemTime>,
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
                spec: c.spec.and_then(|spec| StoredSpec::parse(&spec.value)),
            })
            .collect())
    }
}

#[cfg(test)]
mod spec_tests {
    use super::{ContainerInfo, StoredSpec};

    fn info(spec: &str) -> ContainerInfo {
        ContainerInfo {
            id: "c".into(),
            image: "i".into(),
            labels: Default::default(),
            spec: StoredSpec::parse(spec.as_bytes()),
        }
    }

    #[test]
    fn reads_env_network_namespace_and_binds_and_skips_the_rest() {
        let info = info(
            r#"{"ociVersion":"1.0.2",
                "process":{"args":["sh"],"env":["A=1","B=2"],"user":{"uid":0,"gid":0}},
                "linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/x"}],
                         "seccomp":{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}},
                "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                          {"destination":"/data","type":"bind","source":"/srv/data","options":["rbind"]},
                          {"destination":"/odd","type":"bind"}]}"#,
        );
        assert_eq!(info.env(), ["A=1", "B=2"]);
        assert_eq!(
            info.netns_path(),
            Some(std::path::PathBuf::from("/var/run/netns/x"))
        );
        let binds: Vec<_> = info.spec.as_ref().unwrap().binds().collect();
        assert_eq!(binds, [("/srv/data", "/data")]);
    }

    #[test]
    fn missing_or_null_parts_read_as_nothing() {
        for spec in [
            "{}",
            r#"{"process":null,"linux":null,"mounts":null}"#,
            r#"{"linux":{"namespaces":[{"type":"network","path":""}]}}"#,
        ] {
            let info = info(spec);
            assert!(info.spec.is_some(), "{spec}");
            assert!(info.env().is_empty(), "{spec}");
            assert_eq!(info.netns_path(), None, "{spec}");
            assert_eq!(info.spec.as_ref().unwrap().binds().count(), 0, "{spec}");
        }
        assert_eq!(info("not json").spec, None);
    }
}
