//! Who may do what: checks of a verified token against the resource asked for.

use pollcast_protocol::Role;
use pollcast_protocol::token::Claims;
use uuid::Uuid;

use crate::{DomainError, DomainResult};

/// Authorisation checks on verified [`Claims`].
pub trait Access {
    /// Any token of `session_id`.
    fn require_session(&self, session_id: Uuid) -> DomainResult<()>;
    /// The presenter token of `session_id`.
    fn require_presenter(&self, session_id: Uuid) -> DomainResult<()>;
    /// A participant token of `session_id`; returns the participant.
    fn require_participant(&self, session_id: Uuid) -> DomainResult<Uuid>;
}

impl Access for Claims {
    fn require_session(&self, session_id: Uuid) -> DomainResult<()> {
        if self.session_id == session_id {
            Ok(())
        } else {
            Err(DomainError::Forbidden("token belongs to another session"))
        }
    }

    fn require_presenter(&self, session_id: Uuid) -> DomainResult<()> {
        self.require_session(session_id)?;
        if self.role == Role::Presenter {
            Ok(())
        } else {
            Err(DomainError::Forbidden("only the presenter may do this"))
        }
    }

    fn require_participant(&self, session_id: Uuid) -> DomainResult<Uuid> {
        self.require_session(session_id)?;
        self.participant_id
            .ok_or(DomainError::Forbidden("only participants may do this"))
    }
}
