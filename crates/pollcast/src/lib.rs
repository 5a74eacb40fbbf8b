//! The `pollcast` server as a library: configuration, wiring of store, domain,
//! relay and API, and graceful shutdown. `main.rs` only parses the command line and
//! calls [`Server::start`], so tests start the real server on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use pollcast_domain::{Domain, DomainConfig};
use pollcast_stream::EventStream;
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
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    domain: Domain,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    relay: JoinHandle<()>,
}

impl Server {
    /// Connects to the database (applying migrations), starts the outbox relay and
    /// serves the API on `listener`.
    pub async fn start(
        listener: TcpListener,
        settings: Settings,
        stream: Arc<dyn EventStream>,
    ) -> anyhow::Result<Server> {
        let addr = listener.local_addr().context("listener address")?;
        let db = pollcast_store::connect(&settings.database_url, settings.db_max_connections)
            .await
            .context("connecting to the database")?;
        let domain = Domain::new(db, stream, &settings.secret, settings.domain);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let relay = tokio::spawn(domain.relay().run(shutdown_rx.clone()));

        let mut router = pollcast_api::router(domain.clone());
        if let Some(handle) = settings.metrics {
            router = router.route("/metrics", get(move || std::future::ready(handle.render())));
        }
        let mut stop = shutdown_rx;
        let http = tokio::spawn(async move {
            axum::serve(listener, router)
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
            shutdown,
            http,
            relay,
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

    /// Stops accepting requests, finishes those in flight, publishes pending events
    /// and returns.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.http
            .await
            .context("http task")?
            .context("http server")?;
        self.relay.await.context("relay task")?;
        Ok(())
    }
}
