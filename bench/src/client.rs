//! A lean WebSocket client for the load generator: a hand-made upgrade on a raw
//! TCP socket, then fastwebsockets, and only the envelope's head decoded. The
//! generator shares the machine with the server it measures, so every
//! microsecond it spends per frame is one the server does not get.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use pollcast_protocol::{EventId, Timestamp, WireFormat};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// A connected client.
pub type Socket = WebSocket<BufReader<TcpStream>>;

/// The part of an envelope the generator needs; the payload is skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Head {
    /// `null` for connection frames.
    pub event_id: Option<EventId>,
    /// The contract's event type.
    pub event_type: String,
    /// Commit time (domain events) or send time (connection frames).
    pub timestamp: Timestamp,
    /// Only `connection:reconnected` has a `recovered` that matters here.
    #[serde(default)]
    pub payload: Option<PayloadHead>,
}

/// The payload fields the generator looks at.
#[derive(Deserialize, Default)]
pub struct PayloadHead {
    /// `connection:reconnected`: whether the history reached the asked position.
    pub recovered: Option<bool>,
}

/// How envelopes travel on the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// pollcast's contract: `/ws`, one envelope per frame.
    Pollcast,
    /// Socket.IO v4 over its WebSocket transport (`bench/peers/node`, for side-by-side
    /// runs): `/socket.io/`, each envelope the argument of a `pollcast` event
    /// (`42["pollcast",{…}]`), Engine.IO pings answered.
    SocketIo,
}

/// What precedes the envelope in a Socket.IO event frame.
const SOCKET_IO_EVENT: &[u8] = br#"42["pollcast","#;

/// One frame from the server.
pub enum Incoming {
    /// An envelope and its size on the wire.
    Envelope(Head),
    /// Anything that is not an envelope (a WebSocket ping, say).
    Other,
    /// The server closed, with this code.
    Closed(Option<u16>),
}

/// Opens `ws://{server}/ws?{query}` (or Socket.IO's endpoint) from `source` (any
/// 127.0.0.0/8 address, so one generator can hold more connections than one
/// address has ports).
pub async fn connect(
    server: SocketAddr,
    source: IpAddr,
    query: &str,
    wait: Duration,
    protocol: Protocol,
) -> anyhow::Result<Socket> {
    let path = match protocol {
        Protocol::Pollcast => "/ws?",
        Protocol::SocketIo => "/socket.io/?EIO=4&transport=websocket&",
    };
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = tokio::time::timeout(wait, socket.connect(server)).await??;
    tcp.set_nodelay(true)?;
    let mut stream = BufReader::new(tcp);
    let request = format!(
        "GET {path}{query} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.get_mut().write_all(request.as_bytes()).await?;
    // Read the answer's head line by line, so the first frames, which may arrive
    // in the same segment, stay in the buffer for the WebSocket reader.
    let mut status = String::new();
    tokio::time::timeout(wait, stream.read_line(&mut status)).await??;
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 101"),
        "upgrade refused: {status}"
    );
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(wait, stream.read_line(&mut line)).await??;
        anyhow::ensure!(n > 0, "closed during the upgrade");
        if line == "\r\n" {
            break;
        }
    }
    let mut ws = WebSocket::after_handshake(stream, Role::Client);
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    if protocol == Protocol::SocketIo {
        // Engine.IO's open packet, then join the default namespace.
        let open = tokio::time::timeout(wait, ws.read_frame()).await??;
        anyhow::ensure!(
            open.payload.first() == Some(&b'0'),
            "no Engine.IO open packet"
        );
        ws.write_frame(Frame::text(Payload::Borrowed(b"40")))
            .await?;
    }
    Ok(ws)
}

/// Reads the next frame. Answers `heartbeat:ping` (and Engine.IO's ping), so long
/// runs stay connected.
pub async fn next(
    ws: &mut Socket,
    format: WireFormat,
    protocol: Protocol,
) -> anyhow::Result<Incoming> {
    let frame = ws.read_frame().await?;
    if protocol == Protocol::SocketIo && frame.opcode == OpCode::Text {
        let text: &[u8] = &frame.payload;
        if text == b"2" {
            ws.write_frame(Frame::text(Payload::Borrowed(b"3"))).await?;
            return Ok(Incoming::Other);
        }
        return match text.strip_prefix(SOCKET_IO_EVENT) {
            Some(rest) => {
                let envelope = rest.strip_suffix(b"]").unwrap_or(rest);
                Ok(Incoming::Envelope(serde_json::from_slice(envelope)?))
            }
            // Namespace and other Engine.IO packets.
            None => Ok(Incoming::Other),
        };
    }
    match frame.opcode {
        OpCode::Close => {
            let code = (frame.payload.len() >= 2)
                .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
            Ok(Incoming::Closed(code))
        }
        OpCode::Text | OpCode::Binary => {
            let head: Head = format.decode(&frame.payload)?;
            if head.event_type == "heartbeat:ping" {
                let pong = br#"{"eventType":"heartbeat:pong"}"#;
                ws.write_frame(Frame::text(Payload::Borrowed(pong))).await?;
                return Ok(Incoming::Other);
            }
            Ok(Incoming::Envelope(head))
        }
        _ => Ok(Incoming::Other),
    }
}
