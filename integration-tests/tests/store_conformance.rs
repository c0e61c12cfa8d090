//! The storage conformance suite: the same guarantees, checked against the
//! embedded store and against a MongoDB-wire server (a private nx-27017, or
//! the real MongoDB that `MONGODB_URI` names).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{collections::BTreeMap, sync::Arc};

use addons_store::{
    ChangeKind, Document, Error, Filter, Location, OpenOptions, Precondition, Store,
};
use integration_tests::MongoServer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    id: String,
    name: String,
    unique: bool,
    status: String,
    counter: u32,
    labels: BTreeMap<String, String>,
}

impl Document for Item {
    const COLLECTION: &'static str = "items";

    fn id(&self) -> &str {
        &self.id
    }

    fn unique_key(&self) -> Option<String> {
        self.unique.then(|| self.name.clone())
    }

    fn status(&self) -> String {
        self.status.clone()
    }
}

/// The same record type, kept resident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Cached(Item);

impl Document for Cached {
    const COLLECTION: &'static str = "cached_items";
    const RESIDENT: bool = true;

    fn id(&self) -> &str {
        &self.0.id
    }

    fn unique_key(&self) -> Option<String> {
        self.0.unique_key()
    }

    fn status(&self) -> String {
        self.0.status.clone()
    }
}

fn item(name: &str, status: &str) -> Item {
    Item {
        id: addons_store::new_id(),
        name: name.to_owned(),
        unique: true,
        status: status.to_owned(),
        counter: 0,
        // Keys that MongoDB-compatible servers treat specially as field names.
        labels: BTreeMap::from([
            (
                "oakestra.io/core-component".to_owned(),
                "scheduler".to_owned(),
            ),
            ("$weird".to_owned(), "value".to_owned()),
        ]),
    }
}

async fn open(location: &str) -> Store {
    let location: Location = location.parse().expect("valid location");
    Store::open(&location, &OpenOptions::new("conformance"))
        .await
        .expect("open store")
}

async fn round_trips_records(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let stored = items.insert(item("alpha", "new")).await.unwrap();
    assert_eq!(stored.revision, 1);
    let read = items.require(&stored.value.id).await.unwrap();
    assert_eq!(read, stored);
    assert_eq!(items.get("no-such-id").await.unwrap(), None);
    assert!(matches!(
        items.require("no-such-id").await,
        Err(Error::NotFound { .. })
    ));
}

async fn enforces_unique_keys(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let first = items.insert(item("taken", "new")).await.unwrap();
    assert!(matches!(
        items.insert(item("taken", "new")).await,
        Err(Error::AlreadyExists { key, .. }) if key == "taken"
    ));
    // Same id, other name: the id is unique too.
    let mut same_id = item("other", "new");
    same_id.id = first.value.id.clone();
    assert!(matches!(
        items.insert(same_id).await,
        Err(Error::AlreadyExists { .. })
    ));
    // Records without a unique key do not collide.
    let mut free = item("taken", "new");
    free.unique = false;
    let free = items.insert(free).await.unwrap();
    // Taking a held key by an update fails and changes nothing.
    let mut grab = free.value.clone();
    grab.unique = true;
    grab.counter = 99;
    assert!(matches!(
        items.replace(grab, &Precondition::revision(1)).await,
        Err(Error::AlreadyExists { .. })
    ));
    assert_eq!(items.require(&free.value.id).await.unwrap(), free);
    // Releasing the key lets another record take it.
    let mut release = first.value.clone();
    release.unique = false;
    items
        .replace(release, &Precondition::revision(1))
        .await
        .unwrap();
    items.insert(item("taken", "new")).await.unwrap();
    // Deleting frees a key as well.
    let gone = items.insert(item("short-lived", "new")).await.unwrap();
    assert!(
        items
            .delete(&gone.value.id, &Precondition::none())
            .await
            .unwrap()
    );
    items.insert(item("short-lived", "new")).await.unwrap();
}

