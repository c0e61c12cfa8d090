//! The one way a server streams a watch: follow the store in a task, turn
//! each event into a message, and end the stream with the reason it ended.

use std::{future::Future, pin::Pin};

use addons_store::{Event, FollowEnd};
use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// A stream of watch messages.
pub type WatchStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// Runs `follow` (which sends events to the sender it gets, at most
/// `buffer` in flight) in a task and streams `message(event)` for each.
/// When following ends because the watcher fell behind, the stream ends
/// with RESOURCE_EXHAUSTED `WATCH_TOO_SLOW` and the cursor to resume from;
/// on an error, with that error; otherwise (the client hung up, the server
/// shuts down, or the watched record is gone) with OK.
pub fn watch_stream<T, M, E, F, Fut>(
    buffer: usize,
    follow: F,
    message: impl Fn(Event<T>) -> M + Send + 'static,
) -> WatchStream<M>
where
    T: Send + 'static,
    M: Send + 'static,
    E: Into<Status> + Send + 'static,
    F: FnOnce(mpsc::Sender<Event<T>>) -> Fut,
    Fut: Future<Output = Result<FollowEnd, E>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(buffer);
    let (end_tx, end_rx) = oneshot::channel();
    let following = follow(tx);
    tokio::spawn(async move {
        let _ = end_tx.send(following.await);
    });
    let events = ReceiverStream::new(rx).map(move |event| Ok(message(event)));
    let ending = futures::stream::once(async move {
        match end_rx.await {
            Ok(Ok(FollowEnd::Stopped | FollowEnd::Ended)) | Err(_) => None,
            Ok(Ok(FollowEnd::Lagged { resume_from })) => {
                Some(Err(crate::watch_too_slow(resume_from)))
            }
            Ok(Err(err)) => Some(Err(err.into())),
        }
    });
    Box::pin(events.chain(ending.filter_map(futures::future::ready)))
}
