//! Signed addons against real parts: images signed with `oak-addons sign`
//! in a real registry (Debian's docker-registry), the marketplace's trust
//! policy at approval, a node's own policy before a pull (against a link
//! peer that sends what it likes), and revocation down to the containers.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::Path, time::Duration};

use addons_signature::{SigningKey, manifest, payload};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use integration_tests::{
    Containerd, MonitorSetup, NodeCleanup, RegistryServer, ServerProcess, binary, eventually,
    images::{ImageSpec, push_image},
    monitor_looked, publish_approved,
};
use oakestra_addons_proto::{
    engine::v1::{
        self as pb, ServicePhase, addons_manager_service_client::AddonsManagerServiceClient,
    },
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};
use tonic_types::StatusExt as _;

/// Written by `cosign generate-key-pair` with an empty password: the
/// sigstore project's test data (see `signature/testdata/README.md`).
const COSIGN_GENERATED_KEY: &str =
    include_str!("../../signature/testdata/cosign_generated_encrypted_empty_private.key");

/// Runs `oak-addons` with `args` and `env`; exit code, stdout, stderr.
async fn oak_with(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(binary("oak-addons"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OAK_ADDONS_") || key == "COSIGN_PASSWORD" {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let output = command.args(args).output().await.expect("run oak-addons");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn sleeper(name: &str, image: &str) -> mpb::ServiceSpec {
    mpb::ServiceSpec {
        service_name: name.into(),
        image: image.into(),
        command: vec!["/bin/sh".into(), "-c".into(), "exec sleep 3600".into()],
        ..Default::default()
    }
}

fn one_service(name: &str, image: &str) -> mpb::Addon {
    mpb::Addon {
        name: name.into(),
        services: vec![sleeper("app", image)],
        ..Default::default()
    }
}

/// A registry client for the test registry, as the tools use one.
fn registry_client(host: &str) -> addons_registry::Registry {
    addons_registry::Registry::new(addons_registry::RegistryOptions {
        policy: addons_registry::RegistryPolicy {
            allowed: vec![host.to_owned()],
            insecure: vec![host.to_owned()],
        },
        user_agent: "signatures-test",
        ..Default::default()
    })
    .unwrap()
}

/// Stores beside `image` (pinned at `digest`) a signature by `key` of
/// `signed_payload`, the way `cosign sign` lays it out.
async fn attach_payload(
    host: &str,
    repository: &str,
    digest: &str,
    key: &SigningKey,
    signed_payload: &[u8],
) {
    let registry = registry_client(host);
    let signature = STANDARD.encode(key.sign(signed_payload).unwrap());
    let manifest::Written { manifest, config } =
        manifest::with_layer(None, manifest::layer(signed_payload, &signature))
            .unwrap()
            .unwrap();
    registry
        .push_blob(host, repository, signed_payload)
        .await
        .unwrap();
    registry.push_blob(host, repository, &config).await.unwrap();
    registry
        .push_manifest(
            host,
            repository,
            &manifest::signature_tag(digest).unwrap(),
            manifest::OCI_MANIFEST,
            &manifest,
        )
        .await
        .unwrap();
}

async fn settled(
    client: &MarketplaceServiceClient<tonic::transport::Channel>,
    id: &str,
) -> mpb::Addon {
    eventually("verification ends", Duration::from_secs(30), || {
        let mut client = client.clone();
        let id = id.to_owned();
        async move {
            let addon = client
                .get_addon(mpb::GetAddonRequest { id })
                .await
                .map_err(|s| s.to_string())?
                .into_inner()
                .addon
                .unwrap();
            if addon.status() == mpb::AddonStatus::UnderReview {
                Err(format!("{:?}", addon.verification))
            } else {
                Ok(addon)
            }
        }
    })
    .await
}

async fn publish(
    client: &MarketplaceServiceClient<tonic::transport::Channel>,
    addon: mpb::Addon,
) -> mpb::Addon {
    let published = client
        .clone()
        .publish_addon(mpb::PublishAddonRequest {
            addon: Some(addon),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .addon
        .unwrap();
    settled(client, &published.id).await
}

fn verdict(addon: &mpb::Addon) -> mpb::ServiceVerification {
    addon.verification.as_ref().unwrap().services[0].clone()
}

/// The marketplace approves an image only when a key of its policy signed
/// exactly its digest: signed with `oak-addons sign` (a key it generated,
/// and a key cosign generated) passes; unsigned, signed by another key, or
/// a signature of another digest each fail with their reason; a reverify
/// after the signature is gone fails too.
#[tokio::test]
async fn the_marketplace_approves_only_what_its_keys_signed() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let spec = |seed| ImageSpec {
        filler_bytes: 32,
        filler_seed: seed,
        ..ImageSpec::default()
    };
    let (signed_digest, _) = push_image(&host, "team/signed", "1.0", &spec(1), None).await;
    push_image(&host, "team/unsigned", "1.0", &spec(2), None).await;
    push_image(&host, "team/otherkey", "1.0", &spec(3), None).await;
    let (moved_digest, _) = push_image(&host, "team/moved", "1.0", &spec(4), None).await;
    let (old_digest, _) = push_image(&host, "team/moved", "0.9", &spec(5), None).await;
    push_image(&host, "vendor/cosigned", "1.0", &spec(6), None).await;

    // Keys: the team's and a stranger's from `oak-addons generate-key-pair`.
    let team = dir.path().join("team");
    let stranger = dir.path().join("stranger");
    let password = [("COSIGN_PASSWORD", "correct horse")];
    for prefix in [&team, &stranger] {
        let (code, _, err) = oak_with(
            &[
                "generate-key-pair",
                "--output-key-prefix",
                prefix.to_str().unwrap(),
            ],
            &password,
        )
        .await;
        assert_eq!(code, 0, "{err}");
    }
    let team_key = team.with_extension("key");
    let team_pub = team.with_extension("pub");
    let private = std::fs::read_to_string(&team_key).unwrap();
    assert!(private.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&team_key).unwrap().permissions().mode() & 0o077,
        0,
        "the private key is its owner's alone"
    );
    // The key cosign generated (empty password).
    let cosign_key = dir.path().join("cosign.key");
    std::fs::write(&cosign_key, COSIGN_GENERATED_KEY).unwrap();
    let cosign_pub = dir.path().join("cosign.pub");
    std::fs::write(
        &cosign_pub,
        SigningKey::from_pem(COSIGN_GENERATED_KEY, b"")
            .unwrap()
            .public_key()
            .to_pem(),
    )
    .unwrap();

    let sign = |image: String, key: &Path, password: &'static str| {
        let key = key.to_str().unwrap().to_owned();
        async move {
            oak_with(
                &[
                    "sign",
                    &image,
                    "--key",
                    &key,
                    "--insecure",
                    "--output",
                    "json",
                ],
                &[("COSIGN_PASSWORD", password)],
            )
            .await
        }
    };
    let (code, out, err) = sign(
        format!("{host}/team/signed:1.0"),
        &team_key,
        "correct horse",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["digest"], signed_digest.as_str());
    // A wrong password opens nothing.
    let (code, _, err) = sign(format!("{host}/team/signed:1.0"), &team_key, "wrong").await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("password"), "{err}");
    let (code, out, err) = sign(
        format!("{host}/team/otherkey:1.0"),
        &stranger.with_extension("key"),
        "correct horse",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = sign(format!("{host}/vendor/cosigned:1.0"), &cosign_key, "").await;
    assert_eq!(code, 0, "{out}{err}");
    // The tag 1.0 of team/moved has a signature, by the team's key, of the
    // digest 0.9 had: a signature of another digest.
    let team_signer = SigningKey::from_pem(&private, b"correct horse").unwrap();
    attach_payload(
        &host,
        "team/moved",
        &moved_digest,
        &team_signer,
        &payload::build(&format!("{host}/team/moved"), &old_digest),
    )
    .await;

    // `oak-addons verify` runs the marketplace's checks.
    let verify = |image: String, key: &Path| {
        let key = key.to_str().unwrap().to_owned();
        async move { oak_with(&["verify", &image, "--key", &key, "--insecure"], &[]).await }
    };
    let (code, out, err) = verify(format!("{host}/team/signed:1.0"), &team_pub).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verified"), "{out}");
    let (code, _, err) = verify(format!("{host}/team/unsigned:1.0"), &team_pub).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("SIGNATURE_MISSING"), "{err}");
    let (code, _, err) = verify(format!("{host}/team/otherkey:1.0"), &team_pub).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("SIGNATURE_INVALID"), "{err}");

    // The marketplace's policy: vendor images by the cosign key, everything
    // else by the team's.
    let policy = dir.path().join("trust.yaml");
    std::fs::write(
        &policy,
        format!(
            "keys:\n  team: team.pub\n  vendor: cosign.pub\nrules:\n  - images: [\"{host}/vendor/*\"]\n    keys: [vendor]\ndefault: required\n"
        ),
    )
    .unwrap();
    let store = format!("embedded:{}/marketplace.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store,
            "--insecure-registry",
            &host,
            "--trust-policy",
            policy.to_str().unwrap(),
        ],
    )
    .await;
    let client = MarketplaceServiceClient::new(marketplace.channel());

    let signed = publish(
        &client,
        one_service("signed", &format!("{host}/team/signed:1.0")),
    )
    .await;
    assert_eq!(
        signed.status(),
        mpb::AddonStatus::Approved,
        "{:?}",
        signed.verification
    );
    let check = verdict(&signed);
    assert_eq!(check.signed_by, "team");
    let team_fingerprint =
        addons_signature::PublicKey::from_pem(&std::fs::read_to_string(&team_pub).unwrap())
            .unwrap()
            .fingerprint();
    assert_eq!(check.key_fingerprint, team_fingerprint);
    assert!(check.signature_check_time.is_some());
    let carried = signed.services[0].image_signature.clone().unwrap();
    assert!(
        carried.payload.contains(&signed_digest),
        "{}",
        carried.payload
    );
    assert_eq!(carried.key_fingerprint, team_fingerprint);

    for (name, image, code, words) in [
        (
            "unsigned",
            format!("{host}/team/unsigned:1.0"),
            "SIGNATURE_MISSING",
            "has no signature".to_owned(),
        ),
        (
            "otherkey",
            format!("{host}/team/otherkey:1.0"),
            "SIGNATURE_INVALID",
            "not signed by a trusted key".to_owned(),
        ),
        (
            "moved",
            format!("{host}/team/moved:1.0"),
            "SIGNATURE_INVALID",
            format!("the signature is for {old_digest}"),
        ),
    ] {
        let failed = publish(&client, one_service(name, &image)).await;
        assert_eq!(
            failed.status(),
            mpb::AddonStatus::FailedVerification,
            "{name}"
        );
        let check = verdict(&failed);
        assert_eq!(check.reason_code, code, "{name}: {check:?}");
        assert!(check.reason.contains(&words), "{name}: {}", check.reason);
        // The image is named.
        let repository = image.split(':').take(2).collect::<Vec<_>>().join(":");
        assert!(
            check.reason.contains(&repository),
            "{name}: {}",
            check.reason
        );
        assert!(failed.services[0].image_signature.is_none());
    }

    let cosigned = publish(
        &client,
        one_service("cosigned", &format!("{host}/vendor/cosigned:1.0")),
    )
    .await;
    assert_eq!(
        cosigned.status(),
        mpb::AddonStatus::Approved,
        "{:?}",
        cosigned.verification
    );
    assert_eq!(verdict(&cosigned).signed_by, "vendor");

    // The REST view names the signer of each image.
    let answer = integration_tests::rest::curl(
        "GET",
        &format!(
            "{}/api/v1/marketplace/addons/{}",
            marketplace.url(),
            signed.id
        ),
        None,
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body["images"][0]["signed_by"], "team",
        "{}",
        answer.text
    );
    assert_eq!(
        answer.body["images"][0]["key_fingerprint"],
        team_fingerprint.as_str()
    );

    // The signature goes from the registry: a reverify checks it again.
    let registry_client = registry_client(&host);
    let (_, signature_manifest) = registry_client
        .manifest(
            &host,
            "team/signed",
            &manifest::signature_tag(&signed_digest).unwrap(),
            manifest::MANIFEST_TYPES,
        )
        .await
        .unwrap();
    let deleted = registry
        .delete_manifest("team/signed", &signature_manifest)
        .await;
    assert!(deleted.contains("202"), "{deleted}");
    client
        .clone()
        .reverify_addon(mpb::ReverifyAddonRequest {
            id: signed.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let reverified = settled(&client, &signed.id).await;
    assert_eq!(reverified.status(), mpb::AddonStatus::FailedVerification);
    assert_eq!(verdict(&reverified).reason_code, "SIGNATURE_MISSING");
    marketplace.stop().await;
}

fn pinned_service(
    name: &str,
    image: &str,
    signature: Option<pb::ImageSignature>,
) -> pb::ServiceSpec {
    pb::ServiceSpec {
        service_name: name.into(),
        image: image.into(),
        resolved_image: image.into(),
        command: vec!["/bin/sh".into(), "-c".into(), "exec sleep 3600".into()],
        image_signature: signature,
        ..Default::default()
    }
}

fn signed_by(key: &SigningKey, repository: &str, digest: &str) -> pb::ImageSignature {
    let signed = payload::build(repository, digest);
    pb::ImageSignature {
        signature: STANDARD.encode(key.sign(&signed).unwrap()),
        payload: String::from_utf8(signed).unwrap(),
        key_fingerprint: key.public_key().fingerprint(),
    }
}

/// A node with a trust policy runs only images its own keys signed,
/// whatever the manager sends: a link peer sends a signed service, one
/// signed by another key, one whose signature names another digest and one
/// without any; the node runs the first and reports each other FAILED with
/// its reason, having pulled nothing for them.
#[tokio::test]
async fn a_node_refuses_what_its_keys_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "osg", "10.62");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let (digest, _) = push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (other_digest, _) = push_image(
        &host,
        "team/app",
        "2",
        &ImageSpec {
            filler_bytes: 16,
            filler_seed: 9,
            ..ImageSpec::default()
        },
        None,
    )
    .await;
    let repository = format!("{host}/team/app");
    let image = format!("{repository}@{digest}");
    let other_image = format!("{repository}@{other_digest}");

    let (trusted, _) = SigningKey::generate().unwrap();
    let (attacker, _) = SigningKey::generate().unwrap();
    let policy = dir.path().join("trust.yaml");
    std::fs::write(
        &policy,
        format!(
            "keys:\n  node: |\n{}default: required\n",
            trusted
                .public_key()
                .to_pem()
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        ),
    )
    .unwrap();

    let installation = |id: &str, service: pb::ServiceSpec| pb::DesiredInstallation {
        installation_id: id.into(),
        marketplace_id: "01jb8n1m3q9x6c2v4t7w0y5z8k".into(),
        presence: pb::DesiredPresence::Running.into(),
        release: 1,
        addon: Some(pb::AddonSnapshot {
            name: id.to_lowercase(),
            version: "1.0.0".into(),
            services: vec![service],
            ..Default::default()
        }),
        ..Default::default()
    };
    const SIGNED: &str = "01jb8n1m3q9x6c2v4t7w0y5z81";
    const FORGED: &str = "01jb8n1m3q9x6c2v4t7w0y5z82";
    const ELSEWHERE: &str = "01jb8n1m3q9x6c2v4t7w0y5z83";
    const BARE: &str = "01jb8n1m3q9x6c2v4t7w0y5z84";
    let desired = pb::DesiredState {
        generation: 1,
        installations: vec![
            installation(
                SIGNED,
                pinned_service(
                    "signed",
                    &image,
                    Some(signed_by(&trusted, &repository, &digest)),
                ),
            ),
            installation(
                FORGED,
                pinned_service(
                    "forged",
                    &other_image,
                    Some(signed_by(&attacker, &repository, &other_digest)),
                ),
            ),
            // A real signature by the node's key, of another image.
            installation(
                ELSEWHERE,
                pinned_service(
                    "elsewhere",
                    &other_image,
                    Some(signed_by(&trusted, &repository, &digest)),
                ),
            ),
            installation(BARE, pinned_service("bare", &other_image, None)),
        ],
    };
    let (url, mut reports) = integration_tests::link::fake_manager(desired).await;
    let monitor = MonitorSetup {
        manager: url,
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-signed",
        bridge_prefix: "osg",
        subnet_prefix: "10.62",
    }
    .start(&["--trust-policy", policy.to_str().unwrap()], &[])
    .await;

    let mut last = std::collections::HashMap::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let report = reports.recv().await.unwrap();
            if let Some(service) = report.services.first() {
                last.insert(report.installation_id.clone(), service.clone());
            }
            let phase = |id: &str| last.get(id).map(|s: &pb::ServiceStatus| s.phase());
            if phase(SIGNED) == Some(ServicePhase::Running)
                && [FORGED, ELSEWHERE, BARE]
                    .iter()
                    .all(|id| phase(id) == Some(ServicePhase::Failed))
            {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("every service settled: {last:#?}\n{}", monitor.stderr()));
    let reason = |id: &str| last[id].reason.clone();
    assert!(
        reason(FORGED).contains("SIGNATURE_INVALID")
            && reason(FORGED).contains("not signed by a trusted key"),
        "{}",
        reason(FORGED)
    );
    assert!(
        reason(ELSEWHERE).contains("SIGNATURE_INVALID")
            && reason(ELSEWHERE).contains(&format!("the signature is for {digest}")),
        "{}",
        reason(ELSEWHERE)
    );
    assert!(
        reason(BARE).contains("SIGNATURE_MISSING"),
        "{}",
        reason(BARE)
    );

    // Passes went by: only the signed service has a container, and the
    // refused image was never pulled.
    monitor_looked(&monitor, 3).await;
    let runtime = addons_monitor::Containerd::new(
        containerd.socket(),
        "oakestra-signed".into(),
        "overlayfs".into(),
    );
    let containers = runtime.list_containers(&[]).await.unwrap();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert!(
        !registry
            .log()
            .contains(&format!("manifests/{other_digest}")),
        "the refused image's manifest was never fetched"
    );
    monitor.stop().await;
}

