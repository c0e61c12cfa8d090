//! What a stranger can hold of a server before it knows who they are,
//! against the real binaries: silent TLS handshakes, bodies sent to a
//! server that would refuse the sender, and connections without end.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{ServerProcess, binary, pki::TestCa};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A marketplace with TLS and tokens, in `dir`.
async fn secured(dir: &std::path::Path, extra: &[&str]) -> (ServerProcess, TestCa) {
    let ca = TestCa::new(dir, "ca");
    let server = ca.server("server");
    let secret = dir.join("secret");
    std::fs::write(&secret, "a secret of at least thirty-two bytes!").unwrap();
    let store = format!("embedded:{}/m.redb", dir.display());
    let mut args = vec![
        "--store".to_owned(),
        store,
        "--tls-cert".to_owned(),
        server.cert.display().to_string(),
        "--tls-key".to_owned(),
        server.key.display().to_string(),
        "--jwt-secret-file".to_owned(),
        secret.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (
        ServerProcess::start(&binary("addons-marketplace"), &args).await,
        ca,
    )
}

/// Whether a TLS handshake (and one request) with `server` from the local
/// address `from` completes within `patience`.
async fn handshakes(ca: &TestCa, server: &ServerProcess, from: &str, patience: u64) -> bool {
    let output = tokio::process::Command::new("curl")
        .arg("--cacert")
        .arg(ca.cert())
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--interface",
            from,
            "--max-time",
            &patience.to_string(),
            &format!("https://{}/api/v1/marketplace/addons", server.addr()),
        ])
        .output()
        .await
        .unwrap();
    output.status.success()
}

/// Hundreds of connections that never say a word of TLS, from one peer,
/// keep no one else from connecting: the accept loop never waits on them,
/// and one peer holds at most a few handshakes.
#[tokio::test]
async fn silent_handshakes_keep_no_one_out() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = secured(dir.path(), &[]).await;
    assert!(handshakes(&ca, &server, "127.0.0.2", 5).await);
    let mut silent = Vec::new();
    for _ in 0..300 {
        if let Ok(stream) = tokio::net::TcpStream::connect(server.addr()).await {
            silent.push(stream);
        }
    }
    // Another peer gets through at once, while the silent ones are held.
    assert!(
        handshakes(&ca, &server, "127.0.0.2", 3).await,
        "a handshake from another peer waited behind silent connections"
    );
    drop(silent);
}

/// A REST request with a body, from a caller the server refuses: it is
/// answered 401 at once, without waiting for (or reading) the body.
#[tokio::test]
async fn a_strangers_body_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a secret of at least thirty-two bytes!").unwrap();
    let server = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store,
            "--jwt-secret-file",
            &secret.display().to_string(),
        ],
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    // The head of a 2 MiB publish; the body never comes.
    let head = format!(
        "POST /api/v1/marketplace/addons HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: 2000000\r\n\r\n{{",
        server.addr()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 512];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut answer))
        .await
        .expect("an answer before the body")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..read]);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("CREDENTIALS_MISSING"), "{text}");
}

/// `--max-connections`: one more connection is closed as it comes; a
/// place freed is taken again.
#[tokio::test]
async fn connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let server = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store, "--max-connections", "4"],
    )
    .await;
    // Its store is its own, whatever umask it was started with.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("m.redb"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "store mode {mode:o}");
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(server.addr()).await.unwrap());
    }
    let closed = |mut stream: tokio::net::TcpStream| async move {
        let mut byte = [0_u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(3), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    };
    let fifth = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    assert!(closed(fifth).await, "a fifth connection was kept");
    drop(held.pop());
    // The freed place is given back (the server notices the close first).
    integration_tests::eventually("a place is free again", Duration::from_secs(10), || async {
        let mut stream = tokio::net::TcpStream::connect(server.addr())
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /api/v1/marketplace/addons HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = vec![0; 64];
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut answer)).await {
            Ok(Ok(n)) if n > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}