async fn one_of_two_concurrent_writers_wins(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let base = items.insert(item("contested", "new")).await.unwrap();
    let writers = (0..2).map(|n| {
        let items = items.clone();
        let mut value = base.value.clone();
        value.counter = 100 + n;
        tokio::spawn(async move { items.replace(value, &Precondition::revision(1)).await })
    });
    let results: Vec<_> = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(|joined| joined.expect("writer task"))
        .collect();
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one writer wins: {results:?}");
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(Error::Conflict { .. }))),
        "the loser sees a conflict: {results:?}"
    );
    let stored = items.require(&base.value.id).await.unwrap();
    assert_eq!(stored.revision, 2);
    assert_eq!(stored.value.counter, winners[0].value.counter);

    // A stale revision changes nothing.
    let mut stale = base.value.clone();
    stale.counter = 7;
    assert!(matches!(
        items.replace(stale, &Precondition::revision(1)).await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(items.require(&base.value.id).await.unwrap(), stored);
}

async fn read_modify_write_loses_no_update(store: &Store) {
    let items = Arc::new(store.collection::<Item>().await.unwrap());
    let base = items.insert(item("counter", "new")).await.unwrap();
    let id = base.value.id.clone();
    let tasks = (0..6).map(|_| {
        let items = items.clone();
        let id = id.clone();
        tokio::spawn(async move {
            for _ in 0..4 {
                items
                    .modify(&id, |item| {
                        item.counter += 1;
                        Ok(true)
                    })
                    .await
                    .expect("modify");
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.expect("incrementing task");
    }
    let stored = items.require(&id).await.unwrap();
    assert_eq!(stored.value.counter, 24);
    assert_eq!(stored.revision, 25);
}

/// A change or delete that expects another revision than the record has
/// is refused with the current revision and writes nothing.
async fn refuses_stale_revisions(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let stored = items.insert(item("revised", "new")).await.unwrap();
    let bump = |item: &mut Item| {
        item.counter += 1;
        Ok(true)
    };
    let stale = items.modify_at(&stored.value.id, Some(7), bump).await;
    assert!(
        matches!(
            stale,
            Err(Error::StaleRevision {
                current: 1,
                expected: 7,
                ..
            })
        ),
        "{stale:?}"
    );
    let changed = items
        .modify_at(&stored.value.id, Some(1), bump)
        .await
        .unwrap();
    assert_eq!((changed.revision, changed.value.counter), (2, 1));
    let stale = items.delete_at(&stored.value.id, Some(1)).await;
    assert!(
        matches!(
            stale,
            Err(Error::StaleRevision {
                current: 2,
                expected: 1,
                ..
            })
        ),
        "{stale:?}"
    );
    assert_eq!(items.require(&stored.value.id).await.unwrap(), changed);
    assert!(items.delete_at(&stored.value.id, Some(2)).await.unwrap());
    assert!(!items.delete_at(&stored.value.id, None).await.unwrap());
}

async fn transitions_status_atomically(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let base = items.insert(item("lifecycle", "installing")).await.unwrap();
    let mut next = base.value.clone();
    next.status = "disabled".into();
    assert!(matches!(
        items
            .replace(next.clone(), &Precondition::status_in(["active"]))
            .await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(items.require(&base.value.id).await.unwrap(), base);
    let moved = items
        .replace(next, &Precondition::status_in(["installing", "active"]))
        .await
        .unwrap();
    assert_eq!(moved.revision, 2);
    assert_eq!(moved.value.status, "disabled");
    // Conditional deletes: wrong status or stale revision keep the record.
    assert!(matches!(
        items
            .delete(&base.value.id, &Precondition::status_in(["active"]))
            .await,
        Err(Error::Conflict { .. })
    ));
    assert!(matches!(
        items
            .delete(&base.value.id, &Precondition::revision(1))
            .await,
        Err(Error::Conflict { .. })
    ));
    assert!(
        items
            .delete(&base.value.id, &Precondition::status_in(["disabled"]))
            .await
            .unwrap()
    );
    assert!(
        !items
            .delete(&base.value.id, &Precondition::none())
            .await
            .unwrap()
    );
    let mut ghost = base.value.clone();
    ghost.counter = 1;
    assert!(matches!(
        items.replace(ghost, &Precondition::none()).await,
        Err(Error::NotFound { .. })
    ));
}

async fn pages_through_filtered_listings(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let mut expected = Vec::new();
    for n in 0..23 {
        let status = if n % 3 == 0 { "skip" } else { "keep" };
        let stored = items
            .insert(item(&format!("item-{n:02}"), status))
            .await
            .unwrap();
        if status == "keep" {
            expected.push(stored.value.id);
        }
    }
    let filter = Filter {
        statuses: vec!["keep".into()],
        ..Filter::default()
    };
    let mut seen = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let page = items.list(&filter, 4, token.as_deref()).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 4);
        seen.extend(page.items.into_iter().map(|r| r.value.id));
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, expected, "every matching record once, in id order");
    assert_eq!(pages, expected.len().div_ceil(4));

    // Tokens stay valid while records come and go between pages.
    let first = items.list(&filter, 5, None).await.unwrap();
    let deleted = &first.items[1].value.id;
    items.delete(deleted, &Precondition::none()).await.unwrap();
    let added = items.insert(item("late", "keep")).await.unwrap();
    let rest = items
        .list_all_after(&filter, first.next_page_token.as_deref())
        .await;
    let mut after: Vec<_> = first.items.iter().map(|r| r.value.id.clone()).collect();
    after.extend(rest);
    let mut want: Vec<_> = expected
        .iter()
        .filter(|id| *id != deleted)
        .cloned()
        .collect();
    want.insert(1, deleted.clone());
    want.push(added.value.id.clone());
    assert_eq!(after, want, "no record skipped or repeated across pages");

    let by_name = Filter {
        unique_key: Some("item-05".into()),
        ..Filter::default()
    };
    let found = items.list(&by_name, 10, None).await.unwrap();
    assert_eq!(found.items.len(), 1);
    assert_eq!(found.items[0].value.name, "item-05");
    let by_prefix = Filter {
        unique_key_prefix: Some("item-0".into()),
        ..Filter::default()
    };
    let found: Vec<String> = items
        .list(&by_prefix, 100, None)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|r| r.value.name)
        .collect();
    let mut want: Vec<String> = items
        .list_all(&Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.value.name)
        .filter(|n| n.starts_with("item-0"))
        .collect();
    want.sort();
    let mut found = found;
    found.sort();
    assert!(
        (1..=10).contains(&found.len()),
        "item-00 to item-09, less any deleted: {found:?}"
    );
    assert_eq!(found, want, "exactly the keys with the prefix");
    assert!(matches!(
        items.list(&filter, 4, Some("garbage")).await,
        Err(Error::InvalidPageToken)
    ));
}

async fn feeds_changes_to_watchers(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let mut changes = items.watch();
    let stored = items.insert(item("watched", "new")).await.unwrap();
    let mut next = stored.value.clone();
    next.counter = 1;
    items
        .replace(next, &Precondition::revision(1))
        .await
        .unwrap();
    items
        .delete(&stored.value.id, &Precondition::none())
        .await
        .unwrap();
    let kinds: Vec<_> = [
        changes.recv().await.unwrap(),
        changes.recv().await.unwrap(),
        changes.recv().await.unwrap(),
    ]
    .into_iter()
    .map(|c| (c.kind, c.record.revision))
    .collect();
    assert_eq!(
        kinds,
        [
            (ChangeKind::Added, 1),
            (ChangeKind::Modified, 2),
            (ChangeKind::Deleted, 2)
        ]
    );
}

/// A watcher that stops at a cursor and resumes from it receives exactly
/// the changes after it, in order, and nothing else; a cursor beyond the
/// log is refused.
async fn resumes_changes_from_a_cursor(store: &Store) {
    let items = store.collection::<Item>().await.unwrap();
    let first = items.insert(item("first", "new")).await.unwrap();
    let (changes, _) = items.changes_since(0).await.unwrap();
    let cursor = changes.last().unwrap().seq;
    // Three changes the watcher misses.
    let second = items.insert(item("second", "new")).await.unwrap();
    let mut next = first.value.clone();
    next.counter = 7;
    items
        .replace(next, &Precondition::revision(1))
        .await
        .unwrap();
    items
        .delete(&second.value.id, &Precondition::none())
        .await
        .unwrap();
    let (missed, _) = items.changes_since(cursor).await.unwrap();
    let seen: Vec<_> = missed
        .iter()
        .map(|c| (c.kind, c.record.value.name.clone(), c.record.revision))
        .collect();
    assert_eq!(
        seen,
        [
            (ChangeKind::Added, "second".to_owned(), 1),
            (ChangeKind::Modified, "first".to_owned(), 2),
            (ChangeKind::Deleted, "second".to_owned(), 1),
        ]
    );
    assert!(missed.windows(2).all(|w| w[0].seq < w[1].seq));
    let head = missed.last().unwrap().seq;
    assert!(items.changes_since(head).await.unwrap().0.is_empty());
    assert!(matches!(
        items.changes_since(head + 10).await,
        Err(Error::CursorOutOfRange { .. })
    ));
}

/// The log keeps the newest 4096 changes: past that it drops the oldest
/// (in one step), a cursor among them is refused, and a newer one resumes.
async fn prunes_the_oldest_changes(store: &Store) {
    use addons_store::Versioned;
    let items = store.collection::<Item>().await.unwrap();
    for _ in 0..11 {
        let chunk = (0..400)
            .map(|n| Versioned {
                revision: 1,
                value: item(&format!("item-{n}"), "new"),
            })
            .map(|mut record| {
                record.value.unique = false;
                record
            })
            .collect();
        items.write_many(chunk).await.unwrap();
    }
    assert!(matches!(
        items.changes_since(0).await,
        Err(Error::CursorOutOfRange { .. })
    ));
    let (last, _) = items.changes_since(4400 - 10).await.unwrap();
    let head = last.last().unwrap().seq;
    let (kept, _) = items.changes_since(head - 4000).await.unwrap();
    assert_eq!(kept.len(), 4000);
    assert!(kept.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    assert!(matches!(
        items.changes_since(head - 4400).await,
        Err(Error::CursorOutOfRange { .. })
    ));
}

async fn writes_many_records_all_or_none(store: &Store) {
    use addons_store::Versioned;
    let items = store.collection::<Item>().await.unwrap();
    let existing = items.insert(item("existing", "new")).await.unwrap();
    let (before, _) = items.changes_since(0).await.unwrap();
    let cursor = before.last().unwrap().seq;
    let mut changed = existing.value.clone();
    changed.counter = 1;
    let fresh = item("fresh", "new");
    let written = items
        .write_many(vec![
            Versioned {
                revision: 1,
                value: fresh.clone(),
            },
            Versioned {
                revision: 2,
                value: changed.clone(),
            },
        ])
        .await
        .unwrap();
    assert_eq!(written.len(), 2);
    assert_eq!(items.require(&fresh.id).await.unwrap().revision, 1);
    let read = items.require(&changed.id).await.unwrap();
    assert_eq!((read.revision, read.value.counter), (2, 1));
    let (logged, _) = items.changes_since(cursor).await.unwrap();
    let kinds: Vec<_> = logged
        .iter()
        .map(|c| (c.kind, c.record.value.name.clone(), c.record.revision))
        .collect();
    assert_eq!(
        kinds,
        [
            (ChangeKind::Added, "fresh".to_owned(), 1),
            (ChangeKind::Modified, "existing".to_owned(), 2),
        ]
    );
    // One stale write: none of the batch happens, not even the new record.
    let other = item("other", "new");
    let mut stale = changed.clone();
    stale.counter = 9;
    let err = items
        .write_many(vec![
            Versioned {
                revision: 1,
                value: other.clone(),
            },
            Versioned {
                revision: 2,
                value: stale,
            },
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert_eq!(items.get(&other.id).await.unwrap(), None);
    assert_eq!(items.require(&changed.id).await.unwrap().value.counter, 1);
    // A record that exists is not created again.
    let err = items
        .write_many(vec![Versioned {
            revision: 1,
            value: fresh,
        }])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let (after, _) = items.changes_since(cursor).await.unwrap();
    assert_eq!(after.len(), 2, "failed batches log nothing");
}

async fn resident_collections_read_their_writes(store: &Store) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cached = store.collection::<Cached>().await.unwrap();
    let first = cached.insert(Cached(item("first", "new"))).await.unwrap();
    cached.insert(Cached(item("second", "old"))).await.unwrap();
    // Another handle of the same store shares the memory.
    let other = store.collection::<Cached>().await.unwrap();
    assert_eq!(
        other.get(&first.value.0.id).await.unwrap(),
        Some(first.clone())
    );
    let made = AtomicUsize::new(0);
    let view = |record: &addons_store::Versioned<Arc<Cached>>| {
        made.fetch_add(1, Ordering::SeqCst);
        format!("{}@{}", record.value.0.name, record.revision)
    };
    let id = first.value.0.id.clone();
    for _ in 0..3 {
        let shown = other.get_view(&id, view).await.unwrap().unwrap();
        assert_eq!(*shown, "first@1");
    }
    assert_eq!(
        made.load(Ordering::SeqCst),
        1,
        "a view is made once per revision"
    );
    let mut next = first.value.clone();
    next.0.name = "renamed".into();
    cached
        .replace(next, &Precondition::revision(1))
        .await
        .unwrap();
    let shown = other.get_view(&id, view).await.unwrap().unwrap();
    assert_eq!(*shown, "renamed@2", "a write is seen at once");
    let filter = Filter {
        statuses: vec!["new".into()],
        ..Filter::default()
    };
    let (views, next_page) = other.list_views(&filter, 10, None, view).await.unwrap();
    assert_eq!(
        views.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        ["renamed@2"]
    );
    assert!(next_page.is_none());
    let (page, token) = other
        .list_views(&Filter::default(), 1, None, view)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    let (rest, _) = other
        .list_views(&Filter::default(), 1, token.as_deref(), view)
        .await
        .unwrap();
    assert_eq!(*rest[0], "second@1");
    cached.delete(&id, &Precondition::none()).await.unwrap();
    assert!(other.get_view(&id, view).await.unwrap().is_none());
    assert_eq!(other.list_all(&Filter::default()).await.unwrap().len(), 1);
    // A store opened again loads what is stored.
    drop((cached, other));
}

trait ListAllAfter {
    async fn list_all_after(&self, filter: &Filter, token: Option<&str>) -> Vec<String>;
}

impl ListAllAfter for addons_store::Collection<Item> {
    async fn list_all_after(&self, filter: &Filter, token: Option<&str>) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token = token.map(str::to_owned);
        while let Some(current) = token {
            let page = self.list(filter, 5, Some(&current)).await.unwrap();
            ids.extend(page.items.into_iter().map(|r| r.value.id));
            token = page.next_page_token;
        }
        ids
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::open(&format!("embedded:{}/store.redb", dir.path().display())).await;
                    super::$case(&store).await;
                }
            )*
        }
        mod mongodb {
            $(
                #[tokio::test]
                async fn $case() {
                    let server = super::MongoServer::start(stringify!($case)).await;
                    let store = super::open(&server.uri()).await;
                    super::$case(&store).await;
                }
            )*
        }
    };
}

conformance!(
    round_trips_records,
    enforces_unique_keys,
    one_of_two_concurrent_writers_wins,
    read_modify_write_loses_no_update,
    transitions_status_atomically,
    pages_through_filtered_listings,
    feeds_changes_to_watchers,
    resumes_changes_from_a_cursor,
    refuses_stale_revisions,
    writes_many_records_all_or_none,
    prunes_the_oldest_changes,
    resident_collections_read_their_writes,
);

/// The change log and its sequence survive reopening the store: a cursor
/// taken before resumes after.
#[tokio::test]
async fn embedded_change_log_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let location = format!("embedded:{}/store.redb", dir.path().display());
    let store = open(&location).await;
    let items = store.collection::<Item>().await.unwrap();
    items.insert(item("before", "new")).await.unwrap();
    let (changes, _) = items.changes_since(0).await.unwrap();
    let cursor = changes.last().unwrap().seq;
    drop(items);
    drop(store);
    let store = open(&location).await;
    let items = store.collection::<Item>().await.unwrap();
    let after = items.insert(item("after", "new")).await.unwrap();
    let (missed, _) = items.changes_since(cursor).await.unwrap();
    assert_eq!(missed.len(), 1);
    assert_eq!(missed[0].record, after);
    assert!(missed[0].seq > cursor);
}

/// Data written before a restart of the process is there after it.
#[tokio::test]
async fn embedded_data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let location = format!("embedded:{}/store.redb", dir.path().display());
    let store = open(&location).await;
    let items = store.collection::<Item>().await.unwrap();
    let stored = items.insert(item("durable", "new")).await.unwrap();
    drop(items);
    drop(store);
    let reopened = open(&location).await;
    let items = reopened.collection::<Item>().await.unwrap();
    assert_eq!(items.require(&stored.value.id).await.unwrap(), stored);
}

