//! A connection's way to its socket, shared by the connection's task and its room.
//!
//! A live, caught-up connection with nothing queued is written to by the room
//! itself: one non-blocking write of the event's shared frame bytes, no task woken.
//! When that cannot be done whole (the connection is replaying, something is
//! queued, its task is writing, or the socket's buffer is full), the event goes
//! to the connection's queue and its task writes it, in order. The queue is
//! bounded in bytes: past the limit the connection is a slow consumer.
//!
//! Ordering rests on two rules: the room writes only while holding the sink's
//! lock and seeing nothing queued, and the task takes bytes off the queue's count
//! only after writing them, under the same lock.
//!
//! The queue is a `VecDeque` that allocates only while something waits in it, not
//! a channel: tokio's channels allocate a block of slots up front, 800 bytes per
//! connection that almost never queues anything.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use metrics::{Counter, Histogram};
use pollcast_protocol::{SessionEvent, Timestamp, WireFormat};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::frame::EncodedEvent;

/// What a room puts in a connection's queue.
pub enum Queued {
    /// An event for the task to write (unless a replay already did).
    Event(Arc<EncodedEvent>),
    /// An event the room began writing: the task writes the rest of its frame,
    /// from this offset, before anything else.
    Rest(Arc<EncodedEvent>, usize),
    /// The queue overflowed: close as a slow consumer.
    Overflowed,
}

/// The socket's write side and what is recorded per write.
pub struct Sink {
    io: Box<dyn AsyncWrite + Send + Unpin>,
    frames: Counter,
    /// `pollcast_event_delivery_seconds` by event type, looked up on first use: a
    /// delivered frame then costs one atomic push, not a registry lookup.
    delivery: Vec<(&'static str, Histogram)>,
}

impl Sink {
    fn delivered(&mut self, event: &SessionEvent) {
        self.frames.increment(1);
        let event_type = event.event.event_type();
        let position = self.delivery.iter().position(|(t, _)| *t == event_type);
        let index = position.unwrap_or_else(|| {
            let histogram =
                metrics::histogram!("pollcast_event_delivery_seconds", "event_type" => event_type);
            self.delivery.push((event_type, histogram));
            self.delivery.len() - 1
        });
        let lag = Timestamp::now().unix_millis() - event.timestamp.unix_millis();
        self.delivery[index].1.record(lag.max(0) as f64 / 1000.0);
    }
}

/// The socket broke or a write timed out; the connection is over.
#[derive(Debug)]
pub struct Broken;

/// A connection's outlet; see the module documentation.
pub struct Outlet {
    sink: tokio::sync::Mutex<Sink>,
    /// The connection is live (not replaying, not closing): the room may write.
    direct: AtomicBool,
    /// Newest stream position passed on: written, or skipped as not for this
    /// client. Live events at or before it are repeats of a replay.
    last: AtomicU64,
    /// Bytes queued and not yet written.
    queued: AtomicUsize,
    overflowed: AtomicBool,
    limit: usize,
    /// What the task is to write, in order.
    queue: Mutex<VecDeque<Queued>>,
    /// Wakes the task when the queue gets something.
    ready: Notify,
    write_timeout: Duration,
}

/// Frames one direct write takes at most; a room hands over no more at once.
pub const MAX_SLICES: usize = 32;

/// Queue slots kept once a backlog drains; a burst's larger buffer is given back.
const KEPT_SLOTS: usize = 8;

/// The task's end of its outlet's queue. Dropped (the task is gone), it makes the
/// outlet refuse every later event, so the room forgets the connection.
pub struct Backlog(Arc<Outlet>);

impl Backlog {
    /// The next queued item, waiting for one. Cancel-safe: an item stays queued
    /// until this returns it.
    pub async fn recv(&mut self) -> Queued {
        loop {
            if let Some(item) = self.try_recv() {
                return item;
            }
            // A push between the look and here leaves a permit: no lost wake-up.
            self.0.ready.notified().await;
        }
    }

