//! A pollcast server started in-process for one test, with its own data.

use std::sync::Arc;
use std::time::Duration;

use pollcast::{ApiSettings, Server, Settings};
use pollcast_domain::{DomainConfig, TokenKeys};
use pollcast_stream::{EmbeddedStream, EventStream};
use tempfile::TempDir;

use crate::client::Api;
use crate::postgres::Cluster;

/// Which database a test server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the test's temporary directory.
    Sqlite,
    /// A fresh database on the shared test cluster.
    Postgres,
}

/// Secret shared by every test server, so tests can sign their own tokens.
pub const SECRET: &[u8] = b"pollcast test secret, never used outside tests";

/// A running server plus what a test needs to talk to it.
pub struct TestServer {
    /// The server.
    pub server: Server,
    /// Client for its API.
    pub api: Api,
    /// The database URL, so a restarted server can reuse the data.
    pub database_url: String,
    /// Temporary data directory, removed on drop.
    _dir: Arc<TempDir>,
}

/// How to start a test server.
pub struct Options {
    /// The event stream to publish to; default: a fresh embedded engine.
    pub stream: Arc<dyn EventStream>,
    /// Domain settings.
    pub domain: DomainConfig,
    /// WebSocket edge settings.
    pub edge: pollcast_edge::EdgeConfig,
    /// Rate limits (the defaults the binary uses).
    pub rate_limits: pollcast_api::RateLimitConfig,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stream: Arc::new(EmbeddedStream::default()),
            domain: DomainConfig::default(),
            edge: pollcast_edge::EdgeConfig::default(),
            rate_limits: pollcast_api::RateLimitConfig::default(),
        }
    }
}

impl TestServer {
    /// Starts a server on a fresh database of `backend`.
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, Options::default()).await
    }

    /// Starts a server on a fresh database of `backend` with `options`.
    pub async fn start_with(backend: Backend, options: Options) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let database_url = match backend {
            Backend::Sqlite => format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("pollcast.db").display()
            ),
            Backend::Postgres => Cluster::shared().fresh_database().await,
        };
        Self::start_on(database_url, dir, options).await
    }

    /// Starts another server on this one's database (after shutting this one down,
    /// for a restart).
    pub async fn restart(self, options: Options) -> TestServer {
        let TestServer {
            server,
            database_url,
            _dir,
            ..
        } = self;
        server.shutdown().await.expect("clean shutdown");
        Self::start_on(database_url, _dir, options).await
    }

    /// Shuts the server down gracefully; its data stays readable until the
    /// returned value is dropped.
    pub async fn stop(self) -> Stopped {
        let TestServer {
            server,
            database_url,
            _dir,
            ..
        } = self;
        server.shutdown().await.expect("clean shutdown");
        Stopped { database_url, _dir }
    }

    async fn start_on(database_url: String, dir: Arc<TempDir>, options: Options) -> TestServer {
        let listener = pollcast::listen(([127, 0, 0, 1], 0).into()).expect("bind");
        let settings = Settings {
            keys: TokenKeys::new(SECRET, Duration::from_secs(24 * 60 * 60)),
            api: Some(ApiSettings {
                database_url: database_url.clone(),
                store: pollcast_store::StoreOptions::default(),
                domain: options.domain,
                rate_limits: options.rate_limits,
                cors_origins: Vec::new(),
                single_node: true,
            }),
            edge: Some(options.edge),
            metrics: None,
            http: pollcast::HttpTimeouts::default(),
        };
        let server = Server::start(listener, settings, options.stream)
            .await
            .expect("server starts");
        let api = Api::new(format!("http://{}", server.addr()));
        TestServer {
            server,
            api,
            database_url,
            _dir: dir,
        }
    }

    /// Waits (at most 10 s) until the stream holds `position` of `session`: checks
    /// after subscribing, then follows live events, so nothing is missed between.
    pub async fn stream_reaches(&self, session: uuid::Uuid, position: u64) {
        let stream = self.server.stream();
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let mut live = stream.subscribe(session).await.expect("subscribe");
            if stream.newest(session).await.ok().flatten() >= Some(position) {
                return;
            }
            loop {
                match live.next().await {
                    Ok(event) if event.position >= position => return,
                    Ok(_) | Err(pollcast_stream::StreamError::Lagged { .. }) => {}
                    Err(err) => panic!("live events ended: {err}"),
                }
            }
        })
        .await;
        assert!(
            outcome.is_ok(),
            "stream never reached position {position} of {session}"
        );
    }

    /// Every event of the session's stream, in order, once it holds `position`.
    pub async fn events(
        &self,
        session: uuid::Uuid,
        position: u64,
    ) -> Vec<Arc<pollcast_protocol::SessionEvent>> {
        self.stream_reaches(session, position).await;
        let read = self
            .server
            .stream()
            .read_after(session, 0, usize::MAX)
            .await
            .expect("read stream");
        read.events
    }

    /// Every event of the session's stream up to and including the first one of
    /// `event_type` after position `after`, waiting (at most 10 s) for it.
    pub async fn events_through(
        &self,
        session: uuid::Uuid,
        after: u64,
        event_type: &str,
    ) -> Vec<Arc<pollcast_protocol::SessionEvent>> {
        let mut position = after + 1;
        loop {
            let events = self.events(session, position).await;
            if let Some(found) = events
                .iter()
                .position(|e| e.position > after && e.event.event_type() == event_type)
            {
                return events[..=found].to_vec();
            }
            position = events.last().map_or(position, |e| e.position + 1);
        }
    }

    /// Waits until the stream holds every event the session has committed, so a
    /// client connecting now starts after all of them.
    pub async fn settle(&self, session_id: &str) {
        let session: uuid::Uuid = session_id.parse().expect("uuid");
        let row = read_row::<pollcast_store::session::Entity>(&self.database_url, session).await;
        let last = row.last_position;
        self.stream_reaches(session, u64::try_from(last).expect("position"))
            .await;
    }
}

/// The data of a server that was shut down.
pub struct Stopped {
    /// Its database.
    pub database_url: String,
    _dir: Arc<TempDir>,
}

impl Stopped {
    /// A participant's row, read straight from the database.
    pub async fn participant(&self, id: &str) -> pollcast_store::participant::Model {
        let id: uuid::Uuid = id.parse().expect("uuid");
        read_row::<pollcast_store::participant::Entity>(&self.database_url, id).await
    }
}

/// One row by primary key, read straight from the database at `url`.
async fn read_row<E>(url: &str, id: uuid::Uuid) -> E::Model
where
    E: pollcast_store::sea_orm::EntityTrait,
    E::PrimaryKey: pollcast_store::sea_orm::PrimaryKeyTrait<ValueType = uuid::Uuid>,
{
    let db = pollcast_store::sea_orm::Database::connect(url)
        .await
        .expect("connect");
    let row = E::find_by_id(id)
        .one(&db)
        .await
        .expect("query")
        .expect("row exists");
    db.close().await.ok();
    row
}
