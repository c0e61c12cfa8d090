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
