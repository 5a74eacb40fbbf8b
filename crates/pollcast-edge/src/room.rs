//! Rooms: one per session with at least one connection on this node. A room
//! subscribes to its session's stream once, and hands each event (encoded once per
//! format) to the connections allowed to see it. It never waits for a connection:
//! a full send queue marks that connection a slow consumer and removes it.
//!
//! A room keeps its most recent events ([`Recent`]) for the replays of clients
//! that reconnect, and stays open for [`LINGER`] after its last member left:
//! when every client of a room drops at once (the venue's network blinked), the
//! window is still there when they come back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use pollcast_protocol::{Audience, SessionEvent, WireFormat};
use pollcast_stream::{EventStream, StreamError, Subscription};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::frame::EncodedEvent;
use crate::members::Members;
use crate::outlet::{Offered, Outlet};
use crate::pager::{Page, Pager};
use crate::recent::{self, Recent};

/// First wait before a catch-up that came up short is tried again; it doubles up
/// to [`CATCH_UP_RETRY_MAX`].
const CATCH_UP_RETRY: Duration = Duration::from_millis(20);
/// Longest wait between catch-up retries.
const CATCH_UP_RETRY_MAX: Duration = Duration::from_secs(1);
/// Events one dispatch writes together: those already waiting when the room
/// takes the next (a poll's close, the next poll and its activation; a room
/// that fell behind), each member's in one write.
const BURST: usize = crate::outlet::MAX_SLICES;
/// Members from which a dispatch (one socket write each) hands the worker's other
/// tasks to another thread first; below it, the hand-off costs more than it saves.
const LARGE_ROOM: usize = 256;
/// How long a room stays open, subscribed and keeping its recent events, after
/// its last member left.
pub const LINGER: Duration = Duration::from_secs(10);

/// A connection as its room sees it.
pub struct Member {
    /// Presenters see presenter-only events.
    pub presenter: bool,
    /// Participants see their own targeted events.
    pub participant: Option<Uuid>,
    /// Which encoding it receives.
    pub format: WireFormat,
    /// Its way to the socket.
    pub outlet: Arc<Outlet>,
}

/// One session's room on this node.
pub struct Room {
    session_id: Uuid,
    members: Mutex<Members>,
    /// The most recent events, for replays.
    recent: Mutex<Recent>,
    /// One replay at a time fills the window from the log; the others wait and
    /// find it filled.
    warming: tokio::sync::Mutex<()>,
    /// Wakes the replays waiting for the window to reach a position.
    progress: Notify,
    /// Bytes of recent events kept per member; 0 keeps none.
    window_per_member: usize,
    /// Counts the times the room was left empty: a lingering close goes ahead
    /// only if nobody came and went since it was planned.
    vacated: AtomicU64,
    /// Tells the room's task to stop once the last member left.
    stop: Notify,
}

