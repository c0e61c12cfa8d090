//! Oakestra's names and core components: the documentation's descriptor
//! (`my_service`) published and installed unchanged over REST, and plugins
//! named like Oakestra's core components (`scheduler`, `service_manager`)
//! replacing them, the core components taken from Oakestra's compose files
//! by `oak-addons core from-compose` and run by the monitor.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::PathBuf, time::Duration};

use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
    monitor_looked,
    rest::{Answer, curl},
};
use serde_json::{Value, json};

fn url(server: &ServerProcess, path: &str) -> String {
    format!("http://{}{path}", server.addr())
}

/// The shape of Oakestra's compose file for one plane: its services,
/// container names, environment and ports as its repository has them,
/// images in `registry`.
fn oakestra_compose(plane: &str, registry: &str) -> String {
    match plane {
        "cluster" => format!(
            r#"
x-logging:
  &default-logging
  driver: "json-file"
  options:
    max-size: "1m"
    max-file: "1"

services:
  mqtt:
    image: {registry}/eclipse-mosquitto:2.0
    hostname: mqtt
    container_name: mqtt
    expose:
      - "10003"
    ports:
      - "10003:10003"

  cluster_service_manager:
    image: {registry}/oakestra/oakestra-net/cluster-service-manager:latest
    container_name: cluster_service_manager
    labels:
      logging: "cluster_promtail"
      logging_jobname: "containerlogs"
    hostname: cluster_service_manager
    expose:
      - "10110"
    ports:
      - "10110:10110"
    environment:
      - MY_PORT=10110
      - MQTT_BROKER_PORT=10003
      - MQTT_BROKER_URL=mqtt
      - ROOT_SERVICE_MANAGER_URL=${{SYSTEM_MANAGER_URL}}
      - ROOT_SERVICE_MANAGER_PORT=10099
      - SYSTEM_MANAGER_URL=cluster_manager
      - SYSTEM_MANAGER_PORT=10000
      - CLUSTER_MONGO_URL=cluster_mongo_net
      - CLUSTER_MONGO_PORT=10108
      - CLUSTER_ADDRESS=${{CLUSTER_ADDRESS}}
      - CLUSTER_NAME=${{CLUSTER_NAME}}
    depends_on:
      - mqtt
    logging: *default-logging

  cluster_scheduler:
    image: cluster_scheduler
    build: ../scheduler/
    container_name: cluster_scheduler
    labels:
      logging: "cluster_promtail"
      logging_jobname: "containerlogs"
    hostname: cluster_scheduler
    expose:
      - "10105"
    ports:
      - "10105:10105"
    environment:
      - ORCHESTRATION_PLANE=cluster
      - API_PORT=10105
      - MANAGER_URL=cluster_manager
      - MANAGER_PORT=10100
      - RESOURCE_ABSTRACTOR_URL=cluster_resource_abstractor
      - RESOURCE_ABSTRACTOR_PORT=11012
      - REDIS_ADDR=redis://:clusterRedis@cluster_redis:6479
    logging: *default-logging

networks:
  default:
    name: oakestra
"#
        ),
        _ => format!(
            r#"
x-root-log-labels: &root-log-labels
  oakestra.logging.collector: root
  oakestra.cluster.id: root
  logging_jobname: containerlogs

services:
  system_manager:
    image: system_manager
    build:
      context: system-manager-python/
    hostname: system_manager
    container_name: system_manager
    labels: *root-log-labels
    ports:
      - "10000:10000"
      - "50052:50052"

  root_service_manager:
    image: {registry}/oakestra/oakestra-net/root-service-manager:latest
    container_name: root_service_manager
    labels: *root-log-labels
    hostname: root_service_manager
    expose:
      - "10099"
    ports:
      - "10099:10099"
    environment:
      - MY_PORT=10099
      - SYSTEM_MANAGER_URL=system_manager
      - SYSTEM_MANAGER_PORT=10000
      - ROOT_MONGO_URL=mongo_net
      - ROOT_MONGO_PORT=10008
      - JWT_GENERATOR_URL=jwt_generator
      - JWT_GENERATOR_PORT=10011
    depends_on:
      - mongo_rootnet
      - jwt_generator

  root_scheduler:
    image: root_scheduler
    build: ../scheduler/
    container_name: root_scheduler
    labels: *root-log-labels
    hostname: root_scheduler
    expose:
      - "10004"
    ports:
      - "10004:10004"
    environment:
      - ORCHESTRATION_PLANE=root
      - API_PORT=10004
      - MANAGER_URL=system_manager
      - MANAGER_PORT=10000
      - RESOURCE_ABSTRACTOR_URL=root_resource_abstractor
      - RESOURCE_ABSTRACTOR_PORT=11011
      - REDIS_ADDR=redis://:rootRedis@root_redis:6379
    depends_on:
      - root_redis
      - root_resource_abstractor

networks:
  default:
    name: oakestra
"#
        ),
    }
}

