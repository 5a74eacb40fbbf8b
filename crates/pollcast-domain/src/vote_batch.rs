//! Group commit for votes: many votes, of any sessions, in one transaction.
//!
//! Every change to a session runs under the session's row lock; that lock is what
//! gives the session one total order, and it makes a session's writes serial. One
//! transaction per vote would cap a session at what one transaction per vote costs
//! (about 1.3 k votes/s on SQLite, see `docs/benchmarks.md`), while a keynote's
//! audience votes within seconds; and many small sessions voting at once would
//! pay a transaction (three commits, with its results and its relay mark) for
//! every vote. So each process has one batch task ([`crate::batcher`]): votes
//! queue for it while it commits, and it commits everything queued, up to
//! [`MAX_BATCH`], in the next transaction, whichever sessions the votes are for
//! ([`SessionsTx`]): one lock statement, one outbox write, one commit.
//!
//! Inside the transaction each ballot is decided exactly as a transaction of its
//! own would decide it: the idempotency key (already answered → that answer, no
//! event), the poll still active, the vote not a second one (the votes already
//! cast are read under the sessions' locks, and the one-vote index checks the
//! insert), then `vote:accepted` or `vote:rejected` and the key's answer. Before
//! all that, a ballot whose participant its session does not have is refused
//! (401), and one whose session is gone gets 404.
//!
//! A batch that fails as a whole (say, a stored answer that cannot be read)
//! committed nothing; its ballots are then decided one by one, so only the faulty
//! one gets the error.

use pollcast_protocol::{DomainEvent, PollStatus, Timestamp, Vote};
use pollcast_store::{idempotency_key, option_tally, participant, poll, vote, vote_choice};
use sea_orm::sea_query::{Alias, CaseStatement, Expr, ExprTrait, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QuerySelect, QueryTrait};
use std::collections::{HashMap, HashSet};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::batcher::{Batcher, Job};
use crate::tx::{SessionsTx, padded, tuples};
use crate::votes::StoredAnswer;
use crate::{Domain, DomainError, DomainResult, VoteRejection};

/// Most votes committed in one transaction.
const MAX_BATCH: usize = 256;

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
pub(crate) struct Pending {
    ballot: Ballot,
    answer: oneshot::Sender<DomainResult<Vote>>,
}

/// The vote batch task's queue.
pub(crate) type VoteBatches = Batcher<Pending>;

/// What a committed batch did: each ballot's answer, the polls that got votes
/// (with their sessions), and each session's participant count.
type BatchOutcome = (
    Vec<DomainResult<Vote>>,
    HashSet<(Uuid, Uuid)>,
    HashMap<Uuid, u64>,
);

impl Domain {
    /// Queues a ballot for the next batch and waits for its answer.
    pub(crate) async fn cast(&self, ballot: Ballot) -> DomainResult<Vote> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            batcher: |domain: &Domain| &domain.inner.votes,
            max: MAX_BATCH,
            handle: |domain: Domain, batch: Vec<Pending>| async move {
                domain.commit_batch(batch).await;
            },
        };
        self.inner
            .votes
            .send(self, job, Pending { ballot, answer })
            .await;
        answered
            .await
            .unwrap_or_else(|_| Err(DomainError::Internal("vote batch task ended".into())))
    }
}

