//! One active manager per plane on a store several processes share
//! (MongoDB): the active one holds the plane's lease, a record `{plane,
//! holder, address}` renewed by conditional writes; the others stand by
//! and take it over once it has not been renewed for a whole lease.
//!
//! No clock is compared across machines. A standby counts a lease's
//! duration on its own clock from when it first saw the lease's current
//! revision, which is after the holder started that renewal; the holder
//! counts 9/10 of it from when it started the renewal. So the holder stops
//! believing it holds the lease before any standby may take it. Past that
//! point every write of the holder's store is fenced ([`Held::fence`]),
//! before the holder even notices: a paused process woken after its lease
//! was taken writes nothing. What MongoDB without transactions cannot
//! fence is a write already on its way when the pause began; see
//! ARCHITECTURE.md.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use addons_store::{Collection, Error, Precondition, Store, Versioned};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};

/// The lease of one plane, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The plane.
    id: String,
    /// The process holding it: unique per process.
    pub holder: String,
    /// Where the holder serves, for the errors of standbys.
    pub address: String,
}

addons_store::document!(LeaseRecord in "leases", unlogged);

/// How the lease is held.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// The plane it is the lease of.
    pub plane: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// Where this manager serves (its gRPC URL), told to callers of the
    /// standbys. Unique per manager: a manager starting at the address of
    /// the lease's holder takes the lease at once, as that holder's
    /// successor.
    pub address: String,
}

/// What a standby knows of the active manager.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Active {
    /// Its address, when a manager holds the lease.
    pub address: Option<String>,
}

/// The lease, held by this process.
#[derive(Debug)]
pub struct Held {
    /// Until when this process may write.
    deadline: Arc<Mutex<Instant>>,
    lost: watch::Receiver<Option<String>>,
}

impl Held {
    /// The fence of the store this process writes through while it holds
    /// the lease.
    pub fn fence(&self) -> addons_store::Fence {
        let deadline = self.deadline.clone();
        Arc::new(move || {
            let deadline = *deadline.lock().unwrap_or_else(PoisonError::into_inner);
            if Instant::now() < deadline {
                Ok(())
            } else {
                Err("this manager's lease of its plane ran out".to_owned())
            }
        })
    }

    /// Completes once the lease is lost, saying why.
    pub async fn lost(mut self) -> String {
        match self.lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the lease keeper stopped".to_owned(),
        }
    }
}

/// The lease of a plane.
#[derive(Debug, Clone)]
pub struct Lease {
    leases: Collection<LeaseRecord>,
    options: LeaseOptions,
    holder: String,
}

impl Lease {
    /// The lease of `options.plane` in `store`.
    pub async fn open(store: &Store, options: LeaseOptions) -> Result<Self, Error> {
        Ok(Self {
            leases: store.collection().await?,
            options,
            holder: addons_store::new_id(),
        })
    }

    /// Takes the lease if it is free: no manager ever held it, the last
    /// holder gave it up, or the last holder served at this manager's
    /// address, which this process now listens on, so that one is gone (a
    /// manager restarted after a crash need not wait out its own lease).
    pub async fn try_take(&self) -> Result<Option<Held>, Error> {
        let started = Instant::now();
        match self.leases.get(&self.options.plane).await? {
            None => match self.leases.insert(self.record()).await {
                Ok(taken) => Ok(Some(self.keep(taken, started))),
                Err(Error::AlreadyExists { .. }) => Ok(None),
                Err(err) => Err(err),
            },
            Some(current)
                if current.value.holder.is_empty()
                    || current.value.address == self.options.address =>
            {
                if !current.value.holder.is_empty() {
                    tracing::warn!(address = %self.options.address, "took over the lease of the manager that served here before");
                }
                self.take_over(current.revision, started).await
            }
            Some(_) => Ok(None),
        }
    }

    /// Who holds the lease now.
    pub async fn active(&self) -> Result<Active, Error> {
        Ok(Active {
            address: self
                .leases
                .get(&self.options.plane)
                .await?
                .filter(|current| !current.value.holder.is_empty())
                .map(|current| current.value.address),
        })
    }

