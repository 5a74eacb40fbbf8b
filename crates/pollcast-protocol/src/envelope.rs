//! The envelope around every server frame.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{EventId, SessionEvent, Timestamp};

/// `{eventId, eventType, timestamp, sessionId, payload}`; `E` supplies `eventType`
/// and `payload` (a [`crate::DomainEvent`] for stream events).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<E> {
    /// Stream position as an id; `null` for connection frames.
    pub event_id: Option<EventId>,
    /// When the event happened.
    pub timestamp: Timestamp,
    /// The session the frame belongs to.
    pub session_id: Uuid,
    /// `eventType` and `payload`.
    #[serde(flatten)]
    pub event: E,
}

impl<'a> From<&'a SessionEvent> for Envelope<&'a crate::DomainEvent> {
    fn from(stored: &'a SessionEvent) -> Self {
        Envelope {
            event_id: Some(stored.event_id()),
            timestamp: stored.timestamp,
            session_id: stored.session_id,
            event: &stored.event,
        }
    }
}
