use super::*;
use crate::{
    model::ServicePhase,
    status::tests::{installation, status},
};

/// A store of its own in a temp dir (kept while the dir lives).
pub(crate) async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let location = format!("embedded:{}/store.redb", dir.path().display())
        .parse()
        .unwrap();
    let store = Store::open(&location, &addons_store::OpenOptions::new("test"))
        .await
        .unwrap();
    (store, dir)
}

fn on(node: &str, phase: ServicePhase) -> ServiceStatus {
    ServiceStatus {
        node_id: node.into(),
        ..status("api", phase)
    }
}

#[tokio::test]
async fn a_write_stores_only_the_nodes_that_changed() {
    let (store, _dir) = store().await;
    let installations = Installations::open(&store).await.unwrap();
    let inserted = installations.insert(installation(&["api"])).await.unwrap();
    let id = inserted.value.id.clone();
    let nodes: Collection<NodeStatus> = store.collection().await.unwrap();
    let mut changes = nodes.watch();
    // Two nodes report.
    let both = installations
        .modify(&id, |i| {
            for node in ["n1", "n2"] {
                i.report_sequences.insert(node.into(), 1);
                crate::status::apply_report(i, node, vec![on(node, ServicePhase::Running)]);
            }
            Ok(true)
        })
        .await
        .unwrap();
    assert_eq!(both.value.services.len(), 2);
    assert_eq!(both.value.status, crate::model::InstallationStatus::Active);
    // A record read before that write is never shown with its
    // statuses: it is read again.
    let again = installations
        .whole(inserted.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.revision, again.value.services.len()), (2, 2));
    let stored = installations.records.require(&id).await.unwrap();
    assert!(
        stored.value.services.is_empty(),
        "the record holds no statuses"
    );
    assert_eq!(stored.value.changed.len(), 2, "it says what changed");
    assert_eq!(changes.recv().await.unwrap().record.value.node_id, "n1");
    assert_eq!(changes.recv().await.unwrap().record.value.node_id, "n2");
    // One node reports again: only its record is written.
    let after = installations
        .modify(&id, |i| {
            i.report_sequences.insert("n2".into(), 2);
            crate::status::apply_report(i, "n2", vec![on("n2", ServicePhase::Backoff)]);
            Ok(true)
        })
        .await
        .unwrap();
    assert_eq!(after.revision, 3);
    let next = changes.recv().await.unwrap().record;
    assert_eq!((next.value.node_id.as_str(), next.revision), ("n2", 2));
    assert!(changes.try_recv().is_err(), "n1 was not written again");
    let stored = installations.records.require(&id).await.unwrap();
    assert_eq!(stored.value.changed.len(), 1);
    assert_eq!(stored.value.changed[0].node_id, "n2");
    // A stale expected revision changes nothing.
    let stale = installations
        .modify_at(&id, Some(1), |_| Ok(true))
        .await
        .unwrap_err();
    assert!(matches!(stale, addons_store::Error::StaleRevision { .. }));
    // Reopened, the statuses come back whole, with their sequences.
    drop(installations);
    let reopened = Installations::open(&store).await.unwrap();
    let whole = reopened.require(&id).await.unwrap();
    assert_eq!(whole.value.services, after.value.services);
    assert_eq!(whole.value.report_sequences.get("n2"), Some(&2));
    assert_eq!(
        reopened.reported().len(),
        2,
        "presence is seeded from the records"
    );
    // Deleting the installation deletes its nodes' statuses.
    assert!(reopened.delete(&id, &Precondition::none()).await.unwrap());
    assert!(nodes.list_all(&Filter::default()).await.unwrap().is_empty());
    assert!(reopened.reported().is_empty());
}

#[tokio::test]
async fn statuses_kept_in_an_old_record_move_to_records_of_their_own() {
    let (store, _dir) = store().await;
    let records: Collection<Installation> = store.collection().await.unwrap();
    let mut old = installation(&["api"]);
    old.services = vec![on("n1", ServicePhase::Running)];
    old.report_sequences.insert("n1".into(), 7);
    let id = records.insert(old).await.unwrap().value.id;
    let installations = Installations::open(&store).await.unwrap();
    let stored = records.require(&id).await.unwrap();
    assert!(stored.value.services.is_empty() && stored.value.report_sequences.is_empty());
    let whole = installations.require(&id).await.unwrap();
    assert_eq!(whole.value.services.len(), 1);
    assert_eq!(whole.value.report_sequences.get("n1"), Some(&7));
}

