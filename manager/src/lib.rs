//! The Oakestra Addons Manager: takes install and uninstall requests for
//! approved addons, owns the desired state, and is the only writer of
//! installation records.
//!
//! [`Manager`] is the domain core over the store and the marketplace;
//! [`api`] holds the thin tonic adapters.

pub mod api;
pub mod config;
mod convert;
mod error;
pub mod lease;
pub mod link;
mod metrics;
pub mod model;
mod records;
pub mod rest;
pub mod rollout;
mod service;
pub mod standby;
mod status;

pub use crate::{
    error::Error,
    metrics::ManagerMetrics,
    records::Installations,
    service::{AddonSource, Install, Manager, Rollout},
};
