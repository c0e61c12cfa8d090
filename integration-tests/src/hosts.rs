//! Several real nodes on one machine. A [`TestNet`] is a bridge in the
//! machine's network namespace with an address of its own (where the test
//! runs the registry and the manager); each [`Host`] is a network namespace
//! linked to it by a veth pair, with an address on the bridge, its own
//! containerd (own root, state, socket and runc root) and its own monitor
//! and state dir. An addon's host ports are reachable on the host's
//! address, from the machine and from the other hosts.
//!
//! Everything a host made goes when it is dropped: its processes, its
//! containers (their shims are killed), its namespace (and with it the
//! container bridges and iptables rules the monitor's CNI plugins made
//! inside it).

use std::{net::Ipv4Addr, path::PathBuf, process::Command, time::Duration};

use crate::{Containerd, ServerProcess, binary};

/// A test bridge: `PREFIX.1/24`, where the hosts' veths plug in.
#[derive(Debug)]
pub struct TestNet {
    bridge: String,
    prefix: String,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2, installed by scripts/setup.sh)");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TestNet {
    /// Makes bridge `name` with address `PREFIX.1/24` (`prefix` is three
    /// octets, `10.77.1`), removing what an earlier run left of it.
    pub fn create(name: &str, prefix: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        ip(&["link", "add", name, "type", "bridge"]);
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", name]);
        ip(&["link", "set", name, "up"]);
        Self {
            bridge: name.to_owned(),
            prefix: prefix.to_owned(),
        }
    }

    /// The bridge's own address: where the machine's servers listen for
    /// the hosts.
    pub fn gateway(&self) -> Ipv4Addr {
        format!("{}.1", self.prefix)
            .parse()
            .expect("a test net prefix is three octets")
    }

    /// Starts host number `n` (2..=250): namespace `NAME-hN`, address
    /// `PREFIX.N`, a containerd in it. Its monitor starts with
    /// [`Host::start_monitor`].
    pub async fn host(&self, n: u8, node_id: &str) -> Host {
        assert!((2..=250).contains(&n), "host number {n} out of 2..=250");
        let netns = format!("{}-h{n}", self.bridge);
        let veth = format!("{}v{n}", self.bridge);
        remove_netns(&netns);
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]);
        let address: Ipv4Addr = format!("{}.{n}", self.prefix)
            .parse()
            .expect("a test net prefix is three octets");
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ]);
        let containerd = Containerd::start_in(Some(&netns)).await;
        let dir = tempfile::tempdir().expect("temp dir for a host");
        Host {
            node_id: node_id.to_owned(),
            address,
            netns,
            veth,
            containerd: Some(containerd),
            monitor: None,
            state_dir: dir.path().join("monitor"),
            state_tmpfs: false,
            _dir: dir,
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// One node: a network namespace with its own containerd and monitor.
#[derive(Debug)]
pub struct Host {
    /// The monitor's `--node-id`.
    pub node_id: String,
    /// Its address on the test bridge.
    pub address: Ipv4Addr,
    netns: String,
    veth: String,
    containerd: Option<Containerd>,
    monitor: Option<ServerProcess>,
    state_dir: PathBuf,
    state_tmpfs: bool,
    _dir: tempfile::TempDir,
}

impl Host {
    /// The containerd namespace of its monitor: one per host, so the
    /// containers' cgroups (`/<namespace>/<id>`) and runc state of hosts on
    /// one machine stay apart.
    pub fn namespace(&self) -> String {
        format!("oakestra-{}", self.netns)
    }

    /// Its containerd's socket.
    pub fn containerd_socket(&self) -> PathBuf {
        self.containerd
            .as_ref()
            .expect("the host's containerd runs")
            .socket()
    }

    /// Its monitor's state dir.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Puts its monitor's state dir on a tmpfs of `mib` MiB, a disk that
    /// can be filled; before its monitor first starts.
    pub fn state_on_tmpfs(&mut self, mib: u64) {
        assert!(self.monitor.is_none(), "the host's monitor runs already");
        mount_tmpfs(&self.state_dir, mib);
        self.state_tmpfs = true;
    }

    /// Starts its monitor, linked to `manager` (a URL the host reaches),
    /// pulling from `registry` over plain HTTP, with heartbeats every
    /// second and `extra` flags (labels, core components, ...). Its node
    /// API listens on the host's address.
    pub async fn start_monitor(&mut self, manager: &str, registry: &str, extra: &[&str]) {
        assert!(self.monitor.is_none(), "the host's monitor runs already");
        let socket = self.containerd_socket().display().to_string();
        let listen = format!("{}:0", self.address);
        let state = self.state_dir.display().to_string();
        let namespace = self.namespace();
        let mut args = vec![
            "--listen",
            &listen,
            "--manager",
            manager,
            "--containerd-socket",
            &socket,
            "--namespace",
            &namespace,
            "--node-id",
            &self.node_id,
            "--state-dir",
            &state,
            "--insecure-registry",
            registry,
            // Inside the host's namespace: no other node's bridges or
            // addresses to avoid.
            "--bridge-prefix",
            "mhbr",
            "--subnet-prefix",
            "10.76",
            "--heartbeat",
            "1s",
            "--resync-interval",
            "1s",
            "--restart-backoff",
            "200ms",
            "--stop-grace",
            "3s",
            // Its node API listens on the test bridge, not loopback.
            "--insecure",
        ];
        args.extend_from_slice(extra);
        self.monitor = Some(
            ServerProcess::start_in_netns(&self.netns, &binary("addons-monitor"), &args, &[]).await,
        );
    }

    /// Its monitor.
    pub fn monitor(&self) -> &ServerProcess {
        self.monitor.as_ref().expect("the host's monitor runs")
    }

    /// Stops its monitor (SIGTERM); containers stay.
    pub async fn stop_monitor(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.stop().await;
        }
    }

    /// The machine dies: its monitor and containerd are SIGKILLed, and its
    /// containers with them.
    pub async fn kill(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.kill().await;
        }
        if let Some(containerd) = self.containerd.as_mut() {
            containerd.kill().await;
        }
    }

    /// Its monitor, if it runs.
    pub fn monitor_if_running(&self) -> Option<&ServerProcess> {
        self.monitor.as_ref()
    }

    /// Its monitor dies (SIGKILL); its containerd and containers stay. Its
    /// stderr is returned, for the record.
    pub async fn kill_monitor(&mut self) -> Option<String> {
        let monitor = self.monitor.take()?;
        let stderr = monitor.stderr();
        monitor.kill().await;
        Some(stderr)
    }

    /// Its containerd, while it runs.
    pub fn containerd(&mut self) -> &mut Containerd {
        self.containerd
            .as_mut()
            .expect("the host's containerd runs")
    }

    /// Cuts the host off from the test bridge's address (the manager, the
    /// registry), both ways, with iptables in its namespace; `false` heals.
    pub fn partition(&self, cut: bool) {
        let gateway = self
            .address
            .octets()
            .map(|o| o.to_string())
            .into_iter()
            .take(3)
            .collect::<Vec<_>>()
            .join(".")
            + ".1";
        let action = if cut { "-I" } else { "-D" };
        for (chain, side) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
            let output = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.netns,
                    "iptables",
                    "-w",
                    action,
                    chain,
                ])
                .args([side, &gateway, "-j", "DROP"])
                .output()
                .expect("run iptables (installed by scripts/setup.sh)");
            assert!(
                output.status.success() || !cut,
                "iptables {action} {chain}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// `GET /` on the host's `port`, or why there is no answer.
    pub async fn http_get(&self, port: u16) -> Result<String, String> {
        crate::http_get_at(self.address, port, Duration::from_secs(2)).await
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        drop(self.monitor.take());
        drop(self.containerd.take());
        // The monitor's container namespaces are files bind-mounted under
        // its state dir.
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("netns")) {
            for entry in entries.flatten() {
                let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if self.state_tmpfs {
            let _ = nix::mount::umount2(&self.state_dir, nix::mount::MntFlags::MNT_DETACH);
        }
        remove_netns(&self.netns);
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

/// Mounts a tmpfs of `mib` MiB on `dir` (created), for a disk that can be
/// filled; `umount2(dir, MNT_DETACH)` takes it away.
pub fn mount_tmpfs(dir: &std::path::Path, mib: u64) {
    std::fs::create_dir_all(dir).expect("create a tmpfs's directory");
    let options = format!("size={mib}m,mode=0700");
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .expect("mount a tmpfs");
}

/// Deletes a network namespace, killing what still runs in it.
fn remove_netns(netns: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", netns]).output();
}
