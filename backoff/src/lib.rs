//! Exponential backoff with jitter: the one retry delay of every component
//! (the monitor's link to the manager and its restarts of services and core
//! components, the marketplace's verification retries, the client
//! library's retries of idempotent calls), in the manner of linkerd2-proxy's
//! `exp-backoff`.
//!
//! The ceiling of retry `n` (counted from 0) is `base · 2ⁿ`, at most `max`.
//! Where many parties may retry at once (monitors re-linking after a
//! manager restart, a registry outage failing many verifications) the delay
//! is drawn from the upper half of the ceiling, so they spread out while
//! none retries sooner than half the ceiling. Where the delay is a
//! decision of its own (a service's restart, which the monitor persists and
//! reports) the ceiling is taken as it is.

use std::time::Duration;

/// An exponential backoff: `base` doubled per retry, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff from `base` up to `max`; a `max` below `base` is `base`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
        }
    }

    /// The delay of the first retry.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay before retry `retry` (0 is the first), without jitter.
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.base
            .saturating_mul(1_u32 << retry.min(31))
            .min(self.max)
    }

    /// The delay before retry `retry`, drawn uniformly from the upper half
    /// of its [`ceiling`](Self::ceiling).
    pub fn jittered(&self, retry: u32) -> Duration {
        self.ceiling(retry).mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn doubles_from_base_up_to_max() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (0..6).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_max_below_base_is_base() {
        let backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(0), Duration::from_secs(5));
        assert_eq!(backoff.ceiling(10), Duration::from_secs(5));
    }

    proptest! {
        #[test]
        fn ceilings_grow_and_stay_bounded(base_ms in 0_u64..100_000, max_ms in 0_u64..10_000_000, n in 0_u32..200) {
            let backoff = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            let cap = Duration::from_millis(max_ms.max(base_ms));
            prop_assert!(backoff.ceiling(n) <= cap);
            prop_assert!(backoff.ceiling(n) <= backoff.ceiling(n + 1));
            prop_assert!(backoff.ceiling(n) >= Duration::from_millis(base_ms));
        }

        #[test]
        fn jitter_stays_in_the_upper_half(base_ms in 1_u64..100_000, max_ms in 1_u64..10_000_000, n in 0_u32..64) {
            let backoff = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            let ceiling = backoff.ceiling(n);
            let delay = backoff.jittered(n);
            prop_assert!(delay <= ceiling);
            prop_assert!(delay >= ceiling / 2 - Duration::from_nanos(1));
        }
    }
}