impl Room {
    fn members(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the window may hold now.
    fn budget(&self) -> usize {
        recent::budget(self.members().len(), self.window_per_member)
    }

    /// The events after `after` that `wanted` accepts and the position they run
    /// to, from memory; `None` when the room's window does not reach back to
    /// `after`. Every event past that position is still to be dispatched, so a
    /// member asking gets it from its queue.
    pub fn recent_after(
        &self,
        after: u64,
        wanted: impl FnMut(&SessionEvent) -> bool,
    ) -> Option<(Vec<Arc<EncodedEvent>>, u64)> {
        self.recent().after(after, wanted)
    }

    /// Waits until the window reaches past `position` (the room dispatched a
    /// newer event), at most until `deadline`; whether it did.
    pub async fn advanced_past(&self, position: u64, deadline: tokio::time::Instant) -> bool {
        loop {
            let progressed = self.progress.notified();
            tokio::pin!(progressed);
            // Registered before the look: a push in between still wakes it.
            progressed.as_mut().enable();
            if self.recent().end() > position {
                return true;
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return false;
            }
        }
    }

    /// Reads from the log what the window lacks back to `after`, and puts it in
    /// front, if it fits the room's budget; one caller at a time, so the
    /// clients of a reconnect storm read the log once. Afterwards
    /// [`Room::recent_after`] answers or the caller reads the log itself.
    pub async fn warm(&self, stream: &dyn EventStream, after: u64) -> Result<(), StreamError> {
        let budget = self.budget();
        if budget == 0 {
            return Ok(());
        }
        let _alone = self.warming.lock().await;
        let start = self.recent().start();
        if after >= start {
            return Ok(());
        }
        let mut older = Vec::new();
        let mut cost = 0;
        let mut pager = Pager::new(stream, self.session_id, after);
        while pager.position() < start {
            let Page::Events(events) = pager.next().await? else {
                // Truncated: the log itself does not reach back. End: it is
                // behind the room (a replica), and cannot fill the window either.
                return Ok(());
            };
            for event in events {
                if event.position > start {
                    break;
                }
                let event = Arc::new(EncodedEvent::new(event));
                cost += recent::cost(&event);
                if cost > budget {
                    return Ok(());
                }
                older.push(event);
            }
        }
        self.recent().prepend(older, budget);
        Ok(())
    }

    /// Hands events (consecutive, in order) to every member allowed to see them,
    /// each member's in one write. A room-wide event in a large room is
    /// thousands of socket writes in a row: the worker thread says so to tokio
    /// (`block_in_place`), which moves its other tasks to another thread instead
    /// of letting them wait behind the fan-out. Events for the presenters or one
    /// participant are a few writes however large the room, and are written at
    /// once: handing the worker's tasks over costs a thread wake-up, and a room
    /// with 2 000 members gets a `vote:accepted` per vote.
    fn dispatch(&self, events: &[Arc<SessionEvent>]) {
        let audiences: Vec<Audience> = events.iter().map(|e| e.event.audience()).collect();
        let large = audiences.contains(&Audience::Room) && self.members().len() >= LARGE_ROOM;
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if large && multi_thread {
            tokio::task::block_in_place(|| self.dispatch_now(events, &audiences));
        } else {
            self.dispatch_now(events, &audiences);
        }
    }

    fn dispatch_now(&self, events: &[Arc<SessionEvent>], audiences: &[Audience]) {
        let encoded: Vec<Arc<EncodedEvent>> = events
            .iter()
            .map(|event| Arc::new(EncodedEvent::new(Arc::clone(event))))
            .collect();
        let started = std::time::Instant::now();
        let mut members = self.members();
        // Into the window before any member is offered them: a replay that
        // looks at the window after joining either finds an event there or is
        // offered it as a member.
        let budget = recent::budget(members.len(), self.window_per_member);
        let mut recent = self.recent();
        for event in &encoded {
            recent.push(Arc::clone(event), budget);
        }
        drop(recent);
        self.progress.notify_waiters();
        // One member's share of the events, made again for each member.
        let mut share: Vec<(&Arc<EncodedEvent>, &[u8])> = Vec::with_capacity(encoded.len());
        members.offer(audiences, |member| {
            share.clear();
            for (event, audience) in encoded.iter().zip(audiences) {
                if audience.includes(member.presenter, member.participant)
                    && let Some(frame) = event.framed(member.format)
                {
                    share.push((event, frame.bytes()));
                }
            }
            share.is_empty() || member.outlet.offer_all(&share) == Offered::Taken
        });
        metrics::histogram!("pollcast_edge_fanout_seconds").record(started.elapsed().as_secs_f64());
        let now = pollcast_protocol::Timestamp::now().unix_millis();
        let lag = metrics::histogram!("pollcast_edge_event_lag_seconds");
        for event in events {
            lag.record((now - event.timestamp.unix_millis()).max(0) as f64 / 1000.0);
        }
    }
}

/// The rooms of this node.
pub struct Rooms {
    stream: Arc<dyn EventStream>,
    /// How long an empty room stays open.
    linger: Duration,
    /// Bytes of recent events a room keeps per member.
    window_per_member: usize,
    /// An async mutex: creating a room subscribes to the stream, which awaits.
    rooms: tokio::sync::Mutex<HashMap<Uuid, Arc<Room>>>,
}

impl Rooms {
    /// No rooms yet; an empty room stays open for `linger`, and a room keeps
    /// `window_per_member` bytes of recent events per member (within bounds;
    /// 0 keeps none, and every replay reads the log).
    pub fn new(stream: Arc<dyn EventStream>, linger: Duration, window_per_member: usize) -> Self {
        Self {
            stream,
            linger,
            window_per_member,
            rooms: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Adds a connection to its session's room, opening the room (one stream
    /// subscription) if there is none. From this moment on, every event of the
    /// session that the member may see is queued for it.
    pub async fn join(
        &self,
        session_id: Uuid,
        connection: Uuid,
        member: Member,
    ) -> Result<Arc<Room>, StreamError> {
        let mut rooms = self.rooms.lock().await;
        let room = match rooms.get(&session_id) {
            Some(room) => Arc::clone(room),
            None => {
                let live = self.stream.subscribe(session_id).await?;
                let newest = self.stream.newest(session_id).await?.unwrap_or(0);
                let room = Arc::new(Room {
                    session_id,
                    members: Mutex::new(Members::default()),
                    recent: Mutex::new(Recent::new(newest)),
                    warming: tokio::sync::Mutex::new(()),
                    progress: Notify::new(),
                    window_per_member: self.window_per_member,
                    vacated: AtomicU64::new(0),
                    stop: Notify::new(),
                });
                // Outside tokio's cooperative budget: a dispatch writes to every
                // member's socket, and past the budget (128 I/O polls per turn)
                // tokio would answer "not ready" to all the rest, queueing them
                // for their tasks. A dispatch is bounded by the room's size and
                // the task awaits its subscription between events.
                tokio::spawn(tokio::task::unconstrained(run(
                    Arc::clone(&room),
                    live,
                    Arc::clone(&self.stream),
                    newest,
                )));
                rooms.insert(session_id, Arc::clone(&room));
                metrics::gauge!("pollcast_ws_rooms").increment(1.0);
                room
            }
        };
        room.members().insert(connection, member);
        Ok(room)
    }

    /// Removes a connection. A room left empty closes after [`LINGER`], unless
    /// someone joins it meanwhile.
    pub async fn leave(self: &Arc<Self>, session_id: Uuid, connection: Uuid) {
        let rooms = self.rooms.lock().await;
        let Some(room) = rooms.get(&session_id) else {
            return;
        };
        let mut members = room.members();
        if members.remove(&connection).is_none() || !members.is_empty() {
            return;
        }
        let vacated = room.vacated.fetch_add(1, Ordering::AcqRel) + 1;
        drop(members);
        drop(rooms);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(this.linger).await;
            this.close_if_vacated(session_id, vacated).await;
        });
    }

