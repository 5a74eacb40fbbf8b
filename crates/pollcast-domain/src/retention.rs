//! Retention: what the database keeps only for a while. Idempotency answers are
//! needed while a client may still retry; published outbox rows while the embedded
//! engine may restore history from them and replays may reach them. Both go once
//! older than [`crate::DomainConfig::retention`] (never shorter than the history
//! window), a small batch at a time so that no delete holds writers up for long.
//! Pending outbox rows are never touched, however old.

use std::time::Duration;

use pollcast_store::{idempotency_key, outbox};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::watch;

use crate::{Domain, DomainResult};

/// Rows deleted per statement.
const BATCH: u64 = 500;
/// Pause between two batches, so writers get the database in between.
const BREATHER: Duration = Duration::from_millis(20);

/// What one clean-up round removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Idempotency answers.
    pub idempotency_keys: u64,
    /// Published outbox rows.
    pub outbox_rows: u64,
}

impl Domain {
    /// Cleans up every `cleanup_every` until `shutdown` turns true.
    pub async fn run_cleanup(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.clean_up().await {
                Ok(cleaned) if cleaned != Cleaned::default() => {
                    tracing::info!(?cleaned, "old idempotency answers and events removed");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "clean-up failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.inner.config.cleanup_every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One clean-up round: removes everything older than the retention, in batches.
    pub async fn clean_up(&self) -> DomainResult<Cleaned> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.inner.config.retention)
                .unwrap_or(chrono::Duration::MAX);
        let mut cleaned = Cleaned::default();
        loop {
            // The newest timestamp among the oldest BATCH rows bounds this batch.
            let bound: Option<chrono::DateTime<chrono::Utc>> = idempotency_key::Entity::find()
                .select_only()
                .column(idempotency_key::Column::CreatedAt)
                .filter(idempotency_key::Column::CreatedAt.lt(cutoff))
                .order_by_asc(idempotency_key::Column::CreatedAt)
                .offset(BATCH - 1)
                .limit(1)
                .into_tuple()
                .one(self.db())
                .await?;
            let deleted = idempotency_key::Entity::delete_many()
                .filter(idempotency_key::Column::CreatedAt.lt(cutoff))
                .filter(idempotency_key::Column::CreatedAt.lte(bound.unwrap_or(cutoff)))
                .exec(self.db())
                .await?
                .rows_affected;
            cleaned.idempotency_keys += deleted;
            metrics::counter!("pollcast_cleanup_rows_total", "table" => "idempotency_keys")
                .increment(deleted);
            if bound.is_none() {
                break;
            }
            tokio::time::sleep(BREATHER).await;
        }
        loop {
            let bound: Option<chrono::DateTime<chrono::Utc>> = outbox::Entity::find()
                .select_only()
                .column(outbox::Column::OccurredAt)
                .filter(outbox::Column::PublishedAt.is_not_null())
                .filter(outbox::Column::OccurredAt.lt(cutoff))
                .order_by_asc(outbox::Column::OccurredAt)
                .offset(BATCH - 1)
                .limit(1)
                .into_tuple()
                .one(self.db())
                .await?;
            let deleted = outbox::Entity::delete_many()
                .filter(outbox::Column::PublishedAt.is_not_null())
                .filter(outbox::Column::OccurredAt.lt(cutoff))
                .filter(outbox::Column::OccurredAt.lte(bound.unwrap_or(cutoff)))
                .exec(self.db())
                .await?
                .rows_affected;
            cleaned.outbox_rows += deleted;
            metrics::counter!("pollcast_cleanup_rows_total", "table" => "outbox")
                .increment(deleted);
            if bound.is_none() {
                break;
            }
            tokio::time::sleep(BREATHER).await;
        }
        Ok(cleaned)
    }
}