/// An image that serves `body on <hostname>` over HTTP on the port in
/// `$port_variable`, as Oakestra's components listen on the port their
/// environment names.
fn serving_on(port_variable: &str, body: &str) -> ImageSpec {
    ImageSpec {
        cmd: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "mkdir -p /www && echo \"{body} on $(hostname)\" > /www/index.html && trap 'kill $p; exit 0' TERM; /bin/busybox httpd -f -p ${port_variable} -h /www & p=$!; wait"
            ),
        ],
        env: vec!["PATH=/bin".into()],
        ..ImageSpec::default()
    }
}

/// One plane's swap, end to end.
struct Plane {
    name: &'static str,
    bridge_prefix: &'static str,
    subnet_prefix: &'static str,
    /// (core name, compose image repository, port variable, host port)
    components: [(&'static str, &'static str, &'static str, u16); 2],
    /// `--image` for services Oakestra builds locally.
    built: &'static [(&'static str, &'static str)],
}

/// Waits until 127.0.0.1:`port` answers with a body containing `wanted`.
async fn answers(port: u16, wanted: String) -> String {
    eventually(
        &format!("port {port} answers {wanted}"),
        Duration::from_secs(60),
        || {
            let wanted = wanted.clone();
            async move {
                let body = integration_tests::http_get(port, Duration::from_secs(2)).await?;
                if body.contains(&wanted) {
                    Ok(body)
                } else {
                    Err(body)
                }
            }
        },
    )
    .await
}

async fn installation_status(manager: &ServerProcess, id: &str) -> Answer {
    curl(
        "GET",
        &url(manager, &format!("/api/v1/addons/{id}")),
        None,
        &[],
    )
    .await
}

async fn becomes(manager: &ServerProcess, id: &str, wanted: &str) -> Value {
    eventually(
        &format!("installation {wanted}"),
        Duration::from_secs(90),
        || async {
            let answer = installation_status(manager, id).await;
            if answer.body["status"] == wanted {
                Ok(answer.body)
            } else {
                Err(answer.text)
            }
        },
    )
    .await
}

async fn run_plane(plane: Plane) {
    let dir = tempfile::tempdir().unwrap();
    let state: PathBuf = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, plane.bridge_prefix, plane.subnet_prefix);
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();

    // Oakestra's images, by their names, in the test registry.
    for (name, repository, variable, _) in plane.components {
        let (repository, tag) = repository.split_once(':').unwrap();
        push_image(
            &host,
            repository,
            tag,
            &serving_on(variable, &format!("core {name}")),
            None,
        )
        .await;
    }
    // The documentation's example addon and the plugins.
    let mut documented_image = serving_on("MY_SERVICE_PORT", "my_service");
    documented_image.env.push("MY_SERVICE_PORT=10007".into());
    push_image(
        &host,
        "your-username/addon-name",
        "latest",
        &documented_image,
        None,
    )
    .await;
    for (name, _, variable, _) in plane.components {
        push_image(
            &host,
            &format!("plugins/{}", name.replace('_', "-")),
            "1",
            &serving_on(variable, &format!("plugin {name}")),
            None,
        )
        .await;
    }

    // The compose file through `oak-addons core from-compose`.
    let compose = dir.path().join("docker-compose.yml");
    std::fs::write(&compose, oakestra_compose(plane.name, &host)).unwrap();
    let mut command = tokio::process::Command::new(binary("oak-addons"));
    command
        .args(["core", "from-compose", &compose.display().to_string()])
        .args(["--plane", plane.name, "--replaceable"])
        .env("SYSTEM_MANAGER_URL", "10.0.0.1")
        .env("CLUSTER_NAME", "cluster1")
        .env("CLUSTER_ADDRESS", "10.0.0.2");
    for (name, _, _, _) in plane.components {
        command.args(["--service", name]);
    }
    for (service, repository) in plane.built {
        command.args(["--image", &format!("{service}={host}/{repository}")]);
    }
    let output = command.output().await.unwrap();
    let notes = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "from-compose: {notes}");
    let core_file = dir.path().join("core-components.yaml");
    std::fs::write(&core_file, &output.stdout).unwrap();
    if plane.name == "cluster" {
        assert!(
            notes.contains("`depends_on` is not carried over"),
            "{notes}"
        );
    }

