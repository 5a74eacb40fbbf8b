//! The outbox relay: publishes committed events to the stream, in each session's
//! position order, and marks them published once the stream has them.
//!
//! A commit hands its events to the relay in memory ([`Handoff`]) and wakes it;
//! the relay publishes those at once, without reading them back from the outbox,
//! and a task beside it marks what it published at most every [`MARK_INTERVAL`],
//! one statement for all sessions, instead of a commit of its own after every
//! batch; publishing never waits for a mark. The outbox
//! stays the record: every [`SWEEP_INTERVAL`] the relay publishes what has been
//! pending in it for longer than that, so events left by a crash or by another
//! node are published too; after a failure, when the hand-off overflowed or when
//! the stream refused a handed event as out of order, it reads everything
//! pending from the outbox instead of the hand-off. Publishing is at least once
//! (a crash between publish and mark repeats it; so does an event both handed
//! over and read by a sweep); the stream ignores positions it already holds,
//! which makes the log exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use pollcast_protocol::{DomainEvent, SessionEvent, Timestamp};
use pollcast_store::outbox;
use pollcast_stream::{EventStream, StreamError};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, QueryTrait,
};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{DomainError, DomainResult};

/// Sessions whose published ranges one `UPDATE` marks (three bound values each).
const MARK_PER_STATEMENT: usize = 256;

/// Pending events read per round trip.
const BATCH: u64 = 512;
/// Sessions whose events the relay publishes at once. Within a session each
/// publish waits for the one before (the stream must take them in order); across
/// sessions nothing does, and on JetStream, where a publish is a round trip to
/// the server, publishing 200 busy sessions one event at a time let the queue
/// grow to seconds.
const SESSIONS_AT_ONCE: usize = 64;
/// How often the relay reads the outbox for events pending longer than this,
/// however busy the hand-off keeps it.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Longest time events published from the hand-off stay unmarked. A mark is a
/// write transaction (an `fsync` under SQLite's `synchronous=FULL`); one after
/// every vote batch cost as much as the batch's own commit. What a crash leaves
/// unmarked is published again after the restart and ignored by the stream.
pub const MARK_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait between retries while the stream or database is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Sessions whose newest position in the stream the relay remembers (about 50
/// bytes each).
const KNOWN_SESSIONS: usize = 16_384;
/// Events the hand-off holds for a relay that is not keeping up (or not running,
/// as in a process that only serves reads). Past it, commits stop handing over
/// and the relay's next pass reads the outbox, where every event is anyway.
const HANDOFF_CAPACITY: usize = 65_536;

/// Committed events on their way to the relay, in memory: a shortcut past the
/// outbox, which still holds every one of them.
pub(crate) struct Handoff {
    queue: Mutex<Queue>,
    wake: Notify,
    capacity: usize,
}

impl Default for Handoff {
    fn default() -> Self {
        Self::with_capacity(HANDOFF_CAPACITY)
    }
}

#[derive(Default)]
struct Queue {
    events: Vec<SessionEvent>,
    /// Something committed was not handed over: the next pass must read the
    /// outbox.
    overflowed: bool,
}

impl Handoff {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            queue: Mutex::default(),
            wake: Notify::new(),
            capacity,
        }
    }

    /// Hands over `events` of `session_id`, just committed at positions
    /// `first..` with time `at`, and wakes the relay. Call it after the commit:
    /// the relay may publish them at once.
    pub(crate) fn push(
        &self,
        session_id: Uuid,
        first: i64,
        at: Timestamp,
        events: impl IntoIterator<Item = DomainEvent>,
    ) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            for (position, event) in (first..).zip(events) {
                match u64::try_from(position) {
                    Ok(position) if queue.events.len() < self.capacity => {
                        queue.events.push(SessionEvent {
                            session_id,
                            position,
                            timestamp: at,
                            event,
                        });
                    }
                    // The outbox has it; the sweep reports what is wrong with it.
                    _ => queue.overflowed = true,
                }
            }
        }
        self.wake.notify_one();
    }

    /// Takes what is handed over: the events, and whether any were not.
    fn take(&self) -> (Vec<SessionEvent>, bool) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let overflowed = std::mem::take(&mut queue.overflowed);
        (std::mem::take(&mut queue.events), overflowed)
    }
}

/// Per session, the positions published from the hand-off and not yet marked,
/// shared by the publishing loop and the task that marks them. A range is whole
/// in the stream: it refuses a gap, so every position between two it accepted
/// is there too.
#[derive(Default)]
struct Unmarked {
    ranges: Mutex<HashMap<Uuid, (i64, i64)>>,
    /// Wakes the marking task before its interval when one statement's worth
    /// of sessions waits.
    full: Notify,
}

impl Unmarked {
    fn add(&self, session_id: Uuid, range: (i64, i64)) {
        let full = {
            let mut ranges = self.ranges.lock().unwrap_or_else(PoisonError::into_inner);
            widen(&mut ranges, session_id, range);
            ranges.len() >= MARK_PER_STATEMENT
        };
        if full {
            self.full.notify_one();
        }
    }

