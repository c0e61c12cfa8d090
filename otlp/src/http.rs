//! The HTTP client of OTLP/HTTP export: reqwest (rustls with ring, as
//! everything else here), each request run on the process's Tokio runtime.
//! The SDK's batch processor exports from a thread of its own, outside any
//! runtime; the request goes to the runtime and its answer comes back.

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

use crate::TlsFiles;

/// The largest collector answer read (an `ExportTraceServiceResponse` is
/// a few bytes; a partial success names why).
const MAX_ANSWER: usize = 64 * 1024;

/// An HTTP client that sends on the runtime it was made on.
#[derive(Debug)]
pub(crate) struct RuntimeClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl RuntimeClient {
    /// A client trusting `tls`'s CA (besides the system's) and presenting
    /// its identity, each request bounded by `timeout`. Redirects are not
    /// followed: spans go to the collector the environment names, nowhere
    /// else.
    pub(crate) fn new(tls: &TlsFiles, timeout: Duration) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("OTLP/HTTP export needs a Tokio runtime")?;
        // ring, as everything else here; a provider installed already wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &tls.ca {
            for certificate in reqwest::Certificate::from_pem_bundle(ca)
                .context("OTEL_EXPORTER_OTLP_CERTIFICATE: not PEM certificates")?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some((cert, key)) = &tls.identity {
            let pem = [cert.as_slice(), b"\n", key.as_slice()].concat();
            builder = builder.identity(reqwest::Identity::from_pem(&pem).context(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _KEY: not a PEM certificate and key",
            )?);
        }
        Ok(Self {
            client: builder
                .build()
                .context("cannot build the OTLP/HTTP client")?,
            runtime,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let mut response = client.execute(reqwest::Request::try_from(request)?).await?;
            let mut answer = Response::builder().status(response.status());
            if let Some(headers) = answer.headers_mut() {
                *headers = std::mem::take(response.headers_mut());
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER {
                    return Err(
                        format!("the collector answered more than {MAX_ANSWER} bytes").into(),
                    );
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, HttpError>(answer.body(Bytes::from(body))?)
        });
        sent.await?
    }
}
