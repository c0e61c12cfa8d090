//! Marketplace read throughput, against the ceiling of this stack.
//!
//! Ours: a release marketplace (embedded store) holding 50 approved addons.
//! 32 concurrent clients on one HTTP/2 connection each call `GetAddon` (a
//! random one of the 50) or `ListAddons` (one page of all 50) as fast as
//! they can for 3 s; three runs each, the median run reported.
//!
//! Baseline, same client, same machine, same run: a minimal tonic server in
//! a process of its own (this benchmark's binary started again) that answers
//! `GetAddon` and `ListAddons` with the very messages the marketplace
//! returned, from memory: no store, no validation, no interceptors. It is
//! the ceiling of tonic + HTTP/2 + protobuf for those message sizes.
//!
//! Also the resident memory of the marketplace idle and under the load.
//!
//! Run with `scripts/bench.sh api`.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A benchmark report.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    RegistryServer, ServerProcess, binary,
    images::{ImageSpec, push_image},
    publish_approved,
};
use oakestra_addons_proto::marketplace::v1::{
    self as mpb,
    marketplace_service_client::MarketplaceServiceClient,
    marketplace_service_server::{MarketplaceService, MarketplaceServiceServer},
};
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, transport::Channel};

const ADDONS: usize = 50;
const CONCURRENCY: usize = 32;
const RUN: Duration = Duration::from_secs(3);
const RUNS: usize = 3;
/// Runs of each side of the on / off comparison, alternating.
const ON_OFF_PAIRS: usize = 5;
const BASELINE_ENV: &str = "API_BENCH_BASELINE_DATA";

/// The baseline server: fixed answers from memory.
struct Fixed {
    addons: Vec<mpb::Addon>,
    page: mpb::ListAddonsResponse,
}

#[tonic::async_trait]
impl MarketplaceService for Fixed {
    async fn publish_addon(
        &self,
        _: Request<mpb::PublishAddonRequest>,
    ) -> Result<Response<mpb::PublishAddonResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn get_addon(
        &self,
        request: Request<mpb::GetAddonRequest>,
    ) -> Result<Response<mpb::GetAddonResponse>, Status> {
        let id = &request.get_ref().id;
        let addon = self
            .addons
            .iter()
            .find(|a| &a.id == id)
            .cloned()
            .ok_or_else(|| Status::not_found(id.clone()))?;
        Ok(Response::new(mpb::GetAddonResponse { addon: Some(addon) }))
    }

    async fn list_addons(
        &self,
        _: Request<mpb::ListAddonsRequest>,
    ) -> Result<Response<mpb::ListAddonsResponse>, Status> {
        Ok(Response::new(self.page.clone()))
    }

    async fn delete_addon(
        &self,
        _: Request<mpb::DeleteAddonRequest>,
    ) -> Result<Response<mpb::DeleteAddonResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn reverify_addon(
        &self,
        _: Request<mpb::ReverifyAddonRequest>,
    ) -> Result<Response<mpb::ReverifyAddonResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn revoke_addon(
        &self,
        _: Request<mpb::RevokeAddonRequest>,
    ) -> Result<Response<mpb::RevokeAddonResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    type WatchAddonStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<mpb::WatchAddonResponse, Status>> + Send>,
    >;

    async fn watch_addon(
        &self,
        _: Request<mpb::WatchAddonRequest>,
    ) -> Result<Response<Self::WatchAddonStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    type WatchAddonsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<mpb::WatchAddonsResponse, Status>> + Send>,
    >;

    async fn watch_addons(
        &self,
        _: Request<mpb::WatchAddonsRequest>,
    ) -> Result<Response<Self::WatchAddonsStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

/// Runs as the baseline server: reads the page to serve from the file named
/// by the environment, prints `listening on ADDR` like our servers.
async fn serve_baseline(data: &str) {
    let bytes = std::fs::read(data).unwrap();
    let page = mpb::ListAddonsResponse::decode(bytes.as_slice()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(MarketplaceServiceServer::new(Fixed {
            addons: page.addons.clone(),
            page,
        }))
        // As our servers do: without TCP_NODELAY small answers wait out
        // the client's delayed ACK.
        .serve_with_incoming(
            tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
                stream.inspect(|stream| {
                    let _ = stream.set_nodelay(true);
                })
            }),
        )
        .await
        .unwrap();
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy)]
enum Call {
    Get,
    List,
}

/// Calls per second and latency percentiles of one run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    throughput: f64,
    p50: Duration,
    p99: Duration,
}

