//! Who is calling, and may they: TLS (and mTLS), bearer tokens (JWTs as
//! Oakestra issues them), client-certificate and service-mesh identities,
//! and the roles each method needs, declared next to each service.
//!
//! Every server takes the same flags ([`AuthArgs`]). A request is
//! authenticated by, in order: a bearer token in `authorization`, the
//! client certificate of an mTLS connection (its subject's CN, roles from
//! `--identity-roles`), or the `--trusted-identity-header` of a loopback
//! peer (a sidecar's). Health checks and reflection are open. Without any
//! authentication configured, every caller is an anonymous admin, which a
//! server only allows on a loopback address or with `--insecure`.

mod guard;
mod jwt;
mod subject;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
};

use anyhow::Context as _;

pub(crate) use self::guard::Authenticator;
pub use self::guard::{AuthLayer, MethodAccess};
use self::jwt::JwtVerifier;
use crate::tls::ClientCertificates;
pub use crate::tls::TlsFiles;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Get, list and watch.
    Viewer,
    /// Viewer, and publish; delete and reverify the addons it published.
    Publisher,
    /// Viewer, and delete and reverify any addon.
    Reviewer,
    /// Viewer, and install, uninstall and every later lifecycle call.
    Operator,
    /// Only the monitor link, as the node whose id is its subject.
    Node,
    /// Everything.
    Admin,
}

impl Role {
    /// The role's name in tokens and role files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Publisher => "publisher",
            Self::Reviewer => "reviewer",
            Self::Operator => "operator",
            Self::Node => "node",
            Self::Admin => "admin",
        }
    }

    /// Whether holding `self` grants `needed`.
    fn grants(self, needed: Role) -> bool {
        self == needed
            || self == Self::Admin
            || (needed == Self::Viewer
                && matches!(self, Self::Publisher | Self::Reviewer | Self::Operator))
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "viewer" => Self::Viewer,
            "publisher" => Self::Publisher,
            "reviewer" => Self::Reviewer,
            "operator" => Self::Operator,
            "node" => Self::Node,
            "admin" => Self::Admin,
            other => return Err(format!("unknown role `{other}`")),
        })
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing: no authentication is configured.
    Anonymous,
    /// A bearer token.
    Token,
    /// A client certificate.
    Certificate,
    /// A trusted header set by a sidecar on loopback.
    Mesh,
}

/// The authenticated caller of a request, in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Who: the token's `sub`, the certificate's CN, or the mesh identity.
    pub subject: String,
    /// What it may do.
    pub roles: BTreeSet<Role>,
    /// How it proved it.
    pub source: Source,
}

impl Identity {
    /// The caller of a server with no authentication: may do everything.
    pub fn anonymous() -> Self {
        Self {
            subject: String::new(),
            roles: BTreeSet::from([Role::Admin]),
            source: Source::Anonymous,
        }
    }

    /// Whether it holds a role that grants `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.iter().any(|held| held.grants(role))
    }

    /// The identity of a request (every request through a [`crate::Server`]
    /// has one). A request that did not pass the guard has none and gets
    /// an identity without roles: a service reached some other way fails
    /// closed.
    pub fn of<T>(request: &tonic::Request<T>) -> Identity {
        request
            .extensions()
            .get::<Identity>()
            .cloned()
            .unwrap_or_else(|| Self {
                subject: String::new(),
                roles: BTreeSet::new(),
                source: Source::Anonymous,
            })
    }
}

/// Writes the audit record (log target `audit`) of a mutating call: who,
/// how they proved it, the method, the resource and the outcome.
pub fn audit<T>(
    identity: &Identity,
    method: &str,
    resource: &str,
    outcome: &Result<T, tonic::Status>,
) {
    match outcome {
        Ok(_) => tracing::info!(
            target: "audit",
            subject = %identity.subject,
            source = ?identity.source,
            method,
            resource,
            outcome = "OK",
        ),
        Err(status) => tracing::info!(
            target: "audit",
            subject = %identity.subject,
            source = ?identity.source,
            method,
            resource,
            outcome = ?status.code(),
            reason = crate::reason_of(status).unwrap_or_default(),
        ),
    }
}

