//! Throwaway PKI and tokens for tests (and the dev stack): a CA, server and
//! client certificates signed by it, and JWTs with roles, all written to a
//! directory as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A CA that signs certificates into a directory.
pub struct TestCa {
    dir: PathBuf,
    params: CertificateParams,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").field("dir", &self.dir).finish()
    }
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/<name>.pem`.
    /// Also makes `ring` this process's TLS crypto, for the test's clients.
    pub fn new(dir: &Path, name: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign the CA");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write the CA");
        Self {
            dir: dir.join(name),
            params,
            key,
        }
        .created()
    }

    fn created(self) -> Self {
        std::fs::create_dir_all(&self.dir).expect("CA dir");
        self
    }

    /// The CA certificate's file.
    pub fn cert(&self) -> PathBuf {
        self.dir.with_extension("pem")
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, name: &str) -> CertFiles {
        self.sign(
            name,
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject CN is `name`.
    pub fn client(&self, name: &str) -> CertFiles {
        self.sign(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn sign(&self, name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        write_private(&files.key, key.serialize_pem().as_bytes());
        files
    }
}

/// An HS256 token for `sub` with `roles`, valid for `ttl_secs` (negative:
/// expired that long ago).
pub fn token(secret: &[u8], sub: &str, roles: &[&str], ttl_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "sub": sub, "exp": now + ttl_secs, "roles": roles }),
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("sign a token")
}

/// The security of a whole stack, laid out in one directory, as
/// `scripts/dev.sh` and the story test run it: a CA and one server
/// certificate (127.0.0.1 and localhost) for the three servers, an HS256
/// secret, and role tokens signed with it for the user, the manager (to
/// read the marketplace) and the node.
#[derive(Debug, Clone)]
pub struct StackPki {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The servers' certificate and key.
    pub server: CertFiles,
    /// The JWT secret the servers verify tokens with.
    pub secret: PathBuf,
    /// The user's token: publisher, reviewer and operator.
    pub user_token: PathBuf,
    /// The manager's token for the marketplace: viewer.
    pub manager_token: PathBuf,
    /// The node's token: node, as the node id.
    pub node_token: PathBuf,
}

impl StackPki {
    /// How long the tokens it mints are valid.
    pub const TOKEN_TTL_SECS: i64 = 30 * 24 * 3600;

    /// Creates the CA, certificate and secret in `dir` unless they are
    /// there (servers that already run keep trusting them), and mints fresh
    /// tokens; `node` is the node id of the node token.
    pub fn create(dir: &Path, node: &str) -> Self {
        std::fs::create_dir_all(dir).expect("PKI dir");
        let ca = dir.join("ca.pem");
        let server = CertFiles {
            cert: dir.join("ca").join("server.pem"),
            key: dir.join("ca").join("server.key"),
        };
        if !(ca.exists() && server.cert.exists() && server.key.exists()) {
            let authority = TestCa::new(dir, "ca");
            authority.server("server");
        }
        let secret = dir.join("jwt-secret");
        if !secret.exists() {
            let mut random = [0u8; 32];
            std::io::Read::read_exact(
                &mut std::fs::File::open("/dev/urandom").expect("open /dev/urandom"),
                &mut random,
            )
            .expect("read /dev/urandom");
            let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
            write_private(&secret, hex.as_bytes());
        }
        let key = std::fs::read(&secret).expect("read the JWT secret");
        let mint = |name: &str, sub: &str, roles: &[&str]| {
            let path = dir.join(format!("{name}.jwt"));
            write_private(
                &path,
                token(&key, sub, roles, Self::TOKEN_TTL_SECS).as_bytes(),
            );
            path
        };
        Self {
            user_token: mint("user", "developer", &["publisher", "reviewer", "operator"]),
            manager_token: mint("manager", "addons-manager", &["viewer"]),
            node_token: mint("node", node, &["node"]),
            ca,
            server,
            secret,
        }
    }

    /// The flags of a server: TLS with the stack's certificate, tokens
    /// verified with its secret.
    pub fn server_flags(&self) -> Vec<String> {
        [
            "--tls-cert",
            &self.server.cert.display().to_string(),
            "--tls-key",
            &self.server.key.display().to_string(),
            "--jwt-secret-file",
            &self.secret.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The flags of a manager that reads the marketplace at `url`.
    pub fn manager_flags(&self, url: &str) -> Vec<String> {
        let mut flags = self.server_flags();
        flags.extend(
            [
                "--marketplace",
                url,
                "--marketplace-ca",
                &self.ca.display().to_string(),
                "--marketplace-token-file",
                &self.manager_token.display().to_string(),
            ]
            .map(String::from),
        );
        flags
    }

    /// The flags of a monitor that links to the manager at `url`.
    pub fn monitor_flags(&self, url: &str) -> Vec<String> {
        let mut flags = self.server_flags();
        flags.extend(
            [
                "--manager",
                url,
                "--manager-ca",
                &self.ca.display().to_string(),
                "--token-file",
                &self.node_token.display().to_string(),
            ]
            .map(String::from),
        );
        flags
    }

    /// The user's credentials for the client library.
    pub fn user_credentials(&self) -> oak_addons::Credentials {
        oak_addons::Credentials {
            ca_pem: Some(std::fs::read(&self.ca).expect("read the CA")),
            identity_pem: None,
            token: Some(
                std::fs::read_to_string(&self.user_token)
                    .expect("read the user token")
                    .trim()
                    .to_owned(),
            ),
        }
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create a private file");
    std::io::Write::write_all(&mut file, contents).expect("write a private file");
}