    /// The next queued item, if there is one.
    pub fn try_recv(&mut self) -> Option<Queued> {
        let mut queue = self.0.queue();
        let item = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEPT_SLOTS {
            *queue = VecDeque::new();
        }
        item
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        self.0.overflowed.store(true, Ordering::Release);
        self.0.queue().clear();
    }
}

/// What [`Outlet::offer`] did with an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Written to the socket, or queued for the task.
    Taken,
    /// The queue overflowed: the room forgets the connection.
    Overflowed,
}

impl Outlet {
    /// An outlet writing to `io`, queueing at most `limit` bytes, labelling its
    /// frames with `format`; and the queue's receiving end for the task.
    pub fn new(
        io: Box<dyn AsyncWrite + Send + Unpin>,
        format: &'static str,
        limit: usize,
        write_timeout: Duration,
    ) -> (Arc<Self>, Backlog) {
        let sink = Sink {
            io,
            frames: metrics::counter!("pollcast_ws_frames_sent_total", "format" => format),
            delivery: Vec::new(),
        };
        let outlet = Self {
            sink: tokio::sync::Mutex::new(sink),
            direct: AtomicBool::new(false),
            last: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            overflowed: AtomicBool::new(false),
            limit,
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            write_timeout,
        };
        let outlet = Arc::new(outlet);
        (Arc::clone(&outlet), Backlog(outlet))
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn enqueue(&self, item: Queued) {
        self.queue().push_back(item);
        self.ready.notify_one();
    }

    /// Whether the queue has overflowed.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// The newest position passed on.
    pub fn last(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// Sets the newest position passed on (the task, while the room stays out).
    pub fn set_last(&self, position: u64) {
        self.last.store(position, Ordering::Release);
    }

    /// Hands an event of the room to this connection: written at once when the
    /// connection is live and idle, else queued.
    pub fn offer(&self, event: &Arc<EncodedEvent>, frame: &[u8]) -> Offered {
        self.offer_all(&[(event, frame)])
    }

    /// Hands several events of the room to this connection, in position order:
    /// when the connection is live and idle, all of them in one (vectored)
    /// write, so a burst costs a connection one system call rather than one per
    /// event; what that write does not take is queued, as [`Outlet::offer`]
    /// queues.
    pub fn offer_all(&self, frames: &[(&Arc<EncodedEvent>, &[u8])]) -> Offered {
        if self.overflowed() {
            return Offered::Overflowed;
        }
        let mut rest = frames;
        if self.direct.load(Ordering::Acquire)
            && self.queued.load(Ordering::Acquire) == 0
            && let Ok(mut sink) = self.sink.try_lock()
            // Checked again under the lock: the task may have gone to replay.
            && self.direct.load(Ordering::Acquire)
            && self.queued.load(Ordering::Acquire) == 0
        {
            // What a replay already sent is passed over.
            let last = self.last();
            let skip = frames.partition_point(|(event, _)| event.position() <= last);
            let fresh = &frames[skip..];
            let fresh = &fresh[..fresh.len().min(MAX_SLICES)];
            let mut taken = 0;
            if !fresh.is_empty() {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                for (slice, (_, frame)) in slices.iter_mut().zip(fresh) {
                    *slice = IoSlice::new(frame);
                }
                // One try, never a wait: a no-op waker, because the task is idle
                // (nothing queued) and will register its own when it next writes.
                let mut cx = Context::from_waker(Waker::noop());
                let slices = &slices[..fresh.len()];
                let mut written = match Pin::new(&mut sink.io).poll_write_vectored(&mut cx, slices)
                {
                    Poll::Ready(Ok(n)) => n,
                    // Full (or broken: the task will find out when it writes).
                    Poll::Ready(Err(_)) | Poll::Pending => 0,
                };
                for (event, frame) in fresh {
                    if written == 0 {
                        break;
                    }
                    self.set_last(event.position());
                    taken += 1;
                    if written >= frame.len() {
                        written -= frame.len();
                        sink.delivered(&event.event);
                        continue;
                    }
                    // The rest of a begun frame is owed whatever the limit: a torn
                    // frame would break the stream for good.
                    self.queued
                        .fetch_add(frame.len() - written, Ordering::AcqRel);
                    self.enqueue(Queued::Rest(Arc::clone(event), written));
                    break;
                }
            }
            // Queued after what the write began, in order: the frames it did not
            // take, and any past one write's slices.
            rest = &frames[skip + taken..];
        }
        for (event, frame) in rest {
            if self.push(Queued::Event(Arc::clone(event)), frame.len()) == Offered::Overflowed {
                return Offered::Overflowed;
            }
        }
        Offered::Taken
    }

    /// Queues, counting `len` bytes against the limit.
    fn push(&self, item: Queued, len: usize) -> Offered {
        let queued = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if queued > self.limit {
            self.overflow();
            metrics::counter!("pollcast_edge_slow_consumers_total").increment(1);
            return Offered::Overflowed;
        }
        self.enqueue(item);
        Offered::Taken
    }

    /// Makes the connection close as if it had overflowed: it must reconnect with
    /// its last event id, and the replay tells it what can still be recovered.
    pub fn overflow(&self) {
        if !self.overflowed.swap(true, Ordering::AcqRel) {
            self.enqueue(Queued::Overflowed);
        }
    }

    /// Lets the room write directly (`true`: the task is live) or not (`false`:
    /// it replays or closes). Taken under the lock, so a direct write in
    /// progress finishes first.
    pub async fn set_direct(&self, direct: bool) {
        let _sink = self.sink.lock().await;
        self.direct.store(direct, Ordering::Release);
    }

    /// Writes a queued item (the task): an event unless a replay already sent it,
    /// or the rest of one the room began.
    pub async fn write_queued(&self, item: &Queued, format: WireFormat) -> Result<(), Broken> {
        let (event, from) = match item {
            Queued::Event(event) => (event, 0),
            Queued::Rest(event, from) => (event, *from),
            Queued::Overflowed => return Ok(()),
        };
        let Some(frame) = event.framed(format) else {
            return Ok(());
        };
        let rest = &frame.bytes()[from..];
        let mut sink = self.sink.lock().await;
        let repeat = from == 0 && event.position() <= self.last();
        let result = if repeat {
            Ok(())
        } else {
            self.set_last(self.last().max(event.position()));
            self.write_all(&mut sink, rest).await
        };
        if result.is_ok() && !repeat {
            sink.delivered(&event.event);
        }
        // Only now, under the lock: the room must not write past bytes still owed.
        self.queued.fetch_sub(rest.len(), Ordering::AcqRel);
        result
    }

    /// Writes one whole frame the task made (connection frames, replayed events,
    /// control frames). `data` frames count in `pollcast_ws_frames_sent_total`.
    pub async fn write_frame(&self, frame: &[u8], data: bool) -> Result<(), Broken> {
        let mut sink = self.sink.lock().await;
        self.write_all(&mut sink, frame).await?;
        if data {
            sink.frames.increment(1);
        }
        Ok(())
    }

    async fn write_all(&self, sink: &mut Sink, bytes: &[u8]) -> Result<(), Broken> {
        let write = async {
            sink.io.write_all(bytes).await?;
            sink.io.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "write failed");
                Err(Broken)
            }
            Err(_) => {
                metrics::counter!("pollcast_edge_write_timeouts_total").increment(1);
                Err(Broken)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use pollcast_protocol::DomainEvent;
    use tokio::io::AsyncReadExt;
    use uuid::Uuid;

    use super::*;

    fn event(session: Uuid, position: u64) -> Arc<EncodedEvent> {
        Arc::new(EncodedEvent::new(Arc::new(SessionEvent {
            session_id: session,
            position,
            timestamp: Timestamp::now(),
            event: DomainEvent::ParticipantDisconnected {
                participant_id: Uuid::now_v7(),
                display_name: format!("participant number {position}"),
            },
        })))
    }

    /// The event's whole JSON frame, as the room would offer it.
    fn json_frame(event: &Arc<EncodedEvent>) -> Vec<u8> {
        event
            .framed(WireFormat::Json)
            .expect("frame")
            .bytes()
            .to_vec()
    }

    /// A live outlet over a socket that takes `capacity` bytes at a time, with a
    /// task writing what gets queued, as the connection's task would; and the
    /// client's end.
    async fn live_outlet(
        capacity: usize,
    ) -> (
        Arc<Outlet>,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
    ) {
        let (client, server) = tokio::io::duplex(capacity);
        let (outlet, mut queue) =
            Outlet::new(Box::new(server), "json", 1 << 20, Duration::from_secs(5));
        outlet.set_direct(true).await;
        let task_outlet = Arc::clone(&outlet);
        let task = tokio::spawn(async move {
            loop {
                let item = queue.recv().await;
                task_outlet
                    .write_queued(&item, WireFormat::Json)
                    .await
                    .expect("write");
            }
        });
        (outlet, client, task)
    }

    /// Waits for `reader` (the bytes the client read, and those it should have)
    /// and checks they match and that the outlet passed on everything to `last`.
    async fn assert_arrived_whole(
        reader: tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>,
        outlet: &Outlet,
        last: u64,
    ) {
        let (got, expected) = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("all bytes in time")
            .expect("reader");
        assert!(got == expected, "frames reordered or torn");
        assert_eq!(outlet.last(), last);
    }

    /// A socket that takes a few hundred bytes at a time makes the room's writes
    /// partial or impossible, and the task's writes wait: the bytes that come out
    /// are still every frame, whole, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arrive_whole_and_in_order_whoever_writes_them() {
        let (outlet, mut client, task) = live_outlet(300).await;
        let session = Uuid::now_v7();
        let events: Vec<_> = (1..=200).map(|p| event(session, p)).collect();
        let mut expected = Vec::new();
        for event in &events {
            expected.extend_from_slice(event.framed(WireFormat::Json).expect("frame").bytes());
        }
        // The client reads nothing yet: the first frame goes straight in, the
        // second only partly (the rest is queued), and the task's write of that
        // rest waits, so everything after is queued behind it.
        for event in &events {
            let frame = event.framed(WireFormat::Json).expect("frame").bytes();
            assert_eq!(outlet.offer(event, frame), Offered::Taken);
            tokio::task::yield_now().await;
        }
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            client.read_exact(&mut got).await.expect("every byte");
            (got, expected)
        });
        assert_arrived_whole(reader, &outlet, 200).await;
        task.abort();
    }

