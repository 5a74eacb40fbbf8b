//! The embedded engine: a bounded in-process log per session.
//!
//! It gives a single node exactly the semantics a JetStream deployment has, so
//! `pollcast serve` needs nothing else installed. History lives in memory: after a
//! restart it starts empty, and a client reconnecting with an older id is told its
//! replay could not be recovered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use pollcast_protocol::{PresenceSignal, SessionEvent, Timestamp};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::{
    EventStream, LiveEvents, PresenceFeed, PresenceSignals, Published, ReadBatch, Retention,
    StreamError, Subscription,
};

/// Live events buffered per subscriber before it counts as lagging.
const LIVE_BUFFER: usize = 4096;
/// Publishes between sweeps for sessions idle longer than the retention age.
const SWEEP_EVERY: u64 = 4096;
/// Presence signals buffered per consumer; a heartbeat round of a large room fits.
const PRESENCE_BUFFER: usize = 1 << 16;

/// In-process event stream.
pub struct EmbeddedStream {
    retention: Retention,
    /// One log per session; a plain mutex because every critical section is a few
    /// pointer moves and never awaits.
    state: Mutex<State>,
    /// Presence signals from edges to the domain.
    presence: broadcast::Sender<PresenceSignal>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<Uuid, SessionLog>,
    publishes: u64,
}

struct SessionLog {
    /// Retained events, oldest first, at consecutive positions.
    events: VecDeque<Arc<SessionEvent>>,
    /// Newest position ever appended; kept when trimming empties `events` so that
    /// repeats are still recognised.
    newest: u64,
    /// Fan-out to live subscribers.
    live: broadcast::Sender<Arc<SessionEvent>>,
}

impl SessionLog {
    fn new() -> Self {
        Self {
            events: VecDeque::new(),
            newest: 0,
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }

    fn oldest(&self) -> Option<u64> {
        self.events.front().map(|e| e.position)
    }

    fn trim(&mut self, retention: Retention, now: Timestamp) {
        let max_age_ms = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now.unix_millis().saturating_sub(max_age_ms);
        while self.events.len() > retention.max_events
            || self
                .events
                .front()
                .is_some_and(|e| e.timestamp.unix_millis() < cutoff)
        {
            self.events.pop_front();
        }
    }
}

impl EmbeddedStream {
    /// An empty stream keeping `retention` worth of history per session.
    pub fn new(retention: Retention) -> Self {
        Self {
            retention,
            state: Mutex::new(State::default()),
            presence: broadcast::channel(PRESENCE_BUFFER).0,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a log half-updated in a way
        // that matters more than losing the node, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for EmbeddedStream {
    fn default() -> Self {
        Self::new(Retention::default())
    }
}

#[async_trait]
impl EventStream for EmbeddedStream {
    async fn publish(&self, event: SessionEvent) -> Result<Published, StreamError> {
        if event.position == 0 {
            return Err(StreamError::InvalidPosition);
        }
        let now = Timestamp::now();
        let retention = self.retention;
        let mut state = self.state();
        state.publishes += 1;
        if state.publishes.is_multiple_of(SWEEP_EVERY) {
            let cutoff = now.unix_millis()
                - i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
            state.sessions.retain(|_, log| {
                log.live.receiver_count() > 0
                    || log
                        .events
                        .back()
                        .is_some_and(|e| e.timestamp.unix_millis() >= cutoff)
            });
        }
        let log = state
            .sessions
            .entry(event.session_id)
            .or_insert_with(SessionLog::new);
        if log.newest != 0 {
            if event.position <= log.newest {
                return Ok(Published::Duplicate);
            }
            if event.position != log.newest + 1 {
                return Err(StreamError::OutOfOrder {
                    session: event.session_id,
                    expected: log.newest + 1,
                    got: event.position,
                });
            }
        }
        let event = Arc::new(event);
        log.newest = event.position;
        log.events.push_back(Arc::clone(&event));
        log.trim(retention, now);
        // No receivers is the normal case for a room nobody watches.
        let _ = log.live.send(event);
        Ok(Published::Appended)
    }

    async fn read_after(
        &self,
        session: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<ReadBatch, StreamError> {
        let state = self.state();
        let Some(log) = state.sessions.get(&session) else {
            // Never seen: only "from the beginning" is a position we can vouch for.
            return Ok(ReadBatch {
                events: Vec::new(),
                truncated: after != 0,
            });
        };
        if after >= log.newest {
            return Ok(ReadBatch {
                events: Vec::new(),
                truncated: after > log.newest,
            });
        }
        let Some(oldest) = log.oldest() else {
            return Ok(ReadBatch {
                events: Vec::new(),
                truncated: true,
            });
        };
        let truncated = after + 1 < oldest;
        let skip = usize::try_from((after + 1).saturating_sub(oldest)).unwrap_or(usize::MAX);
        let events = log.events.iter().skip(skip).take(limit).cloned().collect();
        Ok(ReadBatch { events, truncated })
    }

    async fn newest(&self, session: Uuid) -> Result<Option<u64>, StreamError> {
        Ok(self
            .state()
            .sessions
            .get(&session)
            .map(|log| log.newest)
            .filter(|&n| n != 0))
    }

    async fn subscribe(&self, session: Uuid) -> Result<Subscription, StreamError> {
        let mut state = self.state();
        let log = state
            .sessions
            .entry(session)
            .or_insert_with(SessionLog::new);
        Ok(Box::new(EmbeddedSubscription {
            receiver: log.live.subscribe(),
        }))
    }

    async fn ping(&self) -> Result<(), StreamError> {
        Ok(())
    }

    async fn report_presence(&self, signal: PresenceSignal) -> Result<(), StreamError> {
        // Nobody listening (no domain in this process) is not the reporter's problem.
        let _ = self.presence.send(signal);
        Ok(())
    }

    async fn presence(&self) -> Result<PresenceFeed, StreamError> {
        Ok(Box::new(EmbeddedPresence {
            receiver: self.presence.subscribe(),
        }))
    }
}

struct EmbeddedPresence {
    receiver: broadcast::Receiver<PresenceSignal>,
}

#[async_trait]
impl PresenceSignals for EmbeddedPresence {
    async fn next(&mut self) -> Result<PresenceSignal, StreamError> {
        match self.receiver.recv().await {
            Ok(signal) => Ok(signal),
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                Err(StreamError::Lagged { skipped })
            }
            Err(broadcast::error::RecvError::Closed) => Err(StreamError::Closed),
        }
    }
}

struct EmbeddedSubscription {
    receiver: broadcast::Receiver<Arc<SessionEvent>>,
}

#[async_trait]
impl LiveEvents for EmbeddedSubscription {
    async fn next(&mut self) -> Result<Arc<SessionEvent>, StreamError> {
        match self.receiver.recv().await {
            Ok(event) => Ok(event),
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                Err(StreamError::Lagged { skipped })
            }
            Err(broadcast::error::RecvError::Closed) => Err(StreamError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    crate::stream_conformance_tests!(|retention| async move {
        std::sync::Arc::new(crate::EmbeddedStream::new(retention))
    });
}
