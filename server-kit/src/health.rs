//! Health that means something: a server is ready (its gRPC health
//! `SERVING`, overall and per service) only while every part it depends on
//! works (its store, containerd, the link to its manager), and live (the
//! health service named [`LIVENESS`]) from start to shutdown, whatever its
//! parts say, so an orchestrator restarts only a process that is stuck,
//! never one that waits for its database.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// The health service name that stays `SERVING` from start to shutdown:
/// what a liveness probe asks. The overall name (`""`) and each API
/// service's name are readiness.
pub const LIVENESS: &str = "liveness";

/// The parts a server's readiness depends on; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    parts: Arc<Mutex<Vec<Part>>>,
}

#[derive(Debug, Clone)]
struct Part {
    name: &'static str,
    works: watch::Receiver<bool>,
}

impl Readiness {
    /// A new part, `name`d for the log, working until the returned sender
    /// says otherwise.
    pub fn part(&self, name: &'static str) -> watch::Sender<bool> {
        let (tx, works) = watch::channel(true);
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Part { name, works });
        tx
    }

    /// The parts that do not work now, by name; empty: ready.
    pub fn failing(&self) -> Vec<&'static str> {
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|part| !*part.works.borrow())
            .map(|part| part.name)
            .collect()
    }

    /// Waits until any part changes (forever when there are none, or when
    /// every part's sender is gone).
    pub(crate) async fn changed(&self) {
        let mut parts: Vec<watch::Receiver<bool>> = self
            .parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|part| part.works.clone())
            .collect();
        if parts.is_empty() {
            return std::future::pending().await;
        }
        let changes = parts.iter_mut().map(|works| {
            Box::pin(async move {
                if works.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
        });
        futures::future::select_all(changes).await;
        // Seen: the next call waits for a change after this one. (Clones
        // start at their original's version: unmarked, every later call
        // would return at once, and its caller spin.)
        for part in self
            .parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            part.works.borrow_and_update();
        }
    }
}

/// Probes a part every `every` (each probe allowed as long) and says in
/// `works` whether it answers; logs each change, naming the part `what`.
/// Ends when `shutdown` fires.
pub fn probe<F, Fut>(
    what: String,
    works: watch::Sender<bool>,
    every: std::time::Duration,
    shutdown: crate::Shutdown,
    check: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.fired() => return,
                _ = tick.tick() => {}
            }
            let answer = tokio::time::timeout(every, check())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {every:?}")));
            if *works.borrow() != answer.is_ok() {
                match &answer {
                    Ok(()) => tracing::info!(part = %what, "answers again"),
                    Err(err) => tracing::error!(part = %what, error = %err, "does not answer"),
                }
            }
            works.send_replace(answer.is_ok());
        }
    });
}

#[cfg(feature = "store")]
impl Readiness {
    /// Makes `store` a part (`store`), probed with one read every 2 s
    /// until `shutdown` fires.
    pub fn watch_store(&self, store: &addons_store::Store, shutdown: &crate::Shutdown) {
        let what = format!("store {}", store.describe());
        let store = store.clone();
        probe(
            what,
            self.part("store"),
            std::time::Duration::from_secs(2),
            shutdown.clone(),
            move || {
                let store = store.clone();
                async move { store.ping().await.map_err(|err| err.to_string()) }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_while_every_part_works() {
        let readiness = Readiness::default();
        assert!(readiness.failing().is_empty(), "no parts: ready");
        let store = readiness.part("store");
        let link = readiness.part("link");
        assert!(readiness.failing().is_empty());
        let waiting = {
            let readiness = readiness.clone();
            tokio::spawn(async move { readiness.changed().await })
        };
        link.send_replace(false);
        waiting.await.unwrap();
        assert_eq!(readiness.failing(), vec!["link"]);
        store.send_replace(false);
        assert_eq!(readiness.failing(), vec!["store", "link"]);
        link.send_replace(true);
        store.send_replace(true);
        assert!(readiness.failing().is_empty());
    }

    /// A change seen is not seen again: a server's readiness loop waits
    /// for the next one instead of spinning (it did, burning a core).
    #[tokio::test]
    async fn a_change_is_reported_once() {
        use futures::FutureExt as _;
        let readiness = Readiness::default();
        let store = readiness.part("store");
        store.send_replace(false);
        readiness.changed().await;
        assert!(
            readiness.changed().now_or_never().is_none(),
            "reported the same change twice"
        );
        store.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(60), readiness.changed())
            .await
            .expect("a new change is reported");
    }
}
