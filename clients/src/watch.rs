//! Watch streams that survive a dropped connection by resuming from their
//! cursor.

use std::future::Future;

use futures::{Stream, StreamExt as _};
use tonic::Code;

use crate::{ClientError, RetryPolicy};

/// Where a watch stands, as the servers number changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// The `sequence` of the last message received.
    pub sequence: u64,
    /// Whether the message is the in-sync marker (not handed on).
    pub marker: bool,
    /// Whether the message is the last of the watch (the watched record was
    /// deleted): it is handed on and the watch ends.
    pub last: bool,
}

/// Opens a watch with `open(since_revision)` and yields its items. When the
/// stream breaks with `UNAVAILABLE`, ends (which the servers do only when
/// shutting down) or is ended as too slow (`RESOURCE_EXHAUSTED`), it is
/// reopened after a backoff from `retry` with the sequence of the last
/// message received, so it receives exactly the changes it missed. A cursor
/// the server no longer holds (`OUT_OF_RANGE`) reopens from the current
/// state. Any other error is yielded and ends it, and so does an item that
/// `cursor` marks as the last.
pub(crate) fn resumed<T, S, F, Fut>(
    retry: RetryPolicy,
    open: F,
    cursor: impl Fn(&T) -> Cursor + Send + 'static,
) -> impl Stream<Item = Result<T, ClientError>> + Send + 'static
where
    T: Send + 'static,
    S: Stream<Item = Result<T, tonic::Status>> + Send + Unpin + 'static,
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, tonic::Status>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut since = 0_u64;
        let mut failures = 0_u32;
        loop {
            let broken = match open(since).await {
                Ok(mut stream) => loop {
                    match stream.next().await {
                        Some(Ok(item)) => {
                            failures = 0;
                            let at = cursor(&item);
                            since = since.max(at.sequence);
                            if at.marker {
                                continue;
                            }
                            if tx.send(Ok(item)).await.is_err() || at.last {
                                return;
                            }
                        }
                        Some(Err(status)) => break crate::retry::lost_connection(status),
                        None => break tonic::Status::unavailable("the watch ended"),
                    }
                },
                Err(status) => crate::retry::lost_connection(status),
            };
            match broken.code() {
                Code::Unavailable | Code::ResourceExhausted => {}
                Code::OutOfRange if since > 0 => since = 0,
                _ => {
                    let _ = tx.send(Err(broken.into())).await;
                    return;
                }
            }
            if failures + 1 >= retry.max_attempts.max(1) {
                let _ = tx.send(Err(broken.into())).await;
                return;
            }
            tokio::time::sleep(retry.delay(failures)).await;
            failures += 1;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A fresh `request_id` for one logical mutating call: every retry of the
/// call sends the same one, so the server runs it once (AIP-155).
pub(crate) fn new_request_id() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}
