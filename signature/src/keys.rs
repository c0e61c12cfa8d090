//! Keys as cosign writes them: public keys as PEM `PUBLIC KEY` (SPKI) for
//! ECDSA P-256 or Ed25519, private keys as PKCS#8 (`PRIVATE KEY`) or in
//! cosign's encrypted format (`ENCRYPTED SIGSTORE PRIVATE KEY`, or the
//! older `ENCRYPTED COSIGN PRIVATE KEY`: PKCS#8 sealed with NaCl secretbox
//! under a scrypt-derived key, in a JSON envelope).

use base64::{Engine as _, engine::general_purpose::STANDARD};
use ring::{
    rand::{SecureRandom as _, SystemRandom},
    signature::{
        self as sig, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair,
        Ed25519KeyPair, KeyPair as _, UnparsedPublicKey,
    },
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The DER prefix of every P-256 SPKI with an uncompressed point.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// The DER prefix of every Ed25519 SPKI.
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// Largest key file read.
pub const MAX_KEY_BYTES: usize = 16 << 10;
/// Bounds on a key file's scrypt cost (cosign writes N = 2^15 or 2^16,
/// r = 8, p = 1): at most 64 MiB of memory (128 · r · N) and 4 passes.
const MAX_SCRYPT_LOG_N: u8 = 16;
const MAX_SCRYPT_R: u32 = 8;
const MAX_SCRYPT_P: u32 = 4;

/// Why a key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not PEM, or not a kind of PEM block read here.
    #[error("{0}")]
    Format(String),
    /// An encrypted key with the wrong password (or a damaged file).
    #[error("cannot decrypt the private key: wrong password, or the file is damaged")]
    Decrypt,
    /// A key of another algorithm than ECDSA P-256 or Ed25519.
    #[error("only ECDSA P-256 and Ed25519 keys are supported")]
    Unsupported,
}

/// The signature algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256, ASN.1 signatures (cosign's default).
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

