//! Voting: one vote per participant per poll (the database's unique index decides),
//! option rules per poll kind, idempotent retries, and `vote:rejected` to the
//! submitter for every refusal.

use pollcast_protocol::{DomainEvent, Poll, PollKind, PollStatus, Vote};
use pollcast_store::{idempotency_key, poll, vote, vote_choice};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::{Access, Claims, Domain, DomainError, DomainResult, VoteRejection, convert};

/// Longest `Idempotency-Key` kept.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// A vote as the participant sends it.
#[derive(Clone, Debug)]
pub struct VoteRequest {
    /// Chosen option ids as sent (not yet known to be UUIDs).
    pub option_ids: Vec<String>,
    /// `Idempotency-Key` header, if any.
    pub idempotency_key: Option<String>,
}

/// The first answer to a request with an idempotency key, as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
enum StoredAnswer {
    Accepted {
        vote: Vote,
    },
    Rejected {
        reason: VoteRejection,
        message: String,
    },
}

impl StoredAnswer {
    fn into_result(self) -> DomainResult<Vote> {
        match self {
            StoredAnswer::Accepted { vote } => Ok(vote),
            StoredAnswer::Rejected { reason, message } => {
                Err(DomainError::VoteRejected { reason, message })
            }
        }
    }
}

impl Domain {
    /// Casts a participant's vote on an active poll.
    pub async fn vote(
        &self,
        claims: &Claims,
        poll_id: Uuid,
        request: VoteRequest,
    ) -> DomainResult<Vote> {
        let key = request.idempotency_key.as_deref();
        if key.is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY) {
            return Err(DomainError::ValidationFailed(format!(
                "Idempotency-Key must be 1–{MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        let row = self.poll_row(claims, poll_id).await?;
        let participant_id = claims.require_participant(row.session_id)?;
        if let Some(key) = key
            && let Some(answer) = self.stored_answer(participant_id, key).await?
        {
            return answer.into_result();
        }
        let poll = convert::poll(&row)?;
        let outcome = self
            .try_vote(&poll, participant_id, &request.option_ids, key)
            .await;
        match outcome {
            Ok(Attempt::Cast(vote)) => Ok(vote),
            Ok(Attempt::KeyTaken) => {
                // A concurrent request with the same key committed first; its answer
                // is the answer.
                let key = key.unwrap_or_default();
                match self.stored_answer(participant_id, key).await? {
                    Some(first) => first.into_result(),
                    None => Err(DomainError::Internal("idempotency key vanished".into())),
                }
            }
            Err(DomainError::VoteRejected { reason, message }) => {
                if let Some(key) = key {
                    let answer = StoredAnswer::Rejected {
                        reason,
                        message: message.clone(),
                    };
                    if let Some(first) = self.store_answer(participant_id, key, &answer).await? {
                        // A concurrent request with the same key answered first.
                        return first.into_result();
                    }
                }
                self.emit_rejection(&poll, participant_id, reason, &message)
                    .await?;
                Err(DomainError::VoteRejected { reason, message })
            }
            Err(other) => Err(other),
        }
    }

    /// The vote transaction: poll still active, options valid, insert (the unique
    /// index refuses a second vote), emit `vote:accepted`.
    async fn try_vote(
        &self,
        poll: &Poll,
        participant_id: Uuid,
        raw_options: &[String],
        key: Option<&str>,
    ) -> DomainResult<Attempt> {
        let mut tx = SessionTx::begin(self, poll.session_id).await?;
        let current = poll::Entity::find_by_id(poll.id)
            .one(&tx.txn)
            .await?
            .ok_or(DomainError::PollNotFound)?;
        if convert::parse::<PollStatus>(&current.status)? != PollStatus::Active {
            return Err(DomainError::rejected(
                VoteRejection::PollNotActive,
                format!("poll {} is {}", poll.id, current.status),
            ));
        }
        let option_ids = check_options(poll, raw_options)?;
        let vote = Vote {
            id: Uuid::now_v7(),
            poll_id: poll.id,
            participant_id,
            option_ids,
            created_at: tx.now,
        };
        let inserted = vote::ActiveModel {
            id: Set(vote.id),
            poll_id: Set(vote.poll_id),
            participant_id: Set(participant_id),
            option_ids: Set(serde_json::to_string(&vote.option_ids)?),
            created_at: Set(tx.now.datetime()),
        }
        .insert(&tx.txn)
        .await;
        match inserted {
            Ok(_) => {}
            Err(err) if pollcast_store::is_unique_violation(&err) => {
                return Err(DomainError::rejected(
                    VoteRejection::AlreadyVoted,
                    format!(
                        "participant {participant_id} has already voted on poll {}",
                        poll.id
                    ),
                ));
            }
            Err(err) => return Err(err.into()),
        }
        let choices = vote
            .option_ids
            .iter()
            .map(|&option_id| vote_choice::ActiveModel {
                vote_id: Set(vote.id),
                option_id: Set(option_id),
                poll_id: Set(poll.id),
            });
        vote_choice::Entity::insert_many(choices)
            .exec(&tx.txn)
            .await?;
        if let Some(key) = key {
            let answer = StoredAnswer::Accepted { vote: vote.clone() };
            let stored = key_row(participant_id, key, &answer, &tx)?
                .insert(&tx.txn)
                .await;
            match stored {
                Ok(_) => {}
                Err(err) if pollcast_store::is_unique_violation(&err) => {
                    return Ok(Attempt::KeyTaken);
                }
                Err(err) => return Err(err.into()),
            }
        }
        tx.emit(DomainEvent::VoteAccepted { vote: vote.clone() });
        tx.commit(self).await?;
        metrics::counter!("pollcast_votes_accepted_total").increment(1);
        self.vote_committed(poll.session_id, poll.id);
        Ok(Attempt::Cast(vote))
    }

    async fn stored_answer(
        &self,
        participant_id: Uuid,
        key: &str,
    ) -> DomainResult<Option<StoredAnswer>> {
        let row = idempotency_key::Entity::find_by_id((participant_id, key.to_owned()))
            .one(self.db())
            .await?;
        row.map(|r| serde_json::from_str(&r.answer).map_err(DomainError::from))
            .transpose()
    }

    /// Stores a rejection under the key; if the key already has an answer, returns
    /// that one instead.
    async fn store_answer(
        &self,
        participant_id: Uuid,
        key: &str,
        answer: &StoredAnswer,
    ) -> DomainResult<Option<StoredAnswer>> {
        let row = idempotency_key::ActiveModel {
            participant_id: Set(participant_id),
            key: Set(key.to_owned()),
            answer: Set(serde_json::to_string(answer)?),
            created_at: Set(chrono::Utc::now()),
        };
        match row.insert(self.db()).await {
            Ok(_) => Ok(None),
            Err(err) if pollcast_store::is_unique_violation(&err) => {
                self.stored_answer(participant_id, key).await
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Sends `vote:rejected` to the submitter's connections (through the stream, in
    /// the session's order, like every other event).
    async fn emit_rejection(
        &self,
        poll: &Poll,
        participant_id: Uuid,
        reason: VoteRejection,
        message: &str,
    ) -> DomainResult<()> {
        let mut tx = SessionTx::begin(self, poll.session_id).await?;
        tx.emit(DomainEvent::VoteRejected {
            poll_id: poll.id,
            participant_id,
            reason: reason.code().to_owned(),
            message: message.to_owned(),
        });
        metrics::counter!("pollcast_votes_rejected_total", "reason" => reason.code()).increment(1);
        tx.commit(self).await
    }
}

/// What the vote transaction did when it did not refuse the vote.
enum Attempt {
    /// The vote was committed.
    Cast(Vote),
    /// Another request with the same idempotency key committed first; nothing was
    /// written by this one.
    KeyTaken,
}

fn key_row(
    participant_id: Uuid,
    key: &str,
    answer: &StoredAnswer,
    tx: &SessionTx,
) -> DomainResult<idempotency_key::ActiveModel> {
    Ok(idempotency_key::ActiveModel {
        participant_id: Set(participant_id),
        key: Set(key.to_owned()),
        answer: Set(serde_json::to_string(answer)?),
        created_at: Set(tx.now.datetime()),
    })
}

/// Applies the poll's option rules, in the order a client would fix them: choose
/// something, choose it once, choose real options, not too many.
fn check_options(poll: &Poll, raw: &[String]) -> DomainResult<Vec<Uuid>> {
    if raw.is_empty() {
        return Err(DomainError::rejected(
            VoteRejection::ValidationFailed,
            "choose at least one option",
        ));
    }
    let mut chosen = Vec::with_capacity(raw.len());
    for text in raw {
        let id = Uuid::parse_str(text)
            .ok()
            .filter(|id| poll.options.iter().any(|o| o.id == *id))
            .ok_or_else(|| {
                DomainError::rejected(
                    VoteRejection::InvalidOption,
                    format!("{text:?} is not an option of poll {}", poll.id),
                )
            })?;
        if chosen.contains(&id) {
            return Err(DomainError::rejected(
                VoteRejection::ValidationFailed,
                format!("option {id} chosen twice"),
            ));
        }
        chosen.push(id);
    }
    let max = match poll.kind {
        PollKind::Single => 1,
        PollKind::Multiple => usize::try_from(poll.max_choices).unwrap_or(usize::MAX),
    };
    if chosen.len() > max {
        return Err(DomainError::rejected(
            VoteRejection::TooManyChoices,
            format!(
                "poll {} takes at most {max} options, got {}",
                poll.id,
                chosen.len()
            ),
        ));
    }
    Ok(chosen)
}
