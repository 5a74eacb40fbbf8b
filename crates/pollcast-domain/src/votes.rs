//! Voting: one vote per participant per poll (the database's unique index decides),
//! option rules per poll kind, idempotent retries, and `vote:rejected` to the
//! submitter for every refusal.
//!
//! What needs no lock is checked here, per request. What does (the poll still
//! active, the vote not a second one, the idempotency key not answered yet) is
//! decided in [`crate::vote_batch`], which commits many votes of a session in one
//! transaction.
//!
//! A poll's question, options, kind and session never change, so a vote on a
//! poll already seen active reads none of them from the database: the checks
//! before the batch use a copy kept in memory ([`ActivePolls`]), and the batch
//! reads the poll's status under the session's lock as always.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pollcast_protocol::{Poll, PollKind, PollStatus, Vote};
use pollcast_store::idempotency_key;
use sea_orm::{ConnectionTrait, EntityTrait};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::vote_batch::Ballot;
use crate::{Access, Claims, Domain, DomainError, DomainResult, VoteRejection, convert};

/// Polls kept by [`ActivePolls`]; past it the copies are dropped and read again.
const ACTIVE_POLLS_KEPT: usize = 10_000;

/// Polls read as active, by id: what a vote checks before its batch.
#[derive(Default)]
pub(crate) struct ActivePolls(Mutex<HashMap<Uuid, Arc<Poll>>>);

impl ActivePolls {
    fn get(&self, id: Uuid) -> Option<Arc<Poll>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn keep(&self, poll: Arc<Poll>) {
        let mut polls = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if polls.len() >= ACTIVE_POLLS_KEPT {
            // Simpler than an LRU: a miss costs one read.
            polls.clear();
        }
        polls.insert(poll.id, poll);
    }
}

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
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub(crate) enum StoredAnswer {
    Accepted {
        vote: Vote,
    },
    Rejected {
        reason: VoteRejection,
        message: String,
    },
}

impl StoredAnswer {
    pub(crate) fn into_result(self) -> DomainResult<Vote> {
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
        let key = request.idempotency_key;
        if key
            .as_deref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
        {
            return Err(DomainError::ValidationFailed(format!(
                "Idempotency-Key must be 1–{MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        let poll = match self.inner.active_polls.get(poll_id) {
            Some(poll) => {
                claims.require_session(poll.session_id)?;
                poll
            }
            None => {
                let poll = Arc::new(convert::poll(&self.poll_row(claims, poll_id).await?)?);
                if poll.status == PollStatus::Active {
                    self.inner.active_polls.keep(Arc::clone(&poll));
                }
                poll
            }
        };
        let participant_id = claims.require_participant(poll.session_id)?;
        // A retry answered long ago needs no lock: answer it straight away.
        if let Some(key) = key.as_deref()
            && let Some(answer) = stored_answer(self.db(), participant_id, key).await?
        {
            return answer.into_result();
        }
        // A poll read as inactive here is refused without the lock (it can only have
        // been activated since in a race the client cannot tell apart); a poll read
        // (or kept) as active is checked again under the lock.
        let choice = if poll.status == PollStatus::Active {
            check_options(&poll, &request.option_ids)
        } else {
            Err((
                VoteRejection::PollNotActive,
                format!("poll {} is {}", poll.id, poll.status.as_str()),
            ))
        };
        let ballot = Ballot {
            session_id: poll.session_id,
            poll_id: poll.id,
            participant_id,
            choice,
            key,
        };
        self.cast(ballot).await
    }
}

/// The stored first answer to `key` of `participant_id`, if there is one.
pub(crate) async fn stored_answer<C: ConnectionTrait>(
    conn: &C,
    participant_id: Uuid,
    key: &str,
) -> DomainResult<Option<StoredAnswer>> {
    let row = idempotency_key::Entity::find_by_id((participant_id, key.to_owned()))
        .one(conn)
        .await?;
    row.map(|r| serde_json::from_str(&r.answer).map_err(DomainError::from))
        .transpose()
}

/// Applies the poll's option rules, in the order a client would fix them: choose
/// something, choose it once, choose real options, not too many.
fn check_options(poll: &Poll, raw: &[String]) -> Result<Vec<Uuid>, (VoteRejection, String)> {
    if raw.is_empty() {
        return Err((
            VoteRejection::ValidationFailed,
            "choose at least one option".to_owned(),
        ));
    }
    let mut chosen = Vec::with_capacity(raw.len());
    for text in raw {
        let id = Uuid::parse_str(text)
            .ok()
            .filter(|id| poll.options.iter().any(|o| o.id == *id))
            .ok_or_else(|| {
                (
                    VoteRejection::InvalidOption,
                    format!("{text:?} is not an option of poll {}", poll.id),
                )
            })?;
        if chosen.contains(&id) {
            return Err((
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
        return Err((
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
