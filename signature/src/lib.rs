//! Image signatures in Sigstore's cosign format, with the keys cosign
//! writes: who built an image, checked by the marketplace when it approves
//! an addon and again by each node before it pulls.
//!
//! A signature lives in the image's repository under the tag
//! `sha256-<hex>.sig`: an OCI manifest whose layers are simple-signing
//! payloads (naming the signed digest and repository), each carrying its
//! signature in the annotation `dev.cosignproject.cosign/signature`. The
//! cryptography is `ring`'s (ECDSA P-256 with SHA-256, Ed25519); cosign's
//! encrypted private keys are opened with RustCrypto's `scrypt` and
//! `crypto_secretbox`.

pub mod keys;
pub mod manifest;
pub mod payload;
pub mod policy;
pub mod remote;

pub use crate::{
    keys::{KeyError, PublicKey, SigningKey},
    policy::{Candidate, Mode, NamedKey, Refusal, RefusalCode, Signed, TrustPolicy, Verdict},
};

#[cfg(test)]
mod strangers {
    //! What a registry or a file may hold, thrown at every reader: each
    //! answers with an error, never a panic.

    use proptest::prelude::*;

    use crate::{PublicKey, SigningKey, manifest, payload, policy::Candidate};

    proptest! {
        #[test]
        fn readers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = manifest::signature_layers(&bytes);
            let _ = payload::check(&bytes, "r.example/a", "sha256:00");
            let text = String::from_utf8_lossy(&bytes);
            let _ = PublicKey::from_pem(&text);
            let _ = SigningKey::from_pem(&text, b"");
            let _ = PublicKey::from_spki(&bytes);
            let _ = payload::split_pinned(&text);
            let _ = payload::normalize_repository(&text);
        }

        #[test]
        fn a_verify_of_any_candidate_never_panics(
            payload_bytes in proptest::collection::vec(any::<u8>(), 0..512),
            signature in ".{0,200}",
        ) {
            let (key, _) = SigningKey::generate().unwrap();
            let named = crate::NamedKey { name: "k".into(), key: key.public_key().clone() };
            let candidate = Candidate { payload: payload_bytes, signature };
            prop_assert!(crate::policy::verify(&[&named], "r.example/a", "sha256:00", &[candidate]).is_err());
        }

        #[test]
        fn an_envelope_with_any_fields_never_panics(
            n in any::<u64>(), r in any::<u32>(), p in any::<u32>(),
            salt in "[A-Za-z0-9+/=]{0,60}", nonce in "[A-Za-z0-9+/=]{0,60}", ciphertext in "[A-Za-z0-9+/=]{0,200}",
        ) {
            let json = format!(
                r#"{{"kdf":{{"name":"scrypt","params":{{"N":{n},"r":{r},"p":{p}}},"salt":"{salt}"}},"cipher":{{"name":"nacl/secretbox","nonce":"{nonce}"}},"ciphertext":"{ciphertext}"}}"#
            );
            // Large scrypt costs are refused before any work: only small
            // ones are tried.
            let pem = pem::encode(&pem::Pem::new("ENCRYPTED SIGSTORE PRIVATE KEY", json.into_bytes()));
            if n <= 1 << 10 || !n.is_power_of_two() || n > 1 << 16 || r > 8 || p > 4 {
                let _ = SigningKey::from_pem(&pem, b"");
            }
        }
    }
}
