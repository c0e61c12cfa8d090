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
//! expired.
//!
//! A database several processes write at once ([`Backend::shared`]:
//! MongoDB, where a standby manager and marketplace replicas share one
//! store) hands out the sequence itself, from a counter document advanced
//! atomically, and the live feed is the log read back ([`tail`]): every
//! process publishes every process's changes, in sequence order. A
//! sequence taken by a write that then failed gets a *skip* entry; one
//! whose entry never comes (its writer died) gets a skip entry from the
//! first reader that waited [`GAP_TIMEOUT`] for it, and a writer that
//! finds its sequence skipped logs its change under a new one. A crash between a record write and its entry is repaired when
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
/// The counter handing out sequences in a shared database.
const SEQUENCE: &str = "changes";
/// The status of a skip entry: a sequence no change holds.
pub(crate) const SKIP: &str = "~skip";
/// How often the live feed of a shared database reads the log when
/// nothing in this process wrote.
pub(crate) const POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// How long a reader of a shared log waits for a sequence taken by another
/// process before it skips it.
pub(crate) const GAP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// The live feed of a database other processes write too.
    shared: Option<Arc<SharedFeed>>,
}

/// Where the live feed of a shared log stands.
#[derive(Debug)]
pub(crate) struct SharedFeed {
    /// Every change up to this sequence was published to this process.
    published: tokio::sync::watch::Sender<u64>,
    /// Wakes the reader: this process logged something.
    kick: tokio::sync::Notify,
    /// Sequences this process took and is still writing: the reader does
    /// not publish past them, so this process's watchers hear of its
    /// writes after the writer is done with them, and no other reader
    /// skips them while they are merely slow.
    held: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// The sequence the log was last pruned at.
    pruned_at: std::sync::atomic::AtomicU64,
}

impl SharedFeed {
    /// Waits until every change up to `seq` was published, for at most
    /// twice [`GAP_TIMEOUT`], and returns what was.
    async fn caught_up(&self, seq: u64) -> u64 {
        let mut published = self.published.subscribe();
        self.kick.notify_one();
        let wait = published.wait_for(|published| *published >= seq);
        let _ = tokio::time::timeout(GAP_TIMEOUT * 2, wait).await;
        *published.borrow()
    }

    fn lowest_held(&self) -> Option<u64> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first()
            .copied()
    }
}

