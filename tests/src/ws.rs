//! A WebSocket client for the contract's `/ws`, on tokio-tungstenite (an
//! implementation independent of the server's), decoding JSON and MessagePack
//! frames into the same JSON values so tests read the same in both formats.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How long any single wait for a frame may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// What arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An envelope (text frames parsed as JSON, binary ones as MessagePack).
    Frame(Value),
    /// A close frame with its code.
    Close(u16),
    /// The connection ended without a close frame.
    Ended,
}

/// Wire format a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `format=json` (text frames).
    Json,
    /// `format=msgpack` (binary frames).
    MessagePack,
}

impl Format {
    /// The query value.
    pub fn as_query(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::MessagePack => "msgpack",
        }
    }
}

/// One client connection.
pub struct WsClient {
    socket: WebSocketStream<TcpStream>,
    /// Whether binary (MessagePack) or text frames are expected.
    pub format: Format,
    /// Answer `heartbeat:ping` while waiting for envelopes (on by default).
    pub auto_pong: bool,
}

impl WsClient {
    /// Connects to `ws://{addr}/ws?{query}`.
    pub async fn connect(addr: std::net::SocketAddr, query: &str) -> WsClient {
        Self::connect_with_buffer(addr, query, None).await
    }

    /// Connects with the socket's receive buffer set to `recv_buffer` bytes, so a
    /// client that stops reading stalls the server's writes quickly.
    pub async fn connect_with_buffer(
        addr: std::net::SocketAddr,
        query: &str,
        recv_buffer: Option<u32>,
    ) -> WsClient {
        Self::open(addr, query, recv_buffer, None).await
    }

    /// Connects as a browser page on `origin` would (with an `Origin` header).
    pub async fn connect_from(addr: std::net::SocketAddr, query: &str, origin: &str) -> WsClient {
        Self::open(addr, query, None, Some(origin)).await
    }

