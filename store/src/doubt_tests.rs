//! Writes whose outcome is unknown: the database failed while a write was
//! under way, and the write may or may not have happened. Found by the
//! fault campaign (seed 31): the MongoDB-wire server died as it committed
//! an installation's write, and the manager, which took the write as not
//! made, kept the record's older revision in memory, refused every later
//! write of it as a conflict, never showed the change to its watchers, and
//! handed the write's sequence to the next change. These tests fail the
//! real embedded backend at that moment.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU8, Ordering},
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    Backend, Collection, Error, OpenOptions, Precondition, RawPage, RawRecord, Result, Store,
    changelog::ChangeKind, embedded::EmbeddedBackend,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Doc {
    id: String,
    n: u32,
}

crate::document!(Doc in "docs", resident);

/// What the next write does.
const PASS: u8 = 0;
/// It happens, and the caller hears the connection broke.
const MADE_THEN_LOST: u8 = 1;
/// It does not happen, and the caller hears the connection broke.
const LOST: u8 = 2;

/// The embedded backend, with the next write's answer lost when armed.
struct Flaky {
    inner: EmbeddedBackend,
    next: AtomicU8,
    /// Entries of the change log written, to fail a log append.
    log_writes: Mutex<usize>,
}

impl Flaky {
    fn outcome(&self, made: Result<()>) -> Result<()> {
        match self.next.swap(PASS, Ordering::SeqCst) {
            PASS => made,
            _ => made.and(Err(Error::backend("write", "connection reset by peer"))),
        }
    }

    fn skip(&self) -> bool {
        self.next.load(Ordering::SeqCst) == LOST
    }
}

#[async_trait]
impl Backend for Flaky {
    async fn prepare(&self, collection: &str) -> Result<()> {
        self.inner.prepare(collection).await
    }
    async fn insert(&self, collection: &str, record: &RawRecord) -> Result<()> {
        if collection == crate::changelog::LOG_COLLECTION {
            *self.log_writes.lock().unwrap() += 1;
            return self.inner.insert(collection, record).await;
        }
        if self.skip() {
            return self.outcome(Ok(()));
        }
        let made = self.inner.insert(collection, record).await;
        self.outcome(made)
    }
    async fn get(&self, collection: &str, id: &str) -> Result<Option<RawRecord>> {
        self.inner.get(collection, id).await
    }
    async fn replace(
        &self,
        collection: &str,
        record: &RawRecord,
        status_in: &[String],
    ) -> Result<()> {
        if self.skip() {
            return self.outcome(Ok(()));
        }
        let made = self.inner.replace(collection, record, status_in).await;
        self.outcome(made)
    }
    async fn write_many(
        &self,
        collection: &str,
        records: &[RawRecord],
        durable: bool,
        since: Option<u64>,
    ) -> Result<()> {
        if collection == crate::changelog::LOG_COLLECTION {
            *self.log_writes.lock().unwrap() += 1;
        }
        self.inner
            .write_many(collection, records, durable, since)
            .await
    }
    async fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> Result<bool> {
        if self.skip() {
            self.outcome(Ok(()))?;
        }
        let made = self.inner.delete(collection, id, condition).await;
        match self.next.swap(PASS, Ordering::SeqCst) {
            PASS => made,
            _ => made.and(Err(Error::backend("delete", "connection reset by peer"))),
        }
    }
    async fn delete_many(&self, collection: &str, ids: &[String]) -> Result<()> {
        self.inner.delete_many(collection, ids).await
    }
    async fn list(&self, collection: &str, page: RawPage<'_>) -> Result<Vec<RawRecord>> {
        self.inner.list(collection, page).await
    }
    fn describe(&self) -> String {
        "flaky".to_owned()
    }
}

async fn flaky_store() -> (Store, Arc<Flaky>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let inner = EmbeddedBackend::open(&dir.path().join("store.redb"))
        .await
        .unwrap();
    let flaky = Arc::new(Flaky {
        inner,
        next: AtomicU8::new(PASS),
        log_writes: Mutex::new(0),
    });
    let store = Store::over(flaky.clone(), &OpenOptions::new("test"))
        .await
        .unwrap();
    (store, flaky, dir)
}

