//! Conversions between [`Descriptor`] and its two protobuf forms: the
//! marketplace's `Addon` and the engine's `AddonSnapshot`. The two contracts
//! declare the same shapes in their own packages so they can evolve apart;
//! one macro writes the conversions of both.

use oakestra_addons_proto::{engine::v1 as epb, marketplace::v1 as mpb};

use crate::{
    Descriptor, HealthCheck, ImageSignature, Mount, MountSource, Network, Port, Privilege,
    PrivilegeKind, Probe, Resources, Service, Volume,
};

macro_rules! conversions {
    ($pb:ident, $addon:ident) => {
        impl From<$pb::$addon> for Descriptor {
            fn from(addon: $pb::$addon) -> Self {
                Self {
                    version: or_default(addon.version, crate::DEFAULT_VERSION),
                    name: addon.name,
                    description: addon.description,
                    services: addon.services.into_iter().map(Service::from).collect(),
                    volumes: addon.volumes.into_iter().map(Volume::from).collect(),
                    networks: addon.networks.into_iter().map(Network::from).collect(),
                }
            }
        }

        impl From<Descriptor> for $pb::$addon {
            // The marketplace's `Addon` has record fields besides.
            #[allow(clippy::needless_update)]
            fn from(descriptor: Descriptor) -> Self {
                Self {
                    name: descriptor.name,
                    version: descriptor.version,
                    description: descriptor.description,
                    services: descriptor.services.into_iter().map(Into::into).collect(),
                    volumes: descriptor.volumes.into_iter().map(Into::into).collect(),
                    networks: descriptor.networks.into_iter().map(Into::into).collect(),
                    ..Self::default()
                }
            }
        }

        impl From<$pb::ServiceSpec> for Service {
            fn from(s: $pb::ServiceSpec) -> Self {
                let port = |value: u32| u16::try_from(value).unwrap_or(0);
                Self {
                    ports: s
                        .ports
                        .into_iter()
                        .map(|p| Port {
                            container_port: port(p.container_port),
                            host_port: port(p.host_port),
                            protocol: match $pb::Protocol::try_from(p.protocol) {
                                Ok($pb::Protocol::Unspecified | $pb::Protocol::Tcp) => "tcp".into(),
                                Ok($pb::Protocol::Udp) => "udp".into(),
                                // Kept so that validation names the field.
                                Err(_) => format!("protocol {}", p.protocol),
                            },
                        })
                        .collect(),
                    mounts: s
                        .mounts
                        .into_iter()
                        .map(|m| Mount {
                            source: match m.source {
                                Some($pb::mount::Source::HostPath(path)) => {
                                    MountSource::HostPath(path)
                                }
                                Some($pb::mount::Source::Volume(name)) => MountSource::Volume(name),
                                None => MountSource::Volume(String::new()),
                            },
                            target: m.target,
                            read_only: m.read_only,
                        })
                        .collect(),
                    service_name: s.service_name,
                    image: s.image,
                    command: s.command,
                    environment: s.environment,
                    networks: s.networks,
                    labels: s.labels,
                    resolved_image: Some(s.resolved_image).filter(|r| !r.is_empty()),
                    privileged: s.privileged,
                    inherit_core_environment: s.inherit_core_environment,
                    resources: s
                        .resources
                        .map(|r| Resources {
                            memory_bytes: Some(r.memory_bytes).filter(|v| *v > 0),
                            cpu_millis: Some(r.cpu_millis).filter(|v| *v > 0),
                            pids: Some(r.pids).filter(|v| *v > 0),
                        })
                        .unwrap_or_default(),
                    health_check: s.health_check.map(|h| {
                        let ms = |d: Option<prost_types::Duration>, default: u64| {
                            d.map_or(default, |d| {
                                // Negative or out-of-range values become 0,
                                // which validation rejects with its path.
                                std::time::Duration::try_from(d)
                                    .ok()
                                    .and_then(|d| u64::try_from(d.as_millis()).ok())
                                    .unwrap_or(0)
                            })
                        };
                        HealthCheck {
                            probe: match h.probe {
                                Some($pb::health_check::Probe::Http(http)) => Probe::Http {
                                    port: port(http.port),
                                    path: http.path,
                                },
                                Some($pb::health_check::Probe::Tcp(tcp)) => Probe::Tcp {
                                    port: port(tcp.port),
                                },
                                Some($pb::health_check::Probe::Exec(exec)) => Probe::Exec {
                                    command: exec.command,
                                },
                                // Kept recognisable: validation names it.
                                None => Probe::Tcp { port: 0 },
                            },
                            interval_ms: ms(h.interval, crate::DEFAULT_HEALTH_INTERVAL_MS),
                            timeout_ms: ms(h.timeout, crate::DEFAULT_HEALTH_TIMEOUT_MS),
                            retries: if h.retries == 0 {
                                crate::DEFAULT_HEALTH_RETRIES
                            } else {
                                h.retries
                            },
                            start_period_ms: ms(h.start_period, 0),
                        }
                    }),
                    image_signature: s.image_signature.map(|sig| ImageSignature {
                        payload: sig.payload,
                        signature: sig.signature,
                        key_fingerprint: sig.key_fingerprint,
                    }),
                }
            }
        }

        impl From<Service> for $pb::ServiceSpec {
            fn from(s: Service) -> Self {
                Self {
                    service_name: s.service_name,
                    image: s.image,
                    command: s.command,
                    environment: s.environment,
                    ports: s
                        .ports
                        .into_iter()
                        .map(|p| $pb::PortMapping {
                            container_port: p.container_port.into(),
                            host_port: p.host_port.into(),
                            protocol: if p.protocol == "udp" {
                                $pb::Protocol::Udp
                            } else {
                                $pb::Protocol::Tcp
                            }
                            .into(),
                        })
                        .collect(),
                    mounts: s
                        .mounts
                        .into_iter()
                        .map(|m| $pb::Mount {
                            source: Some(match m.source {
                                MountSource::HostPath(path) => $pb::mount::Source::HostPath(path),
                                MountSource::Volume(name) => $pb::mount::Source::Volume(name),
                            }),
                            target: m.target,
                            read_only: m.read_only,
                        })
                        .collect(),
                    networks: s.networks,
                    labels: s.labels,
                    resolved_image: s.resolved_image.unwrap_or_default(),
                    privileged: s.privileged,
                    inherit_core_environment: s.inherit_core_environment,
                    resources: (s.resources != Resources::default()).then(|| $pb::Resources {
                        memory_bytes: s.resources.memory_bytes.unwrap_or(0),
                        cpu_millis: s.resources.cpu_millis.unwrap_or(0),
                        pids: s.resources.pids.unwrap_or(0),
                    }),
                    health_check: s.health_check.map(|h| {
                        let duration = |ms: u64| {
                            prost_types::Duration::try_from(std::time::Duration::from_millis(ms))
                                .ok()
                        };
                        $pb::HealthCheck {
                            probe: Some(match h.probe {
                                Probe::Http { port, path } => {
                                    $pb::health_check::Probe::Http($pb::HttpProbe {
                                        port: port.into(),
                                        path,
                                    })
                                }
                                Probe::Tcp { port } => {
                                    $pb::health_check::Probe::Tcp($pb::TcpProbe {
                                        port: port.into(),
                                    })
                                }
                                Probe::Exec { command } => {
                                    $pb::health_check::Probe::Exec($pb::ExecProbe { command })
                                }
                            }),
                            interval: duration(h.interval_ms),
                            timeout: duration(h.timeout_ms),
                            retries: h.retries,
                            start_period: duration(h.start_period_ms),
                        }
                    }),
                    image_signature: s.image_signature.map(|sig| $pb::ImageSignature {
                        payload: sig.payload,
                        signature: sig.signature,
                        key_fingerprint: sig.key_fingerprint,
                    }),
                }
            }
        }

        impl From<$pb::Privilege> for Privilege {
            fn from(p: $pb::Privilege) -> Self {
                Self {
                    kind: match $pb::PrivilegeKind::try_from(p.kind) {
                        Ok($pb::PrivilegeKind::Privileged) => Some(PrivilegeKind::Privileged),
                        Ok($pb::PrivilegeKind::HostPath) => Some(PrivilegeKind::HostPath),
                        Ok($pb::PrivilegeKind::HostPort) => Some(PrivilegeKind::HostPort),
                        Ok($pb::PrivilegeKind::CoreComponent) => Some(PrivilegeKind::CoreComponent),
                        Ok($pb::PrivilegeKind::CoreEnvironment) => {
                            Some(PrivilegeKind::CoreEnvironment)
                        }
                        Ok($pb::PrivilegeKind::KeepCoreStopped) => {
                            Some(PrivilegeKind::KeepCoreStopped)
                        }
                        Ok($pb::PrivilegeKind::Unspecified) | Err(_) => None,
                    },
                    service_name: p.service_name,
                    value: p.value,
                    read_only: p.read_only,
                    // A caller cannot say that the policy granted it.
                    by_policy: false,
                }
            }
        }

        impl From<Privilege> for $pb::Privilege {
            // The manager's message also says whether the policy granted
            // it; the marketplace's does not.
            #[allow(clippy::needless_update)]
            fn from(p: Privilege) -> Self {
                Self {
                    kind: match p.kind {
                        Some(PrivilegeKind::Privileged) => $pb::PrivilegeKind::Privileged,
                        Some(PrivilegeKind::HostPath) => $pb::PrivilegeKind::HostPath,
                        Some(PrivilegeKind::HostPort) => $pb::PrivilegeKind::HostPort,
                        Some(PrivilegeKind::CoreComponent) => $pb::PrivilegeKind::CoreComponent,
                        Some(PrivilegeKind::CoreEnvironment) => $pb::PrivilegeKind::CoreEnvironment,
                        Some(PrivilegeKind::KeepCoreStopped) => $pb::PrivilegeKind::KeepCoreStopped,
                        None => $pb::PrivilegeKind::Unspecified,
                    }
                    .into(),
                    service_name: p.service_name,
                    value: p.value,
                    read_only: p.read_only,
                    ..Default::default()
                }
            }
        }

        impl From<$pb::VolumeSpec> for Volume {
            fn from(v: $pb::VolumeSpec) -> Self {
                Self {
                    name: v.name,
                    driver: or_default(v.driver, "local"),
                    driver_opts: v.driver_opts,
                    labels: v.labels,
                }
            }
        }

        impl From<Volume> for $pb::VolumeSpec {
            fn from(v: Volume) -> Self {
                Self {
                    name: v.name,
                    driver: v.driver,
                    driver_opts: v.driver_opts,
                    labels: v.labels,
                }
            }
        }

        impl From<$pb::NetworkSpec> for Network {
            fn from(n: $pb::NetworkSpec) -> Self {
                Self {
                    name: n.name,
                    driver: or_default(n.driver, "bridge"),
                    enable_ipv6: n.enable_ipv6,
                }
            }
        }

        impl From<Network> for $pb::NetworkSpec {
            fn from(n: Network) -> Self {
                Self {
                    name: n.name,
                    driver: n.driver,
                    enable_ipv6: n.enable_ipv6,
                }
            }
        }
    };
}

