//! The read side of a connection: the few small frames a client sends (pongs,
//! resumes, WebSocket control frames), parsed in the connection's own task.
//!
//! Not fastwebsockets' reader, for memory: it keeps a fixed 8 KiB buffer from the
//! handshake on, and it wants a task (and a channel) of its own to read while the
//! connection writes. Together that was most of an idle connection's memory. A
//! client sends a pong per heartbeat and little else, so [`ClientReader`] reads
//! into the stack and keeps only what is left of an unfinished frame.
//!
//! [`ClientReader::next`] is cancel-safe: bytes move into the reader in the poll
//! that reads them, so the connection task can select over it with its queue and
//! its timers.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Poll, ready};

use fastwebsockets::{CloseCode, OpCode};
use pollcast_protocol::ClientFrame;
use tokio::io::{AsyncRead, ReadBuf};

use crate::close::CloseReason;

/// Largest client message accepted (the contract's 4 KiB); larger closes with 1009.
pub const MAX_CLIENT_MESSAGE: usize = 4096;
/// RFC 6455 §5.5: control frames carry at most 125 bytes.
const MAX_CONTROL_PAYLOAD: u64 = 125;
/// Bytes read per poll, on the stack. A pong frame is 36 bytes.
const READ_CHUNK: usize = 1024;
/// Capacity kept between frames; more is given back once parsed.
const KEPT_CAPACITY: usize = 256;

/// What the reader tells the connection task.
#[derive(Debug, PartialEq, Eq)]
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

/// Reads client frames off `io`; see the module documentation.
pub struct ClientReader<R> {
    io: R,
    /// Read and not yet parsed: the start of a frame, rarely more.
    buffered: Vec<u8>,
    /// The parts so far of a fragmented message.
    message: Vec<u8>,
    /// While a fragmented message is open: whether it is text.
    fragmented: Option<bool>,
    /// Nothing more will be read: the client closed, broke the protocol, or the
    /// socket ended. Every later [`ClientReader::next`] is [`Inbound::Closed`].
    ended: bool,
}

/// What one frame at the front of the buffer came to.
enum Step {
    /// The frame is not all there yet.
    NeedMore,
    /// A whole frame of `len` bytes, and what to report for it, if anything.
    Frame(usize, Option<Inbound>),
    /// The connection ends with this report.
    End(Inbound),
}

impl<R: AsyncRead + Unpin> ClientReader<R> {
    /// A reader of a socket past the upgrade, nothing read yet.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn new(io: R) -> Self {
        Self::with_read(io, Vec::new())
    }

    /// A reader of a socket past the upgrade, of which `already_read` was read
    /// with the request: a client may send frames without waiting for the 101.
    pub fn with_read(io: R, already_read: Vec<u8>) -> Self {
        Self {
            io,
            buffered: already_read,
            message: Vec::new(),
            fragmented: None,
            ended: false,
        }
    }

    /// The next thing to report; [`Inbound::Closed`] forever once the reading is
    /// over. Cancel-safe.
    pub async fn next(&mut self) -> Inbound {
        loop {
            if self.ended {
                return Inbound::Closed;
            }
            if let Some(inbound) = self.parse() {
                return inbound;
            }
            match self.fill().await {
                Ok(0) => self.ended = true,
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "client read ended");
                    self.ended = true;
                }
            }
        }
    }

    /// Reads what the socket has, through a stack buffer: an idle connection
    /// holds no read buffer at all. The buffer is left uninitialised because
    /// this runs whenever the connection task is polled, mostly to find nothing.
    async fn fill(&mut self) -> std::io::Result<usize> {
        poll_fn(|cx| {
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            self.buffered.extend_from_slice(buf.filled());
            Poll::Ready(Ok(buf.filled().len()))
        })
        .await
    }
}

impl<R> ClientReader<R> {
    /// Takes whole frames off the buffer until one has something to report.
    fn parse(&mut self) -> Option<Inbound> {
        let mut at = 0;
        let report = loop {
            match self.frame_at(at) {
                Step::NeedMore => break None,
                Step::Frame(len, report) => {
                    at += len;
                    if report.is_some() {
                        break report;
                    }
                }
                Step::End(report) => {
                    self.ended = true;
                    break Some(report);
                }
            }
        };
        self.buffered.drain(..at);
        if self.buffered.is_empty() && self.buffered.capacity() > KEPT_CAPACITY {
            self.buffered = Vec::new();
        }
        report
    }

