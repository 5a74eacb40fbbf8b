//! The poll state machine: draft → active → closed, at most one active poll per
//! session; activating one closes the one before it.

use pollcast_protocol::{DomainEvent, Poll, PollKind, PollOption, PollStatus, SessionStatus};
use pollcast_store::{poll, session};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::{
    Access, Claims, Domain, DomainError, DomainResult, Page, PageRequest, convert, page, validate,
};

/// A poll as the presenter asks for it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewPoll {
    /// The question, 1–500 characters.
    pub question: String,
    /// 2–20 options.
    pub options: Vec<NewPollOption>,
    /// `single` (default) or `multiple`.
    #[serde(default)]
    pub kind: PollKind,
    /// For `multiple`: 1..number of options, default all; for `single`: 1.
    pub max_choices: Option<u32>,
}

/// An option as given: a plain string, or an object with `text` (the shape the
/// Poll resource answers with, so a client can send back what it read).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum NewPollOption {
    /// `"Talk A"`
    Text(String),
    /// `{"text": "Talk A"}`
    Object {
        /// The option text.
        text: String,
    },
}

impl From<String> for NewPollOption {
    fn from(text: String) -> Self {
        NewPollOption::Text(text)
    }
}

impl NewPollOption {
    fn text(&self) -> &str {
        match self {
            NewPollOption::Text(text) | NewPollOption::Object { text } => text,
        }
    }
}

impl NewPoll {
    /// Checks the contract's limits (question, options, `maxChoices`); returns
    /// the `maxChoices` to store.
    pub fn validate(&self) -> DomainResult<u32> {
        validate::text("question", &self.question, validate::QUESTION)?;
        let (min, max) = validate::OPTIONS;
        let count = self.options.len();
        if count < min || count > max {
            return Err(DomainError::ValidationFailed(format!(
                "a poll has {min}–{max} options, got {count}"
            )));
        }
        for option in &self.options {
            validate::text("option text", option.text(), validate::OPTION_TEXT)?;
        }
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        match (self.kind, self.max_choices) {
            (PollKind::Single, None | Some(1)) => Ok(1),
            (PollKind::Single, Some(_)) => Err(DomainError::ValidationFailed(
                "maxChoices must be 1 for a single-choice poll".into(),
            )),
            (PollKind::Multiple, None) => Ok(count),
            (PollKind::Multiple, Some(n)) if (1..=count).contains(&n) => Ok(n),
            (PollKind::Multiple, Some(n)) => Err(DomainError::ValidationFailed(format!(
                "maxChoices must be 1–{count}, got {n}"
            ))),
        }
    }
}

impl Domain {
    /// Drafts a poll in a session that has not ended.
    pub async fn create_poll(
        &self,
        claims: &Claims,
        session_id: Uuid,
        new: NewPoll,
    ) -> DomainResult<Poll> {
        claims.require_presenter(session_id)?;
        let max_choices = new.validate()?;
        let mut tx = SessionTx::begin(self, session_id).await?;
        if tx.status()? == SessionStatus::Ended {
            return Err(DomainError::SessionEnded);
        }
        let cap = self.inner.config.max_polls_per_session;
        if tx.session.poll_count >= i64::from(cap) {
            return Err(DomainError::InvalidState(format!(
                "a session holds at most {cap} polls"
            )));
        }
        tx.count(session::Column::PollCount).await?;
        let options: Vec<PollOption> = new
            .options
            .iter()
            .map(|o| PollOption {
                id: Uuid::now_v7(),
                text: o.text().to_owned(),
            })
            .collect();
        let row = poll::ActiveModel {
            id: Set(Uuid::now_v7()),
            session_id: Set(session_id),
            question: Set(new.question),
            kind: Set(new.kind.as_str().to_owned()),
            max_choices: Set(i32::try_from(max_choices).unwrap_or(i32::MAX)),
            status: Set(PollStatus::Draft.as_str().to_owned()),
            options: Set(serde_json::to_string(&options)?),
            created_at: Set(tx.now.datetime()),
            activated_at: Set(None),
            closed_at: Set(None),
            total_votes: Set(0),
        }
        .insert(&tx.txn)
        .await?;
        let poll = convert::poll(&row)?;
        tx.emit(DomainEvent::PollCreated { poll: poll.clone() });
        tx.commit(self).await?;
        Ok(poll)
    }

    /// The session's polls in creation order, for any token of the session. A page
    /// continues after the poll `page.after` names, which must be of this session.
    pub async fn polls(
        &self,
        claims: &Claims,
        session_id: Uuid,
        page: PageRequest,
    ) -> DomainResult<Page<Poll>> {
        claims.require_session(session_id)?;
        if session::Entity::find_by_id(session_id)
            .one(self.db())
            .await?
            .is_none()
        {
            return Err(DomainError::SessionNotFound);
        }
        let mut query = poll::Entity::find()
            .filter(poll::Column::SessionId.eq(session_id))
            .order_by_asc(poll::Column::CreatedAt)
            .order_by_asc(poll::Column::Id);
        if let Some(after) = page.after {
            let cursor = poll::Entity::find_by_id(after)
                .filter(poll::Column::SessionId.eq(session_id))
                .one(self.db())
                .await?
                .ok_or_else(|| {
                    DomainError::ValidationFailed("after: names no poll of this session".into())
                })?;
            query = query.filter(page::after(
                poll::Column::CreatedAt,
                poll::Column::Id,
                cursor.created_at,
                cursor.id,
            ));
        }
        let rows = query.limit(page.rows_to_read()).all(self.db()).await?;
        let polls = rows
            .iter()
            .map(convert::poll)
            .collect::<DomainResult<_>>()?;
        Ok(page.cut(polls))
    }

