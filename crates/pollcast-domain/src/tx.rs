//! One change to one session: the session row locked, the change, and the events it
//! caused written to the outbox at consecutive positions, in one transaction.
//!
//! Locking the session row first (an UPDATE that changes nothing) serialises the
//! writers of a session in PostgreSQL and takes SQLite's write lock at once, so
//! positions are handed out in commit order and a reader of the outbox never sees
//! position n+1 committed before n.

use pollcast_protocol::{DomainEvent, SessionStatus, Timestamp};
use pollcast_store::{outbox, session};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use sea_orm::sea_query::{CaseStatement, Expr, ExprTrait, Query, SelectStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    FromQueryResult, Iterable, QueryFilter, QueryOrder, QueryResult, QuerySelect, QueryTrait,
    Statement, TransactionTrait, TryGetableMany, Values,
};
use uuid::Uuid;

use crate::{Domain, DomainError, DomainResult};

pub(crate) struct SessionTx {
    pub txn: DatabaseTransaction,
    /// The session row as of the lock, fresh for this transaction.
    pub session: session::Model,
    /// When this change happens; every event of it carries this time.
    pub now: Timestamp,
    events: Vec<DomainEvent>,
}

impl SessionTx {
    /// Begins a transaction on `session_id`, locking its row.
    pub async fn begin(domain: &Domain, session_id: Uuid) -> DomainResult<Self> {
        let txn = domain.db().begin().await?;
        // One round trip: take the lock and read the row it locked.
        let session = lock_statement()
            .filter(session::Column::Id.eq(session_id))
            .exec_with_returning(&txn)
            .await?
            .pop()
            .ok_or(DomainError::SessionNotFound)?;
        Ok(Self {
            txn,
            session,
            now: Timestamp::now(),
            events: Vec::new(),
        })
    }

    /// The session's status.
    pub fn status(&self) -> DomainResult<SessionStatus> {
        crate::convert::parse(&self.session.status)
    }

    /// Adds one to a counter column of the session row (polls, participants).
    pub async fn count(&self, column: session::Column) -> DomainResult<()> {
        session::Entity::update_many()
            .col_expr(column, Expr::col(column).add(1))
            .filter(session::Column::Id.eq(self.session.id))
            .exec(&self.txn)
            .await?;
        Ok(())
    }

    /// Records an event this change caused; it commits with the change.
    pub fn emit(&mut self, event: DomainEvent) {
        self.events.push(event);
    }

    /// Writes the events to the outbox, commits, and hands them to the relay.
    pub async fn commit(self, domain: &Domain) -> DomainResult<()> {
        let SessionTx {
            txn,
            session,
            now,
            events,
        } = self;
        let first = session.last_position + 1;
        if !events.is_empty() {
            let last = session.last_position + events.len() as i64;
            let mut writes = Writes::new(&txn);
            writes.push(
                &session::Entity::update_many()
                    .col_expr(session::Column::LastPosition, Expr::value(last))
                    .filter(session::Column::Id.eq(session.id)),
            );
            let mut rows = Vec::with_capacity(events.len());
            outbox_rows(&mut rows, session.id, first, now, &events)?;
            writes.push(&outbox::Entity::insert_many(rows));
            writes.run(&txn).await?;
        }
        txn.commit().await?;
        if !events.is_empty() {
            domain.inner.handoff.push(session.id, first, now, events);
        }
        Ok(())
    }
}

/// An `UPDATE` of session rows that changes nothing: it takes their row locks
/// (and SQLite's write lock) and, with `RETURNING`, reads them in the same round
/// trip.
fn lock_statement() -> sea_orm::UpdateMany<session::Entity> {
    session::Entity::update_many().col_expr(
        session::Column::LastPosition,
        Expr::col(session::Column::LastPosition),
    )
}

/// Writes `events` to the outbox at positions `first..`.
pub(crate) async fn insert_outbox(
    txn: &DatabaseTransaction,
    session_id: Uuid,
    first: i64,
    at: Timestamp,
    events: &[DomainEvent],
) -> DomainResult<()> {
    let mut rows = Vec::with_capacity(events.len());
    outbox_rows(&mut rows, session_id, first, at, events)?;
    outbox::Entity::insert_many(rows).exec(txn).await?;
    Ok(())
}

