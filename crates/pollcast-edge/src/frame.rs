//! Frames as bytes: each event encoded, and framed as a WebSocket message, at most
//! once per wire format, and the same bytes written to every connection that
//! receives it (server frames are not masked, so they are identical for all).

use std::sync::{Arc, OnceLock};

use fastwebsockets::{Frame, OpCode, Payload};
use pollcast_protocol::{ConnectionEvent, Envelope, SessionEvent, Timestamp, WireFormat};
use uuid::Uuid;

/// A whole WebSocket frame, header and payload, as written to the socket.
pub struct Framed {
    bytes: Vec<u8>,
    /// Where the payload starts.
    head: usize,
}

impl Framed {
    /// A final frame of `opcode` carrying `payload`.
    pub fn new(opcode: OpCode, payload: &[u8]) -> Self {
        Self::of(Frame::new(true, opcode, None, Payload::Borrowed(payload)))
    }

    /// The bytes of a frame fastwebsockets built (a close frame, say).
    pub fn of(mut frame: Frame<'_>) -> Self {
        let payload_len = frame.payload.len();
        let mut bytes = Vec::new();
        let len = frame.write(&mut bytes).len();
        bytes.truncate(len);
        Self {
            head: len - payload_len,
            bytes,
        }
    }

    /// A data frame in `format`: text for JSON, binary for MessagePack.
    pub fn data(format: WireFormat, payload: &[u8]) -> Self {
        let opcode = match format {
            WireFormat::Json => OpCode::Text,
            WireFormat::MessagePack => OpCode::Binary,
        };
        Self::new(opcode, payload)
    }

    /// The frame as written.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The message inside.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.head..]
    }
}

/// A stream event with its frames, made on first use and then shared.
pub struct EncodedEvent {
    /// The event.
    pub event: Arc<SessionEvent>,
    json: OnceLock<Option<Framed>>,
    msgpack: OnceLock<Option<Framed>>,
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
        self.framed(format).map(Framed::payload)
    }

    /// The envelope in `format` as a whole WebSocket frame.
    pub fn framed(&self, format: WireFormat) -> Option<&Framed> {
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
                .map(|payload| Framed::data(format, &payload))
        })
        .as_ref()
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
