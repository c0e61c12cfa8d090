//! The change feed of the process: every committed write of a collection,
//! to its watchers, and the changes after a sequence.

use std::{
    any::Any,
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

use super::{Collection, codec::decode_body};
use crate::{
    Document, Result, Versioned,
    changelog::{ChangeKind, Entry},
    resident::{Memory, Resident},
    stored_key,
};

/// How many changes a watcher may fall behind before it misses some.
const CHANGE_BUFFER: usize = 1024;

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

/// Takes in a change read back from a shared log: its sequence and entry.
type Apply = Arc<dyn Fn(u64, Entry) + Send + Sync>;

/// Change feeds per collection: this process's writes, or, in a database
/// other processes write too, every change read back from the log.
#[derive(Clone, Default)]
pub(crate) struct ChangeHub {
    senders: Arc<Mutex<HashMap<&'static str, Box<dyn Any + Send + Sync>>>>,
    /// What a change read back from a shared log goes to, by collection.
    appliers: Arc<Mutex<HashMap<&'static str, Apply>>>,
}

impl ChangeHub {
    /// From now on, a change of `T`'s collection read back from a shared
    /// log goes to its watchers and, for a resident collection, `memory`.
    pub(crate) fn hook<T: Document>(&self, memory: Option<Arc<Memory<T>>>) {
        let mut appliers = self
            .appliers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if appliers.contains_key(T::COLLECTION) {
            return;
        }
        let sender = self.sender::<T>();
        let apply = move |seq: u64, entry: Entry| {
            let record = match decode_body::<T>(&entry.id, entry.revision, &entry.body) {
                Ok(record) => record,
                Err(err) => {
                    tracing::warn!(collection = T::COLLECTION, seq, error = %err, "a change this version cannot read");
                    return;
                }
            };
            if let Some(memory) = &memory {
                let resident = (entry.kind != ChangeKind::Deleted).then(|| {
                    Resident::new(
                        Versioned {
                            revision: record.revision,
                            value: Arc::new(record.value.clone()),
                        },
                        stored_key(record.value.unique_key(), &entry.id),
                        record.value.status(),
                        seq,
                    )
                });
                memory.apply(&entry.id, seq, resident);
            }
            let _ = sender.send(Change {
                kind: entry.kind,
                seq,
                record,
            });
        };
        appliers.insert(T::COLLECTION, Arc::new(apply));
    }

    /// Hands a change read back from a shared log to its collection.
    pub(crate) fn apply(&self, collection: &str, seq: u64, entry: Entry) {
        let apply = self
            .appliers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(collection)
            .cloned();
        if let Some(apply) = apply {
            apply(seq, entry);
        }
    }

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

impl<T: Document> Collection<T> {
    /// Changes committed through this process from now on. A receiver that
    /// falls more than 1024 changes behind gets
    /// [`broadcast::error::RecvError::Lagged`] instead of slowing writers.
    pub fn watch(&self) -> broadcast::Receiver<Change<T>> {
        self.changes.subscribe()
    }

    /// Runs `read` while no write of a logged collection can happen, and
    /// returns its result with the sequence it reflects (every change up to
    /// it, none after it) and a receiver of every later change.
    ///
    /// In a database other processes write too, they are not held back:
    /// the result reflects every change up to the sequence, and may reflect
    /// another process's change after it, which the receiver then repeats.
    pub async fn snapshot<R, F>(&self, read: F) -> Result<(R, u64, broadcast::Receiver<Change<T>>)>
    where
        F: AsyncFnOnce(&Self) -> Result<R>,
    {
        let state = self.log.lock().await;
        let receiver = self.changes.subscribe();
        // Where other processes write too: read once every sequence handed
        // out so far is published, this process's writes held off by the
        // lock, so the snapshot reflects exactly the changes up to its
        // sequence and a cursor it gives replays none it reflects. Another
        // process's write during the read may be reflected as well (the
        // follow loop drops it when the feed repeats it).
        let seq = match self.log.caught_up_to_head().await? {
            Some((_, published)) => published,
            None => state.head,
        };
        let value = read(self).await?;
        drop(state);
        Ok((value, seq, receiver))
    }

    /// Whether other processes write the database too: a
    /// [`Collection::snapshot`] may reflect changes its receiver repeats,
    /// and [`Collection::watch`] receives every process's changes.
    pub fn shared(&self) -> bool {
        self.log.shared().is_some()
    }

    /// Every change of this collection after the sequence `since`, in order,
    /// and a receiver of later changes (which may repeat some of them: skip
    /// what is not above the last sequence returned). Fails with
    /// [`Error::CursorOutOfRange`](crate::Error::CursorOutOfRange) when the log no longer holds every change
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
