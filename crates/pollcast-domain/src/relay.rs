//! The outbox relay: publishes committed events to the stream, in each session's
//! position order, and marks them published once the stream has them.
//!
//! It wakes at once after every commit that wrote events, and every
//! [`SWEEP_INTERVAL`] regardless, so events left pending by a crash, by a stream
//! outage or by another node are published too. Publishing is at least once (a
//! crash between publish and mark repeats it); the stream ignores positions it
//! already holds, which makes the log exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pollcast_protocol::{DomainEvent, SessionEvent, Timestamp};
use pollcast_store::outbox;
use pollcast_stream::{EventStream, StreamError};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::{DomainError, DomainResult};

/// Sessions whose published ranges one `UPDATE` marks (three bound values each).
const MARK_PER_STATEMENT: usize = 256;

/// Pending events read per round trip.
const BATCH: u64 = 512;
/// How often the relay looks for pending events without being woken.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between retries while the stream or database is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Publishes the outbox to the event stream.
pub struct Relay {
    db: DatabaseConnection,
    stream: Arc<dyn EventStream>,
    wake: Arc<Notify>,
}

impl Relay {
    pub(crate) fn new(
        db: DatabaseConnection,
        stream: Arc<dyn EventStream>,
        wake: Arc<Notify>,
    ) -> Self {
        Self { db, stream, wake }
    }

    /// Runs until `shutdown` turns true, then publishes what is pending once more
    /// and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let wait = match self.publish_pending().await {
                Ok(_) => {
                    backoff = Duration::from_millis(50);
                    SWEEP_INTERVAL
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?backoff, "outbox relay failed");
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        if let Err(err) = self.publish_pending().await {
            tracing::warn!(error = %err, "events left pending at shutdown");
        }
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
    pub async fn publish_pending(&self) -> DomainResult<usize> {
        let mut total = 0;
        loop {
            let rows = outbox::Entity::find()
                .filter(outbox::Column::PublishedAt.is_null())
                .order_by_asc(outbox::Column::SessionId)
                .order_by_asc(outbox::Column::Position)
                .limit(BATCH)
                .all(&self.db)
                .await?;
            let full = rows.len() as u64 == BATCH;
            let read = rows.len();
            let (published, failure) = self.publish_rows(rows).await;
            let progress = published
                .values()
                .map(|(first, last)| last - first + 1)
                .sum::<i64>();
            self.mark_published(&published).await?;
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

    /// Publishes rows in order; returns, per session, the range of positions the
    /// stream now holds, and the error that stopped it, if any.
    async fn publish_rows(
        &self,
        rows: Vec<outbox::Model>,
    ) -> (HashMap<Uuid, (i64, i64)>, Option<DomainError>) {
        let mut published: HashMap<Uuid, (i64, i64)> = HashMap::new();
        let mut blocked: Vec<Uuid> = Vec::new();
        for row in rows {
            if blocked.contains(&row.session_id) {
                continue;
            }
            let event = match decode(&row) {
                Ok(event) => event,
                Err(err) => {
                    tracing::error!(session = %row.session_id, position = row.position, error = %err, "undecodable outbox row");
                    blocked.push(row.session_id);
                    continue;
                }
            };
            match self.stream.publish(event).await {
                Ok(_) => {
                    let lag = Timestamp::now().unix_millis() - row.occurred_at.timestamp_millis();
                    metrics::histogram!("pollcast_event_publish_seconds")
                        .record(lag.max(0) as f64 / 1000.0);
                    published
                        .entry(row.session_id)
                        .and_modify(|range| range.1 = row.position)
                        .or_insert((row.position, row.position));
                }
                Err(StreamError::OutOfOrder { expected, got, .. }) => {
                    // An earlier position is not in the stream yet (another node has
                    // not published it). Leave this session for the next sweep.
                    tracing::warn!(session = %row.session_id, expected, got, "stream is behind the outbox");
                    blocked.push(row.session_id);
                }
                Err(err) => {
                    return (
                        published,
                        Some(DomainError::Internal(format!("event stream: {err}"))),
                    );
                }
            }
        }
        (published, None)
    }

    /// Marks what the stream now holds, one statement for up to
    /// [`MARK_PER_STATEMENT`] sessions: with many small sessions a pass publishes
    /// a little of each, and a statement per session (each its own commit) made
    /// the relay's bookkeeping cost more than the events.
    async fn mark_published(&self, published: &HashMap<Uuid, (i64, i64)>) -> DomainResult<()> {
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
                .exec(&self.db)
                .await?;
        }
        Ok(())
    }
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
