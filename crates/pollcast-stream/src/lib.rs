//! The event stream: the one interface between the writers of a session's events
//! (the outbox relay) and their readers (edges, replay).
//!
//! A session's stream is a log of [`SessionEvent`]s at consecutive positions starting
//! wherever the session's first event was published. Writers publish each position
//! exactly once and in order; the stream refuses gaps and ignores repeats, which is
//! what makes the relay's at-least-once publishing exactly-once in the log.
//!
//! Engines: [`embedded::EmbeddedStream`] (in-process, the default) and
//! [`jetstream::JetStreamStream`] (NATS JetStream, for several processes). Every
//! engine must pass the [`conformance`] suite; [`connect`] builds the configured one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pollcast_protocol::{PresenceSignal, SessionEvent};
use uuid::Uuid;

pub mod conformance;
pub mod embedded;
pub mod jetstream;

pub use embedded::EmbeddedStream;
pub use jetstream::{JetStreamStream, NatsConfig};

/// What publishing did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Appended at its position.
    Appended,
    /// The position was already in the log; nothing changed.
    Duplicate,
}

/// What publishing a run of events did: how far the log took it.
#[derive(Debug, Default)]
pub struct PublishedRun {
    /// How many of the run's events, from its start, the log now holds (appended
    /// or already there).
    pub taken: usize,
    /// Why the rest was not taken; `None` when the whole run was.
    pub stopped: Option<StreamError>,
}

/// Events read from a session's log.
#[derive(Clone, Debug, Default)]
pub struct ReadBatch {
    /// Events after the requested position, in order, at most the requested number.
    pub events: Vec<Arc<SessionEvent>>,
    /// True when the log no longer holds (or never held) the event right after the
    /// requested position: the reader cannot be brought up to date from the log.
    pub truncated: bool,
}

/// How much history an engine keeps per session. The contract asks for at least
/// 24 hours or 100 000 events, whichever is less.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Most events kept per session; older ones are dropped first.
    pub max_events: usize,
    /// Events older than this are dropped.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_events: 100_000,
            max_age: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// Why a stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The position is not the next one of the session: an earlier event has not
    /// been published yet. The publisher should publish the missing ones first.
    #[error("session {session}: expected position {expected}, got {got}")]
    OutOfOrder {
        /// The session.
        session: Uuid,
        /// The position the log will accept next.
        expected: u64,
        /// The position offered.
        got: u64,
    },
    /// Position 0 is never valid: positions start at 1.
    #[error("position 0 is not a stream position")]
    InvalidPosition,
    /// A subscriber fell so far behind that live events were dropped for it; it
    /// should catch up by reading from the log.
    #[error("subscriber lagged; {skipped} events skipped")]
    Lagged {
        /// How many events it missed.
        skipped: u64,
    },
    /// The subscription ended (the engine shut down).
    #[error("subscription closed")]
    Closed,
    /// The engine cannot be reached.
    #[error("event stream unavailable: {0}")]
    Unavailable(String),
    /// The engine holds something that is not a pollcast event.
    #[error("event stream holds an undecodable message: {0}")]
    Corrupt(String),
}

/// Live events of one session, from the moment of subscribing on.
#[async_trait]
pub trait LiveEvents: Send {
    /// The next live event. [`StreamError::Lagged`] means some were skipped.
    async fn next(&mut self) -> Result<Arc<SessionEvent>, StreamError>;
}

/// A subscription to one session's live events.
pub type Subscription = Box<dyn LiveEvents>;

/// Presence signals from every edge, from the moment of subscribing on.
#[async_trait]
pub trait PresenceSignals: Send {
    /// Waits for the next signal, then returns it with the signals already
    /// waiting behind it, at most `max` (at least 1), in order: a reconnect wave
    /// is then applied in a few transactions rather than one per signal.
    /// [`StreamError::Lagged`] means some were skipped. A durable feed
    /// acknowledges a batch when the next one is asked for, that is, once the
    /// caller has applied it.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<PresenceSignal>, StreamError>;
}

/// A subscription to presence signals.
pub type PresenceFeed = Box<dyn PresenceSignals>;

/// The event stream, whichever engine runs it.
#[async_trait]
pub trait EventStream: Send + Sync + 'static {
    /// Appends `event` at `event.position` of its session's log.
    ///
    /// Accepts the next position (or any position for a session the log has never
    /// seen), ignores a position already present, refuses a gap.
    async fn publish(&self, event: SessionEvent) -> Result<Published, StreamError>;

    /// Publishes `events`, one session's events in position order, as [`publish`]
    /// would one after another, stopping at the first one refused. An engine whose
    /// publish is a round trip takes a run in fewer of them: a busy session's
    /// events would otherwise be paced by one acknowledgement at a time.
    ///
    /// [`publish`]: EventStream::publish
    async fn publish_run(&self, events: Vec<SessionEvent>) -> PublishedRun {
        publish_each(self, events).await
    }

    /// Reads up to `limit` events after position `after` (0 = from the beginning).
    async fn read_after(
        &self,
        session: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<ReadBatch, StreamError>;

    /// The newest position of the session, `None` before its first event.
    async fn newest(&self, session: Uuid) -> Result<Option<u64>, StreamError>;

    /// Subscribes to the session's events published from now on.
    async fn subscribe(&self, session: Uuid) -> Result<Subscription, StreamError>;

    /// Answers when the engine can serve requests (used by `/readyz`).
    async fn ping(&self) -> Result<(), StreamError>;

    /// Reports a participant's connection coming, answering a heartbeat, or going.
    /// Edges report; the domain consumes and turns them into state and events.
    async fn report_presence(&self, signal: PresenceSignal) -> Result<(), StreamError>;

    /// Subscribes to the presence signals of every edge.
    async fn presence(&self) -> Result<PresenceFeed, StreamError>;
}

/// [`EventStream::publish_run`] as one [`EventStream::publish`] per event.
pub async fn publish_each<S: EventStream + ?Sized>(
    stream: &S,
    events: Vec<SessionEvent>,
) -> PublishedRun {
    let mut run = PublishedRun::default();
    for event in events {
        if let Err(err) = stream.publish(event).await {
            run.stopped = Some(err);
            break;
        }
        run.taken += 1;
    }
    run
}

/// Which engine to run, and how much history it keeps.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// History kept per session.
    pub retention: Retention,
    /// Bytes of history the embedded engine keeps in memory across all sessions.
    pub memory_budget: usize,
    /// `Some`: the JetStream engine on these servers; `None`: the embedded engine.
    pub nats: Option<NatsConfig>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            memory_budget: embedded::DEFAULT_BUDGET,
            nats: None,
        }
    }
}

impl StreamConfig {
    /// Whether this engine's log lives only in this process (and so only this
    /// process can be the whole deployment).
    pub fn is_embedded(&self) -> bool {
        self.nats.is_none()
    }
}

/// Builds the engine `config` asks for: the embedded one at once, or a JetStream
/// one once NATS answers and its streams exist.
pub async fn connect(config: &StreamConfig) -> Result<Arc<dyn EventStream>, StreamError> {
    Ok(match &config.nats {
        None => Arc::new(EmbeddedStream::with_budget(
            config.retention,
            config.memory_budget,
        )),
        Some(nats) => Arc::new(JetStreamStream::connect(nats.clone(), config.retention).await?),
    })
}
