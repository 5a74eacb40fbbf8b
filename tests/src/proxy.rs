//! A small TCP proxy that delays every byte by a fixed time in each direction and
//! can cut its links: an ocean between two NATS gateways, on loopback (this kernel
//! has no `netem`).
//!
//! It runs on a thread and runtime of its own, so a test that blocks its own
//! runtime (starting a nats-server waits synchronously) never stalls the links.
//! Bytes keep their order; the delay does not limit throughput (what is read is
//! scheduled, not waited for, before the next read).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A running proxy: `127.0.0.1:<port>` forwards to its upstream.
pub struct DelayProxy {
    port: u16,
    /// `true` while the link is cut: connections are dropped and refused.
    cut: watch::Sender<bool>,
    /// Dropping it stops the proxy's thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl DelayProxy {
    /// A proxy on a free loopback port to `upstream`, delaying each direction by
    /// `delay`.
    pub fn start(upstream: SocketAddr, delay: Duration) -> DelayProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy port");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("address").port();
        let (cut, cut_rx) = watch::channel(false);
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("delay-proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    tokio::select! {
                        _ = stop_rx => {}
                        () = accept(listener, upstream, delay, cut_rx) => {}
                    }
                });
            })
            .expect("proxy thread");
        DelayProxy {
            port,
            cut,
            _stop: stop,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the link: open connections are dropped, new ones refused, until
    /// [`DelayProxy::restore`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    delay: Duration,
    cut: watch::Receiver<bool>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *cut.borrow() {
            drop(client);
            continue;
        }
        let mut cut = cut.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                () = pipe(client_read, server_write, delay) => {}
                () = pipe(server_read, client_write, delay) => {}
                _ = cut.wait_for(|&c| c) => {}
            }
        });
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buffer[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    // The writer finishes what was read before the reader saw the end.
    let (_, ()) = tokio::join!(reader, writer);
}