    fn take(&self) -> HashMap<Uuid, (i64, i64)> {
        std::mem::take(&mut *self.ranges.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Marks what is waiting; on failure keeps it for the next try.
    async fn flush(&self, db: &DatabaseConnection) -> DomainResult<()> {
        let taken = self.take();
        if taken.is_empty() {
            return Ok(());
        }
        let marked = mark_published(db, &taken).await;
        if marked.is_err() {
            for (session_id, range) in taken {
                self.add(session_id, range);
            }
        }
        marked
    }

    /// Marks what the relay publishes from the hand-off, every [`MARK_INTERVAL`]
    /// (sooner when a statement's worth waits), until `shutdown` turns true.
    /// A task of its own: under SQLite a mark waits for the one connection
    /// behind every other write, 100–300 ms under load, and while the
    /// publishing loop marked between passes that wait held every session's
    /// next event (`docs/benchmarks.md`). While the database fails, it backs
    /// off as the relay does.
    async fn run(self: Arc<Self>, db: DatabaseConnection, mut shutdown: watch::Receiver<bool>) {
        let mut next = Instant::now() + MARK_INTERVAL;
        let mut backoff = None;
        while !*shutdown.borrow() {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = self.full.notified(), if backoff.is_none() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            match self.flush(&db).await {
                Ok(()) => {
                    backoff = None;
                    next = Instant::now() + MARK_INTERVAL;
                }
                Err(err) => {
                    let wait =
                        backoff.map_or(MARK_INTERVAL, |b: Duration| (b * 2).min(MAX_BACKOFF));
                    tracing::warn!(error = %err, retry_in = ?wait, "cannot mark published events");
                    backoff = Some(wait);
                    next = Instant::now() + wait;
                }
            }
        }
    }
}

/// Publishes the outbox to the event stream.
pub struct Relay {
    db: DatabaseConnection,
    stream: Arc<dyn EventStream>,
    handoff: Arc<Handoff>,
    /// What the hand-off published and is not marked yet.
    unmarked: Arc<Unmarked>,
    /// Per session, the newest position this relay saw the stream take. A
    /// handed event is published only after its predecessor (or as a session's
    /// first, position 1): both engines accept any position as the first of a
    /// session they hold nothing of, so an event handed over while earlier ones
    /// wait in the outbox (a stream outage, a full hand-off) would otherwise
    /// start the session's log past them, and they would never get in.
    known: HashMap<Uuid, u64>,
}

impl Relay {
    pub(crate) fn new(
        db: DatabaseConnection,
        stream: Arc<dyn EventStream>,
        handoff: Arc<Handoff>,
    ) -> Self {
        Self {
            db,
            stream,
            handoff,
            unmarked: Arc::default(),
            known: HashMap::new(),
        }
    }

    /// Runs until `shutdown` turns true, then publishes what is pending once more
    /// and returns.
    ///
    /// In steady state the loop itself never waits for the database: marks are
    /// the marking task's, and the periodic read of stale events runs beside
    /// the passes, which go on publishing from the hand-off meanwhile. Under
    /// SQLite every statement waits for the one connection behind the vote
    /// batches, 100–300 ms under load, and each such wait in the loop held
    /// every session's next event (`docs/benchmarks.md`).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let marking = tokio::spawn(self.unmarked.clone().run(self.db.clone(), shutdown.clone()));
        let mut backoff = Duration::from_millis(50);
        // A whole sweep first: whatever a previous run left pending. Then a read
        // of what is stale every SWEEP_INTERVAL, and a whole sweep whenever the
        // hand-off cannot be trusted.
        let mut sweep_at = Instant::now();
        let mut sweep_whole = true;
        let mut reading: Option<StaleRead> = None;
        let mut found = None;
        loop {
            let now = Instant::now();
            if now >= sweep_at && !sweep_whole {
                sweep_at = now + SWEEP_INTERVAL;
                // One read at a time: a slow one skips the next.
                if reading.is_none() {
                    reading = Some(Box::pin(read_stale(self.db.clone(), self.unmarked.clone())));
                }
            }
            let pass = if let Some(rows) = found.take() {
                self.publish_stale(rows).await
            } else if sweep_whole && now >= sweep_at {
                sweep_at = now + SWEEP_INTERVAL;
                sweep_whole = false;
                self.sweep().await.map(|_| Handed::Done)
            } else {
                self.publish_handed().await
            };
            let wait_until = match pass {
                Ok(Handed::Done) => {
                    backoff = Duration::from_millis(50);
                    sweep_at
                }
                Ok(Handed::ReadAgain) => {
                    sweep_at = now;
                    now
                }
                Ok(Handed::NeedsSweep) => {
                    sweep_at = now;
                    sweep_whole = true;
                    now
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?backoff, "outbox relay failed");
                    // The retry reads the outbox: what failed is there.
                    sweep_at = now + backoff;
                    sweep_whole = true;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    sweep_at
                }
            };
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                () = self.handoff.wake.notified() => {}
                () = tokio::time::sleep_until(wait_until) => {}
                _ = shutdown.changed() => {}
                rows = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                    reading = None;
                    found = Some(rows);
                }
            }
        }
        // A read in flight is dropped: the last sweep reads everything. The
        // marking task's statement in flight finishes; what it leaves, the last
        // sweep marks.
        drop(reading);
        if let Err(err) = marking.await {
            tracing::warn!(error = %err, "marking task failed");
        }
        if let Err(err) = self.sweep().await {
            tracing::warn!(error = %err, "events left pending at shutdown");
        }
    }

    /// Publishes what commits handed over, in each session's position order, and
    /// notes what the stream took for the next mark. Asks for a sweep when
    /// something was not handed over, when an event does not follow what this
    /// relay knows the stream holds (an earlier position failed to publish, was
    /// not handed over yet, or was published by another node), or when the
    /// stream refused one as out of order: the outbox has what is missing.
    async fn publish_handed(&mut self) -> DomainResult<Handed> {
        let (mut events, overflowed) = self.handoff.take();
        if overflowed {
            return Ok(Handed::NeedsSweep);
        }
        // Commits of one session hand over in any order; their positions do not.
        events.sort_by_key(|event| (event.session_id, event.position));
        let mut blocked = false;
        let mut chains = Vec::new();
        for (session_id, session_events) in by_session(events, |e| e.session_id) {
            let mut last = self.known.get(&session_id).copied();
            let mut chain = Vec::with_capacity(session_events.len());
            for event in session_events {
                if last.is_some_and(|last| event.position <= last) {
                    // In the stream already: a sweep read it from the outbox
                    // between its commit and its hand-off (and marked it). Taken
                    // for a gap, it asked for another sweep, whose own late
                    // hand-offs asked for the next: a busy node swept without
                    // end, each sweep two writes on the database.
                    continue;
                }
                if last.map_or(event.position != 1, |last| event.position != last + 1) {
                    blocked = true;
                    break;
                }
                last = Some(event.position);
                chain.push(event);
            }
            if !chain.is_empty() {
                chains.push((session_id, chain));
            }
        }
        let mut failure = None;
        for outcome in publish_chains(&self.stream, chains).await {
            if let Some((_, last)) = outcome.took {
                self.note_in_stream(outcome.session_id, last);
            }
            if let Some(range) = outcome.range() {
                self.unmarked.add(outcome.session_id, range);
            }
            match outcome.stop {
                None => {}
                Some(StreamError::OutOfOrder { expected, got, .. }) => {
                    tracing::debug!(session = %outcome.session_id, expected, got, "handed event ahead of the stream");
                    blocked = true;
                }
                Some(err) => failure = failure.or(Some(err)),
            }
        }
        if let Some(err) = failure {
            return Err(DomainError::Internal(format!("event stream: {err}")));
        }
        Ok(if blocked {
            Handed::NeedsSweep
        } else {
            Handed::Done
        })
    }

    /// Marks what the hand-off published, then publishes what is pending in the
    /// outbox. What was handed over until now is dropped: it is committed, so
    /// the outbox read that follows sees it.
    async fn sweep(&mut self) -> DomainResult<usize> {
        drop(self.handoff.take());
        self.flush_marks().await?;
        self.publish_pending().await
    }

    /// Publishes what a periodic read found pending for longer than
    /// [`SWEEP_INTERVAL`] ([`read_stale`]: a commit that did not hand over,
    /// another node's events that node did not publish), and leaves the marks
    /// to the marking task. What the hand-off holds stays there for the next
    /// pass. Reading it back instead, as [`Relay::sweep`] does, made every
    /// periodic sweep under load take over a second's events: it dropped what a
    /// slow mark had let pile up and published it again row by row, 0.3–1.3 s
    /// with nothing else going (`docs/benchmarks.md`). Rows the hand-off
    /// published whose mark is still waiting are only marked.
    async fn publish_stale(
        &mut self,
        rows: DomainResult<Vec<outbox::Model>>,
    ) -> DomainResult<Handed> {
        let rows = rows?;
        let full = rows.len() as u64 == BATCH;
        let read = rows.len();
        let held = rows
            .iter()
            .filter(|row| row.position <= self.known_position(row.session_id))
            .count();
        let (published, failure) = self.publish_rows(rows).await;
        let mut progress = 0;
        for (&session_id, &(first, last)) in &published {
            self.note_in_stream(session_id, u64::try_from(last).unwrap_or(0));
            self.unmarked.add(session_id, (first, last));
            progress += usize::try_from(last - first + 1).unwrap_or(0);
        }
        if let Some(err) = failure {
            return Err(err);
        }
        if full {
            // More may be stale: read on while this read published anything
            // new (the next read marks first, so it sees past this one).
            return Ok(if progress > held {
                Handed::ReadAgain
            } else {
                Handed::Done
            });
        }
        // What this read left behind is all that is stale (sessions blocked
        // behind an event another node has not published yet).
        metrics::gauge!("pollcast_outbox_pending").set(read.saturating_sub(progress) as f64);
        Ok(Handed::Done)
    }

    /// Notes that the stream holds `session_id` up to `position`. The map is
    /// bounded: emptied when full, which costs each active session one sweep.
    fn note_in_stream(&mut self, session_id: Uuid, position: u64) {
        if self.known.len() >= KNOWN_SESSIONS && !self.known.contains_key(&session_id) {
            self.known.clear();
        }
        self.known.insert(session_id, position);
    }

    /// The newest position this relay saw the stream take for `session_id`, as
    /// the outbox counts (0 for none).
    fn known_position(&self, session_id: Uuid) -> i64 {
        self.known
            .get(&session_id)
            .map_or(0, |&p| i64::try_from(p).unwrap_or(i64::MAX))
    }

    /// Marks the ranges the hand-off published, now.
    async fn flush_marks(&self) -> DomainResult<()> {
        self.unmarked.flush(&self.db).await
    }

    /// Publishes the already published events of the last `window` again, oldest
    /// first, into an engine whose log did not survive the restart (the embedded
    /// one), so replays and session checks work across restarts. Call it before
    /// [`Relay::run`]. Returns how many events it restored.
    pub async fn restore_history(&self, window: Duration) -> DomainResult<usize> {
        let since = chrono::Utc::now()
            - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        let mut pages = outbox::Entity::find()
            .filter(outbox::Column::PublishedAt.is_not_null())
            .filter(outbox::Column::OccurredAt.gte(since))
            .order_by_asc(outbox::Column::SessionId)
            .order_by_asc(outbox::Column::Position)
            .paginate(&self.db, BATCH);
        let mut restored = 0;
        while let Some(rows) = pages.fetch_and_next().await? {
            for row in rows {
                let event = decode(&row)?;
                match self.stream.publish(event).await {
                    Ok(_) => restored += 1,
                    // A gap in the window (an event older than it, published later)
                    // only shortens that session's history.
                    Err(StreamError::OutOfOrder { .. }) => {}
                    Err(err) => return Err(DomainError::Internal(format!("event stream: {err}"))),
                }
            }
        }
        Ok(restored)
    }

    /// Publishes every pending event it can; returns how many it published, and
    /// sets `pollcast_outbox_pending` to how many it could not.
    pub async fn publish_pending(&mut self) -> DomainResult<usize> {
        self.publish_pending_before(None).await
    }

    /// [`Relay::publish_pending`] for the events that occurred before `before`,
    /// or all.
    async fn publish_pending_before(
        &mut self,
        before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> DomainResult<usize> {
        let mut total = 0;
        loop {
            let rows = pending(before).all(&self.db).await?;
            let full = rows.len() as u64 == BATCH;
            let read = rows.len();
            let (published, failure) = self.publish_rows(rows).await;
            for (&session_id, &(_, last)) in &published {
                self.note_in_stream(session_id, u64::try_from(last).unwrap_or(0));
            }
            let progress = published
                .values()
                .map(|(first, last)| last - first + 1)
                .sum::<i64>();
            mark_published(&self.db, &published).await?;
            total += usize::try_from(progress).unwrap_or(0);
            if let Some(err) = failure {
                self.report_pending().await;
                return Err(err);
            }
            if !full {
                // What this read left behind is all that is pending (sessions
                // blocked behind an event another node has not published yet).
                let left = read.saturating_sub(usize::try_from(progress).unwrap_or(0));
                metrics::gauge!("pollcast_outbox_pending").set(left as f64);
                return Ok(total);
            }
            if progress == 0 {
                self.report_pending().await;
                return Ok(total);
            }
        }
    }

    /// Counts the unpublished events (a range of the partial index on them), for
    /// when the stream is failing and they pile up: the alert watches this.
    async fn report_pending(&self) {
        let pending = outbox::Entity::find()
            .filter(outbox::Column::PublishedAt.is_null())
            .count(&self.db)
            .await;
        match pending {
            Ok(n) => metrics::gauge!("pollcast_outbox_pending").set(n as f64),
            Err(err) => tracing::debug!(error = %err, "cannot count pending events"),
        }
    }

    /// Publishes rows, each session's in order; returns, per session, the range
    /// of positions the stream now holds, and an error that stopped a session,
    /// if any. Rows this relay knows the stream holds (the hand-off published
    /// them and their mark waits) are only returned, not published again.
    async fn publish_rows(
        &self,
        rows: Vec<outbox::Model>,
    ) -> (HashMap<Uuid, (i64, i64)>, Option<DomainError>) {
        let mut published = HashMap::new();
        let mut chains = Vec::new();
        for (session_id, session_rows) in by_session(rows, |row| row.session_id) {
            let known = self.known_position(session_id);
            let (held, rest) =
                session_rows.split_at(session_rows.partition_point(|row| row.position <= known));
            if let (Some(first), Some(last)) = (held.first(), held.last()) {
                published.insert(session_id, (first.position, last.position));
            }
            let mut chain = Vec::with_capacity(rest.len());
            for row in rest {
                match decode(row) {
                    Ok(event) => chain.push(event),
                    Err(err) => {
                        // What follows it waits: the stream takes no gap.
                        tracing::error!(session = %session_id, position = row.position, error = %err, "undecodable outbox row");
                        break;
                    }
                }
            }
            if !chain.is_empty() {
                chains.push((session_id, chain));
            }
        }
        let mut failure = None;
        for outcome in publish_chains(&self.stream, chains).await {
            if let Some(range) = outcome.range() {
                // Whole with what the stream held before: it takes no gap.
                widen(&mut published, outcome.session_id, range);
            }
            match outcome.stop {
                None => {}
                // An earlier position is not in the stream yet (another node has
                // not published it). Leave this session for the next sweep.
                Some(StreamError::OutOfOrder { expected, got, .. }) => {
                    tracing::warn!(session = %outcome.session_id, expected, got, "stream is behind the outbox");
                }
                Some(err) => {
                    failure = failure
                        .or_else(|| Some(DomainError::Internal(format!("event stream: {err}"))));
                }
            }
        }
        (published, failure)
    }
}

