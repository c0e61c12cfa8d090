//! The one start-up path of every server: bind, serve with health and
//! reflection, drain on shutdown.

use std::{
    collections::HashMap, future::Future, net::SocketAddr, process::ExitCode, sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    Shutdown,
    auth::{AuthLayer, MethodAccess, Security},
    browser::{BrowserLayer, BrowserPolicy},
    health::Readiness,
    limits::ConnectionLimits,
    metrics::{GrpcMetrics, Metrics, MetricsLayer},
    rest::{RestLayer, RestRoutes},
};

/// Largest request message any service of the servers decodes. The biggest
/// legitimate request, a publish, is bounded at 1 MiB of descriptor.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest response message any service of the servers encodes.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A gRPC server under construction: the binary's own services, plus the
/// health and reflection services every server has.
#[derive(Debug)]
#[must_use = "a server does nothing until it serves"]
pub struct Server {
    routes: Routes,
    health: HealthReporter,
    health_names: Vec<&'static str>,
    permissions: HashMap<&'static str, &'static [MethodAccess]>,
    security: Security,
    rest: Option<Arc<dyn RestRoutes>>,
    cors_origins: Vec<String>,
    allowed_hosts: Vec<String>,
    limits: ConnectionLimits,
    metrics: Metrics,
    metrics_listener: Option<TcpListener>,
    readiness: Readiness,
}

