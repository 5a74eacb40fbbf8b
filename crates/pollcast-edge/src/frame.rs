//! Frames as bytes: each event encoded at most once per wire format, shared by
//! every connection that receives it.

use std::sync::{Arc, OnceLock};

use pollcast_protocol::{ConnectionEvent, Envelope, SessionEvent, Timestamp, WireFormat};
use uuid::Uuid;

/// A stream event with its encodings, made on first use and then shared.
pub struct EncodedEvent {
    /// The event.
    pub event: Arc<SessionEvent>,
    json: OnceLock<Option<Vec<u8>>>,
    msgpack: OnceLock<Option<Vec<u8>>>,
}

impl EncodedEvent {
    /// Wraps an event; nothing is encoded yet.
    pub fn new(event: Arc<SessionEvent>) -> Self {
        Self {
            event,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// The envelope in `format`, encoded by the first caller. `None` only if the
    /// event cannot be encoded at all (logged once).
    pub fn bytes(&self, format: WireFormat) -> Option<&[u8]> {
        let cell = match format {
            WireFormat::Json => &self.json,
            WireFormat::MessagePack => &self.msgpack,
        };
        cell.get_or_init(|| {
            metrics::counter!("pollcast_edge_event_encodings_total").increment(1);
            format
                .encode(&Envelope::from(&*self.event))
                .map_err(|err| {
                    tracing::error!(error = %err, position = self.event.position, "event cannot be encoded");
                })
                .ok()
        })
        .as_deref()
    }

    /// Stream position of the event.
    pub fn position(&self) -> u64 {
        self.event.position
    }
}

/// Encodes a connection frame (not replayable, `eventId: null`).
pub fn connection_frame(format: WireFormat, session_id: Uuid, event: ConnectionEvent) -> Vec<u8> {
    let envelope = Envelope {
        event_id: None,
        timestamp: Timestamp::now(),
        session_id,
        event,
    };
    // Connection frames are small structs of ids, strings and numbers: encoding
    // cannot fail, but an empty frame is better than a panic if it ever did.
    format.encode(&envelope).unwrap_or_default()
}