/// Marks what the stream now holds, one statement for up to
/// [`MARK_PER_STATEMENT`] sessions: with many small sessions a pass publishes
/// a little of each, and a statement per session (each its own commit) made
/// the relay's bookkeeping cost more than the events.
async fn mark_published(
    db: &DatabaseConnection,
    published: &HashMap<Uuid, (i64, i64)>,
) -> DomainResult<()> {
    let now = chrono::Utc::now();
    let ranges: Vec<_> = published.iter().collect();
    for chunk in ranges.chunks(MARK_PER_STATEMENT) {
        let mut any = Condition::any();
        for &(&session_id, &(first, last)) in chunk {
            any = any.add(
                Condition::all()
                    .add(outbox::Column::SessionId.eq(session_id))
                    .add(outbox::Column::Position.between(first, last)),
            );
        }
        outbox::Entity::update_many()
            .col_expr(outbox::Column::PublishedAt, Expr::value(now))
            .filter(outbox::Column::PublishedAt.is_null())
            .filter(any)
            .exec(db)
            .await?;
    }
    Ok(())
}

/// The first [`BATCH`] pending events that occurred before `before` (or all),
/// in each session's position order.
fn pending(before: Option<chrono::DateTime<chrono::Utc>>) -> sea_orm::Select<outbox::Entity> {
    outbox::Entity::find()
        .filter(outbox::Column::PublishedAt.is_null())
        .apply_if(before, |query, before| {
            query.filter(outbox::Column::OccurredAt.lt(before))
        })
        .order_by_asc(outbox::Column::SessionId)
        .order_by_asc(outbox::Column::Position)
        .limit(BATCH)
}

