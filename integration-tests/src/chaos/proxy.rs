//! A TCP proxy in front of the registry that can be made slow: while slow,
//! every chunk it passes either way waits first. Image references name the
//! proxy, so every pull and every verification goes through it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// The proxy; it stops when dropped.
#[derive(Debug)]
pub struct SlowProxy {
    address: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// A proxy on `ip` (a free port) to `upstream`.
    pub async fn start(ip: IpAddr, upstream: String) -> Self {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind the registry's proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, delay) = (upstream.clone(), delay.clone());
                tokio::spawn(async move {
                    // The registry down: the client's connection closes.
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pass(client_read, server_write, &delay),
                        pass(server_read, client_write, &delay)
                    );
                });
            }
        });
        Self {
            address,
            delay_ms,
            task,
        }
    }

    /// Its `HOST:PORT`.
    pub fn host(&self) -> String {
        self.address.to_string()
    }

    /// Makes every chunk wait `delay` (zero: none).
    pub fn slow(&self, delay: Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: &AtomicU64,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The address clients of the manager use when a plane has two: a TCP
/// proxy that sends each new connection to the active manager, as a
/// Kubernetes Service does with the ready one. It asks each manager every
/// 100 ms whether it is active (a read a standby refuses).
#[derive(Debug)]
pub struct ManagerFront {
    address: SocketAddr,
    active: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ManagerFront {
    /// A front on `ip` (a free port) to the managers at `backends`
    /// (`HOST:PORT`).
    pub async fn start(ip: IpAddr, backends: Vec<String>) -> Self {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind the managers' front");
        let address = listener.local_addr().expect("the front's address");
        let active = Arc::new(AtomicU64::new(0));
        let probe = {
            let (backends, active) = (backends.clone(), active.clone());
            tokio::spawn(async move {
                loop {
                    for (n, backend) in backends.iter().enumerate() {
                        if is_active(backend).await {
                            active.store(n as u64, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let serve = {
            let active = active.clone();
            tokio::spawn(async move {
                let no_delay = Arc::new(AtomicU64::new(0));
                while let Ok((client, _)) = listener.accept().await {
                    let upstream = backends[active.load(Ordering::Relaxed) as usize].clone();
                    let no_delay = no_delay.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = server.set_nodelay(true);
                        let _ = client.set_nodelay(true);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            pass(client_read, server_write, &no_delay),
                            pass(server_read, client_write, &no_delay)
                        );
                    });
                }
            })
        };
        Self {
            address,
            active,
            tasks: vec![probe, serve],
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Which of the backends was active when last asked.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed) as usize
    }
}

impl Drop for ManagerFront {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Whether the manager at `backend` serves as the active one: a read it
/// answers within 500 ms (a standby refuses it, a paused one is silent).
async fn is_active(backend: &str) -> bool {
    use oakestra_addons_proto::engine::v1::{
        ListNodesRequest, addons_manager_service_client::AddonsManagerServiceClient,
    };
    let ask = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{backend}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        AddonsManagerServiceClient::new(channel)
            .list_nodes(ListNodesRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), ask).await,
        Ok(Some(_))
    )
}
