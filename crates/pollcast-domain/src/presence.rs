//! Presence: turns the edges' connection signals into `connected`, `lastSeenAt` and
//! `participant:disconnected`.
//!
//! Edges report through the event stream, never to the database. Each open
//! connection is a row of `connections`, so the count of a participant's open
//! connections is shared by every api node and survives their restarts: the first
//! connection opening marks the participant connected, the last one closing marks
//! them disconnected and emits `participant:disconnected`, in one transaction
//! under the session's lock (which orders the changes of one session even when
//! two api nodes handle its signals at once).
//!
//! Signals are applied in batches: the tracker takes every signal already
//! waiting (up to [`MAX_SIGNALS`]) and writes them in one transaction with a
//! few statements, deciding each in order exactly as a transaction of its own
//! would. When 10 000 clients reconnect at once, that is some 40 transactions
//! instead of 20 000, each of which would wait for its own disk sync.
//!
//! Signals may be handled out of order (several api nodes pull from one queue), so
//! a `Disconnected` for a connection not seen yet leaves a closed row (a
//! tombstone) that a late `Connected` cannot reopen. Signals may be lost (an
//! outage) or never sent (an edge that crashed): a connection not heard of for
//! [`crate::DomainConfig::presence_timeout`] is closed by the sweep. A live one
//! cannot be: its edge reports a heartbeat answer at least every half heartbeat
//! interval, and closes it (4408) when answers stop. Heartbeat answers are written
//! in one transaction per flush interval, however many arrived.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pollcast_protocol::{DomainEvent, PresenceKind, PresenceSignal};
use pollcast_store::{connection, participant};
use sea_orm::sea_query::{CaseStatement, Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, EntityTrait, FromQueryResult, QueryFilter,
    QueryResult, QuerySelect, QueryTrait, TransactionTrait,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::tx::{SessionsTx, padded, tuples};
use crate::{Domain, DomainError, DomainResult};

/// Most signals applied in one transaction.
const MAX_SIGNALS: usize = 512;
/// How long the tracker waits for more signals once shutdown began.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(100);
/// Stale connections closed per sweep round.
const SWEEP_BATCH: u64 = 256;
/// How long a closed connection's row is kept to absorb late signals.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);

/// Consumes presence signals for one domain.
pub struct PresenceTracker {
    domain: Domain,
    flush_every: Duration,
    /// Newest heartbeat per connection not yet written.
    seen: HashMap<Uuid, Seen>,
}

#[derive(Clone, Copy)]
struct Seen {
    participant: Uuid,
    at: DateTime<Utc>,
}

impl Domain {
    /// Forgets every connection and marks every participant disconnected; returns
    /// how many were marked connected. Only for a single-node start, when no
    /// connection can be open.
    pub async fn reset_presence(&self) -> DomainResult<u64> {
        connection::Entity::delete_many().exec(self.db()).await?;
        let reset = participant::Entity::update_many()
            .col_expr(participant::Column::Connected, Expr::value(false))
            .filter(participant::Column::Connected.eq(true))
            .exec(self.db())
            .await?;
        Ok(reset.rows_affected)
    }

    /// The presence tracker of this domain; run it with [`PresenceTracker::run`].
    pub fn presence_tracker(&self) -> PresenceTracker {
        PresenceTracker {
            domain: self.clone(),
            flush_every: self.inner.config.presence_flush,
            seen: HashMap::new(),
        }
    }
}

impl PresenceTracker {
    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut feed = loop {
            match self.domain.stream().presence().await {
                Ok(feed) => break feed,
                Err(err) => {
                    tracing::warn!(error = %err, "no presence feed yet; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        let mut flush = tokio::time::interval(self.flush_every);
        loop {
            tokio::select! {
                signals = feed.next_batch(MAX_SIGNALS) => match signals {
                    Ok(signals) => self.apply(signals).await,
                    Err(pollcast_stream::StreamError::Lagged { skipped }) => {
                        tracing::warn!(skipped, "presence signals lost; the sweep and heartbeats will correct");
                    }
                    Err(_) => break,
                },
                _ = flush.tick() => {
                    self.flush_seen().await;
                    if let Err(err) = self.sweep().await {
                        tracing::warn!(error = %err, "presence sweep failed");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        // Edges close their connections before the tracker stops: apply the
        // disconnects they just reported, so no one stays marked connected.
        while let Ok(Ok(signals)) =
            tokio::time::timeout(SHUTDOWN_DRAIN, feed.next_batch(MAX_SIGNALS)).await
        {
            self.apply(signals).await;
        }
        self.flush_seen().await;
    }

    /// Applies signals in the order they came: heartbeats are gathered for the
    /// next flush, opens and closes are written in one transaction.
    async fn apply(&mut self, signals: Vec<PresenceSignal>) {
        let mut changes = Vec::with_capacity(signals.len());
        for signal in signals {
            let at = signal.at.datetime();
            match signal.kind {
                PresenceKind::Seen => {
                    let seen = self.seen.entry(signal.connection_id).or_insert(Seen {
                        participant: signal.participant_id,
                        at,
                    });
                    seen.at = seen.at.max(at);
                    continue;
                }
                PresenceKind::Disconnected => {
                    self.seen.remove(&signal.connection_id);
                }
                PresenceKind::Connected => {}
            }
            changes.push(Change {
                session: signal.session_id,
                participant: signal.participant_id,
                connection: signal.connection_id,
                open: signal.kind == PresenceKind::Connected,
                at,
            });
        }
        if changes.is_empty() {
            return;
        }
        match write_changes(&self.domain, &changes).await {
            Ok(()) => {}
            Err(err) if changes.len() > 1 => {
                // Nothing of the batch committed. One change that cannot be
                // written must not lose its neighbours: write each alone.
                tracing::warn!(error = %err, changes = changes.len(), "presence batch failed; writing its changes one by one");
                for change in &changes {
                    if let Err(err) =
                        write_changes(&self.domain, std::slice::from_ref(change)).await
                    {
                        tracing::warn!(error = %err, connection = %change.connection, "presence update failed");
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "presence update failed"),
        }
    }

    /// Writes the heartbeats gathered since the last flush, in one transaction
    /// with two statements per [`ROWS_PER_CASE`] connections: at 10 000
    /// connections a flush holds hundreds of heartbeats.
    async fn flush_seen(&mut self) {
        if self.seen.is_empty() {
            return;
        }
        let batch: Vec<(Uuid, Seen)> = std::mem::take(&mut self.seen).into_iter().collect();
        // A participant's newest heartbeat, whichever of their connections sent it.
        let mut people: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        for (_, seen) in &batch {
            let at = people.entry(seen.participant).or_insert(seen.at);
            *at = (*at).max(seen.at);
        }
        let people: Vec<(Uuid, DateTime<Utc>)> = people.into_iter().collect();
        let result: DomainResult<()> = async {
            let txn = self.domain.db().begin().await?;
            // Times only move forward: a heartbeat older than what a row holds
            // leaves it as it is, and a closed connection is not touched.
            for chunk in batch.chunks(ROWS_PER_CASE) {
                let chunk = padded(chunk.to_vec());
                let mut seen_at = CaseStatement::new();
                for (id, seen) in &chunk {
                    seen_at = seen_at.case(
                        Condition::all()
                            .add(connection::Column::Id.eq(*id))
                            .add(connection::Column::SeenAt.lt(seen.at)),
                        Expr::value(seen.at),
                    );
                }
                connection::Entity::update_many()
                    .col_expr(
                        connection::Column::SeenAt,
                        seen_at
                            .finally(Expr::col(connection::Column::SeenAt))
                            .into(),
                    )
                    .filter(connection::Column::Id.is_in(chunk.iter().map(|(id, _)| *id)))
                    .filter(connection::Column::Open.eq(true))
                    .exec(&txn)
                    .await?;
            }
            for chunk in people.chunks(ROWS_PER_CASE) {
                let chunk = padded(chunk.to_vec());
                let mut last_seen_at = CaseStatement::new();
                for (id, at) in &chunk {
                    last_seen_at = last_seen_at.case(
                        Condition::all()
                            .add(participant::Column::Id.eq(*id))
                            .add(participant::Column::LastSeenAt.lt(*at)),
                        Expr::value(*at),
                    );
                }
                participant::Entity::update_many()
                    .col_expr(
                        participant::Column::LastSeenAt,
                        last_seen_at
                            .finally(Expr::col(participant::Column::LastSeenAt))
                            .into(),
                    )
                    .filter(participant::Column::Id.is_in(chunk.iter().map(|(id, _)| *id)))
                    .exec(&txn)
                    .await?;
            }
            txn.commit().await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => metrics::counter!("pollcast_presence_seen_written_total")
                .increment(batch.len() as u64),
            Err(err) => tracing::warn!(error = %err, "lastSeenAt batch failed"),
        }
    }

    /// Closes open connections nobody has heard of for the presence timeout (their
    /// edge is gone), as of their last sign of life, and forgets old tombstones.
    async fn sweep(&self) -> DomainResult<()> {
        let now = Utc::now();
        let timeout = self.domain.inner.config.presence_timeout;
        let cutoff = now - chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        loop {
            let stale = connection::Entity::find()
                .filter(connection::Column::Open.eq(true))
                .filter(connection::Column::SeenAt.lt(cutoff))
                .limit(SWEEP_BATCH)
                .all(self.domain.db())
                .await?;
            let full = stale.len() as u64 == SWEEP_BATCH;
            let closes: Vec<Change> = stale
                .into_iter()
                .map(|row| {
                    tracing::info!(connection = %row.id, participant = %row.participant_id, "connection silent past the presence timeout; closing it");
                    // Closed as of its last sign of life.
                    Change {
                        session: row.session_id,
                        participant: row.participant_id,
                        connection: row.id,
                        open: false,
                        at: row.seen_at,
                    }
                })
                .collect();
            if !closes.is_empty() {
                write_changes(&self.domain, &closes).await?;
                metrics::counter!("pollcast_presence_swept_total").increment(closes.len() as u64);
            }
            if !full {
                break;
            }
        }
        let forget = now
            - chrono::Duration::from_std(TOMBSTONE_TTL.max(timeout))
                .unwrap_or(chrono::Duration::MAX);
        connection::Entity::delete_many()
            .filter(connection::Column::Open.eq(false))
            .filter(connection::Column::SeenAt.lt(forget))
            .exec(self.domain.db())
            .await?;
        Ok(())
    }
}

/// A connection opening or closing, as an edge's signal or the sweep reports it.
#[derive(Clone, Copy)]
struct Change {
    session: Uuid,
    participant: Uuid,
    connection: Uuid,
    open: bool,
    at: DateTime<Utc>,
}

/// A connection as the changes so far leave it.
struct Conn {
    session: Uuid,
    participant: Uuid,
    open: bool,
    seen_at: DateTime<Utc>,
    /// It had no row: one is inserted, in its final state.
    new: bool,
}

/// A participant as the changes so far leave them.
struct Person {
    display_name: String,
    connected: bool,
    last_seen_at: DateTime<Utc>,
    /// Their open connections.
    open: i64,
    changed: bool,
}

/// Rows per multi-row insert: far below SQLite's 32 766 bound variables.
const ROWS_PER_STATEMENT: usize = 512;
/// Rows per `UPDATE … CASE`: each row updated walks the `WHEN`s until its own,
/// so a statement costs the square of its rows. In SQLite a row cost 21 µs at
/// 512 rows per statement and 8 µs at 128.
const ROWS_PER_CASE: usize = 128;

/// Writes opens and closes, in order, in one transaction under their sessions'
/// locks, with a constant number of statements however many there are: what
/// the rows say is read first, each change is decided in memory exactly as a
/// transaction of its own would decide it, then the rows are written.
///
/// - An open inserts its connection's row; the participant's first marks them
///   connected. A row there already (open, or a tombstone) wins: nothing happens.
/// - A close closes an open row; the participant's last marks them disconnected
///   and emits `participant:disconnected`. A close of a connection with no row
///   (its open is late) leaves a tombstone, so it never opens.
async fn write_changes(domain: &Domain, changes: &[Change]) -> DomainResult<()> {
    let participants: HashSet<Uuid> = changes.iter().map(|c| c.participant).collect();
    let participants = padded(participants.into_iter().collect());
    // Read with the lock, in one round trip on SQLite (see `SessionsTx`).
    let reads = vec![
        connection::Entity::find()
            .filter(
                connection::Column::Id
                    .is_in(padded(changes.iter().map(|c| c.connection).collect())),
            )
            .into_query(),
        connection::Entity::find()
            .select_only()
            .column(connection::Column::ParticipantId)
            .column_as(connection::Column::Id.count(), "open")
            .filter(connection::Column::ParticipantId.is_in(participants.iter().copied()))
            .filter(connection::Column::Open.eq(true))
            .group_by(connection::Column::ParticipantId)
            .into_query(),
        participant::Entity::find()
            .select_only()
            .columns([
                participant::Column::Id,
                participant::Column::DisplayName,
                participant::Column::Connected,
                participant::Column::LastSeenAt,
            ])
            .filter(participant::Column::Id.is_in(participants))
            .into_query(),
    ];
    let (mut tx, read) =
        SessionsTx::begin(domain, changes.iter().map(|c| c.session), reads).await?;
    let [conns, open, people] = <[Vec<QueryResult>; 3]>::try_from(read)
        .map_err(|_| DomainError::Internal("a read missing".into()))?;
    let mut conns: HashMap<Uuid, Conn> = conns
        .iter()
        .map(|row| {
            let row = connection::Model::from_query_result(row, "")?;
            let conn = Conn {
                session: row.session_id,
                participant: row.participant_id,
                open: row.open,
                seen_at: row.seen_at,
                new: false,
            };
            Ok((row.id, conn))
        })
        .collect::<DomainResult<_>>()?;
    let open: HashMap<Uuid, i64> = tuples(open)?.into_iter().collect();
    let mut people: HashMap<Uuid, Person> = tuples::<(Uuid, String, bool, DateTime<Utc>)>(people)?
        .into_iter()
        .map(|(id, display_name, connected, last_seen_at)| {
            let person = Person {
                display_name,
                connected,
                last_seen_at,
                open: open.get(&id).copied().unwrap_or(0),
                changed: false,
            };
            (id, person)
        })
        .collect();
    // Rows already closed by this batch (not inserted by it): updated below.
    let mut closed = HashSet::new();
    for change in changes {
        if !tx.sessions.contains_key(&change.session) {
            // The session is gone, and its connections with it.
            continue;
        }
        let conn = match conns.entry(change.connection) {
            Entry::Vacant(slot) => {
                slot.insert(Conn {
                    session: change.session,
                    participant: change.participant,
                    open: change.open,
                    seen_at: change.at,
                    new: true,
                });
                if change.open
                    && let Some(person) = people.get_mut(&change.participant)
                {
                    person.open += 1;
                    person.connected = true;
                    person.last_seen_at = person.last_seen_at.max(change.at);
                    person.changed = true;
                }
                continue;
            }
            // Open already, or a tombstone: an open changes nothing, nor does
            // a close of a closed connection.
            Entry::Occupied(slot) if change.open || !slot.get().open => continue,
            Entry::Occupied(slot) => slot.into_mut(),
        };
        conn.open = false;
        conn.seen_at = change.at;
        if !conn.new {
            closed.insert(change.connection);
        }
        let Some(person) = people.get_mut(&conn.participant) else {
            continue;
        };
        person.open -= 1;
        if person.open == 0 {
            person.connected = false;
            person.last_seen_at = person.last_seen_at.max(change.at);
            person.changed = true;
            tx.emit(
                conn.session,
                DomainEvent::ParticipantDisconnected {
                    participant_id: conn.participant,
                    display_name: person.display_name.clone(),
                },
            );
        }
    }
    let inserts: Vec<connection::ActiveModel> = conns
        .iter()
        .filter(|(_, conn)| conn.new)
        .map(|(id, conn)| connection::ActiveModel {
            id: Set(*id),
            session_id: Set(conn.session),
            participant_id: Set(conn.participant),
            open: Set(conn.open),
            seen_at: Set(conn.seen_at),
        })
        .collect();
    for chunk in inserts.chunks(ROWS_PER_STATEMENT) {
        connection::Entity::insert_many(padded(chunk.to_vec()))
            .on_conflict(
                OnConflict::column(connection::Column::Id)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&tx.txn)
            .await?;
    }
    let closed: Vec<Uuid> = closed.into_iter().collect();
    for chunk in closed.chunks(ROWS_PER_CASE) {
        let chunk = padded(chunk.to_vec());
        let mut seen_at = CaseStatement::new();
        for id in &chunk {
            if let Some(conn) = conns.get(id) {
                seen_at = seen_at.case(connection::Column::Id.eq(*id), Expr::value(conn.seen_at));
            }
        }
        connection::Entity::update_many()
            .col_expr(connection::Column::Open, Expr::value(false))
            .col_expr(
                connection::Column::SeenAt,
                seen_at
                    .finally(Expr::col(connection::Column::SeenAt))
                    .into(),
            )
            .filter(connection::Column::Id.is_in(chunk.iter().copied()))
            .exec(&tx.txn)
            .await?;
    }
    let changed: Vec<(&Uuid, &Person)> = people.iter().filter(|(_, p)| p.changed).collect();
    for chunk in changed.chunks(ROWS_PER_CASE) {
        let chunk = padded(chunk.to_vec());
        let mut connected = CaseStatement::new();
        let mut last_seen_at = CaseStatement::new();
        for (id, person) in &chunk {
            connected = connected.case(
                participant::Column::Id.eq(**id),
                Expr::value(person.connected),
            );
            last_seen_at = last_seen_at.case(
                participant::Column::Id.eq(**id),
                Expr::value(person.last_seen_at),
            );
        }
        participant::Entity::update_many()
            .col_expr(
                participant::Column::Connected,
                connected
                    .finally(Expr::col(participant::Column::Connected))
                    .into(),
            )
            .col_expr(
                participant::Column::LastSeenAt,
                last_seen_at
                    .finally(Expr::col(participant::Column::LastSeenAt))
                    .into(),
            )
            .filter(participant::Column::Id.is_in(chunk.iter().map(|(id, _)| **id)))
            .exec(&tx.txn)
            .await?;
    }
    tx.commit(domain).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{domain, outbox_of, voting_session};

    fn change(session: Uuid, participant: Uuid, connection: Uuid, open: bool) -> Change {
        Change {
            session,
            participant,
            connection,
            open,
            at: Utc::now(),
        }
    }

    /// Each connection's `open`, by id (absent: no row).
    async fn rows(domain: &Domain) -> HashMap<Uuid, bool> {
        connection::Entity::find()
            .all(domain.db())
            .await
            .expect("connections")
            .into_iter()
            .map(|row| (row.id, row.open))
            .collect()
    }

    async fn connected(domain: &Domain, participant: Uuid) -> bool {
        participant::Entity::find_by_id(participant)
            .one(domain.db())
            .await
            .expect("participant")
            .expect("exists")
            .connected
    }

    /// One batch holding what a reconnect wave brings (old connections closing,
    /// new ones opening, late and repeated signals) ends where applying the
    /// signals one transaction each, in the same order, would.
    #[tokio::test]
    async fn a_batch_decides_each_change_in_order_as_its_own_transaction_would() {
        let domain = domain().await;
        let (_, session, _, people) = voting_session(&domain, 5).await;
        let [ada, bob, cy, dee, eve] = people[..] else {
            panic!("five participants");
        };
        let [a1, a2, a3, b1, b2, c1, d1, e1, e2] = std::array::from_fn(|_| Uuid::now_v7());
        // Before: Ada on a1, Bob on b1 and b2, Dee on d1, Eve on e1.
        let before = [(ada, a1), (bob, b1), (bob, b2), (dee, d1), (eve, e1)]
            .map(|(p, c)| change(session, p, c, true));
        write_changes(&domain, &before).await.expect("opens");
        let events_before = outbox_of(&domain, session).await.len();
        let dee_left =
            DateTime::from_timestamp(Utc::now().timestamp() + 3600, 0).expect("a valid time");

        let batch = [
            // Ada reconnects: her only connection closes, a new one opens.
            change(session, ada, a1, false),
            change(session, ada, a2, true),
            // A connection opened and closed within the batch.
            change(session, ada, a3, true),
            change(session, ada, a3, false),
            // Bob closes one of two, and the close is repeated: still connected.
            change(session, bob, b1, false),
            change(session, bob, b1, false),
            // Eve opens a new connection before her old one closes: never gone.
            change(session, eve, e2, true),
            change(session, eve, e1, false),
            // Cy's close arrives before its open: a tombstone, never opened.
            change(session, cy, c1, false),
            change(session, cy, c1, true),
            // Dee leaves (her last sign of life, later than any other); her
            // close is repeated.
            Change {
                at: dee_left,
                ..change(session, dee, d1, false)
            },
            change(session, dee, d1, false),
        ];
        write_changes(&domain, &batch).await.expect("batch");

        let rows = rows(&domain).await;
        let open: HashMap<Uuid, bool> = [
            (a1, false),
            (a2, true),
            (a3, false),
            (b1, false),
            (b2, true),
            (c1, false),
            (d1, false),
            (e1, false),
            (e2, true),
        ]
        .into();
        assert_eq!(rows, open);
        assert!(connected(&domain, ada).await);
        assert!(connected(&domain, bob).await);
        assert!(!connected(&domain, cy).await);
        assert!(!connected(&domain, dee).await);
        let dee_row = participant::Entity::find_by_id(dee).one(domain.db()).await;
        assert_eq!(dee_row.expect("read").expect("dee").last_seen_at, dee_left);
        assert!(connected(&domain, eve).await);
        // Ada's last connection was gone for a moment, Dee's for good: one
        // `participant:disconnected` each, in the order of their closes.
        let events: Vec<String> = outbox_of(&domain, session).await[events_before..]
            .iter()
            .map(|(_, event_type)| event_type.clone())
            .collect();
        assert_eq!(
            events,
            ["participant:disconnected", "participant:disconnected"]
        );
        let payloads: Vec<Uuid> = {
            use pollcast_store::outbox;
            use sea_orm::QueryOrder;
            outbox::Entity::find()
                .filter(outbox::Column::SessionId.eq(session))
                .filter(outbox::Column::EventType.eq("participant:disconnected"))
                .order_by_asc(outbox::Column::Position)
                .all(domain.db())
                .await
                .expect("outbox")
                .into_iter()
                .map(|row| {
                    let event: DomainEvent = serde_json::from_str(&row.payload).expect("event");
                    match event {
                        DomainEvent::ParticipantDisconnected { participant_id, .. } => {
                            participant_id
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                })
                .collect()
        };
        assert_eq!(payloads, [ada, dee]);
    }

    /// Heartbeats move `seen_at` and `lastSeenAt` forward only, take a
    /// participant's newest across their connections, and leave closed
    /// connections alone.
    #[tokio::test]
    async fn heartbeats_are_written_forward_only_in_one_flush() {
        let domain = domain().await;
        let (_, session, _, people) = voting_session(&domain, 2).await;
        let [ada, bob] = people[..] else {
            panic!("two participants");
        };
        let [a1, a2, b1] = std::array::from_fn(|_| Uuid::now_v7());
        let opened = DateTime::from_timestamp(Utc::now().timestamp() + 100, 0).expect("time");
        let at = |seconds: i64| opened + chrono::Duration::seconds(seconds);
        let opens = [(ada, a1), (ada, a2), (bob, b1)].map(|(p, c)| Change {
            at: opened,
            ..change(session, p, c, true)
        });
        write_changes(&domain, &opens).await.expect("opens");
        write_changes(
            &domain,
            &[Change {
                at: at(1),
                ..change(session, ada, a2, false)
            }],
        )
        .await
        .expect("close a2");
        let mut tracker = domain.presence_tracker();
        let seen = |connection, participant, at| PresenceSignal {
            session_id: session,
            participant_id: participant,
            connection_id: connection,
            kind: PresenceKind::Seen,
            at: pollcast_protocol::Timestamp::from(at),
        };
        tracker
            .apply(vec![
                seen(a1, ada, at(5)),
                // Closed: not moved, though it counts for Ada.
                seen(a2, ada, at(9)),
                // Older than Bob's open: changes nothing.
                seen(b1, bob, at(-50)),
            ])
            .await;
        tracker.flush_seen().await;
        let rows: HashMap<Uuid, DateTime<Utc>> = connection::Entity::find()
            .all(domain.db())
            .await
            .expect("connections")
            .into_iter()
            .map(|row| (row.id, row.seen_at))
            .collect();
        assert_eq!(rows, [(a1, at(5)), (a2, at(1)), (b1, opened)].into());
        let last_seen = |participant| {
            let domain = domain.clone();
            async move {
                participant::Entity::find_by_id(participant)
                    .one(domain.db())
                    .await
                    .expect("read")
                    .expect("exists")
                    .last_seen_at
            }
        };
        assert_eq!(last_seen(ada).await, at(9));
        assert_eq!(last_seen(bob).await, opened);
    }

    /// Padding keeps the rows and their order, adds only copies of the last,
    /// and leaves one shape per power of two.
    #[test]
    fn padding_repeats_the_last_row_up_to_a_power_of_two() {
        assert!(padded(Vec::<u8>::new()).is_empty());
        assert_eq!(padded(vec![1]), [1]);
        assert_eq!(padded(vec![1, 2, 3]), [1, 2, 3, 3]);
        assert_eq!(padded(vec![1, 2, 3, 4]), [1, 2, 3, 4]);
        let shapes: HashSet<usize> = (1..=ROWS_PER_STATEMENT)
            .map(|n| padded(vec![0; n]).len())
            .collect();
        assert_eq!(shapes.len(), 10, "1, 2, 4 … 512: {shapes:?}");
    }

    /// A batch larger than one statement's rows is written whole: every chunk
    /// of the inserts, the closes and the participants' updates.
    #[tokio::test]
    async fn a_batch_wider_than_a_statement_is_written_whole() {
        let domain = domain().await;
        let audience = ROWS_PER_CASE * 2 + 3;
        let (_, session, _, people) = voting_session(&domain, audience).await;
        let connections: Vec<Uuid> = people.iter().map(|_| Uuid::now_v7()).collect();
        let opens: Vec<Change> = people
            .iter()
            .zip(&connections)
            .map(|(&p, &c)| change(session, p, c, true))
            .collect();
        write_changes(&domain, &opens).await.expect("opens");
        let events_before = outbox_of(&domain, session).await.len();
        let later = DateTime::from_timestamp(Utc::now().timestamp() + 3600, 0).expect("time");
        let closes: Vec<Change> = opens
            .iter()
            .map(|open| Change {
                open: false,
                at: later,
                ..*open
            })
            .collect();
        write_changes(&domain, &closes).await.expect("closes");
        let rows = connection::Entity::find()
            .all(domain.db())
            .await
            .expect("connections");
        assert_eq!(rows.len(), audience);
        assert!(rows.iter().all(|row| !row.open && row.seen_at == later));
        let marked = participant::Entity::find()
            .filter(participant::Column::Id.is_in(people.iter().copied()))
            .all(domain.db())
            .await
            .expect("participants");
        assert_eq!(marked.len(), audience);
        assert!(
            marked
                .iter()
                .all(|p| !p.connected && p.last_seen_at == later)
        );
        assert_eq!(
            outbox_of(&domain, session).await.len() - events_before,
            audience,
            "one participant:disconnected each"
        );
    }

    /// Signals of several sessions, one of them gone, go in one batch: the gone
    /// session's are dropped and the others' written.
    #[tokio::test]
    async fn a_batch_spans_sessions_and_skips_a_gone_one() {
        let domain = domain().await;
        let (_, first, _, a) = voting_session(&domain, 1).await;
        let (_, second, _, b) = voting_session(&domain, 1).await;
        let (gone, ghost, lost) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let (ca, cb) = (Uuid::now_v7(), Uuid::now_v7());
        let batch = [
            change(first, a[0], ca, true),
            change(gone, ghost, lost, true),
            change(second, b[0], cb, true),
        ];
        write_changes(&domain, &batch).await.expect("batch");
        assert_eq!(rows(&domain).await, [(ca, true), (cb, true)].into());
        assert!(connected(&domain, a[0]).await);
        assert!(connected(&domain, b[0]).await);
    }
}