/// Security flags every server takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, env = "ADDONS_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "ADDONS_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Authenticate callers by client certificates signed by this CA (PEM):
    /// the subject's CN is the caller, with roles from `--identity-roles`.
    /// A certificate from any other CA is refused (UNAUTHENTICATED); a
    /// caller without a certificate needs a token, if tokens are accepted.
    #[arg(long, env = "ADDONS_TLS_CLIENT_CA", value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Accept bearer tokens (JWT) signed with this HS256 secret.
    #[arg(long, env = "ADDONS_JWT_SECRET_FILE", value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Accept bearer tokens (JWT) signed with this RS256 or ES256 public key
    /// (PEM).
    #[arg(long, env = "ADDONS_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// Accept bearer tokens (JWT) signed with the key this URL serves, as
    /// Oakestra's system manager serves its own (`GET :10011/key`, JSON
    /// `{"public_key": PEM}`; a plain PEM body is taken too). Fetched at
    /// start, every 5 minutes, and again (at most every 10 s) when a token
    /// fails with the key in hand, so a rotated key is followed.
    #[arg(long, env = "ADDONS_JWT_PUBLIC_KEY_URL", value_name = "URL")]
    pub jwt_public_key_url: Option<String>,

    /// Allow `--jwt-public-key-url` over plain HTTP off loopback (Oakestra's
    /// compose network serves the key so): whoever can change the answer
    /// can sign tokens.
    #[arg(long, env = "ADDONS_JWT_PUBLIC_KEY_INSECURE_HTTP")]
    pub jwt_public_key_insecure_http: bool,

    /// Roles of tokens from other issuers as ours: a YAML map from role to
    /// a list of our roles (`Admin: [admin]`). Without it, Oakestra's:
    /// `Admin` → admin, `Organization_Admin` → operator, publisher,
    /// reviewer, `Infrastructure_Provider` → operator,
    /// `Application_Provider` → publisher. Our own role names always count.
    #[arg(long, env = "ADDONS_JWT_ROLE_MAP", value_name = "FILE")]
    pub jwt_role_map: Option<PathBuf>,

    /// One entry of the role map, `ROLE=ours,ours` (repeatable), over the
    /// map in force.
    #[arg(long = "jwt-role", value_name = "ROLE=OURS")]
    pub jwt_roles: Vec<String>,

    /// Tokens must carry this `iss`.
    #[arg(long, env = "ADDONS_JWT_ISSUER", value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Tokens must carry this `aud`.
    #[arg(long, env = "ADDONS_JWT_AUDIENCE", value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Roles of certificate and mesh identities: a YAML map from identity
    /// to a list of roles (`node-1: [node]`).
    #[arg(long, env = "ADDONS_IDENTITY_ROLES", value_name = "FILE")]
    pub identity_roles: Option<PathBuf>,

    /// Take the caller's identity from this header, but only from loopback
    /// peers (a service-mesh sidecar that terminated mTLS).
    #[arg(long, env = "ADDONS_TRUSTED_IDENTITY_HEADER", value_name = "NAME")]
    pub trusted_identity_header: Option<String>,

    /// Allow serving on a non-loopback address without authentication.
    #[arg(long, env = "ADDONS_INSECURE")]
    pub insecure: bool,
}

/// A server's security, loaded from its flags.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub(crate) tls: Option<TlsFiles>,
    pub(crate) client_certificates: Option<ClientCertificates>,
    pub(crate) jwt: Option<JwtVerifier>,
    pub(crate) identity_roles: BTreeMap<String, BTreeSet<Role>>,
    pub(crate) trusted_header: Option<http::HeaderName>,
    pub(crate) insecure: bool,
}

