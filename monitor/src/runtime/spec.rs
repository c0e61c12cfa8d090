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
    /// The image's `USER`: `uid` or `uid:gid`; root when empty.
    pub user: String,
    /// Memory, CPU and process limits.
    pub limits: addons_descriptor::Resources,
}

/// The CFS period CPU limits are expressed in, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The uid and gid of an image's `USER`. Names would need the image's
/// `/etc/passwd`; they are refused rather than run as root.
fn parse_user(user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (uid, gid) = user.split_once(':').unwrap_or((user, ""));
    let uid: u32 = uid.parse().map_err(|_| {
        format!("the image's USER `{user}` is a name; only a numeric uid[:gid] is supported")
    })?;
    let gid: u32 = if gid.is_empty() {
        uid
    } else {
        gid.parse().map_err(|_| {
            format!(
                "the image's USER `{user}` names a group; only a numeric uid[:gid] is supported"
            )
        })?
    };
    Ok((uid, gid))
}

/// The cgroup limits of `limits`, as the runtime spec writes them.
fn resources(
    limits: &addons_descriptor::Resources,
) -> Result<oci_spec::runtime::LinuxResources, String> {
    let mut value = serde_json::json!({});
    if let Some(memory) = limits.memory_bytes {
        // No swap beyond the limit: memory+swap equals memory.
        value["memory"] = serde_json::json!({ "limit": memory, "swap": memory });
    }
    if let Some(millis) = limits.cpu_millis {
        value["cpu"] = serde_json::json!({
            "quota": u64::from(millis) * CPU_PERIOD_US / 1000,
            "period": CPU_PERIOD_US,
        });
    }
    if let Some(pids) = limits.pids {
        value["pids"] = serde_json::json!({ "limit": pids });
    }
    serde_json::from_value(value).map_err(|err| format!("resource limits: {err}"))
}

/// Docker's default capability set without `CAP_NET_RAW` (raw sockets
/// forge packets: to the node's loopback, to other containers' addresses):
/// enough for ordinary services, no administration of the host.
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
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
        .user({
            let (uid, gid) = parse_user(&run.user)?;
            oci_spec::runtime::UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(|err| err.to_string())?
        })
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
        } else {
            linux.set_seccomp(Some(super::seccomp::profile()));
        }
        let mut limits = resources(&run.limits)?;
        // Every device denied first (runc then allows its default set:
        // null, zero, full, random, urandom, tty, the pts); a privileged
        // container gets them all.
        let devices: Vec<oci_spec::runtime::LinuxDeviceCgroup> = serde_json::from_value(
            serde_json::json!([{ "allow": run.privileged, "access": "rwm" }]),
        )
        .map_err(|err| format!("device rules: {err}"))?;
        limits.set_devices(Some(devices));
        linux.set_resources(Some(limits));
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
            user: "1000:100".into(),
            limits: addons_descriptor::Resources {
                memory_bytes: Some(64 << 20),
                cpu_millis: Some(500),
                pids: Some(64),
            },
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
        assert!(!caps.iter().any(|c| c == "CAP_NET_RAW"), "no raw sockets");
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
        assert_eq!(json["process"]["noNewPrivileges"], true);
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["process"]["user"]["gid"], 100);
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert!(
            json["linux"]["maskedPaths"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        );
        let limits = &json["linux"]["resources"];
        assert_eq!(limits["memory"]["limit"], 64 << 20);
        assert_eq!(limits["cpu"]["quota"], 50_000);
        assert_eq!(limits["pids"]["limit"], 64);
        assert_eq!(
            limits["devices"],
            serde_json::json!([{ "allow": false, "access": "rwm" }]),
            "every device denied but runc's defaults"
        );
        assert!(
            build_spec(
                &RunSpec {
                    user: "nobody".into(),
                    ..run.clone()
                },
                "oakestra"
            )
            .unwrap_err()
            .contains("numeric")
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
        assert!(
            json["linux"]["seccomp"].is_null(),
            "no seccomp when privileged"
        );
    }
}