    /// The frame starting at `at` (RFC 6455 §5.2), checked as far as its header
    /// goes before its payload is waited for: a client cannot make the server
    /// buffer more than [`MAX_CLIENT_MESSAGE`] of anything.
    fn frame_at(&mut self, at: usize) -> Step {
        let bytes = &self.buffered[at..];
        let [b0, b1, ..] = *bytes else {
            return Step::NeedMore;
        };
        let violation = |why: &str| Step::End(Inbound::Violation(protocol_error(why)));
        if b0 & 0x70 != 0 {
            return violation("reserved bits set; no extension was negotiated");
        }
        let fin = b0 & 0x80 != 0;
        let Ok(opcode) = OpCode::try_from(b0 & 0x0F) else {
            return violation("reserved opcode");
        };
        if b1 & 0x80 == 0 {
            return violation("client frames must be masked");
        }
        let (len, head) = match b1 & 0x7F {
            126 => match bytes.get(2..4) {
                Some(n) => (u64::from(u16::from_be_bytes([n[0], n[1]])), 4),
                None => return Step::NeedMore,
            },
            127 => match bytes.get(2..10).and_then(|n| <[u8; 8]>::try_from(n).ok()) {
                Some(n) => (u64::from_be_bytes(n), 10),
                None => return Step::NeedMore,
            },
            n => (u64::from(n), 2),
        };
        if is_control(opcode) {
            if !fin {
                return violation("control frames must not be fragmented");
            }
            if len > MAX_CONTROL_PAYLOAD {
                return violation("control frames carry at most 125 bytes");
            }
        } else if len > MAX_CLIENT_MESSAGE as u64 {
            return Step::End(Inbound::TooLarge);
        }
        // At most 4 KiB here, by the checks above.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let start = head + 4;
        if bytes.len() < start + len {
            return Step::NeedMore;
        }
        let key = [
            bytes[head],
            bytes[head + 1],
            bytes[head + 2],
            bytes[head + 3],
        ];
        fastwebsockets::unmask(&mut self.buffered[at + start..at + start + len], key);
        let payload = &self.buffered[at + start..at + start + len];
        let frame_len = start + len;
        match opcode {
            OpCode::Close => {
                // The client's close is echoed; then the reading is over. A close
                // without a code is answered with 1000, a clean close: an empty
                // echo would leave the client with no code at all (RFC 6455
                // reports it as 1005).
                match close_frame(payload) {
                    Ok(()) if payload.is_empty() => Step::End(Inbound::Control(
                        OpCode::Close,
                        1000u16.to_be_bytes().to_vec(),
                    )),
                    Ok(()) => Step::End(Inbound::Control(OpCode::Close, payload.to_vec())),
                    Err(report) => Step::End(report),
                }
            }
            OpCode::Ping => Step::Frame(
                frame_len,
                Some(Inbound::Control(OpCode::Pong, payload.to_vec())),
            ),
            OpCode::Pong => Step::Frame(frame_len, None),
            OpCode::Text | OpCode::Binary if self.fragmented.is_some() => {
                violation("a new message began before the fragmented one ended")
            }
            OpCode::Text | OpCode::Binary if fin => {
                match message(opcode == OpCode::Text, payload) {
                    Ok(report) => Step::Frame(frame_len, Some(report)),
                    Err(report) => Step::End(report),
                }
            }
            OpCode::Text | OpCode::Binary => {
                self.fragmented = Some(opcode == OpCode::Text);
                self.message.extend_from_slice(payload);
                Step::Frame(frame_len, None)
            }
            OpCode::Continuation => {
                let Some(is_text) = self.fragmented else {
                    return violation("continuation frame out of place");
                };
                if self.message.len() + payload.len() > MAX_CLIENT_MESSAGE {
                    return Step::End(Inbound::TooLarge);
                }
                self.message.extend_from_slice(payload);
                if !fin {
                    return Step::Frame(frame_len, None);
                }
                self.fragmented = None;
                let whole = std::mem::take(&mut self.message);
                match message(is_text, &whole) {
                    Ok(report) => Step::Frame(frame_len, Some(report)),
                    Err(report) => Step::End(report),
                }
            }
        }
    }
}

fn is_control(opcode: OpCode) -> bool {
    matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong)
}

fn protocol_error(why: &str) -> CloseReason {
    CloseReason::ProtocolError(why.into())
}

/// A close frame's payload (RFC 6455 §5.5.1, §7.4): empty, or a code a peer may
/// send followed by a UTF-8 reason.
fn close_frame(payload: &[u8]) -> Result<(), Inbound> {
    let [hi, lo, reason @ ..] = payload else {
        return if payload.is_empty() {
            Ok(())
        } else {
            Err(Inbound::Violation(protocol_error("malformed close frame")))
        };
    };
    let code = u16::from_be_bytes([*hi, *lo]);
    // Not 1005, 1006 or 1015 (only ever reported, never sent), nor unassigned ones.
    if !CloseCode::from(code).is_allowed() {
        return Err(Inbound::Violation(protocol_error(&format!(
            "close code {code} may not be sent"
        ))));
    }
    if std::str::from_utf8(reason).is_err() {
        return Err(Inbound::Violation(CloseReason::InvalidPayload(
            "the close reason must be UTF-8".into(),
        )));
    }
    Ok(())
}

