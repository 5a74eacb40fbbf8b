//! Everything a domain operation can refuse or fail with. The API maps each variant
//! to the contract's status and code in one place (`pollcast-api`'s `error.rs`).

use serde::{Deserialize, Serialize};

/// Why a vote was refused: the contract's codes for rejected votes. Stored with
/// idempotency keys, so the serialised names are part of the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoteRejection {
    /// The poll is not open (draft or closed).
    PollNotActive,
    /// The participant has already voted on this poll.
    AlreadyVoted,
    /// An option id is not one of the poll's options.
    InvalidOption,
    /// More options than the poll allows.
    TooManyChoices,
    /// No option, or the same option twice.
    ValidationFailed,
}

impl VoteRejection {
    /// The contract's error code.
    pub fn code(self) -> &'static str {
        match self {
            VoteRejection::PollNotActive => "poll_not_active",
            VoteRejection::AlreadyVoted => "already_voted",
            VoteRejection::InvalidOption => "invalid_option",
            VoteRejection::TooManyChoices => "too_many_choices",
            VoteRejection::ValidationFailed => "validation_failed",
        }
    }
}

/// A domain operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Missing, malformed, forged or expired credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Valid credentials that do not allow this (wrong role, another session).
    #[error("{0}")]
    Forbidden(&'static str),
    /// No such session.
    #[error("session not found")]
    SessionNotFound,
    /// No such poll.
    #[error("poll not found")]
    PollNotFound,
    /// The request is well-formed but breaks a limit of the contract.
    #[error("{0}")]
    ValidationFailed(String),
    /// The resource is not in a state that allows the change.
    #[error("{0}")]
    InvalidState(String),
    /// The session has not started yet.
    #[error("session has not started")]
    SessionNotStarted,
    /// The session has ended.
    #[error("session has ended")]
    SessionEnded,
    /// A vote was refused.
    #[error("{message}")]
    VoteRejected {
        /// The contract's reason.
        reason: VoteRejection,
        /// Explanation for people.
        message: String,
    },
    /// The database (or, for readiness, the event stream) cannot be reached;
    /// nothing was changed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or a broken invariant. Logged, answered opaquely.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sea_orm::DbErr> for DomainError {
    fn from(err: sea_orm::DbErr) -> Self {
        if pollcast_store::is_unavailable(&err) {
            DomainError::Unavailable(format!("database: {err}"))
        } else {
            DomainError::Internal(format!("database: {err}"))
        }
    }
}

impl From<serde_json::Error> for DomainError {
    fn from(err: serde_json::Error) -> Self {
        DomainError::Internal(format!("stored json: {err}"))
    }
}

/// Result of a domain operation.
pub type DomainResult<T> = Result<T, DomainError>;
