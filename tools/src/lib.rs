//! The project's own tools, apart from the product and from the tests that
//! use them: OCI images built from busybox-static without a container engine
//! ([`images`], and the `oak-images` binary for the servers' images), a
//! throwaway PKI and tokens ([`pki`]), and the cleanup of what a monitor
//! leaves on a host ([`NodeCleanup`]). `oak-dev` serves `scripts/dev.sh`,
//! `oak-images` serves `scripts/images.sh`; the end-to-end tests use the
//! same code, so the dev stack runs what the tests test.

pub mod images;
mod node;
pub mod pki;

pub use crate::node::NodeCleanup;