fn doc(id: &str, n: u32) -> Doc {
    Doc { id: id.into(), n }
}

#[tokio::test]
async fn a_write_made_but_unanswered_is_taken_as_made_with_a_sequence_of_its_own() {
    let (store, flaky, _dir) = flaky_store().await;
    let docs: Collection<Doc> = store.collection().await.unwrap();
    docs.insert(doc("x", 1)).await.unwrap();
    let mut feed = docs.watch();
    let (_, cursor, _) = docs.snapshot(async |_| Ok(())).await.unwrap();

    flaky.next.store(MADE_THEN_LOST, Ordering::SeqCst);
    let lost = docs.replace(doc("x", 2), &Precondition::revision(1)).await;
    assert!(lost.unwrap_err().is_transient());
    // The next write: its sequence is not the one the lost write took, and
    // the lost write is taken as made, logged and shown first.
    let y = docs.insert(doc("y", 1)).await.unwrap();
    let x = feed.recv().await.unwrap();
    assert_eq!(
        (x.kind, x.record.revision, x.record.value.n),
        (ChangeKind::Modified, 2, 2)
    );
    let next = feed.recv().await.unwrap();
    assert_eq!(next.record.value, y.value);
    assert!(next.seq > x.seq, "{} after {}", next.seq, x.seq);
    // A watcher that resumes from before the failure gets both, in order.
    let (changes, _) = docs.changes_since(cursor).await.unwrap();
    let seen: Vec<(String, u64)> = changes
        .iter()
        .map(|c| (c.record.value.id.clone(), c.seq))
        .collect();
    assert_eq!(seen, [("x".to_owned(), x.seq), ("y".to_owned(), next.seq)]);
    // The record is read and written at its real revision.
    assert_eq!(docs.require("x").await.unwrap().revision, 2);
    let modified = docs
        .modify("x", |d| {
            d.n = 3;
            Ok(true)
        })
        .await
        .unwrap();
    assert_eq!(modified.revision, 3);
}

#[tokio::test]
async fn a_write_not_made_and_unanswered_leaves_nothing_behind() {
    let (store, flaky, _dir) = flaky_store().await;
    let docs: Collection<Doc> = store.collection().await.unwrap();
    docs.insert(doc("x", 1)).await.unwrap();
    let mut feed = docs.watch();
    flaky.next.store(LOST, Ordering::SeqCst);
    assert!(
        docs.replace(doc("x", 2), &Precondition::revision(1))
            .await
            .unwrap_err()
            .is_transient()
    );
    // A read settles it: the record is as it was, and nothing was shown.
    assert_eq!(docs.require("x").await.unwrap().value.n, 1);
    assert!(feed.try_recv().is_err(), "a write not made is not shown");
    let modified = docs
        .modify("x", |d| {
            d.n = 5;
            Ok(true)
        })
        .await
        .unwrap();
    assert_eq!((modified.revision, modified.value.n), (2, 5));
    assert_eq!(feed.recv().await.unwrap().record.value.n, 5);
}

#[tokio::test]
async fn a_deletion_made_but_unanswered_is_shown() {
    let (store, flaky, _dir) = flaky_store().await;
    let docs: Collection<Doc> = store.collection().await.unwrap();
    docs.insert(doc("x", 1)).await.unwrap();
    let mut feed = docs.watch();
    flaky.next.store(MADE_THEN_LOST, Ordering::SeqCst);
    assert!(
        docs.delete("x", &Precondition::none())
            .await
            .unwrap_err()
            .is_transient()
    );
    assert!(docs.get("x").await.unwrap().is_none());
    let gone = feed.recv().await.unwrap();
    assert_eq!(
        (gone.kind, gone.record.value.id.as_str()),
        (ChangeKind::Deleted, "x")
    );
    assert!(
        *flaky.log_writes.lock().unwrap() >= 2,
        "the deletion is logged"
    );
}
