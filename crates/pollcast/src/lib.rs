//! The `pollcast` server as a library: configuration, wiring of store, domain,
//! relay, API and edge, and graceful shutdown. `main.rs` only parses the command
//! line and calls [`Server::start`], so tests start the real server on `127.0.0.1:0`.
//!
//! A server runs an api part ([`ApiSettings`]: REST, domain, outbox relay, presence
//! tracking; needs the database), an edge part (`/ws`; needs only the event stream
//! and the token keys), or both (`--role all`). Both parts answer `/healthz`,
//! `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use pollcast_api::RateLimitConfig;
use pollcast_api::health::Readiness;
use pollcast_domain::{Domain, DomainConfig, TokenKeys};
use pollcast_edge::{Edge, EdgeConfig};
use pollcast_protocol::Origin;
use pollcast_stream::{EventStream, Retention};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod config;
pub mod open_files;
pub mod telemetry;

pub use config::Config;

/// What a server runs. Token keys are built once, by whoever builds the settings,
/// and shared by the domain (which issues tokens) and the edge (which checks them).
#[derive(Clone)]
pub struct Settings {
    /// Token keys (secret and lifetime).
    pub keys: TokenKeys,
    /// The api part; `None` on an edge-only node.
    pub api: Option<ApiSettings>,
    /// The edge part; `None` on an api-only node.
    pub edge: Option<EdgeConfig>,
    /// Where `/metrics` reads from; `None` serves no `/metrics` route.
    pub metrics: Option<PrometheusHandle>,
    /// What HTTP clients may hold open.
    pub http: HttpTimeouts,
}

/// Settings of the api part.
#[derive(Clone)]
pub struct ApiSettings {
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Pool size and SQLite durability.
    pub store: pollcast_store::StoreOptions,
    /// Domain settings.
    pub domain: DomainConfig,
    /// Limits on writes (429).
    pub rate_limits: RateLimitConfig,
    /// Browser origins allowed to call the API from other sites (CORS); empty:
    /// none.
    pub cors_origins: Vec<Origin>,
    /// This process is the whole deployment (the embedded stream): at start-up it
    /// republishes the retained history from the outbox (the embedded log does not
    /// survive restarts) and forgets every connection (none can exist yet). Never
    /// set it when several nodes share a database or a stream.
    pub single_node: bool,
}

/// The api part while it runs: the domain and its background tasks.
struct ApiPart {
    domain: Domain,
    rate_limits: RateLimitConfig,
    cors_origins: Vec<Origin>,
    relay: JoinHandle<()>,
    presence: JoinHandle<()>,
    /// Republishes tallies a crash left stale.
    audit: JoinHandle<()>,
    /// Removes old idempotency answers and published events.
    cleanup: JoinHandle<()>,
}