/// A signed addon runs through the whole chain, marketplace and node each
/// checking the signature with their own policy; revoked, its installation
/// is flagged in `oak-addons list`, a new install of it is refused, and
/// under `--on-revoke uninstall` (the default) its containers go.
#[tokio::test]
async fn a_signed_addon_runs_and_once_revoked_is_flagged_refused_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("monitor");
    let _cleanup = NodeCleanup::new(&state, "orv", "10.63");
    let containerd = Containerd::start().await;
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "team/app", "1", &ImageSpec::default(), None).await;
    let (key, _) = SigningKey::generate().unwrap();
    addons_signature::remote::attach(&registry_client(&host), &format!("{host}/team/app:1"), &key)
        .await
        .unwrap();
    let policy = dir.path().join("trust.yaml");
    let pem: String = key
        .public_key()
        .to_pem()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    std::fs::write(
        &policy,
        format!("keys:\n  team: |\n{pem}default: required\n"),
    )
    .unwrap();
    let policy = policy.to_str().unwrap();
    let store = |name: &str| format!("embedded:{}/{name}.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store("m"),
            "--insecure-registry",
            &host,
            "--trust-policy",
            policy,
        ],
    )
    .await;
    let manager = ServerProcess::start(
        &binary("addons-manager"),
        &["--store", &store("e"), "--marketplace", &marketplace.url()],
    )
    .await;
    let monitor = MonitorSetup {
        manager: manager.url(),
        containerd: &containerd,
        state_dir: &state,
        registry: &host,
        namespace: "oakestra-revoke",
        bridge_prefix: "orv",
        subnet_prefix: "10.63",
    }
    .start(&["--trust-policy", policy], &[])
    .await;
    let addon = publish_approved(
        &marketplace,
        one_service("doomed", &format!("{host}/team/app:1")),
    )
    .await;
    let engine = AddonsManagerServiceClient::new(manager.channel());
    let install = || {
        let mut engine = engine.clone();
        let id = addon.id.clone();
        async move {
            engine
                .install_addon(pb::InstallAddonRequest {
                    marketplace_id: id,
                    ..Default::default()
                })
                .await
        }
    };
    let installed = install().await.unwrap().into_inner().installation.unwrap();
    // The signature the marketplace checked travels to the node with the
    // snapshot.
    let carried = installed.addon.as_ref().unwrap().services[0]
        .image_signature
        .clone()
        .unwrap();
    assert_eq!(carried.key_fingerprint, key.public_key().fingerprint());
    let get = |engine: &AddonsManagerServiceClient<tonic::transport::Channel>| {
        let mut engine = engine.clone();
        let id = installed.id.clone();
        async move {
            engine
                .get_installation(pb::GetInstallationRequest { id })
                .await
                .map_err(|s| s.to_string())
                .map(|r| r.into_inner().installation.unwrap())
        }
    };
    eventually(
        "the installation is ACTIVE",
        Duration::from_secs(60),
        || async {
            let installation = get(&engine).await?;
            (installation.status() == pb::InstallationStatus::Active)
                .then_some(())
                .ok_or(format!("{:?}", installation.status()))
        },
    )
    .await;
    let runtime = addons_monitor::Containerd::new(
        containerd.socket(),
        "oakestra-revoke".into(),
        "overlayfs".into(),
    );
    assert_eq!(runtime.list_containers(&[]).await.unwrap().len(), 1);

    // The reviewer revokes it (an open marketplace: everyone is admin).
    let marketplace_url = marketplace.url();
    let (code, out, err) = oak_with(
        &[
            "--marketplace",
            &marketplace_url,
            "marketplace",
            "revoke",
            &addon.id,
            "--reason",
            "publisher key stolen",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("REVOKED"), "{out}");
    let (_, listed, _) = oak_with(
        &[
            "--marketplace",
            &marketplace_url,
            "marketplace",
            "list",
            "--all",
        ],
        &[],
    )
    .await;
    assert!(listed.contains("REVOKED"), "{listed}");

    // The manager flags the installation and uninstalls it.
    let flagged = eventually(
        "the installation is flagged and removed",
        Duration::from_secs(60),
        || async {
            let installation = get(&engine).await?;
            match &installation.revoked {
                Some(revoked) if installation.status() == pb::InstallationStatus::Disabled => {
                    Ok((installation.clone(), revoked.clone()))
                }
                other => Err(format!("{:?} {other:?}", installation.status())),
            }
        },
    )
    .await;
    assert_eq!(flagged.1.reason, "publisher key stolen");
    assert!(flagged.1.uninstalled);
    assert!(runtime.list_containers(&[]).await.unwrap().is_empty());
    // Oakestra's REST view shows it too.
    let answer = integration_tests::rest::curl(
        "GET",
        &format!("{}/api/v1/addons/{}", manager.url(), installed.id),
        None,
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body["revoked"]["reason"], "publisher key stolen",
        "{}",
        answer.text
    );
    let (code, out, err) = oak_with(&["--manager", &manager.url(), "list"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ADDON REVOKED (uninstalled): publisher key stolen"),
        "{out}"
    );

    // A new install is refused.
    let refused = install().await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert_eq!(
        refused
            .get_details_error_info()
            .map(|i| i.reason)
            .unwrap_or_default(),
        "ADDON_NOT_APPROVED"
    );
    assert!(
        refused.message().contains("REVOKED"),
        "{}",
        refused.message()
    );
    monitor.stop().await;
    manager.stop().await;
    marketplace.stop().await;
}