impl Security {
    /// Reads every file the flags name; any problem stops the server.
    pub fn load(args: &AuthArgs) -> anyhow::Result<Self> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("cannot read the {what} {}", path.display()))
        };
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: read(cert, "TLS certificate")?,
                key: read(key, "TLS key")?,
                client_ca: args
                    .tls_client_ca
                    .as_ref()
                    .map(|ca| read(ca, "client CA"))
                    .transpose()?,
            }),
            _ => None,
        };
        let client_certificates = tls
            .as_ref()
            .and_then(|tls| tls.client_ca.as_deref())
            .map(ClientCertificates::from_pem)
            .transpose()
            .context("in --tls-client-ca")?;
        let secret = args
            .jwt_secret_file
            .as_ref()
            .map(|p| read(p, "JWT secret"))
            .transpose()?;
        let public = args
            .jwt_public_key
            .as_ref()
            .map(|p| read(p, "JWT public key"))
            .transpose()?;
        let fetched = args
            .jwt_public_key_url
            .as_deref()
            .map(|url| jwt::FetchedKey::new(url, args.jwt_public_key_insecure_http))
            .transpose()
            .context("in --jwt-public-key-url")?;
        let mut role_map = match &args.jwt_role_map {
            Some(path) => {
                parse_identity_roles(&String::from_utf8_lossy(&read(path, "JWT role map")?))
                    .with_context(|| format!("in {}", path.display()))?
            }
            None => jwt::oakestra_roles(),
        };
        for entry in &args.jwt_roles {
            let (name, roles) = jwt::parse_role_entry(entry).context("in --jwt-role")?;
            role_map.insert(name, roles);
        }
        let jwt = if secret.is_some() || public.is_some() || fetched.is_some() {
            if let Some(fetched) = &fetched {
                fetched.watch();
            }
            Some(JwtVerifier::new(
                secret.as_deref(),
                public.as_deref(),
                fetched,
                args.jwt_issuer.clone(),
                args.jwt_audience.clone(),
                role_map,
            )?)
        } else {
            None
        };
        let identity_roles = match &args.identity_roles {
            Some(path) => parse_identity_roles(&String::from_utf8_lossy(&read(
                path,
                "identity roles file",
            )?))
            .with_context(|| format!("in {}", path.display()))?,
            None => BTreeMap::new(),
        };
        let trusted_header = args
            .trusted_identity_header
            .as_deref()
            .map(|name| {
                http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .with_context(|| format!("`{name}` is not a header name"))
            })
            .transpose()?;
        Ok(Self {
            tls,
            client_certificates,
            jwt,
            identity_roles,
            trusted_header,
            insecure: args.insecure,
        })
    }

    /// The roles `--identity-roles` gives a certificate or mesh identity.
    pub(crate) fn roles_of(&self, subject: &str) -> BTreeSet<Role> {
        self.identity_roles
            .get(subject)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether callers must prove who they are.
    pub fn authenticates(&self) -> bool {
        self.jwt.is_some() || self.trusted_header.is_some() || self.client_certificates.is_some()
    }

    /// Refuses to serve on a non-loopback address without authentication,
    /// unless `--insecure` says so; warns when it does.
    pub fn check_listen(&self, addr: SocketAddr) -> anyhow::Result<()> {
        if self.authenticates() {
            return Ok(());
        }
        if !addr.ip().is_loopback() {
            if !self.insecure {
                anyhow::bail!(
                    "refusing to serve on {addr} without authentication: set --jwt-secret-file, --jwt-public-key, --jwt-public-key-url, --tls-client-ca or --trusted-identity-header, listen on a loopback address, or pass --insecure"
                );
            }
            tracing::warn!(%addr, "serving WITHOUT authentication on a non-loopback address (--insecure): anyone who can reach it can install addons that run as root");
        }
        Ok(())
    }
}

/// Parses a roles file: a YAML map from identity to roles.
pub fn parse_identity_roles(text: &str) -> anyhow::Result<BTreeMap<String, BTreeSet<Role>>> {
    if text.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let raw: BTreeMap<String, Vec<String>> =
        serde_yaml_ng::from_str(text).context("not a map from identity to a list of roles")?;
    raw.into_iter()
        .map(|(identity, roles)| {
            let roles = roles
                .iter()
                .map(|r| r.parse::<Role>())
                .collect::<Result<BTreeSet<_>, _>>()
                .map_err(|err| anyhow::anyhow!("{identity}: {err}"))?;
            Ok((identity, roles))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_issue_says() {
        assert!(Role::Operator.grants(Role::Viewer));
        assert!(Role::Publisher.grants(Role::Viewer));
        assert!(!Role::Viewer.grants(Role::Operator));
        assert!(!Role::Node.grants(Role::Viewer));
        assert!(!Role::Operator.grants(Role::Node));
        assert!(Role::Admin.grants(Role::Node));
        let roles = parse_identity_roles("node-1: [node]\nalice: [operator, publisher]\n").unwrap();
        assert_eq!(roles["alice"].len(), 2);
        assert!(parse_identity_roles("bob: [root]").is_err());
    }

    #[test]
    fn refuses_an_open_server_off_loopback() {
        let open = Security::default();
        assert!(open.check_listen("127.0.0.1:1".parse().unwrap()).is_ok());
        assert!(open.check_listen("0.0.0.0:1".parse().unwrap()).is_err());
        let insecure = Security {
            insecure: true,
            ..Security::default()
        };
        assert!(insecure.check_listen("0.0.0.0:1".parse().unwrap()).is_ok());
    }
}
