//! The manager's install API over the real binaries: it refuses what it
//! must refuse, with the right codes, against a real marketplace.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use integration_tests::{ServerProcess, binary};
use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};
use tonic::Code;
use tonic_types::StatusExt as _;

#[tokio::test]
async fn install_refuses_what_is_not_installable() {
    let dir = tempfile::tempdir().unwrap();
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        // Tried and unreachable, so it stays in review.
        &["--store", &store("m"), "--allowed-registry", "127.0.0.1:1"],
    )
    .await;
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &["--store", &store("e"), "--marketplace", &marketplace.url()],
    )
    .await;
    let mut market = MarketplaceServiceClient::new(marketplace.channel());
    let mut client = AddonsManagerServiceClient::new(manager.channel());

    let reviewed = market
        .publish_addon(mpb::PublishAddonRequest {
            addon: Some(mpb::Addon {
                name: "pending".into(),
                services: vec![mpb::ServiceSpec {
                    service_name: "svc".into(),
                    image: "127.0.0.1:1/svc:1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();

    let install = |id: &str| pb::InstallAddonRequest {
        marketplace_id: id.to_owned(),
        ..Default::default()
    };
    let refused = client
        .install_addon(install(&reviewed.id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("ADDON_STATUS_UNDER_REVIEW"),
        "says which status it has: {}",
        refused.message()
    );

    let unknown = client
        .install_addon(install("no-such-addon"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let empty = client.install_addon(install("")).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let fields: Vec<_> = empty
        .get_details_bad_request()
        .expect("field violations")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["marketplace_id"]);

    let none = client
        .list_installations(pb::ListInstallationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(none.installations.is_empty(), "nothing was stored");

    let missing = client
        .get_installation(pb::GetInstallationRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing = client
        .uninstall_addon(pb::UninstallAddonRequest {
            id: "nope".into(),
            purge: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing = client
        .watch_installations(pb::WatchInstallationsRequest {
            ids: vec!["nope".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // The marketplace gone: retryable.
    marketplace.stop().await;
    let unavailable = client
        .install_addon(install(&reviewed.id))
        .await
        .unwrap_err();
    assert_eq!(unavailable.code(), Code::Unavailable, "{unavailable:?}");
    assert_eq!(manager.stop().await.code(), Some(0));
}
