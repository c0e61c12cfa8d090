//! The manager's use cases over a real embedded store and a marketplace
//! that answers from memory.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::*;

/// Addons by id, as a marketplace would answer for them.
#[derive(Debug, Default)]
struct Addons(Mutex<Vec<mpb::Addon>>);

impl AddonSource for Addons {
    fn get(&self, id: &str) -> BoxFuture<'_, Result<mpb::Addon, tonic::Status>> {
        let found = self.0.lock().unwrap().iter().find(|a| a.id == id).cloned();
        Box::pin(async move { found.ok_or_else(|| tonic::Status::not_found("no such addon")) })
    }

    fn versions(&self, name: &str) -> BoxFuture<'_, Result<Vec<mpb::Addon>, tonic::Status>> {
        let found = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.name == name)
            .cloned()
            .collect();
        Box::pin(async move { Ok(found) })
    }
}

/// An addon `name` whose one service (named like it) publishes host port `port`,
/// approved and pinned unless `status` says otherwise.
fn addon(id: &str, name: &str, port: u32, status: mpb::AddonStatus) -> mpb::Addon {
    mpb::Addon {
        id: id.into(),
        name: name.into(),
        version: "1.0.0".into(),
        status: status.into(),
        services: vec![mpb::ServiceSpec {
            service_name: name.into(),
            image: "registry.example/web:1".into(),
            resolved_image: "registry.example/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            ports: vec![mpb::PortMapping {
                container_port: 8080,
                host_port: port,
                protocol: mpb::Protocol::Tcp.into(),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn manager(policy: &str, addons: Vec<mpb::Addon>) -> (Manager, tempfile::TempDir) {
    let (store, dir) = crate::records::tests::store().await;
    let installations = Installations::open(&store).await.unwrap();
    let manager = Manager::with_source(
        installations,
        Arc::new(Addons(Mutex::new(addons))),
        Plane::Root,
        Policy::from_yaml(policy).unwrap(),
        Vec::new(),
    );
    (manager, dir)
}

fn install(marketplace_id: &str) -> Install<'_> {
    Install {
        marketplace_id,
        requested_by: "alice",
        ..Install::default()
    }
}

#[tokio::test]
async fn consent_by_policy_grants_what_it_names_and_marks_it() {
    let (manager, _dir) = manager(
        "consent:\n  host_ports: [\"10000-20000/tcp\"]\n",
        vec![
            addon("a1", "inside", 10080, mpb::AddonStatus::Approved),
            addon("a2", "outside", 8080, mpb::AddonStatus::Approved),
        ],
    )
    .await;
    let installed = manager.install(install("a1")).await.unwrap().value;
    assert_eq!(installed.status, InstallationStatus::Installing);
    assert_eq!(installed.granted_privileges.len(), 1);
    assert!(installed.granted_privileges[0].by_policy);
    assert_eq!(installed.granted_privileges[0].value, "10080/tcp");
    // What the consent does not name still needs the caller's.
    match manager.install(install("a2")).await {
        Err(Error::PrivilegesNotAccepted { missing, .. }) => {
            assert_eq!(missing.len(), 1);
            assert_eq!(missing[0].value, "8080/tcp");
        }
        other => panic!("{other:?}"),
    }
    // A grant the caller gives is not marked.
    let mut accepting = install("a2");
    accepting.accepted = vec![Privilege::new(
        addons_descriptor::PrivilegeKind::HostPort,
        "",
        "8080/tcp",
    )];
    let installed = manager.install(accepting).await.unwrap().value;
    assert!(installed.granted_privileges.iter().all(|p| !p.by_policy));
}

#[tokio::test]
async fn only_approved_and_known_addons_install() {
    let (manager, _dir) = manager(
        "",
        vec![addon("a1", "pending", 10080, mpb::AddonStatus::UnderReview)],
    )
    .await;
    assert!(matches!(
        manager.install(install("a1")).await,
        Err(Error::NotApproved { .. })
    ));
    assert!(matches!(
        manager.install(install("nope")).await,
        Err(Error::AddonNotFound(_))
    ));
}

#[tokio::test]
async fn a_revocation_flags_installations_and_the_policy_decides_the_rest() {
    let (manager, _dir) = manager(
        "consent:\n  host_ports: [\"10000-20000/tcp\"]\n",
        vec![
            addon("a1", "kept", 10080, mpb::AddonStatus::Approved),
            addon("a2", "removed", 10081, mpb::AddonStatus::Approved),
            addon("a3", "untouched", 10082, mpb::AddonStatus::Approved),
        ],
    )
    .await;
    let kept = manager.install(install("a1")).await.unwrap().value.id;
    let removed = manager.install(install("a2")).await.unwrap().value.id;
    let untouched = manager.install(install("a3")).await.unwrap().value.id;
    let revoked = |id: &str| {
        let mut addon = addon(id, "x", 1, mpb::AddonStatus::Revoked);
        addon.revocation = Some(mpb::Revocation {
            reason: format!("{id} is bad"),
            ..Default::default()
        });
        addon
    };
    manager
        .apply_revocation(&revoked("a1"), crate::config::OnRevoke::Keep)
        .await
        .unwrap();
    manager
        .apply_revocation(&revoked("a2"), crate::config::OnRevoke::Uninstall)
        .await
        .unwrap();

    let kept = manager.get(&kept).await.unwrap().value;
    let flag = kept.revoked.clone().unwrap();
    assert_eq!(flag.reason, "a1 is bad");
    assert!(!flag.uninstalled);
    assert_eq!(kept.status, InstallationStatus::Installing, "kept running");

    let removed = manager.get(&removed).await.unwrap().value;
    assert!(removed.revoked.as_ref().unwrap().uninstalled);
    assert!(
        matches!(
            removed.status,
            InstallationStatus::Disabling | InstallationStatus::Disabled
        ),
        "{:?}",
        removed.status
    );
    assert!(
        manager
            .get(&untouched)
            .await
            .unwrap()
            .value
            .revoked
            .is_none()
    );

    // Seen again (a watch resumed from the start): nothing changes.
    let before = manager.get(&kept.id).await.unwrap();
    manager
        .apply_revocation(&revoked("a1"), crate::config::OnRevoke::Uninstall)
        .await
        .unwrap();
    let after = manager.get(&kept.id).await.unwrap();
    assert_eq!(before.revision, after.revision);
    assert_eq!(after.value.status, InstallationStatus::Installing);
}

#[tokio::test]
async fn a_release_of_a_revoked_addon_is_never_rolled_back_to() {
    let (store, _dir) = crate::records::tests::store().await;
    let installations = Installations::open(&store).await.unwrap();
    let mut second = addon("a2", "app", 10080, mpb::AddonStatus::Approved);
    second.version = "2.0.0".into();
    let source = Arc::new(Addons(Mutex::new(vec![
        addon("a1", "app", 10080, mpb::AddonStatus::Approved),
        second,
    ])));
    let manager = Manager::with_source(
        installations,
        source.clone(),
        Plane::Root,
        Policy::from_yaml("consent:\n  host_ports: [\"10000-20000/tcp\"]\n").unwrap(),
        Vec::new(),
    );
    let id = manager.install(install("a1")).await.unwrap().value.id;
    let rollout = || Rollout {
        accepted: Vec::new(),
        options: RolloutOptions::default(),
        expected_revision: None,
        requested_by: "alice",
    };
    manager.upgrade(&id, "2.0.0", rollout()).await.unwrap();
    // The rollout is over (no node takes part here).
    manager
        .installations
        .modify_at(&id, None, |installation| {
            installation.rollout = None;
            Ok(true)
        })
        .await
        .unwrap();
    source.0.lock().unwrap()[0].status = mpb::AddonStatus::Revoked.into();
    match manager.rollback(&id, 1, rollout()).await {
        Err(Error::NotApproved { status, .. }) => assert_eq!(status, "ADDON_STATUS_REVOKED"),
        other => panic!("{other:?}"),
    }
    // Not revoked, the same rollback goes ahead.
    source.0.lock().unwrap()[0].status = mpb::AddonStatus::Approved.into();
    assert_eq!(
        manager
            .rollback(&id, 1, rollout())
            .await
            .unwrap()
            .value
            .marketplace_id,
        "a1"
    );
}
