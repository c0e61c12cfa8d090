//! The embedded backend: one redb file, crash-safe, no server to run.
//!
//! Each collection is a table from id to the JSON-encoded record plus a
//! table from unique key to id. Every write is one redb write transaction,
//! so preconditions are checked and unique keys enforced atomically with
//! the write, and it is durable before the call returns.
//!
//! Durable writes are committed in groups: while other writes are under
//! way, each write commits its transaction without a disk sync, then waits
//! for one durable commit made after it. Writers arriving while a sync
//! runs share the next one, so a hundred concurrent writes cost a few syncs
//! rather than a hundred (`tests::concurrent_writes_share_syncs`); a write
//! alone commits durably itself. redb makes a durable commit
//! durable together with every commit before it; a database opened again
//! after an I/O error drops the commits not yet durable, and their writers
//! hear an error.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::{Backend, Error, Precondition, RawPage, RawRecord, Result, check, check_parts};

pub(crate) struct EmbeddedBackend {
    db: Arc<std::sync::RwLock<Handle>>,
    path: String,
    /// Commits made, durable or not: the sequence of the latest.
    committed: Arc<AtomicU64>,
    /// The latest commit made durable, as (opening, sequence); held by the
    /// one writer syncing for the group.
    synced: tokio::sync::Mutex<(u64, u64)>,
    /// Disk syncs made, for tests.
    syncs: AtomicU64,
    /// Writes under way, from their start to their return.
    writers: Arc<AtomicUsize>,
}

/// One write under way, counted in [`EmbeddedBackend::writers`] until it
/// returns (or is dropped).
struct Writing(Arc<AtomicUsize>);