/// Requests in flight on one connection at once (HTTP/2 streams): a
/// monitor's link and a watch or two are what a client holds.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server with health, and reflection (both `v1` and `v1alpha`, so
    /// old and new `grpcurl` can list and describe it) added when it serves.
    pub fn new() -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        Self {
            routes: Routes::new(health_service),
            health,
            health_names: Vec::new(),
            permissions: HashMap::new(),
            security: Security::default(),
            rest: None,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            limits: ConnectionLimits::default(),
            metrics: Metrics::new(),
            metrics_listener: None,
            readiness: Readiness::default(),
        }
    }

    /// Reports the server ready (health `SERVING`, overall and for each
    /// service) only while every part of `readiness` works; the health
    /// name [`LIVENESS`](crate::health::LIVENESS) stays `SERVING` until
    /// shutdown either way.
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Registers the metrics of every call in `metrics` (where the
    /// server's parts registered theirs), and serves them all on
    /// `listener` (`--metrics-listen`) if given.
    pub fn metrics(mut self, metrics: Metrics, listener: Option<TcpListener>) -> Self {
        self.metrics = metrics;
        self.metrics_listener = listener;
        self
    }

    /// Also answers `routes` (REST, over HTTP/1.1 or HTTP/2) on the port.
    pub fn rest(mut self, routes: impl RestRoutes) -> Self {
        self.rest = Some(Arc::new(routes));
        self
    }

    /// A server as the common flags set it up: `security` (from
    /// [`CommonArgs::bind`](crate::CommonArgs::bind)), CORS origins, allowed
    /// hosts and connection limits.
    pub fn configured(common: &crate::CommonArgs, security: Security) -> Self {
        Self::new()
            .secure(security)
            .cors(&common.cors_allow_origins)
            .allowed_hosts(&common.allowed_hosts)
            .limits(common.connection_limits())
    }

    /// Lets browser pages of these origins call the server (`*`: any); by
    /// default none may, so only pages of the server's own origin can.
    pub fn cors(mut self, origins: &[String]) -> Self {
        self.cors_origins = origins.to_vec();
        self
    }

    /// Answers browsers and REST clients for these host names besides IP
    /// addresses, `localhost` and the machine's name.
    pub fn allowed_hosts(mut self, hosts: &[String]) -> Self {
        self.allowed_hosts = hosts.to_vec();
        self
    }

    /// Keeps at most this many connections open, in all and per peer.
    pub fn limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves with TLS and authentication as `security` says.
    pub fn secure(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// Reflection services (v1 and v1alpha) that list exactly what this
    /// server serves and describe it from the contracts.
    fn add_reflection(mut self) -> anyhow::Result<Self> {
        const HEALTH: &str = "grpc.health.v1.Health";
        const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
        const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
        let names = self.health_names.clone();
        let reflection = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(oakestra_addons_proto::FILE_DESCRIPTOR_SET)
                // google.rpc error details, so clients such as grpcurl decode
                // the BadRequest, ErrorInfo and other details of errors.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
                .with_service_name(HEALTH)
                .with_service_name(REFLECTION_V1)
                .with_service_name(REFLECTION_V1ALPHA);
            names
                .iter()
                .fold(builder, |builder, name| builder.with_service_name(*name))
        };
        let v1 = reflection()
            .build_v1()
            .context("cannot build the reflection service")?;
        let v1alpha = reflection()
            .build_v1alpha()
            .context("cannot build the reflection service")?;
        self.routes = self.routes.add_service(v1).add_service(v1alpha);
        Ok(self)
    }

    /// Adds one of the binary's services with the roles each of its
    /// methods needs; health reports it by its name.
    pub fn add_service<S>(mut self, service: S, permissions: &'static [MethodAccess]) -> Self
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health_names.push(S::NAME);
        self.permissions.insert(S::NAME, permissions);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Serves on `listener` until `shutdown` fires, then reports NOT_SERVING,
    /// stops accepting, and waits up to `grace` for in-flight calls.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let Self {
            routes,
            health,
            health_names,
            permissions,
            security,
            rest,
            cors_origins,
            allowed_hosts,
            limits,
            metrics,
            metrics_listener,
            readiness,
        } = self.add_reflection()?;
        let cors = cors_layer(&cors_origins)?;
        let browsers = BrowserLayer::new(BrowserPolicy::new(&allowed_hosts, &cors_origins));
        security.check_listen(listener.local_addr()?)?;
        health
            .set_service_status(crate::health::LIVENESS, ServingStatus::Serving)
            .await;
        set_readiness(&health, &health_names, &readiness).await;
        {
            let (health, names, shutdown, readiness) = (
                health.clone(),
                health_names.clone(),
                shutdown.clone(),
                readiness.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.fired() => return,
                        () = readiness.changed() => {}
                    }
                    if shutdown.is_fired() {
                        return;
                    }
                    set_readiness(&health, &names, &readiness).await;
                }
            });
        }

        let stop = shutdown.clone();
        let health_on_stop = health.clone();
        let names = health_names.clone();
        let stopped = async move {
            stop.fired().await;
            for name in names {
                health_on_stop
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            health_on_stop
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health_on_stop
                .set_service_status(crate::health::LIVENESS, ServingStatus::NotServing)
                .await;
        };
        let tls = security
            .tls
            .as_ref()
            .map(|files| crate::tls::server_config(files, security.client_certificates.as_ref()))
            .transpose()?;
        // HTTP/1.1 too, for gRPC-Web and REST clients. Outermost first: CORS
        // answers browsers' preflights, the browser policy refuses what a
        // page elsewhere may have made a browser send, the gateway turns
        // REST into gRPC calls to what follows, gRPC-Web becomes gRPC, and
        // the guard authenticates and authorizes every call, whichever way
        // it came.
        let grpc_metrics = GrpcMetrics::new(&metrics, known_methods(&permissions));
        let gateway_metrics = metrics.clone();
        if let Some(listener) = metrics_listener {
            let (shutdown, readiness) = (shutdown.clone(), readiness.clone());
            tokio::spawn(async move {
                if let Err(err) = metrics.serve(listener, readiness, shutdown).await {
                    tracing::error!(error = %err, "the metrics endpoint failed");
                }
            });
        }
        let guard = AuthLayer::new(security, permissions, grpc_metrics.clone());
        let gateway = RestLayer::new(rest, Some(guard.authenticator()), &gateway_metrics);
        let router = tonic::transport::Server::builder()
            .accept_http1(true)
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .trace_fn(crate::telemetry::server_span)
            .layer(crate::browser::BrowserCorsLayer(cors))
            .layer(browsers)
            .layer(gateway)
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(MetricsLayer(grpc_metrics))
            .layer(guard)
            .add_routes(routes);
        let server: futures::future::BoxFuture<'static, Result<(), tonic::transport::Error>> =
            match tls {
                Some(config) => Box::pin(router.serve_with_incoming_shutdown(
                    crate::tls::incoming(listener, config, limits),
                    stopped,
                )),
                // Without TCP_NODELAY, small responses wait out the peer's
                // delayed ACK (40 ms on Linux).
                None => {
                    Box::pin(router.serve_with_incoming_shutdown(
                        crate::limits::plain(listener, limits),
                        stopped,
                    ))
                }
            };
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => return result.context("the gRPC server failed"),
            () = shutdown.fired() => {}
        }
        match tokio::time::timeout(grace, server).await {
            Ok(result) => result.context("the gRPC server failed"),
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "in-flight calls did not finish within the grace period"
                );
                Ok(())
            }
        }
    }
}

