//! Handlers, one file per resource, each with its `router()`.

use pollcast_domain::DomainError;
use uuid::Uuid;

use crate::ApiError;

pub mod health;
pub mod participants;
pub mod polls;
pub mod sessions;
pub mod votes;

/// A session id from the path; anything that is not a UUID names no session.
fn session_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| DomainError::SessionNotFound.into())
}

/// A poll id from the path; anything that is not a UUID names no poll.
fn poll_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| DomainError::PollNotFound.into())
}
