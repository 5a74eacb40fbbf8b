//! Presence: turns the edges' connection signals into `connected`, `lastSeenAt` and
//! `participant:disconnected`.
//!
//! Edges report through the event stream, never to the database. Each open
//! connection is a row of `connections`, so the count of a participant's open
//! connections is shared by every api node and survives their restarts: the first
//! connection opening marks the participant connected, the last one closing marks
//! them disconnected and emits `participant:disconnected`, in one session
//! transaction (the session lock orders the changes of one session even when two
//! api nodes handle its signals at once).
//!
//! Signals may be handled out of order (several api nodes pull from one queue), so
//! a `Disconnected` for a connection not seen yet leaves a closed row (a
//! tombstone) that a late `Connected` cannot reopen. Signals may be lost (an
//! outage) or never sent (an edge that crashed): a connection not heard of for
//! [`crate::DomainConfig::presence_timeout`] is closed by the sweep. A live one
//! cannot be: its edge reports a heartbeat answer at least every half heartbeat
//! interval, and closes it (4408) when answers stop. Heartbeat answers are written
//! in one transaction per flush interval, however many arrived.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pollcast_protocol::{DomainEvent, PresenceKind, PresenceSignal};
use pollcast_store::{connection, participant};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect,
    TransactionTrait,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::{Domain, DomainResult};

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
                signal = feed.next() => match signal {
                    Ok(signal) => {
                        if let Err(err) = self.apply(signal).await {
                            tracing::warn!(error = %err, "presence update failed");
                        }
                    }
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
        while let Ok(Ok(signal)) = tokio::time::timeout(SHUTDOWN_DRAIN, feed.next()).await {
            if let Err(err) = self.apply(signal).await {
                tracing::warn!(error = %err, "presence update failed at shutdown");
            }
        }
        self.flush_seen().await;
    }

    async fn apply(&mut self, signal: PresenceSignal) -> DomainResult<()> {
        let at = signal.at.datetime();
        match signal.kind {
            PresenceKind::Connected => self.open(signal, at).await,
            PresenceKind::Seen => {
                let seen = self.seen.entry(signal.connection_id).or_insert(Seen {
                    participant: signal.participant_id,
                    at,
                });
                seen.at = seen.at.max(at);
                Ok(())
            }
            PresenceKind::Disconnected => {
                self.seen.remove(&signal.connection_id);
                close(
                    &self.domain,
                    signal.session_id,
                    signal.participant_id,
                    signal.connection_id,
                    at,
                )
                .await
            }
        }
    }

    /// Records an open connection; the participant's first marks them connected.
    async fn open(&self, signal: PresenceSignal, at: DateTime<Utc>) -> DomainResult<()> {
        let tx = SessionTx::begin(&self.domain, signal.session_id).await?;
        // A tombstone (closed before this signal arrived) wins: do nothing.
        let inserted = insert_connection(
            &tx.txn,
            signal.session_id,
            signal.participant_id,
            signal.connection_id,
            true,
            at,
        )
        .await?;
        if inserted == 1 {
            participant::Entity::update_many()
                .col_expr(participant::Column::Connected, Expr::value(true))
                .col_expr(participant::Column::LastSeenAt, Expr::value(at))
                .filter(participant::Column::Id.eq(signal.participant_id))
                .exec(&tx.txn)
                .await?;
        }
        tx.commit(&self.domain).await
    }

    /// Writes the heartbeats gathered since the last flush, in one transaction.
    async fn flush_seen(&mut self) {
        if self.seen.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.seen);
        let result: DomainResult<()> = async {
            let txn = self.domain.db().begin().await?;
            for (connection_id, seen) in &batch {
                connection::Entity::update_many()
                    .col_expr(connection::Column::SeenAt, Expr::value(seen.at))
                    .filter(connection::Column::Id.eq(*connection_id))
                    .filter(connection::Column::Open.eq(true))
                    .filter(connection::Column::SeenAt.lt(seen.at))
                    .exec(&txn)
                    .await?;
                participant::Entity::update_many()
                    .col_expr(participant::Column::LastSeenAt, Expr::value(seen.at))
                    .filter(participant::Column::Id.eq(seen.participant))
                    .filter(participant::Column::LastSeenAt.lt(seen.at))
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
            for row in stale {
                tracing::info!(connection = %row.id, participant = %row.participant_id, "connection silent past the presence timeout; closing it");
                metrics::counter!("pollcast_presence_swept_total").increment(1);
                close(
                    &self.domain,
                    row.session_id,
                    row.participant_id,
                    row.id,
                    row.seen_at,
                )
                .await?;
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

/// Closes one connection; the participant's last one marks them disconnected and
/// tells the presenters, in one change.
async fn close(
    domain: &Domain,
    session: Uuid,
    participant: Uuid,
    connection_id: Uuid,
    at: DateTime<Utc>,
) -> DomainResult<()> {
    let mut tx = SessionTx::begin(domain, session).await?;
    let closed = connection::Entity::update_many()
        .col_expr(connection::Column::Open, Expr::value(false))
        .col_expr(connection::Column::SeenAt, Expr::value(at))
        .filter(connection::Column::Id.eq(connection_id))
        .filter(connection::Column::Open.eq(true))
        .exec(&tx.txn)
        .await?
        .rows_affected;
    if closed == 0 {
        // Closed already (a repeat, or the sweep came first), or not opened yet
        // (its `Connected` is late): leave a tombstone so it never opens.
        insert_connection(&tx.txn, session, participant, connection_id, false, at).await?;
        return tx.commit(domain).await;
    }
    let still_open = connection::Entity::find()
        .filter(connection::Column::ParticipantId.eq(participant))
        .filter(connection::Column::Open.eq(true))
        .count(&tx.txn)
        .await?;
    if still_open == 0
        && let Some(row) = participant::Entity::find_by_id(participant)
            .one(&tx.txn)
            .await?
    {
        participant::Entity::update_many()
            .col_expr(participant::Column::Connected, Expr::value(false))
            .col_expr(
                participant::Column::LastSeenAt,
                Expr::value(at.max(row.last_seen_at)),
            )
            .filter(participant::Column::Id.eq(participant))
            .exec(&tx.txn)
            .await?;
        tx.emit(DomainEvent::ParticipantDisconnected {
            participant_id: participant,
            display_name: row.display_name,
        });
    }
    tx.commit(domain).await
}

/// Inserts a connection row unless one with its id exists; returns how many rows
/// were inserted (0 or 1).
async fn insert_connection(
    txn: &sea_orm::DatabaseTransaction,
    session: Uuid,
    participant: Uuid,
    connection_id: Uuid,
    open: bool,
    at: DateTime<Utc>,
) -> DomainResult<u64> {
    Ok(connection::Entity::insert(connection::ActiveModel {
        id: Set(connection_id),
        session_id: Set(session),
        participant_id: Set(participant),
        open: Set(open),
        seen_at: Set(at),
    })
    .on_conflict(
        OnConflict::column(connection::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(txn)
    .await?)
}
