//! A service that answers as its inner one once this manager is active,
//! and until then refuses every call: UNAVAILABLE `STANDBY`, naming the
//! active manager, so a client with several manager addresses (a monitor,
//! `oak-addons`) moves on to the next.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use addons_server_kit::ApiError;
use tokio::sync::watch;
use tonic::{Code, body::Body, server::NamedService};
use tower::Service;

use crate::lease::Active;

/// Where this manager stands: standing by (knowing who is active, if
/// anyone), or serving.
#[derive(Debug, Clone)]
pub enum Role<S> {
    /// Starting: calls wait (up to [`STARTING_PATIENCE`]) for one of the
    /// others.
    Starting,
    /// Another manager holds the plane's lease, or none yet.
    Standby(Active),
    /// This manager holds it.
    Active(S),
}

/// `S` behind this manager's role.
#[derive(Debug, Clone)]
pub struct Gated<S> {
    role: watch::Receiver<Role<S>>,
}

impl<S> Gated<S> {
    /// `S` once `role` says active.
    pub fn new(role: watch::Receiver<Role<S>>) -> Self {
        Self { role }
    }
}

/// How long a call waits for a starting manager to know its role.
pub const STARTING_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// The refusal of a standby.
pub fn standby_error(active: &Active) -> tonic::Status {
    let message = match &active.address {
        Some(address) => format!(
            "this manager is a standby of its plane; the active manager is {address}"
        ),
        None => "this manager is a standby of its plane, and no manager holds the plane's lease yet: try again shortly".to_owned(),
    };
    let error = ApiError::new(Code::Unavailable, "STANDBY", message);
    match &active.address {
        Some(address) => error.metadata("active", address),
        None => error,
    }
    .into_status()
}

impl<S> Service<http::Request<Body>> for Gated<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let mut role = self.role.clone();
        Box::pin(async move {
            let decided = async {
                role.wait_for(|role| !matches!(role, Role::Starting))
                    .await
                    .map(|role| role.clone())
            };
            let role = match tokio::time::timeout(STARTING_PATIENCE, decided).await {
                Ok(Ok(role)) => role,
                _ => {
                    let status = ApiError::new(
                        Code::Unavailable,
                        "STARTING",
                        "this manager is starting: try again shortly",
                    )
                    .into_status();
                    return Ok(status.into_http());
                }
            };
            match role {
                Role::Active(mut inner) => {
                    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                    inner.call(request).await
                }
                Role::Standby(active) => Ok(standby_error(&active).into_http()),
                Role::Starting => unreachable!("waited for another role"),
            }
        })
    }
}

impl<S: NamedService> NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}
