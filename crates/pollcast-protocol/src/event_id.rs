//! Event ids: opaque to clients, ordered within a session, equal on every node.
//!
//! An event's identity is its session and its position in that session's stream.
//! Both are folded into a UUID-shaped value (version 8, "custom"):
//!
//! ```text
//!  48 bits position | 4 bits version (8) | 74 random bits of the session id (+ variant)
//! ```
//!
//! Because the position is the most significant part, a later event of a session has
//! a larger id, as a number and as a lowercase hex string. Because the low bits come
//! from the session id, ids of different sessions differ, and an edge can map an id a
//! client sends back to a stream position without asking anyone, and tell whether the
//! id belongs to the session at all.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

const POSITION_SHIFT: u32 = 80;
const VERSION_MASK: u128 = 0xF << 76;
const VERSION_8: u128 = 0x8 << 76;
const SESSION_BITS: u128 = (1 << 80) - 1;

/// Largest position an event id can carry (2^48 - 1).
pub const MAX_POSITION: u64 = (1 << 48) - 1;

/// Identity of one event in one session's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

/// Why a string is not an event id of the session it was offered for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventIdError {
    /// Not a UUID at all, or not one pollcast made.
    #[error("not a pollcast event id")]
    Malformed,
    /// A pollcast event id, but of another session.
    #[error("event id belongs to another session")]
    OtherSession,
}

impl EventId {
    /// The id of the event at `position` (1-based) in `session`'s stream.
    ///
    /// Positions above [`MAX_POSITION`] are clamped; at a million events a second a
    /// session would need nine years to get there.
    pub fn new(session: Uuid, position: u64) -> Self {
        let position = u128::from(position.min(MAX_POSITION));
        let low = (session.as_u128() & SESSION_BITS & !VERSION_MASK) | VERSION_8;
        Self(Uuid::from_u128((position << POSITION_SHIFT) | low))
    }

    /// The stream position this id stands for, if it is an id of `session`.
    pub fn position_in(self, session: Uuid) -> Result<u64, EventIdError> {
        let raw = self.0.as_u128();
        if raw & VERSION_MASK != VERSION_8 {
            return Err(EventIdError::Malformed);
        }
        let expected = EventId::new(session, 0).0.as_u128();
        if raw & SESSION_BITS != expected {
            return Err(EventIdError::OtherSession);
        }
        // The shift leaves at most 48 bits, so the conversion cannot fail.
        u64::try_from(raw >> POSITION_SHIFT).map_err(|_| EventIdError::Malformed)
    }

    /// The id as a UUID.
    pub fn as_uuid(self) -> Uuid {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for EventId {
    type Err = EventIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uuid = Uuid::parse_str(s).map_err(|_| EventIdError::Malformed)?;
        if uuid.as_u128() & VERSION_MASK != VERSION_8 {
            return Err(EventIdError::Malformed);
        }
        Ok(Self(uuid))
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_position_within_its_session() {
        let session = Uuid::now_v7();
        for position in [1, 2, 255, 1 << 20, MAX_POSITION] {
            let id = EventId::new(session, position);
            let parsed: EventId = id.to_string().parse().expect("own ids parse");
            assert_eq!(parsed.position_in(session), Ok(position));
        }
    }

    #[test]
    fn later_positions_sort_later_as_strings() {
        let session = Uuid::now_v7();
        let ids: Vec<String> = (1..300)
            .map(|p| EventId::new(session, p).to_string())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn an_id_of_another_session_is_recognised() {
        let id = EventId::new(Uuid::now_v7(), 7);
        assert_eq!(
            id.position_in(Uuid::now_v7()),
            Err(EventIdError::OtherSession)
        );
    }

    #[test]
    fn ordinary_uuids_are_not_event_ids() {
        let text = Uuid::now_v7().to_string();
        assert_eq!(text.parse::<EventId>(), Err(EventIdError::Malformed));
        assert_eq!("garbage".parse::<EventId>(), Err(EventIdError::Malformed));
    }
}
