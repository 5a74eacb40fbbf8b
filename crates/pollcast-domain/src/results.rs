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
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QueryResult, QuerySelect, QueryTrait,
    sea_query::{Expr, ExprTrait, SelectStatement},
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::batcher::{Batcher, Job};
use crate::tx::{SessionsTx, padded};
use crate::{Claims, Domain, DomainError, DomainResult, convert};

/// The poll's tally as the connection sees it: the total kept on its row and the
/// per-option counts kept beside it, both changed only in the transaction that
/// writes the votes, so inside a session transaction this is exactly the
/// committed votes. `row` must be the poll's row as read through `conn`.
pub(crate) async fn tally<C: ConnectionTrait>(
    conn: &C,
    row: &poll::Model,
    poll: &Poll,
) -> DomainResult<Results> {
    let mut all = tallies(conn, &[(row, poll)]).await?;
    all.pop()
        .ok_or_else(|| DomainError::Internal("no tally for the poll".into()))
}

/// The tallies of several polls, as [`tally`] reads one, with one query.
async fn tallies<C: ConnectionTrait>(
    conn: &C,
    polls: &[(&poll::Model, &Poll)],
) -> DomainResult<Vec<Results>> {
    if polls.is_empty() {
        return Ok(Vec::new());
    }
    let counts = conn
        .query_all(&counts_query(polls.iter().map(|(row, _)| row.id)))
        .await?;
    Ok(results_of(polls, &counts_of(&counts)?))
}

/// The read of the per-option counts kept for `polls`.
fn counts_query(polls: impl IntoIterator<Item = Uuid>) -> SelectStatement {
    option_tally::Entity::find()
        .select_only()
        .columns([
            option_tally::Column::PollId,
            option_tally::Column::OptionId,
            option_tally::Column::Votes,
        ])
        .filter(option_tally::Column::PollId.is_in(polls))
        .into_query()
}

/// The rows of [`counts_query`], by (poll, option).
fn counts_of(rows: &[QueryResult]) -> DomainResult<HashMap<(Uuid, Uuid), i64>> {
    let mut counts = HashMap::with_capacity(rows.len());
    for row in rows {
        let (poll_id, option_id, votes) = row.try_get_many_by_index::<(Uuid, Uuid, i64)>()?;
        counts.insert((poll_id, option_id), votes);
    }
    Ok(counts)
}

