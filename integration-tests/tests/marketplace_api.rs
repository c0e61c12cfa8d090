//! The marketplace's API over the real binary, on both stores: publish,
//! validation with field paths, listing, watch, delete, and durability across
//! a crash of the process.
//!
//! Images point at a closed port, so every verification attempt fails
//! transiently; with a one-hour backoff each addon changes exactly once after
//! publishing (its first attempt), which the tests wait for.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::{MongoServer, ServerProcess, binary};
use oakestra_addons_proto::marketplace::v1::{
    self as pb, marketplace_service_client::MarketplaceServiceClient,
};
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt as _;

type Client = MarketplaceServiceClient<Channel>;

fn descriptor(name: &str) -> pb::Addon {
    pb::Addon {
        name: name.to_owned(),
        description: "test addon".into(),
        services: vec![pb::ServiceSpec {
            service_name: "scheduler".into(),
            image: "127.0.0.1:1/sched:1".into(),
            command: vec!["/bin/sched".into(), "--port=10004".into()],
            environment: [("API_PORT".to_owned(), "10004".to_owned())].into(),
            ports: vec![pb::PortMapping {
                container_port: 10004,
                host_port: 10004,
                protocol: pb::Protocol::Tcp.into(),
            }],
            mounts: vec![pb::Mount {
                source: Some(pb::mount::Source::Volume("data".into())),
                target: "/var/lib/sched".into(),
                read_only: true,
            }],
            networks: vec!["backplane".into()],
            labels: [("oakestra.io/role".to_owned(), "scheduler".to_owned())].into(),
            ..Default::default()
        }],
        volumes: vec![pb::VolumeSpec {
            name: "data".into(),
            ..Default::default()
        }],
        networks: vec![pb::NetworkSpec {
            name: "backplane".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The addon once its first verification attempt is stored.
async fn first_attempt(client: &Client, id: &str) -> pb::Addon {
    integration_tests::eventually(
        "the first verification attempt",
        Duration::from_secs(15),
        || {
            let mut client = client.clone();
            let id = id.to_owned();
            async move {
                let addon = client
                    .get_addon(pb::GetAddonRequest { id })
                    .await
                    .map_err(|status| status.to_string())?
                    .into_inner()
                    .addon
                    .unwrap_or_default();
                match &addon.verification {
                    Some(v) if v.attempts == 1 => Ok(addon),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
}

async fn publish(client: &mut Client, addon: pb::Addon) -> Result<pb::Addon, tonic::Status> {
    Ok(client
        .publish_addon(pb::PublishAddonRequest {
            addon: Some(addon),
            ..Default::default()
        })
        .await?
        .into_inner()
        .addon
        .expect("response carries the addon"))
}

async fn list(client: &mut Client, statuses: &[pb::AddonStatus], name: &str) -> Vec<String> {
    client
        .list_addons(pb::ListAddonsRequest {
            statuses: statuses.iter().map(|s| *s as i32).collect(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addons
        .into_iter()
        .map(|a| a.name)
        .collect()
}

async fn api_behaves(server: &ServerProcess) {
    let mut client = Client::new(server.channel());
    let published = publish(&mut client, descriptor("energy-scheduler"))
        .await
        .unwrap();
    assert_eq!(published.status(), pb::AddonStatus::UnderReview);
    assert_eq!(published.revision, 1);
    assert!(!published.id.is_empty());
    assert!(published.create_time.is_some());
    assert_eq!(published.volumes[0].driver, "local", "defaults filled in");
    assert_eq!(published.networks[0].driver, "bridge");

    let attempted = first_attempt(&client, &published.id).await;
    assert_eq!(attempted.revision, 2);
    assert_eq!(
        attempted.status(),
        pb::AddonStatus::UnderReview,
        "a transient failure keeps it in review"
    );
    assert_eq!(attempted.services, published.services);
    assert_eq!(attempted.create_time, published.create_time);
    let fetched = client
        .get_addon(pb::GetAddonRequest {
            id: published.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(fetched, attempted);

    // Output-only fields of the request are ignored.
    let mut sneaky = descriptor("sneaky");
    sneaky.status = pb::AddonStatus::Approved as i32;
    sneaky.services[0].resolved_image = "evil@sha256:00".into();
    let sneaky = publish(&mut client, sneaky).await.unwrap();
    assert_eq!(sneaky.status(), pb::AddonStatus::UnderReview);
    assert_eq!(sneaky.services[0].resolved_image, "");

    // A publish retried with its request id answers as the first call did,
    // even though the name is taken now; another body with the same id is
    // refused.
    let retried = pb::PublishAddonRequest {
        addon: Some(descriptor("retried")),
        request_id: "publish-retried".into(),
    };
    let once = client
        .publish_addon(retried.clone())
        .await
        .unwrap()
        .into_inner();
    let twice = client
        .publish_addon(retried.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(once, twice);
    let reused = client
        .publish_addon(pb::PublishAddonRequest {
            addon: Some(descriptor("other")),
            ..retried
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert_eq!(reason(&reused), "REQUEST_ID_REUSED");
    client
        .delete_addon(pb::DeleteAddonRequest {
            id: once.addon.unwrap().id,
            ..Default::default()
        })
        .await
        .unwrap();

    let duplicate = publish(&mut client, descriptor("energy-scheduler"))
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    assert_eq!(reason(&duplicate), "ADDON_NAME_TAKEN");
    assert_eq!(
        duplicate
            .get_details_resource_info()
            .expect("names the existing addon")
            .resource_name,
        published.id
    );
    assert!(
        duplicate.message().contains("energy-scheduler"),
        "{}",
        duplicate.message()
    );

    // Oakestra's catalog lists approved addons only.
    assert!(list(&mut client, &[], "").await.is_empty());
    assert_eq!(
        list(&mut client, &[pb::AddonStatus::UnderReview], "").await,
        ["energy-scheduler", "sneaky"]
    );
    assert_eq!(
        list(&mut client, &[pb::AddonStatus::UnderReview], "sneaky").await,
        ["sneaky"]
    );

    let missing = client
        .get_addon(pb::GetAddonRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Watch: the current state, then the change that reverify makes.
    let mut watch = client
        .watch_addon(pb::WatchAddonRequest {
            id: published.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.r#type(), pb::ChangeType::Added);
    assert_eq!(first.addon.unwrap(), attempted);
    let marker = watch.next().await.unwrap().unwrap();
    assert!(marker.in_sync && marker.addon.is_none(), "{marker:?}");
    let reverified = client
        .reverify_addon(pb::ReverifyAddonRequest {
            id: published.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    assert_eq!(reverified.revision, 3);
    assert_eq!(
        reverified.verification.as_ref().unwrap().attempts,
        0,
        "a fresh review"
    );
    let second = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("watch sees the change")
        .unwrap()
        .unwrap();
    assert_eq!(second.r#type(), pb::ChangeType::Modified);
    assert!(second.sequence > marker.sequence);
    assert_eq!(second.addon.unwrap(), reverified);

    // Delete ends the watch and the addon is gone.
    client
        .delete_addon(pb::DeleteAddonRequest {
            id: published.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The watch may still carry the re-verification's attempt; then the
    // deletion, with the addon's last state; then it ends with OK.
    let last = tokio::time::timeout(Duration::from_secs(5), async {
        let mut last = None;
        while let Some(item) = watch.next().await {
            last = Some(item.expect("the watch ends with OK"));
        }
        last
    })
    .await
    .expect("watch ends after the delete")
    .expect("the deletion is an event");
    assert_eq!(last.r#type(), pb::ChangeType::Deleted);
    assert_eq!(last.addon.unwrap().id, published.id);
    let gone = client
        .delete_addon(pb::DeleteAddonRequest {
            id: published.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // The name is free again.
    publish(&mut client, descriptor("energy-scheduler"))
        .await
        .unwrap();
}

async fn pages(server: &ServerProcess) {
    let mut client = Client::new(server.channel());
    for n in 0..7 {
        publish(&mut client, descriptor(&format!("paged-{n}")))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_addons(pb::ListAddonsRequest {
                statuses: vec![pb::AddonStatus::UnderReview as i32],
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.addons.len() <= 3);
        names.extend(page.addons.into_iter().map(|a| a.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<_> = (0..7).map(|n| format!("paged-{n}")).collect();
    assert_eq!(names, expected);
    let bad = client
        .list_addons(pb::ListAddonsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

fn violations(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries google.rpc.BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

async fn validation(server: &ServerProcess) {
    let mut client = Client::new(server.channel());
    let missing = client
        .publish_addon(pb::PublishAddonRequest {
            addon: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&missing), ["addon"]);

    // A port beyond 65535 is reported with the rest, by field path.
    let mut bad = descriptor("too-far");
    bad.services[0].ports[0].host_port = 70000;
    let status = publish(&mut client, bad).await.unwrap_err();
    assert_eq!(
        violations(&status),
        ["addon.services[0].ports[0].host_port"]
    );

    let mut bad = descriptor("_bad");
    bad.services.push(pb::ServiceSpec {
        service_name: "scheduler".into(),
        image: String::new(),
        ports: vec![pb::PortMapping {
            container_port: 0,
            host_port: 10004,
            protocol: 7,
        }],
        mounts: vec![
            pb::Mount {
                source: Some(pb::mount::Source::Volume("undeclared".into())),
                target: "/data".into(),
                read_only: false,
            },
            pb::Mount {
                source: Some(pb::mount::Source::Volume("data".into())),
                target: "relative".into(),
                read_only: false,
            },
        ],
        networks: vec!["elsewhere".into()],
        environment: [("9LIVES".to_owned(), "x".to_owned())].into(),
        ..Default::default()
    });
    let status = publish(&mut client, bad).await.unwrap_err();
    assert_eq!(
        violations(&status),
        [
            "addon.name",
            "addon.services[1].service_name",
            "addon.services[1].image",
            "addon.services[1].environment[9LIVES]",
            "addon.services[1].ports[0].container_port",
            "addon.services[1].ports[0].protocol",
            "addon.services[1].mounts[0].volume",
            "addon.services[1].mounts[1].target",
            "addon.services[1].networks[0]",
        ]
    );
    assert!(
        status
            .message()
            .contains("addon.services[1].image: required"),
        "{}",
        status.message()
    );
    // Image grammar, counts and sizes.
    let mut bad = descriptor("limits");
    bad.services[0].image = "Upper/Case:1".into();
    bad.services[0]
        .environment
        .insert("BIG".into(), "x".repeat(5000));
    bad.services[0].labels.insert(String::new(), "v".into());
    let status = publish(&mut client, bad).await.unwrap_err();
    assert_eq!(
        violations(&status),
        [
            "addon.services[0].environment[BIG]",
            "addon.services[0].labels[]",
            "addon.services[0].image",
        ]
    );
    let mut crowded = descriptor("crowded");
    crowded.services = (0..33)
        .map(|n| pb::ServiceSpec {
            service_name: format!("s{n}"),
            image: "127.0.0.1:1/x:1".into(),
            ..Default::default()
        })
        .collect();
    let status = publish(&mut client, crowded).await.unwrap_err();
    assert_eq!(violations(&status), ["addon.services"]);
    assert_eq!(reason(&status), "INVALID_REQUEST");

    // The documented bounds, each by its field path.
    let mut long = descriptor("long");
    long.services[0].command = vec!["x".repeat(4097)];
    long.volumes[0].driver_opts = (0..129).map(|n| (format!("k{n}"), "v".into())).collect();
    long.networks.extend((0..128).map(|n| pb::NetworkSpec {
        name: format!("n{n}"),
        ..Default::default()
    }));
    let status = publish(&mut client, long).await.unwrap_err();
    assert_eq!(
        violations(&status),
        [
            "addon.networks",
            "addon.volumes[0].driver_opts",
            "addon.services[0].command[0]",
        ]
    );
    // A descriptor over 1 MiB encoded is refused as a whole, before anything
    // else is looked at; one over the 4 MiB message limit never decodes.
    let mut huge = descriptor("huge");
    huge.description = "x".repeat(1024 * 1024 + 1);
    let status = publish(&mut client, huge).await.unwrap_err();
    assert_eq!(violations(&status), ["addon"]);
    let mut enormous = descriptor("enormous");
    enormous.description = "x".repeat(5 * 1024 * 1024);
    let status = publish(&mut client, enormous).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // Nothing was stored.
    assert!(
        list(&mut client, &[pb::AddonStatus::UnderReview], "")
            .await
            .is_empty()
    );
}

async fn survives_a_crash(mut server: ServerProcess, args: &[&str]) {
    let mut client = Client::new(server.channel());
    let published = publish(&mut client, descriptor("durable")).await.unwrap();
    let published = first_attempt(&client, &published.id).await;
    for _ in 0..2 {
        server.kill().await;
        server = ServerProcess::start(&binary("addons-marketplace"), args).await;
        let mut client = Client::new(server.channel());
        let fetched = client
            .get_addon(pb::GetAddonRequest {
                id: published.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .addon
            .unwrap();
        assert_eq!(fetched, published);
    }
    assert_eq!(server.stop().await.code(), Some(0));
}

/// Versions: an unversioned descriptor is 1.0.0; higher versions add
/// versions of the name; the same or a lower one is refused; listing by name
/// shows every version.
async fn versions(server: &ServerProcess) {
    let mut client = Client::new(server.channel());
    let first = publish(&mut client, descriptor("metrics")).await.unwrap();
    assert_eq!(first.version, "1.0.0", "no version means 1.0.0");
    let mut next = descriptor("metrics");
    next.version = "1.1.0".into();
    let second = publish(&mut client, next.clone()).await.unwrap();
    assert_eq!(second.version, "1.1.0");
    assert_ne!(second.id, first.id);

    let again = publish(&mut client, next).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert_eq!(reason(&again), "ADDON_NAME_TAKEN");
    let mut lower = descriptor("metrics");
    lower.version = "1.0.5".into();
    let lower = publish(&mut client, lower).await.unwrap_err();
    assert_eq!(lower.code(), Code::FailedPrecondition);
    assert_eq!(reason(&lower), "VERSION_NOT_NEWER");
    assert_eq!(
        lower.get_details_error_info().unwrap().metadata["highest_version"],
        "1.1.0"
    );
    let mut bad = descriptor("metrics");
    bad.version = "two".into();
    let bad = publish(&mut client, bad).await.unwrap_err();
    assert_eq!(violations(&bad), ["addon.version"]);

    publish(&mut client, descriptor("metrics-other"))
        .await
        .unwrap();
    let versions: Vec<String> = client
        .list_addons(pb::ListAddonsRequest {
            statuses: vec![pb::AddonStatus::UnderReview as i32],
            name: "metrics".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addons
        .into_iter()
        .map(|a| format!("{} {}", a.name, a.version))
        .collect();
    assert_eq!(versions, ["metrics 1.0.0", "metrics 1.1.0"]);
}

/// Runs each case against a fresh server on its own store.
async fn run_cases(store_for: impl Fn(u32) -> String) {
    for case in 0..5 {
        let store = store_for(case);
        // 127.0.0.1:1 is named, so an image there is tried (and found
        // unreachable) rather than refused as a non-public address.
        let args = [
            "--store",
            store.as_str(),
            "--verify-backoff",
            "1h",
            "--verify-backoff-max",
            "1h",
            "--allowed-registry",
            "127.0.0.1:1",
        ];
        let server = ServerProcess::start(&binary("addons-marketplace"), &args).await;
        match case {
            0 => api_behaves(&server).await,
            1 => pages(&server).await,
            2 => validation(&server).await,
            3 => versions(&server).await,
            _ => {
                survives_a_crash(server, &args).await;
                continue;
            }
        }
        assert_eq!(server.stop().await.code(), Some(0));
    }
}

/// The `ErrorInfo` reason of an error, which every error carries.
fn reason(status: &tonic::Status) -> String {
    let info = status
        .get_details_error_info()
        .expect("every error has an ErrorInfo");
    assert_eq!(info.domain, "addons.oakestra.io");
    info.reason
}

#[tokio::test]
async fn marketplace_api_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    run_cases(|case| format!("embedded:{}/case{case}.redb", dir.path().display())).await;
}

#[tokio::test]
async fn marketplace_api_on_mongodb() {
    let mongo = MongoServer::start("marketplace_api").await;
    let uri = mongo.uri();
    // Every case gets a database of its own on the same server.
    run_cases(|case| match uri.split_once('?') {
        Some((base, options)) => format!("{base}_case{case}?{options}"),
        None => format!("{uri}_case{case}"),
    })
    .await;
}
