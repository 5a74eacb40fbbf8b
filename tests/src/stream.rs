//! An event stream that can be switched off, to simulate an outage of the stream
//! between commit and publish. It wraps the real embedded engine; while off, every
//! call fails the way an unreachable engine does. A read trap makes the next
//! read of the log wait for the test and every read after it fail, as a replay
//! whose engine stops answering midway. Holding the live events back makes
//! the rooms fall behind the log, as a loaded edge's do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use pollcast_protocol::{PresenceKind, PresenceSignal, SessionEvent};
use pollcast_stream::{
    EmbeddedStream, EventStream, LiveEvents, PresenceFeed, Published, ReadBatch, StreamError,
    Subscription,
};
use uuid::Uuid;

/// An embedded stream with an on/off switch.
pub struct SwitchableStream {
    inner: EmbeddedStream,
    down: AtomicBool,
    /// Presence signals reported, by kind: connected, seen, disconnected.
    reported: [std::sync::atomic::AtomicUsize; 3],
    /// Events published again after the stream already held them.
    duplicates: std::sync::atomic::AtomicUsize,
    /// Reads of the log (`read_after`) so far.
    reads: std::sync::atomic::AtomicUsize,
    trap: ReadTrap,
    /// Subscriptions numbered below this hand out no live events.
    held: tokio::sync::watch::Sender<u64>,
    /// The next subscription's number.
    subscriptions: std::sync::atomic::AtomicU64,
}

/// See [`SwitchableStream::arm_read_trap`].
struct ReadTrap {
    armed: AtomicBool,
    /// Reads of the log since the trap was armed.
    reads: std::sync::atomic::AtomicUsize,
    arrived: tokio::sync::Notify,
    /// The first read passes when it gets a permit.
    release: tokio::sync::Semaphore,
}

impl Default for SwitchableStream {
    fn default() -> Self {
        Self {
            inner: EmbeddedStream::default(),
            down: AtomicBool::new(false),
            reported: Default::default(),
            duplicates: Default::default(),
            reads: Default::default(),
            trap: ReadTrap::default(),
            held: tokio::sync::watch::channel(0).0,
            subscriptions: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Default for ReadTrap {
    fn default() -> Self {
        Self {
            armed: AtomicBool::new(false),
            reads: std::sync::atomic::AtomicUsize::new(0),
            arrived: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

impl SwitchableStream {
    /// A stream that starts switched off.
    pub fn down() -> Arc<Self> {
        let stream = Self::default();
        stream.down.store(true, Ordering::SeqCst);
        Arc::new(stream)
    }

    /// Switches the stream on or off.
    pub fn set_up(&self, up: bool) {
        self.down.store(!up, Ordering::SeqCst);
    }

    /// Presence signals of `kind` reported so far.
    pub fn reported(&self, kind: PresenceKind) -> usize {
        self.reported[kind as usize].load(Ordering::SeqCst)
    }

    /// Events published again after the stream already held them (the relay
    /// repeats what it could not mark as published).
    pub fn duplicates(&self) -> usize {
        self.duplicates.load(Ordering::SeqCst)
    }

    /// Reads of the log (`read_after`) so far, the failed ones included.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Holds back the live events of every subscription open now (`true`), or
    /// lets them go: the stream has the events, the rooms do not see them yet,
    /// as a loaded edge's rooms fall behind. Later subscriptions are not held,
    /// so a test can still follow the stream.
    pub fn hold_live(&self, held: bool) {
        let below = if held {
            self.subscriptions.load(Ordering::SeqCst)
        } else {
            0
        };
        self.held.send_replace(below);
    }

    /// From now on, the next `read_after` waits until
    /// [`Self::release_first_read`], and every one after it fails.
    pub fn arm_read_trap(&self) {
        self.trap.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until the trapped first read has arrived.
    pub async fn first_read_waiting(&self) {
        loop {
            let arrived = self.trap.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.trap.reads.load(Ordering::SeqCst) > 0 {
                return;
            }
            arrived.await;
        }
    }

    /// Lets the trapped first read through.
    pub fn release_first_read(&self) {
        self.trap.release.add_permits(1);
    }

    fn check(&self) -> Result<(), StreamError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StreamError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl EventStream for SwitchableStream {
    async fn publish(&self, event: SessionEvent) -> Result<Published, StreamError> {
        self.check()?;
        let published = self.inner.publish(event).await;
        if matches!(published, Ok(Published::Duplicate)) {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
        }
        published
    }

    async fn read_after(
        &self,
        session: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<ReadBatch, StreamError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.trap.armed.load(Ordering::SeqCst) {
            let n = self.trap.reads.fetch_add(1, Ordering::SeqCst);
            self.trap.arrived.notify_waiters();
            if n > 0 {
                return Err(StreamError::Unavailable("read trap".into()));
            }
            drop(self.trap.release.acquire().await);
        }
        self.inner.read_after(session, after, limit).await
    }

    async fn newest(&self, session: Uuid) -> Result<Option<u64>, StreamError> {
        self.inner.newest(session).await
    }

    async fn subscribe(&self, session: Uuid) -> Result<Subscription, StreamError> {
        Ok(Box::new(Held {
            inner: self.inner.subscribe(session).await?,
            number: self.subscriptions.fetch_add(1, Ordering::SeqCst),
            held: self.held.subscribe(),
        }))
    }

    async fn ping(&self) -> Result<(), StreamError> {
        self.check()
    }

    async fn report_presence(&self, signal: PresenceSignal) -> Result<(), StreamError> {
        self.check()?;
        self.reported[signal.kind as usize].fetch_add(1, Ordering::SeqCst);
        self.inner.report_presence(signal).await
    }

    async fn presence(&self) -> Result<PresenceFeed, StreamError> {
        self.inner.presence().await
    }
}

/// A subscription that hands nothing out while the stream holds it.
struct Held {
    inner: Subscription,
    number: u64,
    held: tokio::sync::watch::Receiver<u64>,
}

#[async_trait]
impl LiveEvents for Held {
    async fn next(&mut self) -> Result<Arc<SessionEvent>, StreamError> {
        // Both waits are cancel-safe, as a subscription's `next` must be.
        let number = self.number;
        if self.held.wait_for(|&below| number >= below).await.is_err() {
            return Err(StreamError::Closed);
        }
        self.inner.next().await
    }
}
