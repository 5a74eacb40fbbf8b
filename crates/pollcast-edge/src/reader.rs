//! The read side of a connection: client frames in, [`Inbound`] messages out to the
//! connection task, which owns all writing.

use fastwebsockets::{Frame, OpCode, WebSocketError, WebSocketRead};
use pollcast_protocol::ClientFrame;
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
        let frame = match ws.read_frame(&mut obliged).await {
            Ok(frame) => frame,
            Err(WebSocketError::FrameTooLarge) => {
                let _ = tx.send(Inbound::TooLarge).await;
                return;
            }
            Err(err) => {
                tracing::debug!(error = %err, "client read ended");
                let _ = tx.send(Inbound::Closed).await;
                return;
            }
        };
        let inbound = match frame.opcode {
            OpCode::Close => Some(Inbound::Closed),
            OpCode::Ping | OpCode::Pong => None,
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
