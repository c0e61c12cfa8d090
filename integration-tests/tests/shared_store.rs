//! One MongoDB store written by several processes at once (a standby
//! manager, marketplace replicas): each opening below is what one process
//! holds. The change log hands out one order, and every opening's watchers
//! and resident memory follow every opening's writes.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{collections::HashMap, time::Duration};

use addons_store::{
    ChangeKind, Document, Event, Filter, FollowEnd, Location, OpenOptions, Start, Store,
};
use integration_tests::{MongoServer, eventually};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    id: String,
    name: String,
    counter: u32,
}

addons_store::document!(Item in "items");

/// The same record type, kept resident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Cached {
    id: String,
    name: String,
    counter: u32,
}

addons_store::document!(Cached in "cached", resident; fn unique_key(&self) -> Option<String> {
    Some(self.name.clone())
});

fn item(name: &str) -> Item {
    Item {
        id: addons_store::new_id(),
        name: name.to_owned(),
        counter: 0,
    }
}

/// Two openings of one database, as two processes hold it.
async fn two_openings(test: &str) -> (MongoServer, Store, Store) {
    let server = MongoServer::start(test).await;
    let location: Location = server.uri().parse().unwrap();
    let options = OpenOptions::new("shared");
    let a = Store::open(&location, &options).await.unwrap();
    let b = Store::open(&location, &options).await.unwrap();
    (server, a, b)
}

/// Follows `T` from a snapshot into a channel until the test ends.
fn follow<T: Document>(collection: addons_store::Collection<T>) -> mpsc::Receiver<Event<T>> {
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        let end = collection
            .follow(
                Start::Snapshot,
                async |c| c.list_all(&Filter::default()).await,
                |_| true,
                |_| false,
                tx,
                std::future::pending(),
            )
            .await;
        assert!(matches!(end, Ok(FollowEnd::Stopped)), "{end:?}");
    });
    rx
}

#[tokio::test]
async fn two_writers_hand_out_one_order_and_each_reads_every_change() {
    let (_server, a, b) = two_openings("one_order").await;
    let (items_a, items_b) = (
        a.collection::<Item>().await.unwrap(),
        b.collection::<Item>().await.unwrap(),
    );
    let write = |items: addons_store::Collection<Item>, who: &'static str| async move {
        for n in 0..60 {
            let written = items.insert(item(&format!("{who}-{n}"))).await.unwrap();
            let mut next = written.value.clone();
            next.counter = 1;
            items
                .replace(next, &addons_store::Precondition::revision(1))
                .await
                .unwrap();
        }
    };
    tokio::join!(write(items_a.clone(), "a"), write(items_b.clone(), "b"));

    let (from_a, _) = items_a.changes_since(0).await.unwrap();
    let (from_b, _) = items_b.changes_since(0).await.unwrap();
    assert_eq!(from_a.len(), 240, "every change of both writers, once");
    let seqs: Vec<u64> = from_a.iter().map(|c| c.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one order: {seqs:?}");
    assert_eq!(
        seqs,
        from_b.iter().map(|c| c.seq).collect::<Vec<_>>(),
        "both read the same log"
    );
    // Each record's changes are in the order they were made.
    let mut last: HashMap<String, u64> = HashMap::new();
    for change in &from_a {
        let revision = last.entry(change.record.value.id.clone()).or_default();
        assert_eq!(change.record.revision, *revision + 1, "{change:?}");
        *revision = change.record.revision;
    }
}