/// A read of the stale events in flight, beside the relay's passes.
type StaleRead = std::pin::Pin<Box<dyn Future<Output = DomainResult<Vec<outbox::Model>>> + Send>>;

/// Marks what waits in `unmarked`, then reads the events pending for longer
/// than [`SWEEP_INTERVAL`]; on handles of its own, so that the relay's loop
/// does not wait for it. Marking first keeps what the hand-off published out
/// of the read, and lets a read that follows a full one see past it.
async fn read_stale(
    db: DatabaseConnection,
    unmarked: Arc<Unmarked>,
) -> DomainResult<Vec<outbox::Model>> {
    unmarked.flush(&db).await?;
    let stale = chrono::Utc::now()
        - chrono::Duration::from_std(SWEEP_INTERVAL).unwrap_or(chrono::Duration::MAX);
    Ok(pending(Some(stale)).all(&db).await?)
}

/// What a pass of the relay leaves to do.
enum Handed {
    Done,
    /// A read of stale events was full and published some: read on now.
    ReadAgain,
    /// Read the outbox now: something it holds was not published.
    NeedsSweep,
}

/// How far [`publish_chains`] got with one session's events.
struct Outcome {
    session_id: Uuid,
    /// The first and last position the stream took (or already held).
    took: Option<(u64, u64)>,
    /// What stopped the session's events before their end.
    stop: Option<StreamError>,
}