impl Domain {
    /// Commits one batch and answers every ballot in it.
    async fn commit_batch(&self, batch: Vec<Pending>) {
        metrics::histogram!("pollcast_vote_batch_size").record(batch.len() as f64);
        let (ballots, answers): (Vec<Ballot>, Vec<_>) =
            batch.into_iter().map(|p| (p.ballot, p.answer)).unzip();
        match self.write_batch(&ballots).await {
            Ok((outcomes, accepted_polls, audiences)) => {
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(outcome);
                }
                self.schedule_results(&accepted_polls, &audiences);
            }
            Err(err) if ballots.len() > 1 => {
                // Nothing of the batch committed. One bad ballot must not fail its
                // neighbours: decide each alone, so only the bad one gets the error.
                tracing::warn!(error = %err, ballots = ballots.len(), "vote batch failed; retrying its ballots one by one");
                for (ballot, answer) in ballots.iter().zip(answers) {
                    let outcome = match self.write_batch(std::slice::from_ref(ballot)).await {
                        Ok((mut outcomes, accepted_polls, audiences)) => {
                            self.schedule_results(&accepted_polls, &audiences);
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
                tracing::warn!(error = %err, "vote failed");
                for answer in answers {
                    let _ = answer.send(Err(copy_of(&err)));
                }
            }
        }
    }

    /// Schedules a `results:updated` for every poll that got votes.
    fn schedule_results(&self, polls: &HashSet<(Uuid, Uuid)>, audiences: &HashMap<Uuid, u64>) {
        for &(session_id, poll_id) in polls {
            let audience = audiences.get(&session_id).copied().unwrap_or(0);
            self.vote_committed(session_id, poll_id, audience);
        }
    }

    /// The batch transaction; returns each ballot's answer, the polls that got
    /// votes and the sessions' participant counts.
    ///
    /// Every ballot is decided in memory from what a few queries read under the
    /// sessions' locks (the active polls, the voters, their stored answers, the
    /// votes they already cast), then the new rows are written with one
    /// multi-row insert per table: the statements per batch stay constant instead
    /// of growing with its votes or its sessions. The unique index still has the
    /// last word: a vote it refuses fails the batch, whose ballots are then
    /// decided alone.
    async fn write_batch(&self, ballots: &[Ballot]) -> DomainResult<BatchOutcome> {
        // Padded (see `tx::padded`): the reads go as one command, whose text
        // would otherwise differ with every count of polls and voters.
        let polls: Vec<Uuid> = padded(unique(ballots.iter().map(|b| b.poll_id)));
        let participants: Vec<Uuid> = padded(unique(ballots.iter().map(|b| b.participant_id)));
        let keys: HashSet<(Uuid, &str)> = ballots
            .iter()
            .filter_map(|b| Some((b.participant_id, b.key.as_deref()?)))
            .collect();
        let mut reads = vec![
            // Every poll of the batch that exists, and which of them are active. A
            // ballot's poll was read before the batch, possibly long before (see
            // `votes::ActivePolls`); only this read decides.
            poll::Entity::find()
                .select_only()
                .columns([poll::Column::Id, poll::Column::Status])
                .filter(poll::Column::Id.is_in(polls.iter().copied()))
                .into_query(),
            // A signed token is no proof its participant exists here (the database
            // may have been reset under the same secret): each voter's session,
            // compared with the ballot's. Looked up by id alone: given the session
            // as well, SQLite's planner walks the session's index, every
            // participant of it, instead of one primary-key probe per voter.
            participant::Entity::find()
                .select_only()
                .columns([participant::Column::Id, participant::Column::SessionId])
                .filter(participant::Column::Id.is_in(participants.iter().copied()))
                .into_query(),
            // Who already voted on the batch's polls; only an active poll's
            // votes decide anything.
            vote::Entity::find()
                .select_only()
                .columns([vote::Column::PollId, vote::Column::ParticipantId])
                .filter(vote::Column::PollId.is_in(polls.iter().copied()))
                .filter(vote::Column::ParticipantId.is_in(participants.iter().copied()))
                .into_query(),
        ];
        if !keys.is_empty() {
            // The first answers to the batch's idempotency keys.
            reads.push(
                idempotency_key::Entity::find()
                    .select_only()
                    .columns([
                        idempotency_key::Column::ParticipantId,
                        idempotency_key::Column::Key,
                        idempotency_key::Column::Answer,
                    ])
                    .filter(
                        idempotency_key::Column::ParticipantId
                            .is_in(padded(keys.iter().map(|k| k.0).collect())),
                    )
                    .filter(
                        idempotency_key::Column::Key
                            .is_in(padded(keys.iter().map(|k| k.1).collect())),
                    )
                    .into_query(),
            );
        }
        let (mut tx, read) =
            SessionsTx::begin(self, ballots.iter().map(|b| b.session_id), reads).await?;
        let mut read = read.into_iter();
        let mut next = || read.next().unwrap_or_default();
        let statuses: HashMap<Uuid, String> = tuples(next())?.into_iter().collect();
        let active: HashSet<Uuid> = statuses
            .iter()
            .filter(|(_, status)| status.as_str() == PollStatus::Active.as_str())
            .map(|(id, _)| *id)
            .collect();
        let voters: HashMap<Uuid, Uuid> = tuples(next())?.into_iter().collect();
        // Then also who votes in this batch.
        let mut voted: HashSet<(Uuid, Uuid)> = tuples(next())?.into_iter().collect();
        // Then also the answers given in this batch (a retry queued behind its
        // original).
        let mut answered = HashMap::new();
        for (participant_id, key, answer) in tuples::<(Uuid, String, String)>(next())? {
            // The IN lists match every pairing; keep the pairs asked for.
            if keys.contains(&(participant_id, key.as_str())) {
                let answer: StoredAnswer = serde_json::from_str(&answer)?;
                answered.insert((participant_id, key), answer);
            }
        }
        let mut rows = Rows::default();
        let mut outcomes = Vec::with_capacity(ballots.len());
        let mut accepted_polls = HashSet::new();
        for ballot in ballots {
            if !tx.sessions.contains_key(&ballot.session_id) {
                // Gone since its poll was read: as its own transaction would say.
                outcomes.push(Err(DomainError::SessionNotFound));
                continue;
            }
            if !statuses.contains_key(&ballot.poll_id) {
                // Gone since it was read (its session's retention): as a fresh
                // read would have answered.
                outcomes.push(Err(DomainError::PollNotFound));
                continue;
            }
            if voters.get(&ballot.participant_id) != Some(&ballot.session_id) {
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
                    vote: rows.vote(tx.now, ballot, options)?,
                },
            };
            match &answer {
                StoredAnswer::Accepted { vote } => {
                    accepted_polls.insert((ballot.session_id, ballot.poll_id));
                    tx.emit(
                        ballot.session_id,
                        DomainEvent::VoteAccepted { vote: vote.clone() },
                    );
                }
                StoredAnswer::Rejected { reason, message } => {
                    tx.emit(
                        ballot.session_id,
                        DomainEvent::VoteRejected {
                            poll_id: ballot.poll_id,
                            participant_id: ballot.participant_id,
                            reason: reason.code().to_owned(),
                            message: message.clone(),
                        },
                    );
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
        rows.write(&mut tx);
        // Each session's participants, for how widely its results fan out.
        let audiences: HashMap<Uuid, u64> = tx
            .sessions
            .values()
            .map(|s| (s.id, u64::try_from(s.participant_count).unwrap_or(0)))
            .collect();
        tx.commit(self).await?;
        // Counted once committed: a batch that fails is retried vote by vote, and
        // its answers must not count twice.
        for outcome in &outcomes {
            let label = match outcome {
                Ok(_) => "accepted",
                Err(DomainError::VoteRejected { reason, .. }) => reason.code(),
                Err(DomainError::Unauthorized(_)) => "unauthorized",
                Err(DomainError::PollNotFound) => "poll_not_found",
                Err(DomainError::SessionNotFound) => "session_not_found",
                Err(_) => "error",
            };
            metrics::counter!("pollcast_votes_total", "outcome" => label).increment(1);
        }
        Ok((outcomes, accepted_polls, audiences))
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
    fn vote(&mut self, now: Timestamp, ballot: &Ballot, options: &[Uuid]) -> DomainResult<Vote> {
        let vote = Vote {
            id: Uuid::now_v7(),
            poll_id: ballot.poll_id,
            participant_id: ballot.participant_id,
            option_ids: options.to_vec(),
            created_at: now,
        };
        self.votes.push(vote::ActiveModel {
            id: Set(vote.id),
            poll_id: Set(vote.poll_id),
            participant_id: Set(vote.participant_id),
            option_ids: Set(serde_json::to_string(&vote.option_ids)?),
            created_at: Set(now.datetime()),
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
    /// batch's votes to the kept tallies; they go with the commit. Votes first:
    /// choices refer to them.
    fn write(self, tx: &mut SessionsTx) {
        for chunk in self.votes.chunks(ROWS_PER_INSERT) {
            tx.write_at_commit(&vote::Entity::insert_many(chunk.to_vec()));
        }
        for chunk in self.choices.chunks(ROWS_PER_INSERT) {
            tx.write_at_commit(&vote_choice::Entity::insert_many(chunk.to_vec()));
        }
        for chunk in self.keys.chunks(ROWS_PER_INSERT) {
            tx.write_at_commit(&idempotency_key::Entity::insert_many(chunk.to_vec()));
        }
        if self.tallies.is_empty() {
            return;
        }
        // Increments: the batch never needs to read the tallies it adds to. One
        // statement for every poll's total...
        let mut added = CaseStatement::new();
        for (poll_id, (total, _)) in &self.tallies {
            added = added.case(poll::Column::Id.eq(*poll_id), Expr::value(*total));
        }
        let added: Expr = added.finally(Expr::value(0i64)).into();
        tx.write_at_commit(
            &poll::Entity::update_many()
                .col_expr(
                    poll::Column::TotalVotes,
                    Expr::col(poll::Column::TotalVotes).add(added),
                )
                .filter(poll::Column::Id.is_in(self.tallies.keys().copied())),
        );
        // ...and one for every option's: its first votes insert its row, later
        // ones add to it.
        let options: Vec<option_tally::ActiveModel> = self
            .tallies
            .into_iter()
            .flat_map(|(poll_id, (_, per_option))| {
                per_option
                    .into_iter()
                    .map(move |(option_id, votes)| option_tally::ActiveModel {
                        poll_id: Set(poll_id),
                        option_id: Set(option_id),
                        votes: Set(votes),
                    })
            })
            .collect();
        for chunk in options.chunks(ROWS_PER_INSERT) {
            tx.write_at_commit(
                &option_tally::Entity::insert_many(chunk.to_vec()).on_conflict(
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
                ),
            );
        }
    }
}

/// The distinct items, in the order first seen.
fn unique<T: Copy + Eq + std::hash::Hash>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items.filter(|item| seen.insert(*item)).collect()
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
    use super::*;
    use crate::testing::{ballot, domain, outbox_of, voting_session};

    /// Commits `ballots` as one batch; returns their answers in order.
    async fn commit(domain: &Domain, ballots: Vec<Ballot>) -> Vec<DomainResult<Vote>> {
        let mut batch = Vec::new();
        let mut receivers = Vec::new();
        for ballot in ballots {
            let (answer, answered) = oneshot::channel();
            batch.push(Pending { ballot, answer });
            receivers.push(answered);
        }
        domain.commit_batch(batch).await;
        let mut outcomes = Vec::new();
        for answered in receivers {
            outcomes.push(answered.await.expect("answered"));
        }
        outcomes
    }

    #[tokio::test]
    async fn ballots_of_several_sessions_commit_together_each_in_its_own_order() {
        let domain = domain().await;
        let (p1, s1, poll1, v1) = voting_session(&domain, 3).await;
        let (p2, s2, poll2, v2) = voting_session(&domain, 2).await;
        let before1 = outbox_of(&domain, s1).await.len();
        let before2 = outbox_of(&domain, s2).await.len();
        let outcomes = commit(
            &domain,
            vec![
                ballot(s1, &poll1, v1[0], 0),
                ballot(s2, &poll2, v2[0], 1),
                ballot(s1, &poll1, v1[1], 1),
                // A participant of the first session on the second's poll.
                ballot(s2, &poll2, v1[2], 0),
                ballot(s2, &poll2, v2[1], 1),
                ballot(s1, &poll1, v1[2], 0),
                // A second vote in the same batch.
                ballot(s1, &poll1, v1[0], 1),
            ],
        )
        .await;
        let kinds: Vec<&str> = outcomes
            .iter()
            .map(|o| match o {
                Ok(_) => "accepted",
                Err(DomainError::Unauthorized(_)) => "unauthorized",
                Err(DomainError::VoteRejected { reason, .. }) => reason.code(),
                Err(_) => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "accepted",
                "accepted",
                "accepted",
                "unauthorized",
                "accepted",
                "accepted",
                "already_voted"
            ]
        );
        let r1 = domain.results(&p1, poll1.id).await.expect("results");
        let r2 = domain.results(&p2, poll2.id).await.expect("results");
        assert_eq!(r1.total_votes, 3);
        assert_eq!(
            r1.options.iter().map(|o| o.votes).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(r2.total_votes, 2);
        assert_eq!(
            r2.options.iter().map(|o| o.votes).collect::<Vec<_>>(),
            [0, 2]
        );
        // Each session's events follow its own last position, consecutively.
        for (session, before, expected) in [
            (
                s1,
                before1,
                [
                    "vote:accepted",
                    "vote:accepted",
                    "vote:accepted",
                    "vote:rejected",
                ]
                .as_slice(),
            ),
            (s2, before2, ["vote:accepted", "vote:accepted"].as_slice()),
        ] {
            let outbox = outbox_of(&domain, session).await;
            let positions: Vec<i64> = outbox.iter().map(|(p, _)| *p).collect();
            assert_eq!(positions, (1..=outbox.len() as i64).collect::<Vec<_>>());
            let added: Vec<&str> = outbox[before..].iter().map(|(_, t)| t.as_str()).collect();
            assert_eq!(added, expected, "session {session}");
        }
    }

    /// Every read of the batch transaction decides a ballot of one batch: the
    /// polls' statuses, the voters' sessions, the stored answers and the votes
    /// an earlier batch committed.
    #[tokio::test]
    async fn each_read_of_a_batch_decides_a_ballot() {
        let domain = domain().await;
        let (presenter, session, poll, voters) = voting_session(&domain, 3).await;
        let draft = domain
            .create_poll(
                &presenter,
                session,
                crate::NewPoll {
                    question: "Later?".into(),
                    options: vec![
                        crate::NewPollOption::Text("A".into()),
                        crate::NewPollOption::Text("B".into()),
                    ],
                    kind: Default::default(),
                    max_choices: None,
                },
            )
            .await
            .expect("draft poll");
        let keyed = |voter, key: &str| Ballot {
            key: Some(key.to_owned()),
            ..ballot(session, &poll, voter, 0)
        };
        let first = commit(
            &domain,
            vec![keyed(voters[0], "k0"), ballot(session, &poll, voters[1], 1)],
        )
        .await;
        let first_vote = first[0].as_ref().expect("first vote").id;
        let outcomes = commit(
            &domain,
            vec![
                keyed(voters[0], "k0"),
                ballot(session, &poll, voters[1], 0),
                ballot(session, &draft, voters[2], 0),
                ballot(session, &poll, Uuid::now_v7(), 0),
                Ballot {
                    poll_id: Uuid::now_v7(),
                    ..ballot(session, &poll, voters[2], 0)
                },
                ballot(session, &poll, voters[2], 1),
            ],
        )
        .await;
        let kinds: Vec<String> = outcomes
            .iter()
            .map(|o| match o {
                Ok(vote) if vote.id == first_vote => "the first answer".into(),
                Ok(_) => "accepted".into(),
                Err(DomainError::VoteRejected { reason, .. }) => reason.code().into(),
                Err(other) => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "the first answer",
                "already_voted",
                "poll_not_active",
                "Unauthorized(\"the token's participant is not a participant of its session\")",
                "PollNotFound",
                "accepted",
            ]
        );
        let results = domain.results(&presenter, poll.id).await.expect("results");
        assert_eq!(results.total_votes, 3);
    }

    #[tokio::test]
    async fn a_ballot_that_fails_its_batch_fails_alone() {
        let domain = domain().await;
        let (presenter, session, poll, voters) = voting_session(&domain, 4).await;
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
        let ballots = voters
            .iter()
            .enumerate()
            .map(|(i, voter)| Ballot {
                key: (i == 2).then(|| "corrupt".to_owned()),
                ..ballot(session, &poll, *voter, 0)
            })
            .collect();
        let outcomes = commit(&domain, ballots).await;
        assert!(outcomes[2].is_err(), "the bad ballot fails");
        for (i, outcome) in outcomes.iter().enumerate().filter(|(i, _)| *i != 2) {
            assert!(outcome.is_ok(), "ballot {i}: {outcome:?}");
        }
        let results = domain.results(&presenter, poll.id).await.expect("results");
        assert_eq!(results.total_votes, 3);
    }
}