#[tokio::test]
async fn a_watcher_on_one_opening_sees_the_others_writes_in_order() {
    let (_server, a, b) = two_openings("cross_watch").await;
    let items_b = b.collection::<Item>().await.unwrap();
    let mut watch = follow(a.collection::<Item>().await.unwrap());
    assert!(matches!(watch.recv().await, Some(Event::InSync(_))));
    let mut latencies = Vec::new();
    for n in 0..40 {
        let started = std::time::Instant::now();
        let written = items_b.insert(item(&format!("b-{n}"))).await.unwrap();
        let Some(Event::Change(change)) = watch.recv().await else {
            panic!("the follow ended")
        };
        latencies.push(started.elapsed());
        assert_eq!(
            (change.kind, &change.record),
            (ChangeKind::Added, &written),
            "B's write, as B made it"
        );
    }
    // How fast is for scripts/bench.sh to measure.
    latencies.sort();
    eprintln!("cross-opening watch latencies: {latencies:?}");
}

#[tokio::test]
async fn a_snapshot_taken_while_the_other_writes_repeats_nothing_and_misses_nothing() {
    let (_server, a, b) = two_openings("snapshot_race").await;
    let items_b = b.collection::<Item>().await.unwrap();
    let first = items_b.insert(item("busy")).await.unwrap();
    let writer = tokio::spawn({
        let items_b = items_b.clone();
        async move {
            let mut current = first;
            for _ in 0..150 {
                let mut next = current.value.clone();
                next.counter += 1;
                current = items_b
                    .replace(
                        next,
                        &addons_store::Precondition::revision(current.revision),
                    )
                    .await
                    .unwrap();
            }
            current
        }
    });
    let items_a = a.collection::<Item>().await.unwrap();
    // Start following while B is writing: the snapshot may reflect changes
    // the feed has not published yet.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut watch = follow(items_a);
    let last = writer.await.unwrap();
    let mut revision = 0;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.recv())
            .await
            .expect("the follower reaches B's last write")
            .unwrap();
        if let Event::Change(change) = event {
            assert!(
                change.record.revision > revision,
                "revision {} after {revision}: sent twice or out of order",
                change.record.revision
            );
            revision = change.record.revision;
            if revision == last.revision {
                assert_eq!(change.record, last);
                break;
            }
        }
    }
}

