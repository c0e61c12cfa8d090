//! What an install, upgrade or rollback may be given: the caller's grants,
//! the policy's consent and the policy; and the names and ports it may take.

use super::*;

impl Manager {
    /// Whether `addon` may run with `granted`: the grants, with what the
    /// policy's `consent` gives, cover what it needs, and the manager's
    /// policy allows it. Returns what the consent gives (marked, and in the
    /// audit log), to be granted beside `granted`.
    pub(super) fn admit(
        &self,
        marketplace_id: &str,
        addon: &Descriptor,
        keep_core_stopped_on_failure: bool,
        granted: &[Privilege],
    ) -> Result<Vec<Privilege>, Error> {
        let needs = privileges::for_install(addon, keep_core_stopped_on_failure);
        let by_policy = self
            .policy
            .consent
            .grants(&addon.name, &privileges::missing(&needs, granted));
        let missing: Vec<Privilege> = privileges::missing(&needs, granted)
            .into_iter()
            .filter(|need| !by_policy.iter().any(|grant| grant.covers(need)))
            .collect();
        if !missing.is_empty() {
            return Err(Error::PrivilegesNotAccepted {
                marketplace_id: marketplace_id.to_owned(),
                missing,
            });
        }
        let mut violations: Vec<Violation> = self.policy.check_all(
            &needs,
            &self.reserved_ports,
            &self.policy.core_rules(CoreRules::any()),
        );
        violations.extend(
            addon
                .services
                .iter()
                .filter_map(|service| self.policy.limits(service).err()),
        );
        if !violations.is_empty() {
            return Err(Error::PolicyViolation {
                marketplace_id: marketplace_id.to_owned(),
                violations,
            });
        }
        for grant in &by_policy {
            tracing::info!(
                target: "audit",
                marketplace_id,
                addon = %addon.name,
                privilege = %grant,
                granted_by = "policy",
                "privilege granted by the policy's consent",
            );
        }
        Ok(by_policy)
    }

    /// Containers are named `<plane>_<service_name>` on every node, so two
    /// live installations must not share a service name; nor may they
    /// publish the same host port. `except` is the installation being
    /// upgraded, whose own names are its to keep.
    pub(super) async fn check_service_names(
        &self,
        marketplace_id: &str,
        except: Option<&str>,
        addon: &Descriptor,
    ) -> Result<(), Error> {
        let live = self
            .installations
            .list_all(&Filter::default())
            .await?
            .into_iter()
            .filter(|r| {
                r.value.status != InstallationStatus::Disabled
                    && r.value.marketplace_id != marketplace_id
                    && Some(r.value.id.as_str()) != except
            });
        for other in live {
            if let Some(service) = addon.services.iter().find(|s| {
                other
                    .value
                    .addon
                    .services
                    .iter()
                    .any(|o| o.service_name == s.service_name)
            }) {
                return Err(Error::ServiceNameTaken {
                    service: service.service_name.clone(),
                    installation_id: other.value.id.clone(),
                    addon: other.value.addon.name.clone(),
                });
            }
            for service in &addon.services {
                for port in &service.ports {
                    let holder = other.value.addon.services.iter().find(|o| {
                        o.ports
                            .iter()
                            .any(|p| p.host_port == port.host_port && p.protocol == port.protocol)
                    });
                    if let Some(holder) = holder {
                        return Err(Error::HostPortInUse {
                            port: format!("{}/{}", port.host_port, port.protocol),
                            service: service.service_name.clone(),
                            installation_id: other.value.id.clone(),
                            holder: holder.service_name.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Most privileges one install may accept.
pub const MAX_ACCEPTED_PRIVILEGES: usize = 1024;

/// Checks the accepted privileges of a request: bounded, each with a kind
/// and a bounded value.
pub(super) fn check_accepted(accepted: &[Privilege]) -> Result<(), Error> {
    use addons_descriptor::FieldViolation;
    if accepted.len() > MAX_ACCEPTED_PRIVILEGES {
        return Err(Error::invalid(
            "accepted_privileges",
            format!("at most {MAX_ACCEPTED_PRIVILEGES} entries"),
        ));
    }
    let mut violations = Vec::new();
    for (i, grant) in accepted.iter().enumerate() {
        if grant.kind.is_none() {
            violations.push(FieldViolation::new(
                format!("accepted_privileges[{i}].kind"),
                "required (PRIVILEGE_KIND_UNSPECIFIED is not a privilege)",
            ));
        }
        if grant.value.len() > 4096 {
            violations.push(FieldViolation::new(
                format!("accepted_privileges[{i}].value"),
                "at most 4096 bytes",
            ));
        }
        if grant.service_name.len() > 63 {
            violations.push(FieldViolation::new(
                format!("accepted_privileges[{i}].service_name"),
                "at most 63 bytes",
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(violations))
    }
}