#[tokio::test]
async fn a_batch_fails_each_change_alone() {
    let (store, _dir) = store().await;
    let installations = Installations::open(&store).await.unwrap();
    let a = installations.insert(installation(&["api"])).await.unwrap();
    let changes: Vec<(String, Option<u64>, Change<'_>)> = vec![
        (
            a.value.id.clone(),
            None,
            Box::new(|_: &mut Installation| Ok(true)),
        ),
        (
            "missing".into(),
            None,
            Box::new(|_: &mut Installation| Ok(true)),
        ),
        (
            a.value.id.clone(),
            Some(99),
            Box::new(|_: &mut Installation| Ok(true)),
        ),
        (
            a.value.id.clone(),
            None,
            Box::new(|_: &mut Installation| Ok(false)),
        ),
    ];
    let results = installations.modify_many(changes).await;
    assert_eq!(results[0].as_ref().unwrap().revision, 2);
    assert!(matches!(
        results[1],
        Err(addons_store::Error::NotFound { .. })
    ));
    assert!(matches!(
        results[2],
        Err(addons_store::Error::StaleRevision { .. })
    ));
    assert_eq!(results[3].as_ref().unwrap().revision, 2);
}

/// Node `n1`'s report number `sequence` on installation `id`: its one
/// service in `phase`.
async fn report_of_n1(
    installations: &Installations,
    id: &str,
    sequence: u64,
    phase: ServicePhase,
) -> Result<Versioned<Installation>, addons_store::Error> {
    installations
        .modify(id, |i| {
            i.report_sequences.insert("n1".into(), sequence);
            crate::status::apply_report(i, "n1", vec![on("n1", phase)]);
            Ok(true)
        })
        .await
}

/// Found by the fault campaign (seed 32): memory held a node's statuses
/// at a revision the store did not (the embedded store, opened again
/// after a full disk, had dropped the write that was not durable yet), so
/// every later report of that node was refused as a conflict until the
/// manager restarted. A refused write now reads the node's statuses again.
#[tokio::test]
async fn a_report_refused_because_memory_and_store_differ_is_taken_at_the_next_one() {
    let (store, _dir) = store().await;
    let installations = Installations::open(&store).await.unwrap();
    let id = installations
        .insert(installation(&["api"]))
        .await
        .unwrap()
        .value
        .id;
    let report = |sequence, phase| report_of_n1(&installations, &id, sequence, phase);
    report(1, ServicePhase::Running).await.unwrap();
    // The store loses the node's statuses behind memory's back.
    let nodes: Collection<NodeStatus> = store.collection().await.unwrap();
    assert!(
        nodes
            .delete(&status_id(&id, "n1"), &Precondition::none())
            .await
            .unwrap()
    );
    // The next report is refused, and the one after is taken.
    assert!(report(2, ServicePhase::Backoff).await.is_err());
    let taken = report(3, ServicePhase::Running).await.unwrap();
    assert_eq!(taken.value.services[0].phase, ServicePhase::Running);
    let stored = nodes.require(&status_id(&id, "n1")).await.unwrap();
    assert_eq!(stored.value.sequence, 3);
}