impl ApiPart {
    async fn start(
        settings: ApiSettings,
        keys: TokenKeys,
        stream: Arc<dyn EventStream>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<ApiPart> {
        let db = pollcast_store::connect(&settings.database_url, settings.store)
            .await
            .context("connecting to the database")?;
        let domain = Domain::new(db, stream, keys, settings.domain);
        let relay = domain.relay();
        if settings.single_node {
            let restored = relay
                .restore_history(Retention::default().max_age)
                .await
                .context("restoring the event history")?;
            let reset = domain
                .reset_presence()
                .await
                .context("resetting presence")?;
            tracing::info!(
                restored,
                reset,
                "single node: history restored, presence reset"
            );
        }
        let relay = tokio::spawn(relay.run(shutdown.clone()));
        let presence = tokio::spawn(domain.presence_tracker().run(shutdown.clone()));
        // Alone, nobody else can have a results update in flight: audit at once.
        let quiet = if settings.single_node {
            Duration::ZERO
        } else {
            pollcast_domain::AUDIT_QUIET
        };
        let audit = tokio::spawn(domain.clone().audit_results(quiet, shutdown.clone()));
        let cleanup = tokio::spawn(domain.clone().run_cleanup(shutdown));
        Ok(ApiPart {
            domain,
            rate_limits: settings.rate_limits,
            cors_origins: settings.cors_origins,
            relay,
            presence,
            audit,
            cleanup,
        })
    }

    async fn stopped(self) -> anyhow::Result<()> {
        self.relay.await.context("relay task")?;
        self.presence.await.context("presence task")?;
        self.audit.await.context("results audit task")?;
        self.cleanup.await.context("clean-up task")?;
        Ok(())
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stream: Arc<dyn EventStream>,
    api: Option<ApiPart>,
    edge: Option<Edge>,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Starts the parts `settings` asks for over `stream` and serves them on
    /// `listener`: the api part connects to the database (applying migrations) and
    /// starts the outbox relay and the presence tracker; the edge part serves `/ws`.
    pub async fn start(
        listener: TcpListener,
        settings: Settings,
        stream: Arc<dyn EventStream>,
    ) -> anyhow::Result<Server> {
        anyhow::ensure!(
            settings.api.is_some() || settings.edge.is_some(),
            "a server runs an api part, an edge part or both"
        );
        let addr = listener.local_addr().context("listener address")?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let api = match settings.api {
            Some(api) => Some(
                ApiPart::start(
                    api,
                    settings.keys.clone(),
                    Arc::clone(&stream),
                    shutdown_rx.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let send_buffer = settings.edge.as_ref().and_then(|e| e.socket_send_buffer);
        let edge = settings
            .edge
            .map(|config| Edge::new(config, Arc::clone(&stream), settings.keys.clone()));

        let readiness = match &api {
            Some(api) => Readiness::Api(api.domain.clone()),
            None => Readiness::Stream(Arc::clone(&stream)),
        };
        let mut router = pollcast_api::health::router(readiness);
        if let Some(api) = &api {
            router = router.merge(pollcast_api::router(
                api.domain.clone(),
                api.rate_limits.clone(),
                settings.http.body_read,
                &api.cors_origins,
            ));
        }
        if let Some(edge) = &edge {
            router = router.merge(edge.router());
        }
        if let Some(handle) = settings.metrics {
            router = router.route("/metrics", get(move || std::future::ready(handle.render())));
        }
        let http = serve(listener, router, send_buffer, settings.http, shutdown_rx);
        tracing::info!(%addr, api = api.is_some(), edge = edge.is_some(), "pollcast listening");
        Ok(Server {
            addr,
            stream,
            api,
            edge,
            shutdown,
            http,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The domain services, on a server with an api part.
    pub fn domain(&self) -> Option<&Domain> {
        self.api.as_ref().map(|api| &api.domain)
    }

    /// The WebSocket edge, on a server with an edge part.
    pub fn edge(&self) -> Option<&Edge> {
        self.edge.as_ref()
    }

    /// The event stream the server publishes to or reads from.
    pub fn stream(&self) -> &Arc<dyn EventStream> {
        &self.stream
    }

    /// Closes WebSocket connections (1001, after flushing their queues), stops
    /// accepting requests, finishes those in flight, publishes pending events and
    /// returns.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(edge) = &self.edge {
            edge.shutdown().await;
        }
        let _ = self.shutdown.send(true);
        self.http
            .await
            .context("http task")?
            .context("http server")?;
        if let Some(api) = self.api {
            api.stopped().await?;
        }
        Ok(())
    }
}

/// Limits on what an HTTP client may hold open.
#[derive(Clone, Copy, Debug)]
pub struct HttpTimeouts {
    /// Longest wait for a request's headers, from the moment the connection waits
    /// for them: a new connection's first request, or the next one on a kept-alive
    /// connection (so it also bounds idle keep-alive connections). Covers the
    /// WebSocket upgrade request.
    pub header_read: Duration,
    /// Longest pause while a request body arrives.
    pub body_read: Duration,
    /// Longest graceful shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The accept queue asked of the kernel, which caps it at `net.core.somaxconn`
/// (4 096 by default since Linux 5.4). tokio's `TcpListener::bind` asks for
/// 1 024: when 10 000 clients reconnect at once, the kernel drops the SYNs that
/// do not fit, and each dropped client waits for its SYN to be sent again (1 s,
/// then 3, 7, 15 and 31 s after the first). See `docs/operations.md`.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// Binds the server's listening socket with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted server may bind while its old
    // connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` until `stop` turns true, one hyper HTTP/1 connection per
/// accepted socket (with upgrades, for `/ws`).
fn serve(
    listener: TcpListener,
    router: Router,
    send_buffer: Option<usize>,
    timeouts: HttpTimeouts,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    tokio::spawn(async move {
        // Every connection task holds a sender; `recv` answers `None` once all of
        // them have ended.
        let (alive, mut all_ended) = tokio::sync::mpsc::channel::<()>(1);
        loop {
            let (tcp, peer) = tokio::select! {
                // Either a shutdown request or the sender dropping ends serving.
                () = async { let _ = stop.wait_for(|&stop| stop).await; } => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors (EMFILE) and the like: don't spin, and
                        // go on once some are free again.
                        tracing::error!(error = %err, "accept failed; pausing");
                        metrics::counter!("pollcast_http_accept_errors_total").increment(1);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Events are small and latency-bound: never wait to fill a segment.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "TCP_NODELAY not set");
            }
            if let Some(bytes) = send_buffer
                && let Err(err) = socket2::SockRef::from(&tcp).set_send_buffer_size(bytes)
            {
                tracing::debug!(error = %err, "SO_SNDBUF not set");
            }
            let router = router.clone();
            let service = tower::service_fn(
                move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                    // What `into_make_service_with_connect_info` would add: the rate
                    // limiter keys anonymous writes by it.
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let mut router = router.clone();
                    async move { tower::Service::call(&mut router, request).await }
                },
            );
            let connection = http
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tcp),
                    hyper_util::service::TowerToHyperService::new(service),
                )
                .with_upgrades();
            let alive = alive.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let _alive = alive;
                let mut connection = std::pin::pin!(connection);
                let ended = tokio::select! {
                    ended = connection.as_mut() => ended,
                    // The guard `wait_for` returns is not `Send`: drop it inside.
                    () = async { let _ = stop.wait_for(|&stop| stop).await; } => {
                        // Finish the request in flight, then close.
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(err) = ended {
                    if err.is_timeout() {
                        metrics::counter!("pollcast_http_timeouts_total", "kind" => "header_read")
                            .increment(1);
                    }
                    tracing::debug!(error = %err, "HTTP connection ended");
                }
            });
        }
        drop(listener);
        drop(alive);
        if tokio::time::timeout(timeouts.shutdown_grace, all_ended.recv())
            .await
            .is_err()
        {
            tracing::warn!("HTTP requests still in flight after the grace period");
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listening socket's accept queue is the one asked for, as far as the
    /// kernel allows: `ss` shows a listener's queue limit as its Send-Q.
    #[tokio::test]
    async fn the_listener_asks_for_a_deep_accept_queue() {
        let listener = listen(([127, 0, 0, 1], 0).into()).expect("bind");
        let port = listener.local_addr().expect("address").port();
        let shown = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("`ss` (iproute2) runs");
        let shown = String::from_utf8_lossy(&shown.stdout);
        // State, Recv-Q, Send-Q, local address, peer address.
        let queue: u32 = shown
            .split_whitespace()
            .nth(2)
            .and_then(|field| field.parse().ok())
            .unwrap_or_else(|| panic!("no listener in {shown:?}"));
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("somaxconn")
            .trim()
            .parse()
            .expect("a number");
        assert_eq!(queue, LISTEN_BACKLOG.min(somaxconn));
        // What tokio's `TcpListener::bind` would have asked for is less, on any
        // kernel that allows more.
        assert!(queue > 1024 || somaxconn <= 1024, "queue {queue}");
    }
}
