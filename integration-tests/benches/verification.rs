//! Verification benchmark: publish → APPROVED latency and registry bytes per
//! verification, against the baseline of verifying by pulling the whole image
//! (what Oakestra's marketplace does through the Docker daemon), measured in
//! the same run against the same loopback registry.
//!
//! Run with `scripts/bench.sh verification` (builds the release binaries
//! first).

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark report.

use std::time::{Duration, Instant};

use integration_tests::{
    RegistryServer, ServerProcess, binary, cpu_time,
    images::{self, ImageSpec, push_image},
};
use oakestra_addons_proto::marketplace::v1::{
    self as pb, marketplace_service_client::MarketplaceServiceClient,
};
use oci_client::{Reference, secrets::RegistryAuth};
use tokio_stream::StreamExt as _;

const ROUNDS: usize = 15;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

/// Oakestra's way: pull the manifest and every blob of the image.
async fn full_pull(host: &str, repository: &str, tag: &str) -> u64 {
    let client = images::client();
    let reference = Reference::with_tag(host.to_owned(), repository.to_owned(), tag.to_owned());
    let (manifest, _) = client
        .pull_image_manifest(&reference, &RegistryAuth::Anonymous)
        .await
        .unwrap();
    let mut bytes = 0;
    for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
        let mut data = Vec::new();
        client.pull_blob(&reference, blob, &mut data).await.unwrap();
        bytes += data.len() as u64;
    }
    bytes + serde_json::to_vec(&manifest).unwrap().len() as u64
}

