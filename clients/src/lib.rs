//! Rust client library for the Oakestra addons system.
//!
//! Today it offers the connection helper that the typed clients build on:
//! the typed marketplace and manager clients, retries, pagination and watch
//! helpers, and the `oak-addons` command-line tool arrive with the clients
//! issue.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A lazily connected channel to `url` (`http://host:port`) with the given
/// per-call timeout.
pub fn channel(url: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .connect_lazy())
}
