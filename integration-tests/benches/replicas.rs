//! Replicas on one MongoDB store (a MongoDB-wire server, nx-27017, or the
//! real MongoDB that `MONGODB_URI` names):
//!
//! - **cross-replica watch**: a publish on marketplace B → the event on a
//!   `WatchAddons` stream of marketplace A, beside the baseline of the same
//!   watch on B itself, measured in the same run;
//! - **failover**: SIGKILL of the active manager of a plane (5 s lease) →
//!   a monitor linked to its standby, beside the baseline of the same
//!   manager killed and started again at once at its address (what a
//!   supervisor does for a lone manager).
//!
//! Run with `scripts/bench.sh replicas`.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark report.

use std::time::{Duration, Instant};

use integration_tests::{MongoServer, ServerProcess, binary, free_port, link::TestMonitor};
use oakestra_addons_proto::{
    engine::v1 as pb,
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};
use tokio_stream::StreamExt as _;

const PUBLISHES: usize = 200;
const FAILOVERS: usize = 3;
const LEASE: &str = "5s";

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn marketplace(store: &MongoServer) -> ServerProcess {
    ServerProcess::start(&binary("addons-marketplace"), &["--store", &store.uri()]).await
}

/// Publishes on `on` and measures how long until `watch` streams it.
async fn watch_latencies(on: &ServerProcess, watched: &ServerProcess, tag: &str) -> Vec<Duration> {
    let mut publisher = MarketplaceServiceClient::new(on.channel());
    let mut watch = MarketplaceServiceClient::new(watched.channel())
        .watch_addons(mpb::WatchAddonsRequest::default())
        .await
        .unwrap()
        .into_inner();
    while !watch.next().await.unwrap().unwrap().in_sync {}
    let mut latencies = Vec::with_capacity(PUBLISHES);
    for n in 0..PUBLISHES {
        let started = Instant::now();
        let id = publisher
            .publish_addon(mpb::PublishAddonRequest {
                addon: Some(mpb::Addon {
                    name: format!("{tag}-{n}"),
                    services: vec![mpb::ServiceSpec {
                        service_name: "svc".into(),
                        // Never approved: no registry answers; its
                        // verification's events come later and are skipped.
                        image: "127.0.0.1:1/none:1".into(),
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
            .id;
        loop {
            let event = watch.next().await.unwrap().unwrap();
            if event.addon.is_some_and(|addon| addon.id == id) {
                latencies.push(started.elapsed());
                break;
            }
        }
    }
    latencies
}

async fn manager(store: &MongoServer, port: u16) -> ServerProcess {
    let listen = format!("127.0.0.1:{port}");
    ServerProcess::start(
        &binary("addons-manager"),
        &[
            "--store",
            &store.uri(),
            "--marketplace",
            "http://127.0.0.1:1",
            "--listen",
            &listen,
            "--lease",
            LEASE,
        ],
    )
    .await
}

/// Links a test monitor to whichever of `ports` is active, trying each in
/// turn as a monitor with several manager addresses does.
async fn relink(ports: &[u16]) -> TestMonitor {
    loop {
        for port in ports {
            let Ok(channel) =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                    .unwrap()
                    .connect()
                    .await
            else {
                continue;
            };
            if let Ok(monitor) = TestMonitor::connect(channel, "node-1", pb::Plane::Root).await {
                return monitor;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() {
    // Cross-replica watch.
    let store = MongoServer::start("bench_replicas").await;
    let a = marketplace(&store).await;
    let b = marketplace(&store).await;
    let mut same = watch_latencies(&b, &b, "same").await;
    let mut cross = watch_latencies(&b, &a, "cross").await;
    println!("| watch of a publish ({PUBLISHES} publishes) | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, samples) in [
        ("on the replica it was published on (baseline)", &mut same),
        ("on another replica", &mut cross),
    ] {
        let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
        let max = *samples.last().unwrap();
        println!("| {name} | {} | {} | {} |", ms(p50), ms(p99), ms(max));
    }
    a.stop().await;
    b.stop().await;

    // Failover.
    let store = MongoServer::start("bench_failover").await;
    let (port_a, port_b) = (free_port(), free_port());
    let mut restarts = Vec::new();
    let mut takeovers = Vec::new();
    let mut active = manager(&store, port_a).await;
    let mut active_port = port_a;
    for _ in 0..FAILOVERS {
        // Baseline: the lone active manager killed and started again.
        let monitor = relink(&[active_port]).await;
        let started = Instant::now();
        active.kill().await;
        active = manager(&store, active_port).await;
        drop(relink(&[active_port]).await);
        restarts.push(started.elapsed());
        drop(monitor);
        // Takeover: a standby beside it.
        let standby_port = if active_port == port_a {
            port_b
        } else {
            port_a
        };
        let standby = manager(&store, standby_port).await;
        let monitor = relink(&[active_port, standby_port]).await;
        // Renewed by now, so the standby counts from a fresh revision.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        active.kill().await;
        drop(relink(&[active_port, standby_port]).await);
        takeovers.push(started.elapsed());
        drop(monitor);
        (active, active_port) = (standby, standby_port);
    }
    active.stop().await;
    let secs = |d: &Duration| format!("{:.2} s", d.as_secs_f64());
    println!();
    println!(
        "| failover of the root plane's manager ({LEASE} lease), {FAILOVERS} runs | runs | max |"
    );
    println!("|---|---|---|");
    println!(
        "| killed and started again at its address (baseline) | {} | {} |",
        restarts.iter().map(secs).collect::<Vec<_>>().join(", "),
        secs(restarts.iter().max().unwrap())
    );
    println!(
        "| killed, the standby takes over | {} | {} |",
        takeovers.iter().map(secs).collect::<Vec<_>>().join(", "),
        secs(takeovers.iter().max().unwrap())
    );
}
