//! The pollcast domain: every rule of sessions, polls, votes, results, presence and
//! tokens, and the transactional outbox that gets committed changes into the event
//! stream.
//!
//! Each operation that changes a session runs in one [`tx::SessionTx`]: it locks the
//! session row first, makes the change, and writes the events the change caused to
//! the outbox at the session's next stream positions, all in one transaction. The
//! [`relay`] then publishes them. Operations take the caller's verified [`Claims`]
//! and decide for themselves who may do what; the API layer only translates.

use std::sync::Arc;
use std::time::Duration;

use pollcast_stream::EventStream;
use sea_orm::DatabaseConnection;

mod access;
mod batcher;
pub mod code;
mod convert;
pub mod error;
pub mod page;
mod participants;
mod polls;
pub mod presence;
pub mod relay;
mod results;
pub mod retention;
mod sessions;
mod store_thread;
#[cfg(test)]
mod testing;
mod tx;
pub mod validate;
mod vote_batch;
mod votes;

pub use access::Access;
pub use error::{DomainError, DomainResult, VoteRejection};
pub use page::{Page, PageRequest};
pub use participants::Joined;
pub use pollcast_protocol::token::{Claims, TokenError, TokenKeys};
pub use polls::{NewPoll, NewPollOption};
pub use results::{AUDIT_EVERY, AUDIT_QUIET};
pub use sessions::CreatedSession;
pub use votes::VoteRequest;

/// Settings of the domain services.
#[derive(Clone, Debug)]
pub struct DomainConfig {
    /// How long a `results:updated` waits to coalesce further votes. The contract
    /// allows 100 ms between a vote and the results that cover it; the rest of that
    /// budget is commit and delivery time.
    pub results_interval: Duration,
    /// When set, creating a session requires this bearer key.
    pub admin_key: Option<String>,
    /// How often heartbeat answers are written to `lastSeenAt` (in one batch), and
    /// how often the presence sweep runs.
    pub presence_flush: Duration,
    /// A connection no edge has reported for this long is taken for dead (its
    /// edge crashed or lost its link) and closed by the sweep. Must exceed the
    /// edges' heartbeat timeout plus one flush interval, or live connections of
    /// slow-answering clients are closed too.
    pub presence_timeout: Duration,
    /// How long the vote batch task and the results task wait for work before
    /// they retire (the next vote or due update starts them again).
    pub vote_batch_idle: Duration,
    /// Idempotency answers and published outbox rows older than this are removed.
    /// Never shorter than the history window: replays and the embedded engine's
    /// restore read the outbox that far back.
    pub retention: Duration,
    /// How often the clean-up runs.
    pub cleanup_every: Duration,
    /// Most polls one session may have (each is in every poll listing).
    pub max_polls_per_session: u32,
    /// Most participants one session may have.
    pub max_participants_per_session: u32,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            results_interval: Duration::from_millis(50),
            admin_key: None,
            presence_flush: Duration::from_secs(1),
            presence_timeout: Duration::from_secs(62),
            vote_batch_idle: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 60 * 60),
            cleanup_every: Duration::from_secs(60),
            max_polls_per_session: 200,
            max_participants_per_session: 100_000,
        }
    }
}

/// The domain services; cheap to clone, one per process.
#[derive(Clone)]
pub struct Domain {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    stream: Arc<dyn EventStream>,
    keys: TokenKeys,
    config: DomainConfig,
    /// Takes committed events to the relay.
    handoff: Arc<relay::Handoff>,
    /// Polls with a `results:updated` scheduled.
    results: results::Coalescer,
    /// Each session's vote batch task.
    votes: vote_batch::VoteBatches,
    /// Polls seen active, for the checks a vote makes before its batch.
    active_polls: votes::ActivePolls,
    /// Where the batch tasks run on SQLite (see [`store_thread`]); `None` on
    /// PostgreSQL, or with one CPU: they run on the caller's runtime.
    store_thread: Option<store_thread::StoreThread>,
}

impl Domain {
    /// Domain services over a migrated database and an event stream. Events reach
    /// the stream once a [`relay::Relay`] built by [`Domain::relay`] runs. On
    /// SQLite, with two CPUs or more, this starts the batch tasks' own thread
    /// and pins sqlx's SQLite thread beside it (see `store_thread.rs`).
    pub fn new(
        db: DatabaseConnection,
        stream: Arc<dyn EventStream>,
        keys: TokenKeys,
        config: DomainConfig,
    ) -> Self {
        let store_thread = (db.get_database_backend() == sea_orm::DbBackend::Sqlite)
            .then(store_thread::StoreThread::start)
            .flatten();
        Self::with_store_thread(db, stream, keys, config, store_thread)
    }

    fn with_store_thread(
        db: DatabaseConnection,
        stream: Arc<dyn EventStream>,
        keys: TokenKeys,
        config: DomainConfig,
        store_thread: Option<store_thread::StoreThread>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store_thread,
                db,
                stream,
                keys,
                results: results::Coalescer::default(),
                votes: vote_batch::VoteBatches::default(),
                active_polls: votes::ActivePolls::default(),
                config,
                handoff: Arc::default(),
            }),
        }
    }

    /// The outbox relay of this domain; run it with [`relay::Relay::run`].
    pub fn relay(&self) -> relay::Relay {
        relay::Relay::new(
            self.inner.db.clone(),
            Arc::clone(&self.inner.stream),
            Arc::clone(&self.inner.handoff),
        )
    }

    /// Verifies a bearer token.
    pub fn verify_token(&self, token: &str) -> DomainResult<Claims> {
        self.inner.keys.verify(token).map_err(|err| match err {
            TokenError::Invalid => DomainError::Unauthorized("invalid token"),
            TokenError::Expired => DomainError::Unauthorized("token expired"),
        })
    }

    /// The token keys (an edge in the same process verifies with them).
    pub fn token_keys(&self) -> &TokenKeys {
        &self.inner.keys
    }

    /// The event stream the relay publishes to.
    pub fn stream(&self) -> &Arc<dyn EventStream> {
        &self.inner.stream
    }

    /// Succeeds when both the database and the event stream answer.
    pub async fn ready(&self) -> DomainResult<()> {
        pollcast_store::ping(&self.inner.db)
            .await
            .map_err(|e| DomainError::Unavailable(format!("database: {e}")))?;
        self.inner
            .stream
            .ping()
            .await
            .map_err(|e| DomainError::Unavailable(format!("event stream: {e}")))
    }

    fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }
}
