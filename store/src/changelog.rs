//! The store-wide change log: every write of a logged collection gets the
//! next number of one sequence, and the change (kind, revision, the record
//! after it) is kept under that number, so a watcher that lost its stream
//! can resume from the last sequence it saw and receive exactly what it
//! missed.
//!
//! The log is an ordinary collection of the backend (`changes`), one entry
//! per change with the zero-padded sequence as its id, so id order is
//! sequence order on every backend. Writes of logged collections are
//! serialised by one lock: the record is written (carrying its sequence),
//! then its entry, then the change is published to this process's watchers.
//! The newest [`RETAINED`] entries are kept; a cursor older than those is
//! expired. A crash between a record write and its entry is repaired when
//! the collection is opened again: a record newer than the log gets an entry
//! for its current state, and a record the log believes alive but that is
//! gone gets a deletion.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Mutex, MutexGuard};

use crate::{Backend, Error, RawFilter, RawPage, RawRecord, Result};

/// Name of the backend collection holding the log.
pub(crate) const LOG_COLLECTION: &str = "changes";
/// How many changes the log keeps, across collections.
pub(crate) const RETAINED: usize = 4096;
/// How many entries are pruned at once when the log is over [`RETAINED`].
const PRUNE_BATCH: usize = 256;

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The record was created.
    Added,
    /// The record was replaced.
    Modified,
    /// The record was deleted; the change carries its last state.
    Deleted,
}

/// One entry of the log, as stored in the entry's body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub kind: ChangeKind,
    pub id: String,
    pub revision: u64,
    pub body: Box<RawValue>,
}

/// Where the log stands.
#[derive(Debug, Default)]
pub(crate) struct LogState {
    /// The highest sequence handed out.
    pub head: u64,
    /// Sequences of the entries kept, oldest first.
    retained: VecDeque<u64>,
    /// Every entry up to this sequence was pruned (or never existed).
    pruned_through: u64,
}

/// A write whose outcome is unknown: the backend failed while it was under
/// way (the connection broke, the server died), so it may have happened.
/// The next write or read of its collection in this process reads the
/// record back and, when it did happen, takes it as a change of its own.
#[derive(Debug, Clone)]
pub(crate) struct Doubt {
    /// What the write did.
    pub kind: ChangeKind,
    /// The revision it wrote (for a deletion, the one it deleted).
    pub revision: u64,
    /// The sequence it wrote into the record.
    pub seq: u64,
    /// The record before a deletion.
    pub before: Option<RawRecord>,
}

pub(crate) struct ChangeLog {
    backend: Arc<dyn Backend>,
    state: Mutex<LogState>,
    /// Writes of unknown outcome, by collection and id.
    doubts: std::sync::Mutex<HashMap<String, HashMap<String, Doubt>>>,
    /// Collections repaired since the store was opened: a process opens a
    /// collection many times, a crash is repaired once.
    repaired: std::sync::Mutex<HashSet<String>>,
}

fn entry_id(seq: u64) -> String {
    format!("{seq:020}")
}

/// Every record of `collection` matching `filter` with an id after `after`,
/// page after page.
async fn scan(
    backend: &dyn Backend,
    collection: &str,
    filter: &RawFilter,
    after: Option<String>,
) -> Result<Vec<RawRecord>> {
    let mut all = Vec::new();
    let mut after = after;
    loop {
        let page = backend
            .list(
                collection,
                RawPage {
                    filter,
                    after: after.as_deref(),
                    limit: 500,
                },
            )
            .await?;
        let Some(last) = page.last() else {
            return Ok(all);
        };
        after = Some(last.id.clone());
        all.extend(page);
    }
}

impl ChangeLog {
    /// Reads where the log stands.
    pub(crate) async fn open(backend: Arc<dyn Backend>) -> Result<Self> {
        backend.prepare(LOG_COLLECTION).await?;
        let mut state = LogState::default();
        state.retained = scan(&*backend, LOG_COLLECTION, &RawFilter::default(), None)
            .await?
            .iter()
            .map(|entry| entry.seq)
            .collect();
        state.head = state.retained.back().copied().unwrap_or(0);
        state.pruned_through = state.retained.front().map_or(0, |first| first - 1);
        Ok(Self {
            backend,
            state: Mutex::new(state),
            doubts: std::sync::Mutex::default(),
            repaired: std::sync::Mutex::default(),
        })
    }

    /// Records that the write of `id` in `collection` may have happened.
    pub(crate) fn doubt(&self, collection: &str, id: &str, doubt: Doubt) {
        self.doubts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(collection.to_owned())
            .or_default()
            .insert(id.to_owned(), doubt);
    }

    /// The writes of `collection` of unknown outcome.
    pub(crate) fn doubts(&self, collection: &str) -> Vec<(String, Doubt)> {
        self.doubts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(collection)
            .map(|doubts| doubts.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether `collection` has writes of unknown outcome.
    pub(crate) fn in_doubt(&self, collection: &str) -> bool {
        self.doubts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(collection)
            .is_some_and(|doubts| !doubts.is_empty())
    }

    /// The write of `id` in `collection` is settled.
    pub(crate) fn settled(&self, collection: &str, id: &str) {
        if let Some(doubts) = self
            .doubts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(collection)
        {
            doubts.remove(id);
        }
    }

    /// Holds the log: no logged write happens while the guard lives.
    pub(crate) async fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().await
    }

    /// Holds the log if nothing else does.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, LogState>> {
        self.state.try_lock().ok()
    }

