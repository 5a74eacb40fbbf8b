//! The embedded engine: a bounded in-process log per session.
//!
//! It gives a single node exactly the semantics a JetStream deployment has, so
//! `pollcast serve` needs nothing else installed. History lives in memory: after a
//! restart it starts empty, and a client reconnecting with an older id is told its
//! replay could not be recovered.
//!
//! Besides the per-session retention, all sessions' history together stays within
//! a memory budget: past it, the history of the sessions that were quiet longest is
//! trimmed first (down to 90 % of the budget), and a replay that reaches into what
//! was trimmed answers `recovered: false`.

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
/// Default memory budget for all sessions' history.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// In-process event stream.
pub struct EmbeddedStream {
    retention: Retention,
    /// Bytes all sessions' history may take (an estimate: see [`cost`]).
    budget: usize,
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
    /// Estimated bytes of all retained events.
    bytes: usize,
}

struct SessionLog {
    /// Retained events, oldest first, at consecutive positions, with their cost.
    events: VecDeque<(Arc<SessionEvent>, usize)>,
    /// Estimated bytes of `events`.
    bytes: usize,
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
            bytes: 0,
            newest: 0,
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }

    fn oldest(&self) -> Option<u64> {
        self.events.front().map(|(e, _)| e.position)
    }

    /// When the session last had an event (0 when it has none retained).
    fn last_active(&self) -> i64 {
        self.events
            .back()
            .map_or(0, |(e, _)| e.timestamp.unix_millis())
    }

    /// Drops the oldest event; returns its cost.
    fn pop_oldest(&mut self) -> usize {
        let freed = self.events.pop_front().map_or(0, |(_, cost)| cost);
        self.bytes -= freed;
        freed
    }

    /// Applies the per-session retention; returns the bytes freed.
    fn trim(&mut self, retention: Retention, now: Timestamp) -> usize {
        let max_age_ms = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now.unix_millis().saturating_sub(max_age_ms);
        let mut freed = 0;
        while self.events.len() > retention.max_events
            || self
                .events
                .front()
                .is_some_and(|(e, _)| e.timestamp.unix_millis() < cutoff)
        {
            freed += self.pop_oldest();
        }
        freed
    }
}

/// What an event costs in memory, estimated: the struct, its allocation, and its
/// content measured as JSON (strings and ids dominate; the JSON length tracks them).
fn cost(event: &SessionEvent) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Serialising into a counter cannot fail.
    let _ = serde_json::to_writer(&mut counter, &event.event);
    std::mem::size_of::<SessionEvent>() + 64 + counter.0
}

impl State {
    /// Trims the history of the sessions quiet longest until all of it fits in 90 %
    /// of `budget`.
    fn shed(&mut self, budget: usize) {
        let target = budget / 10 * 9;
        let mut quietest: Vec<(i64, Uuid)> = self
            .sessions
            .iter()
            .filter(|(_, log)| !log.events.is_empty())
            .map(|(id, log)| (log.last_active(), *id))
            .collect();
        quietest.sort_unstable();
        for (_, id) in quietest {
            let Some(log) = self.sessions.get_mut(&id) else {
                continue;
            };
            while self.bytes > target && !log.events.is_empty() {
                self.bytes -= log.pop_oldest();
            }
            if self.bytes <= target {
                break;
            }
        }
        metrics::counter!("pollcast_embedded_history_shed_total").increment(1);
    }
}

impl EmbeddedStream {
    /// An empty stream keeping `retention` worth of history per session, within
    /// the default memory budget.
    pub fn new(retention: Retention) -> Self {
        Self::with_budget(retention, DEFAULT_BUDGET)
    }

    /// An empty stream keeping `retention` worth of history per session and at
    /// most about `budget` bytes of history in all.
    pub fn with_budget(retention: Retention, budget: usize) -> Self {
        Self {
            retention,
            budget,
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
            let State {
                sessions, bytes, ..
            } = &mut *state;
            sessions.retain(|_, log| {
                let keep = log.live.receiver_count() > 0
                    || log
                        .events
                        .back()
                        .is_some_and(|(e, _)| e.timestamp.unix_millis() >= cutoff);
                if !keep {
                    *bytes -= log.bytes;
                }
                keep
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
        let event_cost = cost(&event);
        log.newest = event.position;
        log.events.push_back((Arc::clone(&event), event_cost));
        log.bytes += event_cost;
        let freed = log.trim(retention, now);
        // No receivers is the normal case for a room nobody watches.
        let _ = log.live.send(event);
        state.bytes = state.bytes + event_cost - freed;
        if state.bytes > self.budget {
            state.shed(self.budget);
        }
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
        let events = log
            .events
            .iter()
            .skip(skip)
            .take(limit)
            .map(|(e, _)| Arc::clone(e))
            .collect();
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
            lagged: None,
        }))
    }
}

struct EmbeddedPresence {
    receiver: broadcast::Receiver<PresenceSignal>,
    /// Signals skipped while a batch was being gathered, reported by the next
    /// call so the batch gathered before them is not lost.
    lagged: Option<u64>,
}

#[async_trait]
impl PresenceSignals for EmbeddedPresence {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<PresenceSignal>, StreamError> {
        if let Some(skipped) = self.lagged.take() {
            return Err(StreamError::Lagged { skipped });
        }
        let first = match self.receiver.recv().await {
            Ok(signal) => signal,
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                return Err(StreamError::Lagged { skipped });
            }
            Err(broadcast::error::RecvError::Closed) => return Err(StreamError::Closed),
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match self.receiver.try_recv() {
                Ok(signal) => batch.push(signal),
                Err(broadcast::error::TryRecvError::Lagged(skipped)) => {
                    self.lagged = Some(skipped);
                    break;
                }
                // Empty, or closed: the next call says which.
                Err(_) => break,
            }
        }
        Ok(batch)
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
    use super::*;
    use crate::conformance::event;

    crate::stream_conformance_tests!(|retention| async move {
        std::sync::Arc::new(crate::EmbeddedStream::new(retention))
    });

    #[tokio::test]
    async fn past_the_memory_budget_the_quietest_sessions_lose_history_first() {
        let one = cost(&event(Uuid::now_v7(), 1));
        // Room for about 100 events in all.
        let stream = EmbeddedStream::with_budget(Retention::default(), one * 100);
        let (quiet, busy) = (Uuid::now_v7(), Uuid::now_v7());
        for p in 1..=40 {
            stream.publish(event(quiet, p)).await.expect("publish");
        }
        for p in 1..=80 {
            stream.publish(event(busy, p)).await.expect("publish");
        }
        let quiet_read = stream.read_after(quiet, 0, 1000).await.expect("read");
        let busy_read = stream.read_after(busy, 0, 1000).await.expect("read");
        assert!(
            quiet_read.truncated,
            "the quiet session lost its oldest events"
        );
        assert!(!busy_read.truncated, "the busy session kept all of its own");
        assert_eq!(busy_read.events.len(), 80);
        {
            let state = stream.state();
            assert!(
                state.bytes <= one * 100,
                "{} bytes over a budget of {}",
                state.bytes,
                one * 100
            );
            let counted: usize = state.sessions.values().map(|log| log.bytes).sum();
            assert_eq!(counted, state.bytes, "the books balance");
        }
        // Repeats are still recognised after trimming.
        assert_eq!(
            stream.publish(event(quiet, 3)).await.ok(),
            Some(Published::Duplicate)
        );
    }
}
