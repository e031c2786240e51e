//! A TCP proxy on loopback that can go silent the way a black-holing proxy or a NAT that lost
//! its state does: connections open at that moment stay open, and every byte sent on them
//! is swallowed (no data, no FIN, no RST). Connections opened afterwards pass.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub port: u16,
    /// Connections numbered below this are swallowed.
    silenced_below: Arc<AtomicU64>,
    opened: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<port> to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let silenced_below = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(AtomicU64::new(0));
        let (silenced, count) = (silenced_below.clone(), opened.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, id, silenced.clone()));
                tokio::spawn(pump(sr, cw, id, silenced.clone()));
            }
        });
        Proxy {
            port,
            silenced_below,
            opened,
            task,
        }
    }

    /// From now on every connection open so far is silent in both directions.
    pub fn black_hole(&self) {
        self.silenced_below
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// From now on every connection, open or opened later, is silent: a network partition.
    pub fn partition(&self) {
        self.silenced_below.store(u64::MAX, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    silenced_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // Silenced connections never pass a close on either.
                if id >= silenced_below.load(Ordering::SeqCst) {
                    let _ = to.shutdown().await;
                } else {
                    std::mem::forget(to);
                }
                return;
            }
            Ok(n) => n,
        };
        if id < silenced_below.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
