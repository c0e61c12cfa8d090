//! Pulls as tasks, one per image, outside the reconcile pass: a slow or
//! stalled registry delays only the services that wait for its image. Each
//! pull has a deadline; its result is kept for the reconciler, which is woken
//! when one finishes.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};
use tracing::Instrument as _;

use crate::{
    error::MonitorError,
    runtime::{PulledImage, RegistryAccess, Runtime},
};

/// Where the pull of one image stands.
#[derive(Debug)]
pub enum PullState {
    /// Pulled and unpacked.
    Ready(PulledImage),
    /// Running; bytes written so far.
    Running(Arc<AtomicU64>),
    /// Failed; the next [`Pulls::get`] starts again.
    Failed(Arc<MonitorError>),
}

struct Running {
    progress: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// The pulls of one monitor.
pub struct Pulls<R> {
    runtime: R,
    registry: RegistryAccess,
    timeout: Duration,
    running: HashMap<String, Running>,
    ready: HashMap<String, PulledImage>,
    failed: HashMap<String, Arc<MonitorError>>,
    done_tx: mpsc::UnboundedSender<(String, Result<PulledImage, MonitorError>)>,
    done_rx: mpsc::UnboundedReceiver<(String, Result<PulledImage, MonitorError>)>,
    metrics: crate::metrics::MonitorMetrics,
}

impl<R: Runtime> Pulls<R> {
    /// Pulls through `runtime`, each allowed `timeout`.
    pub fn new(runtime: R, registry: RegistryAccess, timeout: Duration) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            runtime,
            registry,
            timeout,
            running: HashMap::new(),
            ready: HashMap::new(),
            failed: HashMap::new(),
            done_tx,
            done_rx,
            metrics: crate::metrics::MonitorMetrics::default(),
        }
    }

    /// Counts pulls in `metrics`.
    pub fn metered(mut self, metrics: crate::metrics::MonitorMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where `image` stands; starts its pull unless it is ready, running,
    /// or failed and not yet seen. A failure is handed out once: the next
    /// call pulls again.
    pub fn get(&mut self, image: &str) -> PullState {
        if let Some(pulled) = self.ready.get(image) {
            return PullState::Ready(pulled.clone());
        }
        if let Some(running) = self.running.get(image) {
            return PullState::Running(running.progress.clone());
        }
        if let Some(err) = self.failed.remove(image) {
            return PullState::Failed(err);
        }
        let progress = Arc::new(AtomicU64::new(0));
        let task = {
            let (runtime, registry, timeout) =
                (self.runtime.clone(), self.registry.clone(), self.timeout);
            let (image, progress, done, metrics) = (
                image.to_owned(),
                progress.clone(),
                self.done_tx.clone(),
                self.metrics.clone(),
            );
            tokio::spawn(
                async move {
                    let started = std::time::Instant::now();
                    let pulled = tokio::time::timeout(
                        timeout,
                        runtime.pull(&image, &registry, progress.clone()),
                    )
                    .await;
                    let result = match pulled {
                        Ok(result) => result.map_err(MonitorError::from),
                        Err(_) => Err(MonitorError::PullTimeout {
                            image: image.clone(),
                            after: timeout,
                        }),
                    };
                    metrics.pulled(
                        result.is_ok(),
                        started.elapsed(),
                        progress.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    let _ = done.send((image, result));
                }
                // The pull continues the trace of what asked for it.
                .in_current_span(),
            )
        };
        tracing::info!(%image, "pulling");
        self.running
            .insert(image.to_owned(), Running { progress, task });
        PullState::Running(self.running[image].progress.clone())
    }

    /// Waits for the next pull to finish, records its result and returns
    /// its image.
    pub async fn finished(&mut self) -> String {
        loop {
            // The sender lives in `self`: the channel never closes.
            let Some((image, result)) = self.done_rx.recv().await else {
                return std::future::pending().await;
            };
            if self.running.remove(&image).is_none() {
                continue;
            }
            match result {
                Ok(pulled) => {
                    tracing::info!(%image, bytes = pulled.bytes_pulled, "pulled");
                    self.ready.insert(image.clone(), pulled);
                }
                Err(err) => {
                    tracing::warn!(%image, error = %err, "pull failed");
                    self.failed.insert(image.clone(), Arc::new(err));
                }
            }
            return image;
        }
    }

    /// Whether any pull is running.
    pub fn any_running(&self) -> bool {
        !self.running.is_empty()
    }
}

impl<R> std::fmt::Debug for Pulls<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pulls")
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .field("ready", &self.ready.keys().collect::<Vec<_>>())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<R> Drop for Pulls<R> {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.task.abort();
        }
    }
}
