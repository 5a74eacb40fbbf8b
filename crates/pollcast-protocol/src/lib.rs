//! Wire types of pollcast: the resources of the REST API, the domain events a
//! session's stream carries, the envelope every WebSocket frame uses and the codecs
//! that put it on the wire. Nothing here does I/O, so every other crate (and every
//! client written in Rust) can depend on it.

pub mod codec;
pub mod connection;
pub mod envelope;
pub mod error;
pub mod event;
pub mod event_id;
pub mod origin;
pub mod resources;
pub mod time;
pub mod token;

pub use codec::{CodecError, WireFormat};
pub use connection::{ClientFrame, ConnectionEvent, PresenceKind, PresenceSignal};
pub use envelope::Envelope;
pub use error::{ErrorBody, ErrorDetail};
pub use event::{Audience, DomainEvent, SessionEvent};
pub use event_id::EventId;
pub use origin::Origin;
pub use resources::{
    OptionResult, Participant, Poll, PollKind, PollOption, PollStatus, Results, Role, Session,
    SessionStatus, Vote,
};
pub use time::Timestamp;
