//! Why the edge refuses or closes a connection: the one map from a reason to its
//! close code and its `connection:error` code (the twin of the API's error map).

use pollcast_stream::StreamError;

/// A reason to end a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Missing or malformed query parameters.
    BadRequest(String),
    /// Token missing, forged or expired.
    Unauthorized(String),
    /// The token belongs to another session, or the page's `Origin` is not on the
    /// allow-list.
    Forbidden(String),
    /// No such session.
    SessionNotFound,
    /// No `heartbeat:pong` within the timeout.
    HeartbeatTimeout,
    /// Per-participant or per-node connection limit.
    TooManyConnections,
    /// The client stopped reading and its send queue overflowed.
    SlowConsumer,
    /// The node is shutting down.
    GoingAway,
    /// A client frame over the size limit.
    MessageTooLarge,
    /// The client broke the WebSocket protocol (RFC 6455 §7.4.1: 1002): reserved
    /// bits or opcodes, an unmasked frame, a fragmented or oversized control frame,
    /// a malformed close frame.
    ProtocolError(String),
    /// A text message that is not UTF-8 (RFC 6455: 1007).
    InvalidPayload(String),
    /// The event stream cannot be reached: the client should come back (with
    /// `lastEventId`) a little later. Not in the contract's table, which is silent
    /// on outages; 1013 is RFC 6455's "try again later".
    Unavailable(String),
}

impl CloseReason {
    /// The WebSocket close code.
    pub fn status(&self) -> u16 {
        match self {
            CloseReason::BadRequest(_) => 4400,
            CloseReason::Unauthorized(_) => 4401,
            CloseReason::Forbidden(_) => 4403,
            CloseReason::SessionNotFound => 4404,
            CloseReason::HeartbeatTimeout => 4408,
            CloseReason::TooManyConnections => 4429,
            CloseReason::SlowConsumer => 4500,
            CloseReason::GoingAway => 1001,
            CloseReason::MessageTooLarge => 1009,
            CloseReason::ProtocolError(_) => 1002,
            CloseReason::InvalidPayload(_) => 1007,
            CloseReason::Unavailable(_) => 1013,
        }
    }

    /// The `connection:error` code (also the close frame's reason text).
    pub fn code(&self) -> &'static str {
        match self {
            CloseReason::BadRequest(_) => "bad_request",
            CloseReason::Unauthorized(_) => "unauthorized",
            CloseReason::Forbidden(_) => "forbidden",
            CloseReason::SessionNotFound => "session_not_found",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::TooManyConnections => "too_many_connections",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::GoingAway => "going_away",
            CloseReason::MessageTooLarge => "message_too_large",
            CloseReason::ProtocolError(_) => "protocol_error",
            CloseReason::InvalidPayload(_) => "invalid_payload",
            CloseReason::Unavailable(_) => "unavailable",
        }
    }

    /// The `connection:error` message, for people.
    pub fn message(&self) -> String {
        match self {
            CloseReason::BadRequest(why)
            | CloseReason::Unauthorized(why)
            | CloseReason::Forbidden(why)
            | CloseReason::ProtocolError(why)
            | CloseReason::InvalidPayload(why) => why.clone(),
            CloseReason::SessionNotFound => "no such session".into(),
            CloseReason::HeartbeatTimeout => "no heartbeat:pong in time".into(),
            CloseReason::TooManyConnections => "connection limit reached".into(),
            CloseReason::SlowConsumer => "send queue overflowed; reconnect with lastEventId".into(),
            CloseReason::GoingAway => "server shutting down; reconnect with lastEventId".into(),
            CloseReason::MessageTooLarge => "client frames are limited to 4 KiB".into(),
            CloseReason::Unavailable(why) => {
                format!("{why}; reconnect with lastEventId in a moment")
            }
        }
    }
}

impl From<StreamError> for CloseReason {
    fn from(err: StreamError) -> Self {
        CloseReason::Unavailable(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_code_and_a_message() {
        let all = [
            CloseReason::BadRequest("x".into()),
            CloseReason::Unauthorized("x".into()),
            CloseReason::Forbidden("x".into()),
            CloseReason::SessionNotFound,
            CloseReason::HeartbeatTimeout,
            CloseReason::TooManyConnections,
            CloseReason::SlowConsumer,
            CloseReason::GoingAway,
            CloseReason::MessageTooLarge,
            CloseReason::ProtocolError("x".into()),
            CloseReason::InvalidPayload("x".into()),
            CloseReason::Unavailable("x".into()),
        ];
        let statuses: std::collections::HashSet<u16> = all.iter().map(|r| r.status()).collect();
        let codes: std::collections::HashSet<&str> = all.iter().map(|r| r.code()).collect();
        assert_eq!(statuses.len(), all.len());
        assert_eq!(codes.len(), all.len());
        assert!(all.iter().all(|r| !r.message().is_empty()));
        // Close frame reasons are limited to 123 bytes.
        assert!(all.iter().all(|r| r.code().len() <= 123));
    }
}