/// Sets the overall health and each service's to what `readiness` says.
async fn set_readiness(health: &HealthReporter, names: &[&'static str], readiness: &Readiness) {
    let failing = readiness.failing();
    let status = if failing.is_empty() {
        ServingStatus::Serving
    } else {
        tracing::warn!(?failing, "not ready");
        ServingStatus::NotServing
    };
    for name in names.iter().copied().chain([""]) {
        health.set_service_status(name, status).await;
    }
}

/// The methods the server answers: its services' (each named in its
/// permissions), health's and reflection's; any other is `unknown` to the
/// metrics.
fn known_methods(
    permissions: &HashMap<&'static str, &'static [MethodAccess]>,
) -> Vec<(&'static str, &'static str)> {
    let mut methods: Vec<_> = permissions
        .iter()
        .flat_map(|(service, table)| {
            table
                .iter()
                .flat_map(|access| access.methods.iter().map(|method| (*service, *method)))
        })
        .collect();
    methods.extend([
        ("grpc.health.v1.Health", "Check"),
        ("grpc.health.v1.Health", "Watch"),
        (
            "grpc.reflection.v1.ServerReflection",
            "ServerReflectionInfo",
        ),
        (
            "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ),
    ]);
    methods
}

/// The CORS policy for `origins` (`*`: any). gRPC-Web clients read the
/// status from headers that must be exposed to them.
fn cors_layer(origins: &[String]) -> anyhow::Result<tower_http::cors::CorsLayer> {
    use http::{HeaderName, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-grpc-web"),
            HeaderName::from_static("x-user-agent"),
            HeaderName::from_static("grpc-timeout"),
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(600));
    if origins.iter().any(|origin| origin == "*") {
        return Ok(layer.allow_origin(tower_http::cors::Any));
    }
    let mut allowed = Vec::with_capacity(origins.len());
    for origin in origins {
        let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
            && !origin.ends_with('/')
            && origin
                .split("://")
                .nth(1)
                .is_some_and(|host| !host.is_empty() && !host.contains('/'));
        let value = http::HeaderValue::from_str(origin).ok().filter(|_| valid);
        allowed.push(value.with_context(|| {
            format!("--cors-allow-origin `{origin}` is not an origin such as https://dashboard.example:8443, or *")
        })?);
    }
    Ok(layer.allow_origin(AllowOrigin::list(allowed)))
}

/// Makes `ring` the process's TLS crypto: the dependency graph enables more
/// than one rustls backend, and rustls then refuses to pick. Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Binds `addr` and prints the bound address on stdout as
/// `listening on ADDR`, so callers that asked for port 0 learn the port.
pub async fn bind(addr: SocketAddr, security: &Security) -> anyhow::Result<TcpListener> {
    let listener = bind_quietly(addr, security).await?;
    announce(&listener)?;
    Ok(listener)
}

/// [`bind`] without the announcement, for a server that has more to do
/// before it is ready to be called: it [`announce`]s itself then.
pub async fn bind_quietly(addr: SocketAddr, security: &Security) -> anyhow::Result<TcpListener> {
    security.check_listen(addr)?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Prints `listening on ADDR` for `listener` on stdout.
pub fn announce(listener: &TcpListener) -> anyhow::Result<()> {
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    println!("listening on {bound}");
    tracing::info!(address = %bound, "listening");
    Ok(())
}

/// The whole `main` of a server binary named `name`: its flags parsed
/// ([`crate::parse_config`]), the runtime ([`main_with`]), logging and
/// tracing ([`crate::init_telemetry`], with the log format of the flags
/// `common` finds), SIGTERM and SIGINT ([`Shutdown::on_signals`]), then
/// `run` until it returns.
pub fn server_main<C, F, Fut>(
    name: &'static str,
    common: fn(&C) -> &crate::CommonArgs,
    run: F,
) -> ExitCode
where
    C: clap::Parser,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = match crate::parse_config::<C>() {
        Ok(config) => config,
        Err(code) => return code,
    };
    main_with(|| async move {
        let _telemetry = crate::init_telemetry(name, common(&config).log_format)?;
        let shutdown = Shutdown::on_signals()?;
        run(config, shutdown).await
    })
}

/// Runs a server's `main`: a start-up failure is one line on stderr and
/// exit code 1; a clean shutdown is exit code 0.
pub fn main_with<F, Fut>(run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    install_crypto();
    // Stores, state and logs are the server's alone: files 0600,
    // directories 0700, whatever umask the process was started with. What
    // others must read (a container's hosts file) is opened up on purpose.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
