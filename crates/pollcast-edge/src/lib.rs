//! The WebSocket edge: holds client connections, fans a session's events out to
//! its room, replays what a reconnecting client missed, runs the heartbeat, and
//! drops slow consumers instead of slowing the room down.
//!
//! An edge needs no database. Tokens are verified with the shared secret; that a
//! session exists, its events and its newest position all come from the event
//! stream; presence goes back to the domain through the stream.
//!
//! Files follow the life of a connection: [`query`] (what the client asked for),
//! [`limits`] (may it connect), [`room`] (the session's fan-out; `members`, its
//! connections indexed by audience), [`frame`] (bytes
//! encoded once per format), [`recent`] (a room's recent events, for replays),
//! [`pager`] (reading the log after a position),
//! `connection` (the per-connection task: replay, live events, heartbeat, closing),
//! `reader` (client frames), [`close`] (every reason to close, and its codes).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fastwebsockets::upgrade::IncomingUpgrade;
use pollcast_protocol::Origin;
use pollcast_protocol::token::TokenKeys;
use pollcast_stream::EventStream;
use tokio::sync::watch;

pub mod close;
mod connection;
pub mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod limits;
mod members;
pub mod outlet;
pub mod pager;
pub mod query;
mod reader;
pub mod recent;
pub mod room;

/// Settings of an edge node.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// How often `heartbeat:ping` is sent.
    pub heartbeat_interval: Duration,
    /// How long without `heartbeat:pong` before the connection is closed (4408).
    pub heartbeat_timeout: Duration,
    /// Most connections this node holds.
    pub max_connections: usize,
    /// Most connections one participant may hold on this node.
    pub max_connections_per_participant: usize,
    /// Bytes a connection may have queued and unsent before it counts as a slow
    /// consumer and is closed (4500).
    pub send_queue_bytes: usize,
    /// Longest a single write to a client may take before the connection is
    /// dropped without ceremony (a peer that stopped acknowledging TCP).
    pub write_timeout: Duration,
    /// Longest graceful shutdown waits for connections to flush and close.
    pub shutdown_grace: Duration,
    /// How long a connection to a session the stream does not know yet waits for
    /// the session's first event before it is refused with 4404.
    pub session_wait: Duration,
    /// Kernel send buffer per accepted socket (`SO_SNDBUF`), applied by the server
    /// that owns the listener. Bounding it keeps a stalled client from parking
    /// megabytes in the kernel (Linux grows it to 4 MiB on its own) and makes
    /// [`EdgeConfig::send_queue_bytes`] the limit that decides who is slow.
    /// `None` leaves the kernel's autotuning alone.
    pub socket_send_buffer: Option<usize>,
    /// Browser origins whose pages may connect (others get 4403). Empty: any
    /// origin, and clients that send none.
    pub allowed_origins: Vec<Origin>,
    /// How long a room stays open (subscribed, keeping its recent events for
    /// replays) after its last member left.
    pub room_linger: Duration,
    /// Bytes of recent events a room keeps in memory per member, for the
    /// replays of clients that reconnect (at least 256 KiB a room, at most
    /// 32 MiB). 0 keeps none: every replay reads the event stream.
    pub room_window_per_member: usize,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(60),
            max_connections: 50_000,
            max_connections_per_participant: 5,
            send_queue_bytes: 1 << 20,
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            session_wait: Duration::from_secs(2),
            socket_send_buffer: Some(256 * 1024),
            allowed_origins: Vec::new(),
            room_linger: room::LINGER,
            room_window_per_member: recent::BUDGET_PER_MEMBER,
        }
    }
}

/// One edge node; cheap to clone.
#[derive(Clone)]
pub struct Edge {
    inner: Arc<Inner>,
}

struct Inner {
    config: EdgeConfig,
    stream: Arc<dyn EventStream>,
    keys: TokenKeys,
    rooms: Arc<room::Rooms>,
    limits: limits::Limits,
    /// Turns true when the node shuts down; every connection watches it.
    shutdown: watch::Sender<bool>,
}

impl Edge {
    /// An edge over `stream`, verifying tokens with `keys`.
    pub fn new(config: EdgeConfig, stream: Arc<dyn EventStream>, keys: TokenKeys) -> Self {
        let limits = limits::Limits::new(
            config.max_connections,
            config.max_connections_per_participant,
        );
        Self {
            inner: Arc::new(Inner {
                rooms: Arc::new(room::Rooms::new(
                    Arc::clone(&stream),
                    config.room_linger,
                    config.room_window_per_member,
                )),
                config,
                stream,
                keys,
                limits,
                shutdown: watch::channel(false).0,
            }),
        }
    }

    /// `GET /ws`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ws", get(upgrade))
            .with_state(self.clone())
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.inner.limits.open()
    }

    /// Resolves once no connection is open on this node (each one's room left).
    pub async fn all_closed(&self) {
        self.inner.limits.all_closed().await;
    }

    /// Closes every connection with 1001 after flushing what was queued for it,
    /// and waits (at most the configured grace) until they are gone.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        let grace = self.inner.config.shutdown_grace;
        if tokio::time::timeout(grace, self.all_closed())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.connections(),
                "connections still open after the grace period"
            );
        }
    }
}

/// Upgrades first and decides afterwards: the contract answers every refusal on
/// the WebSocket itself (`connection:error`, then a close code).
async fn upgrade(
    State(edge): State<Edge>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<IncomingUpgrade, StatusCode>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response();
    };
    let (response, socket) = match upgrade.upgrade() {
        Ok(parts) => parts,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return (StatusCode::BAD_REQUEST, "bad WebSocket upgrade").into_response();
        }
    };
    let origin = headers
        .get(header::ORIGIN)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    tokio::spawn(async move {
        // A temporary, so the task's future does not keep its slot.
        let socket = match socket.await {
            Ok(ws) => connection::halves(ws),
            Err(err) => {
                tracing::debug!(error = %err, "upgrade did not complete");
                return;
            }
        };
        connection::serve(edge, socket, query.unwrap_or_default(), origin).await;
    });
    response.into_response()
}