/// What `collection`'s memory holds of `id` (its counter) comes to be
/// `expected` (`None`: no record).
async fn memory_comes_to(
    what: &str,
    collection: &addons_store::Collection<Cached>,
    id: &str,
    expected: Option<u32>,
) {
    eventually(what, Duration::from_secs(5), || async {
        let held = collection.get(id).await.unwrap().map(|r| r.value.counter);
        if held == expected {
            Ok(())
        } else {
            Err(format!("{held:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn resident_memory_follows_the_other_openings_writes() {
    let (_server, a, b) = two_openings("resident").await;
    let (cached_a, cached_b) = (
        a.collection::<Cached>().await.unwrap(),
        b.collection::<Cached>().await.unwrap(),
    );
    let written = cached_b
        .insert(Cached {
            id: addons_store::new_id(),
            name: "one".to_owned(),
            counter: 0,
        })
        .await
        .unwrap();
    let id = written.value.id.clone();
    memory_comes_to("A's memory holds B's insert", &cached_a, &id, Some(0)).await;
    // Each write builds on the other opening's last one, though the
    // writer's memory may not have taken it in yet.
    for n in 1..=20 {
        let writer = if n % 2 == 0 { &cached_a } else { &cached_b };
        let done = writer
            .modify(&id, |record| {
                record.counter += 1;
                Ok(true)
            })
            .await
            .unwrap();
        assert_eq!(done.value.counter, n);
    }
    memory_comes_to("A's memory holds the last write", &cached_a, &id, Some(20)).await;
    memory_comes_to("B's memory holds the last write", &cached_b, &id, Some(20)).await;
    assert!(cached_a.delete(&id, &Default::default()).await.unwrap());
    memory_comes_to("B's memory takes in A's deletion", &cached_b, &id, None).await;
}

#[tokio::test]
async fn a_sequence_whose_writer_died_is_skipped_and_a_late_writer_logs_anew() {
    let (server, a, b) = two_openings("gap").await;
    let items_b = b.collection::<Item>().await.unwrap();
    let mut watch = follow(a.collection::<Item>().await.unwrap());
    assert!(matches!(watch.recv().await, Some(Event::InSync(_))));
    let before = items_b.insert(item("before-the-gap")).await.unwrap();
    let Some(Event::Change(change)) = watch.recv().await else {
        panic!("the follow ended")
    };
    assert_eq!(change.record, before);
    // A writer takes a sequence and dies before logging anything under it.
    let client = mongodb::Client::with_uri_str(server.uri()).await.unwrap();
    let database = client.default_database().unwrap();
    database
        .collection::<mongodb::bson::Document>("counters")
        .update_one(
            mongodb::bson::doc! { "_id": "changes" },
            mongodb::bson::doc! { "$inc": { "value": 1 } },
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let after_gap = items_b.insert(item("after-the-gap")).await.unwrap();
    let Some(Event::Change(change)) = tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await
        .unwrap()
    else {
        panic!("the follow ended")
    };
    assert_eq!(change.record, after_gap);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "published only once the missing sequence was given up on"
    );
    // A writer too slow for a reader: the sequence it takes next is
    // skipped before it logs its change, which it then logs under a new one.
    let counters = database.collection::<mongodb::bson::Document>("counters");
    let head = counters
        .find_one(mongodb::bson::doc! { "_id": "changes" })
        .await
        .unwrap()
        .unwrap();
    // Stored as 32 or 64 bits, as the server likes.
    let head = head
        .get_i64("value")
        .or_else(|_| head.get_i32("value").map(i64::from))
        .unwrap();
    let skipped = format!("{:020}", head + 1);
    database
        .collection::<mongodb::bson::Document>("changes")
        .insert_one(mongodb::bson::doc! {
            "_id": &skipped, "key": format!("i:{skipped}"), "status": "~skip",
            "revision": 1_i64, "seq": head + 1, "body": "null",
        })
        .await
        .unwrap();
    let late = items_b.insert(item("late")).await.unwrap();
    let Some(Event::Change(change)) = tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .unwrap()
    else {
        panic!("the follow ended")
    };
    assert_eq!(change.record, late);
    assert!(change.seq > u64::try_from(head + 1).unwrap(), "logged anew");
    // Nothing is published twice or lost after either.
    let next = items_b.insert(item("next")).await.unwrap();
    let Some(Event::Change(change)) = tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .unwrap()
    else {
        panic!("the follow ended")
    };
    assert_eq!(change.record, next);
    let (logged, _) = items_b.changes_since(0).await.unwrap();
    let names: Vec<&str> = logged
        .iter()
        .map(|c| c.record.value.name.as_str())
        .collect();
    assert_eq!(names, ["before-the-gap", "after-the-gap", "late", "next"]);
}

#[tokio::test]
async fn a_cursor_from_one_opening_resumes_on_the_other() {
    let (_server, a, b) = two_openings("cursor").await;
    let items_a = a.collection::<Item>().await.unwrap();
    items_a.insert(item("first")).await.unwrap();
    let (seen, _) = items_a.changes_since(0).await.unwrap();
    let cursor = seen.last().unwrap().seq;
    let second = items_a.insert(item("second")).await.unwrap();
    let third = items_a.insert(item("third")).await.unwrap();
    // B resumes A's watcher at once, whether or not its reader got there.
    let (tx, mut rx) = mpsc::channel(16);
    let items_b = b.collection::<Item>().await.unwrap();
    tokio::spawn(async move {
        items_b
            .follow(
                Start::After(cursor),
                async |_| unreachable!("no snapshot from a cursor"),
                |_| true,
                |_| false,
                tx,
                std::future::pending(),
            )
            .await
    });
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
        {
            Some(Event::Change(change)) => got.push(change.record),
            Some(Event::InSync(_)) => {}
            None => panic!("the follow ended"),
        }
    }
    assert_eq!(got, [second, third], "exactly what came after the cursor");
}
