//! Results: exact tallies kept by the vote batch, and the coalescing of
//! `results:updated` so a storm of votes costs one event per interval, not one per
//! vote.
//!
//! A coalescing timer lives in the process that took the vote: a crash (or a
//! SIGKILL) inside the interval loses it, and screens would show a stale tally until
//! the next vote. So every api node audits the active polls, at start-up and every
//! [`AUDIT_EVERY`]: a poll whose last published tally is not its current one, and
//! that has had no vote for [`AUDIT_QUIET`] (no healthy timer anywhere is about to
//! cover it), gets a fresh `results:updated`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pollcast_protocol::{DomainEvent, OptionResult, Poll, PollStatus, Results};
use pollcast_store::{option_tally, outbox, poll, vote};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{Expr, ExprTrait},
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::{Claims, Domain, DomainResult, convert};

/// The poll's tally as the connection sees it: the total kept on its row and the
/// per-option counts kept beside it, both changed only in the transaction that
/// writes the votes, so inside a session transaction this is exactly the
/// committed votes. `row` must be the poll's row as read through `conn`.
pub(crate) async fn tally<C: ConnectionTrait>(
    conn: &C,
    row: &poll::Model,
    poll: &Poll,
) -> DomainResult<Results> {
    let counts: HashMap<Uuid, i64> = option_tally::Entity::find()
        .select_only()
        .columns([option_tally::Column::OptionId, option_tally::Column::Votes])
        .filter(option_tally::Column::PollId.eq(poll.id))
        .into_tuple::<(Uuid, i64)>()
        .all(conn)
        .await?
        .into_iter()
        .collect();
    let options = poll
        .options
        .iter()
        .map(|option| OptionResult {
            option_id: option.id,
            votes: counts
                .get(&option.id)
                .map_or(0, |n| u64::try_from(*n).unwrap_or(0)),
        })
        .collect();
    Ok(Results {
        poll_id: poll.id,
        total_votes: u64::try_from(row.total_votes).unwrap_or(0),
        options,
        is_final: poll.status == PollStatus::Closed,
    })
}

/// How often every api node audits the active polls' published tallies.
pub const AUDIT_EVERY: Duration = Duration::from_secs(5);
/// How long a poll must have had no vote before the audit acts on it.
pub const AUDIT_QUIET: Duration = Duration::from_secs(1);
/// `results:updated` rows of a session searched, newest first, for a poll's last.
const AUDIT_SCAN: u64 = 256;

/// Sessions up to this many participants get `results:updated` at the configured
/// interval; larger ones proportionally less often, up to [`STRETCHED_INTERVAL`].
pub const AUDIENCE_AT_BASE_INTERVAL: u64 = 2000;
/// Longest coalescing interval: within the contract's 100 ms from a vote to the
/// results that cover it, with room for commit and delivery.
pub const STRETCHED_INTERVAL: Duration = Duration::from_millis(90);

/// How long a poll's votes coalesce. Every `results:updated` goes to every member
/// of the room: at 10 000 participants, 20 a second would be 200 000 frames a
/// second, a 2-core node's whole capacity. Stretching the interval with the
/// audience keeps the fan-out's cost flat past 2 000 participants, never beyond
/// the contract's bound. An interval configured above the stretch limit is kept.
pub(crate) fn coalescing_interval(base: Duration, audience: u64) -> Duration {
    if audience <= AUDIENCE_AT_BASE_INTERVAL {
        return base;
    }
    let factor = audience as f64 / AUDIENCE_AT_BASE_INTERVAL as f64;
    base.mul_f64(factor).min(STRETCHED_INTERVAL.max(base))
}

/// Polls that have a `results:updated` scheduled. At most one is pending per poll:
/// votes arriving meanwhile are covered by it.
#[derive(Default)]
pub(crate) struct Coalescer {
    pending: Mutex<HashSet<Uuid>>,
}

impl Coalescer {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Domain {
    /// The poll's current tally, for any token of its session.
    pub async fn results(&self, claims: &Claims, poll_id: Uuid) -> DomainResult<Results> {
        let row = self.poll_row(claims, poll_id).await?;
        let poll = convert::poll(&row)?;
        tally(self.db(), &row, &poll).await
    }

    /// Schedules a `results:updated` for the poll unless one is already pending;
    /// `audience` is the session's participant count.
    pub(crate) fn vote_committed(&self, session_id: Uuid, poll_id: Uuid, audience: u64) {
        if !self.inner.results.pending().insert(poll_id) {
            return;
        }
        let domain = self.clone();
        let armed = Instant::now();
        tokio::spawn(async move {
            let interval = coalescing_interval(domain.inner.config.results_interval, audience);
            tokio::time::sleep(interval).await;
            // Cleared before counting: a vote committed from here on schedules the
            // next update, so no vote is left uncovered.
            domain.inner.results.pending().remove(&poll_id);
            match domain.publish_results(session_id, poll_id).await {
                Ok(()) => metrics::histogram!("pollcast_results_lag_seconds")
                    .record(armed.elapsed().as_secs_f64()),
                Err(err) => tracing::warn!(%poll_id, error = %err, "results update failed"),
            }
        });
    }

