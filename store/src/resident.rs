//! Resident collections: every record kept in memory as well, for
//! collections read far more often than written (the marketplace's
//! addons). The memory is loaded when the collection is first opened and
//! updated by every write of this process in the write call itself, before
//! it returns, so a read after a write sees it. Where other processes write
//! the database too, the log's reader applies their changes as well, within
//! its poll. An entry is replaced only by a later change (a higher change
//! sequence, or revision for a collection without one), and a deletion is
//! remembered for a while, so changes arriving out of order (a write of
//! this process and the reader's copy of an older one) never leave the
//! older one behind.
//!
//! Each entry also holds a view derived from its revision (such as the
//! API message a server answers with), made once by the first reader that
//! asks and dropped with the revision.

use std::{
    any::Any,
    collections::BTreeMap,
    sync::{Arc, OnceLock, PoisonError, RwLock},
};

use crate::{Document, Versioned};

/// One record in memory.
pub(crate) struct Resident<T> {
    pub(crate) record: Versioned<Arc<T>>,
    /// The stored key (`k:` or `i:`), for key filters.
    pub(crate) key: String,
    pub(crate) status: String,
    /// The change sequence of the write it reflects (0: not logged).
    seq: u64,
    view: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl<T> Resident<T> {
    pub(crate) fn new(record: Versioned<Arc<T>>, key: String, status: String, seq: u64) -> Self {
        Self {
            record,
            key,
            status,
            seq,
            view: OnceLock::new(),
        }
    }

    /// Whether the write `seq` of revision `revision` comes after this one.
    fn older_than(&self, seq: u64, revision: u64) -> bool {
        if self.seq != 0 && seq != 0 {
            self.seq < seq
        } else {
            self.record.revision < revision
        }
    }

    /// The view `make` derives from this revision, made once and shared.
    /// A view of another type than the one made first is made anew.
    pub(crate) fn view<V: Send + Sync + 'static>(
        &self,
        make: impl FnOnce(&Versioned<Arc<T>>) -> V,
    ) -> Arc<V> {
        let mut make = Some(make);
        let shared = self.view.get_or_init(|| match make.take() {
            Some(make) => Arc::new(make(&self.record)) as Arc<dyn Any + Send + Sync>,
            None => unreachable!("get_or_init runs its closure once"),
        });
        if let Ok(view) = shared.clone().downcast::<V>() {
            return view;
        }
        match make.take() {
            Some(make) => Arc::new(make(&self.record)),
            None => unreachable!("a view made just now has the type asked for"),
        }
    }
}

/// The records of one collection, by id.
pub(crate) struct Memory<T> {
    records: RwLock<Records<T>>,
    /// The backend's [`crate::Backend::reopened`] count the records were
    /// read at.
    read_at: std::sync::atomic::AtomicU64,
}

/// How many deletions memory remembers, so an older change of a deleted
/// record arriving late does not bring it back.
const DELETIONS_KEPT: usize = 4096;

struct Records<T> {
    by_id: BTreeMap<String, Arc<Resident<T>>>,
    /// Recent deletions: the sequence of each, by id, and the ids by
    /// sequence to forget the oldest.
    deleted: std::collections::HashMap<String, u64>,
    deletions: BTreeMap<u64, String>,
}

impl<T: Document> Memory<T> {
    pub(crate) fn new(entries: impl IntoIterator<Item = Resident<T>>) -> Self {
        Self {
            records: RwLock::new(Records {
                by_id: entries
                    .into_iter()
                    .map(|entry| (entry.record.value.id().to_owned(), Arc::new(entry)))
                    .collect(),
                deleted: std::collections::HashMap::new(),
                deletions: BTreeMap::new(),
            }),
            read_at: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The backend's reopen count the records were read at.
    pub(crate) fn read_at(&self) -> u64 {
        self.read_at.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces every record with `fresh`, read at the backend's reopen
    /// count `read_at`.
    pub(crate) fn reset(&self, fresh: Memory<T>, read_at: u64) {
        let fresh = fresh
            .records
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        *self.records.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        self.read_at
            .store(read_at, std::sync::atomic::Ordering::Release);
    }

    /// Takes in a committed write, change `seq`: `None` for a deletion of
    /// `id`. A change older than what memory holds of `id` is ignored.
    pub(crate) fn apply(&self, id: &str, seq: u64, entry: Option<Resident<T>>) {
        let mut records = self.records.write().unwrap_or_else(PoisonError::into_inner);
        let records = &mut *records;
        if seq != 0
            && records
                .deleted
                .get(id)
                .is_some_and(|deleted| *deleted >= seq)
        {
            return;
        }
        match entry {
            None => {
                if records
                    .by_id
                    .get(id)
                    .is_some_and(|current| !current.older_than(seq, u64::MAX))
                {
                    return;
                }
                records.by_id.remove(id);
                if seq != 0 {
                    if let Some(before) = records.deleted.insert(id.to_owned(), seq) {
                        records.deletions.remove(&before);
                    }
                    records.deletions.insert(seq, id.to_owned());
                    while records.deletions.len() > DELETIONS_KEPT {
                        if let Some((_, oldest)) = records.deletions.pop_first() {
                            records.deleted.remove(&oldest);
                        }
                    }
                }
            }
            Some(entry) => {
                let newer = records
                    .by_id
                    .get(id)
                    .is_none_or(|current| current.older_than(seq, entry.record.revision));
                if newer {
                    if let Some(before) = records.deleted.remove(id) {
                        records.deletions.remove(&before);
                    }
                    records.by_id.insert(id.to_owned(), Arc::new(entry));
                }
            }
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Resident<T>>> {
        self.records
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(id)
            .cloned()
    }

    /// Up to `limit` entries with ids after `after` that `keep` selects, in
    /// id order.
    pub(crate) fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&Resident<T>) -> bool,
    ) -> Vec<Arc<Resident<T>>> {
        let records = self.records.read().unwrap_or_else(PoisonError::into_inner);
        let records = &records.by_id;
        let range = match after {
            Some(after) => records
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => records.range::<str, _>(..),
        };
        range
            .map(|(_, entry)| entry)
            .filter(|entry| keep(entry))
            .take(limit)
            .cloned()
            .collect()
    }
}