    /// One poll, for any token of its session.
    pub async fn poll(&self, claims: &Claims, poll_id: Uuid) -> DomainResult<Poll> {
        let row = self.poll_row(claims, poll_id).await?;
        convert::poll(&row)
    }

    /// Loads a poll and checks the token belongs to its session.
    pub(crate) async fn poll_row(
        &self,
        claims: &Claims,
        poll_id: Uuid,
    ) -> DomainResult<poll::Model> {
        let row = poll::Entity::find_by_id(poll_id)
            .one(self.db())
            .await?
            .ok_or(DomainError::PollNotFound)?;
        claims.require_session(row.session_id)?;
        Ok(row)
    }

    /// Opens a draft poll for votes, closing the session's active poll first.
    pub async fn activate_poll(&self, claims: &Claims, poll_id: Uuid) -> DomainResult<Poll> {
        let row = self.poll_row(claims, poll_id).await?;
        claims.require_presenter(row.session_id)?;
        let mut tx = SessionTx::begin(self, row.session_id).await?;
        match tx.status()? {
            SessionStatus::Created => return Err(DomainError::SessionNotStarted),
            SessionStatus::Ended => return Err(DomainError::SessionEnded),
            SessionStatus::Started => {}
        }
        let row = reload(&tx, poll_id).await?;
        let status: PollStatus = convert::parse(&row.status)?;
        if status != PollStatus::Draft {
            return Err(DomainError::InvalidState(format!(
                "poll is {}, only a draft poll can be activated",
                status.as_str()
            )));
        }
        if let Some(previous) = tx.session.active_poll_id {
            self.close_poll_in(&mut tx, previous).await?;
        }
        let mut active: poll::ActiveModel = row.into();
        active.status = Set(PollStatus::Active.as_str().to_owned());
        active.activated_at = Set(Some(tx.now.datetime()));
        let row = active.update(&tx.txn).await?;
        set_active_poll(&mut tx, Some(poll_id)).await?;
        let poll = convert::poll(&row)?;
        tx.emit(DomainEvent::PollActivated { poll: poll.clone() });
        tx.commit(self).await?;
        Ok(poll)
    }

    /// Closes an active poll; its results become final.
    pub async fn close_poll(&self, claims: &Claims, poll_id: Uuid) -> DomainResult<Poll> {
        let row = self.poll_row(claims, poll_id).await?;
        claims.require_presenter(row.session_id)?;
        let mut tx = SessionTx::begin(self, row.session_id).await?;
        let row = reload(&tx, poll_id).await?;
        let status: PollStatus = convert::parse(&row.status)?;
        if status != PollStatus::Active {
            return Err(DomainError::InvalidState(format!(
                "poll is {}, only an active poll can be closed",
                status.as_str()
            )));
        }
        let poll = self.close_poll_in(&mut tx, poll_id).await?;
        tx.commit(self).await?;
        Ok(poll)
    }

    /// Closes the active poll `poll_id` inside `tx`: the final tally goes out as a
    /// last `results:updated`, then `poll:closed`, so the last results a client saw
    /// before the close equal the final ones.
    pub(crate) async fn close_poll_in(
        &self,
        tx: &mut SessionTx,
        poll_id: Uuid,
    ) -> DomainResult<Poll> {
        let row = reload(tx, poll_id).await?;
        let mut closing: poll::ActiveModel = row.into();
        closing.status = Set(PollStatus::Closed.as_str().to_owned());
        closing.closed_at = Set(Some(tx.now.datetime()));
        let row = closing.update(&tx.txn).await?;
        set_active_poll(tx, None).await?;
        let poll = convert::poll(&row)?;
        let results = crate::results::tally(&tx.txn, &row, &poll).await?;
        tx.emit(DomainEvent::ResultsUpdated {
            results: results.clone(),
        });
        tx.emit(DomainEvent::PollClosed {
            poll: poll.clone(),
            results,
        });
        Ok(poll)
    }
}

/// The poll as of the session lock (its status may have changed since it was read
/// for the authorisation check).
async fn reload(tx: &SessionTx, poll_id: Uuid) -> DomainResult<poll::Model> {
    poll::Entity::find_by_id(poll_id)
        .one(&tx.txn)
        .await?
        .ok_or(DomainError::PollNotFound)
}

async fn set_active_poll(tx: &mut SessionTx, poll_id: Option<Uuid>) -> DomainResult<()> {
    let mut row: session::ActiveModel = tx.session.clone().into();
    row.active_poll_id = Set(poll_id);
    tx.session = row.update(&tx.txn).await?;
    Ok(())
}
