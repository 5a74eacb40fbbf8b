//! The resources of the REST API, exactly as the contract spells them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Timestamp;

/// Where a session is in its life: created → started → ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Participants may join and polls may be drafted; nothing can be activated yet.
    Created,
    /// Live: polls can be activated and voted on.
    Started,
    /// Over: read-only for ever.
    Ended,
}

/// Where a poll is in its life: draft → active → closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollStatus {
    /// Created, not yet shown to the audience.
    Draft,
    /// Open for votes; at most one per session.
    Active,
    /// Final; results no longer change.
    Closed,
}

/// How many options a vote may choose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollKind {
    /// Exactly one option.
    #[default]
    Single,
    /// 1..`maxChoices` distinct options.
    Multiple,
}

/// The role a bearer token grants within its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the session: starts, ends, manages polls.
    Presenter,
    /// Joined with the code: votes and listens.
    Participant,
}

/// A live audience session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// Session id (UUID v7).
    pub id: Uuid,
    /// Six-character join code.
    pub code: String,
    /// Title shown to the audience.
    pub title: String,
    /// Lifecycle state.
    pub status: SessionStatus,
    /// When the session was created.
    pub created_at: Timestamp,
    /// When it was started, if it was.
    pub started_at: Option<Timestamp>,
    /// When it ended, if it did.
    pub ended_at: Option<Timestamp>,
    /// The poll currently open for votes, if any.
    pub active_poll_id: Option<Uuid>,
}

/// One answer a poll offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PollOption {
    /// Option id (UUID v7).
    pub id: Uuid,
    /// The text shown.
    pub text: String,
}

/// A question put to the session's participants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Poll {
    /// Poll id (UUID v7).
    pub id: Uuid,
    /// The session it belongs to.
    pub session_id: Uuid,
    /// The question.
    pub question: String,
    /// Single or multiple choice.
    pub kind: PollKind,
    /// Most options one vote may choose (1 for `single`).
    pub max_choices: u32,
    /// Lifecycle state.
    pub status: PollStatus,
    /// Options in the order the presenter gave them.
    pub options: Vec<PollOption>,
    /// When the poll was created.
    pub created_at: Timestamp,
    /// When it was activated, if it was.
    pub activated_at: Option<Timestamp>,
    /// When it was closed, if it was.
    pub closed_at: Option<Timestamp>,
}

/// Someone who joined a session with its code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    /// Participant id (UUID v7).
    pub id: Uuid,
    /// The session joined.
    pub session_id: Uuid,
    /// Name given at join.
    pub display_name: String,
    /// When they joined.
    pub joined_at: Timestamp,
    /// Last sign of life (join, or a heartbeat from a connection).
    pub last_seen_at: Timestamp,
    /// Whether at least one WebSocket connection of theirs is open.
    pub connected: bool,
}

/// One participant's accepted vote on one poll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vote {
    /// Vote id (UUID v7).
    pub id: Uuid,
    /// The poll voted on.
    pub poll_id: Uuid,
    /// Who voted.
    pub participant_id: Uuid,
    /// Chosen options, in the order the participant gave them.
    pub option_ids: Vec<Uuid>,
    /// When the vote was accepted.
    pub created_at: Timestamp,
}

/// Votes for one option.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OptionResult {
    /// The option.
    pub option_id: Uuid,
    /// Votes that chose it.
    pub votes: u64,
}

/// A poll's tally: counts in the poll's option order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Results {
    /// The poll tallied.
    pub poll_id: Uuid,
    /// Number of votes cast (not of options chosen).
    pub total_votes: u64,
    /// One entry per option, in the poll's option order.
    pub options: Vec<OptionResult>,
    /// True once the poll is closed and the tally can no longer change.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Implements `as_str` and `FromStr` with the same lowercase names serde uses, so
/// the store can keep statuses as readable text.
macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The lowercase name the contract uses.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownVariant;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => Err(UnknownVariant(other.to_owned())),
                }
            }
        }
    };
}

/// A stored or received name that is not one of the enum's variants.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown variant {0:?}")]
pub struct UnknownVariant(pub String);

text_enum!(SessionStatus { Created => "created", Started => "started", Ended => "ended" });
text_enum!(PollStatus { Draft => "draft", Active => "active", Closed => "closed" });
text_enum!(PollKind { Single => "single", Multiple => "multiple" });
text_enum!(Role { Presenter => "presenter", Participant => "participant" });