impl Writing {
    fn enter(writers: &Arc<AtomicUsize>) -> Self {
        writers.fetch_add(1, Ordering::SeqCst);
        Self(writers.clone())
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open database, and how many times it was opened. redb refuses
/// every operation after one failed its I/O (a full disk, say) until the
/// database is opened again; a store that stayed that way would need its
/// process restarted, so the backend opens it again itself.
struct Handle {
    db: Option<Database>,
    opened: u64,
    path: std::path::PathBuf,
}

impl Handle {
    /// Opens the database again, unless it was since `seen`.
    fn reopen(&mut self, seen: u64) -> Result<()> {
        if self.opened != seen && self.db.is_some() {
            return Ok(());
        }
        // The file is locked while open: close it first.
        self.db = None;
        let db = create_database(&self.path).map_err(|e| Error::backend("reopen", e))?;
        tracing::warn!(path = %self.path.display(), "the embedded store was opened again after an I/O error");
        self.db = Some(db);
        self.opened += 1;
        Ok(())
    }
}

/// Whether redb failed an I/O, after which it needs opening again.
fn failed_io(err: &Error) -> bool {
    matches!(err, Error::Backend { reason, .. } if reason.contains("I/O error"))
}

/// What redb may hold in memory of the file: its read cache and its
/// buffer of written pages. redb's default is 1 GiB, a ceiling it grows
/// towards as pages are touched. What the servers read on every call is
/// served from memory (resident collections, `resident.rs`, and the
/// manager's node statuses), so the cache would mostly hold the pages of
/// recent writes, and the kernel's page cache (shared, reclaimable) holds
/// the file anyway. With 1000 nodes reporting at once this keeps 8 to
/// 10 MiB out of the manager's resident memory, at no cost in time
/// (BENCHMARKS.md).
const CACHE_BYTES: usize = 4 << 20;

fn create_database(path: &Path) -> std::result::Result<Database, redb::DatabaseError> {
    redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
}

fn records(collection: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(collection)
}

fn keys(name: &str) -> TableDefinition<'_, &'static str, &'static str> {
    TableDefinition::new(name)
}

fn keys_table(collection: &str) -> String {
    format!("{collection}.keys")
}

impl EmbeddedBackend {
    pub(crate) async fn open(path: &Path) -> Result<Self> {
        let display = path.display().to_string();
        let owned = path.to_owned();
        let db = tokio::task::spawn_blocking(move || {
            if let Some(parent) = owned.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|err| err.to_string())?;
            }
            create_database(&owned).map_err(|err| err.to_string())
        })
        .await
        .map_err(|err| Error::backend("open", err))?
        .map_err(|reason| Error::Unavailable {
            store: format!("embedded:{display}"),
            reason,
        })?;
        Ok(Self {
            db: Arc::new(std::sync::RwLock::new(Handle {
                db: Some(db),
                opened: 1,
                path: path.to_owned(),
            })),
            path: display,
            committed: Arc::default(),
            synced: tokio::sync::Mutex::new((0, 0)),
            syncs: AtomicU64::new(0),
            writers: Arc::default(),
        })
    }

    /// Runs `work` in one write transaction and commits it; when `durable`,
    /// returns once a disk sync made after the commit completed, shared
    /// with the writers committing meanwhile (group commit). A durable
    /// write with no other write under way commits durably itself: alone,
    /// one commit costs less than two. `since` as in [`Self::blocking_in`].
    async fn write<R, F>(
        &self,
        operation: &'static str,
        since: Option<u64>,
        durable: bool,
        work: F,
    ) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<R> + Send + 'static,
    {
        let _writing = Writing::enter(&self.writers);
        let committed = self.committed.clone();
        let writers = self.writers.clone();
        let (value, sequence, opened, synced_upto) = self
            .blocking_in(operation, since, move |db, opened| {
                // Every commit counted here finished before this
                // transaction begins, so a durable commit of it makes them
                // durable too.
                let upto = committed.load(Ordering::SeqCst);
                let mut tx = db.begin_write().map_err(|e| Error::backend(operation, e))?;
                let alone = durable && writers.load(Ordering::SeqCst) == 1;
                if !alone {
                    tx.set_durability(redb::Durability::None)
                        .map_err(|e| Error::backend(operation, e))?;
                }
                // An error drops the transaction: nothing is written.
                let value = work(&tx)?;
                tx.commit().map_err(|e| Error::backend(operation, e))?;
                let sequence = committed.fetch_add(1, Ordering::SeqCst) + 1;
                Ok((value, sequence, opened, alone.then_some(upto)))
            })
            .await?;
        if let Some(upto) = synced_upto {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            // Others wait for the sync in hand, so the record may stay
            // behind: it only means one sync more.
            if let Ok(mut synced) = self.synced.try_lock()
                && (synced.0 != opened || synced.1 < upto)
            {
                *synced = (opened, upto);
            }
        } else if durable {
            self.sync(operation, sequence, opened).await?;
        }
        Ok(value)
    }

    /// Returns once commit `sequence` of opening `opened` is durable: made
    /// so by a sync that started after it, or by one this call makes. Only
    /// one sync runs at a time; the writers waiting meanwhile are covered
    /// by the next. A sync in another opening does not count: the reopen
    /// dropped the commit, and the sync is refused.
    async fn sync(&self, operation: &'static str, sequence: u64, opened: u64) -> Result<()> {
        let mut synced = self.synced.lock().await;
        if synced.0 == opened && synced.1 >= sequence {
            return Ok(());
        }
        // Every commit up to here finished before the sync's transaction
        // begins, so the sync makes them all durable.
        let upto = self.committed.load(Ordering::SeqCst);
        self.blocking_in(operation, Some(opened - 1), |db, _| {
            let tx = db.begin_write().map_err(|e| Error::backend(operation, e))?;
            tx.commit().map_err(|e| Error::backend(operation, e))
        })
        .await?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        *synced = (opened, upto);
        Ok(())
    }

    /// Runs blocking redb work off the async runtime. After redb failed an
    /// I/O the database is opened again, so the next operation can succeed
    /// once the disk can take it.
    async fn blocking<R, F>(&self, operation: &'static str, work: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Database) -> Result<R> + Send + 'static,
    {
        self.blocking_in(operation, None, |db, _| work(db)).await
    }

    /// [`Self::blocking`], only in the opening of the database `since`
    /// counts ([`Backend::reopened`]), when given: refused otherwise, with
    /// nothing done. `work` is told which opening it runs in.
    async fn blocking_in<R, F>(
        &self,
        operation: &'static str,
        since: Option<u64>,
        work: F,
    ) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Database, u64) -> Result<R> + Send + 'static,
    {
        let handle = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let lock = || {
                handle
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            let reopen = |seen| {
                let mut handle = handle
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Err(err) = handle.reopen(seen) {
                    tracing::warn!(error = %err, "cannot open the embedded store again");
                }
            };
            // Closed by a reopen that failed (the disk still full): try again.
            let closed = {
                let guard = lock();
                guard.db.is_none().then_some(guard.opened)
            };
            if let Some(seen) = closed {
                reopen(seen);
            }
            let (result, seen) = {
                let guard = lock();
                let result = match &guard.db {
                    // Not "I/O error": nothing failed here that a reopen
                    // would mend.
                    Some(_) if since.is_some_and(|since| since != guard.opened - 1) => {
                        Err(Error::backend(
                            operation,
                            "the database was opened again since the writes this one was to make durable, and dropped them",
                        ))
                    }
                    Some(db) => work(db, guard.opened),
                    None => Err(Error::backend(
                        operation,
                        "the database is closed after an I/O error",
                    )),
                };
                (result, guard.opened)
            };
            if let Err(err) = &result
                && failed_io(err)
            {
                reopen(seen);
            }
            result
        })
        .await
        .map_err(|err| Error::backend(operation, err))?
    }
}