    async fn open(
        addr: std::net::SocketAddr,
        query: &str,
        recv_buffer: Option<u32>,
        origin: Option<&str>,
    ) -> WsClient {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let tcp = socket.connect(addr).await.expect("tcp connect");
        let mut request = format!("ws://{addr}/ws?{query}")
            .into_client_request()
            .expect("request");
        if let Some(origin) = origin {
            let value = origin.parse().expect("origin header value");
            request.headers_mut().insert("origin", value);
        }
        let (socket, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .expect("websocket handshake");
        let format = if query.contains("format=msgpack") {
            Format::MessagePack
        } else {
            Format::Json
        };
        WsClient {
            socket,
            format,
            auto_pong: true,
        }
    }

    /// The next frame, close or end; fails the test after [`WAIT`].
    pub async fn next(&mut self) -> Incoming {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a frame within the wait");
            let message = match message {
                None | Some(Err(_)) => return Incoming::Ended,
                Some(Ok(message)) => message,
            };
            match message {
                Message::Text(text) => {
                    assert_eq!(
                        self.format,
                        Format::Json,
                        "text frame on a msgpack connection"
                    );
                    return Incoming::Frame(serde_json::from_str(&text).expect("JSON envelope"));
                }
                Message::Binary(bytes) => {
                    assert_eq!(
                        self.format,
                        Format::MessagePack,
                        "binary frame on a json connection"
                    );
                    return Incoming::Frame(
                        rmp_serde::from_slice(&bytes).expect("MessagePack envelope"),
                    );
                }
                Message::Close(frame) => {
                    return Incoming::Close(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// The next envelope, skipping heartbeat pings; fails on a close.
    pub async fn envelope(&mut self) -> Value {
        loop {
            match self.next().await {
                Incoming::Frame(frame) if frame["eventType"] == "heartbeat:ping" => {
                    if self.auto_pong {
                        self.pong().await;
                    }
                }
                Incoming::Frame(frame) => return frame,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next envelope (skipping pings) if one arrives within `wait`.
    pub async fn envelope_within(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.envelope()).await.ok()
    }

    /// The next envelope, which must be of `event_type`.
    pub async fn expect(&mut self, event_type: &str) -> Value {
        let frame = self.envelope().await;
        assert_eq!(frame["eventType"], event_type, "unexpected frame {frame}");
        frame
    }

    /// Expects `connection:error` with `code`, then a close frame with `status`.
    pub async fn expect_refusal(&mut self, code: &str, status: u16) {
        let error = self.expect("connection:error").await;
        assert_eq!(error["payload"]["code"], code, "{error}");
        assert_eq!(error["eventId"], Value::Null);
        assert!(error["payload"]["message"].is_string());
        assert_eq!(self.next().await, Incoming::Close(status));
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::text(text))
            .await
            .expect("send to the server");
    }

    /// Answers a heartbeat.
    pub async fn pong(&mut self) {
        self.send_text(r#"{"eventType":"heartbeat:pong"}"#).await;
    }

    /// Closes from the client side.
    pub async fn close(mut self) {
        let _ = self
            .socket
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// The query string for a connection.
pub fn query(session_id: &str, token: &str, last_event_id: Option<&str>, format: Format) -> String {
    let mut query = format!(
        "sessionId={session_id}&token={token}&format={}",
        format.as_query()
    );
    if let Some(id) = last_event_id {
        query.push_str(&format!("&lastEventId={id}"));
    }
    query
}

/// A client read by a background task that answers every heartbeat, so it stays
/// connected while the test does other things; envelopes queue up for the test.
pub struct Listening {
    frames: tokio::sync::mpsc::UnboundedReceiver<Incoming>,
    task: tokio::task::JoinHandle<()>,
}

impl WsClient {
    /// Hands the client to a background reader.
    pub fn listen(mut self) -> Listening {
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let incoming = match tokio::time::timeout(WAIT, self.socket.next()).await {
                    Err(_) => continue,
                    Ok(None | Some(Err(_))) => Incoming::Ended,
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        Incoming::Close(frame.map_or(1005, |f| u16::from(f.code)))
                    }
                    Ok(Some(Ok(Message::Text(text)))) => {
                        Incoming::Frame(serde_json::from_str(&text).expect("JSON envelope"))
                    }
                    Ok(Some(Ok(Message::Binary(bytes)))) => Incoming::Frame(
                        rmp_serde::from_slice(&bytes).expect("MessagePack envelope"),
                    ),
                    Ok(Some(Ok(_))) => continue,
                };
                if matches!(&incoming, Incoming::Frame(f) if f["eventType"] == "heartbeat:ping") {
                    self.pong().await;
                    continue;
                }
                let last = !matches!(incoming, Incoming::Frame(_));
                if tx.send(incoming).is_err() || last {
                    return;
                }
            }
        });
        Listening { frames, task }
    }
}

impl Listening {
    /// The next envelope; fails the test on a close or after [`WAIT`].
    pub async fn envelope(&mut self) -> Value {
        match tokio::time::timeout(WAIT, self.frames.recv()).await {
            Ok(Some(Incoming::Frame(frame))) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next envelope if one comes within `wait`; fails the test on a close.
    pub async fn envelope_within(&mut self, wait: Duration) -> Option<Value> {
        match tokio::time::timeout(wait, self.frames.recv()).await {
            Err(_) => None,
            Ok(Some(Incoming::Frame(frame))) => Some(frame),
            Ok(other) => panic!("expected a frame or nothing, got {other:?}"),
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that upgrades properly and then writes raw bytes, to send what no
/// well-behaved WebSocket library would (reserved bits, unmasked frames, …).
pub struct RawClient {
    tcp: TcpStream,
    /// Bytes read but not consumed yet.
    buffer: Vec<u8>,
}

impl RawClient {
    /// Upgrades `ws://{addr}/ws?{query}` by hand.
    pub async fn connect(addr: std::net::SocketAddr, query: &str) -> RawClient {
        Self::connect_sending(addr, query, &[]).await
    }

    /// Upgrades `ws://{addr}/ws?{query}` by hand, sending `early` (frames) in the
    /// same write as the request, before the server's answer: RFC 6455 lets a
    /// client send frames once it has sent its handshake.
    pub async fn connect_sending(
        addr: std::net::SocketAddr,
        query: &str,
        early: &[u8],
    ) -> RawClient {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(addr).await.expect("tcp connect");
        let mut request = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(early);
        tcp.write_all(&request).await.expect("send upgrade");
        let mut buffer = Vec::new();
        let end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
                .await
                .expect("upgrade answer in time")
                .expect("read upgrade answer");
            assert!(n > 0, "closed during the upgrade");
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buffer.drain(..end);
        RawClient { tcp, buffer }
    }

    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes).await.expect("send");
    }

    /// Writes bytes as they are; fails once the server has closed the connection.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.tcp.write_all(bytes).await
    }

    /// Reads server frames until a close frame and returns its status; `None` if
    /// the connection ended without one.
    pub async fn close_status(&mut self) -> Option<u16> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some((opcode, payload, used)) = server_frame(&self.buffer) {
                self.buffer.drain(..used);
                if opcode == 8 {
                    return (payload.len() >= 2)
                        .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            let n = match tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
                .await
                .expect("a close within the wait")
            {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One complete (unmasked, server-sent) frame at the start of `bytes`: opcode,
/// payload and bytes used.
fn server_frame(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if bytes.len() < 2 {
        return None;
    }
    let opcode = bytes[0] & 0x0f;
    let (len, head) = match bytes[1] & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
            4,
        ),
        127 => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(raw)).ok()?, 10)
        }
        short => (usize::from(short), 2),
    };
    let payload = bytes.get(head..head + len)?.to_vec();
    Some((opcode, payload, head + len))
}

/// A client frame: `first` is the first header byte (FIN, RSV bits, opcode), the
/// payload is masked when `mask` is given.
pub fn client_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![first];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if payload.len() < 126 {
        frame.push(mask_bit | payload.len() as u8);
    } else {
        frame.push(mask_bit | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    match mask {
        Some(key) => {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}
