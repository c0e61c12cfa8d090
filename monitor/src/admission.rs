//! Whether this node runs a service: the node's own check, from the
//! snapshot it was sent, so that neither a careless publisher nor a
//! compromised or misconfigured manager makes the node run more than the
//! operator granted and the node's policy allows. Pure: the reconciler asks
//! before it pulls or creates anything, and a refusal is final (the service
//! is FAILED with the reason; nothing is retried until the desired state
//! changes).

use addons_signature::{Candidate, TrustPolicy};

use addons_descriptor::{
    Privilege, Resources, Service,
    policy::{CoreRules, Policy},
    privileges,
};

/// What the node knows when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    /// The node's policy.
    pub policy: &'a Policy,
    /// The core rules in force: the policy's, with the core components the
    /// core-components file marks.
    pub core: &'a CoreRules,
    /// Ports no addon may publish here (the monitor's own).
    pub reserved_ports: &'a [u16],
    /// Host ports held here by someone else: `(port, protocol, holder)`.
    pub ports_in_use: &'a [(u16, String, String)],
    /// Which keys must have signed which images (`--trust-policy`).
    pub trust: Option<&'a TrustPolicy>,
}

/// Why a node refuses a service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The installation's grants do not cover what the service needs here.
    #[error("not granted: {}", .0.iter().map(Privilege::grant_text).collect::<Vec<_>>().join(", "))]
    NotGranted(Vec<Privilege>),
    /// The node's policy forbids it.
    #[error("node policy: {0}")]
    Policy(String),
    /// A host path cannot be bound as checked (a link beneath it, or it
    /// changed while it was mounted).
    #[error("{0}")]
    HostPath(crate::host_paths::HostPathError),
    /// The node's trust policy refuses the image's signature, as the
    /// manager sent it (or its absence).
    #[error("image signature: {0}")]
    Signature(addons_signature::Refusal),
    /// A host port the service publishes is held by someone else here.
    #[error("host port {port} is in use by {holder}")]
    HostPortInUse {
        /// `PORT/PROTOCOL`.
        port: String,
        /// Who holds it.
        holder: String,
    },
}

/// Decides about `service` of addon `addon`, which replaces the core
/// component of its name here when `replaces_core`; the limits it runs
/// with when admitted.
pub fn admit(
    node: Node<'_>,
    addon: &str,
    service: &Service,
    replaces_core: bool,
    granted: &[Privilege],
) -> Result<Resources, Refusal> {
    if let Some(trust) = node.trust {
        check_signature(trust, addon, service).map_err(Refusal::Signature)?;
    }
    let needs = privileges::service_needs(service, replaces_core);
    let missing = privileges::missing(&needs, granted);
    if !missing.is_empty() {
        return Err(Refusal::NotGranted(missing));
    }
    if let Some(violation) = node
        .policy
        .check_all(&needs, node.reserved_ports, node.core)
        .into_iter()
        .next()
    {
        return Err(Refusal::Policy(violation.to_string()));
    }
    if !replaces_core {
        for port in &service.ports {
            if let Some((_, _, holder)) = node
                .ports_in_use
                .iter()
                .find(|(p, proto, _)| *p == port.host_port && *proto == port.protocol)
            {
                return Err(Refusal::HostPortInUse {
                    port: format!("{}/{}", port.host_port, port.protocol),
                    holder: holder.clone(),
                });
            }
        }
    }
    node.policy
        .limits(service)
        .map_err(|violation| Refusal::Policy(violation.to_string()))
}

/// Checks the signature the manager sent with `service`'s pinned image
/// against the node's own policy: only a key the node trusts can have
/// made one that passes, so a manager cannot forge it.
fn check_signature(
    trust: &TrustPolicy,
    addon: &str,
    service: &Service,
) -> Result<(), addons_signature::Refusal> {
    let image = service.resolved_image.as_deref().unwrap_or(&service.image);
    let Some((_, digest)) = addons_signature::payload::split_pinned(image) else {
        return Err(addons_signature::Refusal {
            code: addons_signature::RefusalCode::Invalid,
            reason: format!("{image} is not pinned by a sha256 digest"),
        });
    };
    let candidates: Vec<Candidate> = service
        .image_signature
        .iter()
        .map(|signature| Candidate {
            payload: signature.payload.clone().into_bytes(),
            signature: signature.signature.clone(),
        })
        .collect();
    trust.check(image, &digest, addon, &candidates).map(|_| ())
}

#[cfg(test)]
mod tests {
    use addons_descriptor::{Mount, Port, PrivilegeKind};

    use super::*;