async fn load(channel: Channel, call: Call, ids: &[String]) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let mut client = MarketplaceServiceClient::new(channel.clone());
        let stop = stop.clone();
        let count = count.clone();
        let ids = ids.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match call {
                    Call::Get => {
                        n = (n * 7 + 13) % ids.len();
                        client
                            .get_addon(mpb::GetAddonRequest { id: ids[n].clone() })
                            .await
                            .unwrap();
                    }
                    Call::List => {
                        let page = client
                            .list_addons(mpb::ListAddonsRequest {
                                page_size: ADDONS as i32,
                                ..Default::default()
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        assert_eq!(page.addons.len(), ADDONS);
                    }
                }
                latencies.push(started.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
            }
            latencies
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies: Vec<Duration> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    Figures {
        throughput: count.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// The median run by throughput.
async fn median_run(channel: &Channel, call: Call, ids: &[String]) -> Figures {
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(load(channel.clone(), call, ids).await);
    }
    runs.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
    runs[RUNS / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    if let Ok(data) = std::env::var(BASELINE_ENV) {
        serve_baseline(&data).await;
        return;
    }
    let registry = RegistryServer::start().await;
    let host = registry.host();
    push_image(&host, "bench/app", "1", &ImageSpec::default(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}/marketplace.redb", dir.path().display());
    let marketplace = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store, "--insecure-registry", &host],
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..ADDONS {
        let addon = publish_approved(
            &marketplace,
            mpb::Addon {
                name: format!("bench-{n}"),
                description: "an addon of the read benchmark".into(),
                services: vec![mpb::ServiceSpec {
                    service_name: "svc".into(),
                    image: format!("{host}/bench/app:1"),
                    environment: [("MODE".to_owned(), "bench".to_owned())].into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await;
        ids.push(addon.id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(marketplace.pid().as_raw());

    // The baseline serves exactly what the marketplace returns.
    let page = MarketplaceServiceClient::new(marketplace.channel())
        .list_addons(mpb::ListAddonsRequest {
            page_size: ADDONS as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.addons.len(), ADDONS);
    let data = dir.path().join("page.pb");
    std::fs::write(&data, page.encode_to_vec()).unwrap();
    let baseline = ServerProcess::start_with_env(
        &std::env::current_exe().unwrap(),
        &[],
        &[(BASELINE_ENV, data.to_str().unwrap())],
    )
    .await;

    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        let pid = marketplace.pid().as_raw();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let ours = marketplace.channel();
    let ceiling = baseline.channel();
    let mut rows = Vec::new();
    for (name, call) in [
        ("GetAddon", Call::Get),
        ("ListAddons (50 per page)", Call::List),
    ] {
        let ours = median_run(&ours, call, &ids).await;
        let base = median_run(&ceiling, call, &ids).await;
        rows.push((name, ours, base));
    }
    sampler.abort();
    println!(
        "| call, {CONCURRENCY} concurrent, median of {RUNS} runs of {}s | ours: calls/s | p50 | p99 | baseline: minimal tonic server calls/s | p50 | p99 | ours / baseline (calls/s) |",
        RUN.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, ours, base) in rows {
        println!(
            "| {name} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
            ours.throughput,
            ms(ours.p50),
            ms(ours.p99),
            base.throughput,
            ms(base.p50),
            ms(base.p99),
            ours.throughput / base.throughput
        );
    }
    println!(
        "\nmarketplace resident memory: {:.1} MiB idle with {ADDONS} addons, {:.1} MiB peak under the load",
        idle_rss as f64 / 1024.0,
        peak.load(Ordering::Relaxed) as f64 / 1024.0
    );
    baseline.stop().await;

    // The cost of observability: metrics are counted whatever the flags
    // (they have no off switch), so "off" is a marketplace with nothing
    // scraped and no span exported, and "on" one with its metrics scraped
    // every second and every span exported over OTLP to a collector on
    // the machine. Both serve a copy of the same store at once, and their
    // runs alternate, so a drift of the machine's speed (it has swung by
    // half between runs) falls on both alike.
    marketplace.stop().await;
    let copy = dir.path().join("observed.redb");
    std::fs::copy(dir.path().join("marketplace.redb"), &copy).unwrap();
    let collector = start_collector().await;
    let plain = ServerProcess::start(
        &binary("addons-marketplace"),
        &["--store", &store, "--insecure-registry", &host],
    )
    .await;
    let observed = ServerProcess::start_with_env(
        &binary("addons-marketplace"),
        &[
            "--store",
            &format!("embedded:{}", copy.display()),
            "--insecure-registry",
            &host,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str())],
    )
    .await;
    let metrics = observed.metrics_addr().unwrap();
    let scraper = tokio::spawn(async move {
        loop {
            let _ = integration_tests::http_get_path(
                std::net::Ipv4Addr::LOCALHOST,
                metrics.port(),
                "/metrics",
                Duration::from_secs(1),
            )
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    for _ in 0..ON_OFF_PAIRS {
        offs.push(load(plain.channel(), Call::Get, &ids).await);
        ons.push(load(observed.channel(), Call::Get, &ids).await);
        eprintln!(
            "off {:.0} calls/s, on {:.0} calls/s",
            offs[offs.len() - 1].throughput,
            ons[ons.len() - 1].throughput
        );
    }
    scraper.abort();
    let median = |mut runs: Vec<Figures>| {
        runs.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
        runs[runs.len() / 2]
    };
    let (off, on) = (median(offs), median(ons));
    println!(
        "\n| GetAddon, {CONCURRENCY} concurrent, median of {ON_OFF_PAIRS} alternating runs of {}s each | metrics scraped every 1 s, every span exported (OTLP): calls/s | p50 | p99 | neither: calls/s | p50 | p99 | on / off (calls/s) |",
        RUN.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| GetAddon | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
        on.throughput,
        ms(on.p50),
        ms(on.p99),
        off.throughput,
        ms(off.p50),
        ms(off.p99),
        on.throughput / off.throughput
    );
    observed.stop().await;
    plain.stop().await;
}

/// An OTLP/gRPC collector that takes every span and keeps none; its URL.
async fn start_collector() -> String {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    struct Discard;
    #[tonic::async_trait]
    impl TraceService for Discard {
        async fn export(
            &self,
            _: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Discard))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    url
}