/// The outbox rows of `events` at positions `first..`, added to `rows`.
fn outbox_rows(
    rows: &mut Vec<outbox::ActiveModel>,
    session_id: Uuid,
    first: i64,
    at: Timestamp,
    events: &[DomainEvent],
) -> DomainResult<()> {
    for (position, event) in (first..).zip(events) {
        rows.push(outbox::ActiveModel {
            session_id: Set(session_id),
            position: Set(position),
            event_type: Set(event.event_type().to_owned()),
            payload: Set(serde_json::to_string(event)?),
            occurred_at: Set(at.datetime()),
            published_at: Set(None),
        });
    }
    Ok(())
}

/// Outbox rows per multi-row insert (six bound values each).
const OUTBOX_ROWS_PER_INSERT: usize = 512;

/// One change to several sessions at once, for work that arrives spread over
/// many sessions (votes in many small rooms): one transaction, one lock
/// statement, one position update and one outbox insert for all of them,
/// instead of a transaction each. Every session keeps its own total order: its
/// row is locked as [`SessionTx`] locks it, and its events take consecutive
/// positions after its last.
pub(crate) struct SessionsTx {
    pub txn: DatabaseTransaction,
    /// The sessions locked, as of the lock; a session asked for that does not
    /// exist is absent.
    pub sessions: HashMap<Uuid, session::Model>,
    /// When this change happens; every event of it carries this time.
    pub now: Timestamp,
    events: BTreeMap<Uuid, Vec<DomainEvent>>,
    /// Writes held back until the commit, to go with its own.
    writes: Writes,
}

impl SessionsTx {
    /// Begins a transaction on the sessions, locking their rows with one
    /// statement. Two of these may run at once (the vote and the results tasks,
    /// or two api nodes) and share sessions, so PostgreSQL locks the rows in id
    /// order (`SELECT … ORDER BY id FOR UPDATE`) and they cannot deadlock; an
    /// `UPDATE … WHERE id IN (…)` locks in whatever order its plan visits rows.
    /// SQLite has one writer, whose lock the first write takes, so there the
    /// statement is the same no-op `UPDATE` as [`SessionTx`]'s. A [`SessionTx`]
    /// locks only one row.
    ///
    /// Then it runs `reads` under the lock and returns each one's rows, in the
    /// order of `reads`. On SQLite the lock and the reads go as one command, as
    /// [`Writes`] do: sqlx runs each command on its SQLite thread, and a round
    /// trip there and back cost a vote batch more than its reads did. The rows
    /// of all statements of one command come back as one list, so each read's
    /// rows carry its number in a column of their own ([`READ`]), after the
    /// columns asked for.
    pub async fn begin(
        domain: &Domain,
        ids: impl IntoIterator<Item = Uuid>,
        reads: Vec<SelectStatement>,
    ) -> DomainResult<(Self, Vec<Vec<QueryResult>>)> {
        let ids: BTreeSet<Uuid> = ids.into_iter().collect();
        let txn = domain.db().begin().await?;
        let backend = txn.get_database_backend();
        let mut read: Vec<Vec<QueryResult>> =
            std::iter::repeat_with(Vec::new).take(reads.len()).collect();
        let sessions = if backend == DbBackend::Postgres {
            let rows = session::Entity::find()
                .filter(session::Column::Id.is_in(ids))
                .order_by_asc(session::Column::Id)
                .lock_exclusive()
                .all(&txn)
                .await?;
            for (rows, statement) in read.iter_mut().zip(&reads) {
                *rows = txn.query_all(statement).await?;
            }
            rows
        } else {
            let mut lock = lock_statement()
                .filter(session::Column::Id.is_in(padded(ids.into_iter().collect())))
                .into_query();
            lock.returning(Query::returning().columns(session::Column::iter()));
            let mut statements = vec![backend.build(&lock)];
            for (n, mut statement) in (0_i64..).zip(reads) {
                statements.push(backend.build(statement.expr_as(Expr::val(n), READ)));
            }
            let mut sessions = Vec::new();
            for row in txn.query_all_raw(one_command(statements)).await? {
                // The lock's rows are the ones without a read's number.
                match row.try_get_nullable::<i64>("", READ) {
                    Ok(n) => read
                        .get_mut(usize::try_from(n).unwrap_or(usize::MAX))
                        .ok_or_else(|| DomainError::Internal(format!("no read {n}")))?
                        .push(row),
                    Err(_) => sessions.push(session::Model::from_query_result(&row, "")?),
                }
            }
            sessions
        };
        Ok((
            Self {
                writes: Writes::new(&txn),
                txn,
                sessions: sessions.into_iter().map(|row| (row.id, row)).collect(),
                now: Timestamp::now(),
                events: BTreeMap::new(),
            },
            read,
        ))
    }

