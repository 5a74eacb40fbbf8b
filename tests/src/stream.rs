//! An event stream that can be switched off, to simulate an outage of the stream
//! between commit and publish. It wraps the real embedded engine; while off, every
//! call fails the way an unreachable engine does. Its reads can also be held, as
//! a busy engine's answers are slow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use pollcast_protocol::{PresenceKind, PresenceSignal, SessionEvent};
use pollcast_stream::{
    EmbeddedStream, EventStream, PresenceFeed, Published, ReadBatch, StreamError, Subscription,
};
use uuid::Uuid;

/// An embedded stream with an on/off switch.
#[derive(Default)]
pub struct SwitchableStream {
    inner: EmbeddedStream,
    down: AtomicBool,
    /// Presence signals reported, by kind: connected, seen, disconnected.
    reported: [std::sync::atomic::AtomicUsize; 3],
    /// Events published again after the stream already held them.
    duplicates: std::sync::atomic::AtomicUsize,
    reads: ReadGate,
}

/// Holds reads of the log (`read_after`, `newest`) while the test says so,
/// counting those in flight, as a busy engine whose answers are slow would.
struct ReadGate {
    held: AtomicBool,
    /// Waiting reads pass when it has permits (the release adds plenty).
    gate: tokio::sync::Semaphore,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    arrived: tokio::sync::Notify,
}

impl Default for ReadGate {
    fn default() -> Self {
        Self {
            held: AtomicBool::new(false),
            gate: tokio::sync::Semaphore::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            arrived: tokio::sync::Notify::new(),
        }
    }
}

impl ReadGate {
    async fn pass<T>(&self, read: impl std::future::Future<Output = T>) -> T {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.arrived.notify_waiters();
        if self.held.load(Ordering::SeqCst) {
            drop(self.gate.acquire().await);
        }
        let result = read.await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
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

    /// Holds every read of the log from now on (until [`Self::release_reads`]).
    pub fn hold_reads(&self) {
        self.reads.held.store(true, Ordering::SeqCst);
    }

    /// Lets every held read, and every later one, through.
    pub fn release_reads(&self) {
        self.reads.held.store(false, Ordering::SeqCst);
        self.reads
            .gate
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }

    /// Waits until `n` reads of the log are in flight at once.
    pub async fn reads_in_flight(&self, n: usize) {
        loop {
            let arrived = self.reads.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.reads.in_flight.load(Ordering::SeqCst) >= n {
                return;
            }
            arrived.await;
        }
    }

    /// The most reads of the log that were in flight at once.
    pub fn peak_reads(&self) -> usize {
        self.reads.peak.load(Ordering::SeqCst)
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
        self.reads
            .pass(self.inner.read_after(session, after, limit))
            .await
    }

    async fn newest(&self, session: Uuid) -> Result<Option<u64>, StreamError> {
        self.reads.pass(self.inner.newest(session)).await
    }

    async fn subscribe(&self, session: Uuid) -> Result<Subscription, StreamError> {
        self.inner.subscribe(session).await
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