    // The control plane of the plane, and the monitor running the core
    // components from the file.
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store("marketplace"),
            "--insecure-registry",
            &host,
        ],
    )
    .await;
    // The operator consents, once, to what the documentation's addon and
    // the plugins ask for: the REST install below sends only their ids.
    let policy = dir.path().join("manager-policy.yaml");
    std::fs::write(
        &policy,
        "consent:\n  host_ports: [\"10000-20000/tcp\"]\n  core_components: [scheduler, service_manager]\n",
    )
    .unwrap();
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store("manager"),
            "--marketplace",
            &marketplace.url(),
            "--plane",
            plane.name,
            "--policy",
            &policy.display().to_string(),
        ],
    )
    .await;
    let namespace = format!("oakestra-{}", plane.bridge_prefix);
    let core_path = core_file.display().to_string();
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: &namespace,
        bridge_prefix: plane.bridge_prefix,
        subnet_prefix: plane.subnet_prefix,
    }
    .start(
        &[
            "--plane",
            plane.name,
            "--core-components",
            &core_path,
            "--resync-interval",
            "1s",
            "--stop-grace",
            "2s",
        ],
        &[],
    )
    .await;
    // Each core component listens on the port its environment names and
    // is published on the port Oakestra's compose file publishes.
    for (name, _, _, port) in plane.components {
        answers(port, format!("core {name}")).await;
    }

    // The documentation's descriptor, unchanged but for the registry.
    let documented = json!({
        "name": "addon-name",
        "networks": [],
        "volumes": [{"name": "myvolume", "driver": "bridge"}],
        "services": [{
            "image": format!("{host}/your-username/addon-name:latest"),
            "service_name": "my_service",
            "networks": [],
            "volumes": ["myvolume:/somevolume"],
            "ports": {"10007": "10007"},
        }],
    });
    let addons = url(&marketplace, "/api/v1/marketplace/addons");
    let installs = url(&manager, "/api/v1/addons");
    let published = curl("POST", &addons, Some(&documented), &[]).await;
    assert_eq!(published.status, 201, "{published:?}");
    let documented_id = published.body["_id"].as_str().unwrap().to_owned();

    // Plugins named as Oakestra names the components they replace.
    let services: Vec<Value> = plane
        .components
        .iter()
        .map(|(name, _, variable, port)| {
            let mut environment = serde_json::Map::new();
            environment.insert((*variable).to_owned(), port.to_string().into());
            json!({
                "service_name": name,
                "image": format!("{host}/plugins/{}:1", name.replace('_', "-")),
                "environment": environment,
            })
        })
        .collect();
    let plugins = json!({"name": "energy_aware_plugins", "services": services});
    let published = curl("POST", &addons, Some(&plugins), &[]).await;
    assert_eq!(published.status, 201, "{published:?}");
    let plugins_id = published.body["_id"].as_str().unwrap().to_owned();

    let mut installations = Vec::new();
    for id in [&documented_id, &plugins_id] {
        eventually("approved", Duration::from_secs(60), || async {
            let answer = curl("GET", &format!("{addons}/{id}"), None, &[]).await;
            if answer.body["status"] == "approved" {
                Ok(())
            } else {
                Err(answer.text)
            }
        })
        .await;
        let installed = curl("POST", &installs, Some(&json!({"marketplace_id": id})), &[]).await;
        assert_eq!(installed.status, 201, "{installed:?}");
        installations.push(installed.body["_id"].as_str().unwrap().to_owned());
    }
    for id in &installations {
        becomes(&manager, id, "active").await;
    }
    // The documented service runs, known by its name and its DNS alias.
    answers(10007, "my_service on my-service".into()).await;
    let hosts = std::fs::read_to_string(
        state
            .join("containers")
            .join(format!("{}_my_service", plane.name))
            .join("hosts"),
    )
    .unwrap();
    assert!(hosts.contains("my_service my-service"), "{hosts}");
    // Each plugin serves on its core component's port, the core stopped.
    for (name, _, _, port) in plane.components {
        answers(port, format!("plugin {name} on {}", name.replace('_', "-"))).await;
    }
    monitor_looked(&monitor, 2).await;
    for (name, _, _, port) in plane.components {
        let body = integration_tests::http_get(port, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(body.contains(&format!("plugin {name}")), "{body}");
    }

    // Uninstalled as the dashboard does: DELETE, and once disabled,
    // DELETE again; the core components come back.
    let plugins_installation = &installations[1];
    let target = format!("{installs}/{plugins_installation}");
    assert_eq!(curl("DELETE", &target, None, &[]).await.status, 200);
    becomes(&manager, plugins_installation, "disabled").await;
    assert_eq!(curl("DELETE", &target, None, &[]).await.status, 200);
    for (name, _, _, port) in plane.components {
        answers(port, format!("core {name}")).await;
    }
}

