//! Two marketplaces on one MongoDB store, as replicas behind one service:
//! a watch on either streams what is published on the other, each addon
//! under review is verified by one of them only (the registry's access log
//! shows each image checked once), and one that dies leaves its work to
//! the other.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::{Duration, Instant};

use integration_tests::{
    MongoServer, RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
};
use oakestra_addons_proto::marketplace::v1::{
    self as pb, marketplace_service_client::MarketplaceServiceClient,
};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

type Client = MarketplaceServiceClient<Channel>;

async fn marketplace(store: &MongoServer, registry: &RegistryServer) -> ServerProcess {
    let uri = store.uri();
    let host = registry.host();
    ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &uri,
            "--insecure-registry",
            &host,
            "--verify-backoff",
            "100ms",
            "--verify-backoff-max",
            "400ms",
            "--registry-timeout",
            "2s",
        ],
    )
    .await
}

async fn publish(client: &mut Client, name: &str, image: &str) -> pb::Addon {
    client
        .publish_addon(pb::PublishAddonRequest {
            addon: Some(pb::Addon {
                name: name.into(),
                services: vec![pb::ServiceSpec {
                    service_name: "svc".into(),
                    image: image.into(),
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
        .unwrap()
}

/// Waits until the addon leaves review on `client`'s marketplace.
async fn settled(client: &Client, id: &str) -> pb::Addon {
    eventually("verification ends", Duration::from_secs(30), || {
        let mut client = client.clone();
        let id = id.to_owned();
        async move {
            let addon = client
                .get_addon(pb::GetAddonRequest { id })
                .await
                .map_err(|status| status.to_string())?
                .into_inner()
                .addon
                .unwrap();
            if addon.status() == pb::AddonStatus::UnderReview {
                Err(format!("{:?}", addon.verification))
            } else {
                Ok(addon)
            }
        }
    })
    .await
}

/// The requests the registry served the marketplaces for `repository`.
fn requests_for(registry: &RegistryServer, repository: &str) -> usize {
    let path = format!(" /v2/{repository}/");
    registry
        .log()
        .lines()
        .filter(|line| line.contains(&path) && line.contains("\"oakestra-addons-marketplace/"))
        .count()
}

#[tokio::test]
async fn a_watch_on_one_replica_streams_what_is_published_on_the_other() {
    let store = MongoServer::start("replica_watch").await;
    let registry = RegistryServer::start().await;
    let a = marketplace(&store, &registry).await;
    let b = marketplace(&store, &registry).await;
    let mut on_a = Client::new(a.channel());
    let mut on_b = Client::new(b.channel());
    let mut watch = on_a
        .watch_addons(pb::WatchAddonsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(first.in_sync, "an empty store: only the in-sync marker");
    let host = registry.host();
    let mut latencies = Vec::new();
    for n in 0..20 {
        let published_at = Instant::now();
        let published = publish(&mut on_b, &format!("from-b-{n}"), &format!("{host}/none:1")).await;
        // Events of earlier addons (their verification) may come first.
        loop {
            let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("A streams B's publish")
                .unwrap()
                .unwrap();
            let kind = event.r#type();
            let addon = event.addon.unwrap_or_default();
            if addon.id == published.id {
                latencies.push(published_at.elapsed());
                assert_eq!(kind, pb::ChangeType::Added);
                assert_eq!(addon.name, published.name);
                break;
            }
        }
    }
    // How fast is for scripts/bench.sh to measure.
    latencies.sort();
    eprintln!("cross-replica watch latencies: {latencies:?}");
    // Reads on A serve B's publishes.
    let listed = on_a
        .list_addons(pb::ListAddonsRequest {
            statuses: vec![
                pb::AddonStatus::UnderReview.into(),
                pb::AddonStatus::FailedVerification.into(),
            ],
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.addons.len(), 20);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn each_addon_is_verified_by_one_replica_and_a_dead_ones_work_is_taken_over() {
    let store = MongoServer::start("replica_claims").await;
    let mut registry = RegistryServer::start().await;
    let host = registry.host();
    for n in 0..6 {
        push_image(&host, &format!("app{n}"), "1", &ImageSpec::default(), None).await;
    }
    push_image(&host, "solo", "1", &ImageSpec::default(), None).await;
    push_image(&host, "orphan", "1", &ImageSpec::default(), None).await;
    let a = marketplace(&store, &registry).await;
    let b = marketplace(&store, &registry).await;
    let mut on_a = Client::new(a.channel());
    let mut on_b = Client::new(b.channel());

    // What one verification costs the registry, with both replicas up.
    let solo = publish(&mut on_a, "solo", &format!("{host}/solo:1")).await;
    assert_eq!(
        settled(&on_a, &solo.id).await.status(),
        pb::AddonStatus::Approved
    );
    let once = requests_for(&registry, "solo");
    // Its manifest and its configuration: one verification's reads.
    assert_eq!(once, 2, "{}", registry.log());

    let mut ids = Vec::new();
    for n in 0..6 {
        let client = if n % 2 == 0 { &mut on_a } else { &mut on_b };
        ids.push(
            publish(client, &format!("app{n}"), &format!("{host}/app{n}:1"))
                .await
                .id,
        );
    }
    for (n, id) in ids.iter().enumerate() {
        let settled = settled(if n % 2 == 0 { &on_b } else { &on_a }, id).await;
        assert_eq!(settled.status(), pb::AddonStatus::Approved);
    }
    // Both replicas follow every addon under review; the claims keep the
    // second one off.
    for n in 0..6 {
        assert_eq!(
            requests_for(&registry, &format!("app{n}")),
            once,
            "app{n} verified once:\n{}",
            registry.log()
        );
    }

    // A replica dies while its registry is down: its addon stays under
    // review, and the survivor verifies it once the registry is back.
    registry.stop().await;
    let orphan = publish(&mut on_a, "orphan", &format!("{host}/orphan:1")).await;
    eventually("A attempted the orphan", Duration::from_secs(10), || {
        let mut on_b = on_b.clone();
        let id = orphan.id.clone();
        async move {
            let addon = on_b
                .get_addon(pb::GetAddonRequest { id })
                .await
                .unwrap()
                .into_inner()
                .addon
                .unwrap();
            match addon.verification {
                Some(v) if v.attempts >= 1 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    a.kill().await;
    registry.resume().await;
    assert_eq!(
        settled(&on_b, &orphan.id).await.status(),
        pb::AddonStatus::Approved
    );
    b.stop().await;
}