fn decode_record(operation: &'static str, bytes: &[u8]) -> Result<RawRecord> {
    serde_json::from_slice(bytes).map_err(|err| Error::backend(operation, err))
}

fn encode_record(operation: &'static str, record: &RawRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|err| Error::backend(operation, err))
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn reopened(&self) -> u64 {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .opened
            - 1
    }

    async fn prepare(&self, collection: &str) -> Result<()> {
        let collection = collection.to_owned();
        self.write("prepare", None, true, move |tx| {
            drop(Tables::open(tx, &collection, "prepare")?);
            Ok(())
        })
        .await
    }

    async fn insert(&self, collection: &str, record: &RawRecord) -> Result<()> {
        const OP: &str = "insert";
        let collection = collection.to_owned();
        let record = record.clone();
        self.write(OP, None, true, move |tx| {
            Tables::open(tx, &collection, OP)?.insert(&record)
        })
        .await
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<RawRecord>> {
        const OP: &str = "get";
        let collection = collection.to_owned();
        let id = id.to_owned();
        self.blocking(OP, move |db| {
            let tx = db.begin_read().map_err(|e| Error::backend(OP, e))?;
            let table = match tx.open_table(records(&collection)) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(Error::backend(OP, e)),
            };
            let value = table.get(id.as_str()).map_err(|e| Error::backend(OP, e))?;
            value.map(|v| decode_record(OP, v.value())).transpose()
        })
        .await
    }

    async fn replace(
        &self,
        collection: &str,
        record: &RawRecord,
        status_in: &[String],
    ) -> Result<()> {
        const OP: &str = "replace";
        let collection = collection.to_owned();
        let record = record.clone();
        let status_in = status_in.to_vec();
        self.write(OP, None, true, move |tx| {
            Tables::open(tx, &collection, OP)?.replace(&record, &status_in)
        })
        .await
    }

    async fn write_many(
        &self,
        collection: &str,
        records: &[RawRecord],
        durable: bool,
        since: Option<u64>,
    ) -> Result<()> {
        const OP: &str = "write_many";
        let collection = collection.to_owned();
        let records = records.to_vec();
        self.write(OP, since, durable, move |tx| {
            let mut tables = Tables::open(tx, &collection, OP)?;
            for record in &records {
                if record.revision == 1 {
                    tables.insert(record)?;
                } else {
                    tables.replace(record, &[])?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> Result<bool> {
        const OP: &str = "delete";
        let collection = collection.to_owned();
        let id = id.to_owned();
        let condition = condition.clone();
        self.write(OP, None, true, move |tx| {
            let mut tables = Tables::open(tx, &collection, OP)?;
            let stored = tables
                .records
                .get(id.as_str())
                .map_err(|e| Error::backend(OP, e))?;
            let Some(current) = stored
                .map(|bytes| decode_record(OP, bytes.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            check(&current, condition.revision, &condition.status_in)?;
            tables.remove(&id)?;
            Ok(true)
        })
        .await
    }

    async fn delete_many(&self, collection: &str, ids: &[String]) -> Result<()> {
        const OP: &str = "delete_many";
        let collection = collection.to_owned();
        let ids = ids.to_vec();
        self.write(OP, None, true, move |tx| {
            let mut tables = Tables::open(tx, &collection, OP)?;
            for id in &ids {
                tables.remove(id)?;
            }
            Ok(())
        })
        .await
    }

    async fn list(&self, collection: &str, page: RawPage<'_>) -> Result<Vec<RawRecord>> {
        const OP: &str = "list";
        let collection = collection.to_owned();
        let filter = page.filter.clone();
        let after = page.after.map(str::to_owned);
        let limit = page.limit;
        self.blocking(OP, move |db| {
            let tx = db.begin_read().map_err(|e| Error::backend(OP, e))?;
            let table = match tx.open_table(records(&collection)) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(Error::backend(OP, e)),
            };
            let range = match after.as_deref() {
                Some(after) => table
                    .range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
                None => table.range::<&str>(..),
            }
            .map_err(|e| Error::backend(OP, e))?;
            let mut out = Vec::new();
            for entry in range {
                let (_, bytes) = entry.map_err(|e| Error::backend(OP, e))?;
                let record = decode_record(OP, bytes.value())?;
                let status_ok =
                    filter.statuses.is_empty() || filter.statuses.contains(&record.status);
                let key_ok = filter.key_matches(&record.key);
                if status_ok && key_ok {
                    out.push(record);
                    if out.len() == limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.path)
    }
}

/// What a replace checks of the stored record; its body is skipped.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    status: std::borrow::Cow<'a, str>,
    revision: u64,
}

/// A collection's tables inside one write transaction.
struct Tables<'tx> {
    collection: &'tx str,
    operation: &'static str,
    records: redb::Table<'tx, &'static str, &'static [u8]>,
    keys: redb::Table<'tx, &'static str, &'static str>,
}

impl<'tx> Tables<'tx> {
    fn open(
        tx: &'tx redb::WriteTransaction,
        collection: &'tx str,
        operation: &'static str,
    ) -> Result<Self> {
        Ok(Self {
            collection,
            operation,
            records: tx
                .open_table(records(collection))
                .map_err(|e| Error::backend(operation, e))?,
            keys: tx
                .open_table(keys(&keys_table(collection)))
                .map_err(|e| Error::backend(operation, e))?,
        })
    }

    /// Removes record `id` and its unique key, if it is there.
    fn remove(&mut self, id: &str) -> Result<()> {
        let op = self.operation;
        let removed = self.records.remove(id).map_err(|e| Error::backend(op, e))?;
        let Some(record) = removed
            .map(|bytes| decode_record(op, bytes.value()))
            .transpose()?
        else {
            return Ok(());
        };
        self.keys
            .remove(record.key.as_str())
            .map_err(|e| Error::backend(op, e))?;
        Ok(())
    }

    /// Inserts a new record; [`Error::AlreadyExists`] when its id or key is
    /// taken.
    fn insert(&mut self, record: &RawRecord) -> Result<()> {
        let op = self.operation;
        let taken = |key: &str| Error::AlreadyExists {
            collection: self.collection.to_owned(),
            key: key.to_owned(),
        };
        if self
            .records
            .get(record.id.as_str())
            .map_err(|e| Error::backend(op, e))?
            .is_some()
        {
            return Err(taken(&record.id));
        }
        if self
            .keys
            .get(record.key.as_str())
            .map_err(|e| Error::backend(op, e))?
            .is_some()
        {
            return Err(taken(unique_part(&record.key)));
        }
        let bytes = encode_record(op, record)?;
        self.records
            .insert(record.id.as_str(), bytes.as_slice())
            .map_err(|e| Error::backend(op, e))?;
        self.keys
            .insert(record.key.as_str(), record.id.as_str())
            .map_err(|e| Error::backend(op, e))?;
        Ok(())
    }

    /// Replaces the record at `record.revision - 1` whose status is one of
    /// `status_in` (any when empty).
    fn replace(&mut self, record: &RawRecord, status_in: &[String]) -> Result<()> {
        let op = self.operation;
        // Only the envelope: the body is skipped, not copied.
        let (revision, status, key) = match self
            .records
            .get(record.id.as_str())
            .map_err(|e| Error::backend(op, e))?
        {
            Some(bytes) => {
                let envelope: Envelope<'_> =
                    serde_json::from_slice(bytes.value()).map_err(|err| Error::backend(op, err))?;
                (
                    envelope.revision,
                    envelope.status.into_owned(),
                    envelope.key.into_owned(),
                )
            }
            None => {
                return Err(Error::NotFound {
                    collection: self.collection.to_owned(),
                    id: record.id.clone(),
                });
            }
        };
        check_parts(
            &record.id,
            revision,
            &status,
            Some(record.revision - 1),
            status_in,
        )?;
        if key != record.key {
            if self
                .keys
                .get(record.key.as_str())
                .map_err(|e| Error::backend(op, e))?
                .is_some()
            {
                return Err(Error::AlreadyExists {
                    collection: self.collection.to_owned(),
                    key: unique_part(&record.key).to_owned(),
                });
            }
            self.keys
                .remove(key.as_str())
                .map_err(|e| Error::backend(op, e))?;
            self.keys
                .insert(record.key.as_str(), record.id.as_str())
                .map_err(|e| Error::backend(op, e))?;
        }
        let bytes = encode_record(op, record)?;
        self.records
            .insert(record.id.as_str(), bytes.as_slice())
            .map_err(|e| Error::backend(op, e))?;
        Ok(())
    }
}

/// The caller's unique key inside a stored key.
fn unique_part(stored: &str) -> &str {
    stored
        .strip_prefix("k:")
        .or_else(|| stored.strip_prefix("i:"))
        .unwrap_or(stored)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::EmbeddedBackend;
    use crate::{Backend, RawRecord};

    fn record(id: &str) -> RawRecord {
        RawRecord {
            id: id.to_owned(),
            key: format!("i:{id}"),
            status: "ok".to_owned(),
            revision: 1,
            seq: 0,
            body: serde_json::value::RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).unwrap(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let backend = std::sync::Arc::new(EmbeddedBackend::open(&path).await.unwrap());
        backend.prepare("docs").await.unwrap();
        let before = backend.syncs.load(Ordering::SeqCst);
        backend.insert("docs", &record("alone")).await.unwrap();
        assert_eq!(
            backend.syncs.load(Ordering::SeqCst) - before,
            1,
            "a write alone is synced before it returns"
        );

        let before = backend.syncs.load(Ordering::SeqCst);
        let writes: Vec<_> = (0..100)
            .map(|i| {
                let backend = backend.clone();
                tokio::spawn(
                    async move { backend.insert("docs", &record(&format!("d{i:03}"))).await },
                )
            })
            .collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        let syncs = backend.syncs.load(Ordering::SeqCst) - before;
        assert!(
            (1..=50).contains(&syncs),
            "100 concurrent writes took {syncs} syncs"
        );
        // All of them are there once the file is opened again.
        drop(backend);
        let again = EmbeddedBackend::open(&path).await.unwrap();
        let all = again
            .list(
                "docs",
                crate::RawPage {
                    filter: &crate::RawFilter::default(),
                    after: None,
                    limit: 1000,
                },
            )
            .await
            .unwrap();
        assert_eq!(all.len(), 101);
    }

    #[tokio::test]
    async fn a_write_not_asked_durable_waits_for_no_sync() {
        let dir = tempfile::tempdir().unwrap();
        let backend = EmbeddedBackend::open(&dir.path().join("store.redb"))
            .await
            .unwrap();
        backend.prepare("docs").await.unwrap();
        let before = backend.syncs.load(Ordering::SeqCst);
        backend
            .write_many("docs", &[record("later")], false, None)
            .await
            .unwrap();
        assert_eq!(backend.syncs.load(Ordering::SeqCst), before);
        backend
            .write_many("docs", &[record("now")], true, None)
            .await
            .unwrap();
        assert_eq!(backend.syncs.load(Ordering::SeqCst), before + 1);
    }
}
