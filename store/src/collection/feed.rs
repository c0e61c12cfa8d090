//! The change feed of the process: every committed write of a collection,
//! to its watchers, and the changes after a sequence.

use std::{
    any::Any,
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

use super::{Collection, codec::decode_body};
use crate::{Document, Result, Versioned, changelog::ChangeKind};

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
