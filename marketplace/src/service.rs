//! The marketplace's domain core: what each API call does, on records.

use std::sync::Arc;

use addons_descriptor::Descriptor;
use addons_server_kit::Shutdown;
use addons_store::{Change, ChangeKind, Collection, Filter, Page, Precondition, Store, Versioned};
use tokio::sync::{broadcast::error::RecvError, mpsc};

use crate::{
    Error,
    model::{Addon, AddonStatus, Verification},
    registry::{self, Registry},
    verifier::{self, VerifierOptions, VerifyQueue},
};

/// Listing page size when the request names none.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest listing page.
pub(crate) const MAX_PAGE_SIZE: usize = 500;

/// The marketplace over its store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Marketplace {
    addons: Collection<Addon>,
    queue: VerifyQueue,
}

impl Marketplace {
    /// The marketplace over `store`, verifying images on `registry` in the
    /// background until `shutdown` fires. Verification resumes every addon
    /// still under review.
    pub async fn start(
        store: &Store,
        registry: Arc<Registry>,
        options: VerifierOptions,
        shutdown: Shutdown,
    ) -> Result<Self, Error> {
        let addons: Collection<Addon> = store.collection().await?;
        let queue = verifier::spawn(addons.clone(), registry, options, shutdown);
        Ok(Self { addons, queue })
    }

    /// Validates a descriptor and stores it as a new addon in review. Pinned
    /// images in the request are dropped: only verification pins them.
    pub async fn publish(&self, mut descriptor: Descriptor) -> Result<Versioned<Addon>, Error> {
        for service in &mut descriptor.services {
            service.resolved_image = None;
        }
        addons_descriptor::validate_with(&descriptor, &registry::parse_reference)
            .map_err(Error::Invalid)?;
        let name = descriptor.name.clone();
        let now = chrono::Utc::now();
        let addon = Addon {
            id: addons_store::new_id(),
            descriptor,
            status: AddonStatus::UnderReview,
            verification: Verification::default(),
            create_time: now,
            update_time: now,
        };
        match self.addons.insert(addon).await {
            Ok(stored) => {
                self.queue.enqueue(&stored.value.id);
                Ok(stored)
            }
            Err(addons_store::Error::AlreadyExists { .. }) => Err(Error::NameTaken(name)),
            Err(err) => Err(err.into()),
        }
    }

    /// One addon in any status.
    pub async fn get(&self, id: &str) -> Result<Versioned<Addon>, Error> {
        self.addons
            .get(id)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// A page of addons; no statuses means approved ones only.
    pub async fn list(
        &self,
        statuses: &[AddonStatus],
        name: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Addon>, Error> {
        let statuses = if statuses.is_empty() {
            &[AddonStatus::Approved][..]
        } else {
            statuses
        };
        let filter = Filter {
            statuses: statuses.iter().map(|s| s.as_str().to_owned()).collect(),
            unique_key: name.map(str::to_owned),
        };
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        Ok(self.addons.list(&filter, page_size, page_token).await?)
    }

    /// Deletes an addon.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        if self.addons.delete(id, &Precondition::none()).await? {
            Ok(())
        } else {
            Err(Error::NotFound(id.to_owned()))
        }
    }

    /// Puts an addon back in review with a fresh verification.
    pub async fn reverify(&self, id: &str) -> Result<Versioned<Addon>, Error> {
        let result = self
            .addons
            .modify(id, |addon| {
                addon.status = AddonStatus::UnderReview;
                addon.verification = Verification::default();
                for service in &mut addon.descriptor.services {
                    service.resolved_image = None;
                }
                addon.update_time = chrono::Utc::now();
                Ok(true)
            })
            .await;
        match result {
            Ok(stored) => {
                self.queue.enqueue(id);
                Ok(stored)
            }
            Err(addons_store::Error::NotFound { .. }) => Err(Error::NotFound(id.to_owned())),
            Err(err) => Err(err.into()),
        }
    }

    /// Sends the addon's current state to `out`, then every change, until
    /// the addon is deleted, `out` is closed, or `stop` completes.
    pub async fn watch(
        &self,
        id: &str,
        out: mpsc::Sender<Result<Versioned<Addon>, Error>>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        // Subscribe before reading, so no change falls between the two.
        let mut changes = self.addons.watch();
        let mut last_revision = 0;
        let mut current = Some(self.get(id).await);
        loop {
            if let Some(state) = current.take() {
                let end = state.is_err();
                if let Ok(record) = &state {
                    last_revision = record.revision;
                }
                if out.send(state).await.is_err() || end {
                    return;
                }
            }
            let change: Change<Addon> = tokio::select! {
                () = &mut stop => return,
                () = out.closed() => return,
                received = changes.recv() => match received {
                    Ok(change) => change,
                    // Fell behind: the current state is all that matters.
                    Err(RecvError::Lagged(_)) => {
                        current = Some(self.get(id).await);
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            if change.record.value.id != id {
                continue;
            }
            match change.kind {
                ChangeKind::Deleted => return,
                ChangeKind::Upserted if change.record.revision > last_revision => {
                    current = Some(Ok(change.record));
                }
                ChangeKind::Upserted => {}
            }
        }
    }
}
