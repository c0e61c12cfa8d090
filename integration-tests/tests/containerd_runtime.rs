//! The monitor's containerd layer against a real, private containerd and a
//! real registry: pull by digest and unpack, run, watch exits, stop, remove.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use addons_monitor::runtime::{Containerd, RegistryAccess, RunSpec, TaskState, build_spec};
use futures::StreamExt as _;
use integration_tests::{
    Containerd as ContainerdServer, RegistryServer, eventually,
    images::{ImageSpec, push_forged_image, push_image},
};

const NAMESPACE: &str = "oakestra-test";

#[tokio::test]
async fn pulls_runs_watches_and_removes() {
    let server = ContainerdServer::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let spec = ImageSpec {
        cmd: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hello-from-addon; exec /bin/busybox sleep 3600".into(),
        ],
        ..ImageSpec::default()
    };
    let (digest, _) = push_image(&host, "team/app", "1", &spec, None).await;
    let image = format!("{host}/team/app@{digest}");
    let runtime = Containerd::new(server.socket(), NAMESPACE.into(), "overlayfs".into());
    let access = RegistryAccess {
        insecure: vec![host.clone()],
        ..RegistryAccess::default()
    };

    let progress = Arc::new(AtomicU64::new(0));
    let pulled = runtime
        .pull(&image, &access, progress.clone())
        .await
        .unwrap();
    assert!(
        pulled.bytes_pulled > 500_000,
        "busybox layer written: {}",
        pulled.bytes_pulled
    );
    assert!(
        progress.load(std::sync::atomic::Ordering::Relaxed) > 500_000,
        "progress counted"
    );
    assert!(pulled.top_snapshot.starts_with("sha256:"));
    assert_eq!(pulled.config.cmd[0], "/bin/sh");
    // A second pull finds everything present.
    let again = runtime.pull(&image, &access, Arc::default()).await.unwrap();
    assert_eq!(again.bytes_pulled, 0);
    assert_eq!(again.top_snapshot, pulled.top_snapshot);

    let mut exits = runtime.task_exits().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let run = |id: &str, args: Vec<String>| RunSpec {
        id: id.into(),
        hostname: id.into(),
        args,
        env: pulled.config.env.clone(),
        ..RunSpec::default()
    };
    let labels = HashMap::from([(
        "oakestra.io/managed-by".to_owned(),
        "addons-monitor".to_owned(),
    )]);
    runtime
        .create_container(addons_monitor::runtime::NewContainer {
            id: "root_app",
            image: &image,
            top_snapshot: &pulled.top_snapshot,
            spec: &build_spec(&run("root_app", pulled.config.cmd.clone()), NAMESPACE).unwrap(),
            labels: labels.clone(),
        })
        .await
        .unwrap();
    let log = state.path().join("root_app.log");
    let pid = runtime.start_task("root_app", &log).await.unwrap();
    assert!(pid > 0);
    eventually(
        "the container writes its log",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("hello-from-addon") {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    assert_eq!(
        runtime.task_state("root_app").await.unwrap(),
        TaskState::Running(pid)
    );

    // A task that fails at once: its exit arrives as an event.
    runtime
        .create_container(addons_monitor::runtime::NewContainer {
            id: "root_fail",
            image: &image,
            top_snapshot: &pulled.top_snapshot,
            spec: &build_spec(
                &run(
                    "root_fail",
                    vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
                ),
                NAMESPACE,
            )
            .unwrap(),
            labels: labels.clone(),
        })
        .await
        .unwrap();
    runtime
        .start_task("root_fail", &state.path().join("root_fail.log"))
        .await
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), exits.next())
        .await
        .expect("an exit event")
        .unwrap()
        .unwrap();
    assert_eq!(
        (exit.container_id.as_str(), exit.exit_status),
        ("root_fail", 3)
    );
    assert_eq!(
        runtime.task_state("root_fail").await.unwrap(),
        TaskState::Stopped(3)
    );

    let listed = runtime
        .list_containers(&[("oakestra.io/managed-by", "addons-monitor")])
        .await
        .unwrap();
    let mut ids: Vec<_> = listed.iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["root_app", "root_fail"]);

    // Stop gracefully (sleep dies on SIGTERM), then remove everything.
    runtime
        .remove_container("root_app", Duration::from_secs(5))
        .await
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), exits.next())
        .await
        .expect("an exit event")
        .unwrap()
        .unwrap();
    assert_eq!(exit.container_id, "root_app");
    runtime
        .remove_container("root_fail", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(runtime.list_containers(&[]).await.unwrap().is_empty());
    assert_eq!(
        runtime.task_state("root_app").await.unwrap(),
        TaskState::Absent
    );
    // Removing twice is fine.
    runtime
        .remove_container("root_app", Duration::from_secs(1))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn pulls_from_a_private_registry_with_credentials() {
    let server = ContainerdServer::start().await;
    let registry = RegistryServer::start_with_auth("puller", "s3cret").await;
    let host = registry.host();
    let (digest, _) = push_image(
        &host,
        "private/app",
        "1",
        &ImageSpec::default(),
        registry.credentials(),
    )
    .await;
    let image = format!("{host}/private/app@{digest}");
    let runtime = Containerd::new(server.socket(), NAMESPACE.into(), "overlayfs".into());
    let anonymous = RegistryAccess {
        insecure: vec![host.clone()],
        ..RegistryAccess::default()
    };
    let refused = runtime
        .pull(&image, &anonymous, Arc::default())
        .await
        .unwrap_err();
    assert!(
        refused.to_string().to_lowercase().contains("authoriz"),
        "{refused}"
    );
    let authorized = RegistryAccess {
        insecure: vec![host.clone()],
        credentials: [(host.clone(), ("puller".to_owned(), "s3cret".to_owned()))].into(),
        ..RegistryAccess::default()
    };
    let pulled = runtime
        .pull(&image, &authorized, Arc::default())
        .await
        .unwrap();
    assert!(pulled.top_snapshot.starts_with("sha256:"));
    assert!(
        !format!("{authorized:?}").contains("s3cret"),
        "credentials never printed"
    );
    server.stop().await;
}

/// An image whose layer does not hold what its configuration declares is
/// refused and leaves no snapshot behind, so an honest image with that diff
/// id still gets its own content.
#[tokio::test]
async fn refuses_a_layer_whose_content_is_not_its_diff_id() {
    let server = ContainerdServer::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let forged = push_forged_image(&host, "evil/base", "1").await;
    let (honest, _) = push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let runtime = Containerd::new(
        server.socket(),
        "oakestra-forged".into(),
        "overlayfs".into(),
    );
    let access = RegistryAccess {
        insecure: vec![host.clone()],
        ..RegistryAccess::default()
    };
    let refused = runtime
        .pull(
            &format!("{host}/evil/base@{forged}"),
            &access,
            Arc::default(),
        )
        .await
        .unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("not the diff id") && message.contains("evil/base"),
        "{message}"
    );
    // The honest image unpacks its own layer and runs from it.
    let image = format!("{host}/team/app@{honest}");
    let pulled = runtime.pull(&image, &access, Arc::default()).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let run = RunSpec {
        id: "root_honest".into(),
        hostname: "honest".into(),
        args: vec!["/bin/sh".into(), "-c".into(), "echo honest-busybox".into()],
        env: pulled.config.env.clone(),
        ..RunSpec::default()
    };
    runtime
        .create_container(addons_monitor::runtime::NewContainer {
            id: "root_honest",
            image: &image,
            top_snapshot: &pulled.top_snapshot,
            spec: &build_spec(&run, "oakestra-forged").unwrap(),
            labels: HashMap::new(),
        })
        .await
        .unwrap();
    let log = state.path().join("honest.log");
    runtime.start_task("root_honest", &log).await.unwrap();
    eventually(
        "the honest image runs busybox",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("honest-busybox") {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    runtime
        .remove_container("root_honest", Duration::from_secs(2))
        .await
        .unwrap();
    server.stop().await;
}