    /// Closes the room if it is still empty since it was left empty the
    /// `vacated`th time.
    async fn close_if_vacated(&self, session_id: Uuid, vacated: u64) {
        let mut rooms = self.rooms.lock().await;
        let Some(room) = rooms.get(&session_id) else {
            return;
        };
        if room.vacated.load(Ordering::Acquire) != vacated || !room.members().is_empty() {
            return;
        }
        room.stop.notify_one();
        rooms.remove(&session_id);
        metrics::gauge!("pollcast_ws_rooms").decrement(1.0);
    }

    /// Whether this node has a room open for `session_id`.
    #[cfg(test)]
    async fn is_open(&self, session_id: Uuid) -> bool {
        self.rooms.lock().await.contains_key(&session_id)
    }
}

/// The room's task: follows the session's live events and dispatches them in
/// position order, filling any hole (a lagging subscription, a reconnect) from the
/// log. When the log cannot fill it yet (a replica a moment behind the live
/// message), it tries again shortly rather than waiting for the next event.
async fn run(room: Arc<Room>, mut live: Subscription, stream: Arc<dyn EventStream>, mut last: u64) {
    // The newest position known to exist; the room owes its members all up to it.
    let mut owed = last;
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    let mut backoff: Option<Duration> = None;
    // What the subscription gave after a burst, still to be looked at.
    let mut held = None;
    loop {
        let next = match held.take() {
            Some(next) => Some(next),
            None => tokio::select! {
                () = room.stop.notified() => break,
                () = &mut retry, if backoff.is_some() => None,
                next = live.next() => Some(next),
            },
        };
        let fill = match next {
            None => true,
            Some(Ok(event)) if event.position <= last => false,
            Some(Ok(event)) if last == 0 || event.position == last + 1 => {
                last = event.position;
                let mut burst = vec![event];
                // The events already waiting go with it.
                while burst.len() < BURST {
                    // The subscription's `next` is cancel-safe (the `select!`
                    // above drops it too), so one not ready is simply dropped.
                    match live.next().now_or_never() {
                        Some(Ok(next)) if next.position == last + 1 => {
                            last = next.position;
                            burst.push(next);
                        }
                        Some(other) => {
                            held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                owed = owed.max(last);
                room.dispatch(&burst);
                false
            }
            Some(Ok(event)) => {
                owed = owed.max(event.position);
                true
            }
            Some(Err(StreamError::Lagged { .. })) => true,
            Some(Err(err)) => {
                tracing::warn!(session = %room.session_id, error = %err, "room subscription ended");
                break;
            }
        };
        if !fill {
            continue;
        }
        if let Err(err) = catch_up(&room, &*stream, &mut last).await {
            tracing::warn!(session = %room.session_id, error = %err, "room catch-up failed");
        }
        backoff = if last < owed {
            let wait = backoff.map_or(CATCH_UP_RETRY, |b| (b * 2).min(CATCH_UP_RETRY_MAX));
            retry.as_mut().reset(tokio::time::Instant::now() + wait);
            Some(wait)
        } else {
            None
        };
    }
}

async fn catch_up(
    room: &Room,
    stream: &dyn EventStream,
    last: &mut u64,
) -> Result<(), StreamError> {
    let mut pager = Pager::new(stream, room.session_id, *last);
    loop {
        match pager.next().await? {
            Page::Events(events) => {
                for burst in events.chunks(BURST) {
                    if let Some(newest) = burst.last() {
                        *last = newest.position;
                    }
                    room.dispatch(burst);
                }
            }
            Page::End => return Ok(()),
            Page::Truncated => {
                let newest = stream.newest(room.session_id).await?.unwrap_or(0);
                if newest <= *last {
                    // The stream has nothing past the room yet: nothing is lost.
                    return Ok(());
                }
                // The log lost what the room missed: nothing can fill the hole, and
                // members must not see a silent gap. They reconnect with their last
                // id, and the replay tells them `recovered: false`.
                tracing::warn!(session = %room.session_id, after = *last, "room fell behind the history window");
                for member in room.members().values() {
                    member.outlet.overflow();
                }
                room.recent().skip_to(newest);
                room.progress.notify_waiters();
                *last = newest;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::outlet::{Backlog, Queued};
    use pollcast_protocol::{DomainEvent, Timestamp};
    use pollcast_stream::EmbeddedStream;

    use super::*;

    fn event(session: Uuid, position: u64, name: &str) -> SessionEvent {
        SessionEvent {
            session_id: session,
            position,
            timestamp: Timestamp::now(),
            event: DomainEvent::ParticipantDisconnected {
                participant_id: Uuid::now_v7(),
                display_name: name.to_owned(),
            },
        }
    }

    /// A presenter whose task never went live, so everything is queued.
    fn presenter(format: WireFormat, limit: usize) -> (Member, Backlog) {
        let sink = Box::new(tokio::io::sink());
        let (outlet, rx) = Outlet::new(sink, "json", limit, Duration::from_secs(1));
        let member = Member {
            presenter: true,
            participant: None,
            format,
            outlet,
        };
        (member, rx)
    }

    /// The next queued event; `None` for the overflow marker.
    async fn received(rx: &mut Backlog) -> Option<Arc<EncodedEvent>> {
        let queued = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("queued in time");
        match queued {
            Queued::Event(event) | Queued::Rest(event, _) => Some(event),
            Queued::Overflowed => None,
        }
    }

    /// An embedded stream holding one event of a new session, and its rooms.
    async fn session_with_one_event() -> (Arc<dyn EventStream>, Arc<Rooms>, Uuid) {
        let stream: Arc<dyn EventStream> = Arc::new(EmbeddedStream::default());
        let rooms = Arc::new(Rooms::new(
            Arc::clone(&stream),
            LINGER,
            recent::BUDGET_PER_MEMBER,
        ));
        let session = Uuid::now_v7();
        stream
            .publish(event(session, 1, "setup"))
            .await
            .expect("publish");
        (stream, rooms, session)
    }

    #[tokio::test]
    async fn every_member_of_a_format_gets_the_same_encoded_bytes() {
        let (stream, rooms, session) = session_with_one_event().await;
        let mut receivers = Vec::new();
        for format in [
            WireFormat::Json,
            WireFormat::Json,
            WireFormat::MessagePack,
            WireFormat::MessagePack,
        ] {
            let (member, rx) = presenter(format, 1 << 20);
            rooms
                .join(session, Uuid::now_v7(), member)
                .await
                .expect("join");
            receivers.push((format, rx));
        }
        stream
            .publish(event(session, 2, "Ada"))
            .await
            .expect("publish");
        let mut frames = Vec::new();
        for (format, rx) in &mut receivers {
            let frame = received(rx).await.expect("an event, not an overflow");
            let bytes = frame.bytes(*format).expect("encodes").as_ptr();
            frames.push((frame, bytes));
        }
        assert!(
            Arc::ptr_eq(&frames[0].0, &frames[3].0),
            "one event object for the room"
        );
        assert_eq!(frames[0].1, frames[1].1, "JSON members share one buffer");
        assert_eq!(
            frames[2].1, frames[3].1,
            "MessagePack members share one buffer"
        );
        assert_ne!(frames[0].1, frames[2].1);
    }

    #[tokio::test]
    async fn an_overflowing_member_is_dropped_and_the_others_go_on() {
        let (stream, rooms, session) = session_with_one_event().await;
        let (slow, mut slow_rx) = presenter(WireFormat::Json, 300);
        let slow_outlet = Arc::clone(&slow.outlet);
        let (fast, mut fast_rx) = presenter(WireFormat::Json, 1 << 20);
        rooms
            .join(session, Uuid::now_v7(), slow)
            .await
            .expect("join");
        rooms
            .join(session, Uuid::now_v7(), fast)
            .await
            .expect("join");
        for position in 2..=21 {
            stream
                .publish(event(session, position, "a fairly long display name"))
                .await
                .expect("publish");
        }
        for position in 2..=21 {
            let frame = received(&mut fast_rx).await.expect("event");
            assert_eq!(frame.position(), position);
        }
        assert!(slow_outlet.overflowed());
        let mut slow_got = 0;
        // Events until the overflow marker (`None`).
        while received(&mut slow_rx).await.is_some() {
            slow_got += 1;
        }
        assert!(
            slow_got < 20,
            "the slow member was cut off after {slow_got}"
        );
    }

    /// [`session_with_one_event`]'s room, opened by a presenter whose task
    /// never went live.
    async fn room_with_a_presenter() -> (Arc<dyn EventStream>, Arc<Room>, Backlog, Uuid) {
        let (stream, rooms, session) = session_with_one_event().await;
        let (member, rx) = presenter(WireFormat::Json, 1 << 20);
        let room = rooms
            .join(session, Uuid::now_v7(), member)
            .await
            .expect("join");
        (stream, room, rx, session)
    }

    fn positions(found: Option<(Vec<Arc<EncodedEvent>>, u64)>) -> Option<Vec<u64>> {
        found.map(|(events, _)| events.iter().map(|e| e.position()).collect())
    }

    #[tokio::test]
    async fn the_window_holds_what_the_room_dispatched() {
        let (stream, room, mut rx, session) = room_with_a_presenter().await;
        assert_eq!(positions(room.recent_after(1, |_| true)), Some(vec![]));
        assert_eq!(
            positions(room.recent_after(0, |_| true)),
            None,
            "before the room"
        );
        for position in 2..=5 {
            stream
                .publish(event(session, position, "Ada"))
                .await
                .expect("publish");
        }
        for position in 2..=5 {
            assert_eq!(
                received(&mut rx).await.map(|e| e.position()),
                Some(position)
            );
        }
        assert_eq!(
            positions(room.recent_after(2, |_| true)),
            Some(vec![3, 4, 5])
        );
        // Filled from the log back to the start, once asked.
        room.warm(&*stream, 0).await.expect("warm");
        assert_eq!(
            positions(room.recent_after(0, |_| true)),
            Some(vec![1, 2, 3, 4, 5])
        );
    }

    #[tokio::test]
    async fn a_room_without_a_window_keeps_nothing_and_reads_nothing() {
        let stream: Arc<dyn EventStream> = Arc::new(EmbeddedStream::default());
        let rooms = Arc::new(Rooms::new(Arc::clone(&stream), LINGER, 0));
        let session = Uuid::now_v7();
        stream
            .publish(event(session, 1, "setup"))
            .await
            .expect("publish");
        let (member, mut rx) = presenter(WireFormat::Json, 1 << 20);
        let room = rooms
            .join(session, Uuid::now_v7(), member)
            .await
            .expect("join");
        stream
            .publish(event(session, 2, "Ada"))
            .await
            .expect("publish");
        assert!(received(&mut rx).await.is_some());
        room.warm(&*stream, 0).await.expect("warm");
        assert_eq!(positions(room.recent_after(1, |_| true)), None);
        assert_eq!(positions(room.recent_after(2, |_| true)), Some(vec![]));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_room_stays_open_for_the_linger_unless_someone_comes() {
        let (_stream, rooms, session) = session_with_one_event().await;
        let join = |id| {
            let rooms = Arc::clone(&rooms);
            async move {
                let (member, _rx) = presenter(WireFormat::Json, 1 << 20);
                rooms.join(session, id, member).await.expect("join")
            }
        };
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let room = join(first).await;
        rooms.leave(session, first).await;
        tokio::time::sleep(LINGER / 2).await;
        // Back within the linger: the same room, then empty again.
        let again = join(second).await;
        assert!(Arc::ptr_eq(&room, &again), "the room was kept");
        rooms.leave(session, second).await;
        // The first close was planned for now; the room was used since.
        tokio::time::sleep(LINGER / 2 + Duration::from_millis(1)).await;
        assert!(rooms.is_open(session).await, "closed by an outdated plan");
        tokio::time::sleep(LINGER / 2).await;
        assert!(!rooms.is_open(session).await, "still open past the linger");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_the_room_ends_when_it_dispatches_or_at_the_deadline() {
        let (stream, room, mut rx, session) = room_with_a_presenter().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        // `join!` polls in order: the wait is registered before the events come.
        let (advanced, ()) = tokio::join!(room.advanced_past(1, deadline), async {
            for position in 2..=3 {
                stream
                    .publish(event(session, position, "Ada"))
                    .await
                    .expect("publish");
            }
        });
        assert!(advanced, "woken by the dispatch");
        assert!(tokio::time::Instant::now() < deadline);
        for position in 2..=3 {
            assert_eq!(
                received(&mut rx).await.map(|e| e.position()),
                Some(position)
            );
        }
        let later = tokio::time::Instant::now() + Duration::from_secs(1);
        assert!(!room.advanced_past(3, later).await, "nothing came");
        assert!(tokio::time::Instant::now() >= later);
    }
}
