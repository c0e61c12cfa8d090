//! The shutdown signal every part of a server listens to.

use tokio_util::sync::CancellationToken;

/// Fires once, on SIGTERM, SIGINT or [`Shutdown::trigger`]. Long-lived calls
/// (watch streams, monitor links) end when it fires, so graceful shutdown
/// does not wait on clients that never hang up. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A shutdown that fires on [`Shutdown::trigger`] only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown that also fires on SIGTERM or SIGINT.
    pub fn on_signals() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let shutdown = Self::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                () = trigger.fired() => return,
            };
            tracing::info!(signal = name, "shutting down");
            trigger.trigger();
        });
        Ok(shutdown)
    }

    /// A shutdown that fires with this one, or alone on its own
    /// [`Shutdown::trigger`]: the end of one part of a server (what a
    /// manager runs while it is active) without the rest.
    pub fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
        }
    }

    /// Fires the shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Completes once the shutdown fired.
    pub async fn fired(&self) {
        self.token.cancelled().await;
    }

    /// Whether the shutdown fired.
    pub fn is_fired(&self) -> bool {
        self.token.is_cancelled()
    }
}
