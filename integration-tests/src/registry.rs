//! A private OCI registry (Debian's `docker-registry`, the CNCF
//! Distribution) on a free loopback port, optionally behind htpasswd auth.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

/// A running registry. Stopped when dropped.
#[derive(Debug)]
pub struct RegistryServer {
    child: Option<Child>,
    /// The address it listens on.
    ip: std::net::Ipv4Addr,
    dir: tempfile::TempDir,
    port: u16,
    credentials: Option<(String, String)>,
}

impl RegistryServer {
    /// An anonymous registry.
    pub async fn start() -> Self {
        Self::launch(None, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// An anonymous registry on `ip` (the address of a test bridge, so the
    /// test hosts' network namespaces reach it too), on a free port.
    pub async fn start_on(ip: std::net::Ipv4Addr) -> Self {
        Self::launch(None, ip).await
    }

    /// A registry that needs `user`/`password` (htpasswd, bcrypt).
    pub async fn start_with_auth(user: &str, password: &str) -> Self {
        Self::launch(
            Some((user.to_owned(), password.to_owned())),
            std::net::Ipv4Addr::LOCALHOST,
        )
        .await
    }

    async fn launch(credentials: Option<(String, String)>, ip: std::net::Ipv4Addr) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let mut registry = Self {
            child: None,
            ip,
            port: crate::free_port(),
            dir,
            credentials,
        };
        registry.write_config();
        registry.spawn().await;
        registry
    }

    fn write_config(&self) {
        let root = self.dir.path();
        let auth = match &self.credentials {
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt hash");
                std::fs::write(root.join("htpasswd"), format!("{user}:{hash}\n"))
                    .expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    root.join("htpasswd").display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}:{}\n  secret: integration-tests\n{auth}",
            root.join("data").display(),
            self.ip,
            self.port
        );
        std::fs::write(root.join("config.yml"), config).expect("registry config");
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw)
    }

    async fn spawn(&mut self) {
        let binary = PathBuf::from("/usr/bin/docker-registry");
        assert!(
            binary.is_file(),
            "docker-registry is not installed: run scripts/setup.sh (Debian package `docker-registry`)"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("registry log");
        let mut child = Command::new(binary)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("registry log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start docker-registry");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect((self.ip, self.port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "docker-registry exited at start with {status}:\n{}",
                    self.log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "docker-registry did not listen within 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        self.child = Some(child);
    }

    /// `IP:PORT` (`127.0.0.1:PORT` unless started on another address).
    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// Deletes manifest `digest` of `repository` (no credentials): the
    /// registry loses an image. Returns the HTTP status line.
    pub async fn delete_manifest(&self, repository: &str, digest: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect((self.ip, self.port))
            .await
            .expect("connect to the registry");
        let request = format!(
            "DELETE /v2/{repository}/manifests/{digest} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.host()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the delete");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read the answer");
        String::from_utf8_lossy(&response)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// The credentials it requires, if any.
    pub fn credentials(&self) -> Option<(String, String)> {
        self.credentials.clone()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Everything it logged, access log included.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Paths of the blob GET requests it served so far.
    pub fn blob_gets(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| {
                let start = line.find("\"GET /v2/")? + 5;
                let path = line[start..].split_whitespace().next()?;
                path.contains("/blobs/").then(|| path.to_owned())
            })
            .collect()
    }

    /// Stops the registry, keeping its data and port.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }

    /// Starts a stopped registry again on the same port and data.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "the registry runs already");
        self.spawn().await;
    }
}