conversions!(mpb, Addon);
conversions!(epb, AddonSnapshot);

/// A message's string field, or `default` where it is empty (proto3's
/// unset): an empty version (a client that predates versions, or an
/// Oakestra descriptor) means [`crate::DEFAULT_VERSION`], an empty volume
/// driver `local`, an empty network driver `bridge`.
fn or_default(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_owned()
    } else {
        value
    }
}

impl Descriptor {
    /// The descriptor part of a marketplace `Addon` message; the record
    /// fields (`id`, `status`, times, `revision`) are left out. Defaults are
    /// filled in: protocol `tcp`, volume driver `local`, network driver
    /// `bridge`. A port beyond 65535 becomes 0, an unknown protocol or a
    /// mount without a source stays recognisable, so [`crate::validate`]
    /// rejects them with their field paths.
    pub fn from_proto(addon: mpb::Addon) -> Self {
        addon.into()
    }

    /// A marketplace `Addon` message holding the descriptor; the caller fills
    /// in the record fields (`id`, `status`, times, `revision`).
    pub fn into_proto(self) -> mpb::Addon {
        self.into()
    }

    /// The descriptor held by an engine `AddonSnapshot`.
    pub fn from_snapshot(addon: epb::AddonSnapshot) -> Self {
        addon.into()
    }