/// A cluster orchestrator's compose file: `scheduler` and
/// `service_manager` plugins replace `cluster_scheduler` and
/// `cluster_service_manager`.
#[tokio::test]
async fn plugins_replace_a_cluster_orchestrators_components_from_its_compose_file() {
    run_plane(Plane {
        name: "cluster",
        bridge_prefix: "ocl",
        subnet_prefix: "10.76",
        components: [
            (
                "service_manager",
                "oakestra/oakestra-net/cluster-service-manager:latest",
                "MY_PORT",
                10110,
            ),
            ("scheduler", "cluster_scheduler:latest", "API_PORT", 10105),
        ],
        built: &[("cluster_scheduler", "cluster_scheduler:latest")],
    })
    .await;
}

/// The root orchestrator's compose file: a plugin named `service_manager`
/// replaces `root_service_manager`, one named `scheduler` `root_scheduler`.
#[tokio::test]
async fn plugins_replace_the_root_orchestrators_components_from_its_compose_file() {
    run_plane(Plane {
        name: "root",
        bridge_prefix: "ort",
        subnet_prefix: "10.77",
        components: [
            (
                "service_manager",
                "oakestra/oakestra-net/root-service-manager:latest",
                "MY_PORT",
                10099,
            ),
            ("scheduler", "root_scheduler:latest", "API_PORT", 10004),
        ],
        built: &[("root_scheduler", "root_scheduler:latest")],
    })
    .await;
}
