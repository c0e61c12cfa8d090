//! The harness of the end-to-end tests: starts the real binaries and the
//! real servers they need (the MongoDB-wire test server today; containerd and
//! an OCI registry as later suites need them) on free loopback ports and in
//! temp dirs, and stops them again.
//!
//! Nothing here is skipped quietly: a server that cannot be started fails the
//! test with what is missing and how to get it.

mod containerd;
pub mod images;
pub mod link;
mod mongo;
mod node;
mod process;
mod registry;

use std::{future::Future, path::PathBuf, time::Duration};

pub use crate::{
    containerd::Containerd,
    mongo::MongoServer,
    node::NodeCleanup,
    process::{ServerProcess, Started},
    registry::RegistryServer,
};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of a workspace binary, built by `cargo build --workspace --bins`
/// (which `scripts/test.sh` runs before the tests). Panics with that advice
/// when it is missing.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "binary {} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `patience` with `what` and the last observation.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: not true after {patience:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A free TCP port on 127.0.0.1, for servers that cannot report the port
/// they bound themselves.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("read the ephemeral port")
        .port()
}

/// Publishes `addon` to the marketplace and waits until it is approved;
/// panics with its verification if it fails.
pub async fn publish_approved(
    marketplace: &ServerProcess,
    addon: oakestra_addons_proto::marketplace::v1::Addon,
) -> oakestra_addons_proto::marketplace::v1::Addon {
    use oakestra_addons_proto::marketplace::v1::{
        AddonStatus, GetAddonRequest, PublishAddonRequest,
        marketplace_service_client::MarketplaceServiceClient,
    };
    let client = MarketplaceServiceClient::new(marketplace.channel());
    let published = client
        .clone()
        .publish_addon(PublishAddonRequest { addon: Some(addon) })
        .await
        .unwrap_or_else(|status| panic!("publish: {status}"))
        .into_inner()
        .addon
        .unwrap_or_default();
    eventually("the addon is approved", Duration::from_secs(30), || {
        let mut client = client.clone();
        let id = published.id.clone();
        async move {
            let addon = client
                .get_addon(GetAddonRequest { id })
                .await
                .map_err(|status| status.to_string())?
                .into_inner()
                .addon
                .unwrap_or_default();
            match addon.status() {
                AddonStatus::Approved => Ok(addon),
                AddonStatus::FailedVerification => {
                    panic!("verification failed: {:?}", addon.verification)
                }
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
}
