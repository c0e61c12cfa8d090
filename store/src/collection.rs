//! Typed access to one collection: its writes here, its reads
//! (`reads.rs`), its change feed (`feed.rs`) and its records as the
//! backends store them (`codec.rs`).

use std::{marker::PhantomData, sync::Arc};

use tokio::sync::broadcast;

use crate::{
    Backend, Document, Durability, Error, Filter, Precondition, RawFilter, RawPage, RawRecord,
    Result, Versioned,
    changelog::{ChangeKind, ChangeLog, Doubt, Entry, Hold, LogState},
    resident::{Memory, Resident},
};

mod codec;
mod feed;
mod reads;

use self::codec::{decode, encode};
pub use self::feed::Change;
pub(crate) use self::feed::ChangeHub;

/// How often a read-modify-write retries after losing a race.
const MODIFY_ATTEMPTS: usize = 32;

/// The records of type `T`. Cheap to clone.
pub struct Collection<T> {
    backend: Arc<dyn Backend>,
    changes: broadcast::Sender<Change<T>>,
    log: Arc<ChangeLog>,
    /// Every record, for a resident collection.
    memory: Option<Arc<Memory<T>>>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Collection<T> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            changes: self.changes.clone(),
            log: self.log.clone(),
            memory: self.memory.clone(),
            _type: PhantomData,
        }
    }
}

impl<T: Document> std::fmt::Debug for Collection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("name", &T::COLLECTION)
            .finish()
    }
}

