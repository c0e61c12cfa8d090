use chrono::Utc;

use super::*;
use crate::status::{
    apply_report,
    tests::{installation, status},
};

/// An installation of version 1.0.0 running `service` on `nodes`.
fn running_on(nodes: &[&str]) -> Installation {
    let mut i = installation(&["web"]);
    for node in nodes {
        apply_report(&mut i, node, vec![status("web", ServicePhase::Running)]);
    }
    assert_eq!(i.status, InstallationStatus::Active);
    i
}

fn v110() -> NewRelease {
    let mut addon = installation(&["web"]).addon;
    addon.version = "1.1.0".into();
    NewRelease {
        marketplace_id: "m2".into(),
        addon,
        granted_privileges: Vec::new(),
        requested_by: "alice".into(),
        rollback_of: None,
    }
}

fn states(i: &Installation) -> Vec<(String, NodeState)> {
    i.rollout
        .as_ref()
        .map(|r| {
            r.nodes
                .iter()
                .map(|n| (n.node_id.clone(), n.state))
                .collect()
        })
        .unwrap_or_default()
}

fn recompute(i: &mut Installation) {
    crate::status::recompute(i);
}

#[test]
fn rolls_out_node_by_node_then_deploys() {
    let mut i = running_on(&["n2", "n1"]);
    let now = Utc::now();
    begin(&mut i, v110(), RolloutOptions::default(), now);
    recompute(&mut i);
    assert_eq!(i.release, 2);
    assert_eq!(i.addon.version, "1.1.0");
    assert_eq!(i.marketplace_id, "m2");
    assert_eq!(i.history.len(), 2, "release 1 seeded from the record");
    assert_eq!(i.history[0].outcome, ReleaseOutcome::Deployed);
    assert_eq!(i.history[1].outcome, ReleaseOutcome::InProgress);
    assert_eq!(i.history[1].requested_by, "alice");
    assert_eq!(
        states(&i),
        [
            ("n1".to_owned(), NodeState::Upgrading),
            ("n2".to_owned(), NodeState::Waiting)
        ]
    );
    assert_eq!(i.status, InstallationStatus::Upgrading);
    assert_eq!(targets(i.rollout.as_ref().unwrap()), ["n1"]);

    assert!(
        !on_verdict(&mut i, "n2", 2, &Verdict::Healthy, now),
        "not its turn"
    );
    assert!(
        !on_verdict(&mut i, "n1", 1, &Verdict::Healthy, now),
        "another release"
    );
    assert!(!on_verdict(&mut i, "n1", 2, &Verdict::Progressing, now));
    assert!(on_verdict(&mut i, "n1", 2, &Verdict::Healthy, now));
    assert_eq!(targets(i.rollout.as_ref().unwrap()), ["n1", "n2"]);
    assert!(!on_verdict(&mut i, "n1", 2, &Verdict::Healthy, now), "once");
    assert!(on_verdict(&mut i, "n2", 2, &Verdict::Healthy, now));
    recompute(&mut i);
    assert!(i.rollout.is_none());
    assert_eq!(i.history[0].outcome, ReleaseOutcome::Superseded);
    assert_eq!(i.history[1].outcome, ReleaseOutcome::Deployed);
    assert_eq!(i.status, InstallationStatus::Active);
}

#[test]
fn a_failed_node_rolls_everything_back() {
    let mut i = running_on(&["n1", "n2"]);
    let now = Utc::now();
    let options = RolloutOptions {
        max_parallel: 2,
        ..RolloutOptions::default()
    };
    begin(&mut i, v110(), options, now);
    assert_eq!(targets(i.rollout.as_ref().unwrap()), ["n1", "n2"]);
    assert!(on_verdict(&mut i, "n1", 2, &Verdict::Healthy, now));
    let failed = Verdict::Failed("web exited with code 3".into());
    assert!(on_verdict(&mut i, "n2", 2, &failed, now));
    recompute(&mut i);
    assert!(i.rollout.is_none());
    assert_eq!(i.release, 1);
    assert_eq!(i.addon.version, "1.0.0");
    assert_eq!(i.marketplace_id, "m1");
    assert_eq!(i.history[1].outcome, ReleaseOutcome::RolledBack);
    assert!(
        i.history[1].reason.contains("n2"),
        "{}",
        i.history[1].reason
    );
    assert_eq!(i.status, InstallationStatus::RolledBack);
    assert!(
        i.status_message.contains("web exited with code 3"),
        "{}",
        i.status_message
    );
    // Only while the release before runs everywhere.
    apply_report(&mut i, "n1", vec![status("web", ServicePhase::Backoff)]);
    assert_eq!(i.status, InstallationStatus::PartiallyActive);

    // The next upgrade gets a new number and clears the rollback.
    begin(&mut i, v110(), RolloutOptions::default(), now);
    assert_eq!(i.release, 3);
    assert!(i.rolled_back.is_none());
}

#[test]
fn a_node_past_its_deadline_fails_the_rollout() {
    let mut i = running_on(&["n1"]);
    let start = Utc::now();
    let options = RolloutOptions {
        progress_deadline: Duration::from_secs(60),
        ..RolloutOptions::default()
    };
    begin(&mut i, v110(), options, start);
    assert!(!on_tick(&mut i, start + chrono::Duration::seconds(59)));
    assert!(on_tick(&mut i, start + chrono::Duration::seconds(60)));
    assert_eq!(i.release, 1);
    assert!(
        i.rolled_back
            .as_deref()
            .unwrap()
            .contains("progress deadline"),
        "{:?}",
        i.rolled_back
    );
}

#[test]
fn without_nodes_the_release_is_deployed_at_once() {
    let mut i = installation(&["web"]);
    begin(&mut i, v110(), RolloutOptions::default(), Utc::now());
    assert!(i.rollout.is_none());
    assert_eq!(i.release, 2);
    assert_eq!(i.history[1].outcome, ReleaseOutcome::Deployed);
}

#[test]
fn disconnected_nodes_are_left_out() {
    let mut i = running_on(&["n1", "n2"]);
    crate::status::mark_disconnected(&mut i, "n2");
    begin(&mut i, v110(), RolloutOptions::default(), Utc::now());
    assert_eq!(states(&i), [("n1".to_owned(), NodeState::Upgrading)]);
}

#[test]
fn history_is_bounded_and_keeps_the_release_before() {
    let mut i = installation(&["web"]);
    for _ in 0..(MAX_HISTORY + 5) {
        begin(&mut i, v110(), RolloutOptions::default(), Utc::now());
    }
    assert_eq!(i.history.len(), MAX_HISTORY);
    assert_eq!(i.history.last().unwrap().number, i.release);
    let numbers: Vec<u64> = i.history.iter().map(|r| r.number).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
}

#[test]
fn reports_of_the_previous_release_count_during_a_rollout() {
    let mut i = running_on(&["n1"]);
    let mut next = v110();
    next.addon.services[0].service_name = "api".into();
    begin(&mut i, next, RolloutOptions::default(), Utc::now());
    apply_report(&mut i, "n1", vec![status("web", ServicePhase::Running)]);
    assert_eq!(i.services.len(), 1, "the old release's service is kept");
}
