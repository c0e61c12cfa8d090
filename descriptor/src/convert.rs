//! Conversions between the protobuf `Addon` message and [`Descriptor`].

use oakestra_addons_proto::marketplace::v1 as pb;

use crate::{Descriptor, Network, Port, Service, Volume};

impl Descriptor {
    /// The descriptor part of an `Addon` message; the record fields (`id`,
    /// `status`, times, `revision`) are left out. Defaults are filled in:
    /// protocol `tcp`, volume driver `local`, network driver `bridge`. A
    /// port beyond 65535 becomes 0, which [`crate::validate`] rejects with
    /// its field path.
    pub fn from_proto(addon: pb::Addon) -> Self {
        Self {
            name: addon.name,
            description: addon.description,
            services: addon.services.into_iter().map(Service::from).collect(),
            volumes: addon.volumes.into_iter().map(Volume::from).collect(),
            networks: addon.networks.into_iter().map(Network::from).collect(),
        }
    }

    /// An `Addon` message holding the descriptor; the caller fills in the
    /// record fields (`id`, `status`, times, `revision`).
    pub fn into_proto(self) -> pb::Addon {
        pb::Addon {
            name: self.name,
            description: self.description,
            services: self.services.into_iter().map(Into::into).collect(),
            volumes: self.volumes.into_iter().map(Into::into).collect(),
            networks: self.networks.into_iter().map(Into::into).collect(),
            ..pb::Addon::default()
        }
    }
}

impl From<pb::ServiceSpec> for Service {
    fn from(s: pb::ServiceSpec) -> Self {
        let port = |value: u32| u16::try_from(value).unwrap_or(0);
        Self {
            ports: s
                .ports
                .into_iter()
                .map(|p| Port {
                    container_port: port(p.container_port),
                    host_port: port(p.host_port),
                    protocol: if p.protocol.is_empty() {
                        "tcp".to_owned()
                    } else {
                        p.protocol.to_ascii_lowercase()
                    },
                })
                .collect(),
            service_name: s.service_name,
            image: s.image,
            command: s.command,
            environment: s.environment.into_iter().collect(),
            volumes: s.volumes,
            networks: s.networks,
            labels: s.labels.into_iter().collect(),
            resolved_image: Some(s.resolved_image).filter(|r| !r.is_empty()),
            privileged: s.privileged,
            inherit_core_environment: s.inherit_core_environment,
        }
    }
}

impl From<Service> for pb::ServiceSpec {
    fn from(s: Service) -> Self {
        Self {
            service_name: s.service_name,
            image: s.image,
            command: s.command,
            environment: s.environment.into_iter().collect(),
            ports: s
                .ports
                .into_iter()
                .map(|p| pb::PortMapping {
                    container_port: p.container_port.into(),
                    host_port: p.host_port.into(),
                    protocol: p.protocol,
                })
                .collect(),
            volumes: s.volumes,
            networks: s.networks,
            labels: s.labels.into_iter().collect(),
            resolved_image: s.resolved_image.unwrap_or_default(),
            privileged: s.privileged,
            inherit_core_environment: s.inherit_core_environment,
        }
    }
}

impl From<pb::VolumeSpec> for Volume {
    fn from(v: pb::VolumeSpec) -> Self {
        Self {
            name: v.name,
            driver: if v.driver.is_empty() {
                "local".into()
            } else {
                v.driver
            },
            driver_opts: v.driver_opts.into_iter().collect(),
            labels: v.labels.into_iter().collect(),
        }
    }
}

impl From<Volume> for pb::VolumeSpec {
    fn from(v: Volume) -> Self {
        Self {
            name: v.name,
            driver: v.driver,
            driver_opts: v.driver_opts.into_iter().collect(),
            labels: v.labels.into_iter().collect(),
        }
    }
}

impl From<pb::NetworkSpec> for Network {
    fn from(n: pb::NetworkSpec) -> Self {
        Self {
            name: n.name,
            driver: if n.driver.is_empty() {
                "bridge".into()
            } else {
                n.driver
            },
            enable_ipv6: n.enable_ipv6,
        }
    }
}

impl From<Network> for pb::NetworkSpec {
    fn from(n: Network) -> Self {
        Self {
            name: n.name,
            driver: n.driver,
            enable_ipv6: n.enable_ipv6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fills_in_defaults() {
        let message = pb::Addon {
            name: "x".into(),
            services: vec![pb::ServiceSpec {
                service_name: "s".into(),
                image: "r/i:1".into(),
                resolved_image: "r/i@sha256:00".into(),
                ports: vec![pb::PortMapping {
                    container_port: 80,
                    host_port: 70000,
                    protocol: String::new(),
                }],
                ..Default::default()
            }],
            volumes: vec![pb::VolumeSpec {
                name: "v".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let descriptor = Descriptor::from_proto(message);
        let service = &descriptor.services[0];
        assert_eq!(service.resolved_image.as_deref(), Some("r/i@sha256:00"));
        assert_eq!(service.ports[0].protocol, "tcp");
        assert_eq!(
            service.ports[0].host_port, 0,
            "out of range becomes invalid"
        );
        assert_eq!(descriptor.volumes[0].driver, "local");
        let back = descriptor.clone().into_proto();
        assert_eq!(Descriptor::from_proto(back), descriptor);
    }
}
