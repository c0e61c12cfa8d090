//! Image verification against a real OCI registry (Debian's docker-registry)
//! with images the tests build and push themselves, on both stores.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{
    MongoServer, RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image, push_index},
};
use oakestra_addons_proto::marketplace::v1::{
    self as pb, marketplace_service_client::MarketplaceServiceClient,
};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

type Client = MarketplaceServiceClient<Channel>;

/// Where the marketplace under test keeps its records.
enum Store {
    Embedded(tempfile::TempDir),
    Mongo(Box<MongoServer>),
}

impl Store {
    async fn new(mongo: bool, test: &str) -> Self {
        if mongo {
            Self::Mongo(Box::new(MongoServer::start(test).await))
        } else {
            Self::Embedded(tempfile::tempdir().unwrap())
        }
    }

    fn arg(&self) -> String {
        match self {
            Self::Embedded(dir) => format!("embedded:{}/marketplace.redb", dir.path().display()),
            Self::Mongo(server) => server.uri(),
        }
    }
}

async fn marketplace(store: &Store, registry: &RegistryServer, extra: &[&str]) -> ServerProcess {
    let store = store.arg();
    let host = registry.host();
    let mut args = vec![
        "--store",
        &store,
        "--insecure-registry",
        &host,
        "--verify-backoff",
        "100ms",
        "--verify-backoff-max",
        "400ms",
        "--registry-timeout",
        "2s",
    ];
    args.extend_from_slice(extra);
    ServerProcess::start(&binary("addons-marketplace"), &args).await
}

fn service(name: &str, image: &str) -> pb::ServiceSpec {
    pb::ServiceSpec {
        service_name: name.into(),
        image: image.into(),
        ..Default::default()
    }
}

