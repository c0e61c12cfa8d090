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
    #[serde(default)]
    pub current_context: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// Where the servers are and how to reach them. `config set-context` takes
/// the same fields as flags (`--set-<field>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Context {
    /// URL of the marketplace.
    #[arg(long = "set-marketplace", value_name = "URL")]
    pub marketplace: Option<String>,
    /// URL of the manager.
    #[arg(long = "set-manager", value_name = "URL")]
    pub manager: Option<String>,
    /// URL of a node's monitor.
    #[arg(long = "set-monitor", value_name = "URL")]
    pub monitor: Option<String>,
    /// CA certificate file.
    #[arg(long = "set-ca-cert", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// File holding the bearer token.
    #[arg(long = "set-token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Token for the marketplace only (a token whose audience is the
    /// marketplace); the marketplace gets it instead of `token_file`'s.
    #[arg(long = "set-marketplace-token-file", value_name = "FILE")]
    pub marketplace_token_file: Option<PathBuf>,
    /// Token for the manager only.
    #[arg(long = "set-manager-token-file", value_name = "FILE")]
    pub manager_token_file: Option<PathBuf>,
    /// Token for the node's monitor only: a node that was given the
    /// manager's token could replay it there.
    #[arg(long = "set-monitor-token-file", value_name = "FILE")]
    pub monitor_token_file: Option<PathBuf>,
    /// Client certificate file.
    #[arg(long = "set-client-cert", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// Its key file.
    #[arg(long = "set-client-key", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
}

impl Context {
    /// The fields `changes` sets, over this context's; files are kept as
    /// absolute paths, so the context works from any directory.
    pub fn update(&mut self, changes: Context) {
        let Context {
            marketplace,
            manager,
            monitor,
            ca_cert,
            token_file,
            marketplace_token_file,
            manager_token_file,
            monitor_token_file,
            client_cert,
            client_key,
        } = changes;
        for (field, value) in [
            (&mut self.marketplace, marketplace),
            (&mut self.manager, manager),
            (&mut self.monitor, monitor),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        for (field, value) in [
            (&mut self.ca_cert, ca_cert),
            (&mut self.token_file, token_file),
            (&mut self.marketplace_token_file, marketplace_token_file),
            (&mut self.manager_token_file, manager_token_file),
            (&mut self.monitor_token_file, monitor_token_file),
            (&mut self.client_cert, client_cert),
            (&mut self.client_key, client_key),
        ] {
            if let Some(value) = value {
                *field = Some(std::path::absolute(&value).unwrap_or(value));
            }
        }
    }
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
    // Unset fields are left out, not written as nulls.
    let mut value = serde_yaml_ng::to_value(config).map_err(|err| err.to_string())?;
    without_nulls(&mut value);
    let text = serde_yaml_ng::to_string(&value).map_err(|err| err.to_string())?;
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

/// `value` with the null entries of its mappings left out.
fn without_nulls(value: &mut serde_yaml_ng::Value) {
    if let serde_yaml_ng::Value::Mapping(map) = value {
        map.retain(|_, v| !v.is_null());
        map.values_mut().for_each(without_nulls);
    }
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
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("null") && !text.contains("marketplace"),
            "{text}"
        );
        std::fs::write(&file, "contexts: {prod: {managr: x}}").unwrap();
        assert!(load(&file).unwrap_err().contains("managr"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
