//! The read side of a connection: client frames in, [`Inbound`] messages out to the
//! connection task, which owns all writing.

use fastwebsockets::{Frame, OpCode, WebSocketError, WebSocketRead};
use pollcast_protocol::ClientFrame;

use crate::close::CloseReason;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

/// Largest client message accepted (the contract's 4 KiB); larger closes with 1009.
pub const MAX_CLIENT_MESSAGE: usize = 4096;

/// What the reader tells the connection task.
#[derive(Debug)]
pub enum Inbound {
    /// `heartbeat:pong`.
    Pong,
    /// `resume` with the id as sent.
    Resume(String),
    /// A frame the contract does not know; the connection stays open.
    BadFrame(String),
    /// A message over [`MAX_CLIENT_MESSAGE`].
    TooLarge,
    /// The client broke the protocol; the connection must close for this reason.
    Violation(CloseReason),
    /// A control frame the protocol obliges us to send (pong to a WebSocket ping,
    /// the echo of a close).
    Control(OpCode, Vec<u8>),
    /// The client closed or the connection broke.
    Closed,
}

/// Reads until the connection ends, reporting to `tx`.
pub async fn run<S: AsyncRead + Unpin>(mut ws: WebSocketRead<S>, tx: mpsc::Sender<Inbound>) {
    // The per-frame limit stops a single oversized frame before it is buffered;
    // the message limit below covers fragmented ones.
    ws.set_max_message_size(MAX_CLIENT_MESSAGE + 1);
    // Pings come to us, so that an unmasked one is refused like any other frame.
    ws.set_auto_pong(false);
    let mut message: Vec<u8> = Vec::new();
    let mut message_is_text = false;
    loop {
        let mut obliged = |frame: Frame<'_>| {
            let tx = tx.clone();
            let (opcode, payload) = (frame.opcode, frame.payload.to_vec());
            async move {
                tx.send(Inbound::Control(opcode, payload))
                    .await
                    .map_err(|_| "connection task gone")
            }
        };
        let mut frame = match ws.read_frame(&mut obliged).await {
            Ok(frame) => frame,
            Err(err) => {
                tracing::debug!(error = %err, "client read ended");
                let _ = tx.send(ended_by(err)).await;
                return;
            }
        };
        if !masked(&mut frame) {
            let reason = CloseReason::ProtocolError("client frames must be masked".into());
            let _ = tx.send(Inbound::Violation(reason)).await;
            return;
        }
        let inbound = match frame.opcode {
            OpCode::Close => Some(Inbound::Closed),
            OpCode::Ping => Some(Inbound::Control(OpCode::Pong, frame.payload.to_vec())),
            OpCode::Pong => None,
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                if frame.opcode != OpCode::Continuation {
                    message.clear();
                    message_is_text = frame.opcode == OpCode::Text;
                }
                if message.len() + frame.payload.len() > MAX_CLIENT_MESSAGE {
                    let _ = tx.send(Inbound::TooLarge).await;
                    return;
                }
                message.extend_from_slice(&frame.payload);
                if frame.fin && message_is_text && std::str::from_utf8(&message).is_err() {
                    let reason = CloseReason::InvalidPayload("text messages must be UTF-8".into());
                    let _ = tx.send(Inbound::Violation(reason)).await;
                    return;
                }
                frame.fin.then(|| decode(message_is_text, &message))
            }
        };
        if let Some(inbound) = inbound {
            let closed = matches!(inbound, Inbound::Closed);
            if tx.send(inbound).await.is_err() || closed {
                return;
            }
        }
    }
}

/// What a read error means for the connection: RFC 6455 wants protocol errors
/// answered with a close frame (1002, or 1007 for text that is not UTF-8); a
/// broken socket has nobody left to answer.
fn ended_by(err: WebSocketError) -> Inbound {
    let violation = |why: &str| Inbound::Violation(CloseReason::ProtocolError(why.into()));
    match err {
        WebSocketError::FrameTooLarge => Inbound::TooLarge,
        WebSocketError::InvalidUTF8 => {
            Inbound::Violation(CloseReason::InvalidPayload("text must be UTF-8".into()))
        }
        WebSocketError::ReservedBitsNotZero => {
            violation("reserved bits set; no extension was negotiated")
        }
        WebSocketError::InvalidValue => violation("reserved opcode"),
        WebSocketError::ControlFrameFragmented => {
            violation("control frames must not be fragmented")
        }
        WebSocketError::PingFrameTooLarge => violation("control frames carry at most 125 bytes"),
        WebSocketError::InvalidCloseFrame => violation("malformed close frame"),
        WebSocketError::InvalidFragment | WebSocketError::InvalidContinuationFrame => {
            violation("continuation frame out of place")
        }
        // fastwebsockets has already answered a bad close code with 1002.
        _ => Inbound::Closed,
    }
}

/// Whether a client frame carried a masking key (RFC 6455 §5.1: a server must
/// fail the connection on one that did not). The key is only visible in the
/// frame's header as fastwebsockets would write it back.
fn masked(frame: &mut Frame<'_>) -> bool {
    let mut head = [0u8; 14];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

fn decode(is_text: bool, message: &[u8]) -> Inbound {
    if !is_text {
        return Inbound::BadFrame("client frames are JSON text".into());
    }
    match serde_json::from_slice::<ClientFrame>(message) {
        Ok(ClientFrame::Pong) => Inbound::Pong,
        Ok(ClientFrame::Resume { last_event_id }) => Inbound::Resume(last_event_id),
        Err(err) => Inbound::BadFrame(format!("unknown client frame: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_frames_decode() {
        assert!(matches!(
            decode(true, br#"{"eventType":"heartbeat:pong"}"#),
            Inbound::Pong
        ));
        assert!(matches!(
            decode(true, br#"{"eventType":"resume","lastEventId":"x"}"#),
            Inbound::Resume(id) if id == "x"
        ));
    }

    #[test]
    fn anything_else_is_a_bad_frame() {
        for junk in [
            &b"{}"[..],
            b"[]",
            b"pong",
            br#"{"eventType":"resume"}"#,
            br#"{"eventType":"vote"}"#,
            b"\xff",
        ] {
            assert!(
                matches!(decode(true, junk), Inbound::BadFrame(_)),
                "{junk:?}"
            );
        }
        assert!(matches!(
            decode(false, br#"{"eventType":"heartbeat:pong"}"#),
            Inbound::BadFrame(_)
        ));
    }
}
