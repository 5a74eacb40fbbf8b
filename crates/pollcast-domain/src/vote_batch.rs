//! Group commit for votes: many votes of one session in one transaction.
//!
//! Every change to a session runs under the session's row lock; that lock is what
//! gives the session one total order, and it makes a session's writes serial. One
//! transaction per vote would cap a session at what one transaction per vote costs
//! (about 1.3 k votes/s on SQLite, see `docs/benchmarks.md`), while a keynote's
//! audience votes within seconds. So each session has one batch task per process:
//! votes queue for it while it commits, and it commits everything queued, up to
//! [`MAX_BATCH`], in the next transaction: one lock, one outbox write, one commit.
//! An idle session's task ends after `DomainConfig::vote_batch_idle`.
//!
//! Inside the transaction each ballot is decided exactly as a transaction of its
//! own would decide it: the idempotency key (already answered → that answer, no
//! event), the poll still active, the vote not a second one (the votes already
//! cast are read under the session's lock, and the one-vote index checks the
//! insert), then `vote:accepted` or `vote:rejected` and the key's answer. Before
//! all that, a ballot whose participant the session does not have is refused (401).
//!
//! A batch that fails as a whole (say, a stored answer that cannot be read)
//! committed nothing; its ballots are then decided one by one, so only the faulty
//! one gets the error.

use pollcast_protocol::{DomainEvent, PollStatus, Vote};
use pollcast_store::{idempotency_key, option_tally, participant, poll, vote, vote_choice};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::votes::StoredAnswer;
use crate::{Domain, DomainError, DomainResult, VoteRejection};

/// Most votes committed in one transaction.
const MAX_BATCH: usize = 256;
/// Votes that may wait for a session's batch task before callers wait to queue.
const QUEUE: usize = 4096;

/// A vote as far as it could be decided without the session lock.
pub(crate) struct Ballot {
    pub session_id: Uuid,
    pub poll_id: Uuid,
    pub participant_id: Uuid,
    /// The options chosen, or why the vote is refused whatever the lock shows.
    pub choice: Result<Vec<Uuid>, (VoteRejection, String)>,
    pub key: Option<String>,
}

/// A ballot waiting for its batch, and where its answer goes.
struct Pending {
    ballot: Ballot,
    answer: oneshot::Sender<DomainResult<Vote>>,
}

/// The batch task of each session with votes in flight.
#[derive(Default)]
pub(crate) struct VoteBatches {
    queues: Mutex<HashMap<Uuid, mpsc::Sender<Pending>>>,
}