/// A whole data message: text must be UTF-8 (else the connection fails with
/// 1007), and the contract knows only JSON text frames.
fn message(is_text: bool, bytes: &[u8]) -> Result<Inbound, Inbound> {
    if is_text && std::str::from_utf8(bytes).is_err() {
        return Err(Inbound::Violation(CloseReason::InvalidPayload(
            "text messages must be UTF-8".into(),
        )));
    }
    Ok(decode(is_text, bytes))
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
    use std::io;
    use std::task::Context;

    use super::*;

    const KEY: [u8; 4] = [0x12, 0x34, 0x56, 0x78];
    const PONG: &[u8] = br#"{"eventType":"heartbeat:pong"}"#;

    /// A client frame: `b0` is FIN, RSV and opcode; masked with [`KEY`] when `masked`.
    fn frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask_bit = if masked { 0x80 } else { 0 };
        let mut out = vec![b0];
        match payload.len() {
            n @ 0..=125 => out.push(mask_bit | n as u8),
            n @ 126..=0xFFFF => {
                out.push(mask_bit | 126);
                out.extend((n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend((n as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend(KEY);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        } else {
            out.extend(payload);
        }
        out
    }

    /// Hands out its bytes `step` at a time, then end of stream.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let end = (self.at + self.step)
                .min(self.bytes.len())
                .min(self.at + buf.remaining());
            buf.put_slice(&self.bytes[self.at..end]);
            self.at = end;
            Poll::Ready(Ok(()))
        }
    }

    /// Everything a reader reports for `bytes` fed `step` bytes at a time, up to
    /// and including its first `Closed`.
    async fn reports(bytes: Vec<u8>, step: usize) -> Vec<Inbound> {
        let mut reader = ClientReader::new(Trickle { bytes, at: 0, step });
        let mut out = Vec::new();
        loop {
            let inbound = reader.next().await;
            let closed = inbound == Inbound::Closed;
            out.push(inbound);
            if closed {
                assert_eq!(reader.next().await, Inbound::Closed, "closed stays closed");
                return out;
            }
        }
    }

    fn protocol(why: &str) -> Inbound {
        Inbound::Violation(protocol_error(why))
    }

    #[tokio::test]
    async fn frames_split_anywhere_read_the_same() {
        let mut bytes = frame(0x81, PONG, true);
        bytes.extend(frame(0x89, b"hi", true));
        bytes.extend(frame(0x8A, b"ignored", true));
        bytes.extend(frame(
            0x81,
            br#"{"eventType":"resume","lastEventId":"x"}"#,
            true,
        ));
        bytes.extend(frame(0x82, PONG, true));
        // Fragmented, with a ping between the parts.
        bytes.extend(frame(0x01, &PONG[..10], true));
        bytes.extend(frame(0x89, b"", true));
        bytes.extend(frame(0x80, &PONG[10..], true));
        bytes.extend(frame(0x88, &1000u16.to_be_bytes(), true));
        bytes.extend(frame(0x81, PONG, true));
        let expected = vec![
            Inbound::Pong,
            Inbound::Control(OpCode::Pong, b"hi".to_vec()),
            Inbound::Resume("x".into()),
            Inbound::BadFrame("client frames are JSON text".into()),
            Inbound::Control(OpCode::Pong, Vec::new()),
            Inbound::Pong,
            Inbound::Control(OpCode::Close, 1000u16.to_be_bytes().to_vec()),
            Inbound::Closed,
        ];
        for step in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(reports(bytes.clone(), step).await, expected, "step {step}");
        }
    }

    #[tokio::test]
    async fn a_close_without_a_code_is_answered_with_1000() {
        assert_eq!(
            reports(frame(0x88, b"", true), 1).await[..1],
            [Inbound::Control(
                OpCode::Close,
                1000u16.to_be_bytes().to_vec()
            )]
        );
        // One with a code is echoed as it came.
        let reason = [&4000u16.to_be_bytes()[..], b"bye"].concat();
        assert_eq!(
            reports(frame(0x88, &reason, true), 1).await[..1],
            [Inbound::Control(OpCode::Close, reason)]
        );
    }

    #[tokio::test]
    async fn a_message_of_exactly_the_limit_is_read_and_one_byte_more_is_too_large() {
        let mut text = br#"{"eventType":"heartbeat:pong"}"#.to_vec();
        text.resize(MAX_CLIENT_MESSAGE, b' ');
        assert_eq!(
            reports(frame(0x81, &text, true), 100).await,
            [Inbound::Pong, Inbound::Closed]
        );
        text.push(b' ');
        assert_eq!(
            reports(frame(0x81, &text, true), 100).await,
            [Inbound::TooLarge, Inbound::Closed]
        );
        // Over the limit in fragments.
        let mut parts = frame(0x01, &text[..4000], true);
        parts.extend(frame(0x80, &text[4000..], true));
        assert_eq!(
            reports(parts, 100).await,
            [Inbound::TooLarge, Inbound::Closed]
        );
        // A length field claiming 2^63 bytes is refused from its header alone.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend((1u64 << 63).to_be_bytes());
        assert_eq!(reports(huge, 3).await, [Inbound::TooLarge, Inbound::Closed]);
    }

    #[tokio::test]
    async fn protocol_violations_end_the_reading() {
        let cases: Vec<(Vec<u8>, Inbound)> = vec![
            (
                frame(0xC1, PONG, true),
                protocol("reserved bits set; no extension was negotiated"),
            ),
            (frame(0x83, b"x", true), protocol("reserved opcode")),
            (
                frame(0x81, PONG, false),
                protocol("client frames must be masked"),
            ),
            (
                frame(0x09, b"x", true),
                protocol("control frames must not be fragmented"),
            ),
            (
                frame(0x89, &[0; 126], true),
                protocol("control frames carry at most 125 bytes"),
            ),
            (frame(0x88, b"x", true), protocol("malformed close frame")),
            (
                frame(0x88, &1005u16.to_be_bytes(), true),
                protocol("close code 1005 may not be sent"),
            ),
            (
                frame(0x80, PONG, true),
                protocol("continuation frame out of place"),
            ),
            (
                [frame(0x01, b"{", true), frame(0x81, PONG, true)].concat(),
                protocol("a new message began before the fragmented one ended"),
            ),
            (
                frame(0x81, b"\xff\xfe", true),
                Inbound::Violation(CloseReason::InvalidPayload(
                    "text messages must be UTF-8".into(),
                )),
            ),
            (
                [frame(0x01, b"\xe2\x82", true), frame(0x80, b"\x28", true)].concat(),
                Inbound::Violation(CloseReason::InvalidPayload(
                    "text messages must be UTF-8".into(),
                )),
            ),
            (
                frame(0x88, &[0x03, 0xE8, 0xff], true),
                Inbound::Violation(CloseReason::InvalidPayload(
                    "the close reason must be UTF-8".into(),
                )),
            ),
        ];
        for (bytes, violation) in cases {
            // Whatever follows a violation is never read.
            let bytes = [bytes, frame(0x81, PONG, true)].concat();
            let what = format!("{violation:?}");
            assert_eq!(
                reports(bytes, 5).await,
                [violation, Inbound::Closed],
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn a_frame_cut_off_by_the_end_of_the_stream_is_closed() {
        let bytes = frame(0x81, PONG, true);
        assert_eq!(
            reports(bytes[..bytes.len() - 1].to_vec(), 4).await,
            [Inbound::Closed]
        );
    }

    /// Ready with one byte at a time, pending in between: `next` dropped while
    /// pending loses nothing.
    struct Stutter {
        bytes: Vec<u8>,
        at: usize,
        ready: bool,
    }

    impl AsyncRead for Stutter {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(&byte) = self.bytes.get(self.at) {
                buf.put_slice(&[byte]);
                self.at += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn next_is_cancel_safe() {
        let bytes = [frame(0x81, PONG, true), frame(0x89, b"ok", true)].concat();
        let mut reader = ClientReader::new(Stutter {
            bytes,
            at: 0,
            ready: false,
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            // Polled once and dropped, over and over.
            let once = poll_fn(|cx| {
                let next = std::pin::pin!(reader.next());
                Poll::Ready(match next.poll(cx) {
                    Poll::Ready(inbound) => Some(inbound),
                    Poll::Pending => None,
                })
            })
            .await;
            got.extend(once);
        }
        assert_eq!(
            got,
            [
                Inbound::Pong,
                Inbound::Control(OpCode::Pong, b"ok".to_vec()),
                Inbound::Closed
            ]
        );
    }

    #[test]
    fn known_frames_decode() {
        assert_eq!(decode(true, PONG), Inbound::Pong);
        assert_eq!(
            decode(true, br#"{"eventType":"resume","lastEventId":"x"}"#),
            Inbound::Resume("x".into())
        );
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
        assert!(matches!(decode(false, PONG), Inbound::BadFrame(_)));
    }
}
