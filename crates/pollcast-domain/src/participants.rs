//! Joining a session with its code, and the presenter's view of who joined.

use pollcast_protocol::{DomainEvent, Participant, Role, Session, SessionStatus};
use pollcast_store::{participant, session};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

use crate::tx::SessionTx;
use crate::{
    Access, Claims, Domain, DomainError, DomainResult, Page, PageRequest, code, convert, page,
    validate,
};

/// A participant who just joined, their token and the session joined.
#[derive(Clone, Debug)]
pub struct Joined {
    /// The new participant.
    pub participant: Participant,
    /// Participant bearer token.
    pub participant_token: String,
    /// The session joined.
    pub session: Session,
}

impl Domain {
    /// Joins the live session holding `code` (case-insensitive).
    pub async fn join(&self, join_code: &str, display_name: &str) -> DomainResult<Joined> {
        let code = code::normalise(join_code).ok_or(DomainError::SessionNotFound)?;
        validate::text("displayName", display_name, validate::DISPLAY_NAME)?;
        // Several ended sessions may have used the code; at most one live one has it.
        let candidates = session::Entity::find()
            .filter(session::Column::Code.eq(code))
            .all(self.db())
            .await?;
        let live = candidates
            .iter()
            .find(|s| s.status != SessionStatus::Ended.as_str());
        let target = match (live, candidates.is_empty()) {
            (Some(live), _) => live.id,
            (None, true) => return Err(DomainError::SessionNotFound),
            (None, false) => return Err(DomainError::SessionEnded),
        };
        let mut tx = SessionTx::begin(self, target).await?;
        if tx.status()? == SessionStatus::Ended {
            return Err(DomainError::SessionEnded);
        }
        let cap = self.inner.config.max_participants_per_session;
        if tx.session.participant_count >= i64::from(cap) {
            return Err(DomainError::InvalidState(format!(
                "the session is full: at most {cap} participants"
            )));
        }
        tx.count(session::Column::ParticipantCount).await?;
        let row = participant::ActiveModel {
            id: Set(Uuid::now_v7()),
            session_id: Set(target),
            display_name: Set(display_name.to_owned()),
            joined_at: Set(tx.now.datetime()),
            last_seen_at: Set(tx.now.datetime()),
            connected: Set(false),
        }
        .insert(&tx.txn)
        .await?;
        let participant = convert::participant(&row);
        let session = convert::session(&tx.session)?;
        tx.emit(DomainEvent::ParticipantJoined {
            participant: participant.clone(),
        });
        tx.commit(self).await?;
        let participant_token =
            self.inner
                .keys
                .issue(target, Role::Participant, Some(participant.id));
        Ok(Joined {
            participant,
            participant_token,
            session,
        })
    }

    /// Who joined the session, in join order; presenters only. A page continues
    /// after the participant `page.after` names, which must be of this session.
    pub async fn participants(
        &self,
        claims: &Claims,
        session_id: Uuid,
        page: PageRequest,
    ) -> DomainResult<Page<Participant>> {
        claims.require_presenter(session_id)?;
        let mut query = participant::Entity::find()
            .filter(participant::Column::SessionId.eq(session_id))
            .order_by_asc(participant::Column::JoinedAt)
            .order_by_asc(participant::Column::Id);
        if let Some(after) = page.after {
            let cursor = participant::Entity::find_by_id(after)
                .filter(participant::Column::SessionId.eq(session_id))
                .one(self.db())
                .await?
                .ok_or_else(|| {
                    DomainError::ValidationFailed(
                        "after: names no participant of this session".into(),
                    )
                })?;
            query = query.filter(page::after(
                participant::Column::JoinedAt,
                participant::Column::Id,
                cursor.joined_at,
                cursor.id,
            ));
        }
        let rows = query.limit(page.rows_to_read()).all(self.db()).await?;
        Ok(page.cut(rows.iter().map(convert::participant).collect()))
    }
}
