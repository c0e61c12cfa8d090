//! The one restart and error policy: how long to wait before the next
//! attempt, and when to give up. Failures are counted by wall-clock time and
//! kept under the state dir, so the failure window survives a monitor
//! restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use addons_backoff::Backoff;
use serde::{Deserialize, Serialize};

/// How the monitor retries a service that exits or cannot be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delays after a failure: the first failure's, doubling with each
    /// further one up to the longest (without jitter: a restart's time is
    /// reported and persisted).
    pub backoff: Backoff,
    /// More failures than this within `window` and the service is given up.
    pub max_failures: usize,
    /// Window in which failures are counted.
    pub window: Duration,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again after this delay.
    RetryIn(Duration),
    /// Stop trying: this many failures within the window.
    GiveUp(usize),
}

/// The failures of one service within the window, as Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureHistory {
    /// When each counted failure happened.
    pub at: Vec<u64>,
}

impl RestartPolicy {
    /// The delay before attempt `n + 1` after `n` failures in a row.
    pub fn delay(&self, failures: usize) -> Duration {
        let retry = u32::try_from(failures.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff.ceiling(retry)
    }

    /// How long to wait, at `now_ms`, for a restart a monitor before this
    /// one set for `retry_at_ms` (both wall-clock): never longer than the
    /// policy's longest delay, however far the clock went back since.
    pub fn resume_delay(&self, retry_at_ms: u64, now_ms: u64) -> Duration {
        Duration::from_millis(retry_at_ms.saturating_sub(now_ms)).min(self.delay(self.max_failures))
    }

    /// Counts a failure at `now` in `history` (forgetting those that left
    /// the window) and decides.
    pub fn on_failure(&self, history: &mut FailureHistory, now: SystemTime) -> Verdict {
        let now_ms = unix_millis(now);
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        // A clock that went back makes older entries look recent: they are
        // kept, which only errs towards giving up sooner.
        history
            .at
            .retain(|at| now_ms.saturating_sub(*at) < window_ms);
        history.at.push(now_ms);
        let count = history.at.len();
        if count > self.max_failures {
            Verdict::GiveUp(count)
        } else {
            Verdict::RetryIn(self.delay(count))
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            max_failures: 5,
            window: Duration::from_secs(300),
        }
    }

    #[test]
    fn backs_off_then_gives_up_within_the_window() {
        let policy = policy();
        let mut history = FailureHistory::default();
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let delays: Vec<Verdict> = (0..6)
            .map(|i| policy.on_failure(&mut history, start + Duration::from_secs(i)))
            .collect();
        assert_eq!(
            delays,
            [1, 2, 4, 8, 16]
                .map(|s| Verdict::RetryIn(Duration::from_secs(s)))
                .into_iter()
                .chain([Verdict::GiveUp(6)])
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn forgets_failures_that_left_the_window() {
        let policy = policy();
        let mut history = FailureHistory::default();
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..5 {
            policy.on_failure(&mut history, start + Duration::from_secs(i));
        }
        let later = start + Duration::from_secs(400);
        assert_eq!(
            policy.on_failure(&mut history, later),
            Verdict::RetryIn(Duration::from_secs(1))
        );
        assert_eq!(history.at.len(), 1);
    }

    proptest! {
        #[test]
        fn delays_grow_and_stay_bounded(backoff_ms in 1_u64..10_000, max_ms in 1_u64..600_000, n in 0_usize..200) {
            let policy = RestartPolicy {
                backoff: Backoff::new(Duration::from_millis(backoff_ms), Duration::from_millis(max_ms)),
                max_failures: 5,
                window: Duration::from_secs(60),
            };
            let cap = Duration::from_millis(max_ms.max(backoff_ms));
            prop_assert!(policy.delay(n) <= cap);
            prop_assert!(policy.delay(n) <= policy.delay(n + 1));
            prop_assert!(policy.delay(n) >= Duration::from_millis(backoff_ms).min(cap));
        }

        #[test]
        fn gives_up_exactly_past_the_budget(max in 0_usize..20, gaps in proptest::collection::vec(0_u64..10_000, 1..40)) {
            let policy = RestartPolicy { max_failures: max, window: Duration::from_secs(3600), ..policy() };
            let mut history = FailureHistory::default();
            let mut now = UNIX_EPOCH + Duration::from_secs(1_000_000);
            for (i, gap) in gaps.iter().enumerate() {
                now += Duration::from_millis(*gap);
                let verdict = policy.on_failure(&mut history, now);
                // Every gap is below the window: all failures count.
                prop_assert_eq!(matches!(verdict, Verdict::GiveUp(_)), i + 1 > max);
            }
        }
    }
}