    fn node<'a>(
        policy: &'a Policy,
        core: &'a CoreRules,
        in_use: &'a [(u16, String, String)],
    ) -> Node<'a> {
        Node {
            policy,
            core,
            reserved_ports: &[11103],
            ports_in_use: in_use,
            trust: None,
        }
    }

    fn service(name: &str) -> Service {
        Service {
            service_name: name.into(),
            image: "r/i@sha256:0".into(),
            ..Service::default()
        }
    }

    #[test]
    fn a_node_runs_only_what_was_granted_and_it_allows() {
        let default = Policy::default();
        let none = CoreRules::default();
        let plain = service("web");
        assert_eq!(
            admit(node(&default, &none, &[]), "addon", &plain, false, &[]),
            Ok(Resources {
                memory_bytes: Some(512 << 20),
                cpu_millis: None,
                pids: Some(1024),
            })
        );

        let mut host = service("host");
        host.mounts = vec![Mount::parse("/:/host").unwrap()];
        let grant = Privilege::parse_grant("host-path=/").unwrap();
        assert!(matches!(
            admit(node(&default, &none, &[]), "addon", &host, false, &[]),
            Err(Refusal::NotGranted(_))
        ));
        let refused =
            admit(node(&default, &none, &[]), "addon", &host, false, &[grant]).unwrap_err();
        assert!(refused.to_string().contains("host_paths"), "{refused}");

        // A replacement the manager did not see as one (not a well-known
        // name) still needs its grant here, and the node's consent.
        let mongo = service("mongo2");
        let refused = admit(node(&default, &none, &[]), "addon", &mongo, true, &[]).unwrap_err();
        assert_eq!(
            refused,
            Refusal::NotGranted(vec![Privilege::new(
                PrivilegeKind::CoreComponent,
                "mongo2",
                "mongo2"
            )])
        );
        let granted = [Privilege::parse_grant("core-component=mongo2").unwrap()];
        let refused =
            admit(node(&default, &none, &[]), "addon", &mongo, true, &granted).unwrap_err();
        assert!(
            refused.to_string().contains("core_components.replace"),
            "{refused}"
        );
        let marked = CoreRules {
            replace: vec!["mongo2".into()],
            inherit_environment: Vec::new(),
        };
        assert!(
            admit(
                node(&default, &marked, &[]),
                "addon",
                &mongo,
                true,
                &granted
            )
            .is_ok()
        );

        let mut web = service("web");
        web.ports = vec![Port {
            container_port: 80,
            host_port: 8080,
            protocol: "tcp".into(),
        }];
        let port = [Privilege::parse_grant("host-port=8080").unwrap()];
        let in_use = [(
            8080,
            "tcp".to_owned(),
            "core component scheduler".to_owned(),
        )];
        assert_eq!(
            admit(node(&default, &none, &in_use), "addon", &web, false, &port),
            Err(Refusal::HostPortInUse {
                port: "8080/tcp".into(),
                holder: "core component scheduler".into()
            })
        );
        assert!(admit(node(&default, &none, &[]), "addon", &web, false, &port).is_ok());
    }

    #[test]
    fn a_node_with_a_trust_policy_runs_only_what_its_keys_signed() {
        use addons_signature::{SigningKey, payload};
        use base64::{Engine as _, engine::general_purpose::STANDARD};

        let (trusted, _) = SigningKey::generate().unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let pem: String = trusted
            .public_key()
            .to_pem()
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect();
        let trust = TrustPolicy::parse(
            &format!("keys:\n  node: |\n{pem}rules:\n  - images: [\"mirror.local/*\"]\n    signature: none\n"),
            std::path::Path::new("."),
        )
        .unwrap();
        let default = Policy::default();
        let none = CoreRules::default();
        let node = Node {
            trust: Some(&trust),
            ..node(&default, &none, &[])
        };
        let digest = format!("sha256:{}", "ab".repeat(32));
        let signed = |key: &SigningKey, repository: &str| {
            let text = payload::build(repository, &digest);
            addons_descriptor::ImageSignature {
                signature: STANDARD.encode(key.sign(&text).unwrap()),
                payload: String::from_utf8(text).unwrap(),
                key_fingerprint: key.public_key().fingerprint(),
            }
        };
        let mut web = service("web");
        web.resolved_image = Some(format!("r.example/team/web@{digest}"));
        assert!(
            admit(node, "a", &web, false, &[])
                .is_err_and(|refusal| refusal.to_string().contains("SIGNATURE_MISSING"))
        );
        web.image_signature = Some(signed(&other, "r.example/team/web"));
        assert!(
            admit(node, "a", &web, false, &[])
                .is_err_and(|refusal| refusal.to_string().contains("SIGNATURE_INVALID"))
        );
        web.image_signature = Some(signed(&trusted, "r.example/team/other"));
        assert!(
            admit(node, "a", &web, false, &[]).is_err(),
            "another repository's signature"
        );
        web.image_signature = Some(signed(&trusted, "r.example/team/web"));
        assert!(admit(node, "a", &web, false, &[]).is_ok());
        // A tag, not a digest, is never admitted under a policy.
        web.resolved_image = Some("r.example/team/web:1".into());
        assert!(admit(node, "a", &web, false, &[]).is_err());
        // What the policy does not check runs unsigned.
        let mut mirrored = service("m");
        mirrored.resolved_image = Some(format!("mirror.local/x@{digest}"));
        assert!(admit(node, "a", &mirrored, false, &[]).is_ok());
    }
}