/// Each poll's results from its row's total and the per-option `counts`.
fn results_of(
    polls: &[(&poll::Model, &Poll)],
    counts: &HashMap<(Uuid, Uuid), i64>,
) -> Vec<Results> {
    polls
        .iter()
        .map(|(row, poll)| Results {
            poll_id: poll.id,
            total_votes: u64::try_from(row.total_votes).unwrap_or(0),
            options: poll
                .options
                .iter()
                .map(|option| OptionResult {
                    option_id: option.id,
                    votes: counts
                        .get(&(poll.id, option.id))
                        .map_or(0, |n| u64::try_from(*n).unwrap_or(0)),
                })
                .collect(),
            is_final: poll.status == PollStatus::Closed,
        })
        .collect()
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

/// Most `results:updated` committed in one transaction.
const MAX_RESULTS_BATCH: usize = 256;

/// Polls that have a `results:updated` scheduled. At most one is pending per poll:
/// votes arriving meanwhile are covered by it. When its interval has passed, a
/// poll goes to the results task ([`crate::batcher`]), which publishes every due
/// poll, of any sessions, in one transaction: with many small sessions voting,
/// a transaction per update cost as much as the votes.
#[derive(Default)]
pub(crate) struct Coalescer {
    pending: Mutex<HashSet<Uuid>>,
    due: Batcher<Due>,
}

/// A poll whose coalescing interval has passed.
pub(crate) struct Due {
    session_id: Uuid,
    poll_id: Uuid,
    /// When its first uncovered vote committed.
    armed: Instant,
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
            let job = Job {
                batcher: |domain: &Domain| &domain.inner.results.due,
                max: MAX_RESULTS_BATCH,
                handle: |domain: Domain, due: Vec<Due>| async move {
                    domain.publish_due(due).await;
                },
            };
            let due = Due {
                session_id,
                poll_id,
                armed,
            };
            domain.inner.results.due.send(&domain, job, due).await;
        });
    }

    /// Publishes the due polls' results in one transaction.
    async fn publish_due(&self, due: Vec<Due>) {
        // Cleared before counting: a vote committed from here on schedules the
        // next update, so no vote is left uncovered.
        {
            let mut pending = self.inner.results.pending();
            for d in &due {
                pending.remove(&d.poll_id);
            }
        }
        let polls: Vec<(Uuid, Uuid)> = due.iter().map(|d| (d.session_id, d.poll_id)).collect();
        let published = match self.publish_results(&polls).await {
            Ok(()) => due.iter().collect(),
            Err(err) if due.len() > 1 => {
                // Nothing of the batch committed. One poll that cannot be
                // published must not hold back the others: publish each alone.
                tracing::warn!(polls = due.len(), error = %err, "results batch failed; publishing its polls one by one");
                let mut published = Vec::new();
                for d in &due {
                    match self.publish_results(&[(d.session_id, d.poll_id)]).await {
                        Ok(()) => published.push(d),
                        Err(err) => {
                            tracing::warn!(poll_id = %d.poll_id, error = %err, "results update failed");
                        }
                    }
                }
                published
            }
            Err(err) => {
                for d in &due {
                    tracing::warn!(poll_id = %d.poll_id, error = %err, "results update failed");
                }
                Vec::new()
            }
        };
        for d in published {
            metrics::histogram!("pollcast_results_lag_seconds")
                .record(d.armed.elapsed().as_secs_f64());
        }
    }

    /// Commits a `results:updated` with the tally of each `(session, poll)` still
    /// active (a close already sent the final one), all in one transaction.
    async fn publish_results(&self, polls: &[(Uuid, Uuid)]) -> DomainResult<()> {
        // Padded, as the lock's list is (see `tx::padded`).
        let ids = padded(polls.iter().map(|(_, p)| *p).collect());
        let ids = || ids.iter().copied();
        // The polls and their counts, read with the lock: the counts of a poll
        // no longer active are read for nothing, which costs less than a
        // round trip of their own.
        let (mut tx, read) = SessionsTx::begin(
            self,
            polls.iter().map(|(s, _)| *s),
            vec![
                poll::Entity::find()
                    .filter(poll::Column::Id.is_in(ids()))
                    .into_query(),
                counts_query(ids()),
            ],
        )
        .await?;
        let [rows, counts] = <[Vec<QueryResult>; 2]>::try_from(read)
            .map_err(|_| DomainError::Internal("a read missing".into()))?;
        let rows = rows
            .iter()
            .map(|row| poll::Model::from_query_result(row, ""))
            .collect::<Result<Vec<_>, _>>()?;
        let mut active = Vec::with_capacity(rows.len());
        for row in &rows {
            let poll = convert::poll(row)?;
            if poll.status == PollStatus::Active && tx.sessions.contains_key(&row.session_id) {
                active.push((row, poll));
            }
        }
        let pairs: Vec<(&poll::Model, &Poll)> =
            active.iter().map(|(row, poll)| (*row, poll)).collect();
        let counts = counts_of(&counts)?;
        for (results, (row, _)) in results_of(&pairs, &counts).into_iter().zip(&active) {
            tx.emit(row.session_id, DomainEvent::ResultsUpdated { results });
        }
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
                self.publish_results(&[(row.session_id, row.id)]).await?;
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
    use crate::DomainConfig;
    use crate::testing::{ballot, domain_with, outbox_of, voting_session};

    /// A domain whose own coalescing timers never fire during a test, so the
    /// test decides when results are published.
    async fn untimed_domain() -> Domain {
        domain_with(DomainConfig {
            results_interval: Duration::from_secs(3600),
            ..DomainConfig::default()
        })
        .await
    }

    #[tokio::test]
    async fn results_of_several_sessions_commit_together_each_in_its_own_order() {
        let domain = untimed_domain().await;
        let (p1, s1, poll1, v1) = voting_session(&domain, 2).await;
        let (_, s2, poll2, v2) = voting_session(&domain, 1).await;
        let (p3, s3, poll3, _) = voting_session(&domain, 0).await;
        for b in [
            ballot(s1, &poll1, v1[0], 0),
            ballot(s1, &poll1, v1[1], 1),
            ballot(s2, &poll2, v2[0], 1),
        ] {
            domain.cast(b).await.expect("vote");
        }
        // The third poll is closed: its final results went out with the close.
        domain.close_poll(&p3, poll3.id).await.expect("close");
        let mut before = Vec::new();
        for session in [s1, s2, s3] {
            before.push(outbox_of(&domain, session).await.len());
        }
        domain
            .publish_results(&[(s1, poll1.id), (s2, poll2.id), (s3, poll3.id)])
            .await
            .expect("published");
        for (i, (session, updates)) in [(s1, 1), (s2, 1), (s3, 0)].into_iter().enumerate() {
            let outbox = outbox_of(&domain, session).await;
            let positions: Vec<i64> = outbox.iter().map(|(p, _)| *p).collect();
            assert_eq!(positions, (1..=outbox.len() as i64).collect::<Vec<_>>());
            let added: Vec<&str> = outbox[before[i]..]
                .iter()
                .map(|(_, t)| t.as_str())
                .collect();
            assert_eq!(added, vec!["results:updated"; updates], "session {session}");
        }
        let r1 = domain.results(&p1, poll1.id).await.expect("results");
        assert_eq!(r1.total_votes, 2);
        assert_eq!(
            r1.options.iter().map(|o| o.votes).collect::<Vec<_>>(),
            [1, 1]
        );
    }

    #[tokio::test]
    async fn a_poll_that_fails_its_results_batch_fails_alone() {
        use sea_orm::ActiveValue::Set;
        let domain = untimed_domain().await;
        let (_, s1, poll1, _) = voting_session(&domain, 0).await;
        let (_, s2, poll2, _) = voting_session(&domain, 0).await;
        // The second poll's stored options cannot be read: publishing it fails.
        poll::Entity::update(poll::ActiveModel {
            id: Set(poll2.id),
            options: Set("not options".into()),
            ..Default::default()
        })
        .exec(domain.db())
        .await
        .expect("corrupt the poll");
        let before = (
            outbox_of(&domain, s1).await.len(),
            outbox_of(&domain, s2).await.len(),
        );
        let due = [(s1, poll1.id), (s2, poll2.id)]
            .into_iter()
            .map(|(session_id, poll_id)| Due {
                session_id,
                poll_id,
                armed: Instant::now(),
            })
            .collect();
        domain.publish_due(due).await;
        let after1 = outbox_of(&domain, s1).await;
        assert_eq!(
            after1.len(),
            before.0 + 1,
            "the good poll still got its update"
        );
        assert_eq!(after1[before.0].1, "results:updated");
        assert_eq!(outbox_of(&domain, s2).await.len(), before.1);
    }

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
