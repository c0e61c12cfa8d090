//! The client side of the servers' security: how the manager reaches the
//! marketplace and the monitor reaches the manager, over TLS (trusting a
//! given CA, optionally with a client certificate) and with a bearer token
//! read from a file (read again when the file changes, so it can rotate).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use anyhow::Context as _;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

/// Where a client's TLS material and token are.
#[derive(Debug, Clone, Default)]
pub struct ClientCredentials {
    /// CA to trust for the server's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for mTLS.
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
    /// File holding a bearer token.
    pub token_file: Option<PathBuf>,
}

/// Declares the flags of how a server reaches another, as a clap `Args`
/// struct to flatten into its config: the peer's URL `--<flag>`
/// (environment `<ENV>`), `--<flag>-ca`, `--<flag>-cert` and
/// `--<flag>-key` (`<ENV>_CA`, `<ENV>_CERT`, `<ENV>_KEY`), a token file
/// flag, and `credentials()` for [`ClientCredentials`].
#[macro_export]
macro_rules! client_flags {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            peer: $peer:literal,
            flag: $flag:literal,
            env: $env:literal,
            url: ($default_url:literal, $url_help:literal),
            cert_help: $cert_help:literal,
            token: ($token_flag:literal, $token_env:literal, $token_help:literal) $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            #[arg(long = $flag, env = $env, value_name = "URL", default_value = $default_url)]
            #[arg(help = $url_help)]
            pub url: String,

            #[arg(long = concat!($flag, "-ca"), env = concat!($env, "_CA"), value_name = "FILE")]
            #[arg(help = concat!("CA to trust for the ", $peer, "'s TLS certificate (PEM)."))]
            pub ca: Option<::std::path::PathBuf>,

            #[arg(long = concat!($flag, "-cert"), env = concat!($env, "_CERT"), value_name = "FILE")]
            #[arg(requires = "key", help = $cert_help)]
            pub cert: Option<::std::path::PathBuf>,

            #[arg(long = concat!($flag, "-key"), env = concat!($env, "_KEY"), value_name = "FILE")]
            #[arg(requires = "cert", help = concat!("Key of `--", $flag, "-cert` (PEM)."))]
            pub key: Option<::std::path::PathBuf>,

            #[arg(long = $token_flag, env = $token_env, value_name = "FILE", help = $token_help)]
            pub token_file: Option<::std::path::PathBuf>,
        }

        impl $name {
            /// Where the TLS material and the token are.
            pub fn credentials(&self) -> $crate::ClientCredentials {
                $crate::ClientCredentials {
                    ca: self.ca.clone(),
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    token_file: self.token_file.clone(),
                }
            }
        }
    };
}

impl ClientCredentials {
    /// An endpoint for `url` with TLS as configured (`https` URLs use TLS
    /// even without a CA: the system's roots are not loaded, so a CA is
    /// then required).
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid URL `{url}`"))?;
        if self.ca.is_some() || self.cert.is_some() || url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("cannot read the CA {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?;
                let key =
                    std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .context("invalid client TLS configuration")?;
        }
        Ok(endpoint)
    }

    /// The interceptor that adds the token and the trace context to every
    /// call. Fails at once if the token file cannot be read.
    pub fn authorize(&self) -> anyhow::Result<Authorize> {
        let authorize = Authorize {
            token: self.token_file.clone().map(|path| {
                Arc::new(TokenFile {
                    path,
                    cached: Mutex::new(None),
                })
            }),
        };
        if let Some(token) = &authorize.token {
            token.header().map_err(anyhow::Error::msg)?;
        }
        Ok(authorize)
    }
}

#[cfg(test)]
mod loopback_tests {
    #[test]
    fn tells_loopback_urls() {
        for url in [
            "http://127.0.0.1:1",
            "http://localhost:1",
            "http://[::1]:1",
            "http://127.9.9.9",
        ] {
            assert!(super::is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.1:1",
            "http://manager:1",
            "http://localhost.evil:1",
            "nonsense",
        ] {
            assert!(!super::is_loopback_url(url), "{url}");
        }
    }
}

/// Whether `url`'s host is a loopback address or `localhost`: a plaintext
/// connection to it never leaves the machine (or the pod, to a sidecar).
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, MetadataValue<Ascii>)>>,
}

impl TokenFile {
    fn header(&self) -> Result<MetadataValue<Ascii>, String> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|err| format!("cannot read the token file {}: {err}", self.path.display()))?;
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, header)) = cached.as_ref()
            && *at == modified
        {
            return Ok(header.clone());
        }
        let token = std::fs::read_to_string(&self.path)
            .map_err(|err| format!("cannot read the token file {}: {err}", self.path.display()))?;
        let header: MetadataValue<Ascii> =
            format!("Bearer {}", token.trim()).parse().map_err(|_| {
                format!(
                    "the token in {} is not valid header text",
                    self.path.display()
                )
            })?;
        *cached = Some((modified, header.clone()));
        Ok(header)
    }
}

/// Adds `authorization: Bearer <token>` (when there is a token) and the
/// W3C trace context to every call.
#[derive(Debug, Clone, Default)]
pub struct Authorize {
    token: Option<Arc<TokenFile>>,
}

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let mut request = crate::inject_trace_context(request)?;
        if let Some(token) = &self.token {
            let header = token.header().map_err(Status::unauthenticated)?;
            request.metadata_mut().insert("authorization", header);
        }
        Ok(request)
    }
}
