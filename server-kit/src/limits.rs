//! What a stranger can hold of a server before it knows who they are:
//! connections and TLS handshakes, counted in total and per peer address.
//! The accept loop never waits: a connection over a limit is closed at
//! once (and logged), so connections held open by one peer, or handshakes
//! that never finish, cannot keep everyone else out.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections a server keeps open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// In all.
    pub total: usize,
    /// From one peer address (loopback peers, a mesh sidecar or the
    /// machine itself, count only towards the total).
    pub per_peer: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            total: 16_384,
            per_peer: 1_024,
        }
    }
}

/// How long a client may take to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS handshakes in flight at once, in all.
const MAX_HANDSHAKES: usize = 1_024;
/// TLS handshakes in flight from one peer address (loopback included: a
/// sidecar terminates TLS itself and never handshakes with us).
const MAX_HANDSHAKES_PER_PEER: usize = 32;

/// Counts held per peer and in total, under limits.
#[derive(Debug)]
struct Counter {
    total: usize,
    per_peer: usize,
    /// Loopback peers count only towards the total.
    exempt_loopback: bool,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Counter {
    fn new(total: usize, per_peer: usize, exempt_loopback: bool) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_peer,
            exempt_loopback,
            held: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for `peer`, or why there is none.
    fn take(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, &'static str> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.0 >= self.total {
            return Err("the server's limit");
        }
        let counted = !(self.exempt_loopback && peer.is_loopback());
        if counted {
            let mine = held.1.entry(peer).or_insert(0);
            if *mine >= self.per_peer {
                return Err("the limit per peer");
            }
            *mine += 1;
        }
        held.0 += 1;
        Ok(Slot {
            counter: self.clone(),
            peer: counted.then_some(peer),
        })
    }
}

/// One connection's (or handshake's) place under a [`Counter`]; given
/// back when dropped.
#[derive(Debug)]
struct Slot {
    counter: Arc<Counter>,
    peer: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self
            .counter
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.0 = held.0.saturating_sub(1);
        if let Some(peer) = self.peer
            && let Some(mine) = held.1.get_mut(&peer)
        {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                held.1.remove(&peer);
            }
        }
    }
}

/// A TCP connection holding its place under the connection limits.
#[derive(Debug)]
pub struct Limited {
    stream: TcpStream,
    _slot: Slot,
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections on `listener` under `limits` and hands each on to
/// `admit` (which may take its time, e.g. for a TLS handshake, without
/// holding up the next accept). Ends when the receiving side is dropped.
pub(crate) fn accept<T, F, Fut>(
    listener: TcpListener,
    limits: ConnectionLimits,
    admit: F,
) -> ReceiverStream<io::Result<T>>
where
    T: Send + 'static,
    F: Fn(Limited, tokio::sync::mpsc::Sender<io::Result<T>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let connections = Counter::new(limits.total, limits.per_peer, true);
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = sender.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off a bit
                    // rather than spin.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match connections.take(peer.ip()) {
                Ok(slot) => slot,
                Err(limit) => {
                    tracing::warn!(%peer, limit, "connection refused: too many connections");
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(admit(
                Limited {
                    stream,
                    _slot: slot,
                },
                sender.clone(),
            ));
        }
    });
    ReceiverStream::new(receiver)
}

/// Plain TCP connections under `limits`.
pub(crate) fn plain(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<Limited>> {
    accept(listener, limits, |stream, sender| async move {
        let _ = sender.send(Ok(stream)).await;
    })
}

/// Places for TLS handshakes, per peer and in all.
#[derive(Debug, Clone)]
pub(crate) struct Handshakes(Arc<Counter>);

impl Handshakes {
    pub(crate) fn new() -> Self {
        Self(Counter::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_PEER, false))
    }

    /// Holds a place while the handshake runs; `None` when over a limit.
    pub(crate) fn start(&self, peer: IpAddr) -> Option<impl Sized + Send + 'static> {
        match self.0.take(peer) {
            Ok(slot) => Some(slot),
            Err(limit) => {
                tracing::warn!(%peer, limit, "connection refused: too many TLS handshakes in flight");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_peer_and_in_total_and_gives_back() {
        let counter = Counter::new(3, 2, true);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let first = counter.take(a).unwrap();
        let _second = counter.take(a).unwrap();
        assert_eq!(counter.take(a).unwrap_err(), "the limit per peer");
        let _third = counter.take(b).unwrap();
        assert_eq!(counter.take(b).unwrap_err(), "the server's limit");
        drop(first);
        // Loopback counts only towards the total.
        let _local = counter.take(local).unwrap();
        assert_eq!(counter.take(local).unwrap_err(), "the server's limit");
        let strict = Counter::new(10, 1, false);
        let _one = strict.take(local).unwrap();
        assert_eq!(strict.take(local).unwrap_err(), "the limit per peer");
    }
}
