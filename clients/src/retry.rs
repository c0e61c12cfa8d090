//! Retries of idempotent calls when the server is `UNAVAILABLE`.

use std::{future::Future, time::Duration};

use tonic::Code;

/// How often and how patiently idempotent calls are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per retry.
    pub base_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay before retry number `retry` (0-based), with full jitter
    /// over its upper half.
    pub fn delay(&self, retry: u32) -> Duration {
        addons_backoff::Backoff::new(self.base_delay, self.max_delay).jittered(retry)
    }

    /// Runs `call` until it succeeds, fails with anything but
    /// `UNAVAILABLE`, or the attempts are spent. Only for idempotent calls.
    pub async fn run<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Err(status)
                    if status.code() == Code::Unavailable && attempt + 1 < self.max_attempts =>
                {
                    tokio::time::sleep(self.delay(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// `call`, failing with `DEADLINE_EXCEEDED` when it takes longer than
/// `timeout`, and with `UNAVAILABLE` when the transport dropped it.
pub(crate) async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(lost_connection),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

/// A status the transport made up because the connection went away is the
/// server being unavailable: `CANCELLED` (the clients never cancel a call
/// themselves; hyper cancels requests queued on a dead connection), or
/// `UNKNOWN` carrying a transport error as its source (a stream cut by a
/// crashed server). Statuses the server sent have no source.
pub(crate) fn lost_connection(status: tonic::Status) -> tonic::Status {
    let made_up = status.code() == Code::Cancelled
        || (status.code() == Code::Unknown && std::error::Error::source(&status).is_some());
    if made_up {
        tonic::Status::unavailable(format!("connection lost: {}", status.message()))
    } else {
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retries_unavailable_only_and_gives_up() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = fast()
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(tonic::Status::unavailable("down"))
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let result: Result<(), _> = fast()
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(tonic::Status::not_found("gone"))
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::NotFound);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no retry of a definite answer"
        );

        calls.store(0, Ordering::SeqCst);
        let result = fast()
            .run(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(tonic::Status::unavailable("blip"))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(result.unwrap(), 7);
    }

    #[test]
    fn transport_failures_count_as_unavailable() {
        let cut = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "stream closed",
        )));
        assert_eq!(cut.code(), Code::Unknown);
        assert_eq!(lost_connection(cut).code(), Code::Unavailable);
        assert_eq!(
            lost_connection(tonic::Status::cancelled("operation was canceled")).code(),
            Code::Unavailable
        );
        // What a server said stays what it said.
        assert_eq!(
            lost_connection(tonic::Status::unknown("handler failed")).code(),
            Code::Unknown
        );
        assert_eq!(
            lost_connection(tonic::Status::not_found("x")).code(),
            Code::NotFound
        );
    }

    #[test]
    fn delays_grow_within_bounds() {
        let policy = RetryPolicy::default();
        for retry in 0..10 {
            let delay = policy.delay(retry);
            let ceiling = (policy.base_delay * (1 << retry)).min(policy.max_delay);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{retry}: {delay:?}"
            );
        }
    }
}