/// A second process cannot open an embedded store that one holds.
#[tokio::test]
async fn embedded_store_is_held_by_one_opener() {
    let dir = tempfile::tempdir().unwrap();
    let location: Location = format!("embedded:{}/store.redb", dir.path().display())
        .parse()
        .unwrap();
    let _held = Store::open(&location, &OpenOptions::new("x"))
        .await
        .unwrap();
    let err = Store::open(&location, &OpenOptions::new("x"))
        .await
        .expect_err("second open must fail");
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
}

/// Data written before the database server restarts is there after it.
#[tokio::test]
async fn mongodb_data_survives_a_server_restart() {
    let mut server = MongoServer::start("restart").await;
    let store = open(&server.uri()).await;
    let items = store.collection::<Item>().await.unwrap();
    let stored = items.insert(item("durable", "new")).await.unwrap();
    drop(items);
    drop(store);
    server.restart().await;
    let store = open(&server.uri()).await;
    let items = store.collection::<Item>().await.unwrap();
    assert_eq!(items.require(&stored.value.id).await.unwrap(), stored);
    // Unique keys still hold after the restart.
    assert!(matches!(
        items.insert(item("durable", "new")).await,
        Err(Error::AlreadyExists { .. })
    ));
}

/// A 16 MiB tmpfs, a disk that can be filled; unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// The disk, and its path.
    fn mount() -> (Self, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        integration_tests::hosts::mount_tmpfs(&disk, 16);
        let path = disk.clone();
        (Self { path, _dir: dir }, disk)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Found by the fault campaign (seed 32): once a write failed on a full
/// disk, redb refused every later operation ("Previous I/O error
/// occurred") until the database was opened again, so the manager could
/// write nothing more until it was restarted. The store now opens it again
/// itself, and writes once the disk has room.
#[tokio::test]
async fn the_embedded_store_writes_again_once_its_full_disk_has_room() {
    let (_disk, disk) = SmallDisk::mount();
    let store = open(&format!("embedded:{}/store.redb", disk.display())).await;
    let items = store.collection::<Item>().await.unwrap();
    items.insert(item("before", "new")).await.unwrap();
    integration_tests::chaos::cluster::fill(&disk);
    // A record larger than whatever room redb kept fails on the full disk.
    let mut large = item("large", "new");
    large.labels.insert("bulk".into(), "x".repeat(1 << 20));
    let failed = items.insert(large.clone()).await.unwrap_err();
    assert!(failed.is_transient(), "{failed}");
    integration_tests::chaos::cluster::unfill(&disk);
    let stored = items
        .insert(large)
        .await
        .expect("the store writes again once the disk has room");
    assert_eq!(items.require(&stored.value.id).await.unwrap(), stored);
}

/// A resident collection whose records are written to be made durable by
/// the next write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Loose {
    id: String,
    n: u32,
}