/// Sequences taken by a write of this process; the reader of a shared log
/// waits for them until this is dropped.
#[derive(Debug)]
pub(crate) struct Hold {
    feed: Option<Arc<SharedFeed>>,
    seqs: std::ops::RangeInclusive<u64>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(feed) = &self.feed {
            let mut held = feed
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for seq in self.seqs.clone() {
                held.remove(&seq);
            }
            drop(held);
            feed.kick.notify_one();
        }
    }
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
        let shared = backend.shared().then(|| {
            // Published: what the log holds without a gap. A gap left
            // by a writer that died is skipped by the reader in time.
            let mut published = state.pruned_through;
            for seq in &state.retained {
                if *seq != published + 1 {
                    break;
                }
                published = *seq;
            }
            Arc::new(SharedFeed {
                published: tokio::sync::watch::Sender::new(published),
                kick: tokio::sync::Notify::new(),
                held: std::sync::Mutex::default(),
                pruned_at: std::sync::atomic::AtomicU64::new(state.head),
            })
        });
        Ok(Self {
            backend,
            state: Mutex::new(state),
            doubts: std::sync::Mutex::default(),
            repaired: std::sync::Mutex::default(),
            shared,
        })
    }

    /// The live feed, when other processes write the database too.
    pub(crate) fn shared(&self) -> Option<&Arc<SharedFeed>> {
        self.shared.as_ref()
    }

    /// Takes `n` sequences (at least one) for a write, the first returned:
    /// the next ones of this process's log, or of the database's counter
    /// when it is shared, held until the returned [`Hold`] is dropped.
    pub(crate) async fn reserve(&self, state: &mut LogState, n: u64) -> Result<(u64, Hold)> {
        let n = n.max(1);
        let Some(feed) = &self.shared else {
            return Ok((
                state.head + 1,
                Hold {
                    feed: None,
                    seqs: 0..=0,
                },
            ));
        };
        let last = self.backend.advance(SEQUENCE, n).await?;
        let first = last + 1 - n;
        feed.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(first..=last);
        state.head = state.head.max(last);
        Ok((
            first,
            Hold {
                feed: Some(feed.clone()),
                seqs: first..=last,
            },
        ))
    }

    /// Marks sequences a failed write took and logged nothing under, so
    /// readers of a shared log need not wait for them. Best effort: a
    /// reader skips them after [`GAP_TIMEOUT`] anyway.
    pub(crate) async fn skip(&self, seqs: std::ops::RangeInclusive<u64>) {
        if self.shared.is_none() {
            return;
        }
        for seq in seqs {
            if let Err(err) = self.backend.insert(LOG_COLLECTION, &skip_entry(seq)).await
                && !matches!(err, Error::AlreadyExists { .. })
            {
                tracing::debug!(seq, error = %err, "cannot mark a sequence skipped");
            }
        }
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
        if self.shared.is_some() {
            return self.append_shared(state, records).await;
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

    /// [`ChangeLog::append_many`] to a shared log: an entry whose sequence
    /// a reader skipped (its writer was too slow) is logged under a new
    /// one. The oldest entries are pruned every [`PRUNE_BATCH`] sequences.
    async fn append_shared(&self, state: &mut LogState, records: Vec<RawRecord>) -> Result<()> {
        let mut last = 0;
        for mut record in records {
            let mut hold = None;
            loop {
                match self.backend.insert(LOG_COLLECTION, &record).await {
                    Ok(()) => break,
                    Err(Error::AlreadyExists { .. }) => {
                        let (seq, held) = self.reserve(state, 1).await?;
                        tracing::warn!(
                            skipped = record.seq,
                            seq,
                            "a change logged under a new sequence: a reader skipped its first one"
                        );
                        record.seq = seq;
                        record.id = entry_id(seq);
                        record.key = format!("i:{}", record.id);
                        hold = Some(held);
                    }
                    Err(err) => return Err(err),
                }
            }
            drop(hold);
            last = last.max(record.seq);
        }
        let Some(feed) = &self.shared else {
            return Ok(());
        };
        let pruned_at = feed.pruned_at.load(std::sync::atomic::Ordering::Relaxed);
        if last >= pruned_at + PRUNE_BATCH as u64 && last > RETAINED as u64 {
            feed.pruned_at
                .store(last, std::sync::atomic::Ordering::Relaxed);
            let keep_from = last + 1 - RETAINED as u64;
            self.backend
                .delete_before(LOG_COLLECTION, &entry_id(keep_from))
                .await?;
        }
        Ok(())
    }

    /// The entries of `collection` after `since`, in sequence order, or
    /// [`Error::CursorOutOfRange`] when some of them are no longer kept or the
    /// cursor is ahead of the log.
    pub(crate) async fn since(&self, collection: &str, since: u64) -> Result<Vec<(u64, Entry)>> {
        if let Some(feed) = &self.shared {
            return self.since_shared(feed, collection, since).await;
        }
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

    /// [`ChangeLog::since`] in a shared log: the entries up to what this
    /// process published (later ones come through its feed), the bounds
    /// read from the database.
    async fn since_shared(
        &self,
        feed: &SharedFeed,
        collection: &str,
        since: u64,
    ) -> Result<Vec<(u64, Entry)>> {
        let head = self.backend.advance(SEQUENCE, 0).await?;
        if since > head {
            return Err(Error::CursorOutOfRange {
                since,
                reason: format!("the store's changes end at {head}; watch again without a cursor"),
            });
        }
        // Every change made before the call, in any process, is read once
        // this process published it (a cursor another process handed out
        // included).
        let published = feed.caught_up(head).await;
        let oldest = self
            .backend
            .list(
                LOG_COLLECTION,
                RawPage {
                    filter: &RawFilter::default(),
                    after: None,
                    limit: 1,
                },
            )
            .await?
            .first()
            .map_or(head + 1, |entry| entry.seq);
        if since + 1 < oldest && since < head {
            return Err(Error::CursorOutOfRange {
                since,
                reason: format!(
                    "changes up to {} are no longer kept; watch again without a cursor",
                    oldest - 1
                ),
            });
        }
        let mut entries = self.read(collection, since).await?;
        entries.retain(|(seq, _)| *seq <= published);
        Ok(entries)
    }

    /// In a shared log: the sequence the database has handed out up to
    /// now, and, once this process published everything up to it (waiting
    /// at most twice [`GAP_TIMEOUT`]), what it published.
    pub(crate) async fn caught_up_to_head(&self) -> Result<Option<(u64, u64)>> {
        let Some(feed) = &self.shared else {
            return Ok(None);
        };
        let head = self.backend.advance(SEQUENCE, 0).await?;
        Ok(Some((head, feed.caught_up(head).await)))
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
            let (next, _hold) = self.reserve(&mut state, 1).await?;
            let seq = if self.shared.is_some() {
                next
            } else {
                record.seq.max(next)
            };
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
            let (seq, _hold) = self.reserve(&mut state, 1).await?;
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

/// The entry marking `seq` as holding no change.
fn skip_entry(seq: u64) -> RawRecord {
    let id = entry_id(seq);
    RawRecord {
        key: format!("i:{id}"),
        id,
        status: SKIP.to_owned(),
        revision: 1,
        seq,
        body: RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!()),
    }
}

/// A change read back from a shared log: its collection, sequence and
/// entry.
pub(crate) type Publish = Box<dyn Fn(&str, u64, Entry) + Send + Sync>;

/// Starts reading a shared log back: every change any process logs is
/// handed to `publish`, in sequence order, within [`POLL`] (at once for
/// this process's own). Ends once the log is dropped.
pub(crate) fn spawn_reader(log: &ChangeLog, publish: Publish) {
    let Some(feed) = log.shared.clone() else {
        return;
    };
    let backend = log.backend.clone();
    tokio::spawn(async move {
        let mut gap = None;
        // Only the reader holds the feed once the log is gone (a write's
        // hold lives no longer than its write).
        while Arc::strong_count(&feed) > 1 {
            match read_once(&*backend, &feed, &publish, &mut gap).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(err) => tracing::debug!(error = %err, "cannot read the change log back yet"),
            }
            tokio::select! {
                () = feed.kick.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    });
}

/// Reads the next page of a shared log and publishes what follows the last
/// sequence published without a gap. A sequence missing while later ones
/// are logged is waited for [`GAP_TIMEOUT`], then skipped. Whether there
/// is more to read at once.
async fn read_once(
    backend: &dyn Backend,
    feed: &SharedFeed,
    publish: &Publish,
    gap: &mut Option<(u64, std::time::Instant)>,
) -> Result<bool> {
    const PAGE: usize = 500;
    let start = *feed.published.borrow();
    let mut published = start;
    let after = entry_id(published);
    let page = backend
        .list(
            LOG_COLLECTION,
            RawPage {
                filter: &RawFilter::default(),
                after: Some(&after),
                limit: PAGE,
            },
        )
        .await?;
    let full = page.len() == PAGE;
    let held = feed.lowest_held();
    let mut more = false;
    for raw in page {
        let next = published + 1;
        if held.is_some_and(|held| held <= raw.seq.min(next)) {
            // This process is still writing it.
            break;
        }
        if raw.seq != next {
            match *gap {
                Some((seq, since)) if seq == next && since.elapsed() >= GAP_TIMEOUT => {
                    tracing::warn!(seq, "a change never came: its sequence is skipped");
                    match backend.insert(LOG_COLLECTION, &skip_entry(seq)).await {
                        Ok(()) | Err(Error::AlreadyExists { .. }) => more = true,
                        Err(err) => return Err(err),
                    }
                    *gap = None;
                }
                Some((seq, _)) if seq == next => {}
                _ => *gap = Some((next, std::time::Instant::now())),
            }
            break;
        }
        *gap = None;
        if raw.status != SKIP {
            match serde_json::from_str::<Entry>(raw.body.get()) {
                Ok(entry) => publish(&raw.status, raw.seq, entry),
                Err(err) => {
                    tracing::warn!(seq = raw.seq, error = %err, "a change log entry this version cannot read")
                }
            }
        }
        published = raw.seq;
    }
    if published != start {
        feed.published.send_replace(published);
    }
    Ok(more || (full && published != start))
}