    /// The engine's `AddonSnapshot` of the descriptor.
    pub fn into_snapshot(self) -> epb::AddonSnapshot {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fills_in_defaults() {
        let message = mpb::Addon {
            name: "x".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "s".into(),
                image: "r/i:1".into(),
                resolved_image: "r/i@sha256:00".into(),
                ports: vec![mpb::PortMapping {
                    container_port: 80,
                    host_port: 70000,
                    protocol: mpb::Protocol::Unspecified.into(),
                }],
                mounts: vec![mpb::Mount {
                    source: Some(mpb::mount::Source::Volume("v".into())),
                    target: "/data".into(),
                    read_only: true,
                }],
                ..Default::default()
            }],
            volumes: vec![mpb::VolumeSpec {
                name: "v".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let descriptor = Descriptor::from_proto(message);
        let service = &descriptor.services[0];
        assert_eq!(service.resolved_image.as_deref(), Some("r/i@sha256:00"));
        assert_eq!(service.ports[0].protocol, "tcp");
        assert_eq!(service.mounts[0].to_string(), "v:/data:ro");
        assert_eq!(
            service.ports[0].host_port, 0,
            "out of range becomes invalid"
        );
        assert_eq!(descriptor.volumes[0].driver, "local");
        let back = descriptor.clone().into_proto();
        assert_eq!(Descriptor::from_proto(back), descriptor);
        let snapshot = descriptor.clone().into_snapshot();
        assert_eq!(Descriptor::from_snapshot(snapshot), descriptor);
    }

    #[test]
    fn unknown_protocols_and_sourceless_mounts_are_rejected_by_field() {
        let mut message = mpb::Addon {
            name: "x".into(),
            services: vec![mpb::ServiceSpec {
                service_name: "s".into(),
                image: "r/i:1".into(),
                ports: vec![mpb::PortMapping {
                    container_port: 80,
                    host_port: 80,
                    protocol: 9,
                }],
                mounts: vec![mpb::Mount {
                    source: None,
                    target: "/data".into(),
                    read_only: false,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        message.description.clear();
        let fields: Vec<String> = crate::validate(&Descriptor::from_proto(message))
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            ["services[0].ports[0].protocol", "services[0].mounts[0]"]
        );
    }
}
