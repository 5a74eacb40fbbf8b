//! Domain events: what a session's stream carries and who may see each one.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{EventId, Participant, Poll, Results, Session, Timestamp, Vote};

/// Every replayable event of the contract, tagged the way the envelope writes it:
/// `eventType` names the variant and `payload` holds its fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "eventType", content = "payload")]
pub enum DomainEvent {
    /// A session was created.
    #[serde(rename = "session:created")]
    SessionCreated {
        /// The session as created.
        session: Session,
    },
    /// A session went live.
    #[serde(rename = "session:started")]
    SessionStarted {
        /// The session after the change.
        session: Session,
    },
    /// A session ended.
    #[serde(rename = "session:ended")]
    SessionEnded {
        /// The session after the change.
        session: Session,
    },
    /// A poll was drafted.
    #[serde(rename = "poll:created")]
    PollCreated {
        /// The new poll.
        poll: Poll,
    },
    /// A poll opened for votes.
    #[serde(rename = "poll:activated")]
    PollActivated {
        /// The poll after the change.
        poll: Poll,
    },
    /// A poll closed; its results are final.
    #[serde(rename = "poll:closed")]
    PollClosed {
        /// The poll after the change.
        poll: Poll,
        /// The final tally.
        results: Results,
    },
    /// A vote was counted.
    #[serde(rename = "vote:accepted")]
    VoteAccepted {
        /// The vote.
        vote: Vote,
    },
    /// A vote was refused.
    #[serde(rename = "vote:rejected")]
    #[serde(rename_all = "camelCase")]
    VoteRejected {
        /// The poll voted on.
        poll_id: Uuid,
        /// The participant whose vote was refused.
        participant_id: Uuid,
        /// The contract error code of the refusal.
        reason: String,
        /// Human-readable explanation.
        message: String,
    },
    /// A poll's tally changed (coalesced, at most 100 ms behind the votes).
    #[serde(rename = "results:updated")]
    ResultsUpdated {
        /// The tally.
        results: Results,
    },
    /// Someone joined with the code.
    #[serde(rename = "participant:joined")]
    ParticipantJoined {
        /// The new participant.
        participant: Participant,
    },
    /// A participant's last connection closed.
    #[serde(rename = "participant:disconnected")]
    #[serde(rename_all = "camelCase")]
    ParticipantDisconnected {
        /// Who left.
        participant_id: Uuid,
        /// Their name, so presenters need not look it up.
        display_name: String,
    },
}

/// Who may receive an event: the contract's "goes to" column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every connection of the session.
    Room,
    /// Presenter connections only.
    Presenters,
    /// The participant's own connections and the presenters.
    ParticipantAndPresenters(Uuid),
    /// The participant's own connections only.
    Participant(Uuid),
}

impl Audience {
    /// Whether a connection with this role (and participant id) may see the event.
    pub fn includes(self, presenter: bool, participant: Option<Uuid>) -> bool {
        match self {
            Audience::Room => true,
            Audience::Presenters => presenter,
            Audience::ParticipantAndPresenters(p) => presenter || participant == Some(p),
            Audience::Participant(p) => participant == Some(p),
        }
    }
}

impl DomainEvent {
    /// The contract's `eventType` string.
    pub fn event_type(&self) -> &'static str {
        match self {
            DomainEvent::SessionCreated { .. } => "session:created",
            DomainEvent::SessionStarted { .. } => "session:started",
            DomainEvent::SessionEnded { .. } => "session:ended",
            DomainEvent::PollCreated { .. } => "poll:created",
            DomainEvent::PollActivated { .. } => "poll:activated",
            DomainEvent::PollClosed { .. } => "poll:closed",
            DomainEvent::VoteAccepted { .. } => "vote:accepted",
            DomainEvent::VoteRejected { .. } => "vote:rejected",
            DomainEvent::ResultsUpdated { .. } => "results:updated",
            DomainEvent::ParticipantJoined { .. } => "participant:joined",
            DomainEvent::ParticipantDisconnected { .. } => "participant:disconnected",
        }
    }

    /// Who may receive this event, live or in a replay.
    pub fn audience(&self) -> Audience {
        match self {
            DomainEvent::VoteAccepted { vote } => {
                Audience::ParticipantAndPresenters(vote.participant_id)
            }
            DomainEvent::VoteRejected { participant_id, .. } => {
                Audience::Participant(*participant_id)
            }
            DomainEvent::ParticipantJoined { .. } | DomainEvent::ParticipantDisconnected { .. } => {
                Audience::Presenters
            }
            _ => Audience::Room,
        }
    }
}

/// A domain event at its place in a session's stream: what the stream stores and
/// what an edge turns into an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionEvent {
    /// The session whose stream holds the event.
    pub session_id: Uuid,
    /// 1-based position in that stream; consecutive, assigned at commit.
    pub position: u64,
    /// When the change happened (not when it was delivered).
    pub timestamp: Timestamp,
    /// The event.
    pub event: DomainEvent,
}

impl SessionEvent {
    /// The event's id, as clients see it.
    pub fn event_id(&self) -> EventId {
        EventId::new(self.session_id, self.position)
    }
}