    /// Appends the entry of a change already written to its record, and
    /// prunes the oldest entries when the log is over its size. The record
    /// holds `seq`, so the head moves even when the append fails (a later
    /// open repairs the missing entry).
    pub(crate) async fn append(
        &self,
        state: &mut LogState,
        collection: &str,
        seq: u64,
        entry: &Entry,
    ) -> Result<()> {
        self.append_many(state, collection, &[(seq, entry)], None)
            .await
    }

    /// Appends the entries of changes already written (each record holds
    /// its sequence) in one backend write, and prunes the oldest entries
    /// when the log is over its size. With `since`, the records were
    /// written not durable yet, in that opening of the database
    /// ([`Backend::reopened`]): the entries make them durable, so they are
    /// refused once a reopen dropped the records.
    pub(crate) async fn append_many(
        &self,
        state: &mut LogState,
        collection: &str,
        entries: &[(u64, &Entry)],
        since: Option<u64>,
    ) -> Result<()> {
        let Some(last) = entries.iter().map(|(seq, _)| *seq).max() else {
            return Ok(());
        };
        state.head = state.head.max(last);
        let mut records = Vec::with_capacity(entries.len());
        for (seq, entry) in entries {
            let body =
                serde_json::value::to_raw_value(entry).map_err(|e| Error::backend("log", e))?;
            let id = entry_id(*seq);
            records.push(RawRecord {
                key: format!("i:{id}"),
                id,
                status: collection.to_owned(),
                revision: 1,
                seq: *seq,
                body,
            });
        }
        match (records.as_slice(), since) {
            ([one], None) => self.backend.insert(LOG_COLLECTION, one).await?,
            (many, since) => {
                self.backend
                    .write_many(LOG_COLLECTION, many, true, since)
                    .await?;
            }
        }
        state.retained.extend(entries.iter().map(|(seq, _)| *seq));
        if state.retained.len() > RETAINED + PRUNE_BATCH {
            // In one step: one transaction, one disk sync.
            let over = state.retained.len() - RETAINED;
            let oldest: Vec<u64> = state.retained.iter().take(over).copied().collect();
            let ids: Vec<String> = oldest.iter().map(|seq| entry_id(*seq)).collect();
            self.backend.delete_many(LOG_COLLECTION, &ids).await?;
            state.retained.drain(..over);
            if let Some(last) = oldest.last() {
                state.pruned_through = *last;
            }
        }
        Ok(())
    }

    /// The entries of `collection` after `since`, in sequence order, or
    /// [`Error::CursorOutOfRange`] when some of them are no longer kept or the
    /// cursor is ahead of the log.
    pub(crate) async fn since(&self, collection: &str, since: u64) -> Result<Vec<(u64, Entry)>> {
        {
            let state = self.state.lock().await;
            if since < state.pruned_through {
                return Err(Error::CursorOutOfRange {
                    since,
                    reason: format!(
                        "changes up to {} are no longer kept; watch again without a cursor",
                        state.pruned_through
                    ),
                });
            }
            if since > state.head {
                return Err(Error::CursorOutOfRange {
                    since,
                    reason: format!(
                        "the store's changes end at {}; watch again without a cursor",
                        state.head
                    ),
                });
            }
        }
        self.read(collection, since).await
    }

    async fn read(&self, collection: &str, since: u64) -> Result<Vec<(u64, Entry)>> {
        let filter = RawFilter {
            statuses: vec![collection.to_owned()],
            key: None,
            key_prefix: None,
        };
        scan(
            &*self.backend,
            LOG_COLLECTION,
            &filter,
            Some(entry_id(since)),
        )
        .await?
        .into_iter()
        .map(|record| {
            let entry: Entry = serde_json::from_str(record.body.get())
                .map_err(|e| Error::backend("read log", e))?;
            Ok((record.seq, entry))
        })
        .collect()
    }

    /// Brings the log in line with `collection` after a crash between a
    /// record write and its entry; once per collection and process.
    pub(crate) async fn repair(&self, collection: &str) -> Result<()> {
        let mut state = self.state.lock().await;
        if self
            .repaired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(collection)
        {
            return Ok(());
        }
        // The last entry of each record the log knows.
        let mut last_logged: HashMap<String, (u64, Entry)> = HashMap::new();
        for (seq, entry) in self.read(collection, 0).await? {
            last_logged.insert(entry.id.clone(), (seq, entry));
        }
        let records = scan(&*self.backend, collection, &RawFilter::default(), None).await?;
        // Records written after their last entry: log their current state.
        let mut newer: Vec<&RawRecord> = records
            .iter()
            .filter(|r| r.seq > last_logged.get(&r.id).map_or(state.pruned_through, |l| l.0))
            .collect();
        newer.sort_by_key(|r| r.seq);
        for record in newer {
            let seq = record.seq.max(state.head + 1);
            let entry = Entry {
                kind: if record.revision == 1 {
                    ChangeKind::Added
                } else {
                    ChangeKind::Modified
                },
                id: record.id.clone(),
                revision: record.revision,
                body: record.body.clone(),
            };
            self.append(&mut state, collection, seq, &entry).await?;
        }
        // Records the log believes alive that are gone: log their deletion.
        let present: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let mut gone: Vec<(u64, Entry)> = last_logged
            .into_values()
            .filter(|(_, entry)| {
                entry.kind != ChangeKind::Deleted && !present.contains(entry.id.as_str())
            })
            .collect();
        gone.sort_by_key(|(seq, _)| *seq);
        for (_, entry) in gone {
            let seq = state.head + 1;
            let entry = Entry {
                kind: ChangeKind::Deleted,
                ..entry
            };
            self.append(&mut state, collection, seq, &entry).await?;
        }
        self.repaired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(collection.to_owned());
        Ok(())
    }
}
