//! Rows to contract resources.

use std::str::FromStr;

use pollcast_protocol::{Participant, Poll, PollOption, Session, Timestamp};
use pollcast_store::{participant, poll, session};

use crate::{DomainError, DomainResult};

/// Parses a stored enum name; a bad one is a broken invariant, not bad input.
pub(crate) fn parse<T: FromStr>(text: &str) -> DomainResult<T> {
    text.parse()
        .map_err(|_| DomainError::Internal(format!("unknown stored value {text:?}")))
}

pub(crate) fn session(row: &session::Model) -> DomainResult<Session> {
    Ok(Session {
        id: row.id,
        code: row.code.clone(),
        title: row.title.clone(),
        status: parse(&row.status)?,
        created_at: row.created_at.into(),
        started_at: row.started_at.map(Timestamp::from),
        ended_at: row.ended_at.map(Timestamp::from),
        active_poll_id: row.active_poll_id,
    })
}

pub(crate) fn poll(row: &poll::Model) -> DomainResult<Poll> {
    let options: Vec<PollOption> = serde_json::from_str(&row.options)?;
    Ok(Poll {
        id: row.id,
        session_id: row.session_id,
        question: row.question.clone(),
        kind: parse(&row.kind)?,
        max_choices: u32::try_from(row.max_choices)
            .map_err(|_| DomainError::Internal("negative max_choices".into()))?,
        status: parse(&row.status)?,
        options,
        created_at: row.created_at.into(),
        activated_at: row.activated_at.map(Timestamp::from),
        closed_at: row.closed_at.map(Timestamp::from),
    })
}

pub(crate) fn participant(row: &participant::Model) -> Participant {
    Participant {
        id: row.id,
        session_id: row.session_id,
        display_name: row.display_name.clone(),
        joined_at: row.joined_at.into(),
        last_seen_at: row.last_seen_at.into(),
        connected: row.connected,
    }
}