async fn publish_until_approved(
    client: &mut MarketplaceServiceClient<tonic::transport::Channel>,
    name: &str,
    image: &str,
) -> (Duration, pb::Addon) {
    let started = Instant::now();
    let addon = client
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
        .unwrap();
    let mut watch = client
        .watch_addon(pb::WatchAddonRequest {
            id: addon.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(update) = watch.next().await {
        let Some(addon) = update.unwrap().addon else {
            continue; // the in-sync marker
        };
        match addon.status() {
            pb::AddonStatus::UnderReview => continue,
            pb::AddonStatus::Approved => return (started.elapsed(), addon),
            other => panic!(
                "verification of {image} ended {other:?}: {:?}",
                addon.verification
            ),
        }
    }
    panic!("watch ended before approval");
}

#[tokio::main]
async fn main() {
    let registry = RegistryServer::start().await;
    let host = registry.host();
    let small = ImageSpec::default();
    let large = ImageSpec {
        filler_bytes: 32 << 20,
        ..ImageSpec::default()
    };
    push_image(&host, "bench/small", "1", &small, None).await;
    push_image(&host, "bench/large", "1", &large, None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/bench.redb", dir.path().display());
    let server = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store, "--insecure-registry", &host],
    )
    .await;
    let mut client = MarketplaceServiceClient::new(server.channel());

    println!(
        "| image | ours: publish → APPROVED p50 | p90 | baseline: full pull p50 | p90 | ours / baseline (p50) | registry bytes, ours | baseline | layer blobs fetched by ours |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, repository) in [
        ("busybox (1 MiB)", "bench/small"),
        ("busybox + 32 MiB layer", "bench/large"),
    ] {
        let image = format!("{host}/{repository}:1");
        let blob_gets_before = registry.blob_gets().len();
        let mut ours = Vec::new();
        let mut our_bytes = 0;
        for round in 0..ROUNDS {
            let name = format!("{}-{round}", repository.replace('/', "-"));
            let (elapsed, addon) = publish_until_approved(&mut client, &name, &image).await;
            ours.push(elapsed);
            our_bytes = addon.verification.unwrap().services[0].bytes_fetched;
        }
        let blob_gets = registry.blob_gets().len() - blob_gets_before;
        let mut baseline = Vec::new();
        let mut baseline_bytes = 0;
        for _ in 0..ROUNDS {
            let started = Instant::now();
            baseline_bytes = full_pull(&host, repository, "1").await;
            baseline.push(started.elapsed());
        }
        let ratio =
            percentile(&mut ours, 0.5).as_secs_f64() / percentile(&mut baseline, 0.5).as_secs_f64();
        println!(
            "| {label} | {} | {} | {} | {} | {ratio:.2} | {} | {} | {} (config blobs: {blob_gets} for {ROUNDS} verifications) |",
            ms(percentile(&mut ours, 0.5)),
            ms(percentile(&mut ours, 0.9)),
            ms(percentile(&mut baseline, 0.5)),
            ms(percentile(&mut baseline, 0.9)),
            kib(our_bytes),
            kib(baseline_bytes),
            blob_gets.saturating_sub(ROUNDS),
        );
    }
    push_many(&host).await;
    println!();
    println!(
        "| {CONCURRENT} publishes at once, each its own image | all APPROVED after | each: p50 / p99 | one publish → APPROVED (p50 of {ROUNDS}) | ratio | registry GETs per image | CPU during it: registry / marketplace |"
    );
    println!("|---|---|---|---|---|---|---|");
    concurrent_publishes(
        &registry,
        &server,
        &client,
        &host,
        "verification concurrency 4 (default)",
    )
    .await;
    server.stop().await;
    // The same with as many verifications at once as publishes: what is
    // left is the publishes' own writes.
    let store = format!("embedded:{}/bench-wide.redb", dir.path().display());
    let wide = ServerProcess::start(
        &binary("addons-marketplace"),
        &[
            "--store",
            &store,
            "--insecure-registry",
            &host,
            "--verify-concurrency",
            "100",
        ],
    )
    .await;
    let client = MarketplaceServiceClient::new(wide.channel());
    concurrent_publishes(
        &registry,
        &wide,
        &client,
        &host,
        "verification concurrency 100",
    )
    .await;
    wide.stop().await;
}

const CONCURRENT: usize = 100;

/// `CONCURRENT` images, each its own.
async fn push_many(host: &str) {
    for i in 0..CONCURRENT {
        let spec = ImageSpec {
            filler_bytes: 16,
            filler_seed: 1000 + i as u64,
            ..ImageSpec::default()
        };
        push_image(host, &format!("many/app{i}"), "1", &spec, None).await;
    }
}

/// Publishes that come at once: `CONCURRENT` addons, each with an image of
/// its own, published together; the time until every one is APPROVED
/// against the time of one (the median of `ROUNDS` single publishes, in
/// the same run), the registry requests each image cost, and the CPU
/// time the registry and the marketplace spent on the burst: on two cores
/// shared by the registry, the marketplace and the callers, the registry's
/// share bounds how fast the burst can be.
async fn concurrent_publishes(
    registry: &RegistryServer,
    marketplace: &ServerProcess,
    client: &MarketplaceServiceClient<tonic::transport::Channel>,
    host: &str,
    label: &str,
) {
    let mut single = Vec::new();
    for round in 0..ROUNDS {
        let mut client = client.clone();
        let (elapsed, _) = publish_until_approved(
            &mut client,
            &format!("one-{round}"),
            &format!("{host}/many/app0:1"),
        )
        .await;
        single.push(elapsed);
    }
    let requests_before = registry.log().matches("\"GET /v2/many/").count();
    let cpu = || {
        (
            registry.pid().map(cpu_time).unwrap_or_default(),
            cpu_time(marketplace.pid()),
        )
    };
    let cpu_before = cpu();
    let started = Instant::now();
    let all = futures::future::join_all((0..CONCURRENT).map(|i| {
        let mut client = client.clone();
        let image = format!("{host}/many/app{i}:1");
        async move { publish_until_approved(&mut client, &format!("many-{i}"), &image).await }
    }))
    .await;
    let together = started.elapsed();
    let cpu_after = cpu();
    let mut latencies: Vec<Duration> = all.into_iter().map(|(elapsed, _)| elapsed).collect();
    let requests = registry.log().matches("\"GET /v2/many/").count() - requests_before;
    let one = percentile(&mut single, 0.5);
    println!(
        "| {label} | {} | {} / {} | {} | {:.1} | {:.2} | {} / {} |",
        ms(together),
        ms(percentile(&mut latencies, 0.5)),
        ms(percentile(&mut latencies, 0.99)),
        ms(one),
        together.as_secs_f64() / one.as_secs_f64(),
        requests as f64 / CONCURRENT as f64,
        ms(cpu_after.0.saturating_sub(cpu_before.0)),
        ms(cpu_after.1.saturating_sub(cpu_before.1)),
    );
}