impl VoteBatches {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, mpsc::Sender<Pending>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Domain {
    /// Queues a ballot for its session's next batch and waits for its answer.
    pub(crate) async fn cast(&self, ballot: Ballot) -> DomainResult<Vote> {
        let session_id = ballot.session_id;
        let (answer, answered) = oneshot::channel();
        let mut pending = Pending { ballot, answer };
        loop {
            let queue = {
                let mut queues = self.inner.votes.queues();
                queues
                    .entry(session_id)
                    .or_insert_with(|| {
                        let (queue, ballots) = mpsc::channel(QUEUE);
                        tokio::spawn(run(self.clone(), session_id, ballots, queue.clone()));
                        queue
                    })
                    .clone()
            };
            match queue.send(pending).await {
                Ok(()) => break,
                // The task retired between our lookup and the send (or died):
                // forget its queue if it is still listed, and start again.
                Err(mpsc::error::SendError(back)) => {
                    let mut queues = self.inner.votes.queues();
                    if queues
                        .get(&session_id)
                        .is_some_and(|q| q.same_channel(&queue))
                    {
                        queues.remove(&session_id);
                    }
                    pending = back;
                }
            }
        }
        answered
            .await
            .unwrap_or_else(|_| Err(DomainError::Internal("vote batch task ended".into())))
    }
}

/// The batch task of one session.
async fn run(
    domain: Domain,
    session_id: Uuid,
    mut ballots: mpsc::Receiver<Pending>,
    me: mpsc::Sender<Pending>,
) {
    let idle = domain.inner.config.vote_batch_idle;
    loop {
        let first = match tokio::time::timeout(idle, ballots.recv()).await {
            Ok(Some(first)) => first,
            _ => break,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ballots.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        domain.commit_batch(session_id, batch).await;
    }
    // Retire: no new sender finds this queue, no sender can add to it, and what
    // is already in it is still committed.
    {
        let mut queues = domain.inner.votes.queues();
        if queues.get(&session_id).is_some_and(|q| q.same_channel(&me)) {
            queues.remove(&session_id);
        }
    }
    drop(me);
    ballots.close();
    let mut rest = Vec::new();
    while let Some(pending) = ballots.recv().await {
        rest.push(pending);
        if rest.len() == MAX_BATCH {
            domain
                .commit_batch(session_id, std::mem::take(&mut rest))
                .await;
        }
    }
    if !rest.is_empty() {
        domain.commit_batch(session_id, rest).await;
    }
}

impl Domain {
    /// Commits one batch and answers every ballot in it.
    async fn commit_batch(&self, session_id: Uuid, batch: Vec<Pending>) {
        metrics::histogram!("pollcast_vote_batch_size").record(batch.len() as f64);
        let (ballots, answers): (Vec<Ballot>, Vec<_>) =
            batch.into_iter().map(|p| (p.ballot, p.answer)).unzip();
        match self.write_batch(session_id, &ballots).await {
            Ok((outcomes, accepted_polls, audience)) => {
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(outcome);
                }
                for poll_id in accepted_polls {
                    self.vote_committed(session_id, poll_id, audience);
                }
            }
            Err(err) if ballots.len() > 1 => {
                // Nothing of the batch committed. One bad ballot must not fail its
                // neighbours: decide each alone, so only the bad one gets the error.
                tracing::warn!(%session_id, error = %err, ballots = ballots.len(), "vote batch failed; retrying its ballots one by one");
                for (ballot, answer) in ballots.iter().zip(answers) {
                    let outcome = match self
                        .write_batch(session_id, std::slice::from_ref(ballot))
                        .await
                    {
                        Ok((mut outcomes, accepted_polls, audience)) => {
                            for poll_id in accepted_polls {
                                self.vote_committed(session_id, poll_id, audience);
                            }
                            outcomes
                                .pop()
                                .unwrap_or_else(|| Err(DomainError::Internal("no outcome".into())))
                        }
                        Err(err) => Err(err),
                    };
                    let _ = answer.send(outcome);
                }
            }
            Err(err) => {
                tracing::warn!(%session_id, error = %err, "vote failed");
                for answer in answers {
                    let _ = answer.send(Err(copy_of(&err)));
                }
            }
        }
    }

    /// The batch transaction; returns each ballot's answer and the polls that got
    /// votes.
    ///
    /// Every ballot is decided in memory from what a few queries read under the
    /// session's lock (the active polls, the voters, their stored answers, the
    /// votes they already cast), then the new rows are written with one
    /// multi-row insert per table: the statements per batch stay constant instead
    /// of growing with its votes. The unique index still has the last word: a
    /// vote it refuses fails the batch, whose ballots are then decided alone.
    async fn write_batch(
        &self,
        session_id: Uuid,
        ballots: &[Ballot],
    ) -> DomainResult<(Vec<DomainResult<Vote>>, HashSet<Uuid>, u64)> {
        let mut tx = SessionTx::begin(self, session_id).await?;
        let polls: HashSet<Uuid> = ballots.iter().map(|b| b.poll_id).collect();
        // Every poll of the batch that exists, and which of them are active. A
        // ballot's poll was read before the batch, possibly long before (see
        // `votes::ActivePolls`); only this read decides.
        let statuses: HashMap<Uuid, String> = poll::Entity::find()
            .select_only()
            .columns([poll::Column::Id, poll::Column::Status])
            .filter(poll::Column::Id.is_in(polls))
            .into_tuple()
            .all(&tx.txn)
            .await?
            .into_iter()
            .collect();
        let active: HashSet<Uuid> = statuses
            .iter()
            .filter(|(_, status)| status.as_str() == PollStatus::Active.as_str())
            .map(|(id, _)| *id)
            .collect();
        // A signed token is no proof its participant exists here (the database may
        // have been reset under the same secret): one query for the whole batch.
        // Looked up by id alone, the session compared here: given the session as
        // well, SQLite's planner walks the session's index, every participant of
        // it, instead of one primary-key probe per voter.
        let voters: HashSet<Uuid> = participant::Entity::find()
            .select_only()
            .columns([participant::Column::Id, participant::Column::SessionId])
            .filter(participant::Column::Id.is_in(ballots.iter().map(|b| b.participant_id)))
            .into_tuple::<(Uuid, Uuid)>()
            .all(&tx.txn)
            .await?
            .into_iter()
            .filter(|(_, session)| *session == session_id)
            .map(|(id, _)| id)
            .collect();
        // First answers to the batch's keys, including those given earlier in this
        // batch (a retry queued behind its original).
        let mut answered = stored_answers(&tx, ballots).await?;
        // Who already voted on which of the batch's active polls, then also who
        // votes in this batch.
        let mut voted: HashSet<(Uuid, Uuid)> = if active.is_empty() {
            HashSet::new()
        } else {
            vote::Entity::find()
                .select_only()
                .columns([vote::Column::PollId, vote::Column::ParticipantId])
                .filter(vote::Column::PollId.is_in(active.iter().copied()))
                .filter(vote::Column::ParticipantId.is_in(voters.iter().copied()))
                .into_tuple()
                .all(&tx.txn)
                .await?
                .into_iter()
                .collect()
        };
        let mut rows = Rows::default();
        let mut outcomes = Vec::with_capacity(ballots.len());
        let mut accepted_polls = HashSet::new();
        for ballot in ballots {
            if !statuses.contains_key(&ballot.poll_id) {
                // Gone since it was read (its session's retention): as a fresh
                // read would have answered.
                outcomes.push(Err(DomainError::PollNotFound));
                continue;
            }
            if !voters.contains(&ballot.participant_id) {
                // Refused before the vote is considered: no event, no stored answer.
                outcomes.push(Err(DomainError::Unauthorized(
                    "the token's participant is not a participant of its session",
                )));
                continue;
            }
            if let Some(key) = ballot.key.as_deref()
                && let Some(earlier) = answered.get(&(ballot.participant_id, key.to_owned()))
            {
                outcomes.push(earlier.clone().into_result());
                continue;
            }
            let answer = match &ballot.choice {
                Err((reason, message)) => StoredAnswer::Rejected {
                    reason: *reason,
                    message: message.clone(),
                },
                Ok(_) if !active.contains(&ballot.poll_id) => StoredAnswer::Rejected {
                    reason: VoteRejection::PollNotActive,
                    message: format!("poll {} is not active", ballot.poll_id),
                },
                Ok(_) if !voted.insert((ballot.poll_id, ballot.participant_id)) => {
                    StoredAnswer::Rejected {
                        reason: VoteRejection::AlreadyVoted,
                        message: format!(
                            "participant {} has already voted on poll {}",
                            ballot.participant_id, ballot.poll_id
                        ),
                    }
                }
                Ok(options) => StoredAnswer::Accepted {
                    vote: rows.vote(&tx, ballot, options)?,
                },
            };
            match &answer {
                StoredAnswer::Accepted { vote } => {
                    accepted_polls.insert(ballot.poll_id);
                    tx.emit(DomainEvent::VoteAccepted { vote: vote.clone() });
                }
                StoredAnswer::Rejected { reason, message } => {
                    tx.emit(DomainEvent::VoteRejected {
                        poll_id: ballot.poll_id,
                        participant_id: ballot.participant_id,
                        reason: reason.code().to_owned(),
                        message: message.clone(),
                    });
                }
            }
            if let Some(key) = ballot.key.as_deref() {
                rows.keys.push(idempotency_key::ActiveModel {
                    participant_id: Set(ballot.participant_id),
                    key: Set(key.to_owned()),
                    answer: Set(serde_json::to_string(&answer)?),
                    created_at: Set(tx.now.datetime()),
                });
                answered.insert((ballot.participant_id, key.to_owned()), answer.clone());
            }
            outcomes.push(answer.into_result());
        }
        rows.write(&tx).await?;
        // The session's participants, for how widely its results fan out.
        let audience = u64::try_from(tx.session.participant_count).unwrap_or(0);
        tx.commit(self).await?;
        // Counted once committed: a batch that fails is retried vote by vote, and
        // its answers must not count twice.
        for outcome in &outcomes {
            let label = match outcome {
                Ok(_) => "accepted",
                Err(DomainError::VoteRejected { reason, .. }) => reason.code(),
                Err(DomainError::Unauthorized(_)) => "unauthorized",
                Err(DomainError::PollNotFound) => "poll_not_found",
                Err(_) => "error",
            };
            metrics::counter!("pollcast_votes_total", "outcome" => label).increment(1);
        }
        Ok((outcomes, accepted_polls, audience))
    }
}

/// Rows per multi-row insert: far below SQLite's 32 766 bound variables at the
/// widest row here (5 columns), and small enough to keep each statement cheap
/// to prepare.
const ROWS_PER_INSERT: usize = 512;

/// The rows a batch writes, gathered while its ballots are decided.
#[derive(Default)]
struct Rows {
    votes: Vec<vote::ActiveModel>,
    choices: Vec<vote_choice::ActiveModel>,
    keys: Vec<idempotency_key::ActiveModel>,
    /// What the batch adds to each poll's kept tally: its votes, and the votes
    /// of each option chosen.
    tallies: HashMap<Uuid, (i64, HashMap<Uuid, i64>)>,
}

impl Rows {
    /// An accepted vote and its choices.
    fn vote(&mut self, tx: &SessionTx, ballot: &Ballot, options: &[Uuid]) -> DomainResult<Vote> {
        let vote = Vote {
            id: Uuid::now_v7(),
            poll_id: ballot.poll_id,
            participant_id: ballot.participant_id,
            option_ids: options.to_vec(),
            created_at: tx.now,
        };
        self.votes.push(vote::ActiveModel {
            id: Set(vote.id),
            poll_id: Set(vote.poll_id),
            participant_id: Set(vote.participant_id),
            option_ids: Set(serde_json::to_string(&vote.option_ids)?),
            created_at: Set(tx.now.datetime()),
        });
        self.choices
            .extend(options.iter().map(|&option_id| vote_choice::ActiveModel {
                vote_id: Set(vote.id),
                option_id: Set(option_id),
                poll_id: Set(vote.poll_id),
            }));
        let (total, per_option) = self.tallies.entry(vote.poll_id).or_default();
        *total += 1;
        for option_id in options {
            *per_option.entry(*option_id).or_default() += 1;
        }
        Ok(vote)
    }

