//! A server binary of the workspace, started for a test.

use std::{
    net::SocketAddr,
    path::Path,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

/// A running server binary. Killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    child: Child,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stderr: tempfile::NamedTempFile,
}

/// How a server came out of a start attempt.
#[derive(Debug)]
pub enum Started {
    /// It listens.
    Running(Box<ServerProcess>),
    /// It exited before listening, with its stderr.
    Exited(ExitStatus, String),
}

impl ServerProcess {
    /// Starts `binary` with `args` plus `--listen 127.0.0.1:0` and waits
    /// until it prints the address it listens on.
    pub async fn start(binary: &Path, args: &[&str]) -> Self {
        match Self::try_start(binary, args).await {
            Started::Running(server) => *server,
            Started::Exited(status, stderr) => panic!(
                "{} exited at start with {status}:\n{stderr}",
                binary.display()
            ),
        }
    }

    /// Like [`ServerProcess::start`], but returns how a failing start ended.
    pub async fn try_start(binary: &Path, args: &[&str]) -> Started {
        Self::try_start_with_env(binary, args, &[]).await
    }

    /// Like [`ServerProcess::start`], with extra environment variables.
    pub async fn start_with_env(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        match Self::try_start_with_env(binary, args, env).await {
            Started::Running(server) => *server,
            Started::Exited(status, stderr) => panic!(
                "{} exited at start with {status}:\n{stderr}",
                binary.display()
            ),
        }
    }

    /// Like [`ServerProcess::start_with_env`], in the network namespace
    /// `/run/netns/NETNS` (through `nsenter`, which execs the binary: the
    /// process is the server itself, in the machine's mount namespace).
    pub async fn start_in_netns(
        netns: &str,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{netns}")).arg(binary);
        match Self::launch(command, binary, args, env).await {
            Started::Running(server) => *server,
            Started::Exited(status, stderr) => panic!(
                "{} in {netns} exited at start with {status}:\n{stderr}",
                binary.display()
            ),
        }
    }

    async fn try_start_with_env(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Started {
        Self::launch(Command::new(binary), binary, args, env).await
    }

    async fn launch(
        mut command: Command,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Started {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stderr = tempfile::NamedTempFile::new().expect("temp file for stderr");
        let mut child = command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().expect("reopen stderr file"))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics_addr = None;
        let listening = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("metrics on ") {
                    metrics_addr = addr.parse::<SocketAddr>().ok();
                }
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return addr.parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        match listening {
            Some(addr) => {
                // Keep draining stdout so the server never blocks on it.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Started::Running(Box::new(Self {
                    name,
                    child,
                    addr,
                    metrics_addr,
                    stderr,
                }))
            }
            None => {
                let status = match tokio::time::timeout(Duration::from_secs(10), child.wait()).await
                {
                    Ok(Ok(status)) => status,
                    _ => {
                        let _ = child.kill().await;
                        panic!("{name} neither listened nor exited within 30 s")
                    }
                };
                let text = std::fs::read_to_string(stderr.path()).unwrap_or_default();
                Started::Exited(status, text)
            }
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of its metrics endpoint (`--metrics-listen`), if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://ADDR`, for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A lazily connected gRPC channel to it.
    pub fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .expect("valid URL")
            .connect_lazy()
    }

    /// Its process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(
            self.child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .unwrap_or(0),
        )
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    /// Sends `sig` and waits up to `patience` for the exit.
    pub async fn signal_and_wait(
        mut self,
        sig: signal::Signal,
        patience: Duration,
    ) -> Result<ExitStatus, String> {
        signal::kill(self.pid(), sig).map_err(|err| format!("kill {}: {err}", self.name))?;
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(err)) => Err(format!("wait for {}: {err}", self.name)),
            Err(_) => Err(format!(
                "{} still running {patience:?} after {sig}; stderr:\n{}",
                self.name,
                self.stderr()
            )),
        }
    }

    /// Waits up to `patience` for it to exit on its own.
    pub async fn exited(mut self, patience: Duration) -> Result<ExitStatus, String> {
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(err)) => Err(format!("wait for {}: {err}", self.name)),
            Err(_) => Err(format!(
                "{} still running after {patience:?}; stderr:\n{}",
                self.name,
                self.stderr()
            )),
        }
    }

    /// SIGTERM, then the exit status within 5 s.
    pub async fn stop(self) -> ExitStatus {
        self.signal_and_wait(signal::Signal::SIGTERM, Duration::from_secs(5))
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// SIGKILL, as a crash.
    pub async fn kill(self) {
        self.signal_and_wait(signal::Signal::SIGKILL, Duration::from_secs(5))
            .await
            .unwrap_or_else(|err| panic!("{err}"));
    }
}

/// The CPU time process `pid` has used so far, user and system, from
/// `/proc/PID/stat` (its own threads, not its children).
pub fn cpu_time(pid: Pid) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name, in parentheses, may hold spaces: count after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // Fields 14 and 15 of the line (utime, stime), the 12th and 13th after
    // the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // Linux counts these in USER_HZ, 100 per second on every architecture
    // it exposes to user space.
    const PER_SECOND: u64 = 100;
    Duration::from_nanos(ticks * 1_000_000_000 / PER_SECOND)
}
