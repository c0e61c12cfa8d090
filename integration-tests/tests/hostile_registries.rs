//! A publisher names the registry, so the marketplace must not let an
//! image reference point its requests at the machine, the internal network
//! or a cloud's metadata service, through the name, a redirect or a token
//! realm; must not read without bound; and must not repeat what a registry
//! answered to whoever reads the verification.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use integration_tests::{ServerProcess, binary, eventually};
use oakestra_addons_proto::marketplace::v1::{
    self as mpb, marketplace_service_client::MarketplaceServiceClient,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// A listener on 127.0.0.1 that counts the connections it gets and
/// answers each with `answer` (after reading the request head).
async fn listener(answer: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0_u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = stream.write_all(&answer()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (port, seen)
}

fn answer(status: &str, headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

async fn publish(marketplace: &ServerProcess, name: &str, image: &str) -> mpb::Addon {
    let mut client = MarketplaceServiceClient::new(marketplace.channel());
    let addon = client
        .publish_addon(mpb::PublishAddonRequest {
            addon: Some(mpb::Addon {
                name: name.into(),
                services: vec![mpb::ServiceSpec {
                    service_name: "web".into(),
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
        .unwrap();
    eventually("the verification ends", Duration::from_secs(60), || {
        let mut client = client.clone();
        let id = addon.id.clone();
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

fn reason(addon: &mpb::Addon) -> String {
    addon
        .verification
        .as_ref()
        .map(|v| v.reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_publisher_cannot_point_the_marketplace_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    // What must never be reached: a service on the machine's loopback.
    let (secret_port, secret_seen) = listener(|| answer("200 OK", &[], b"{}")).await;
    // A registry the operator allowed (insecure, on loopback) that answers
    // with a redirect to the secret, a token realm on the secret, a body
    // of its choosing, or a manifest without end.
    let secret = format!("127.0.0.1:{secret_port}");
    let redirect_to = secret.clone();
    let (redirecting, _) = listener(move || {
        answer(
            "307 Temporary Redirect",
            &[format!("location: http://{redirect_to}/v2/x/manifests/1")],
            b"",
        )
    })
    .await;
    let realm = secret.clone();
    let (challenging, _) = listener(move || {
        answer(
            "401 Unauthorized",
            &[format!(
                "www-authenticate: Bearer realm=\"http://{realm}/token\",service=\"r\""
            )],
            b"",
        )
    })
    .await;
    let (talkative, _) = listener(|| {
        answer(
            "400 Bad Request",
            &["content-type: application/json".to_owned()],
            br#"{"errors":[{"code":"DENIED","message":"\u001b[2Kcall +1-555-0100 to verify"}]}"#,
        )
    })
    .await;
    let (endless, _) = listener(|| {
        let mut body = vec![b' '; 8 << 20];
        body[0] = b'{';
        answer(
            "200 OK",
            &["content-type: application/vnd.oci.image.manifest.v1+json".to_owned()],
            &body,
        )
    })
    .await;
    let store = format!("embedded:{}/m.redb", dir.path().display());
    let insecure: Vec<String> = [redirecting, challenging, talkative, endless]
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store,
            "--insecure-registry",
            &insecure.join(","),
            "--verify-backoff",
            "100ms",
        ],
    )
    .await;

    // 1. The machine's loopback, by name: refused before any connection.
    let direct = publish(&marketplace, "direct", &format!("{secret}/x/y:1")).await;
    assert_eq!(direct.status(), mpb::AddonStatus::FailedVerification);
    assert!(
        reason(&direct).contains("not a public address"),
        "{}",
        reason(&direct)
    );
    // 2. A cloud's metadata service.
    let metadata = publish(&marketplace, "metadata", "169.254.169.254/x/y:1").await;
    assert_eq!(metadata.status(), mpb::AddonStatus::FailedVerification);
    assert!(
        reason(&metadata).contains("not a public address"),
        "{}",
        reason(&metadata)
    );
    // 3. A redirect from an allowed registry to the secret.
    let redirected = publish(
        &marketplace,
        "redirected",
        &format!("{}/x/y:1", insecure[0]),
    )
    .await;
    assert_eq!(redirected.status(), mpb::AddonStatus::FailedVerification);
    assert!(
        reason(&redirected).contains("redirect"),
        "{}",
        reason(&redirected)
    );
    // 4. A token realm on the secret.
    let realmed = publish(&marketplace, "realmed", &format!("{}/x/y:1", insecure[1])).await;
    assert_eq!(realmed.status(), mpb::AddonStatus::FailedVerification);
    assert!(
        reason(&realmed).contains("token realm"),
        "{}",
        reason(&realmed)
    );
    assert_eq!(
        secret_seen.load(Ordering::SeqCst),
        0,
        "the secret was reached"
    );
    // 5. What a registry says is never repeated.
    let talked = publish(&marketplace, "talked", &format!("{}/x/y:1", insecure[2])).await;
    assert_eq!(talked.status(), mpb::AddonStatus::FailedVerification);
    assert!(
        reason(&talked).contains("400") && !reason(&talked).contains("555"),
        "{}",
        reason(&talked)
    );
    // 6. A manifest of 8 MiB is not read whole.
    let endless_addon = publish(&marketplace, "endless", &format!("{}/x/y:1", insecure[3])).await;
    assert_eq!(endless_addon.status(), mpb::AddonStatus::FailedVerification);
    assert!(
        reason(&endless_addon).contains("limit"),
        "{}",
        reason(&endless_addon)
    );
}
