//! The MongoDB server the MongoDB suites run against: the one `MONGODB_URI`
//! names, or else a private nx-27017 (a MongoDB-wire server on SQLite,
//! installed by `scripts/setup.sh`) on a free loopback port.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

/// A MongoDB-wire server for one test. A private nx-27017 is stopped when
/// dropped.
#[derive(Debug)]
pub struct MongoServer {
    base_uri: String,
    database: String,
    private: Option<Private>,
}

#[derive(Debug)]
struct Private {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn nx_binary() -> PathBuf {
    std::env::var_os("ADDONS_NX27017")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/test-env/venv/bin/nx-27017"))
}

impl MongoServer {
    /// A server with a database of its own for this test.
    pub async fn start(test: &str) -> Self {
        let database = format!("t{}_{}", std::process::id(), test.replace(['-', ':'], "_"));
        if let Ok(uri) = std::env::var("MONGODB_URI") {
            return Self {
                base_uri: uri.trim_end_matches('/').to_owned(),
                database,
                private: None,
            };
        }
        let dir = tempfile::tempdir().expect("temp dir for nx-27017");
        let private = Private::spawn(dir, crate::free_port()).await;
        Self {
            base_uri: format!("mongodb://127.0.0.1:{}", private.port),
            database,
            private: Some(private),
        }
    }

    /// Connection string with this test's database.
    pub fn uri(&self) -> String {
        // A real MongoDB URI may carry options after the path; keep them.
        match self.base_uri.split_once('?') {
            Some((base, options)) => {
                format!("{}/{}?{options}", base.trim_end_matches('/'), self.database)
            }
            None => format!("{}/{}", self.base_uri, self.database),
        }
    }

    /// Whether the server is a private nx-27017 rather than `MONGODB_URI`.
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// Stops the server process and starts it again on the same data, as a
    /// restart of the database. A no-op against `MONGODB_URI`.
    pub async fn restart(&mut self) {
        if let Some(private) = self.private.take() {
            let Private {
                mut child,
                port,
                dir,
            } = private;
            let _ = child.kill().await;
            let _ = child.wait().await;
            self.private = Some(Private::spawn(dir, port).await);
        }
    }
}

impl MongoServer {
    /// Kills the server process (SIGKILL); [`MongoServer::start_again`]
    /// brings it back on the same port and data. Panics against
    /// `MONGODB_URI`, which a test cannot stop.
    pub async fn kill(&mut self) {
        let private = self
            .private
            .as_mut()
            .expect("only a private nx-27017 can be stopped");
        let _ = private.child.kill().await;
        let _ = private.child.wait().await;
    }

    /// The server process, when it is a private one that runs.
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.private
            .as_ref()?
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw)
    }

    /// Starts a killed server again, on the same port and data.
    pub async fn start_again(&mut self) {
        if let Some(Private { port, dir, .. }) = self.private.take() {
            self.private = Some(Private::spawn(dir, port).await);
        }
    }
}

impl Private {
    async fn spawn(dir: tempfile::TempDir, port: u16) -> Self {
        let binary = nx_binary();
        assert!(
            binary.is_file(),
            "the MongoDB-wire test server is missing at {}: run scripts/setup.sh, or set MONGODB_URI to a real MongoDB",
            binary.display()
        );
        let log = std::fs::File::create(dir.path().join("nx.log")).expect("nx log file");
        let mut child = Command::new(&binary)
            // One SQLite file per database, so databases are separate as
            // on a real MongoDB.
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--pid-file")
            .arg(dir.path().join("nx.pid"))
            .args(["--host", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            let log = || std::fs::read_to_string(dir.path().join("nx.log")).unwrap_or_default();
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nx-27017 exited at start with {status}; log:\n{}", log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nx-27017 did not listen on port {port} within 30 s; log:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, port, dir }
    }
}
