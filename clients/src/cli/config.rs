//! The CLI's config file: named contexts (servers, CA, token file, client
//! certificate) and the current one, like kubectl's. It lives at
//! `--config`, `$OAK_ADDONS_CONFIG`, or `~/.config/oak-addons/config.yaml`,
//! and holds paths, never tokens themselves.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// Where the servers are and how to reach them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// URL of the marketplace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketplace: Option<String>,
    /// URL of the manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    /// URL of a node's monitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<String>,
    /// CA certificate file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// File holding the bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Token for the marketplace only (a token whose audience is the
    /// marketplace); the marketplace gets it instead of `token_file`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketplace_token_file: Option<PathBuf>,
    /// Token for the manager only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_token_file: Option<PathBuf>,
    /// Token for the node's monitor only: a node that was given the
    /// manager's token could replay it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_token_file: Option<PathBuf>,
    /// Client certificate file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// Its key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

/// The config file's path.
pub fn path(flag: Option<&Path>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_owned();
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("oak-addons").join("config.yaml")
}

/// Reads the file; a missing one is empty.
pub fn load(path: &Path) -> Result<ConfigFile, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_yaml_ng::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(err) => Err(format!("cannot read {}: {err}", path.display())),
    }
}

/// Writes the file (readable by its owner only).
pub fn save(path: &Path, config: &ConfigFile) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    let text = serde_yaml_ng::to_string(config).map_err(|err| err.to_string())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_typos() {
        let dir = std::env::temp_dir().join(format!("oak-config-{}", std::process::id()));
        let file = dir.join("config.yaml");
        assert_eq!(load(&file).unwrap(), ConfigFile::default());
        let mut config = ConfigFile::default();
        config.contexts.insert(
            "prod".into(),
            Context {
                manager: Some("https://m:11101".into()),
                token_file: Some("/t".into()),
                ..Context::default()
            },
        );
        config.current_context = Some("prod".into());
        save(&file, &config).unwrap();
        assert_eq!(load(&file).unwrap(), config);
        std::fs::write(&file, "contexts: {prod: {managr: x}}").unwrap();
        assert!(load(&file).unwrap_err().contains("managr"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