    /// Waits until this process holds the lease, telling `standby` who is
    /// active meanwhile.
    pub async fn acquire(&self, standby: &watch::Sender<Active>) -> Held {
        let poll = (self.options.duration / 20).max(Duration::from_millis(50));
        // The revision last seen, and since when.
        let mut seen: Option<(u64, Instant)> = None;
        loop {
            let now = Instant::now();
            match self.leases.get(&self.options.plane).await {
                Ok(None) => {
                    if let Ok(Some(held)) = self.try_take().await {
                        return held;
                    }
                }
                Ok(Some(current)) => {
                    standby.send_if_modified(|active| {
                        let address = (!current.value.holder.is_empty())
                            .then(|| current.value.address.clone());
                        let changed = active.address != address;
                        active.address = address;
                        changed
                    });
                    let expired = current.value.holder.is_empty()
                        || matches!(seen, Some((revision, since))
                            if revision == current.revision && since.elapsed() >= self.options.duration);
                    if expired {
                        match self.take_over(current.revision, now).await {
                            Ok(Some(held)) => {
                                tracing::warn!(plane = %self.options.plane, from = %current.value.address, "took over the plane's lease: the active manager stopped renewing it");
                                return held;
                            }
                            Ok(None) => {}
                            Err(err) => tracing::warn!(error = %err, "cannot take over the lease"),
                        }
                    } else if seen.is_none_or(|(revision, _)| revision != current.revision) {
                        seen = Some((current.revision, now));
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot read the plane's lease"),
            }
            tokio::time::sleep(poll).await;
        }
    }

    fn record(&self) -> LeaseRecord {
        LeaseRecord {
            id: self.options.plane.clone(),
            holder: self.holder.clone(),
            address: self.options.address.clone(),
        }
    }

    async fn take_over(&self, revision: u64, started: Instant) -> Result<Option<Held>, Error> {
        match self
            .leases
            .replace(self.record(), &Precondition::revision(revision))
            .await
        {
            Ok(taken) => Ok(Some(self.keep(taken, started))),
            Err(Error::Conflict { .. } | Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The holder's belief: 9/10 of a lease from when the write that took
    /// or renewed it started.
    fn valid_until(&self, started: Instant) -> Instant {
        started + self.options.duration * 9 / 10
    }

    /// Keeps the lease taken at `taken`: renews it every third of its
    /// duration, and says it is lost once a renewal finds another holder
    /// or none succeeded in time.
    fn keep(&self, taken: Versioned<LeaseRecord>, started: Instant) -> Held {
        let deadline = Arc::new(Mutex::new(self.valid_until(started)));
        let (lost_tx, lost) = watch::channel(None);
        let this = self.clone();
        let until = deadline.clone();
        tokio::spawn(async move {
            let mut revision = taken.revision;
            let every = this.options.duration / 3;
            let mut next = started + every;
            loop {
                let expires = *until.lock().unwrap_or_else(PoisonError::into_inner);
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = tokio::time::sleep_until(expires) => {
                        // A renewal did not come back in time (or this
                        // process was paused): the fence is shut already.
                        if Instant::now() >= *until.lock().unwrap_or_else(PoisonError::into_inner) {
                            lost_tx.send_replace(Some(format!(
                                "the lease of plane `{}` was not renewed within {:?}",
                                this.options.plane,
                                this.options.duration * 9 / 10
                            )));
                            return;
                        }
                        continue;
                    }
                    () = lost_tx.closed() => return,
                }
                let started = Instant::now();
                if started >= expires {
                    lost_tx.send_replace(Some(format!(
                        "the lease of plane `{}` ran out before it could be renewed (was this process paused?)",
                        this.options.plane
                    )));
                    return;
                }
                match this
                    .leases
                    .replace(this.record(), &Precondition::revision(revision))
                    .await
                {
                    Ok(renewed) => {
                        revision = renewed.revision;
                        *until.lock().unwrap_or_else(PoisonError::into_inner) =
                            this.valid_until(started);
                        next = started + every;
                    }
                    Err(Error::Conflict { .. } | Error::NotFound { .. }) => {
                        lost_tx.send_replace(Some(format!(
                            "another manager took the lease of plane `{}`",
                            this.options.plane
                        )));
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot renew the plane's lease; trying again");
                        next = Instant::now() + every / 4;
                    }
                }
            }
        });
        Held { deadline, lost }
    }

    /// Gives the lease up, so a standby or a restarted manager takes it at
    /// once: at a clean shutdown.
    pub async fn release(&self) {
        let Ok(Some(current)) = self.leases.get(&self.options.plane).await else {
            return;
        };
        if current.value.holder != self.holder {
            return;
        }
        let mut free = current.value.clone();
        free.holder.clear();
        if let Err(err) = self
            .leases
            .replace(free, &Precondition::revision(current.revision))
            .await
        {
            tracing::warn!(error = %err, "cannot give up the plane's lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::tests::store;

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Note {
        id: String,
    }

    addons_store::document!(Note in "notes");

    fn options(address: &str) -> LeaseOptions {
        LeaseOptions {
            plane: "root".to_owned(),
            duration: Duration::from_millis(600),
            address: address.to_owned(),
        }
    }

    /// A process paused past its lease (here: its only thread blocked, so
    /// the keeper cannot run either) writes nothing when it wakes, before
    /// it has noticed anything.
    #[tokio::test(flavor = "current_thread")]
    async fn a_holder_paused_past_its_lease_writes_nothing() {
        let (store, _dir) = store().await;
        let lease = Lease::open(&store, options("http://a")).await.unwrap();
        let held = lease.try_take().await.unwrap().expect("a free lease");
        let notes = store
            .fenced(held.fence())
            .collection::<Note>()
            .await
            .unwrap();
        notes
            .insert(Note {
                id: "before".into(),
            })
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let refused = notes.insert(Note { id: "after".into() }).await;
        assert!(matches!(refused, Err(Error::Fenced { .. })), "{refused:?}");
        let plain = store.collection::<Note>().await.unwrap();
        assert!(plain.get("after").await.unwrap().is_none());
        assert!(held.lost().await.contains("lease"));
    }

    #[tokio::test]
    async fn a_standby_waits_out_a_renewed_lease_and_takes_an_abandoned_one() {
        let (store, _dir) = store().await;
        let a = Lease::open(&store, options("http://a")).await.unwrap();
        let b = Lease::open(&store, options("http://b")).await.unwrap();
        let held = a.try_take().await.unwrap().expect("a free lease");
        assert!(b.try_take().await.unwrap().is_none(), "held by a");
        let (tell, told) = watch::channel(Active::default());
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(&tell).await }
        });
        // While a renews (seven renewals: more than two leases), b waits,
        // knowing who is active.
        let leases = store.collection::<LeaseRecord>().await.unwrap();
        let first = leases.require("root").await.unwrap().revision;
        while leases.require("root").await.unwrap().revision < first + 7 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!waiting.is_finished(), "took a renewed lease");
        assert_eq!(told.borrow().address.as_deref(), Some("http://a"));
        // a stops renewing (its keeper gone, as with a crash).
        drop(held);
        let stopped = Instant::now();
        let taken = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("b takes the lease over")
            .unwrap();
        assert!(
            stopped.elapsed() <= Duration::from_millis(2 * 600),
            "within a lease of a's last renewal: {:?}",
            stopped.elapsed()
        );
        assert_eq!(
            a.active().await.unwrap().address.as_deref(),
            Some("http://b")
        );
        drop(taken);
    }

    #[tokio::test]
    async fn a_manager_restarted_at_its_address_takes_its_lease_at_once() {
        let (store, _dir) = store().await;
        let before = Lease::open(&store, options("http://a")).await.unwrap();
        let crashed = before.try_take().await.unwrap().expect("a free lease");
        drop(crashed);
        let again = Lease::open(&store, options("http://a")).await.unwrap();
        assert!(again.try_take().await.unwrap().is_some());
        let other = Lease::open(&store, options("http://b")).await.unwrap();
        assert!(other.try_take().await.unwrap().is_none());
    }
}
