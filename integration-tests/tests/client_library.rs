//! The Rust client library against the real servers: listings stream every
//! page, idempotent calls ride out a restarting server while the others do
//! not retry, and a watch resumes across a manager crash without repeating
//! what it already delivered.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{collections::HashSet, time::Duration};

use futures::StreamExt as _;
use integration_tests::{
    RegistryServer, ServerProcess, binary,
    images::{ImageSpec, push_image},
    publish_approved,
};
use oak_addons::{
    AddonFilter, ClientOptions, InstallOptions, ManagerClient, MarketplaceClient, RetryPolicy,
    proto::marketplace::v1 as mpb,
};

fn addon(name: &str, service: &str, image: &str) -> mpb::Addon {
    mpb::Addon {
        name: name.into(),
        services: vec![mpb::ServiceSpec {
            service_name: service.into(),
            image: image.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn pages_retries_and_resumed_watches() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let image = format!("{host}/team/app:1");
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &format!("embedded:{}/m.redb", dir.path().display()),
            "--insecure-registry",
            &host,
        ],
    )
    .await;
    let options = ClientOptions {
        retry: RetryPolicy {
            max_attempts: 60,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        },
        ..ClientOptions::default()
    };
    let market = MarketplaceClient::connect(&marketplace.url(), &options).unwrap();

    // 120 addons are three pages of the server's default 50.
    let mut published = HashSet::new();
    for n in 0..120 {
        let id = market
            .publish(addon(&format!("bulk-{n}"), "svc", &image))
            .await
            .unwrap()
            .id;
        published.insert(id);
    }
    let listed: Vec<mpb::Addon> = market
        .list(AddonFilter::all())
        .map(|a| a.unwrap())
        .collect()
        .await;
    assert_eq!(listed.len(), 120);
    let listed: HashSet<String> = listed.into_iter().map(|a| a.id).collect();
    assert_eq!(listed, published, "every page, each addon once");
    let named: Vec<_> = market
        .list(AddonFilter {
            name: Some("bulk-7".into()),
            ..AddonFilter::all()
        })
        .collect()
        .await;
    assert_eq!(named.len(), 1);

    // A watched addon's deletion is its last event: the watch yields the
    // last state, then ends, instead of waiting for changes that cannot come.
    let doomed = market
        .publish(addon("doomed", "doomed", &image))
        .await
        .unwrap();
    let mut watched = Box::pin(market.watch(&doomed.id));
    let current = tokio::time::timeout(Duration::from_secs(10), watched.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(current.id, doomed.id);
    market.delete(&doomed.id).await.unwrap();
    let rest: Vec<mpb::Addon> = tokio::time::timeout(
        Duration::from_secs(10),
        watched.map(|item| item.unwrap()).collect::<Vec<_>>(),
    )
    .await
    .expect("the watch ends after the deletion");
    assert_eq!(rest.last().map(|a| a.id.as_str()), Some(doomed.id.as_str()));

    // A manager on a fixed port, so it can come back where clients expect it.
    let first = publish_approved(&marketplace, addon("first", "one", &image)).await;
    let second = publish_approved(&marketplace, addon("second", "two", &image)).await;
    let port = integration_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let store = format!("embedded:{}/e.redb", dir.path().display());
    let manager_args: Vec<String> = [
        "--store",
        store.as_str(),
        "--marketplace",
        &marketplace.url(),
        "--listen",
        &listen,
    ]
    .map(String::from)
    .to_vec();
    let start_manager = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProcess::start(&binary("addons-manager"), &args).await
    };
    let manager = start_manager(manager_args.clone()).await;
    let engine = ManagerClient::connect(&format!("http://{listen}"), &options).unwrap();

    let mut events = Box::pin(engine.watch(Vec::new()));
    let one = engine
        .install(&first.id, InstallOptions::default())
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.installation.id, one.id);

    // The manager crashes. Every call is retried until it is back: an
    // install carries one request id across its retries, so it installs
    // once however often it was sent.
    manager.kill().await;
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        start_manager(manager_args).await
    });
    let two = engine
        .install(&second.id, InstallOptions::default())
        .await
        .unwrap();
    let got = engine.get(&one.id).await.unwrap();
    assert_eq!(got.id, one.id);
    let manager = restart.await.unwrap();

    // The watch resumed by itself from its cursor: the next event is the
    // new installation, not the first one again.
    let event = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.installation.id, two.id, "{event:?}");

    // Every installation, page by page.
    let all: Vec<_> = engine
        .list(Vec::new())
        .map(|i| i.unwrap().id)
        .collect()
        .await;
    assert_eq!(all.len(), 2);
    manager.stop().await;
}
