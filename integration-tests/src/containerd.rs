//! A private containerd for one test: its own root, state dir and socket
//! under a temp dir, never the machine's default one.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

/// A running private containerd. Stopped when dropped.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    /// The network namespace it runs in (`/run/netns/NAME`), if not the
    /// machine's.
    netns: Option<String>,
}

impl Containerd {
    /// Starts containerd (Debian's package, installed by
    /// `scripts/setup.sh`) and waits until its socket answers.
    pub async fn start() -> Self {
        Self::start_in(None).await
    }

    /// Starts it in network namespace `/run/netns/NETNS` (a test host), or
    /// the machine's own when `None`.
    pub async fn start_in(netns: Option<&str>) -> Self {
        let binary = which("containerd").unwrap_or_else(|| {
            panic!(
                "containerd is not installed: run scripts/setup.sh (Debian package `containerd`)"
            )
        });
        // Unix socket paths are limited to 108 bytes: keep the dir short.
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .expect("temp dir for containerd");
        let root = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{root}/containerd.sock"

[ttrpc]
  address = "{root}/containerd.sock.ttrpc"

[debug]
  address = "{root}/debug.sock"
"#,
            root = root.display()
        );
        std::fs::write(root.join("config.toml"), config).expect("write containerd config");
        remove_stale_leftovers();
        let netns = netns.map(str::to_owned);
        let child = spawn(&binary, root, netns.as_deref()).await;
        Self { child, dir, netns }
    }

    /// Stops containerd (SIGKILL, as a crash) and starts it again on the
    /// same root, state and socket. Running tasks survive in their shims.
    pub async fn restart(&mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        let binary = which("containerd").expect("containerd");
        self.child = spawn(&binary, self.dir.path(), self.netns.as_deref()).await;
    }

    /// Stops containerd (SIGKILL, as a crash), leaves it down for `down`,
    /// and starts it again on the same root, state and socket. Running
    /// tasks survive in their shims.
    pub async fn crash_for(&mut self, down: Duration) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        tokio::time::sleep(down).await;
        let binary = which("containerd").expect("containerd");
        self.child = spawn(&binary, self.dir.path(), self.netns.as_deref()).await;
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw)
    }

    /// Its gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Kills it (SIGKILL, as a crash of its machine would) and its shims
    /// and their containers, and waits for the exit.
    pub async fn kill(&mut self) {
        kill_shims(&self.socket());
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    /// Stops it with SIGTERM and waits for the exit.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// runc keeps a container's state under `/run/containerd/runc/<namespace>`
/// whatever containerd's root is, and a killed shim leaves its rootfs
/// mounted: a test that ended with containers running would leave state
/// that makes the next run's `Tasks.Create` of the same id fail. Removes
/// the leftovers of every private containerd no process runs any more;
/// those of tests running now stay.
fn remove_stale_leftovers() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    let commands = process_commands();
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("ctrd") || !dir.is_dir() {
            continue;
        }
        // A dir made moments ago may be one whose containerd is starting.
        let young = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_none_or(|age| age < Duration::from_secs(60));
        let config = dir.join("config.toml").display().to_string();
        if young || commands.iter().any(|c| c.contains(&config)) {
            continue;
        }
        remove_leftovers(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The command lines of every process.
fn process_commands() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .collect()
}

/// Deletes the runc state of the containers whose bundles live under `dir`
/// and unmounts everything mounted under it.
fn remove_leftovers(dir: &std::path::Path) {
    let prefix = dir.display().to_string();
    if let Ok(namespaces) = std::fs::read_dir("/run/containerd/runc") {
        for namespace in namespaces.flatten() {
            let root = namespace.path();
            let Ok(output) = std::process::Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["list", "--format", "json"])
                .output()
            else {
                continue;
            };
            let listed: Vec<serde_json::Value> =
                serde_json::from_slice(&output.stdout).unwrap_or_default();
            for container in listed {
                let (Some(id), Some(bundle)) =
                    (container["id"].as_str(), container["bundle"].as_str())
                else {
                    continue;
                };
                if bundle.starts_with(&prefix) {
                    let _ = std::process::Command::new("runc")
                        .arg("--root")
                        .arg(&root)
                        .args(["delete", "--force", id])
                        .output();
                }
            }
        }
    }
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .filter(|point| point.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    // Deepest first.
    mounts.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in mounts {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

async fn spawn(binary: &std::path::Path, root: &std::path::Path, netns: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("containerd.log"))
        .expect("containerd log");
    let socket = root.join("containerd.sock");
    let _ = std::fs::remove_file(&socket);
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new("nsenter");
            command.arg(format!("--net=/run/netns/{netns}")).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("--config")
        .arg(root.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start containerd");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        let log = || std::fs::read_to_string(root.join("containerd.log")).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!("containerd exited at start with {status}:\n{}", log());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "containerd did not answer within 30 s:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A test that failed midway leaves tasks behind: their shims outlive
        // containerd. Kill those of this containerd, and their containers.
        kill_shims(&self.dir.path().join("containerd.sock"));
        let _ = self.child.start_kill();
        remove_leftovers(self.dir.path());
    }
}

/// Kills the shims serving `socket` and their child processes.
fn kill_shims(socket: &std::path::Path) {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    let needle = socket.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut processes: Vec<(i32, i32, String)> = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The parent pid is the second field after the parenthesised name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        processes.push((pid, ppid, cmdline));
    }
    let shims: Vec<i32> = processes
        .iter()
        .filter(|(_, _, cmd)| cmd.contains("containerd-shim") && cmd.contains(&needle))
        .map(|(pid, _, _)| *pid)
        .collect();
    for (pid, ppid, _) in &processes {
        if shims.contains(ppid) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    for pid in shims {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"])
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|path| path.is_file())
}