impl<T: Document> Collection<T> {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        changes: broadcast::Sender<Change<T>>,
        log: Arc<ChangeLog>,
    ) -> Self {
        Self {
            backend,
            changes,
            log,
            memory: None,
            _type: PhantomData,
        }
    }

    /// Reads every record into memory, for a resident collection.
    pub(crate) async fn load_memory(&self) -> Result<Memory<T>> {
        let mut entries = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .backend
                .list(
                    T::COLLECTION,
                    RawPage {
                        filter: &RawFilter::default(),
                        after: after.as_deref(),
                        limit: 500,
                    },
                )
                .await?;
            let Some(last) = page.last() else {
                return Ok(Memory::new(entries));
            };
            after = Some(last.id.clone());
            for raw in page {
                let (key, status, raw_seq) = (raw.key.clone(), raw.status.clone(), raw.seq);
                let record = decode::<T>(raw)?;
                entries.push(Resident::new(
                    Versioned {
                        revision: record.revision,
                        value: Arc::new(record.value),
                    },
                    key,
                    status,
                    raw_seq,
                ));
            }
        }
    }

    pub(crate) fn set_memory(&mut self, memory: Arc<Memory<T>>) {
        self.memory = Some(memory);
    }

    /// Takes a committed write (change `seq`) into memory, for a resident
    /// collection.
    fn remember(&self, kind: ChangeKind, seq: u64, raw: &RawRecord, record: &Versioned<T>) {
        let Some(memory) = &self.memory else {
            return;
        };
        let entry = (kind != ChangeKind::Deleted).then(|| {
            Resident::new(
                Versioned {
                    revision: record.revision,
                    value: Arc::new(record.value.clone()),
                },
                raw.key.clone(),
                raw.status.clone(),
                seq,
            )
        });
        memory.apply(&raw.id, seq, entry);
    }

    /// Takes `n` sequences for a write of a logged collection (`state`):
    /// the first, and the hold on them; sequence 0 for one that is not.
    async fn reserve(&self, state: Option<&mut LogState>, n: usize) -> Result<(u64, Option<Hold>)> {
        match state {
            Some(state) => {
                let (seq, hold) = self.log.reserve(state, n as u64).await?;
                Ok((seq, Some(hold)))
            }
            None => Ok((0, None)),
        }
    }

    /// Publishes a committed change to this process's watchers. In a log
    /// other processes write too, the log's reader publishes every change
    /// in sequence order, this process's own included.
    fn publish(&self, change: Change<T>) {
        if self.log.shared().is_none() || !T::LOGGED {
            // No receiver is not an error: nobody is watching.
            let _ = self.changes.send(change);
        }
    }

    /// Holds the change log while a write of a logged collection runs, so
    /// sequences are handed out in commit order.
    async fn write_lock(&self) -> Option<tokio::sync::MutexGuard<'_, LogState>> {
        if T::LOGGED {
            Some(self.log.lock().await)
        } else {
            None
        }
    }

    /// Settles the writes of unknown outcome before a read, holding the
    /// change log as a write does. While the database does not answer, or
    /// the log is held (by a write, which settles them first, or by a
    /// snapshot that is reading), the read goes on with what this process
    /// knows.
    pub(crate) async fn settle_before_reading(&self) {
        if !self.log.in_doubt(T::COLLECTION) && !self.memory_outdated() {
            return;
        }
        let Some(mut guard) = self.log.try_lock() else {
            return;
        };
        let state = T::LOGGED.then_some(&mut *guard);
        if let Err(err) = self.reread_memory().await {
            tracing::debug!(collection = T::COLLECTION, error = %err, "memory not read again yet");
        }
        if let Err(err) = self.settle(state).await {
            tracing::debug!(collection = T::COLLECTION, error = %err, "writes of unknown outcome stay in doubt");
        }
    }

    /// Whether the database was opened again since the memory of this
    /// resident collection was read.
    fn memory_outdated(&self) -> bool {
        self.memory
            .as_ref()
            .is_some_and(|memory| memory.read_at() != self.backend.reopened())
    }

    /// Reads a resident collection's records again when the database was
    /// opened again since (after an I/O error, which drops the writes not
    /// yet durable that memory took in): memory must hold what is stored.
    async fn reread_memory(&self) -> Result<()> {
        let Some(memory) = &self.memory else {
            return Ok(());
        };
        let reopened = self.backend.reopened();
        if memory.read_at() == reopened {
            return Ok(());
        }
        let fresh = self.load_memory().await?;
        tracing::warn!(
            collection = T::COLLECTION,
            "read again from the database, opened again after an I/O error"
        );
        memory.reset(fresh, reopened);
        Ok(())
    }

    /// [`Self::settle`] while a write holds the log (`state`, for a
    /// logged collection), when there is anything to settle.
    async fn settle_under(&self, state: Option<&mut LogState>) -> Result<()> {
        self.reread_memory().await?;
        if self.log.in_doubt(T::COLLECTION) {
            self.settle(state).await?;
        }
        Ok(())
    }

    /// Settles the writes of this collection whose outcome is unknown:
    /// each record is read back, and a write that did happen is logged
    /// under a new sequence (a watcher may have passed the one it was
    /// given), remembered and published, as any write is.
    async fn settle(&self, mut state: Option<&mut LogState>) -> Result<()> {
        for (id, doubt) in self.log.doubts(T::COLLECTION) {
            let stored = self.backend.get(T::COLLECTION, &id).await?;
            let happened = match (stored, doubt.kind) {
                (None, ChangeKind::Deleted) => doubt.before,
                (Some(raw), kind)
                    if kind != ChangeKind::Deleted
                        && (raw.revision, raw.seq) == (doubt.revision, doubt.seq) =>
                {
                    Some(raw)
                }
                _ => None,
            };
            if let Some(raw) = happened {
                let (seq, _hold) = self.reserve(state.as_deref_mut(), 1).await?;
                tracing::warn!(collection = T::COLLECTION, %id, seq, "a write of unknown outcome happened");
                let record = decode(raw.clone())?;
                self.committed(state.as_deref_mut(), doubt.kind, seq, &raw, &record)
                    .await;
            }
            self.log.settled(T::COLLECTION, &id);
        }
        Ok(())
    }

    /// After a write of `raw` failed with `err`: a failure that leaves
    /// its outcome unknown puts the write in doubt, and its sequence is not
    /// handed out again.
    async fn failed(
        &self,
        state: Option<&mut LogState>,
        kind: ChangeKind,
        raw: &RawRecord,
        before: Option<&RawRecord>,
        err: &Error,
    ) {
        if state.is_some() {
            // Whatever happened to the record, its change is not logged
            // under this sequence: a settled doubt takes a new one.
            self.log.skip(raw.seq..=raw.seq).await;
        }
        if !err.is_transient() {
            return;
        }
        if let Some(state) = state {
            state.head = state.head.max(raw.seq);
        }
        self.log.doubt(
            T::COLLECTION,
            &raw.id,
            Doubt {
                kind,
                revision: raw.revision,
                seq: raw.seq,
                before: before.cloned(),
            },
        );
    }

    /// Logs and publishes a committed write.
    async fn committed(
        &self,
        state: Option<&mut LogState>,
        kind: ChangeKind,
        seq: u64,
        raw: &RawRecord,
        record: &Versioned<T>,
    ) {
        if let Some(state) = state {
            let entry = Entry {
                kind,
                id: raw.id.clone(),
                revision: raw.revision,
                body: raw.body.clone(),
            };
            if let Err(err) = self.log.append(state, T::COLLECTION, seq, &entry).await {
                // The record is written and carries its sequence: the next
                // open of the collection logs it. Live watchers still see it.
                tracing::error!(collection = T::COLLECTION, id = %raw.id, seq, error = %err, "cannot log a change");
            }
        }
        self.remember(kind, seq, raw, record);
        self.publish(Change {
            kind,
            seq,
            record: record.clone(),
        });
    }

    /// Stores a new record at revision 1. Fails with
    /// [`Error::AlreadyExists`] when its id or unique key is taken.
    pub async fn insert(&self, value: T) -> Result<Versioned<T>> {
        let mut guard = self.write_lock().await;
        self.settle_under(guard.as_deref_mut()).await?;
        let (seq, _hold) = self.reserve(guard.as_deref_mut(), 1).await?;
        let record = Versioned { revision: 1, value };
        let raw = encode(&record, seq)?;
        if let Err(err) = self.backend.insert(T::COLLECTION, &raw).await {
            self.failed(guard.as_deref_mut(), ChangeKind::Added, &raw, None, &err)
                .await;
            return Err(err);
        }
        self.committed(guard.as_deref_mut(), ChangeKind::Added, seq, &raw, &record)
            .await;
        Ok(record)
    }

    /// The record with `id`, if there is one.
    pub async fn get(&self, id: &str) -> Result<Option<Versioned<T>>> {
        self.settle_before_reading().await;
        if let Some(memory) = &self.memory {
            return Ok(memory.get(id).map(|entry| Versioned {
                revision: entry.record.revision,
                value: (*entry.record.value).clone(),
            }));
        }
        self.backend
            .get(T::COLLECTION, id)
            .await?
            .map(decode)
            .transpose()
    }

    /// The record with `id` as the database holds it now: for a resident
    /// collection other processes write too, read from the database rather
    /// than memory, which takes their changes in within a poll.
    pub async fn get_latest(&self, id: &str) -> Result<Option<Versioned<T>>> {
        if self.memory.is_none() || self.log.shared().is_none() {
            return self.get(id).await;
        }
        self.backend
            .get(T::COLLECTION, id)
            .await?
            .map(decode)
            .transpose()
    }

    /// The record with `id`, or [`Error::NotFound`].
    pub async fn require(&self, id: &str) -> Result<Versioned<T>> {
        self.get(id).await?.ok_or_else(|| Error::NotFound {
            collection: T::COLLECTION.to_owned(),
            id: id.to_owned(),
        })
    }

    /// The record with `id` as a write must find it: from the database
    /// where other processes write it too, since memory may not have taken
    /// in their latest change yet.
    async fn require_to_write(&self, id: &str) -> Result<Versioned<T>> {
        self.get_latest(id).await?.ok_or_else(|| Error::NotFound {
            collection: T::COLLECTION.to_owned(),
            id: id.to_owned(),
        })
    }

    /// Replaces the record with `value.id()` if `condition` holds, bumping
    /// its revision. Fails with [`Error::Conflict`] and writes nothing when
    /// it does not, and with [`Error::NotFound`] when there is no record.
    pub async fn replace(&self, value: T, condition: &Precondition) -> Result<Versioned<T>> {
        if let Some(expected) = condition.revision {
            return self.replace_at(value, expected, &condition.status_in).await;
        }
        // Without a revision to hold on to, the write is against whatever
        // revision is current; a concurrent write only means trying again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.require_to_write(value.id()).await?;
            crate::check(&encode(&current, 0)?, None, &condition.status_in)?;
            match self
                .replace_at(value.clone(), current.revision, &condition.status_in)
                .await
            {
                Err(Error::Conflict { .. }) if attempt < MODIFY_ATTEMPTS => continue,
                other => return other,
            }
        }
    }

    async fn replace_at(
        &self,
        value: T,
        expected: u64,
        status_in: &[String],
    ) -> Result<Versioned<T>> {
        let mut guard = self.write_lock().await;
        self.settle_under(guard.as_deref_mut()).await?;
        let (seq, _hold) = self.reserve(guard.as_deref_mut(), 1).await?;
        let record = Versioned {
            revision: expected + 1,
            value,
        };
        let raw = encode(&record, seq)?;
        if let Err(err) = self.backend.replace(T::COLLECTION, &raw, status_in).await {
            self.failed(guard.as_deref_mut(), ChangeKind::Modified, &raw, None, &err)
                .await;
            return Err(err);
        }
        self.committed(
            guard.as_deref_mut(),
            ChangeKind::Modified,
            seq,
            &raw,
            &record,
        )
        .await;
        Ok(record)
    }

    /// Read-modify-write: applies `change` to the current record and stores
    /// the result, retrying on a concurrent write. `change` returns
    /// `Ok(false)` to leave the record as it is, and its error aborts.
    pub async fn modify<F>(&self, id: &str, change: F) -> Result<Versioned<T>>
    where
        F: FnMut(&mut T) -> Result<bool>,
    {
        self.modify_at(id, None, change).await
    }

    /// [`Collection::modify`] of a record that must be at
    /// `expected_revision` when one is given: [`Error::StaleRevision`] (with
    /// the current revision) and nothing written when it is not, also when a
    /// concurrent write moves it on in between.
    pub async fn modify_at<F>(
        &self,
        id: &str,
        expected_revision: Option<u64>,
        mut change: F,
    ) -> Result<Versioned<T>>
    where
        F: FnMut(&mut T) -> Result<bool>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut current = self.require_to_write(id).await?;
            stale_check::<T>(id, current.revision, expected_revision)?;
            if !change(&mut current.value)? {
                return Ok(current);
            }
            match self
                .replace(current.value, &Precondition::revision(current.revision))
                .await
            {
                Err(Error::Conflict { .. }) if attempt < MODIFY_ATTEMPTS => continue,
                other => return other,
            }
        }
    }

    /// Writes many records in one step: each is the record after its write,
    /// at revision 1 when it is new (it must not exist) and otherwise
    /// replacing its record at the revision before. Either every write
    /// happens or, when one fails its condition ([`Error::Conflict`],
    /// [`Error::AlreadyExists`], [`Error::NotFound`]), none does (see
    /// the backends for how atomic that is). Each write is one change in
    /// the log and the feed, in order.
    pub async fn write_many(&self, writes: Vec<Versioned<T>>) -> Result<Vec<Versioned<T>>> {
        self.write_many_with(writes, Durability::Now).await
    }

    /// [`Collection::write_many`], durable when `durability` says. A
    /// logged collection's writes are durable with their change-log
    /// entries, which are always written durably right after them: one
    /// disk sync for the records and their entries.
    pub async fn write_many_with(
        &self,
        writes: Vec<Versioned<T>>,
        durability: Durability,
    ) -> Result<Vec<Versioned<T>>> {
        self.write_many_observed(writes, durability, |_| {}).await
    }

    /// The opening of the database writes are made in now: writes made
    /// [`Durability::WithNext`] after this are made durable by a later one
    /// made [`Durability::NowWith`] this epoch, or not at all.
    pub fn epoch(&self) -> crate::Epoch {
        crate::Epoch(self.backend.reopened())
    }

    /// [`Collection::write_many_with`], running `stored` once the records
    /// are stored and before any watcher hears of them: a writer that keeps
    /// something derived from them in memory updates it there, so whoever
    /// reacts to the change finds it current.
    pub async fn write_many_observed(
        &self,
        writes: Vec<Versioned<T>>,
        durability: Durability,
        stored: impl FnOnce(&[Versioned<T>]),
    ) -> Result<Vec<Versioned<T>>> {
        if writes.is_empty() {
            return Ok(writes);
        }
        let mut guard = self.write_lock().await;
        self.settle_under(guard.as_deref_mut()).await?;
        let (first, _hold) = self.reserve(guard.as_deref_mut(), writes.len()).await?;
        let mut raws = Vec::with_capacity(writes.len());
        for (n, record) in writes.iter().enumerate() {
            if record.revision == 0 {
                return Err(Error::backend(
                    "write_many",
                    format!("record {} at revision 0", record.value.id()),
                ));
            }
            let seq = if T::LOGGED { first + n as u64 } else { 0 };
            raws.push(encode(record, seq)?);
        }
        // A logged write is made durable by its log entries' durable write,
        // in the same opening of the database: a reopen in between (an
        // embedded store after an I/O error, here or in another writer)
        // drops the records, and the entries are refused.
        let since = match durability {
            Durability::NowWith(epoch) => Some(epoch.0),
            Durability::Now | Durability::WithNext if T::LOGGED => Some(self.backend.reopened()),
            Durability::Now | Durability::WithNext => None,
        };
        let durable = durability != Durability::WithNext && !T::LOGGED;
        let kind = |raw: &RawRecord| {
            if raw.revision == 1 {
                ChangeKind::Added
            } else {
                ChangeKind::Modified
            }
        };
        if let Err(err) = self
            .backend
            .write_many(T::COLLECTION, &raws, durable, since)
            .await
        {
            for raw in &raws {
                self.failed(guard.as_deref_mut(), kind(raw), raw, None, &err)
                    .await;
            }
            return Err(err);
        }
        if let Some(state) = guard.as_deref_mut() {
            let entries: Vec<(u64, Entry)> = raws
                .iter()
                .map(|raw| {
                    (
                        raw.seq,
                        Entry {
                            kind: kind(raw),
                            id: raw.id.clone(),
                            revision: raw.revision,
                            body: raw.body.clone(),
                        },
                    )
                })
                .collect();
            let borrowed: Vec<(u64, &Entry)> = entries.iter().map(|(s, e)| (*s, e)).collect();
            if let Err(err) = self
                .log
                .append_many(state, T::COLLECTION, &borrowed, since)
                .await
            {
                // The records are written, carry their sequences, but are not
                // durable yet: the write fails, and its records are in doubt
                // until read back (a retry then writes them again).
                tracing::error!(collection = T::COLLECTION, error = %err, "cannot log changes");
                for raw in &raws {
                    self.failed(Some(&mut *state), kind(raw), raw, None, &err)
                        .await;
                }
                return Err(err);
            }
        }
        stored(&writes);
        for (raw, record) in raws.iter().zip(&writes) {
            self.remember(kind(raw), raw.seq, raw, record);
            self.publish(Change {
                kind: kind(raw),
                seq: raw.seq,
                record: record.clone(),
            });
        }
        Ok(writes)
    }

    /// Deletes the record with `id`, only while it is at `expected_revision`
    /// when one is given: [`Error::StaleRevision`] (with the current
    /// revision) when it is not. Returns `false` when there was no record.
    pub async fn delete_at(&self, id: &str, expected_revision: Option<u64>) -> Result<bool> {
        let condition = Precondition {
            revision: expected_revision,
            status_in: Vec::new(),
        };
        match self.delete(id, &condition).await {
            // Only the revision can fail to hold, and revisions only grow.
            Err(Error::Conflict { .. }) => match self.get(id).await? {
                None => Ok(false),
                Some(current) => Err(Error::StaleRevision {
                    collection: T::COLLECTION.to_owned(),
                    id: id.to_owned(),
                    current: current.revision,
                    expected: expected_revision.unwrap_or_default(),
                }),
            },
            other => other,
        }
    }

    /// The live record holding `unique_key`, if one does.
    pub async fn by_unique_key(&self, unique_key: &str) -> Result<Option<Versioned<T>>> {
        let filter = Filter {
            unique_key: Some(unique_key.to_owned()),
            ..Filter::default()
        };
        Ok(self.list(&filter, 1, None).await?.items.into_iter().next())
    }

    /// Deletes the record with `id` if `condition` holds. Returns `false`
    /// when there was no record.
    pub async fn delete(&self, id: &str, condition: &Precondition) -> Result<bool> {
        let mut guard = self.write_lock().await;
        self.settle_under(guard.as_deref_mut()).await?;
        let Some(raw) = self.backend.get(T::COLLECTION, id).await? else {
            return Ok(false);
        };
        let (seq, _hold) = self.reserve(guard.as_deref_mut(), 1).await?;
        let deleted = match self.backend.delete(T::COLLECTION, id, condition).await {
            Ok(deleted) => deleted,
            Err(err) => {
                let at = RawRecord { seq, ..raw.clone() };
                self.failed(
                    guard.as_deref_mut(),
                    ChangeKind::Deleted,
                    &at,
                    Some(&raw),
                    &err,
                )
                .await;
                return Err(err);
            }
        };
        if !deleted && guard.is_some() {
            self.log.skip(seq..=seq).await;
        }
        if deleted {
            let before = decode(raw.clone())?;
            self.committed(
                guard.as_deref_mut(),
                ChangeKind::Deleted,
                seq,
                &raw,
                &before,
            )
            .await;
        }
        Ok(deleted)
    }
}

/// A record shared as the views of a resident collection see it.
fn shared<T>(record: Versioned<T>) -> Versioned<Arc<T>> {
    Versioned {
        revision: record.revision,
        value: Arc::new(record.value),
    }
}

/// [`Error::StaleRevision`] when a record at `current` is not at the
/// revision a request expects.
fn stale_check<T: Document>(id: &str, current: u64, expected: Option<u64>) -> Result<()> {
    match expected {
        Some(expected) if expected != current => Err(Error::StaleRevision {
            collection: T::COLLECTION.to_owned(),
            id: id.to_owned(),
            current,
            expected,
        }),
        _ => Ok(()),
    }
}
