//! Typed access to one collection, and the change feed of the process.

use std::{
    any::Any,
    collections::HashMap,
    marker::PhantomData,
    sync::{Arc, Mutex},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use tokio::sync::broadcast;

use crate::{
    Backend, Document, Durability, Error, Filter, Page, Precondition, RawFilter, RawRecord, Result,
    Versioned,
    changelog::{ChangeKind, ChangeLog, Entry, LogState},
    resident::{Memory, Resident},
    stored_key,
};

/// How many changes a watcher may fall behind before it misses some.
const CHANGE_BUFFER: usize = 1024;

/// How often a read-modify-write retries after losing a race.
const MODIFY_ATTEMPTS: usize = 32;

/// A committed write, as seen by watchers in this process.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<T> {
    /// What happened.
    pub kind: ChangeKind,
    /// The write's number in the store's change sequence; 0 for a collection
    /// that is not logged.
    pub seq: u64,
    /// The record after the write (before it, for a delete).
    pub record: Versioned<T>,
}

/// Change feeds per collection. Each collection has one writer process (the
/// service that owns it), so an in-process feed sees every change.
#[derive(Clone, Default)]
pub(crate) struct ChangeHub {
    senders: Arc<Mutex<HashMap<&'static str, Box<dyn Any + Send + Sync>>>>,
}

