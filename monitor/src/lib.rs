//! The Oakestra Addons Monitor: runs on a node next to the core components
//! and makes the node's containerd match the desired state of its plane.
//!
//! **Only this crate talks to containerd.**

pub mod admission;
pub mod api;
pub mod config;
pub mod cores;
mod crash;
pub mod error;
pub mod health;
pub mod host_paths;
pub mod intake;
pub mod labels;
pub mod link;
pub mod logwriter;
pub mod metrics;
pub mod network;
pub mod plan;
pub mod pull_tasks;
pub mod reconcile;
pub mod release;
pub mod restarts;
pub mod runtime;
pub mod state_dir;
pub mod view;

pub use crate::runtime::Containerd;

/// `text`, cut to at most `max` bytes at a character boundary.
pub(crate) fn bounded(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The current time as a protobuf timestamp.
pub(crate) fn now() -> prost_types::Timestamp {
    std::time::SystemTime::now().into()
}
