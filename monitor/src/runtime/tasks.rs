//! Tasks: create (with `file://` logs), start, inspect, stop, signal,
//! delete, and the stream of task exits.

use std::{path::Path, time::Duration};

use containerd_client::{
    services::v1::{
        CreateTaskRequest, DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest,
        GetContainerRequest, GetRequest, KillRequest, ListTasksRequest, PublishRequest,
        StartRequest, SubscribeRequest, WaitRequest,
        containers_client::ContainersClient,
        events_client::EventsClient,
        snapshots::{MountsRequest, snapshots_client::SnapshotsClient},
        tasks_client::TasksClient,
    },
    types::v1::Status as ProcessStatus,
};
use futures::{StreamExt as _, stream::BoxStream};
use prost::Message as _;

use super::{Containerd, RuntimeError, TaskExit, TaskState};

/// The type of an exec's process spec.
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

impl Containerd {
    /// Creates and starts the task of container `id`, its output appended
    /// to `log` (through the shim's `file://` log URI). Returns its pid.
    pub async fn start_task(&self, id: &str, log: &Path) -> Result<u32, RuntimeError> {
        self.create_task(id, log).await?;
        self.start_created_task(id).await
    }

    /// Creates container `id`'s task without starting it: the runtime has
    /// set up the process, which runs the moment
    /// [`Containerd::start_created_task`] is called.
    #[tracing::instrument(name = "containerd.create_task", skip_all, fields(otel.kind = "client", container = %id))]
    pub async fn create_task(&self, id: &str, log: &Path) -> Result<u32, RuntimeError> {
        let channel = self.channel().await?;
        let mounts = SnapshotsClient::new(channel.clone())
            .mounts(self.request(MountsRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.to_owned(),
            }))
            .await
            .map_err(RuntimeError::call("Snapshots.Mounts"))?
            .into_inner()
            .mounts;
        let uri = self.log_uri(log);
        let mut tasks = TasksClient::new(channel);
        let created = tasks
            .create(self.request(CreateTaskRequest {
                container_id: id.to_owned(),
                rootfs: mounts,
                stdout: uri.clone(),
                stderr: uri,
                ..CreateTaskRequest::default()
            }))
            .await
            .map_err(RuntimeError::call("Tasks.Create"))?;
        Ok(created.into_inner().pid)
    }

    /// Starts the created task of container `id`. Returns its pid.
    #[tracing::instrument(name = "containerd.start_created_task", skip_all, fields(otel.kind = "client", container = %id))]
    pub async fn start_created_task(&self, id: &str) -> Result<u32, RuntimeError> {
        let started = TasksClient::new(self.channel().await?)
            .start(self.request(StartRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .map_err(RuntimeError::call("Tasks.Start"))?;
        Ok(started.into_inner().pid)
    }

    /// The state of container `id`'s task.
    pub async fn task_state(&self, id: &str) -> Result<TaskState, RuntimeError> {
        let mut tasks = TasksClient::new(self.channel().await?);
        let response = match tasks
            .get(self.request(GetRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(TaskState::Absent),
            Err(status) => {
                return Err(RuntimeError::Call {
                    call: "Tasks.Get",
                    status,
                });
            }
        };
        let Some(process) = response.process else {
            return Ok(TaskState::Absent);
        };
        Ok(process_state(&process))
    }

    /// The state of every task of the namespace, by container id, in one
    /// call: a container missing from it has no task.
    pub async fn task_states(
        &self,
    ) -> Result<std::collections::HashMap<String, TaskState>, RuntimeError> {
        let mut tasks = TasksClient::new(self.channel().await?);
        let response = tasks
            .list(self.request(ListTasksRequest {
                filter: String::new(),
            }))
            .await
            .map_err(RuntimeError::call("Tasks.List"))?
            .into_inner();
        Ok(response
            .tasks
            .into_iter()
            .map(|process| {
                let state = process_state(&process);
                (process.id, state)
            })
            .collect())
    }

    /// Stops container `id`'s task: SIGTERM, up to `grace`, then SIGKILL;
    /// then deletes the task. A missing task is fine.
    #[tracing::instrument(name = "containerd.stop_task", skip_all, fields(otel.kind = "client", container = %id))]
    pub async fn stop_task(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let mut tasks = TasksClient::new(self.channel().await?);
        if let TaskState::Running(_) | TaskState::Paused | TaskState::Created =
            self.task_state(id).await?
        {
            let wait = {
                let mut tasks = tasks.clone();
                let request = self.request(WaitRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                });
                tokio::spawn(async move { tasks.wait(request).await })
            };
            self.kill(&mut tasks, id, 15).await?;
            if tokio::time::timeout(grace, wait).await.is_err() {
                self.kill(&mut tasks, id, 9).await?;
                let waited = tasks
                    .wait(self.request(WaitRequest {
                        container_id: id.to_owned(),
                        exec_id: String::new(),
                    }))
                    .await;
                if let Err(status) = waited
                    && status.code() != tonic::Code::NotFound
                {
                    return Err(RuntimeError::Call {
                        call: "Tasks.Wait",
                        status,
                    });
                }
            }
        }
        self.delete_task(id).await
    }

    /// Sends `signal` to container `id`'s task, without waiting.
    #[tracing::instrument(name = "containerd.signal_task", skip_all, fields(otel.kind = "client", container = %id))]
    pub async fn signal_task(&self, id: &str, signal: u32) -> Result<(), RuntimeError> {
        let mut tasks = TasksClient::new(self.channel().await?);
        self.kill(&mut tasks, id, signal).await
    }

    async fn kill(
        &self,
        tasks: &mut TasksClient<tonic::transport::Channel>,
        id: &str,
        signal: u32,
    ) -> Result<(), RuntimeError> {
        let answer = tasks
            .kill(self.request(KillRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal,
                all: true,
            }))
            .await;
        RuntimeError::unless(answer, "Tasks.Kill", tonic::Code::NotFound).map(drop)
    }

    /// Runs `args` in container `id`'s running task, as its process runs
    /// (user, environment, working directory, capabilities), without
    /// stdio, and returns its exit status. Past `timeout` the process is
    /// killed and the answer is [`RuntimeError::Exec`]. The exec is
    /// deleted either way.
    #[tracing::instrument(name = "containerd.exec", skip_all, fields(otel.kind = "client", container = %id))]
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<u32, RuntimeError> {
        let channel = self.channel().await?;
        let container = ContainersClient::new(channel.clone())
            .get(self.request(GetContainerRequest { id: id.to_owned() }))
            .await
            .map_err(RuntimeError::call("Containers.Get"))?
            .into_inner()
            .container
            .unwrap_or_default();
        let spec: serde_json::Value = container
            .spec
            .as_ref()
            .and_then(|any| serde_json::from_slice(&any.value).ok())
            .unwrap_or_default();
        let mut process = spec["process"].clone();
        if !process.is_object() {
            return Err(RuntimeError::Exec {
                container: id.to_owned(),
                reason: "the container's spec has no process".into(),
            });
        }
        process["args"] = serde_json::json!(args);
        process["terminal"] = serde_json::json!(false);
        let mut tasks = TasksClient::new(channel);
        tasks
            .exec(self.request(ExecProcessRequest {
                container_id: id.to_owned(),
                spec: Some(prost_types::Any {
                    type_url: PROCESS_TYPE.to_owned(),
                    value: serde_json::to_vec(&process).unwrap_or_default(),
                }),
                exec_id: exec_id.to_owned(),
                ..ExecProcessRequest::default()
            }))
            .await
            .map_err(RuntimeError::call("Tasks.Exec"))?;
        let ran = async {
            tasks
                .start(self.request(StartRequest {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                }))
                .await
                .map_err(RuntimeError::call("Tasks.Start"))?;
            let mut waiter = tasks.clone();
            let wait = waiter.wait(self.request(WaitRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            }));
            match tokio::time::timeout(timeout, wait).await {
                Ok(answer) => Ok(answer
                    .map_err(RuntimeError::call("Tasks.Wait"))?
                    .into_inner()
                    .exit_status),
                Err(_) => {
                    let _ = tasks
                        .kill(self.request(KillRequest {
                            container_id: id.to_owned(),
                            exec_id: exec_id.to_owned(),
                            signal: 9,
                            all: false,
                        }))
                        .await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        tasks.clone().wait(self.request(WaitRequest {
                            container_id: id.to_owned(),
                            exec_id: exec_id.to_owned(),
                        })),
                    )
                    .await;
                    Err(RuntimeError::Exec {
                        container: id.to_owned(),
                        reason: format!("did not finish within {timeout:?}; killed"),
                    })
                }
            }
        }
        .await;
        let _ = tasks
            .delete_process(self.request(DeleteProcessRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            }))
            .await;
        ran
    }

    /// Deletes container `id`'s (exited) task; a missing task is fine.
    #[tracing::instrument(name = "containerd.delete_task", skip_all, fields(otel.kind = "client", container = %id))]
    pub async fn delete_task(&self, id: &str) -> Result<(), RuntimeError> {
        let mut tasks = TasksClient::new(self.channel().await?);
        let answer = tasks
            .delete(self.request(DeleteTaskRequest {
                container_id: id.to_owned(),
            }))
            .await;
        RuntimeError::unless(answer, "Tasks.Delete", tonic::Code::NotFound).map(drop)
    }

    /// Task exits in the monitor's namespace, as containerd publishes them
    /// from now on. Returns once the subscription is known to be active:
    /// containerd sends a subscription's response headers only with its
    /// first event, so the monitor publishes a ping of its own on the
    /// subscription and waits for it to come back.
    pub async fn task_exits(
        &self,
    ) -> Result<BoxStream<'static, Result<TaskExit, RuntimeError>>, RuntimeError> {
        const PING: &str = "/oakestra/monitor/subscribed";
        let channel = self.channel().await?;
        let namespace = self.namespace.clone();
        let request = tonic::Request::new(SubscribeRequest {
            filters: vec![
                format!("namespace=={namespace},topic==\"/tasks/exit\""),
                format!("namespace=={namespace},topic==\"{PING}\""),
            ],
        });
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let (active_tx, active_rx) = tokio::sync::oneshot::channel::<Result<(), RuntimeError>>();
        let mut events = EventsClient::new(channel.clone());
        tokio::spawn(async move {
            let mut active = Some(active_tx);
            let mut stream = match events.subscribe(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    let err = RuntimeError::Call {
                        call: "Events.Subscribe",
                        status,
                    };
                    match active.take() {
                        Some(active) => {
                            let _ = active.send(Err(err));
                        }
                        None => {
                            let _ = tx.send(Err(err)).await;
                        }
                    }
                    return;
                }
            };
            while let Some(item) = stream.next().await {
                let envelope = match item {
                    Ok(envelope) => envelope,
                    Err(status) => {
                        let _ = tx
                            .send(Err(RuntimeError::Call {
                                call: "Events.Subscribe",
                                status,
                            }))
                            .await;
                        return;
                    }
                };
                if envelope.topic == PING {
                    if let Some(active) = active.take() {
                        let _ = active.send(Ok(()));
                    }
                    continue;
                }
                let Some(event) = envelope.event else {
                    continue;
                };
                let Ok(exit) = containerd_client::events::TaskExit::decode(event.value.as_slice())
                else {
                    continue;
                };
                // Exec processes exit too; only the container's own task matters.
                if exit.id != exit.container_id && !exit.id.is_empty() {
                    continue;
                }
                let exited_at = exit
                    .exited_at
                    .and_then(|t| std::time::SystemTime::try_from(t).ok());
                let exit = TaskExit {
                    container_id: exit.container_id,
                    exit_status: exit.exit_status,
                    exited_at,
                };
                if tx.send(Ok(exit)).await.is_err() {
                    return;
                }
            }
        });
        let mut publisher = EventsClient::new(channel);
        let ping = containerd_client::to_any(&containerd_client::events::TaskExit::default());
        let waiting = async {
            futures::pin_mut!(active_rx);
            loop {
                publisher
                    .publish(self.request(PublishRequest {
                        topic: PING.to_owned(),
                        event: Some(ping.clone()),
                    }))
                    .await
                    .map_err(RuntimeError::call("Events.Publish"))?;
                tokio::select! {
                    outcome = &mut active_rx => {
                        return outcome.unwrap_or_else(|_| Err(RuntimeError::Connect {
                            socket: self.socket.display().to_string(),
                            reason: "the event subscription ended".to_owned(),
                        }));
                    }
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .map_err(|_| RuntimeError::Connect {
                socket: self.socket.display().to_string(),
                reason: "the event subscription did not become active".to_owned(),
            })??;
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

/// What containerd says of a task's process, as the reconciler sees it.
fn process_state(process: &containerd_client::types::v1::Process) -> TaskState {
    match ProcessStatus::try_from(process.status).unwrap_or(ProcessStatus::Unknown) {
        ProcessStatus::Running => TaskState::Running(process.pid),
        ProcessStatus::Created => TaskState::Created,
        ProcessStatus::Stopped => TaskState::Stopped(process.exit_status),
        ProcessStatus::Paused | ProcessStatus::Pausing => TaskState::Paused,
        ProcessStatus::Unknown => TaskState::Absent,
    }
}