async fn publish(client: &mut Client, name: &str, services: Vec<pb::ServiceSpec>) -> pb::Addon {
    client
        .publish_addon(pb::PublishAddonRequest {
            addon: Some(pb::Addon {
                name: name.into(),
                services,
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

async fn get(client: &mut Client, id: &str) -> pb::Addon {
    client
        .get_addon(pb::GetAddonRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap()
}

/// Waits until the addon leaves review; returns it.
async fn settled(client: &Client, id: &str) -> pb::Addon {
    eventually("verification ends", Duration::from_secs(30), || {
        let mut client = client.clone();
        let id = id.to_owned();
        async move {
            let addon = get(&mut client, &id).await;
            if addon.status() == pb::AddonStatus::UnderReview {
                Err(format!("{:?}", addon.verification))
            } else {
                Ok(addon)
            }
        }
    })
    .await
}

fn reason(addon: &pb::Addon) -> String {
    addon
        .verification
        .as_ref()
        .map(|v| v.reason.clone())
        .unwrap_or_default()
}

async fn approves_and_pins_the_digest(mongo: bool) {
    let store = Store::new(mongo, "approves").await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let (digest, _) = push_image(&host, "team/sched", "1.0", &ImageSpec::default(), None).await;
    let server = marketplace(&store, &registry, &[]).await;
    let mut client = Client::new(server.channel());

    let addon = publish(
        &mut client,
        "sched",
        vec![service("scheduler", &format!("{host}/team/sched:1.0"))],
    )
    .await;
    let mut watch = client
        .watch_addon(pb::WatchAddonRequest {
            id: addon.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(Ok(update)) = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("watch moves on")
    {
        if update.in_sync {
            continue;
        }
        let status = update.addon.unwrap().status();
        seen.push(status);
        if status != pb::AddonStatus::UnderReview {
            break;
        }
    }
    // The publish answers UNDER_REVIEW; the watch, opened after it, starts
    // there unless the verification (milliseconds) was quicker.
    assert_eq!(addon.status(), pb::AddonStatus::UnderReview);
    assert!(
        seen.len() == 1 || seen.first() == Some(&pb::AddonStatus::UnderReview),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&pb::AddonStatus::Approved), "{seen:?}");

    let approved = get(&mut client, &addon.id).await;
    assert_eq!(
        approved.services[0].resolved_image,
        format!("{host}/team/sched@{digest}")
    );
    let verification = approved.verification.unwrap();
    assert!(verification.complete_time.is_some());
    assert_eq!(verification.attempts, 1);
    let result = &verification.services[0];
    assert!(result.ok);
    assert_eq!(result.platforms, ["linux/amd64"]);
    assert!(result.bytes_fetched > 0);
    // Manifests and the configuration only: the one blob fetched is the
    // configuration, whose size is what was counted beyond the manifest.
    let blobs = registry.blob_gets();
    assert_eq!(blobs.len(), 1, "only the config blob is fetched: {blobs:?}");
    assert!(
        result.bytes_fetched < 4096,
        "no layer bytes: {}",
        result.bytes_fetched
    );
    // Approved addons are what the catalog lists by default.
    let listed = client
        .list_addons(pb::ListAddonsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .addons;
    assert_eq!(listed.len(), 1);

    // The tag moves on: a reverify keeps the approved digest, never
    // re-pins to what the tag points to now.
    let moved = ImageSpec {
        filler_bytes: 64,
        filler_seed: 7,
        ..ImageSpec::default()
    };
    let (moved_digest, _) = push_image(&host, "team/sched", "1.0", &moved, None).await;
    assert_ne!(moved_digest, digest);
    let reverify = |client: &mut Client| {
        let id = addon.id.clone();
        let mut client = client.clone();
        async move {
            client
                .reverify_addon(pb::ReverifyAddonRequest {
                    id,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };
    reverify(&mut client).await;
    let kept = settled(&client, &addon.id).await;
    assert_eq!(
        kept.status(),
        pb::AddonStatus::Approved,
        "{}",
        reason(&kept)
    );
    assert_eq!(
        kept.services[0].resolved_image,
        format!("{host}/team/sched@{digest}")
    );
    // The registry loses the pinned manifest: the reverify says so, and
    // the pin still names what was approved.
    let deleted = registry.delete_manifest("team/sched", &digest).await;
    assert!(deleted.contains("202"), "{deleted}");
    reverify(&mut client).await;
    let lost = settled(&client, &addon.id).await;
    assert_eq!(lost.status(), pb::AddonStatus::FailedVerification);
    assert!(
        reason(&lost).contains("lost pinned image"),
        "{}",
        reason(&lost)
    );
    assert_eq!(
        lost.services[0].resolved_image,
        format!("{host}/team/sched@{digest}")
    );
    server.stop().await;
}

async fn fails_definitely(mongo: bool) {
    let store = Store::new(mongo, "fails").await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "ok", "1", &ImageSpec::default(), None).await;
    push_index(
        &host,
        "multi",
        "1",
        &[("linux", "arm64"), ("linux", "s390x")],
    )
    .await;
    let index_digest = push_index(
        &host,
        "multi",
        "2",
        &[("linux", "arm64"), ("linux", "amd64")],
    )
    .await;
    let nothing_to_run = ImageSpec {
        cmd: Vec::new(),
        ..ImageSpec::default()
    };
    push_image(&host, "bare", "1", &nothing_to_run, None).await;
    let server = marketplace(&store, &registry, &[]).await;
    let mut client = Client::new(server.channel());

    let unknown = publish(
        &mut client,
        "unknown-tag",
        vec![service("svc", &format!("{host}/ok:nope"))],
    )
    .await;
    let no_repo = publish(
        &mut client,
        "unknown-repo",
        vec![service("svc", &format!("{host}/absent:1"))],
    )
    .await;
    let no_platform = publish(
        &mut client,
        "wrong-platform",
        vec![service("svc", &format!("{host}/multi:1"))],
    )
    .await;
    let has_platform = publish(
        &mut client,
        "right-platform",
        vec![service("svc", &format!("{host}/multi:2"))],
    )
    .await;
    let bare = publish(
        &mut client,
        "bare",
        vec![service("svc", &format!("{host}/bare:1"))],
    )
    .await;
    let mut with_command = service("svc", &format!("{host}/bare:1"));
    with_command.command = vec!["/bin/busybox".into(), "true".into()];
    let bare_with_command = publish(&mut client, "bare-with-command", vec![with_command]).await;
    let mixed = publish(
        &mut client,
        "mixed",
        vec![
            service("good", &format!("{host}/ok:1")),
            service("bad", &format!("{host}/ok:missing")),
        ],
    )
    .await;

    let unknown = settled(&client, &unknown.id).await;
    assert_eq!(unknown.status(), pb::AddonStatus::FailedVerification);
    assert!(
        reason(&unknown).contains("not found")
            || reason(&unknown).contains("MANIFEST_UNKNOWN")
            || reason(&unknown).contains("ManifestUnknown"),
        "{}",
        reason(&unknown)
    );
    let no_repo = settled(&client, &no_repo.id).await;
    assert_eq!(
        no_repo.status(),
        pb::AddonStatus::FailedVerification,
        "{}",
        reason(&no_repo)
    );

    let no_platform = settled(&client, &no_platform.id).await;
    assert_eq!(no_platform.status(), pb::AddonStatus::FailedVerification);
    assert!(
        reason(&no_platform).contains("has no linux/amd64"),
        "{}",
        reason(&no_platform)
    );
    assert!(
        reason(&no_platform).contains("linux/arm64"),
        "names what it has: {}",
        reason(&no_platform)
    );

    let has_platform = settled(&client, &has_platform.id).await;
    assert_eq!(
        has_platform.status(),
        pb::AddonStatus::Approved,
        "{}",
        reason(&has_platform)
    );
    assert_eq!(
        has_platform.services[0].resolved_image,
        format!("{host}/multi@{index_digest}")
    );

    let bare = settled(&client, &bare.id).await;
    assert_eq!(bare.status(), pb::AddonStatus::FailedVerification);
    assert!(
        reason(&bare).contains("no entrypoint or command"),
        "{}",
        reason(&bare)
    );
    let bare_with_command = settled(&client, &bare_with_command.id).await;
    assert_eq!(bare_with_command.status(), pb::AddonStatus::Approved);

    let mixed = settled(&client, &mixed.id).await;
    assert_eq!(mixed.status(), pb::AddonStatus::FailedVerification);
    let results = &mixed.verification.as_ref().unwrap().services;
    assert!(results[0].ok && !results[0].resolved_image.is_empty());
    assert!(!results[1].ok && !results[1].reason.is_empty());
    assert!(reason(&mixed).starts_with("bad: "), "{}", reason(&mixed));
    assert!(
        mixed.services.iter().all(|s| s.resolved_image.is_empty()),
        "nothing pinned on failure"
    );
    server.stop().await;
}

async fn retries_while_the_registry_is_down(mongo: bool) {
    let store = Store::new(mongo, "retries").await;
    let mut registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "flaky", "1", &ImageSpec::default(), None).await;
    registry.stop().await;
    let server = marketplace(&store, &registry, &[]).await;
    let mut client = Client::new(server.channel());
    let addon = publish(
        &mut client,
        "flaky",
        vec![service("svc", &format!("{host}/flaky:1"))],
    )
    .await;

    let waiting = eventually(
        "attempts grow while the registry is down",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let id = addon.id.clone();
            async move {
                let addon = get(&mut client, &id).await;
                let verification = addon.verification.clone().unwrap_or_default();
                if addon.status() == pb::AddonStatus::UnderReview
                    && verification.attempts >= 3
                    && !verification.last_error.is_empty()
                    && verification.next_attempt_time.is_some()
                {
                    Ok(addon)
                } else {
                    Err(format!("{:?} {verification:?}", addon.status()))
                }
            }
        },
    )
    .await;
    assert!(
        waiting
            .verification
            .unwrap()
            .last_error
            .contains("unreachable")
    );

    registry.resume().await;
    let approved = settled(&client, &addon.id).await;
    assert_eq!(
        approved.status(),
        pb::AddonStatus::Approved,
        "{}",
        reason(&approved)
    );
    let verification = approved.verification.unwrap();
    assert!(verification.attempts >= 4);
    assert_eq!(verification.last_error, "");
    server.stop().await;
}

async fn uses_registry_credentials(mongo: bool) {
    let store = Store::new(mongo, "credentials").await;
    let registry = RegistryServer::start_with_auth("dev", "s3cret").await;
    let host = registry.host();
    push_image(
        &host,
        "private/sched",
        "1",
        &ImageSpec::default(),
        registry.credentials(),
    )
    .await;
    let auth_dir = tempfile::tempdir().unwrap();
    let auth_file = auth_dir.path().join("config.json");
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths": {{"{host}": {{"username": "dev", "password": "s3cret"}}}}}}"#),
    )
    .unwrap();

    let anonymous = marketplace(&store, &registry, &[]).await;
    let mut client = Client::new(anonymous.channel());
    let refused = publish(
        &mut client,
        "private",
        vec![service("svc", &format!("{host}/private/sched:1"))],
    )
    .await;
    let refused = settled(&client, &refused.id).await;
    assert_eq!(refused.status(), pb::AddonStatus::FailedVerification);
    assert!(
        reason(&refused).to_lowercase().contains("authoriz")
            || reason(&refused).contains("UNAUTHORIZED")
            || reason(&refused).contains("Unauthorized"),
        "{}",
        reason(&refused)
    );
    anonymous.stop().await;

    let authed = marketplace(
        &store,
        &registry,
        &["--registry-auth", &auth_file.display().to_string()],
    )
    .await;
    let mut client = Client::new(authed.channel());
    let retried = client
        .reverify_addon(pb::ReverifyAddonRequest {
            id: refused.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(retried.status(), pb::AddonStatus::UnderReview);
    let approved = settled(&client, &refused.id).await;
    assert_eq!(
        approved.status(),
        pb::AddonStatus::Approved,
        "{}",
        reason(&approved)
    );
    authed.stop().await;
}

async fn resumes_after_a_crash(mongo: bool) {
    let store = Store::new(mongo, "crash").await;
    let mut registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "app", "1", &ImageSpec::default(), None).await;
    registry.stop().await;
    let server = marketplace(&store, &registry, &[]).await;
    let mut client = Client::new(server.channel());
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            publish(
                &mut client,
                &format!("pending-{n}"),
                vec![service("svc", &format!("{host}/app:1"))],
            )
            .await
            .id,
        );
    }
    let doomed = publish(
        &mut client,
        "doomed",
        vec![service("svc", &format!("{host}/app:missing"))],
    )
    .await
    .id;
    eventually(
        "a first attempt failed transiently",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let id = ids[0].clone();
            async move {
                let addon = get(&mut client, &id).await;
                match addon.verification {
                    Some(v) if v.attempts >= 1 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    server.kill().await;
    registry.resume().await;

    let server = marketplace(&store, &registry, &[]).await;
    let client = Client::new(server.channel());
    for id in &ids {
        let addon = settled(&client, id).await;
        assert_eq!(
            addon.status(),
            pb::AddonStatus::Approved,
            "{}",
            reason(&addon)
        );
    }
    let doomed = settled(&client, &doomed).await;
    assert_eq!(doomed.status(), pb::AddonStatus::FailedVerification);
    server.stop().await;
}

macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test] async fn $case() { super::$case(false).await; } )*
        }
        mod mongodb {
            $( #[tokio::test] async fn $case() { super::$case(true).await; } )*
        }
    };
}

on_both_stores!(
    approves_and_pins_the_digest,
    fails_definitely,
    retries_while_the_registry_is_down,
    uses_registry_credentials,
    resumes_after_a_crash,
);
