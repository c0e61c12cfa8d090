//! Conversions between the protobuf `Addon` message and [`Descriptor`].

use oakestra_addons_proto::marketplace::v1 as pb;

use crate::{Descriptor, FieldViolation, Network, Port, Service, Volume};

impl Descriptor {
    /// The descriptor part of a published `Addon` message. Output-only
    /// fields (`id`, `status`, `resolved_image`, ...) are ignored; values
    /// that do not fit the descriptor's types are reported by field path.
    /// Defaults are filled in: protocol `tcp`, volume driver `local`,
    /// network driver `bridge`.
    pub fn from_published(addon: pb::Addon) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let services = addon
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let mut service = Service::from_proto(s, i, &mut violations);
                service.resolved_image = None;
                service
            })
            .collect();
        let descriptor = Self {
            name: addon.name,
            description: addon.description,
            services,
            volumes: addon.volumes.into_iter().map(Volume::from).collect(),
            networks: addon.networks.into_iter().map(Network::from).collect(),
        };
        if violations.is_empty() {
            Ok(descriptor)
        } else {
            Err(violations)
        }
    }

    /// A stored descriptor read back from an `Addon` message, keeping
    /// `resolved_image` (the manager's snapshot of an approved addon).
    pub fn from_stored(addon: pb::Addon) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let services = addon
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| Service::from_proto(s, i, &mut violations))
            .collect();
        let descriptor = Self {
            name: addon.name,
            description: addon.description,
            services,
            volumes: addon.volumes.into_iter().map(Volume::from).collect(),
            networks: addon.networks.into_iter().map(Network::from).collect(),
        };
        if violations.is_empty() {
            Ok(descriptor)
        } else {
            Err(violations)
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

impl Service {
    fn from_proto(s: pb::ServiceSpec, i: usize, violations: &mut Vec<FieldViolation>) -> Self {
        let ports = s
            .ports
            .into_iter()
            .enumerate()
            .map(|(j, p)| {
                let mut port = |value: u32, name: &str| {
                    u16::try_from(value).unwrap_or_else(|_| {
                        violations.push(FieldViolation::new(
                            format!("services[{i}].ports[{j}].{name}"),
                            "must be 1..65535",
                        ));
                        0
                    })
                };
                Port {
                    container_port: port(p.container_port, "container_port"),
                    host_port: port(p.host_port, "host_port"),
                    protocol: if p.protocol.is_empty() {
                        "tcp".to_owned()
                    } else {
                        p.protocol.to_ascii_lowercase()
                    },
                }
            })
            .collect();
        Self {
            service_name: s.service_name,
            image: s.image,
            command: s.command,
            environment: s.environment.into_iter().collect(),
            ports,
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
    fn round_trips_and_reports_oversized_ports() {
        let published = pb::Addon {
            name: "x".into(),
            services: vec![pb::ServiceSpec {
                service_name: "s".into(),
                image: "r/i:1".into(),
                resolved_image: "r/i@sha256:00".into(),
                ports: vec![pb::PortMapping {
                    container_port: 80,
                    host_port: 8080,
                    protocol: String::new(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let descriptor = Descriptor::from_published(published.clone()).unwrap();
        assert_eq!(descriptor.services[0].resolved_image, None);
        assert_eq!(descriptor.services[0].ports[0].protocol, "tcp");
        let stored = Descriptor::from_stored(published.clone()).unwrap();
        assert_eq!(
            stored.into_proto().services[0].resolved_image,
            "r/i@sha256:00"
        );

        let mut bad = published;
        bad.services[0].ports[0].host_port = 70000;
        let violations = Descriptor::from_published(bad).unwrap_err();
        assert_eq!(violations[0].field, "services[0].ports[0].host_port");
    }
}
