//! Running CNI plugins as the spec says (configuration on stdin, the
//! `CNI_*` environment, the result or error on stdout), and the network
//! namespaces they act on.

use std::{path::Path, process::Stdio};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use super::{CNI_VERSION, NetworkError, Networks, PortMapping};

impl Networks {
    pub(super) async fn exec(
        &self,
        command: &'static str,
        id: &str,
        netns: &Path,
        network: &str,
        ifname: &str,
        config: Value,
    ) -> Result<Value, NetworkError> {
        let plugin = config["type"].as_str().unwrap_or_default().to_owned();
        let fail = |reason: String| NetworkError::Plugin {
            command,
            plugin: plugin.clone(),
            container: id.to_owned(),
            network: network.to_owned(),
            reason,
        };
        let mut child = tokio::process::Command::new(self.plugin_dir.join(&plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.plugin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| {
                fail(format!(
                    "cannot run {}: {err}",
                    self.plugin_dir.join(&plugin).display()
                ))
            })?;
        let input = serde_json::to_vec(&config).map_err(|e| fail(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&input)
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !output.status.success() {
            let message: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            let reason = match message.get("msg").and_then(Value::as_str) {
                Some(msg) => format!(
                    "{msg}{}",
                    message
                        .get("details")
                        .and_then(Value::as_str)
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
                None => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            };
            return Err(fail(reason));
        }
        if command == "DEL" || output.stdout.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&output.stdout)
            .map_err(|err| fail(format!("result does not parse: {err}")))
    }
}

/// One plugin's configuration within a list, as the CNI spec builds it.
pub(super) fn plugin_config(
    mut plugin: Value,
    network: &str,
    previous: Option<&Value>,
    ports: &[PortMapping],
) -> Value {
    plugin["cniVersion"] = json!(CNI_VERSION);
    plugin["name"] = json!(network);
    if let Some(previous) = previous
        && !previous.is_null()
    {
        plugin["prevResult"] = previous.clone();
    }
    if plugin["capabilities"]["portMappings"] == json!(true) {
        plugin["runtimeConfig"] = json!({
            "portMappings": ports
                .iter()
                .map(|p| json!({ "hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol }))
                .collect::<Vec<_>>()
        });
    }
    plugin
}

/// The first IPv4 address of a CNI result, without its prefix length.
pub(super) fn first_address(result: &Value) -> Option<String> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .find(|address| address.contains('.'))
        .and_then(|address| address.split('/').next())
        .map(str::to_owned)
}

/// Creates a persistent network namespace at `path`: a thread moves into a
/// new namespace and bind-mounts it there, the way `ip netns add` does.
pub(super) fn create_netns(path: &Path) -> Result<(), NetworkError> {
    use nix::{
        mount::{MsFlags, mount},
        sched::{CloneFlags, unshare},
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| NetworkError::State(e.to_string()))?;
    }
    std::fs::File::create(path)
        .map_err(|e| NetworkError::State(format!("{}: {e}", path.display())))?;
    let target = path.to_owned();
    let created = std::thread::spawn(move || -> Result<(), String> {
        // Only this thread changes namespace; it ends right after.
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount: {e}"))
    })
    .join()
    .map_err(|_| NetworkError::State("the namespace thread panicked".into()))?;
    created.map_err(|reason| {
        let _ = std::fs::remove_file(path);
        NetworkError::State(format!(
            "cannot create network namespace {}: {reason}",
            path.display()
        ))
    })
}

pub(super) fn remove_netns(path: &Path) {
    if path.exists() {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_plugin_configs_as_the_spec_says() {
        let ports = [PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
        }];
        let previous = json!({ "ips": [{ "address": "10.89.1.2/24" }] });
        let config = plugin_config(
            json!({ "type": "portmap", "capabilities": { "portMappings": true } }),
            "oakestra",
            Some(&previous),
            &ports,
        );
        assert_eq!(config["name"], "oakestra");
        assert_eq!(config["cniVersion"], CNI_VERSION);
        assert_eq!(config["prevResult"], previous);
        assert_eq!(config["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        let bridge = plugin_config(json!({ "type": "bridge" }), "oakestra", None, &ports);
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());
        assert_eq!(first_address(&previous).as_deref(), Some("10.89.1.2"));
    }
}