    /// Records an event of `session_id` (one of the locked sessions) that this
    /// change caused; it commits with the change.
    pub fn emit(&mut self, session_id: Uuid, event: DomainEvent) {
        self.events.entry(session_id).or_default().push(event);
    }

    /// Holds back a write until the commit, which sends it with the commit's own
    /// (see [`Writes`]). Nothing this transaction reads sees it before then, and
    /// an error it causes is the commit's.
    pub fn write_at_commit(&mut self, query: &impl QueryTrait) {
        self.writes.push(query);
    }

    /// Writes every session's events to the outbox, commits, and hands them to
    /// the relay.
    pub async fn commit(self, domain: &Domain) -> DomainResult<()> {
        let SessionsTx {
            txn,
            sessions,
            now,
            events,
            mut writes,
        } = self;
        if !events.is_empty() {
            let mut rows = Vec::new();
            let mut last_positions = CaseStatement::new();
            for (session_id, events) in &events {
                let session = sessions.get(session_id).ok_or_else(|| {
                    DomainError::Internal("an event for a session not locked".into())
                })?;
                let first = session.last_position + 1;
                last_positions = last_positions.case(
                    session::Column::Id.eq(*session_id),
                    Expr::value(session.last_position + events.len() as i64),
                );
                outbox_rows(&mut rows, *session_id, first, now, events)?;
            }
            writes.push(
                &session::Entity::update_many()
                    .col_expr(
                        session::Column::LastPosition,
                        last_positions
                            .finally(Expr::col(session::Column::LastPosition))
                            .into(),
                    )
                    .filter(session::Column::Id.is_in(events.keys().copied())),
            );
            for chunk in rows.chunks(OUTBOX_ROWS_PER_INSERT) {
                writes.push(&outbox::Entity::insert_many(chunk.to_vec()));
            }
        }
        writes.run(&txn).await?;
        txn.commit().await?;
        for (session_id, events) in events {
            // Every session with events is locked (checked above).
            if let Some(session) = sessions.get(&session_id) {
                domain
                    .inner
                    .handoff
                    .push(session_id, session.last_position + 1, now, events);
            }
        }
        Ok(())
    }
}

/// Write statements sent to the database together. SQLite takes them as one
/// command: sqlx runs a SQLite connection on a thread of its own, and each
/// command is a round trip to it and back (two thread wake-ups, 20–40 µs here),
/// which cost a vote batch more than its SQL did. sqlx binds the values of a
/// multi-statement command in order, statement after statement, and stops at the
/// first error. PostgreSQL's extended protocol takes one statement with values
/// per query, so there they are sent one after another.
pub(crate) struct Writes {
    backend: DbBackend,
    statements: Vec<Statement>,
}

impl Writes {
    /// No writes yet, for statements to run in `txn`.
    pub fn new(txn: &DatabaseTransaction) -> Self {
        Self {
            backend: txn.get_database_backend(),
            statements: Vec::new(),
        }
    }

    /// Adds a statement; they run in the order added.
    pub fn push(&mut self, query: &impl QueryTrait) {
        self.statements.push(query.build(self.backend));
    }

    /// Runs every statement in `txn`.
    pub async fn run(self, txn: &DatabaseTransaction) -> DomainResult<()> {
        if self.backend != DbBackend::Sqlite || self.statements.len() < 2 {
            for statement in self.statements {
                txn.execute_raw(statement).await?;
            }
            return Ok(());
        }
        txn.execute_raw(one_command(self.statements)).await?;
        Ok(())
    }
}

/// `rows` padded to the next power of two with copies of its last row.
///
/// Each distinct row count is a distinct SQL text, which the driver prepares and
/// keeps per connection (sqlx caches 100): presence batches of every size from 1
/// to 512 filled SQLite's memory with large statements that were seldom used
/// twice (4.6 MiB more at 10 000 connections), each prepared anew. Padded, a
/// statement has at most ten shapes, each prepared once; a command of several
/// statements ([`SessionsTx::begin`]) has as many as their shapes combine to.
/// A repeated row changes nothing in the statements it is used for: a repeated
/// `IN` member selects nothing more, a repeated `WHEN` is never reached, and a
/// repeated insert meets its twin's row and does nothing.
pub(crate) fn padded<T: Clone>(mut rows: Vec<T>) -> Vec<T> {
    if let Some(last) = rows.last().cloned() {
        rows.resize(rows.len().next_power_of_two(), last);
    }
    rows
}

/// Each row as a tuple of its first columns (a read of
/// [`SessionsTx::begin`] has its number after them).
pub(crate) fn tuples<T: TryGetableMany>(rows: Vec<QueryResult>) -> DomainResult<Vec<T>> {
    Ok(rows
        .iter()
        .map(QueryResult::try_get_many_by_index)
        .collect::<Result<_, _>>()?)
}

