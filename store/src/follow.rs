//! Watching a collection as a stream of events with resumable cursors: the
//! one loop behind the servers' `Watch*` calls.

use std::future::Future;

use tokio::sync::{broadcast::error::RecvError, mpsc};

use std::collections::HashMap;

use crate::{Change, ChangeKind, Collection, Document, Result, Versioned};

/// Whether `change` tells a follower that was `sent` a snapshot (and the
/// changes since, each record's last revision by id) something new, and
/// takes it into `sent`: a change the snapshot already reflected is not.
fn news<T: Document>(sent: &mut HashMap<String, u64>, change: &Change<T>) -> bool {
    let id = change.record.value.id();
    if change.kind == ChangeKind::Deleted {
        return sent.remove(id).is_some();
    }
    if sent
        .get(id)
        .is_some_and(|revision| *revision >= change.record.revision)
    {
        return false;
    }
    sent.insert(id.to_owned(), change.record.revision);
    true
}

/// What a follower receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<T> {
    /// A change, or a record of the initial state (kind
    /// [`ChangeKind::Added`], with the sequence the snapshot reflects).
    Change(Change<T>),
    /// Everything up to this sequence was sent; what follows is live.
    InSync(u64),
}

/// Why following ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowEnd {
    /// `stop` fired or the receiver hung up.
    Stopped,
    /// `ends` said the last change sent ends the stream.
    Ended,
    /// The follower fell behind; it may follow again from `resume_from`,
    /// the sequence of the last change it was sent.
    Lagged {
        /// The cursor to resume from.
        resume_from: u64,
    },
}

/// Where following starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The current state first.
    Snapshot,
    /// Exactly the changes after this sequence.
    After(u64),
}

impl<T: Document> Collection<T> {
    /// Sends `out` the records `initial` reads (or, from a cursor, the
    /// changes after it), then [`Event::InSync`], then every change that
    /// `wanted` selects, until `stop` fires, `out` closes, `ends` is true of
    /// a change sent, or the follower falls behind. Live changes are not
    /// waited for: a full `out` ends the follow as lagged rather than slowing
    /// writers.
    pub async fn follow<I>(
        &self,
        start: Start,
        initial: I,
        wanted: impl Fn(&Change<T>) -> bool,
        ends: impl Fn(&Change<T>) -> bool,
        out: mpsc::Sender<Event<T>>,
        stop: impl Future<Output = ()>,
    ) -> Result<FollowEnd>
    where
        I: AsyncFnOnce(&Self) -> Result<Vec<Versioned<T>>>,
    {
        tokio::pin!(stop);
        // Where other processes write too, a snapshot may already reflect
        // changes the feed then repeats: each record's revision sent.
        let mut sent: Option<HashMap<String, u64>> = None;
        let (backlog, mut last, mut receiver) = match start {
            Start::Snapshot => {
                let (records, seq, receiver) = self.snapshot(initial).await?;
                if self.shared() {
                    sent = Some(
                        records
                            .iter()
                            .map(|record| (record.value.id().to_owned(), record.revision))
                            .collect(),
                    );
                }
                let backlog: Vec<Change<T>> = records
                    .into_iter()
                    .map(|record| Change {
                        kind: ChangeKind::Added,
                        seq,
                        record,
                    })
                    .collect();
                (backlog, seq, receiver)
            }
            Start::After(since) => {
                let (changes, receiver) = self.changes_since(since).await?;
                (changes, since, receiver)
            }
        };
        for change in backlog {
            if !wanted(&change) {
                continue;
            }
            last = last.max(change.seq);
            let end = ends(&change);
            if out.send(Event::Change(change)).await.is_err() {
                return Ok(FollowEnd::Stopped);
            }
            if end {
                return Ok(FollowEnd::Ended);
            }
        }
        if out.send(Event::InSync(last)).await.is_err() {
            return Ok(FollowEnd::Stopped);
        }
        loop {
            let change = tokio::select! {
                () = &mut stop => return Ok(FollowEnd::Stopped),
                () = out.closed() => return Ok(FollowEnd::Stopped),
                received = receiver.recv() => match received {
                    Ok(change) => change,
                    Err(RecvError::Lagged(_)) => return Ok(FollowEnd::Lagged { resume_from: last }),
                    Err(RecvError::Closed) => return Ok(FollowEnd::Stopped),
                },
            };
            if change.seq <= last || !wanted(&change) {
                continue;
            }
            if let Some(sent) = &mut sent
                && !news(sent, &change)
            {
                last = change.seq;
                continue;
            }
            let seq = change.seq;
            let end = ends(&change);
            match out.try_send(Event::Change(change)) {
                Ok(()) => last = seq,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Ok(FollowEnd::Lagged { resume_from: last });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(FollowEnd::Stopped),
            }
            if end {
                return Ok(FollowEnd::Ended);
            }
        }
    }
}
