//! Short fault campaigns (see `integration_tests::chaos`): one with a fixed
//! seed, so a change that breaks it breaks it every time, and one with a
//! seed of the moment, printed, so CI keeps trying new interleavings. They
//! take minutes and the whole machine, so they are `#[ignore]`d in the
//! ordinary run and `scripts/test.sh` runs them on their own, one at a time.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use integration_tests::chaos::{Options, run};

async fn campaign(seed: u64, bridge: &str, prefix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join(format!("{seed}.jsonl"));
    let duration = std::env::var("ADDONS_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(120), Duration::from_secs);
    println!(
        "chaos: seed {seed} (replay: scripts/chaos.sh --seed {seed} --duration {}s)",
        duration.as_secs()
    );
    let report = run(Options {
        seed,
        duration,
        nodes: 3,
        store: None,
        history: history.clone(),
        settle: Duration::from_secs(150),
        bridge: (bridge.into(), prefix.into()),
    })
    .await;
    println!("{}", report.summary());
    if !report.violations.is_empty() || report.converged_after.is_none() {
        // Keep what explains it where CI keeps the target directory.
        let kept = integration_tests::workspace_root().join("target/chaos");
        let _ = std::fs::create_dir_all(&kept);
        let _ = std::fs::copy(&history, kept.join(format!("{seed}.jsonl")));
        let logs = history.with_extension("logs");
        if let Ok(entries) = std::fs::read_dir(&logs) {
            let into = kept.join(format!("{seed}.logs"));
            let _ = std::fs::create_dir_all(&into);
            for entry in entries.flatten() {
                let _ = std::fs::copy(entry.path(), into.join(entry.file_name()));
            }
        }
        panic!("seed {seed}: the campaign found violations (history and logs in target/chaos)");
    }
    assert!(
        report.fault_count() >= duration.as_secs() / 6,
        "too few faults: {}",
        report.summary()
    );
    assert!(
        report.operation_count() >= duration.as_secs() / 2,
        "too few operations: {}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: scripts/test.sh runs it on its own"]
async fn a_campaign_with_a_fixed_seed_keeps_every_invariant() {
    campaign(20_261_206, "chaosf", "10.96.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: scripts/test.sh runs it on its own"]
async fn a_campaign_with_a_new_seed_keeps_every_invariant() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007;
    campaign(seed, "chaosr", "10.97.1").await;
}
