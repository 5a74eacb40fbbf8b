//! Results: exact tallies counted by the database, and the coalescing of
//! `results:updated` so a storm of votes costs one event per interval, not one per
//! vote.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use pollcast_protocol::{DomainEvent, OptionResult, Poll, PollStatus, Results};
use pollcast_store::{vote, vote_choice};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect,
    sea_query::{Expr, ExprTrait},
};
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::{Claims, Domain, DomainResult, convert};

/// Counts `poll`'s votes as the connection sees them; inside a session
/// transaction that is exactly the committed votes.
pub(crate) async fn tally<C: ConnectionTrait>(conn: &C, poll: &Poll) -> DomainResult<Results> {
    let counts: Vec<(Uuid, i64)> = vote_choice::Entity::find()
        .select_only()
        .column(vote_choice::Column::OptionId)
        .column_as(Expr::col(vote_choice::Column::VoteId).count(), "votes")
        .filter(vote_choice::Column::PollId.eq(poll.id))
        .group_by(vote_choice::Column::OptionId)
        .into_tuple()
        .all(conn)
        .await?;
    let total_votes = vote::Entity::find()
        .filter(vote::Column::PollId.eq(poll.id))
        .count(conn)
        .await?;
    let options = poll
        .options
        .iter()
        .map(|option| OptionResult {
            option_id: option.id,
            votes: counts
                .iter()
                .find(|(id, _)| *id == option.id)
                .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0)),
        })
        .collect();
    Ok(Results {
        poll_id: poll.id,
        total_votes,
        options,
        is_final: poll.status == PollStatus::Closed,
    })
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
        tally(self.db(), &poll).await
    }

    /// Schedules a `results:updated` for the poll unless one is already pending.
    pub(crate) fn vote_committed(&self, session_id: Uuid, poll_id: Uuid) {
        if !self.inner.results.pending().insert(poll_id) {
            return;
        }
        let domain = self.clone();
        let armed = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(domain.inner.config.results_interval).await;
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
        let results = tally(&tx.txn, &poll).await?;
        tx.emit(DomainEvent::ResultsUpdated { results });
        tx.commit(self).await
    }
}