/// A public key that checks signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    algorithm: Algorithm,
    /// The SPKI DER.
    der: Vec<u8>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("algorithm", &self.algorithm)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl PublicKey {
    /// A PEM `PUBLIC KEY` block.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        if text.len() > MAX_KEY_BYTES {
            return Err(KeyError::Format("the key is over 16 KiB".into()));
        }
        let block = pem::parse(text)
            .map_err(|err| KeyError::Format(format!("not a PEM public key: {err}")))?;
        if block.tag() != "PUBLIC KEY" {
            return Err(KeyError::Format(format!(
                "a `{}` block, not a `PUBLIC KEY`",
                block.tag()
            )));
        }
        Self::from_spki(block.contents())
    }

    /// A DER SubjectPublicKeyInfo.
    pub fn from_spki(der: &[u8]) -> Result<Self, KeyError> {
        let algorithm = if der.len() == P256_SPKI_PREFIX.len() + 65
            && der.starts_with(P256_SPKI_PREFIX)
            && der[P256_SPKI_PREFIX.len()] == 0x04
        {
            Algorithm::EcdsaP256
        } else if der.len() == ED25519_SPKI_PREFIX.len() + 32
            && der.starts_with(ED25519_SPKI_PREFIX)
        {
            Algorithm::Ed25519
        } else {
            return Err(KeyError::Unsupported);
        };
        Ok(Self {
            algorithm,
            der: der.to_vec(),
        })
    }

    fn from_raw(algorithm: Algorithm, raw: &[u8]) -> Self {
        let prefix = match algorithm {
            Algorithm::EcdsaP256 => P256_SPKI_PREFIX,
            Algorithm::Ed25519 => ED25519_SPKI_PREFIX,
        };
        Self {
            algorithm,
            der: [prefix, raw].concat(),
        }
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn raw(&self) -> &[u8] {
        match self.algorithm {
            Algorithm::EcdsaP256 => &self.der[P256_SPKI_PREFIX.len()..],
            Algorithm::Ed25519 => &self.der[ED25519_SPKI_PREFIX.len()..],
        }
    }

    /// `sha256:<hex>` of the key's SPKI DER: what records name it by.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.der);
        let mut text = String::from("sha256:");
        for byte in digest.as_ref() {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// The key as a PEM `PUBLIC KEY` block, as cosign writes `cosign.pub`.
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PUBLIC KEY", self.der.clone()))
    }

    /// Whether `signature` (ASN.1 DER for ECDSA) signs `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn sig::VerificationAlgorithm = match self.algorithm {
            Algorithm::EcdsaP256 => &ECDSA_P256_SHA256_ASN1,
            Algorithm::Ed25519 => &sig::ED25519,
        };
        UnparsedPublicKey::new(algorithm, self.raw())
            .verify(message, signature)
            .is_ok()
    }
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A private key that signs.
pub struct SigningKey {
    pair: Pair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private part.
        f.debug_struct("SigningKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// cosign's envelope of an encrypted private key.
#[derive(Serialize, Deserialize)]
struct Envelope {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Serialize, Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

const ENCRYPTED_TAGS: &[&str] = &[
    "ENCRYPTED SIGSTORE PRIVATE KEY",
    "ENCRYPTED COSIGN PRIVATE KEY",
];

impl SigningKey {
    /// A private key from PEM: PKCS#8 `PRIVATE KEY`, or cosign's encrypted
    /// format opened with `password` (cosign's `COSIGN_PASSWORD`; empty is
    /// a password too).
    pub fn from_pem(text: &str, password: &[u8]) -> Result<Self, KeyError> {
        if text.len() > MAX_KEY_BYTES {
            return Err(KeyError::Format("the key is over 16 KiB".into()));
        }
        let block = pem::parse(text)
            .map_err(|err| KeyError::Format(format!("not a PEM private key: {err}")))?;
        if block.tag() == "PRIVATE KEY" {
            return Self::from_pkcs8(block.contents());
        }
        if !ENCRYPTED_TAGS.contains(&block.tag()) {
            return Err(KeyError::Format(format!(
                "a `{}` block, not a `PRIVATE KEY` or an `ENCRYPTED SIGSTORE PRIVATE KEY`",
                block.tag()
            )));
        }
        let envelope: Envelope = serde_json::from_slice(block.contents())
            .map_err(|err| KeyError::Format(format!("not cosign's encrypted key format: {err}")))?;
        if envelope.kdf.name != "scrypt" || envelope.cipher.name != "nacl/secretbox" {
            return Err(KeyError::Format(format!(
                "encrypted with {} and {}; only scrypt and nacl/secretbox are read",
                envelope.kdf.name, envelope.cipher.name
            )));
        }
        let decode = |field: &str, text: &str| {
            STANDARD
                .decode(text)
                .map_err(|_| KeyError::Format(format!("the {field} is not base64")))
        };
        let salt = decode("salt", &envelope.kdf.salt)?;
        let nonce = decode("nonce", &envelope.cipher.nonce)?;
        let ciphertext = decode("ciphertext", &envelope.ciphertext)?;
        let key = derive(password, &salt, &envelope.kdf.params)?;
        let nonce: [u8; 24] = nonce
            .try_into()
            .map_err(|_| KeyError::Format("the nonce is not 24 bytes".into()))?;
        let plain = Zeroizing::new(open(&key, &nonce, &ciphertext)?);
        Self::from_pkcs8(&plain)
    }

    /// A PKCS#8 DER key: ECDSA P-256 or Ed25519.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng) {
            let public = PublicKey::from_raw(Algorithm::EcdsaP256, pair.public_key().as_ref());
            return Ok(Self {
                pair: Pair::Ecdsa(pair),
                public,
            });
        }
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let public = PublicKey::from_raw(Algorithm::Ed25519, pair.public_key().as_ref());
            return Ok(Self {
                pair: Pair::Ed25519(pair),
                public,
            });
        }
        Err(KeyError::Unsupported)
    }

    /// A new ECDSA P-256 key (cosign's kind) and its PKCS#8 DER.
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), KeyError> {
        let rng = SystemRandom::new();
        let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| KeyError::Format("cannot generate a key".into()))?;
        let der = Zeroizing::new(document.as_ref().to_vec());
        Ok((Self::from_pkcs8(&der)?, der))
    }

    /// PKCS#8 `der` sealed in cosign's encrypted format under `password`,
    /// as `cosign generate-key-pair` writes `cosign.key`.
    pub fn encrypt_pkcs8(der: &[u8], password: &[u8]) -> Result<String, KeyError> {
        let rng = SystemRandom::new();
        let mut salt = [0_u8; 32];
        let mut nonce = [0_u8; 24];
        rng.fill(&mut salt)
            .and_then(|()| rng.fill(&mut nonce))
            .map_err(|_| KeyError::Format("no randomness".into()))?;
        let params = ScryptParams {
            n: 1 << 15,
            r: 8,
            p: 1,
        };
        let key = derive(password, &salt, &params)?;
        let ciphertext = seal(&key, &nonce, der)?;
        let envelope = Envelope {
            kdf: Kdf {
                name: "scrypt".into(),
                params,
                salt: STANDARD.encode(salt),
            },
            cipher: Cipher {
                name: "nacl/secretbox".into(),
                nonce: STANDARD.encode(nonce),
            },
            ciphertext: STANDARD.encode(ciphertext),
        };
        let json = serde_json::to_vec(&envelope)
            .map_err(|err| KeyError::Format(format!("cannot encode the key: {err}")))?;
        Ok(pem::encode(&pem::Pem::new(ENCRYPTED_TAGS[0], json)))
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `message`: ASN.1 DER for ECDSA, as cosign does.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.pair {
            Pair::Ecdsa(pair) => pair
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Format("cannot sign".into())),
            Pair::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }
}

