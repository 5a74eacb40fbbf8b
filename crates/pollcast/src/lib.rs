//! The `pollcast` server as a library: configuration, wiring of store, domain,
//! relay and API, and graceful shutdown. `main.rs` only parses the command line and
//! calls [`Server::start`], so tests start the real server on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use axum::serve::ListenerExt;
use metrics_exporter_prometheus::PrometheusHandle;
use pollcast_api::RateLimitConfig;
use pollcast_domain::{Domain, DomainConfig};
use pollcast_edge::{Edge, EdgeConfig};
use pollcast_stream::{EventStream, Retention};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod config;

pub use config::Config;

/// Everything a server needs besides its listener and event stream.
#[derive(Clone)]
pub struct Settings {
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Pool size for PostgreSQL (SQLite always uses one connection).
    pub db_max_connections: u32,
    /// Token signing secret.
    pub secret: Vec<u8>,
    /// Domain settings.
    pub domain: DomainConfig,
    /// Where `/metrics` reads from; `None` serves no `/metrics` route.
    pub metrics: Option<PrometheusHandle>,
    /// WebSocket edge settings.
    pub edge: EdgeConfig,
    /// Limits on writes (429).
    pub rate_limits: RateLimitConfig,
    /// This process is the whole deployment (the embedded stream): at start-up it
    /// republishes the retained history from the outbox (the embedded log does not
    /// survive restarts) and marks every participant disconnected (no connection
    /// can exist yet). Never set it when several nodes share a database.
    pub single_node: bool,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    domain: Domain,
    edge: Edge,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    relay: JoinHandle<()>,
    presence: JoinHandle<()>,
}

impl Server {
    /// Connects to the database (applying migrations), starts the outbox relay and
    /// the presence tracker, and serves the API and the WebSocket edge (`/ws`) on
    /// `listener`.
    pub async fn start(
        listener: TcpListener,
        settings: Settings,
        stream: Arc<dyn EventStream>,
    ) -> anyhow::Result<Server> {
        let addr = listener.local_addr().context("listener address")?;
        let db = pollcast_store::connect(&settings.database_url, settings.db_max_connections)
            .await
            .context("connecting to the database")?;
        let domain = Domain::new(db, Arc::clone(&stream), &settings.secret, settings.domain);
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
        let (shutdown, shutdown_rx) = watch::channel(false);
        let relay = tokio::spawn(relay.run(shutdown_rx.clone()));
        let presence = tokio::spawn(domain.presence_tracker().run(shutdown_rx.clone()));
        let send_buffer = settings.edge.socket_send_buffer;
        let edge = Edge::new(settings.edge, stream, domain.token_keys().clone());

        let mut router =
            pollcast_api::router(domain.clone(), settings.rate_limits).merge(edge.router());
        if let Some(handle) = settings.metrics {
            router = router.route("/metrics", get(move || std::future::ready(handle.render())));
        }
        let listener = listener.tap_io(move |tcp| {
            // Events are small and latency-bound: never wait to fill a segment.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "TCP_NODELAY not set");
            }
            if let Some(bytes) = send_buffer
                && let Err(err) = socket2::SockRef::from(&*tcp).set_send_buffer_size(bytes)
            {
                tracing::debug!(error = %err, "SO_SNDBUF not set");
            }
        });
        let mut stop = shutdown_rx;
        let http = tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                // Either a shutdown request or the sender dropping ends serving.
                let _ = stop.wait_for(|&stop| stop).await;
            })
            .await
        });
        tracing::info!(%addr, "pollcast listening");
        Ok(Server {
            addr,
            domain,
            edge,
            shutdown,
            http,
            relay,
            presence,
        })
    }

    /// The address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The domain services (tests drive and inspect through them).
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The WebSocket edge.
    pub fn edge(&self) -> &Edge {
        &self.edge
    }

    /// Closes WebSocket connections (1001, after flushing their queues), stops
    /// accepting requests, finishes those in flight, publishes pending events and
    /// returns.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.edge.shutdown().await;
        let _ = self.shutdown.send(true);
        self.http
            .await
            .context("http task")?
            .context("http server")?;
        self.relay.await.context("relay task")?;
        self.presence.await.context("presence task")?;
        Ok(())
    }
}
