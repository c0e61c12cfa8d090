//! Oakestra's clients speak REST: `curl`, as they and their users' scripts
//! do, over HTTP/1.1.

#![allow(clippy::unwrap_used)] // Test harness: fails loudly by design.

use serde_json::Value;

/// What `curl` got back.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The response head, as curl wrote it.
    pub headers: String,
    /// The body as JSON; `Null` when empty or not JSON by its content type.
    pub body: Value,
    /// The body as text.
    pub text: String,
}

/// `METHOD url` with curl over HTTP/1.1, a JSON `body` and extra `headers`.
pub async fn curl(method: &str, url: &str, body: Option<&Value>, headers: &[String]) -> Answer {
    curl_trusting(None, method, url, body, headers).await
}

/// [`curl`], trusting the CA `ca` for `https` URLs.
pub async fn curl_trusting(
    ca: Option<&std::path::Path>,
    method: &str,
    url: &str,
    body: Option<&Value>,
    headers: &[String],
) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let mut command = tokio::process::Command::new("curl");
    if let Some(ca) = ca {
        command.arg("--cacert").arg(ca);
    }
    command.args([
        "-sS",
        "--http1.1",
        "-X",
        method,
        "-D",
        &head.display().to_string(),
        "-w",
        "\n%{http_code}",
    ]);
    for header in headers {
        command.args(["-H", header]);
    }
    if let Some(body) = body {
        let file = dir.path().join("body");
        std::fs::write(&file, body.to_string()).unwrap();
        command.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
        ]);
    }
    let output = command.arg(url).output().await.unwrap();
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    let headers = std::fs::read_to_string(&head).unwrap_or_default();
    let json = headers
        .to_ascii_lowercase()
        .contains("content-type: application/json");
    Answer {
        status: status.trim().parse().unwrap(),
        body: if body.is_empty() || !json {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
        },
        headers,
        text: body.to_owned(),
    }
}
