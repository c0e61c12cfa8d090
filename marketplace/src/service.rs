//! The marketplace's domain core: what each API call does, on records.

use std::sync::Arc;

use addons_descriptor::Descriptor;
use addons_server_kit::Shutdown;
use addons_store::{ChangeKind, Collection, Event, Filter, FollowEnd, Start, Store, Versioned};
use tokio::sync::mpsc;

use crate::{
    Error,
    model::{self, Addon, AddonStatus, NameClaim, Verification},
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
    /// Who owns each addon name, kept after its versions go.
    names: Collection<NameClaim>,
    queue: VerifyQueue,
    /// Held from the version check to the insert, so two publishes of one
    /// name cannot both pass it. The marketplace is the only writer of
    /// addons, so an in-process lock makes it atomic.
    publishing: Arc<NameLocks>,
}

/// A lock per addon name, in a fixed number of shards: publishes of
/// different names mostly run at once (their store writes are then synced
/// together), those of one name one at a time. The shard of a name is
/// chosen with a hasher keyed per process, so names cannot be picked to
/// share one.
#[derive(Debug)]
struct NameLocks {
    shards: Vec<tokio::sync::Mutex<()>>,
    hasher: std::hash::RandomState,
}

impl Default for NameLocks {
    fn default() -> Self {
        Self {
            shards: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl NameLocks {
    async fn lock(&self, name: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::BuildHasher;
        let shard = self.hasher.hash_one(name) as usize % self.shards.len();
        self.shards[shard].lock().await
    }
}

/// Who asks to change an addon.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The caller's identity (empty without authentication).
    pub subject: String,
    /// It may change any addon (reviewer, admin, or no authentication);
    /// otherwise only those it published.
    pub any: bool,
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
        let names: Collection<NameClaim> = store.collection().await?;
        let queue = verifier::spawn(addons.clone(), registry, options, shutdown);
        Ok(Self {
            addons,
            names,
            queue,
            publishing: Default::default(),
        })
    }

    /// Validates a descriptor and stores it as a new addon in review. Pinned
    /// images in the request are dropped: only verification pins them.
    ///
    /// A name's first version makes `caller` its owner; a further version
    /// must come from the owner (or a caller that may change any addon)
    /// and be higher than every version already published.
    pub async fn publish(
        &self,
        mut descriptor: Descriptor,
        caller: &Caller,
    ) -> Result<Versioned<Addon>, Error> {
        for service in &mut descriptor.services {
            service.resolved_image = None;
            service.image_signature = None;
        }
        addons_descriptor::validate_with(&descriptor, &registry::parse_reference)
            .map_err(Error::Invalid)?;
        let name = descriptor.name.clone();
        let version = descriptor.version.clone();
        let _publishing = self.publishing.lock(&name).await;
        let versions = self.versions(&name).await?;
        if let Some(same) = versions
            .iter()
            .find(|v| v.value.descriptor.version == version)
        {
            return Err(Error::NameTaken {
                name,
                version,
                existing_id: same.value.id.clone(),
            });
        }
        if let Some(first) = versions.first()
            && !caller.any
            && first.value.owner != caller.subject
        {
            return Err(Error::NotOwner {
                id: first.value.id.clone(),
                owner: first.value.owner.clone(),
            });
        }
        // The name stays its first publisher's after every version went.
        match self.names.get(&name).await? {
            Some(claim) if !caller.any && claim.value.owner != caller.subject => {
                return Err(Error::NotOwner {
                    id: name.clone(),
                    owner: claim.value.owner,
                });
            }
            Some(_) => {}
            None => {
                let claim = NameClaim {
                    name: name.clone(),
                    owner: versions
                        .first()
                        .map_or_else(|| caller.subject.clone(), |v| v.value.owner.clone()),
                };
                match self.names.insert(claim).await {
                    Ok(_) | Err(addons_store::Error::AlreadyExists { .. }) => {}
                    Err(err) => return Err(err.into()),
                }
            }
        }
        let highest = versions
            .iter()
            .filter_map(|v| v.value.descriptor.semver().map(|s| (s, v)))
            .max_by(|a, b| a.0.cmp(&b.0));
        if let (Some((highest, holder)), Some(new)) = (highest, descriptor.semver())
            && new <= highest
        {
            return Err(Error::VersionNotNewer {
                name,
                version,
                highest: highest.to_string(),
                highest_id: holder.value.id.clone(),
            });
        }
        let now = chrono::Utc::now();
        let addon = Addon {
            id: addons_store::new_id(),
            descriptor,
            status: AddonStatus::UnderReview,
            verification: Verification {
                claim: self.queue.claim(),
                ..Verification::default()
            },
            create_time: now,
            update_time: now,
            owner: caller.subject.clone(),
            revocation: None,
        };
        match self.addons.insert(addon).await {
            Ok(stored) => {
                self.queue.enqueue(&stored.value.id);
                Ok(stored)
            }
            Err(addons_store::Error::AlreadyExists { .. }) => {
                let holder = self
                    .addons
                    .by_unique_key(&model::version_key(&name, &version))
                    .await?;
                Err(Error::NameTaken {
                    name,
                    version,
                    existing_id: holder.map(|a| a.value.id).unwrap_or_default(),
                })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Every version of addon `name` in any status, in publication order.
    pub async fn versions(&self, name: &str) -> Result<Vec<Versioned<Addon>>, Error> {
        let filter = Filter {
            unique_key_prefix: Some(model::versions_prefix(name)),
            ..Filter::default()
        };
        Ok(self.addons.list_all(&filter).await?)
    }

    /// One addon in any status.
    pub async fn get(&self, id: &str) -> Result<Versioned<Addon>, Error> {
        match self.addons.get(id).await? {
            Some(addon) => Ok(addon),
            None => self.created_elsewhere(id).await,
        }
    }

    /// An addon memory does not hold: where other replicas share the
    /// store, one may have published it a moment ago (a client behind a
    /// load balancer, told of it there, asks here), before this replica's
    /// memory took it in.
    async fn created_elsewhere(&self, id: &str) -> Result<Versioned<Addon>, Error> {
        let latest = if self.addons.shared() {
            self.addons.get_latest(id).await?
        } else {
            None
        };
        latest.ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// The view `make` derives from an addon (its API message), made once
    /// per revision and shared.
    pub async fn get_view<V: Send + Sync + 'static>(
        &self,
        id: &str,
        make: impl Fn(&Versioned<Arc<Addon>>) -> V,
    ) -> Result<Arc<V>, Error> {
        match self.addons.get_view(id, &make).await? {
            Some(view) => Ok(view),
            None => {
                let record = self.created_elsewhere(id).await?;
                Ok(Arc::new(make(&Versioned {
                    revision: record.revision,
                    value: Arc::new(record.value),
                })))
            }
        }
    }

    /// A page of addons (no statuses means approved ones only) as views,
    /// and the next page's token.
    pub async fn list_views<V: Send + Sync + 'static>(
        &self,
        statuses: &[AddonStatus],
        name: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
        make: impl Fn(&Versioned<Arc<Addon>>) -> V,
    ) -> Result<(Vec<Arc<V>>, Option<String>), Error> {
        let (filter, page_size) = list_filter(statuses, name, page_size);
        Ok(self
            .addons
            .list_views(&filter, page_size, page_token, make)
            .await?)
    }

    /// Refuses `caller` changing an addon it did not publish, unless it may
    /// change any. An addon's owner never changes, so a read suffices.
    async fn check_owner(&self, id: &str, caller: &Caller) -> Result<(), Error> {
        if caller.any {
            return Ok(());
        }
        let addon = self.get(id).await?;
        if addon.value.owner == caller.subject {
            Ok(())
        } else {
            Err(Error::NotOwner {
                id: id.to_owned(),
                owner: addon.value.owner,
            })
        }
    }

    /// Deletes an addon, only while it is at `expected_revision` when given.
    pub async fn delete(
        &self,
        id: &str,
        expected_revision: Option<u64>,
        caller: &Caller,
    ) -> Result<(), Error> {
        self.check_owner(id, caller).await?;
        if self.addons.delete_at(id, expected_revision).await? {
            Ok(())
        } else {
            Err(Error::NotFound(id.to_owned()))
        }
    }

    /// Puts an addon back in review with a fresh verification, only while it
    /// is at `expected_revision` when given. An approved version keeps its
    /// pinned images: the verification checks that each pinned digest still
    /// resolves, and fails the addon naming each one the registry lost;
    /// nothing ever re-pins it to what a tag points to now.
    pub async fn reverify(
        &self,
        id: &str,
        expected_revision: Option<u64>,
        caller: &Caller,
    ) -> Result<Versioned<Addon>, Error> {
        self.check_owner(id, caller).await?;
        let mut revoked = false;
        let result = self
            .addons
            .modify_at(id, expected_revision, |addon| {
                // Checked in the write itself: a revocation in between is
                // never undone.
                revoked = addon.status == AddonStatus::Revoked;
                if revoked {
                    return Ok(false);
                }
                addon.status = AddonStatus::UnderReview;
                addon.verification = Verification {
                    claim: self.queue.claim(),
                    ..Verification::default()
                };
                addon.update_time = chrono::Utc::now();
                Ok(true)
            })
            .await;
        match result {
            Ok(_) if revoked => Err(Error::Revoked(id.to_owned())),
            Ok(stored) => {
                self.queue.enqueue(id);
                Ok(stored)
            }
            Err(addons_store::Error::NotFound { .. }) => Err(Error::NotFound(id.to_owned())),
            Err(err) => Err(err.into()),
        }
    }

    /// Revokes an addon for good, with `reason`, only while it is at
    /// `expected_revision` when given; a revoked addon is returned as it is.
    pub async fn revoke(
        &self,
        id: &str,
        reason: &str,
        expected_revision: Option<u64>,
        caller: &Caller,
    ) -> Result<Versioned<Addon>, Error> {
        let result = self
            .addons
            .modify_at(id, expected_revision, |addon| {
                if addon.status == AddonStatus::Revoked {
                    return Ok(false);
                }
                addon.status = AddonStatus::Revoked;
                addon.verification.claim = None;
                addon.verification.next_attempt_time = None;
                let now = chrono::Utc::now();
                addon.revocation = Some(model::Revocation {
                    reason: reason.to_owned(),
                    revoked_by: caller.subject.clone(),
                    time: now,
                });
                addon.update_time = now;
                Ok(true)
            })
            .await;
        match result {
            Ok(stored) => Ok(stored),
            Err(addons_store::Error::NotFound { .. }) => Err(Error::NotFound(id.to_owned())),
            Err(err) => Err(err.into()),
        }
    }

    /// Sends the addon's current state (or, from a cursor, the changes after
    /// it) to `out`, the in-sync marker, then every change, until the addon
    /// is deleted, `out` is closed, `stop` completes or the watcher falls
    /// behind.
    pub async fn watch(
        &self,
        id: &str,
        start: Start,
        out: mpsc::Sender<Event<Addon>>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<FollowEnd, Error> {
        let result = self
            .addons
            .follow(
                start,
                async |addons| Ok(vec![addons.require(id).await?]),
                |change| change.record.value.id == id,
                |change| change.kind == ChangeKind::Deleted,
                out,
                stop,
            )
            .await;
        match result {
            Err(addons_store::Error::NotFound { .. }) => Err(Error::NotFound(id.to_owned())),
            other => Ok(other?),
        }
    }

    /// Sends every addon's current state, or that of every version of
    /// `name` (or, from a cursor, the changes after it), the in-sync marker,
    /// then every change of them, until `out` is closed, `stop` completes
    /// or the watcher falls behind.
    pub async fn watch_all(
        &self,
        name: Option<&str>,
        start: Start,
        out: mpsc::Sender<Event<Addon>>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<FollowEnd, Error> {
        let filter = Filter {
            unique_key_prefix: name.map(model::versions_prefix),
            ..Filter::default()
        };
        Ok(self
            .addons
            .follow(
                start,
                async |addons| addons.list_all(&filter).await,
                |change| name.is_none_or(|name| change.record.value.descriptor.name == name),
                |_| false,
                out,
                stop,
            )
            .await?)
    }
}

/// The store filter and page size of a listing: no statuses means approved
/// ones only, no page size the default.
fn list_filter(statuses: &[AddonStatus], name: Option<&str>, page_size: usize) -> (Filter, usize) {
    let statuses = if statuses.is_empty() {
        &[AddonStatus::Approved][..]
    } else {
        statuses
    };
    let filter = Filter {
        statuses: statuses.iter().map(|s| s.as_str().to_owned()).collect(),
        unique_key_prefix: name.map(model::versions_prefix),
        ..Filter::default()
    };
    let page_size = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    (filter, page_size)
}
