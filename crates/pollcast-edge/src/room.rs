//! Rooms: one per session with at least one connection on this node. A room
//! subscribes to its session's stream once, and hands each event (encoded once per
//! format) to the connections allowed to see it. It never waits for a connection:
//! a full send queue marks that connection a slow consumer and removes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pollcast_protocol::{SessionEvent, WireFormat};
use pollcast_stream::{EventStream, StreamError, Subscription};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::frame::EncodedEvent;

/// Events read per catch-up round after a lag.
const CATCH_UP_BATCH: usize = 1024;

/// What a room puts in a connection's queue: an event, or `None` to say the queue
/// overflowed and the connection must close as a slow consumer.
pub type Queued = Option<Arc<EncodedEvent>>;

/// A connection as its room sees it.
pub struct Member {
    /// Presenters see presenter-only events.
    pub presenter: bool,
    /// Participants see their own targeted events.
    pub participant: Option<Uuid>,
    /// Which encoding it receives.
    pub format: WireFormat,
    /// Its send queue.
    pub queue: SendQueue,
}

/// The sending side of a connection's queue, bounded in bytes.
#[derive(Clone)]
pub struct SendQueue {
    tx: mpsc::UnboundedSender<Queued>,
    /// Bytes queued and not yet written; the connection subtracts what it writes.
    pub queued: Arc<AtomicUsize>,
    /// Set once the queue overflowed; nothing more is queued after that.
    pub overflowed: Arc<AtomicBool>,
    limit: usize,
}

impl SendQueue {
    /// A queue holding at most `limit` bytes, and its receiving end.
    pub fn new(limit: usize) -> (Self, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Self {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            overflowed: Arc::new(AtomicBool::new(false)),
            limit,
        };
        (queue, rx)
    }

    /// Queues an event of `len` bytes; `false` once the queue has overflowed (the
    /// room then forgets the connection).
    fn push(&self, event: &Arc<EncodedEvent>, len: usize) -> bool {
        if self.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let queued = self.queued.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.limit {
            self.overflowed.store(true, Ordering::Relaxed);
            metrics::counter!("pollcast_edge_slow_consumers_total").increment(1);
            let _ = self.tx.send(None);
            return false;
        }
        self.tx.send(Some(Arc::clone(event))).is_ok()
    }
}

/// One session's room on this node.
pub struct Room {
    session_id: Uuid,
    members: Mutex<HashMap<Uuid, Member>>,
    /// Tells the room's task to stop once the last member left.
    stop: Notify,
}

impl Room {
    fn members(&self) -> MutexGuard<'_, HashMap<Uuid, Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands one event to every member allowed to see it.
    fn dispatch(&self, event: Arc<SessionEvent>) {
        let audience = event.event.audience();
        let encoded = Arc::new(EncodedEvent::new(event));
        let started = std::time::Instant::now();
        self.members().retain(|_, member| {
            if !audience.includes(member.presenter, member.participant) {
                return true;
            }
            match encoded.bytes(member.format) {
                Some(bytes) => member.queue.push(&encoded, bytes.len()),
                None => true,
            }
        });
        metrics::histogram!("pollcast_edge_fanout_seconds").record(started.elapsed().as_secs_f64());
        let lag = pollcast_protocol::Timestamp::now().unix_millis()
            - encoded.event.timestamp.unix_millis();
        metrics::histogram!("pollcast_edge_event_lag_seconds").record(lag.max(0) as f64 / 1000.0);
    }
}

/// The rooms of this node.
pub struct Rooms {
    stream: Arc<dyn EventStream>,
    /// An async mutex: creating a room subscribes to the stream, which awaits.
    rooms: tokio::sync::Mutex<HashMap<Uuid, Arc<Room>>>,
}

impl Rooms {
    /// No rooms yet.
    pub fn new(stream: Arc<dyn EventStream>) -> Self {
        Self {
            stream,
            rooms: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Adds a connection to its session's room, opening the room (one stream
    /// subscription) if it is the first. From this moment on, every event of the
    /// session that the member may see is queued for it.
    pub async fn join(
        &self,
        session_id: Uuid,
        connection: Uuid,
        member: Member,
    ) -> Result<(), StreamError> {
        let mut rooms = self.rooms.lock().await;
        let room = match rooms.get(&session_id) {
            Some(room) => Arc::clone(room),
            None => {
                let live = self.stream.subscribe(session_id).await?;
                let newest = self.stream.newest(session_id).await?.unwrap_or(0);
                let room = Arc::new(Room {
                    session_id,
                    members: Mutex::new(HashMap::new()),
                    stop: Notify::new(),
                });
                tokio::spawn(run(
                    Arc::clone(&room),
                    live,
                    Arc::clone(&self.stream),
                    newest,
                ));
                rooms.insert(session_id, Arc::clone(&room));
                metrics::gauge!("pollcast_edge_rooms").increment(1.0);
                room
            }
        };
        room.members().insert(connection, member);
        Ok(())
    }

    /// Removes a connection; closes the room when it was the last.
    pub async fn leave(&self, session_id: Uuid, connection: Uuid) {
        let mut rooms = self.rooms.lock().await;
        let Some(room) = rooms.get(&session_id) else {
            return;
        };
        let empty = {
            let mut members = room.members();
            members.remove(&connection);
            members.is_empty()
        };
        if empty {
            room.stop.notify_one();
            rooms.remove(&session_id);
            metrics::gauge!("pollcast_edge_rooms").decrement(1.0);
        }
    }
}

/// The room's task: follows the session's live events and dispatches them in
/// position order, filling any hole (a lagging subscription) from the log.
async fn run(room: Arc<Room>, mut live: Subscription, stream: Arc<dyn EventStream>, mut last: u64) {
    loop {
        let next = tokio::select! {
            () = room.stop.notified() => break,
            next = live.next() => next,
        };
        match next {
            Ok(event) if event.position <= last => {}
            Ok(event) if last == 0 || event.position == last + 1 => {
                last = event.position;
                room.dispatch(event);
            }
            Ok(_) | Err(StreamError::Lagged { .. }) => {
                if let Err(err) = catch_up(&room, &*stream, &mut last).await {
                    tracing::warn!(session = %room.session_id, error = %err, "room catch-up failed");
                }
            }
            Err(err) => {
                tracing::warn!(session = %room.session_id, error = %err, "room subscription ended");
                break;
            }
        }
    }
}

async fn catch_up(
    room: &Room,
    stream: &dyn EventStream,
    last: &mut u64,
) -> Result<(), StreamError> {
    loop {
        let batch = stream
            .read_after(room.session_id, *last, CATCH_UP_BATCH)
            .await?;
        if batch.events.is_empty() {
            return Ok(());
        }
        for event in batch.events {
            *last = event.position;
            room.dispatch(event);
        }
    }
}