/// A 16 MiB tmpfs: a disk the test can fill. Unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs (needs root)");
        Self { path, _dir: dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Fills the filesystem of `disk` with the file `disk/fill`, until
/// nothing is left; [`unfill`] frees it.
fn fill(disk: &std::path::Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(disk.join("fill")).unwrap();
    let chunk = vec![0xa5_u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    while file.write_all(&chunk[..4096]).is_ok() {}
}

/// Frees what [`fill`] took.
fn unfill(disk: &std::path::Path) {
    std::fs::remove_file(disk.join("fill")).unwrap();
}

/// An embedded store on `disk` that tells `observer` of every operation,
/// its installations, and the id of one installed there.
async fn installed_on(
    disk: &SmallDisk,
    observer: Arc<dyn addons_store::Observer>,
) -> (Store, Installations, String) {
    let mut options = addons_store::OpenOptions::new("test");
    options.observer = Some(observer);
    let location = format!("embedded:{}/store.redb", disk.path.display())
        .parse()
        .unwrap();
    let store = Store::open(&location, &options).await.unwrap();
    let installations = Installations::open(&store).await.unwrap();
    let id = installations
        .insert(installation(&["api"]))
        .await
        .unwrap()
        .value
        .id;
    (store, installations, id)
}

/// Whether `operation` is the first write of several records to succeed
/// since `armed` was set; it disarms.
fn next_batch(
    armed: &std::sync::atomic::AtomicBool,
    operation: &str,
    outcome: Result<(), &addons_store::Error>,
) -> bool {
    operation == "write_many"
        && outcome.is_ok()
        && armed.swap(false, std::sync::atomic::Ordering::SeqCst)
}

/// Fills its disk once the next write of several records is made: the
/// node statuses of a report, written before their installation's.
#[derive(Debug)]
struct FillAfterNextBatch {
    disk: std::path::PathBuf,
    armed: std::sync::atomic::AtomicBool,
}

impl addons_store::Observer for FillAfterNextBatch {
    fn observe(
        &self,
        operation: &'static str,
        _elapsed: std::time::Duration,
        outcome: Result<(), &addons_store::Error>,
    ) {
        if !next_batch(&self.armed, operation, outcome) {
            return;
        }
        fill(&self.disk);
    }
}

/// Found by the fault campaign (seed 32): a report's node statuses were
/// written (not durable yet, to be made so by the installation's write
/// right after), the installation's write failed on the full disk, and
/// memory took the statuses anyway. The embedded store, opened again
/// after the failure, had dropped them: the installation was shown with
/// the report (a service given up), then, once memory read the store
/// again, without it (the service back in backoff). Memory now takes what
/// the store holds after a failed write.
#[tokio::test]
async fn a_report_whose_installation_write_failed_is_not_shown() {
    let disk = SmallDisk::mount();
    let filler = Arc::new(FillAfterNextBatch {
        disk: disk.path.clone(),
        armed: Default::default(),
    });
    let (_store, installations, id) = installed_on(&disk, filler.clone()).await;
    let report = |sequence, phase| report_of_n1(&installations, &id, sequence, phase);
    report(1, ServicePhase::Running).await.unwrap();
    filler
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(report(2, ServicePhase::Failed).await.is_err());
    assert!(
        !filler.armed.load(std::sync::atomic::Ordering::SeqCst),
        "the statuses were written before the disk filled"
    );
    unfill(&disk.path);
    let shown = installations.require(&id).await.unwrap();
    assert_eq!(shown.value.services[0].phase, ServicePhase::Running);
    // And the next report is taken at once.
    let taken = report(3, ServicePhase::Backoff).await.unwrap();
    assert_eq!(taken.value.services[0].phase, ServicePhase::Backoff);
}

/// Blocks the first write of several records after it is armed (a
/// report's node statuses), until the test lets it go on.
#[derive(Debug, Default)]
struct PauseAfterNextBatch {
    armed: std::sync::atomic::AtomicBool,
    reached: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    resume: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl addons_store::Observer for PauseAfterNextBatch {
    fn observe(
        &self,
        operation: &'static str,
        _elapsed: std::time::Duration,
        outcome: Result<(), &addons_store::Error>,
    ) {
        if !next_batch(&self.armed, operation, outcome) {
            return;
        }
        if let Some(reached) = self.reached.lock().unwrap().take() {
            let _ = reached.send(());
        }
        if let Some(resume) = self.resume.lock().unwrap().take() {
            let _ = resume.recv();
        }
    }
}

/// Found by the fault campaign (seed 32): a report's node statuses were
/// written, not durable yet, to be made durable by the installation's
/// write right after. In between, another write failed on the full disk
/// and the embedded store was opened again, which dropped the statuses;
/// the installation's write then went through in the new opening, and
/// memory and watchers took the report (a service given up) that the
/// store did not have. The next report of the node was refused as a
/// conflict, memory read the store again, and the service went back to
/// backoff. The installation's write is now made in the same opening of
/// the database as the statuses, or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_whose_statuses_another_writers_failure_dropped_is_not_shown() {
    let disk = SmallDisk::mount();
    let pause = Arc::new(PauseAfterNextBatch::default());
    let (store, installations, id) = installed_on(&disk, pause.clone()).await;
    let installations = Arc::new(installations);
    report_of_n1(&installations, &id, 1, ServicePhase::Running)
        .await
        .unwrap();

    let statuses: Collection<NodeStatus> = store.collection().await.unwrap();
    let (reached, at_pause) = tokio::sync::oneshot::channel();
    let (resume, paused) = std::sync::mpsc::channel();
    *pause.reached.lock().unwrap() = Some(reached);
    *pause.resume.lock().unwrap() = Some(paused);
    pause.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    // The disk is full; a write not durable yet still goes through.
    fill(&disk.path);
    let report = tokio::spawn({
        let (installations, id) = (installations.clone(), id.clone());
        async move { report_of_n1(&installations, &id, 2, ServicePhase::Failed).await }
    });
    at_pause.await.unwrap();
    // The statuses are written; another writer's write fails on the full
    // disk, and the store is opened again, which drops them.
    let large = NodeStatus {
        id: "other/n9".into(),
        installation_id: "other".into(),
        node_id: "n9".into(),
        services: vec![ServiceStatus {
            reason: "x".repeat(1 << 20),
            ..on("n9", ServicePhase::Running)
        }],
        sequence: 1,
    };
    let epoch = statuses.epoch();
    assert!(statuses.insert(large).await.is_err());
    assert_ne!(statuses.epoch(), epoch, "opened again");
    unfill(&disk.path);
    resume.send(()).unwrap();

    let reported = report.await.unwrap();
    assert!(reported.is_err(), "taken: {reported:?}");
    let shown = installations.require(&id).await.unwrap();
    let stored = statuses
        .require(&status_id(&id, "n1"))
        .await
        .unwrap()
        .value
        .services;
    assert_eq!(stored[0].phase, ServicePhase::Running);
    assert_eq!(
        shown.value.services[0].phase,
        ServicePhase::Running,
        "shown a report the store dropped"
    );
    // The monitor sends it again, and it is taken at once.
    let taken = report_of_n1(&installations, &id, 2, ServicePhase::Failed)
        .await
        .unwrap();
    assert_eq!(taken.value.services[0].phase, ServicePhase::Failed);
}
