//! Presence: turns the edges' connection signals into `connected`, `lastSeenAt` and
//! `participant:disconnected`.
//!
//! Edges report through the event stream, never to the database. This tracker
//! counts each participant's open connections across edges; the first one coming
//! marks the participant connected, the last one going marks them disconnected and
//! emits `participant:disconnected`. Heartbeat answers only move `lastSeenAt`, and
//! those writes are batched: one transaction per flush interval, however many
//! pongs arrived.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pollcast_protocol::{DomainEvent, PresenceKind, PresenceSignal};
use pollcast_store::participant;
use pollcast_stream::StreamError;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, TransactionTrait};
use tokio::sync::watch;
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::{Domain, DomainResult};

/// How long the tracker waits for more signals once shutdown began.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(100);

/// Consumes presence signals for one domain.
pub struct PresenceTracker {
    domain: Domain,
    flush_every: Duration,
    /// Open connections per participant, and the participant's session.
    open: HashMap<Uuid, (Uuid, HashSet<Uuid>)>,
    /// Newest heartbeat per participant not yet written.
    seen: HashMap<Uuid, DateTime<Utc>>,
}

impl Domain {
    /// Marks every participant disconnected; returns how many were marked connected.
    /// Only for a single-node start, when no connection can be open.
    pub async fn reset_presence(&self) -> DomainResult<u64> {
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
            open: HashMap::new(),
            seen: HashMap::new(),
        }
    }
}

impl PresenceTracker {
    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut feed = match self.domain.stream().presence().await {
            Ok(feed) => feed,
            Err(err) => {
                tracing::error!(error = %err, "no presence feed; presence is not tracked");
                return;
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
                    Err(StreamError::Lagged { skipped }) => {
                        tracing::warn!(skipped, "presence signals lost; counts may be off until reconnects");
                    }
                    Err(_) => break,
                },
                _ = flush.tick() => self.flush_seen().await,
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
        let participant = signal.participant_id;
        match signal.kind {
            PresenceKind::Connected => {
                let (_, connections) = self
                    .open
                    .entry(participant)
                    .or_insert_with(|| (signal.session_id, HashSet::new()));
                let first = connections.is_empty();
                connections.insert(signal.connection_id);
                if first {
                    self.set_connected(participant, at).await?;
                }
            }
            PresenceKind::Seen => {
                let newest = self.seen.entry(participant).or_insert(at);
                *newest = (*newest).max(at);
            }
            PresenceKind::Disconnected => {
                let Some((session, connections)) = self.open.get_mut(&participant) else {
                    return Ok(());
                };
                connections.remove(&signal.connection_id);
                if connections.is_empty() {
                    let session = *session;
                    self.open.remove(&participant);
                    self.seen.remove(&participant);
                    self.disconnect(session, participant, at).await?;
                }
            }
        }
        Ok(())
    }

    async fn set_connected(&self, participant: Uuid, at: DateTime<Utc>) -> DomainResult<()> {
        participant::Entity::update_many()
            .col_expr(participant::Column::Connected, Expr::value(true))
            .col_expr(participant::Column::LastSeenAt, Expr::value(at))
            .filter(participant::Column::Id.eq(participant))
            .exec(self.domain.db())
            .await?;
        Ok(())
    }

    /// Marks the participant disconnected and tells the presenters, in one change.
    async fn disconnect(
        &self,
        session: Uuid,
        participant: Uuid,
        at: DateTime<Utc>,
    ) -> DomainResult<()> {
        let mut tx = SessionTx::begin(&self.domain, session).await?;
        let Some(row) = participant::Entity::find_by_id(participant)
            .one(&tx.txn)
            .await?
        else {
            return Ok(());
        };
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
            for (participant, at) in &batch {
                participant::Entity::update_many()
                    .col_expr(participant::Column::LastSeenAt, Expr::value(*at))
                    .filter(participant::Column::Id.eq(*participant))
                    .filter(participant::Column::LastSeenAt.lt(*at))
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
}
