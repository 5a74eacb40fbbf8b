//! Connection frames (server → client, not replayable, `eventId: null`) and the
//! frames a client may send.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{EventId, Role};

/// A frame about the connection itself rather than the session's stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "eventType", content = "payload")]
pub enum ConnectionEvent {
    /// First frame after the upgrade.
    #[serde(rename = "connection:established")]
    #[serde(rename_all = "camelCase")]
    Established {
        /// This connection's id (for support and logs).
        connection_id: Uuid,
        /// The token's role.
        role: Role,
        /// The participant, `null` for presenters.
        participant_id: Option<Uuid>,
        /// Newest event of the session when the connection was established.
        last_event_id: Option<EventId>,
        /// How often `heartbeat:ping` comes.
        heartbeat_interval_ms: u64,
    },
    /// End of a replay asked for with `lastEventId` or `resume`.
    #[serde(rename = "connection:reconnected")]
    #[serde(rename_all = "camelCase")]
    Reconnected {
        /// The position the client asked to resume after.
        from_event_id: EventId,
        /// How many events the replay sent.
        replayed: u64,
        /// `false`: history no longer reaches `fromEventId`; reload state over REST.
        recovered: bool,
    },
    /// Heartbeat; answer with `heartbeat:pong`.
    #[serde(rename = "heartbeat:ping")]
    Ping {},
    /// Sent before the server refuses or drops a connection, or for a bad client frame.
    #[serde(rename = "connection:error")]
    Error {
        /// Machine-readable code (`unauthorized`, `slow_consumer`, `bad_frame`, …).
        code: String,
        /// Explanation for people.
        message: String,
    },
}

/// What a client may send (JSON text frames).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "eventType")]
pub enum ClientFrame {
    /// Answer to `heartbeat:ping`.
    #[serde(rename = "heartbeat:pong")]
    Pong,
    /// Replay everything after `lastEventId` on this connection.
    #[serde(rename = "resume")]
    #[serde(rename_all = "camelCase")]
    Resume {
        /// The last event the client has.
        last_event_id: String,
    },
}

/// What an edge tells the domain about a participant's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceSignal {
    /// The session.
    pub session_id: Uuid,
    /// The participant.
    pub participant_id: Uuid,
    /// The connection the signal is about.
    pub connection_id: Uuid,
    /// What happened.
    pub kind: PresenceKind,
    /// When.
    pub at: crate::Timestamp,
}

/// Kinds of presence signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PresenceKind {
    /// A connection opened.
    Connected,
    /// A heartbeat was answered.
    Seen,
    /// A connection closed, for whatever reason.
    Disconnected,
}
