//! Registry credentials as docker keeps them: a `config.json`.

use std::{collections::HashMap, path::Path};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::Deserialize;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Reads registry credentials from a docker `config.json`-style file:
/// `{"auths": {"host:port": {"auth": base64("user:password")}}}` or with
/// `username` and `password`.
pub fn read_credentials(path: &Path) -> Result<HashMap<String, (String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read registry auth file {}: {err}", path.display()))?;
    let config: DockerConfig = serde_json::from_str(&text).map_err(|err| {
        format!(
            "registry auth file {} is not a docker config.json: {err}",
            path.display()
        )
    })?;
    let mut credentials = HashMap::new();
    for (key, entry) in config.auths {
        let host = registry_host(&key);
        let pair = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) => {
                let decoded = STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .and_then(|text| {
                        text.split_once(':')
                            .map(|(u, p)| (u.to_owned(), p.to_owned()))
                    });
                decoded.ok_or_else(|| {
                    format!(
                        "registry auth file {}: `auth` of `{key}` is not base64 of user:password",
                        path.display()
                    )
                })?
            }
            (None, Some(user), Some(password)) => (user, password),
            _ => {
                return Err(format!(
                    "registry auth file {}: `{key}` has neither `auth` nor `username` and `password`",
                    path.display()
                ));
            }
        };
        credentials.insert(host, pair);
    }
    Ok(credentials)
}

/// `https://host:port/v1/` → `host:port`; Docker Hub's legacy key →
/// `docker.io`.
fn registry_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or(without_scheme);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_credentials() {
        let dir = std::env::temp_dir().join(format!("regauth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                          "127.0.0.1:5000": {"username": "a", "password": "b:c"}}}"#,
        )
        .unwrap();
        let credentials = read_credentials(&path).unwrap();
        assert_eq!(credentials["docker.io"], ("user".into(), "pass".into()));
        assert_eq!(credentials["127.0.0.1:5000"], ("a".into(), "b:c".into()));
        std::fs::write(&path, r#"{"auths": {"x": {"auth": "!!"}}}"#).unwrap();
        assert!(read_credentials(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