    /// Commits a `results:updated` with the tally, if the poll is still active (a
    /// close already sent the final one).
    async fn publish_results(&self, session_id: Uuid, poll_id: Uuid) -> DomainResult<()> {
        let mut tx = SessionTx::begin(self, session_id).await?;
        let Some(row) = pollcast_store::poll::Entity::find_by_id(poll_id)
            .one(&tx.txn)
            .await?
        else {
            return Ok(());
        };
        let poll = convert::poll(&row)?;
        if poll.status != PollStatus::Active {
            return Ok(());
        }
        let results = tally(&tx.txn, &row, &poll).await?;
        tx.emit(DomainEvent::ResultsUpdated { results });
        tx.commit(self).await
    }

    /// Audits the active polls now (after `quiet` without votes) and then every
    /// [`AUDIT_EVERY`] (after [`AUDIT_QUIET`]), until `shutdown` turns true.
    pub async fn audit_results(self, quiet: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut quiet = quiet;
        loop {
            match self.republish_stale_results(quiet).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(polls = n, "results republished after a lost update"),
                Err(err) => tracing::warn!(error = %err, "results audit failed"),
            }
            quiet = AUDIT_QUIET;
            tokio::select! {
                () = tokio::time::sleep(AUDIT_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Publishes a `results:updated` for every active poll whose last published
    /// tally is not its current one and that has had no vote for `quiet`; returns
    /// how many.
    pub async fn republish_stale_results(&self, quiet: Duration) -> DomainResult<usize> {
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(quiet).unwrap_or_default();
        let active = poll::Entity::find()
            .filter(poll::Column::Status.eq(PollStatus::Active.as_str()))
            .all(self.db())
            .await?;
        let mut republished = 0;
        for row in active {
            if self.inner.results.pending().contains(&row.id) {
                continue;
            }
            let newest_vote: Option<chrono::DateTime<chrono::Utc>> = vote::Entity::find()
                .select_only()
                .column_as(Expr::col(vote::Column::CreatedAt).max(), "newest")
                .filter(vote::Column::PollId.eq(row.id))
                .into_tuple::<Option<chrono::DateTime<chrono::Utc>>>()
                .one(self.db())
                .await?
                .flatten();
            if newest_vote.is_none_or(|at| at > cutoff) {
                continue;
            }
            let poll = convert::poll(&row)?;
            let current = tally(self.db(), &row, &poll).await?;
            let published = self.last_published_results(row.session_id, row.id).await?;
            let behind = published.is_none_or(|p| {
                p.total_votes != current.total_votes || p.options != current.options
            });
            if behind {
                self.publish_results(row.session_id, row.id).await?;
                republished += 1;
            }
        }
        Ok(republished)
    }

    /// The newest `results:updated` the session's outbox holds for the poll.
    async fn last_published_results(
        &self,
        session_id: Uuid,
        poll_id: Uuid,
    ) -> DomainResult<Option<Results>> {
        let rows = outbox::Entity::find()
            .filter(outbox::Column::SessionId.eq(session_id))
            .filter(outbox::Column::EventType.eq("results:updated"))
            .order_by_desc(outbox::Column::Position)
            .limit(AUDIT_SCAN)
            .all(self.db())
            .await?;
        for row in rows {
            if let DomainEvent::ResultsUpdated { results } = serde_json::from_str(&row.payload)?
                && results.poll_id == poll_id
            {
                return Ok(Some(results));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_mid_sized_sessions_keep_the_configured_interval() {
        let base = Duration::from_millis(50);
        for audience in [0, 1, 500, AUDIENCE_AT_BASE_INTERVAL] {
            assert_eq!(coalescing_interval(base, audience), base);
        }
    }

    #[test]
    fn large_sessions_stretch_it_up_to_the_contracts_bound() {
        let base = Duration::from_millis(50);
        assert_eq!(coalescing_interval(base, 3000), Duration::from_millis(75));
        assert_eq!(coalescing_interval(base, 10_000), STRETCHED_INTERVAL);
        assert_eq!(coalescing_interval(base, u64::MAX), STRETCHED_INTERVAL);
        // An operator's longer interval is theirs to keep.
        let slow = Duration::from_millis(90);
        assert_eq!(coalescing_interval(slow, 10_000), slow);
        assert!(STRETCHED_INTERVAL < Duration::from_millis(100));
    }
}