impl Outcome {
    /// [`Outcome::took`] as the outbox's positions, for marking.
    fn range(&self) -> Option<(i64, i64)> {
        let outbox = |p: u64| i64::try_from(p).unwrap_or(i64::MAX);
        self.took.map(|(first, last)| (outbox(first), outbox(last)))
    }
}

/// Publishes each chain (one session's events, in position order) as one run
/// ([`EventStream::publish_run`]: on JetStream, atomic batches), and
/// [`SESSIONS_AT_ONCE`] chains side by side. Once the stream fails (not a
/// refusal of one session's event: it is down, say), no chain starts another
/// publish: each would wait for its own timeout.
async fn publish_chains(
    stream: &Arc<dyn EventStream>,
    chains: Vec<(Uuid, Vec<SessionEvent>)>,
) -> Vec<Outcome> {
    let failed = AtomicBool::new(false);
    futures::stream::iter(chains)
        .map(|(session_id, chain)| publish_chain(stream.as_ref(), session_id, chain, &failed))
        .buffer_unordered(SESSIONS_AT_ONCE)
        .collect()
        .await
}

/// Publishes one session's events in order, up to the first the stream refuses,
/// unless `failed` is set.
async fn publish_chain(
    stream: &dyn EventStream,
    session_id: Uuid,
    chain: Vec<SessionEvent>,
    failed: &AtomicBool,
) -> Outcome {
    let mut outcome = Outcome {
        session_id,
        took: None,
        stop: None,
    };
    if failed.load(Ordering::Relaxed) {
        return outcome;
    }
    let sent: Vec<(u64, Timestamp)> = chain.iter().map(|e| (e.position, e.timestamp)).collect();
    let run = stream.publish_run(chain).await;
    // A run's events count as acknowledged when the run is: on JetStream one
    // acknowledgement answers for a batch; a short run's single publishes are
    // one round trip each, so its first events' lag is overstated by the rest.
    let taken = &sent[..run.taken.min(sent.len())];
    for &(_, at) in taken {
        record_publish_lag(at);
    }
    if let (Some(first), Some(last)) = (taken.first(), taken.last()) {
        outcome.took = Some((first.0, last.0));
    }
    if let Some(err) = run.stopped {
        if !matches!(err, StreamError::OutOfOrder { .. }) {
            failed.store(true, Ordering::Relaxed);
        }
        outcome.stop = Some(err);
    }
    outcome
}

/// Widens `session_id`'s range in `ranges` to take in `range` (both whole in
/// the stream, so everything between them is too).
fn widen(ranges: &mut HashMap<Uuid, (i64, i64)>, session_id: Uuid, range: (i64, i64)) {
    ranges
        .entry(session_id)
        .and_modify(|r| *r = (r.0.min(range.0), r.1.max(range.1)))
        .or_insert(range);
}

/// Splits `items`, sorted by session, into each session's run.
fn by_session<T>(items: Vec<T>, session_of: impl Fn(&T) -> Uuid) -> Vec<(Uuid, Vec<T>)> {
    let mut runs: Vec<(Uuid, Vec<T>)> = Vec::new();
    for item in items {
        let session_id = session_of(&item);
        match runs.last_mut() {
            Some((id, run)) if *id == session_id => run.push(item),
            _ => runs.push((session_id, vec![item])),
        }
    }
    runs
}

/// Records commit → stream acknowledgement for an event committed at `at`.
fn record_publish_lag(at: Timestamp) {
    let lag = Timestamp::now().unix_millis() - at.unix_millis();
    metrics::histogram!("pollcast_event_publish_seconds").record(lag.max(0) as f64 / 1000.0);
}

