//! Flags every server takes.

use std::{net::SocketAddr, time::Duration};

#[cfg(feature = "store")]
use addons_store::{Location, OpenOptions, Store};
#[cfg(feature = "store")]
use anyhow::Context as _;

/// Flags shared by the marketplace, the manager and the monitor. Every flag
/// has an environment-variable equivalent.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Address the gRPC server listens on; port 0 picks a free port, and the
    /// bound address is printed on stdout as `listening on ADDR`.
    #[arg(long, env = "ADDONS_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// How long in-flight calls may take to finish after SIGTERM or SIGINT.
    #[arg(
        long,
        env = "ADDONS_SHUTDOWN_GRACE",
        value_name = "DURATION",
        default_value = "3s",
        value_parser = parse_duration
    )]
    pub shutdown_grace: Duration,

    /// Log format on stderr. The filter comes from RUST_LOG (default `info`).
    #[arg(long, env = "ADDONS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Origins whose browser pages may call the server (gRPC-Web and the
    /// REST routes), such as `https://dashboard.example:8443`; repeat the
    /// flag or separate with commas; `*` lets any. None by default: only
    /// pages served from the server's own origin can.
    #[arg(
        long = "cors-allow-origin",
        env = "ADDONS_CORS_ALLOW_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub cors_allow_origins: Vec<String>,

    /// Host names this server answers browsers' and REST clients' requests
    /// for, besides IP addresses, `localhost` and the machine's host name
    /// (the name a dashboard or a proxy reaches it by); repeat the flag or
    /// separate with commas. A request for any other `Host` is refused
    /// (421), so a DNS name rebound to this address reads nothing.
    #[arg(
        long = "allowed-host",
        env = "ADDONS_ALLOWED_HOSTS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub allowed_hosts: Vec<String>,

    /// Most connections the server keeps open at once; one more is closed
    /// as it comes.
    #[arg(long, env = "ADDONS_MAX_CONNECTIONS", value_name = "N", default_value_t = 16_384)]
    pub max_connections: usize,

    /// Most connections one peer address may keep open at once (loopback
    /// peers, such as a mesh sidecar, count only towards
    /// `--max-connections`).
    #[arg(
        long,
        env = "ADDONS_MAX_CONNECTIONS_PER_PEER",
        value_name = "N",
        default_value_t = 1_024
    )]
    pub max_connections_per_peer: usize,

    /// Serve Prometheus metrics (`GET /metrics`) and HTTP probes
    /// (`/livez`, `/readyz`) on this address. Off by default; the endpoint
    /// has no authentication, so only a loopback address is accepted
    /// unless --metrics-insecure (or --insecure).
    #[arg(long, env = "ADDONS_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Allow --metrics-listen off loopback, for a Prometheus elsewhere:
    /// anyone who reaches the address reads how the server is used.
    #[arg(long, env = "ADDONS_METRICS_INSECURE")]
    pub metrics_insecure: bool,

    /// TLS and authentication.
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
}

impl CommonArgs {
    /// What a server does first: loads the security the flags set and
    /// listens on `--listen` (or `default`), refusing an address the
    /// security does not allow.
    pub async fn bind(
        &self,
        default: SocketAddr,
    ) -> anyhow::Result<(crate::Security, tokio::net::TcpListener)> {
        let (security, listener) = self.bind_quietly(default).await?;
        crate::announce(&listener)?;
        Ok((security, listener))
    }

    /// [`CommonArgs::bind`] without printing `listening on`: the caller
    /// [`announce`](crate::announce)s once it is ready to be called.
    pub async fn bind_quietly(
        &self,
        default: SocketAddr,
    ) -> anyhow::Result<(crate::Security, tokio::net::TcpListener)> {
        let security = crate::Security::load(&self.auth)?;
        let listener = crate::bind_quietly(self.listen.unwrap_or(default), &security).await?;
        Ok((security, listener))
    }

    /// The listener of `--metrics-listen`, if set (see
    /// [`bind_metrics`](crate::metrics::bind_metrics)).
    pub async fn bind_metrics(&self) -> anyhow::Result<Option<tokio::net::TcpListener>> {
        match self.metrics_listen {
            Some(addr) => Ok(Some(
                crate::metrics::bind_metrics(addr, self.metrics_insecure || self.auth.insecure)
                    .await?,
            )),
            None => Ok(None),
        }
    }

    /// The connection limits the flags set.
    pub fn connection_limits(&self) -> crate::ConnectionLimits {
        crate::ConnectionLimits {
            total: self.max_connections.max(1),
            per_peer: self.max_connections_per_peer.max(1),
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `250ms`, `3s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(split) => text.split_at(split),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 3s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}`: use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("`{text}`: {err}"))
}

/// The `--store` flag of the servers that keep records.
#[cfg(feature = "store")]
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Where records are kept: `embedded:PATH` (the default, under
    /// /var/lib/oakestra-addons) or `mongodb://host:port/dbname`.
    #[arg(long, env = "ADDONS_STORE", value_name = "STORE")]
    pub store: Option<String>,
}

#[cfg(feature = "store")]
impl StoreArgs {
    /// Opens the store `--store` names, or the embedded one at
    /// `default_embedded`, its operations measured in `metrics`, failing with one line that says which store
    /// could not be opened and why.
    pub async fn open(
        &self,
        default_embedded: &str,
        default_database: &str,
        metrics: &crate::metrics::Metrics,
    ) -> anyhow::Result<Store> {
        let location: Location = match &self.store {
            Some(text) => text.parse()?,
            None => format!("embedded:{default_embedded}").parse()?,
        };
        let mut options = OpenOptions::new(default_database);
        options.observer = Some(std::sync::Arc::new(crate::metrics::StoreMetrics::new(
            metrics,
        )));
        let store = Store::open(&location, &options)
            .await
            .context("store unavailable")?;
        tracing::info!(store = %store.describe(), "store opened");
        Ok(store)
    }
}

/// Parses a server's flags. Help and version go to stdout with exit code 0;
/// a bad flag is one line on stderr (`error: ...`) and exit code 2.
pub fn parse_config<C: clap::Parser>() -> Result<C, std::process::ExitCode> {
    use clap::error::ErrorKind;
    match C::try_parse() {
        Ok(config) => Ok(config),
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = err.print();
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(err) => {
            let text = err.render().to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            Err(std::process::ExitCode::from(2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("4"), Ok(Duration::from_secs(4)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
