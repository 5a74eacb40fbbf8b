//! The two wire formats: JSON text and MessagePack maps with the same field names.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// How frames are encoded for one connection (or for the stream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// UTF-8 JSON, sent as text frames.
    #[default]
    Json,
    /// MessagePack maps keyed by field name, sent as binary frames.
    MessagePack,
}

/// Encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// JSON encoding or decoding failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// MessagePack encoding failed.
    #[error("msgpack encode: {0}")]
    MessagePackEncode(#[from] rmp_serde::encode::Error),
    /// MessagePack decoding failed.
    #[error("msgpack decode: {0}")]
    MessagePackDecode(#[from] rmp_serde::decode::Error),
}

impl WireFormat {
    /// Encodes a value. MessagePack uses named fields (maps), never positional
    /// arrays, and the human-readable forms of values (ids and timestamps as strings,
    /// not raw bytes), so both formats carry the same envelope.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        Ok(match self {
            WireFormat::Json => serde_json::to_vec(value)?,
            WireFormat::MessagePack => {
                let mut bytes = Vec::with_capacity(256);
                let mut serializer = rmp_serde::Serializer::new(&mut bytes)
                    .with_struct_map()
                    .with_human_readable();
                value.serialize(&mut serializer)?;
                bytes
            }
        })
    }

    /// Decodes a value encoded by [`WireFormat::encode`].
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(match self {
            WireFormat::Json => serde_json::from_slice(bytes)?,
            WireFormat::MessagePack => {
                let mut deserializer =
                    rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
                T::deserialize(&mut deserializer)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::{DomainEvent, Envelope, SessionEvent, Timestamp};

    fn sample() -> SessionEvent {
        SessionEvent {
            session_id: Uuid::now_v7(),
            position: 3,
            timestamp: Timestamp::now(),
            event: DomainEvent::ParticipantDisconnected {
                participant_id: Uuid::now_v7(),
                display_name: "Ada".into(),
            },
        }
    }

    #[test]
    fn json_envelope_has_the_contract_fields() {
        let stored = sample();
        let bytes = WireFormat::Json
            .encode(&Envelope::from(&stored))
            .expect("encodes");
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(value["eventType"], "participant:disconnected");
        assert_eq!(value["eventId"], stored.event_id().to_string());
        assert_eq!(value["sessionId"], stored.session_id.to_string());
        assert_eq!(value["payload"]["displayName"], "Ada");
        assert!(
            value["timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }

    #[test]
    fn msgpack_carries_ids_as_strings_like_json() {
        let stored = sample();
        let bytes = WireFormat::MessagePack
            .encode(&Envelope::from(&stored))
            .expect("encodes");
        // Decoding into a self-describing JSON value fails on any raw byte string.
        let value: serde_json::Value = rmp_serde::from_slice(&bytes).expect("no binary values");
        let json: serde_json::Value = serde_json::from_slice(
            &WireFormat::Json
                .encode(&Envelope::from(&stored))
                .expect("json"),
        )
        .expect("json");
        assert_eq!(value, json);
    }

    #[test]
    fn msgpack_envelope_decodes_to_the_same_event() {
        let stored = sample();
        for format in [WireFormat::Json, WireFormat::MessagePack] {
            let bytes = format.encode(&Envelope::from(&stored)).expect("encodes");
            let back: Envelope<DomainEvent> = format.decode(&bytes).expect("decodes");
            assert_eq!(back.event, stored.event);
            assert_eq!(back.event_id, Some(stored.event_id()));
        }
    }
}