fn derive(
    password: &[u8],
    salt: &[u8],
    params: &ScryptParams,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let bad = || KeyError::Format("unusable scrypt parameters".into());
    if !params.n.is_power_of_two() || params.n < 2 {
        return Err(bad());
    }
    let log_n = u8::try_from(params.n.trailing_zeros()).map_err(|_| bad())?;
    if log_n > MAX_SCRYPT_LOG_N || params.r > MAX_SCRYPT_R || params.p > MAX_SCRYPT_P {
        return Err(bad());
    }
    let scrypt_params = scrypt::Params::new(log_n, params.r, params.p).map_err(|_| bad())?;
    let mut key = Zeroizing::new([0_u8; 32]);
    scrypt::scrypt(password, salt, &scrypt_params, key.as_mut()).map_err(|_| bad())?;
    Ok(key)
}

fn open(key: &[u8; 32], nonce: &[u8; 24], sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
    use crypto_secretbox::{KeyInit as _, XSalsa20Poly1305, aead::Aead as _};
    XSalsa20Poly1305::new(key.into())
        .decrypt(nonce.into(), sealed)
        .map_err(|_| KeyError::Decrypt)
}

fn seal(key: &[u8; 32], nonce: &[u8; 24], plain: &[u8]) -> Result<Vec<u8>, KeyError> {
    use crypto_secretbox::{KeyInit as _, XSalsa20Poly1305, aead::Aead as _};
    XSalsa20Poly1305::new(key.into())
        .encrypt(nonce.into(), plain)
        .map_err(|_| KeyError::Format("cannot encrypt".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `cosign generate-key-pair` with an empty password: the
    /// sigstore project's test data (see `testdata/README.md`).
    const COSIGN_GENERATED_KEY: &str =
        include_str!("../testdata/cosign_generated_encrypted_empty_private.key");

    #[test]
    fn a_key_cosign_generated_opens_and_signs() {
        let key = SigningKey::from_pem(COSIGN_GENERATED_KEY, b"").expect("cosign's key opens");
        assert_eq!(key.public_key().algorithm(), Algorithm::EcdsaP256);
        let signature = key.sign(b"payload").unwrap();
        assert!(key.public_key().verify(b"payload", &signature));
        assert!(!key.public_key().verify(b"other", &signature));
        assert_eq!(
            SigningKey::from_pem(COSIGN_GENERATED_KEY, b"wrong").unwrap_err(),
            KeyError::Decrypt
        );
    }

    #[test]
    fn generated_keys_round_trip_through_cosigns_formats() {
        let (key, der) = SigningKey::generate().unwrap();
        let sealed = SigningKey::encrypt_pkcs8(&der, b"secret").unwrap();
        assert!(sealed.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"));
        let opened = SigningKey::from_pem(&sealed, b"secret").unwrap();
        assert_eq!(opened.public_key(), key.public_key());
        let public = PublicKey::from_pem(&key.public_key().to_pem()).unwrap();
        assert_eq!(&public, key.public_key());
        let plain = pem::encode(&pem::Pem::new("PRIVATE KEY", der.to_vec()));
        assert_eq!(
            SigningKey::from_pem(&plain, b"").unwrap().public_key(),
            key.public_key()
        );
    }

    #[test]
    fn ed25519_keys_sign_and_verify() {
        let rng = SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = SigningKey::from_pkcs8(der.as_ref()).unwrap();
        assert_eq!(key.public_key().algorithm(), Algorithm::Ed25519);
        let public = PublicKey::from_pem(&key.public_key().to_pem()).unwrap();
        let signature = key.sign(b"m").unwrap();
        assert!(public.verify(b"m", &signature));
    }

    #[test]
    fn other_keys_and_blocks_are_refused() {
        // An RSA SPKI prefix.
        assert_eq!(
            PublicKey::from_spki(&[0x30, 0x82, 0x01, 0x22, 0x30, 0x0d]).unwrap_err(),
            KeyError::Unsupported
        );
        assert!(matches!(
            PublicKey::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(KeyError::Format(_))
        ));
        assert!(matches!(
            PublicKey::from_pem("not pem"),
            Err(KeyError::Format(_))
        ));
    }
}