/// The column in which [`SessionsTx::begin`] numbers each read's rows.
const READ: &str = "pollcast_read";

/// SQLite statements as one command: sqlx binds the values statement after
/// statement, in order, and stops at the first error.
fn one_command(statements: Vec<Statement>) -> Statement {
    let mut sql = String::new();
    let mut values = Vec::new();
    for statement in statements {
        sql.push_str(&statement.sql);
        sql.push_str(";\n");
        values.extend(statement.values.map(|v| v.0).unwrap_or_default());
    }
    Statement {
        sql,
        values: Some(Values(values)),
        db_backend: DbBackend::Sqlite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::domain;

    async fn poll_count(domain: &Domain, session_id: Uuid) -> i64 {
        session::Entity::find_by_id(session_id)
            .one(domain.db())
            .await
            .expect("read")
            .expect("session")
            .poll_count
    }

    fn set_poll_count(
        session_id: Uuid,
        times: i64,
        plus: i64,
    ) -> sea_orm::UpdateMany<session::Entity> {
        session::Entity::update_many()
            .col_expr(
                session::Column::PollCount,
                Expr::col(session::Column::PollCount).mul(times).add(plus),
            )
            .filter(session::Column::Id.eq(session_id))
    }

    /// The lock's rows and each read's, told apart in the one command SQLite
    /// gets: a read with no rows between two with rows, a session that does
    /// not exist.
    #[tokio::test]
    async fn each_read_under_the_lock_gets_its_own_rows() {
        let domain = domain().await;
        let mut ids = Vec::new();
        for title in ["A", "B", "C"] {
            let created = domain.create_session(None, title).await.expect("session");
            ids.push(created.session.id);
        }
        let titles = |wanted: &[Uuid]| {
            Query::select()
                .column(session::Column::Title)
                .from(session::Entity)
                .and_where(session::Column::Id.is_in(wanted.iter().copied()))
                .order_by(session::Column::Title, sea_orm::Order::Asc)
                .to_owned()
        };
        let (tx, read) = SessionsTx::begin(
            &domain,
            [ids[0], ids[1], Uuid::now_v7()],
            vec![titles(&ids[1..]), titles(&[]), titles(&ids[..1])],
        )
        .await
        .expect("begin");
        let mut locked: Vec<&str> = tx.sessions.values().map(|s| s.title.as_str()).collect();
        locked.sort_unstable();
        assert_eq!(locked, ["A", "B"]);
        let read: Vec<Vec<String>> = read
            .iter()
            .map(|rows| {
                rows.iter()
                    .map(|row| row.try_get_by_index(0).expect("a title"))
                    .collect()
            })
            .collect();
        assert_eq!(read, [vec!["B", "C"], vec![], vec!["A"]]);
        tx.commit(&domain).await.expect("commit");
    }

    #[tokio::test]
    async fn writes_run_in_order_each_with_its_own_values() {
        let domain = domain().await;
        let session = domain
            .create_session(None, "Writes")
            .await
            .expect("session")
            .session
            .id;
        let txn = domain.db().begin().await.expect("begin");
        let mut writes = Writes::new(&txn);
        writes.push(&set_poll_count(session, 0, 2));
        writes.push(&set_poll_count(session, 10, 3));
        writes.push(&set_poll_count(session, 10, 4));
        writes.run(&txn).await.expect("writes");
        txn.commit().await.expect("commit");
        assert_eq!(poll_count(&domain, session).await, 234);
    }

    #[tokio::test]
    async fn a_failing_write_fails_the_run_and_its_transaction_changes_nothing() {
        let domain = domain().await;
        let created = domain
            .create_session(None, "Writes")
            .await
            .expect("session")
            .session;
        let session = created.id;
        let txn = domain.db().begin().await.expect("begin");
        let mut writes = Writes::new(&txn);
        writes.push(&set_poll_count(session, 0, 7));
        // Position 1 is the session's `session:created`: a duplicate key.
        let mut rows = Vec::new();
        outbox_rows(
            &mut rows,
            session,
            1,
            Timestamp::now(),
            &[DomainEvent::SessionCreated { session: created }],
        )
        .expect("rows");
        writes.push(&outbox::Entity::insert_many(rows));
        writes.push(&set_poll_count(session, 10, 1));
        assert!(writes.run(&txn).await.is_err());
        txn.rollback().await.expect("rollback");
        assert_eq!(poll_count(&domain, session).await, 0);
    }
}
