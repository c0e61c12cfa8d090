//! The Oakestra addons marketplace: addon developers publish addon
//! descriptors here, and the Addons Manager looks up what it may install.
//!
//! [`Marketplace`] is the domain core over the store; [`api`] is the thin
//! tonic adapter that converts, delegates and maps errors.

pub mod api;
pub mod config;
mod convert;
mod error;
pub mod model;
mod service;
pub mod verifier;

pub use crate::{
    error::Error,
    service::{Caller, Marketplace},
};
pub mod registry;
pub mod rest;
