//! An event stream that can be switched off, to simulate an outage of the stream
//! between commit and publish. It wraps the real embedded engine; while off, every
//! call fails the way an unreachable engine does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
        self.inner.read_after(session, after, limit).await
    }

    async fn newest(&self, session: Uuid) -> Result<Option<u64>, StreamError> {
        self.inner.newest(session).await
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