fn decode(row: &outbox::Model) -> DomainResult<SessionEvent> {
    let event: DomainEvent = serde_json::from_str(&row.payload)?;
    Ok(SessionEvent {
        session_id: row.session_id,
        position: u64::try_from(row.position)
            .map_err(|_| DomainError::Internal("negative outbox position".into()))?,
        timestamp: row.occurred_at.into(),
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{domain, outbox_of};
    use pollcast_stream::EmbeddedStream;

    /// A relay over the domain's database, publishing to a stream of its own, fed
    /// by `handoff`.
    fn relay(domain: &crate::Domain, handoff: Arc<Handoff>) -> (Relay, Arc<EmbeddedStream>) {
        let stream = Arc::new(EmbeddedStream::default());
        let relay = Relay::new(domain.db().clone(), stream.clone(), handoff);
        (relay, stream)
    }

    /// Three events of a new session (created, started, a poll), taken out of the
    /// domain's hand-off: (session, events).
    async fn three_events(domain: &crate::Domain) -> (Uuid, Vec<SessionEvent>) {
        let created = domain.create_session(None, "Relay").await.expect("session");
        let presenter = domain
            .verify_token(&created.presenter_token)
            .expect("claims");
        let session = created.session.id;
        domain
            .start_session(&presenter, session)
            .await
            .expect("start");
        domain.end_session(&presenter, session).await.expect("end");
        let (events, overflowed) = domain.inner.handoff.take();
        assert!(!overflowed);
        assert_eq!(
            events.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "every commit hands its events over"
        );
        (session, events)
    }

    /// Hands each event over on its own, as its commit would.
    fn hand_over(handoff: &Handoff, events: impl IntoIterator<Item = SessionEvent>) {
        for event in events {
            let position = i64::try_from(event.position).expect("position");
            handoff.push(event.session_id, position, event.timestamp, [event.event]);
        }
    }

    async fn in_stream(stream: &EmbeddedStream, session: Uuid) -> Vec<u64> {
        stream
            .read_after(session, 0, 100)
            .await
            .expect("read")
            .events
            .iter()
            .map(|e| e.position)
            .collect()
    }

    async fn unmarked_rows(domain: &crate::Domain, session: Uuid) -> usize {
        outbox::Entity::find()
            .filter(outbox::Column::SessionId.eq(session))
            .filter(outbox::Column::PublishedAt.is_null())
            .count(domain.db())
            .await
            .expect("count") as usize
    }

    #[tokio::test]
    async fn handed_events_are_published_from_memory_and_marked_later() {
        let domain = domain().await;
        let (session, events) = three_events(&domain).await;
        let handoff = Arc::new(Handoff::default());
        let (mut relay, stream) = relay(&domain, handoff.clone());
        // Each commit hands over on its own, and not always in position order.
        hand_over(&handoff, events.into_iter().rev());
        // Spoilt in the outbox: only the hand-off can publish them now.
        outbox::Entity::update_many()
            .col_expr(outbox::Column::Payload, Expr::value("not an event"))
            .filter(outbox::Column::SessionId.eq(session))
            .exec(domain.db())
            .await
            .expect("spoil the outbox");
        assert!(matches!(relay.publish_handed().await, Ok(Handed::Done)));
        assert_eq!(in_stream(&stream, session).await, vec![1, 2, 3]);
        assert_eq!(unmarked_rows(&domain, session).await, 3, "not marked yet");
        relay.flush_marks().await.expect("mark");
        assert_eq!(unmarked_rows(&domain, session).await, 0);
        assert!(relay.unmarked.take().is_empty());
    }

    #[tokio::test]
    async fn a_gap_in_what_is_handed_over_is_filled_from_the_outbox() {
        let domain = domain().await;
        let (session, events) = three_events(&domain).await;
        let handoff = Arc::new(Handoff::default());
        let (mut relay, stream) = relay(&domain, handoff.clone());
        // Position 1's commit has not handed it over (or its publish failed).
        // The stream would take 2 as the session's first: it must not get it.
        hand_over(&handoff, events.iter().skip(1).cloned());
        assert!(matches!(
            relay.publish_handed().await,
            Ok(Handed::NeedsSweep)
        ));
        assert_eq!(in_stream(&stream, session).await, Vec::<u64>::new());
        relay.sweep().await.expect("sweep");
        assert_eq!(in_stream(&stream, session).await, vec![1, 2, 3]);
        // Now known to the relay: what follows goes straight from the hand-off,
        // and a gap after it is still refused.
        let last = events.last().expect("three").clone();
        let next = |position: u64| SessionEvent {
            position,
            ..last.clone()
        };
        hand_over(&handoff, [next(5)]);
        assert!(matches!(
            relay.publish_handed().await,
            Ok(Handed::NeedsSweep)
        ));
        hand_over(&handoff, [next(4)]);
        assert!(matches!(relay.publish_handed().await, Ok(Handed::Done)));
        assert_eq!(in_stream(&stream, session).await, vec![1, 2, 3, 4]);
        assert_eq!(unmarked_rows(&domain, session).await, 0);
        assert_eq!(outbox_of(&domain, session).await.len(), 3);
    }

    /// An event a sweep published from the outbox is handed over after it
    /// (its commit came between the sweep's take of the hand-off and its read):
    /// passed over, not taken for a gap, which would sweep again.
    #[tokio::test]
    async fn an_event_handed_over_after_a_sweep_published_it_is_passed_over() {
        let domain = domain().await;
        let (session, events) = three_events(&domain).await;
        let handoff = Arc::new(Handoff::default());
        let (mut relay, stream) = relay(&domain, handoff.clone());
        relay.sweep().await.expect("sweep");
        assert_eq!(in_stream(&stream, session).await, vec![1, 2, 3]);
        hand_over(&handoff, events.iter().skip(1).cloned());
        assert!(matches!(relay.publish_handed().await, Ok(Handed::Done)));
        assert_eq!(in_stream(&stream, session).await, vec![1, 2, 3]);
        assert!(relay.unmarked.take().is_empty(), "the sweep marked them");
        // What follows them still goes straight from the hand-off.
        let last = events.last().expect("three").clone();
        hand_over(
            &handoff,
            [SessionEvent {
                position: 4,
                ..last
            }],
        );
        assert!(matches!(relay.publish_handed().await, Ok(Handed::Done)));
        assert_eq!(in_stream(&stream, session).await, vec![1, 2, 3, 4]);
    }

    /// Makes a session's outbox rows 10 s old, as if pending that long.
    async fn age(domain: &crate::Domain, session: Uuid) {
        outbox::Entity::update_many()
            .col_expr(
                outbox::Column::OccurredAt,
                Expr::value(chrono::Utc::now() - chrono::Duration::seconds(10)),
            )
            .filter(outbox::Column::SessionId.eq(session))
            .exec(domain.db())
            .await
            .expect("age the events");
    }

    /// The periodic read publishes what has been pending for longer than
    /// SWEEP_INTERVAL and leaves what the hand-off holds to the next pass.
    #[tokio::test]
    async fn the_periodic_sweep_leaves_fresh_events_to_the_hand_off() {
        let domain = domain().await;
        let (fresh, fresh_events) = three_events(&domain).await;
        // Committed, never handed over (a lost hand-off).
        let (stale, _) = three_events(&domain).await;
        age(&domain, stale).await;
        let handoff = Arc::new(Handoff::default());
        let (mut relay, stream) = relay(&domain, handoff.clone());
        hand_over(&handoff, fresh_events);
        let found = read_stale(domain.db().clone(), Arc::default()).await;
        assert!(matches!(relay.publish_stale(found).await, Ok(Handed::Done)));
        assert_eq!(in_stream(&stream, stale).await, vec![1, 2, 3]);
        assert_eq!(in_stream(&stream, fresh).await, Vec::<u64>::new());
        relay.flush_marks().await.expect("mark");
        assert_eq!(unmarked_rows(&domain, stale).await, 0);
        assert!(matches!(relay.publish_handed().await, Ok(Handed::Done)));
        assert_eq!(in_stream(&stream, fresh).await, vec![1, 2, 3]);
    }

    /// Events the hand-off published whose mark has not landed yet look stale
    /// to the periodic read; it marks them and does not publish them again.
    #[tokio::test]
    async fn the_periodic_sweep_does_not_publish_again_what_waits_for_its_mark() {
        let domain = domain().await;
        let (session, events) = three_events(&domain).await;
        // Counts publishes; gates none (no session has the nil id).
        let counted = Arc::new(Gated::new(
            Arc::new(EmbeddedStream::default()),
            Uuid::nil(),
            false,
        ));
        let handoff = Arc::new(Handoff::default());
        let mut relay = Relay::new(domain.db().clone(), counted.clone(), handoff.clone());
        hand_over(&handoff, events);
        assert!(matches!(relay.publish_handed().await, Ok(Handed::Done)));
        assert_eq!(counted.publishes.load(Ordering::SeqCst), 3);
        age(&domain, session).await;
        let found = read_stale(domain.db().clone(), Arc::default()).await;
        assert_eq!(found.as_ref().map(Vec::len).ok(), Some(3), "still unmarked");
        assert!(matches!(relay.publish_stale(found).await, Ok(Handed::Done)));
        assert_eq!(
            counted.publishes.load(Ordering::SeqCst),
            3,
            "published again"
        );
        relay.flush_marks().await.expect("mark");
        assert_eq!(unmarked_rows(&domain, session).await, 0);
    }

    /// Awaits `session` holding `positions` in `stream`, for at most 3 s.
    async fn until_in_stream(stream: &EmbeddedStream, session: Uuid, positions: Vec<u64>) -> bool {
        tokio::time::timeout(Duration::from_secs(3), async {
            while in_stream(stream, session).await != positions {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok()
    }

    /// Awaits every outbox row of `session` marked, for at most 5 s.
    async fn until_marked(domain: &crate::Domain, session: Uuid) -> bool {
        tokio::time::timeout(Duration::from_secs(5), async {
            while unmarked_rows(domain, session).await > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok()
    }

    /// While the database is busy (here: its one SQLite connection held by a
    /// transaction, as vote batches hold it under load), the running relay
    /// goes on publishing what commits hand over; the marks land once the
    /// database is free. The loop used to mark between passes, and a mark
    /// waiting for the connection held every session's next event.
    #[tokio::test]
    async fn a_mark_waiting_for_the_database_holds_back_no_publish() {
        let domain = domain().await;
        let (session, events) = three_events(&domain).await;
        // Pending, never handed over: for the start-up sweep.
        let (left, _) = three_events(&domain).await;
        let handoff = Arc::new(Handoff::default());
        let (relay, stream) = relay(&domain, handoff.clone());
        let (stop, shutdown) = watch::channel(false);
        // Marked as published: the start-up sweep must leave it to the hand-off.
        outbox::Entity::update_many()
            .col_expr(outbox::Column::PublishedAt, Expr::value(chrono::Utc::now()))
            .filter(outbox::Column::SessionId.eq(session))
            .exec(domain.db())
            .await
            .expect("hide the events from the sweep");
        let running = tokio::spawn(relay.run(shutdown));
        assert!(until_in_stream(&stream, left, vec![1, 2, 3]).await);
        assert!(
            until_marked(&domain, left).await,
            "the start-up sweep did not mark"
        );
        let first = Uuid::from_u128(1);
        let event = |session_id: Uuid, position: u64| SessionEvent {
            session_id,
            position,
            ..events[0].clone()
        };
        // The start-up sweep is over: its mark was its last statement. Now the
        // database is busy, and a statement's worth of sessions asks for a mark
        // at once.
        let busy = sea_orm::TransactionTrait::begin(domain.db())
            .await
            .expect("hold the connection");
        outbox::Entity::update_many()
            .col_expr(
                outbox::Column::PublishedAt,
                Expr::value(None::<chrono::DateTime<chrono::Utc>>),
            )
            .filter(outbox::Column::SessionId.eq(session))
            .exec(&busy)
            .await
            .expect("unmark in the transaction");
        let sessions = u128::try_from(MARK_PER_STATEMENT).expect("fits");
        hand_over(
            &handoff,
            (1..=sessions).map(|i| event(Uuid::from_u128(i), 1)),
        );
        let last = Uuid::from_u128(sessions);
        assert!(until_in_stream(&stream, last, vec![1]).await);
        hand_over(&handoff, [event(first, 2)]);
        assert!(
            until_in_stream(&stream, first, vec![1, 2]).await,
            "a waiting mark held back the next publish"
        );
        // The transaction leaves the session's events pending; handed over,
        // they are published from memory and marked by the marking task.
        busy.commit().await.expect("commit");
        hand_over(&handoff, events);
        assert!(until_in_stream(&stream, session, vec![1, 2, 3]).await);
        assert!(
            until_marked(&domain, session).await,
            "the marks did not land"
        );
        stop.send(true).expect("stop");
        running.await.expect("relay stops");
    }

    #[tokio::test]
    async fn a_full_hand_off_sends_the_relay_to_the_outbox() {
        let domain = domain().await;
        let (session, events) = three_events(&domain).await;
        let handoff = Arc::new(Handoff::with_capacity(2));
        let (mut relay, stream) = relay(&domain, handoff.clone());
        hand_over(&handoff, events);
        assert!(matches!(
            relay.publish_handed().await,
            Ok(Handed::NeedsSweep)
        ));
        assert_eq!(handoff.take().0.len(), 0, "the pass took what was held");
        relay.sweep().await.expect("sweep");
        assert_eq!(in_stream(&stream, session).await, vec![1, 2, 3]);
    }

    /// An embedded stream whose publishes for one session wait until the test
    /// opens the gate, as a JetStream publish waits for its acknowledgement;
    /// or, `down`, whose every publish fails. Counts the publishes asked for.
    struct Gated {
        inner: Arc<EmbeddedStream>,
        session: Uuid,
        gate: tokio::sync::Semaphore,
        down: bool,
        publishes: std::sync::atomic::AtomicUsize,
    }

    impl Gated {
        fn new(inner: Arc<EmbeddedStream>, session: Uuid, down: bool) -> Self {
            Self {
                inner,
                session,
                gate: tokio::sync::Semaphore::new(0),
                down,
                publishes: std::sync::atomic::AtomicUsize::new(0),
            }
        }
    }

    #[async_trait::async_trait]
    impl EventStream for Gated {
        async fn publish(
            &self,
            event: SessionEvent,
        ) -> Result<pollcast_stream::Published, StreamError> {
            self.publishes.fetch_add(1, Ordering::SeqCst);
            if self.down {
                return Err(StreamError::Unavailable("down".into()));
            }
            if event.session_id == self.session {
                let _pass = self.gate.acquire().await.expect("gate");
            }
            self.inner.publish(event).await
        }
        async fn read_after(
            &self,
            session: Uuid,
            after: u64,
            limit: usize,
        ) -> Result<pollcast_stream::ReadBatch, StreamError> {
            self.inner.read_after(session, after, limit).await
        }
        async fn newest(&self, session: Uuid) -> Result<Option<u64>, StreamError> {
            self.inner.newest(session).await
        }
        async fn subscribe(
            &self,
            session: Uuid,
        ) -> Result<pollcast_stream::Subscription, StreamError> {
            self.inner.subscribe(session).await
        }
        async fn ping(&self) -> Result<(), StreamError> {
            self.inner.ping().await
        }
        async fn report_presence(
            &self,
            signal: pollcast_protocol::PresenceSignal,
        ) -> Result<(), StreamError> {
            self.inner.report_presence(signal).await
        }
        async fn presence(&self) -> Result<pollcast_stream::PresenceFeed, StreamError> {
            self.inner.presence().await
        }
    }

    /// A session whose publishes wait (a slow acknowledgement) does not hold
    /// back another session's: the relay publishes sessions side by side, each
    /// in its own order. Run one after another, the second session waited for
    /// the first's every round trip.
    #[tokio::test]
    async fn a_session_waiting_for_the_stream_does_not_hold_back_another() {
        let domain = domain().await;
        let (a, a_events) = three_events(&domain).await;
        let (b, b_events) = three_events(&domain).await;
        // The session published first in (session, position) order waits.
        let (slow, fast) = (a.min(b), a.max(b));
        let inner = Arc::new(EmbeddedStream::default());
        let gated = Arc::new(Gated::new(inner.clone(), slow, false));
        let handoff = Arc::new(Handoff::default());
        let mut relay = Relay::new(domain.db().clone(), gated.clone(), handoff.clone());
        hand_over(&handoff, a_events.into_iter().chain(b_events));
        let mut fast_live = inner.subscribe(fast).await.expect("subscribe");
        let watch_fast = async {
            let mut positions = Vec::new();
            let fast_got_all = tokio::time::timeout(Duration::from_secs(5), async {
                while positions.len() < 3 {
                    positions.push(fast_live.next().await.expect("live").position);
                }
            })
            .await
            .is_ok();
            // Only now may the slow session's publishes go on.
            gated.gate.add_permits(3);
            (fast_got_all, positions)
        };
        let (handed, (fast_got_all, positions)) = tokio::join!(relay.publish_handed(), watch_fast);
        assert!(
            fast_got_all,
            "the fast session waited for the slow one: {positions:?}"
        );
        assert_eq!(positions, vec![1, 2, 3]);
        assert!(matches!(handed, Ok(Handed::Done)));
        assert_eq!(in_stream(&inner, slow).await, vec![1, 2, 3]);
        assert_eq!(relay.known.get(&slow), Some(&3));
        assert_eq!(relay.unmarked.take().get(&fast), Some(&(1, 3)));
    }

    /// A stream that is down fails the first publish; the sessions not yet
    /// started do not each try (and, on JetStream, each wait for a timeout).
    #[tokio::test]
    async fn once_the_stream_fails_no_other_session_tries() {
        let domain = domain().await;
        let (session, events) = three_events(&domain).await;
        let down = Arc::new(Gated::new(
            Arc::new(EmbeddedStream::default()),
            session,
            true,
        ));
        let handoff = Arc::new(Handoff::default());
        let mut relay = Relay::new(domain.db().clone(), down.clone(), handoff.clone());
        let sessions = 2 * SESSIONS_AT_ONCE;
        hand_over(
            &handoff,
            (1..=sessions).map(|i| SessionEvent {
                session_id: Uuid::from_u128(u128::try_from(i).expect("fits")),
                ..events[0].clone()
            }),
        );
        assert!(relay.publish_handed().await.is_err());
        let asked = down.publishes.load(Ordering::SeqCst);
        assert!(
            (1..=SESSIONS_AT_ONCE).contains(&asked),
            "{asked} of {sessions} sessions tried a stream that is down"
        );
        assert!(relay.unmarked.take().is_empty() && relay.known.is_empty());
    }
}