    /// Bursts offered together (as a room hands over the events waiting for it)
    /// come out as offered one by one: every frame whole, in order, whether the
    /// write took all of a burst, part of a frame, or nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bursts_arrive_whole_and_in_order_whoever_writes_them() {
        let (outlet, mut client, task) = live_outlet(300).await;
        let session = Uuid::now_v7();
        let events: Vec<_> = (1..=200).map(|p| event(session, p)).collect();
        let frames: Vec<_> = events.iter().map(json_frame).collect();
        let expected = frames.concat();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            client.read_exact(&mut got).await.expect("every byte");
            (got, expected)
        });
        // Bursts of 1 to 7 events, some longer than the socket takes at once.
        let mut at = 0;
        for size in (1..=7).cycle() {
            if at == events.len() {
                break;
            }
            let end = (at + size).min(events.len());
            let burst: Vec<_> = events[at..end]
                .iter()
                .zip(&frames[at..end])
                .map(|(e, f)| (e, f.as_slice()))
                .collect();
            assert_eq!(outlet.offer_all(&burst), Offered::Taken);
            at = end;
            tokio::task::yield_now().await;
        }
        assert_arrived_whole(reader, &outlet, 200).await;
        task.abort();
    }

    /// A live, idle connection gets a burst in one write, nothing queued, and
    /// not the events a replay already sent it.
    #[tokio::test]
    async fn a_burst_to_an_idle_socket_is_written_at_once_past_the_replay() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (outlet, mut queue) =
            Outlet::new(Box::new(server), "json", 1 << 20, Duration::from_secs(5));
        outlet.set_direct(true).await;
        outlet.set_last(2);
        let session = Uuid::now_v7();
        let events: Vec<_> = (1..=5).map(|p| event(session, p)).collect();
        let frames: Vec<_> = events.iter().map(json_frame).collect();
        let burst: Vec<_> = events
            .iter()
            .zip(&frames)
            .map(|(e, f)| (e, f.as_slice()))
            .collect();
        assert_eq!(outlet.offer_all(&burst), Offered::Taken);
        assert!(queue.try_recv().is_none(), "nothing left for the task");
        assert_eq!(outlet.last(), 5);
        let expected = frames[2..].concat();
        let mut got = vec![0u8; expected.len()];
        client.read_exact(&mut got).await.expect("the burst");
        assert!(got == expected, "not positions 3 to 5, in order");
    }

    /// A frame the room began is finished even when its rest alone is over the
    /// queue's limit: the client gets it whole before the slow-consumer close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_begun_frame_is_finished_whatever_the_limit() {
        let (mut client, server) = tokio::io::duplex(100);
        let (outlet, mut queue) = Outlet::new(Box::new(server), "json", 50, Duration::from_secs(5));
        outlet.set_direct(true).await;
        let session = Uuid::now_v7();
        let first = event(session, 1);
        let bytes = json_frame(&first);
        assert!(bytes.len() > 150, "the frame must outgrow socket and limit");
        assert_eq!(outlet.offer(&first, &bytes), Offered::Taken);
        let second = event(session, 2);
        let frame = json_frame(&second);
        assert_eq!(outlet.offer(&second, &frame), Offered::Overflowed);
        let rest = queue.try_recv().expect("the rest is queued");
        assert!(matches!(rest, Queued::Rest(_, 100)));
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; bytes.len()];
            client.read_exact(&mut got).await.expect("the whole frame");
            (got, bytes)
        });
        outlet
            .write_queued(&rest, WireFormat::Json)
            .await
            .expect("write the rest");
        let (got, bytes) = reader.await.expect("reader");
        assert!(got == bytes, "the frame arrived torn");
    }

    /// A connection task that is gone (its backlog dropped) gets nothing more:
    /// the room is told to forget it, and what was queued is let go.
    #[tokio::test]
    async fn an_outlet_whose_task_is_gone_refuses_events() {
        let (_client, server) = tokio::io::duplex(64);
        let (outlet, queue) =
            Outlet::new(Box::new(server), "json", 1 << 20, Duration::from_secs(5));
        let session = Uuid::now_v7();
        let first = event(session, 1);
        let frame = json_frame(&first);
        assert_eq!(outlet.offer(&first, &frame), Offered::Taken);
        assert_eq!(Arc::strong_count(&first), 2, "queued");
        drop(queue);
        assert_eq!(Arc::strong_count(&first), 1, "let go");
        let second = event(session, 2);
        let frame = json_frame(&second);
        assert_eq!(outlet.offer(&second, &frame), Offered::Overflowed);
    }

    /// `recv` dropped while it waits loses nothing, and wakes for what comes later.
    #[tokio::test]
    async fn a_cancelled_wait_loses_nothing() {
        let (_client, server) = tokio::io::duplex(64);
        let (outlet, mut queue) =
            Outlet::new(Box::new(server), "json", 1 << 20, Duration::from_secs(5));
        let waited = tokio::time::timeout(Duration::from_millis(10), queue.recv()).await;
        assert!(waited.is_err(), "nothing queued yet");
        let session = Uuid::now_v7();
        let first = event(session, 1);
        let frame = json_frame(&first);
        let pusher = Arc::clone(&outlet);
        let push = tokio::spawn(async move { pusher.offer(&first, &frame) });
        let item = tokio::time::timeout(Duration::from_secs(5), queue.recv())
            .await
            .expect("woken for the event");
        assert!(matches!(item, Queued::Event(e) if e.position() == 1));
        assert_eq!(push.await.expect("push"), Offered::Taken);
    }

    #[tokio::test]
    async fn a_queue_past_its_limit_overflows_once() {
        let (_client, server) = tokio::io::duplex(64);
        let (outlet, mut queue) =
            Outlet::new(Box::new(server), "json", 500, Duration::from_secs(5));
        let session = Uuid::now_v7();
        let mut results = Vec::new();
        for position in 1..=20 {
            let event = event(session, position);
            let frame = json_frame(&event);
            results.push(outlet.offer(&event, &frame));
        }
        assert!(results.contains(&Offered::Overflowed));
        assert!(outlet.overflowed());
        let mut markers = 0;
        while let Some(item) = queue.try_recv() {
            markers += usize::from(matches!(item, Queued::Overflowed));
        }
        assert_eq!(markers, 1, "one overflow marker");
    }
}
