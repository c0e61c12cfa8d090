//! The embedded backend: one redb file, crash-safe, no server to run.
//!
//! Each collection is a table from id to the JSON-encoded record plus a
//! table from unique key to id. Every write is one redb write transaction,
//! committed with redb's default immediate durability before the call
//! returns, so preconditions are checked and unique keys enforced atomically
//! with the write.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::{Backend, Error, Precondition, RawPage, RawRecord, Result, check, check_parts};

pub(crate) struct EmbeddedBackend {
    db: Arc<std::sync::RwLock<Handle>>,
    path: String,
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
        let db = Database::create(&self.path).map_err(|e| Error::backend("reopen", e))?;
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
            Database::create(&owned).map_err(|err| err.to_string())
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
        })
    }

    /// Runs blocking redb work off the async runtime. After redb failed an
    /// I/O the database is opened again, so the next operation can succeed
    /// once the disk can take it.
    async fn blocking<R, F>(&self, operation: &'static str, work: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Database) -> Result<R> + Send + 'static,
    {
        self.blocking_since(operation, None, work).await
    }

    /// [`Self::blocking`], only in the opening of the database `since`
    /// counts ([`Backend::reopened`]), when given: refused otherwise, with
    /// nothing done.
    async fn blocking_since<R, F>(
        &self,
        operation: &'static str,
        since: Option<u64>,
        work: F,
    ) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Database) -> Result<R> + Send + 'static,
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
                    Some(db) => work(db),
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
        self.blocking("prepare", move |db| {
            let tx = db.begin_write().map_err(|e| Error::backend("prepare", e))?;
            drop(Tables::open(&tx, &collection, "prepare")?);
            tx.commit().map_err(|e| Error::backend("prepare", e))
        })
        .await
    }

    async fn insert(&self, collection: &str, record: &RawRecord) -> Result<()> {
        const OP: &str = "insert";
        let collection = collection.to_owned();
        let record = record.clone();
        self.blocking(OP, move |db| {
            let tx = db.begin_write().map_err(|e| Error::backend(OP, e))?;
            {
                let mut tables = Tables::open(&tx, &collection, OP)?;
                tables.insert(&record)?;
            }
            tx.commit().map_err(|e| Error::backend(OP, e))
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
        self.blocking(OP, move |db| {
            let tx = db.begin_write().map_err(|e| Error::backend(OP, e))?;
            {
                let mut tables = Tables::open(&tx, &collection, OP)?;
                tables.replace(&record, &status_in)?;
            }
            tx.commit().map_err(|e| Error::backend(OP, e))
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
        self.blocking_since(OP, since, move |db| {
            let mut tx = db.begin_write().map_err(|e| Error::backend(OP, e))?;
            if !durable {
                tx.set_durability(redb::Durability::None)
                    .map_err(|e| Error::backend(OP, e))?;
            }
            {
                let mut tables = Tables::open(&tx, &collection, OP)?;
                for record in &records {
                    if record.revision == 1 {
                        tables.insert(record)?;
                    } else {
                        tables.replace(record, &[])?;
                    }
                }
            }
            // An error above drops the transaction: nothing is written.
            tx.commit().map_err(|e| Error::backend(OP, e))
        })
        .await
    }

    async fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> Result<bool> {
        const OP: &str = "delete";
        let collection = collection.to_owned();
        let id = id.to_owned();
        let condition = condition.clone();
        self.blocking(OP, move |db| {
            let tx = db.begin_write().map_err(|e| Error::backend(OP, e))?;
            {
                let mut tables = Tables::open(&tx, &collection, OP)?;
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
            }
            tx.commit().map_err(|e| Error::backend(OP, e))?;
            Ok(true)
        })
        .await
    }

    async fn delete_many(&self, collection: &str, ids: &[String]) -> Result<()> {
        const OP: &str = "delete_many";
        let collection = collection.to_owned();
        let ids = ids.to_vec();
        self.blocking(OP, move |db| {
            let tx = db.begin_write().map_err(|e| Error::backend(OP, e))?;
            {
                let mut tables = Tables::open(&tx, &collection, OP)?;
                for id in &ids {
                    tables.remove(id)?;
                }
            }
            tx.commit().map_err(|e| Error::backend(OP, e))
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