impl Document for Loose {
    const COLLECTION: &'static str = "loose";
    const LOGGED: bool = false;
    const RESIDENT: bool = true;

    fn id(&self) -> &str {
        &self.id
    }
}

/// Record `a` of `loose` at `revision`, holding `n`.
fn loose_a(revision: u64, n: u32) -> addons_store::Versioned<Loose> {
    addons_store::Versioned {
        revision,
        value: Loose { id: "a".into(), n },
    }
}

/// Stores record `a` of `loose` (revision 1), writes it again made
/// durable only by the next write (revision 2), then fails a write of
/// `items` on the full disk, so that the store opens its database again.
/// Returns the first write and the epoch before the second.
async fn written_then_reopened(
    disk: &std::path::Path,
    loose: &addons_store::Collection<Loose>,
    items: &addons_store::Collection<Item>,
) -> (addons_store::Versioned<Loose>, addons_store::Epoch) {
    let first = loose.insert(loose_a(1, 1).value).await.unwrap();
    let epoch = loose.epoch();
    loose
        .write_many_with(vec![loose_a(2, 2)], addons_store::Durability::WithNext)
        .await
        .unwrap();
    integration_tests::chaos::cluster::fill(disk);
    let mut large = item("large", "new");
    large.labels.insert("bulk".into(), "x".repeat(1 << 20));
    assert!(items.insert(large).await.is_err());
    integration_tests::chaos::cluster::unfill(disk);
    (first, epoch)
}

