//! The servers' TLS: our own rustls acceptor, so that a client certificate
//! is checked by the guard rather than in the handshake. A certificate from
//! an unknown CA then gets a gRPC UNAUTHENTICATED with a reason, like every
//! other bad credential, instead of a torn-down connection the client can
//! only report as UNAVAILABLE.
//!
//! The handshake still proves that the client holds the key of the
//! certificate it shows (the signature checks are webpki's); only the
//! chain's trust is deferred to [`ClientCertificates::verify`].

use std::{io, sync::Arc};

use anyhow::Context as _;
use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected as _;

use crate::limits::HANDSHAKE_TIMEOUT;

/// TLS material of a server.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: Vec<u8>,
    /// Private key (PEM).
    pub key: Vec<u8>,
    /// CA of client certificates (PEM), when they are required.
    pub client_ca: Option<Vec<u8>>,
}

/// The CA that client certificates must chain to.
#[derive(Clone)]
pub(crate) struct ClientCertificates {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for ClientCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificates").finish_non_exhaustive()
    }
}

impl ClientCertificates {
    /// Trusts the certificates of the CA bundle `pem`.
    pub(crate) fn from_pem(pem: &[u8]) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(certificate.context("not a PEM certificate")?)
                .context("not a usable CA certificate")?;
        }
        anyhow::ensure!(!roots.is_empty(), "holds no certificate");
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .context("cannot build a client certificate verifier")?;
        Ok(Self { verifier })
    }

    /// Whether the chain `certificates` (leaf first) is signed by the CA,
    /// valid now and meant for clients; the reason when not.
    pub(crate) fn verify(&self, certificates: &[CertificateDer<'_>]) -> Result<(), String> {
        let (leaf, intermediates) = certificates
            .split_first()
            .ok_or_else(|| "no certificate".to_owned())?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|err| format!("the client certificate is not trusted: {err}"))
    }
}

/// The handshake's verifier: asks for a certificate, checks that the client
/// holds its key, and leaves the chain to the guard.
#[derive(Debug)]
struct Deferred(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for Deferred {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // A caller may come with a token only; the guard decides.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Checked per call by `ClientCertificates::verify`.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The rustls configuration of a server: its certificate, HTTP/2 only, and
/// client certificates asked for when a client CA is configured.
pub(crate) fn server_config(
    files: &TlsFiles,
    clients: Option<&ClientCertificates>,
) -> anyhow::Result<rustls::ServerConfig> {
    let chain = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .context("the TLS certificate is not PEM")?;
    anyhow::ensure!(!chain.is_empty(), "the TLS certificate file holds none");
    let key = PrivateKeyDer::from_pem_slice(&files.key).context("the TLS key is not a PEM key")?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("no TLS protocol version")?;
    let builder = match clients {
        Some(clients) => {
            builder.with_client_cert_verifier(Arc::new(Deferred(clients.verifier.clone())))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("the TLS key does not match the certificate")?;
    // HTTP/1.1 as well, for gRPC-Web and REST clients.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS connections on `listener` under `limits`: each handshake runs on
/// its own, bounded in time and in number (per peer and in all), and never
/// holds up the next accept.
pub(crate) fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    limits: crate::limits::ConnectionLimits,
) -> ReceiverStream<io::Result<TlsStream<crate::limits::Limited>>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let handshakes = crate::limits::Handshakes::new();
    crate::limits::accept(listener, limits, move |stream, sender| {
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        async move {
            let peer = stream
                .connect_info()
                .remote_addr()
                .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            let Some(_handshake) = handshakes.start(peer) else {
                return;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    drop(_handshake);
                    let _ = sender.send(Ok(stream)).await;
                }
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    })
}