    /// Writes everything gathered, a few statements per table, and adds the
    /// batch's votes to the kept tallies. Votes first: choices refer to them.
    async fn write(self, tx: &SessionTx) -> DomainResult<()> {
        for chunk in self.votes.chunks(ROWS_PER_INSERT) {
            vote::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(&tx.txn)
                .await?;
        }
        for chunk in self.choices.chunks(ROWS_PER_INSERT) {
            vote_choice::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(&tx.txn)
                .await?;
        }
        for chunk in self.keys.chunks(ROWS_PER_INSERT) {
            idempotency_key::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(&tx.txn)
                .await?;
        }
        for (poll_id, (total, per_option)) in self.tallies {
            // Increments: the batch never needs to read the tally it adds to.
            poll::Entity::update_many()
                .col_expr(
                    poll::Column::TotalVotes,
                    Expr::col(poll::Column::TotalVotes).add(total),
                )
                .filter(poll::Column::Id.eq(poll_id))
                .exec(&tx.txn)
                .await?;
            let added =
                per_option
                    .into_iter()
                    .map(|(option_id, votes)| option_tally::ActiveModel {
                        poll_id: Set(poll_id),
                        option_id: Set(option_id),
                        votes: Set(votes),
                    });
            // An option's first votes insert its row; later ones add to it.
            option_tally::Entity::insert_many(added)
                .on_conflict(
                    OnConflict::columns([
                        option_tally::Column::PollId,
                        option_tally::Column::OptionId,
                    ])
                    .value(
                        option_tally::Column::Votes,
                        Expr::col((option_tally::Entity, option_tally::Column::Votes)).add(
                            Expr::col((Alias::new("excluded"), option_tally::Column::Votes)),
                        ),
                    )
                    .to_owned(),
                )
                .exec_without_returning(&tx.txn)
                .await?;
        }
        Ok(())
    }
}

/// The stored first answers to the keys the batch's ballots carry, by
/// (participant, key), read with one query.
async fn stored_answers(
    tx: &SessionTx,
    ballots: &[Ballot],
) -> DomainResult<HashMap<(Uuid, String), StoredAnswer>> {
    let wanted: HashSet<(Uuid, &str)> = ballots
        .iter()
        .filter_map(|b| Some((b.participant_id, b.key.as_deref()?)))
        .collect();
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = idempotency_key::Entity::find()
        .filter(idempotency_key::Column::ParticipantId.is_in(wanted.iter().map(|w| w.0)))
        .filter(idempotency_key::Column::Key.is_in(wanted.iter().map(|w| w.1)))
        .all(&tx.txn)
        .await?;
    let mut found = HashMap::new();
    for row in rows {
        // The IN lists match every pairing; keep the pairs asked for.
        if wanted.contains(&(row.participant_id, row.key.as_str())) {
            let answer: StoredAnswer = serde_json::from_str(&row.answer)?;
            found.insert((row.participant_id, row.key), answer);
        }
    }
    Ok(found)
}

/// The answer for every ballot of a failed batch.
fn copy_of(err: &DomainError) -> DomainError {
    match err {
        DomainError::Unavailable(what) => DomainError::Unavailable(what.clone()),
        DomainError::SessionNotFound => DomainError::SessionNotFound,
        other => DomainError::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use pollcast_stream::EmbeddedStream;

    use super::*;
    use crate::{DomainConfig, NewPoll, NewPollOption, TokenKeys};

    /// A domain on an in-memory SQLite database (one connection, so one database).
    async fn domain() -> Domain {
        let db = pollcast_store::connect("sqlite::memory:", Default::default())
            .await
            .expect("in-memory database");
        let keys = TokenKeys::new(b"vote batch unit tests", Duration::from_secs(60));
        Domain::new(
            db,
            Arc::new(EmbeddedStream::default()),
            keys,
            DomainConfig::default(),
        )
    }

    #[tokio::test]
    async fn a_ballot_that_fails_its_batch_fails_alone() {
        let domain = domain().await;
        let created = domain.create_session(None, "Batch").await.expect("session");
        let presenter = domain
            .verify_token(&created.presenter_token)
            .expect("presenter claims");
        let session = created.session.id;
        domain
            .start_session(&presenter, session)
            .await
            .expect("start");
        let poll = domain
            .create_poll(
                &presenter,
                session,
                NewPoll {
                    question: "Q?".into(),
                    options: vec![
                        NewPollOption::Text("A".into()),
                        NewPollOption::Text("B".into()),
                    ],
                    kind: Default::default(),
                    max_choices: None,
                },
            )
            .await
            .expect("poll");
        domain
            .activate_poll(&presenter, poll.id)
            .await
            .expect("activate");
        let mut voters = Vec::new();
        for i in 0..4 {
            let joined = domain
                .join(&created.session.code, &format!("voter {i}"))
                .await
                .expect("join");
            voters.push(joined.participant.id);
        }
        // The third ballot's idempotency key has a stored answer that cannot be
        // read: deciding it fails the batch transaction.
        idempotency_key::Entity::insert(idempotency_key::ActiveModel {
            participant_id: Set(voters[2]),
            key: Set("corrupt".into()),
            answer: Set("not an answer".into()),
            created_at: Set(chrono::Utc::now()),
        })
        .exec_without_returning(domain.db())
        .await
        .expect("corrupt answer stored");
        let mut batch = Vec::new();
        let mut receivers = Vec::new();
        for (i, participant_id) in voters.iter().enumerate() {
            let (answer, answered) = oneshot::channel();
            batch.push(Pending {
                ballot: Ballot {
                    session_id: session,
                    poll_id: poll.id,
                    participant_id: *participant_id,
                    choice: Ok(vec![poll.options[0].id]),
                    key: (i == 2).then(|| "corrupt".to_owned()),
                },
                answer,
            });
            receivers.push(answered);
        }
        domain.commit_batch(session, batch).await;
        let mut outcomes = Vec::new();
        for answered in receivers {
            outcomes.push(answered.await.expect("answered"));
        }
        assert!(outcomes[2].is_err(), "the bad ballot fails");
        for (i, outcome) in outcomes.iter().enumerate().filter(|(i, _)| *i != 2) {
            assert!(outcome.is_ok(), "ballot {i}: {outcome:?}");
        }
        let results = domain.results(&presenter, poll.id).await.expect("results");
        assert_eq!(results.total_votes, 3);
    }
}