/// Found by the fault campaign (seed 32): the embedded store, opened again
/// after a write failed on a full disk, had dropped a write not yet
/// durable, while the memory of its resident collection still held it.
/// Memory is now read again when the database was opened again.
#[tokio::test]
async fn a_resident_collection_holds_what_the_store_kept_after_a_full_disk() {
    let (_disk, disk) = SmallDisk::mount();
    let store = open(&format!("embedded:{}/store.redb", disk.display())).await;
    let loose = store.collection::<Loose>().await.unwrap();
    let items = store.collection::<Item>().await.unwrap();
    // Written, to be made durable by the next write, which fails on the
    // full disk.
    let (first, _) = written_then_reopened(&disk, &loose, &items).await;
    // What the store kept is what the collection shows, and is written on.
    let kept = loose.require("a").await.unwrap();
    assert_eq!(kept, first, "memory holds a write the store dropped");
    let next = loose
        .modify("a", |l| {
            l.n = 3;
            Ok(true)
        })
        .await
        .unwrap();
    assert_eq!((next.revision, next.value.n), (2, 3));
}

/// Found by the fault campaign (seed 32): the manager writes a report's
/// node statuses not durable yet, to be made durable by the installation's
/// write right after. Another writer's write failed on the full disk in
/// between, and the embedded store, opened again, dropped the statuses;
/// the installation's write then succeeded in the new opening, and
/// watchers were shown a report the store did not have. A write made
/// `NowWith` the epoch of the writes it makes durable is now refused once
/// the database was opened again since.
#[tokio::test]
async fn a_write_that_makes_others_durable_is_refused_once_a_reopen_dropped_them() {
    let (_disk, disk) = SmallDisk::mount();
    let store = open(&format!("embedded:{}/store.redb", disk.display())).await;
    let loose = store.collection::<Loose>().await.unwrap();
    let items = store.collection::<Item>().await.unwrap();
    // Written, to be made durable by the next write; another write fails
    // on the full disk, and the database is opened again.
    let (first, epoch) = written_then_reopened(&disk, &loose, &items).await;
    assert_ne!(loose.epoch(), epoch, "opened again");
    // The write that was to make the first durable is refused, and
    // writes nothing.
    let b = item("b", "new");
    let refused = items
        .write_many_with(
            vec![addons_store::Versioned {
                revision: 1,
                value: b.clone(),
            }],
            addons_store::Durability::NowWith(epoch),
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(items.get(&b.id).await.unwrap(), None);
    assert_eq!(loose.require("a").await.unwrap(), first);
    // In the new opening, the same writes go through.
    let epoch = loose.epoch();
    let second = loose
        .write_many_with(vec![loose_a(2, 2)], addons_store::Durability::WithNext)
        .await
        .unwrap();
    items
        .write_many_with(
            vec![addons_store::Versioned {
                revision: 1,
                value: b,
            }],
            addons_store::Durability::NowWith(epoch),
        )
        .await
        .unwrap();
    assert_eq!(loose.require("a").await.unwrap(), second[0]);
}
