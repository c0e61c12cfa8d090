//! How the marketplace (verification) and the monitor (pulls) reach
//! registries: their flags, and the credentials file they read.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::Deserialize;

/// The registry flags of the marketplace and the monitor.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryArgs {
    /// Registry credentials, as a docker `config.json` (`{"auths": {...}}`).
    /// Registries not named there are accessed anonymously.
    #[arg(long, env = "ADDONS_REGISTRY_AUTH", value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,

    /// A registry (`host:port`) to reach over plain HTTP instead of HTTPS.
    /// Repeat for several; comma-separated in the environment.
    #[arg(
        long = "insecure-registry",
        env = "ADDONS_INSECURE_REGISTRIES",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,

    /// A registry (`host` or `host:port`) images may name. Repeat for
    /// several; comma-separated in the environment. Without any, every
    /// registry at a public address may be named; one that resolves to a
    /// loopback, private, link-local or other non-public address (the
    /// machine itself, the internal network, a cloud's metadata service)
    /// is reached only when named here or with --insecure-registry.
    #[arg(
        long = "allowed-registry",
        env = "ADDONS_ALLOWED_REGISTRIES",
        value_name = "HOST[:PORT]",
        value_delimiter = ','
    )]
    pub allowed_registries: Vec<String>,
}

impl RegistryArgs {
    /// The credentials of `--registry-auth`; none without it.
    pub fn credentials(&self) -> anyhow::Result<HashMap<String, (String, String)>> {
        match &self.registry_auth {
            Some(path) => read_registry_credentials(path),
            None => Ok(HashMap::new()),
        }
    }
}

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
fn read_registry_credentials(path: &Path) -> anyhow::Result<HashMap<String, (String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        anyhow::anyhow!("cannot read registry auth file {}: {err}", path.display())
    })?;
    let config: DockerConfig = serde_json::from_str(&text).map_err(|err| {
        anyhow::anyhow!(
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
                    anyhow::anyhow!(
                        "registry auth file {}: `auth` of `{key}` is not base64 of user:password",
                        path.display()
                    )
                })?
            }
            (None, Some(user), Some(password)) => (user, password),
            _ => anyhow::bail!(
                "registry auth file {}: `{key}` has neither `auth` nor `username` and `password`",
                path.display()
            ),
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
        let credentials = read_registry_credentials(&path).unwrap();
        assert_eq!(credentials["docker.io"], ("user".into(), "pass".into()));
        assert_eq!(credentials["127.0.0.1:5000"], ("a".into(), "b:c".into()));
        std::fs::write(&path, r#"{"auths": {"x": {"auth": "!!"}}}"#).unwrap();
        assert!(read_registry_credentials(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
