//! OCI runtime specs for addon containers, built with the `oci-spec`
//! builders on top of the runtime-spec defaults (the same as `runc spec`:
//! standard mounts, masked and read-only paths, new namespaces).

use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec,
};

/// What an addon container runs, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSpec {
    /// Container id; also the cgroup leaf.
    pub id: String,
    /// Host name inside the container (the service name).
    pub hostname: String,
    /// The process: entrypoint and arguments.
    pub args: Vec<String>,
    /// Environment as `KEY=value`.
    pub env: Vec<String>,
    /// Working directory; `/` when empty.
    pub cwd: String,
    /// Bind mounts: host path, container path, read-only.
    pub binds: Vec<(PathBuf, String, bool)>,
    /// Privileged mode: every capability.
    pub privileged: bool,
    /// Network namespace to join; a fresh, unconnected one when `None`.
    pub netns: Option<PathBuf>,
}

/// Docker's default capability set: enough for ordinary services, no
/// administration of the host.
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

const ALL_CAPABILITIES: &[Capability] = &[
    Capability::AuditControl,
    Capability::AuditRead,
    Capability::AuditWrite,
    Capability::BlockSuspend,
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::Kill,
    Capability::Lease,
    Capability::LinuxImmutable,
    Capability::MacAdmin,
    Capability::MacOverride,
    Capability::Mknod,
    Capability::NetAdmin,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::Setuid,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysChroot,
    Capability::SysModule,
    Capability::SysNice,
    Capability::SysPacct,
    Capability::SysPtrace,
    Capability::SysRawio,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Syslog,
    Capability::WakeAlarm,
];

/// The runtime spec of an addon container in containerd namespace
/// `namespace`.
pub fn build_spec(run: &RunSpec, namespace: &str) -> Result<Spec, String> {
    let caps: std::collections::HashSet<Capability> = if run.privileged {
        ALL_CAPABILITIES.iter().copied().collect()
    } else {
        DEFAULT_CAPABILITIES.iter().copied().collect()
    };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()
        .map_err(|err| err.to_string())?;
    let process = ProcessBuilder::default()
        .args(run.args.clone())
        .env(run.env.clone())
        .cwd(if run.cwd.is_empty() {
            "/".to_owned()
        } else {
            run.cwd.clone()
        })
        .capabilities(capabilities)
        .no_new_privileges(!run.privileged)
        .build()
        .map_err(|err| err.to_string())?;
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_hostname(Some(run.hostname.clone()));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .map_err(|err| err.to_string())?,
    ));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (source, destination, readonly) in &run.binds {
        let mut options = vec!["rbind".to_owned(), "rprivate".to_owned()];
        options.push(if *readonly { "ro" } else { "rw" }.to_owned());
        mounts.push(
            MountBuilder::default()
                .destination(destination)
                .typ("bind")
                .source(source)
                .options(options)
                .build()
                .map_err(|err| err.to_string())?,
        );
    }
    spec.set_mounts(Some(mounts));
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(format!("/{namespace}/{}", run.id).into()));
        if let Some(netns) = &run.netns
            && let Some(namespaces) = linux.namespaces_mut()
        {
            for ns in namespaces.iter_mut() {
                if ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network {
                    ns.set_path(Some(netns.clone()));
                }
            }
        }
        if run.privileged {
            linux.set_masked_paths(None);
            linux.set_readonly_paths(None);
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_an_unprivileged_spec_with_binds() {
        let run = RunSpec {
            id: "root_api".into(),
            hostname: "api".into(),
            args: vec!["/bin/busybox".into(), "httpd".into()],
            env: vec!["PATH=/bin".into()],
            cwd: String::new(),
            binds: vec![("/var/lib/x/hosts".into(), "/etc/hosts".into(), true)],
            privileged: false,
            netns: Some("/run/netns/root_api".into()),
        };
        let spec = build_spec(&run, "oakestra").unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["hostname"], "api");
        assert_eq!(json["process"]["args"][1], "httpd");
        assert_eq!(json["process"]["cwd"], "/");
        assert_eq!(json["root"]["path"], "rootfs");
        assert_eq!(json["linux"]["cgroupsPath"], "/oakestra/root_api");
        let caps = json["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert!(caps.iter().any(|c| c == "CAP_NET_BIND_SERVICE"));
        assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"), "not privileged");
        let mounts = json["mounts"].as_array().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["destination"] == "/etc/hosts" && m["options"][2] == "ro")
        );
        assert!(
            mounts.iter().any(|m| m["destination"] == "/proc"),
            "standard mounts kept"
        );

        let privileged = build_spec(
            &RunSpec {
                privileged: true,
                ..run
            },
            "oakestra",
        )
        .unwrap();
        let json = serde_json::to_value(&privileged).unwrap();
        let caps = json["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert!(caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
    }
}
