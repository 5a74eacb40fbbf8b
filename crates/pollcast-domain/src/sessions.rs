//! The session state machine: created → started → ended.

use pollcast_protocol::{DomainEvent, Role, Session, SessionStatus, Timestamp};
use pollcast_store::session;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait, TransactionTrait};
use uuid::Uuid;

use crate::tx::{SessionTx, insert_outbox};
use crate::{Access, Claims, Domain, DomainError, DomainResult, code, convert, validate};

/// How many fresh codes to try before giving up; with 887 million codes a clash is
/// already rare, eight in a row means something else is wrong.
const CODE_ATTEMPTS: usize = 8;

/// A new session and the token that manages it.
#[derive(Clone, Debug)]
pub struct CreatedSession {
    /// The session.
    pub session: Session,
    /// Presenter bearer token.
    pub presenter_token: String,
}

impl Domain {
    /// Creates a session. With an admin key configured, `admin_key` must match it.
    pub async fn create_session(
        &self,
        admin_key: Option<&str>,
        title: &str,
    ) -> DomainResult<CreatedSession> {
        if let Some(expected) = &self.inner.config.admin_key {
            let given = admin_key.ok_or(DomainError::Unauthorized("admin key required"))?;
            if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                return Err(DomainError::Unauthorized("invalid admin key"));
            }
        }
        validate::text("title", title, validate::TITLE)?;
        for _ in 0..CODE_ATTEMPTS {
            if let Some(session) = self.insert_session(title).await? {
                let presenter_token = self.inner.keys.issue(session.id, Role::Presenter, None);
                return Ok(CreatedSession {
                    session,
                    presenter_token,
                });
            }
        }
        Err(DomainError::Internal(
            "could not allocate a join code".into(),
        ))
    }

    /// Inserts the session with a fresh code, and its `session:created` event;
    /// `None` when a live session already holds the code drawn.
    async fn insert_session(&self, title: &str) -> DomainResult<Option<Session>> {
        let now = Timestamp::now();
        let row = session::ActiveModel {
            id: Set(Uuid::now_v7()),
            code: Set(code::generate()),
            title: Set(title.to_owned()),
            status: Set(SessionStatus::Created.as_str().to_owned()),
            created_at: Set(now.datetime()),
            started_at: Set(None),
            ended_at: Set(None),
            active_poll_id: Set(None),
            last_position: Set(1),
            poll_count: Set(0),
            participant_count: Set(0),
        };
        let txn = self.db().begin().await?;
        let inserted = match row.insert(&txn).await {
            Ok(model) => model,
            Err(err) if pollcast_store::is_unique_violation(&err) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let session = convert::session(&inserted)?;
        let event = DomainEvent::SessionCreated {
            session: session.clone(),
        };
        insert_outbox(&txn, session.id, 1, now, std::slice::from_ref(&event)).await?;
        txn.commit().await?;
        self.inner.handoff.push(session.id, 1, now, [event]);
        Ok(Some(session))
    }

    /// The session, for any token of it.
    pub async fn session(&self, claims: &Claims, session_id: Uuid) -> DomainResult<Session> {
        claims.require_session(session_id)?;
        let row = session::Entity::find_by_id(session_id)
            .one(self.db())
            .await?
            .ok_or(DomainError::SessionNotFound)?;
        convert::session(&row)
    }

    /// Starts a created session.
    pub async fn start_session(&self, claims: &Claims, session_id: Uuid) -> DomainResult<Session> {
        claims.require_presenter(session_id)?;
        let mut tx = SessionTx::begin(self, session_id).await?;
        let status = tx.status()?;
        if status != SessionStatus::Created {
            return Err(DomainError::InvalidState(format!(
                "session is {}, only a created session can start",
                status.as_str()
            )));
        }
        let mut row: session::ActiveModel = tx.session.clone().into();
        row.status = Set(SessionStatus::Started.as_str().to_owned());
        row.started_at = Set(Some(tx.now.datetime()));
        tx.session = row.update(&tx.txn).await?;
        let session = convert::session(&tx.session)?;
        tx.emit(DomainEvent::SessionStarted {
            session: session.clone(),
        });
        tx.commit(self).await?;
        Ok(session)
    }

    /// Ends a session, closing its active poll first.
    pub async fn end_session(&self, claims: &Claims, session_id: Uuid) -> DomainResult<Session> {
        claims.require_presenter(session_id)?;
        let mut tx = SessionTx::begin(self, session_id).await?;
        if tx.status()? == SessionStatus::Ended {
            return Err(DomainError::SessionEnded);
        }
        if let Some(active) = tx.session.active_poll_id {
            self.close_poll_in(&mut tx, active).await?;
        }
        let mut row: session::ActiveModel = tx.session.clone().into();
        row.status = Set(SessionStatus::Ended.as_str().to_owned());
        row.ended_at = Set(Some(tx.now.datetime()));
        row.active_poll_id = Set(None);
        tx.session = row.update(&tx.txn).await?;
        let session = convert::session(&tx.session)?;
        tx.emit(DomainEvent::SessionEnded {
            session: session.clone(),
        });
        tx.commit(self).await?;
        Ok(session)
    }
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