impl ChangeHub {
    pub(crate) fn sender<T: Document>(&self) -> broadcast::Sender<Change<T>> {
        let mut senders = self
            .senders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = senders
            .entry(T::COLLECTION)
            .or_insert_with(|| Box::new(broadcast::channel::<Change<T>>(CHANGE_BUFFER).0));
        match entry.downcast_ref::<broadcast::Sender<Change<T>>>() {
            Some(sender) => sender.clone(),
            // Two document types sharing a collection name is a programming
            // error that the first use in any test reveals.
            None => panic!("two document types use collection `{}`", T::COLLECTION),
        }
    }
}

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
                .list(T::COLLECTION, &RawFilter::default(), after.as_deref(), 500)
                .await?;
            let Some(last) = page.last() else {
                return Ok(Memory::new(entries));
            };
            after = Some(last.id.clone());
            for raw in page {
                let (key, status) = (raw.key.clone(), raw.status.clone());
                let record = decode::<T>(raw)?;
                entries.push(Resident::new(
                    Versioned {
                        revision: record.revision,
                        value: Arc::new(record.value),
                    },
                    key,
                    status,
                ));
            }
        }
    }

    pub(crate) fn set_memory(&mut self, memory: Arc<Memory<T>>) {
        self.memory = Some(memory);
    }

    /// Takes a committed write into memory, for a resident collection.
    fn remember(&self, kind: ChangeKind, raw: &RawRecord, record: &Versioned<T>) {
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
            )
        });
        memory.apply(&raw.id, entry);
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
        self.remember(kind, raw, record);
        // No receiver is not an error: nobody is watching.
        let _ = self.changes.send(Change {
            kind,
            seq,
            record: record.clone(),
        });
    }

    /// Stores a new record at revision 1. Fails with
    /// [`Error::AlreadyExists`] when its id or unique key is taken.
    pub async fn insert(&self, value: T) -> Result<Versioned<T>> {
        let mut guard = self.write_lock().await;
        let seq = guard.as_ref().map_or(0, |state| state.head + 1);
        let record = Versioned { revision: 1, value };
        let raw = encode(&record, seq)?;
        self.backend.insert(T::COLLECTION, &raw).await?;
        self.committed(guard.as_deref_mut(), ChangeKind::Added, seq, &raw, &record)
            .await;
        Ok(record)
    }

    /// The record with `id`, if there is one.
    pub async fn get(&self, id: &str) -> Result<Option<Versioned<T>>> {
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

    /// The record with `id`, or [`Error::NotFound`].
    pub async fn require(&self, id: &str) -> Result<Versioned<T>> {
        self.get(id).await?.ok_or_else(|| Error::NotFound {
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
            let current = self.require(value.id()).await?;
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
        let seq = guard.as_ref().map_or(0, |state| state.head + 1);
        let record = Versioned {
            revision: expected + 1,
            value,
        };
        let raw = encode(&record, seq)?;
        self.backend.replace(T::COLLECTION, &raw, status_in).await?;
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
            let mut current = self.require(id).await?;
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
        let first = guard.as_ref().map_or(0, |state| state.head + 1);
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
        // A logged write is made durable by its log entries' durable write.
        let durable = durability == Durability::Now && !T::LOGGED;
        self.backend
            .write_many(T::COLLECTION, &raws, durable)
            .await?;
        let kind = |raw: &RawRecord| {
            if raw.revision == 1 {
                ChangeKind::Added
            } else {
                ChangeKind::Modified
            }
        };
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
            if let Err(err) = self.log.append_many(state, T::COLLECTION, &borrowed).await {
                // The records are written, carry their sequences, but are not
                // durable yet: the write fails (a retry writes them again).
                tracing::error!(collection = T::COLLECTION, error = %err, "cannot log changes");
                return Err(err);
            }
        }
        stored(&writes);
        for (raw, record) in raws.iter().zip(&writes) {
            self.remember(kind(raw), raw, record);
            let _ = self.changes.send(Change {
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
        let Some(raw) = self.backend.get(T::COLLECTION, id).await? else {
            return Ok(false);
        };
        let deleted = self.backend.delete(T::COLLECTION, id, condition).await?;
        if deleted {
            let seq = guard.as_ref().map_or(0, |state| state.head + 1);
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

    /// The view `make` derives from the record with `id` (such as the
    /// message an API answers with). In a resident collection it is made
    /// once per revision and shared, and no read reaches the database;
    /// otherwise the record is read and the view made each time.
    pub async fn get_view<V: Send + Sync + 'static>(
        &self,
        id: &str,
        make: impl FnOnce(&Versioned<Arc<T>>) -> V,
    ) -> Result<Option<Arc<V>>> {
        if let Some(memory) = &self.memory {
            return Ok(memory.get(id).map(|entry| entry.view(make)));
        }
        Ok(self
            .get(id)
            .await?
            .map(|record| Arc::new(make(&shared(record)))))
    }

    /// A page of the views of the records matching `filter`, as
    /// [`Collection::list`] and [`Collection::get_view`] make them, and the
    /// next page's token.
    pub async fn list_views<V: Send + Sync + 'static>(
        &self,
        filter: &Filter,
        page_size: usize,
        page_token: Option<&str>,
        make: impl Fn(&Versioned<Arc<T>>) -> V,
    ) -> Result<(Vec<Arc<V>>, Option<String>)> {
        if let Some(memory) = &self.memory {
            let (entries, next) = memory_page(memory, filter, page_size, page_token)?;
            return Ok((
                entries.iter().map(|entry| entry.view(&make)).collect(),
                next,
            ));
        }
        let page = self.list(filter, page_size, page_token).await?;
        let views = page
            .items
            .into_iter()
            .map(|record| Arc::new(make(&shared(record))))
            .collect();
        Ok((views, page.next_page_token))
    }

    /// One page of the records matching `filter`, in id order. `page_token`
    /// is `None` for the first page and then the previous page's
    /// `next_page_token`.
    pub async fn list(
        &self,
        filter: &Filter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<T>> {
        if let Some(memory) = &self.memory {
            let (entries, next_page_token) = memory_page(memory, filter, page_size, page_token)?;
            return Ok(Page {
                items: entries
                    .iter()
                    .map(|entry| Versioned {
                        revision: entry.record.revision,
                        value: (*entry.record.value).clone(),
                    })
                    .collect(),
                next_page_token,
            });
        }
        let page_size = page_size.max(1);
        let after = page_token.map(decode_token).transpose()?;
        let raw_filter = raw_filter(filter);
        // One record more than asked tells whether another page follows.
        let mut records = self
            .backend
            .list(T::COLLECTION, &raw_filter, after.as_deref(), page_size + 1)
            .await?;
        let more = records.len() > page_size;
        records.truncate(page_size);
        let next_page_token = match (more, records.last()) {
            (true, Some(last)) => Some(encode_token(&last.id)),
            _ => None,
        };
        Ok(Page {
            items: records.into_iter().map(decode).collect::<Result<_>>()?,
            next_page_token,
        })
    }

    /// Every record matching `filter`, following pages to the end.
    pub async fn list_all(&self, filter: &Filter) -> Result<Vec<Versioned<T>>> {
        let mut all = Vec::new();
        let mut token = None;
        loop {
            let page = self.list(filter, 500, token.as_deref()).await?;
            all.extend(page.items);
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// Changes committed through this process from now on. A receiver that
    /// falls more than 1024 changes behind gets
    /// [`broadcast::error::RecvError::Lagged`] instead of slowing writers.
    pub fn watch(&self) -> broadcast::Receiver<Change<T>> {
        self.changes.subscribe()
    }

    /// Runs `read` while no write of a logged collection can happen, and
    /// returns its result with the sequence it reflects (every change up to
    /// it, none after it) and a receiver of every later change.
    pub async fn snapshot<R, F>(&self, read: F) -> Result<(R, u64, broadcast::Receiver<Change<T>>)>
    where
        F: AsyncFnOnce(&Self) -> Result<R>,
    {
        let state = self.log.lock().await;
        let receiver = self.changes.subscribe();
        let value = read(self).await?;
        Ok((value, state.head, receiver))
    }

    /// Every change of this collection after the sequence `since`, in order,
    /// and a receiver of later changes (which may repeat some of them: skip
    /// what is not above the last sequence returned). Fails with
    /// [`Error::CursorOutOfRange`] when the log no longer holds every change
    /// after `since`, or `since` is beyond the last change.
    pub async fn changes_since(
        &self,
        since: u64,
    ) -> Result<(Vec<Change<T>>, broadcast::Receiver<Change<T>>)> {
        let receiver = self.changes.subscribe();
        let entries = self.log.since(T::COLLECTION, since).await?;
        let mut changes = Vec::with_capacity(entries.len());
        for (seq, entry) in entries {
            changes.push(Change {
                kind: entry.kind,
                seq,
                record: decode_body(&entry.id, entry.revision, &entry.body)?,
            });
        }
        Ok((changes, receiver))
    }
}

/// A record shared as the views of a resident collection see it.
fn shared<T>(record: Versioned<T>) -> Versioned<Arc<T>> {
    Versioned {
        revision: record.revision,
        value: Arc::new(record.value),
    }
}

/// The token of the next page, if one follows.
type NextPage = Option<String>;

/// A page of a resident collection's entries matching `filter`, and the
/// next page's token, as the backends' listings page.
fn memory_page<T: Document>(
    memory: &Memory<T>,
    filter: &Filter,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<(Vec<Arc<Resident<T>>>, NextPage)> {
    let page_size = page_size.max(1);
    let after = page_token.map(decode_token).transpose()?;
    let raw_filter = raw_filter(filter);
    // One entry more than asked tells whether another page follows.
    let mut entries = memory.page(after.as_deref(), page_size + 1, |entry| {
        (raw_filter.statuses.is_empty() || raw_filter.statuses.contains(&entry.status))
            && raw_filter.key_matches(&entry.key)
    });
    let more = entries.len() > page_size;
    entries.truncate(page_size);
    let next_page_token = match (more, entries.last()) {
        (true, Some(last)) => Some(encode_token(last.record.value.id())),
        _ => None,
    };
    Ok((entries, next_page_token))
}

/// A [`Filter`] in the backends' terms.
fn raw_filter(filter: &Filter) -> RawFilter {
    RawFilter {
        statuses: filter.statuses.clone(),
        key: filter
            .unique_key
            .clone()
            .map(|key| stored_key(Some(key), "")),
        key_prefix: filter
            .unique_key_prefix
            .clone()
            .map(|prefix| stored_key(Some(prefix), "")),
    }
}

fn encode<T: Document>(record: &Versioned<T>, seq: u64) -> Result<RawRecord> {
    let id = record.value.id().to_owned();
    let body = serde_json::value::to_raw_value(&record.value).map_err(|source| Error::Codec {
        action: "encode",
        collection: T::COLLECTION.to_owned(),
        id: id.clone(),
        source,
    })?;
    Ok(RawRecord {
        key: stored_key(record.value.unique_key(), &id),
        status: record.value.status(),
        revision: record.revision,
        seq,
        id,
        body,
    })
}

fn decode<T: Document>(raw: RawRecord) -> Result<Versioned<T>> {
    decode_body(&raw.id, raw.revision, &raw.body)
}

fn decode_body<T: Document>(
    id: &str,
    revision: u64,
    body: &serde_json::value::RawValue,
) -> Result<Versioned<T>> {
    let value = serde_json::from_str(body.get()).map_err(|source| Error::Codec {
        action: "decode",
        collection: T::COLLECTION.to_owned(),
        id: id.to_owned(),
        source,
    })?;
    Ok(Versioned { revision, value })
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

const TOKEN_PREFIX: &str = "v1:";

fn encode_token(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{last_id}"))
}

fn decode_token(token: &str) -> Result<String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| Error::InvalidPageToken)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::InvalidPageToken)?;
    text.strip_prefix(TOKEN_PREFIX)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or(Error::InvalidPageToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let token = encode_token("01hx");
        assert_eq!(decode_token(&token).unwrap(), "01hx");
        assert!(matches!(
            decode_token("not a token"),
            Err(Error::InvalidPageToken)
        ));
        assert!(matches!(
            decode_token(&URL_SAFE_NO_PAD.encode("v2:x")),
            Err(Error::InvalidPageToken)
        ));
    }
}
