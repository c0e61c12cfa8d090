//! Watch streams that survive a dropped connection.

use std::{collections::HashMap, future::Future};

use futures::{Stream, StreamExt as _};
use tonic::Code;

use crate::{ClientError, RetryPolicy};

/// Opens a watch with `open` and yields its items; when the stream breaks
/// with `UNAVAILABLE` (or ends, which the servers do only when shutting
/// down), it is reopened after a backoff from `retry`. Watches start with
/// the current state, so after a reopen the items whose `(key, revision)`
/// was already seen are skipped. Any other error is yielded and ends it.
pub(crate) fn resumed<T, S, F, Fut>(
    retry: RetryPolicy,
    open: F,
    version: impl Fn(&T) -> (String, u64) + Send + 'static,
) -> impl Stream<Item = Result<T, ClientError>> + Send + 'static
where
    T: Send + 'static,
    S: Stream<Item = Result<T, tonic::Status>> + Send + Unpin + 'static,
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, tonic::Status>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut failures = 0_u32;
        loop {
            let broken = match open().await {
                Ok(mut stream) => loop {
                    match stream.next().await {
                        Some(Ok(item)) => {
                            failures = 0;
                            let (key, revision) = version(&item);
                            if seen.get(&key).is_some_and(|last| *last >= revision) {
                                continue;
                            }
                            seen.insert(key, revision);
                            if tx.send(Ok(item)).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(status)) => break crate::retry::lost_connection(status),
                        None => break tonic::Status::unavailable("the watch ended"),
                    }
                },
                Err(status) => crate::retry::lost_connection(status),
            };
            if broken.code() != Code::Unavailable || failures + 1 >= retry.max_attempts.max(1) {
                let _ = tx.send(Err(broken.into())).await;
                return;
            }
            tokio::time::sleep(retry.delay(failures)).await;
            failures += 1;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
