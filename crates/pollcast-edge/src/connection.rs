//! One client connection, from the upgraded socket to the close frame.
//!
//! The order on the wire is the contract's: `connection:established`; with
//! `lastEventId`, the missed events and `connection:reconnected`; then live events.
//! The seam between replay and live holds because the connection joins its room
//! (and so starts queueing live events) *before* it reads the log: every event is
//! either in the replay or in the queue, possibly both, and `last` (the newest
//! position this connection has passed on) drops the repeats.

use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, WebSocket};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use pollcast_protocol::token::Claims;
use pollcast_protocol::{
    ConnectionEvent, EventId, PresenceKind, PresenceSignal, Role, SessionEvent, Timestamp,
    WireFormat,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use uuid::Uuid;

use crate::Edge;
use crate::close::CloseReason;
use crate::frame::{EncodedEvent, Framed, connection_frame};
use crate::limits::Admission;
use crate::outlet::{Backlog, Broken, Outlet, Queued};
use crate::pager::{Page, Pager};
use crate::query::{self, ConnectRequest};
use crate::reader::{ClientReader, Inbound};
use crate::room::{Member, Room};

/// How long a replay waits for the log to reach the newest event the connection
/// was told about (a stream replica a moment behind) before it gives up and says
/// `recovered: false`.
const REPLAY_PATIENCE: Duration = Duration::from_secs(3);
/// How long to wait for the client's close frame after sending ours.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The socket's read half, owned by the connection's task.
pub(crate) type ReadSide = Box<dyn AsyncRead + Send + Unpin>;
/// The socket's write half, shared through the outlet with the room.
pub(crate) type WriteSide = Box<dyn AsyncWrite + Send + Unpin>;

/// The two halves of an upgraded socket, and the bytes hyper read past the
/// request (frames a client sent without waiting for the 101).
///
/// The server's sockets are plain TCP, which splits into halves that take no
/// lock (`TcpStream::into_split`). hyper hands the upgraded socket over boxed
/// and wrapped; every write by the room went through those layers and
/// `tokio::io::split`'s lock, per frame. Anything else (never the server's own
/// listener) is split with `tokio::io::split`.
pub(crate) fn halves(ws: WebSocket<TokioIo<Upgraded>>) -> (ReadSide, WriteSide, Vec<u8>) {
    match ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            (Box::new(read), Box::new(write), parts.read_buf.to_vec())
        }
        Err(io) => {
            let (read, write) = tokio::io::split(TokioIo::new(io));
            (Box::new(read), Box::new(write), Vec::new())
        }
    }
}

/// Serves one upgraded connection until it ends: `already_read` are the first
/// bytes the client sent on it. `origin` is the request's `Origin` header,
/// which browsers always send and other clients usually do not.
///
/// A plain function that returns the connection's future rather than an `async
/// fn`, here and in [`run`], for the size of that future, which every idle
/// connection carries for its whole life (it is most of an idle connection's
/// memory): an `async fn` keeps its arguments in its state twice (rustc moves
/// them from where the caller put them into the body's own locals), and a
/// value moved out of a local keeps its slot until the local's scope ends.
/// So the set-up runs before the future exists, and what the future holds is
/// only what it uses.
pub(crate) fn serve(
    edge: Edge,
    (read, write, already_read): (ReadSide, WriteSide, Vec<u8>),
    query: String,
    origin: Option<String>,
) -> impl Future<Output = ()> {
    // This task reads; writes go through the outlet, which the room shares.
    let mut reader = ClientReader::with_read(read, already_read);
    let format = query::format_of(&query);
    let label = match format {
        WireFormat::Json => "json",
        WireFormat::MessagePack => "msgpack",
    };
    let config = &edge.inner.config;
    let (outlet, live) = Outlet::new(write, label, config.send_queue_bytes, config.write_timeout);
    let mut out = Writer {
        outlet,
        format,
        session_id: Uuid::nil(),
    };
    async move {
        // What runs once or rarely (admission, closes, replays, error frames) is
        // boxed, so an idle connection does not carry it.
        let Some((request, claims, admission)) = Box::pin(admit_or_refuse(
            &edge,
            &query,
            origin.as_deref(),
            &mut out,
            &mut reader,
        ))
        .await
        else {
            return;
        };
        // Not kept past admission: an idle connection has no use for them.
        drop((query, origin));
        out.session_id = request.session_id;
        metrics::gauge!("pollcast_ws_connections").increment(1.0);
        run(&edge, out, live, request, claims, &mut reader).await;
        metrics::gauge!("pollcast_ws_connections").decrement(1.0);
        drop(admission);
    }
}

/// Admits the connection ([`admit`]) or refuses it: its `connection:error` and
/// close code, then a short wait for the client's close; `None` if refused.
async fn admit_or_refuse<'e>(
    edge: &'e Edge,
    query: &str,
    origin: Option<&str>,
    out: &mut Writer,
    reader: &mut ClientReader<ReadSide>,
) -> Option<(ConnectRequest, Claims, Admission<'e>)> {
    match admit(edge, query, origin).await {
        Ok(admitted) => Some(admitted),
        Err((session_id, refusal)) => {
            out.session_id = session_id;
            metrics::counter!("pollcast_edge_refused_total", "code" => refusal.code()).increment(1);
            if out.close(&refusal).await.is_ok() {
                linger(reader).await;
            }
            None
        }
    }
}

/// Decides whether the connection may open: 4400, 4401, 4403, 4404, 4429, or
/// 1013 while the event stream cannot be reached.
async fn admit<'e>(
    edge: &'e Edge,
    query: &str,
    origin: Option<&str>,
) -> Result<(ConnectRequest, Claims, Admission<'e>), (Uuid, CloseReason)> {
    // First, so a page on a foreign site learns nothing about the tokens it tries.
    // No `Origin` means no browser, and a non-browser client can send any origin
    // it likes: the list guards users' browsers, not the server.
    let allowed = &edge.inner.config.allowed_origins;
    if let Some(origin) = origin.filter(|_| !allowed.is_empty())
        && !pollcast_protocol::origin::is_allowed(allowed, origin)
    {
        return Err((
            Uuid::nil(),
            CloseReason::Forbidden(format!("origin {origin:?} may not connect")),
        ));
    }
    let mut request =
        query::parse(query).map_err(|bad| (Uuid::nil(), CloseReason::BadRequest(bad.0)))?;
    let session = request.session_id;
    // Not kept past admission: an idle connection has no use for it.
    let token = std::mem::take(&mut request.token);
    let claims = edge
        .inner
        .keys
        .verify(&token)
        .map_err(|err| (session, CloseReason::Unauthorized(err.to_string())))?;
    if claims.session_id != session {
        return Err((
            session,
            CloseReason::Forbidden("token belongs to another session".into()),
        ));
    }
    match session_known(edge, session).await {
        Ok(true) => {}
        Ok(false) => return Err((session, CloseReason::SessionNotFound)),
        Err(err) => return Err((session, err.into())),
    }
    let admission = edge
        .inner
        .limits
        .admit(claims.participant_id)
        .ok_or((session, CloseReason::TooManyConnections))?;
    Ok((request, claims, admission))
}

/// Whether the stream knows the session. A token is issued right after the
/// session's creation commits, and `session:created` reaches the stream a moment
/// later; a client that connects in between must not be told the session does not
/// exist, so an unknown session gets [`crate::EdgeConfig::session_wait`] to appear.
async fn session_known(edge: &Edge, session: Uuid) -> Result<bool, pollcast_stream::StreamError> {
    let stream = &edge.inner.stream;
    if stream.newest(session).await?.is_some() {
        return Ok(true);
    }
    let mut live = stream.subscribe(session).await?;
    // Published between the check and the subscription?
    if stream.newest(session).await?.is_some() {
        return Ok(true);
    }
    Ok(timeout(edge.inner.config.session_wait, live.next())
        .await
        .is_ok())
}

/// How the main loop ended.
enum End {
    /// Close for this reason.
    Close(CloseReason),
    /// The client closed, or the socket broke: nothing more to send.
    Gone,
    /// The node shuts down: flush the queue, then 1001.
    Shutdown,
}

/// Runs an admitted connection until it ends. Not an `async fn`, for the
/// future's size (see [`serve`]).
fn run<'a, R: AsyncRead + Unpin>(
    edge: &'a Edge,
    out: Writer,
    live: Backlog,
    request: ConnectRequest,
    claims: Claims,
    reader: &'a mut ClientReader<R>,
) -> impl Future<Output = ()> + 'a {
    let connection_id = Uuid::now_v7();
    let session_id = request.session_id;
    let resume_from = request.last_event_id;
    let member = Member {
        presenter: claims.role == Role::Presenter,
        participant: claims.participant_id,
        format: request.format,
        outlet: Arc::clone(&out.outlet),
    };
    async move {
        let room = match edge
            .inner
            .rooms
            .join(session_id, connection_id, member)
            .await
        {
            Ok(room) => room,
            Err(err) => {
                let _ = Box::pin(out.close(&err.into())).await;
                return;
            }
        };
        let mut connection = Connection {
            edge,
            out,
            session_id,
            claims,
            connection_id,
            live,
            room,
        };
        connection.presence(PresenceKind::Connected).await;
        let end = connection.serve(resume_from, reader).await;
        // From here on only this task writes: the room must not slip an event in
        // between the last frames and the close.
        connection.out.outlet.set_direct(false).await;
        let closed = match end {
            End::Gone => false,
            End::Close(close) => Box::pin(connection.out.close(&close)).await.is_ok(),
            End::Shutdown => {
                Box::pin(connection.flush_queue()).await;
                Box::pin(connection.out.close(&CloseReason::GoingAway))
                    .await
                    .is_ok()
            }
        };
        edge.inner.rooms.leave(session_id, connection_id).await;
        connection.presence(PresenceKind::Disconnected).await;
        if closed {
            linger(reader).await;
        }
    }
}

/// Waits briefly for the client to answer our close, so the socket is not reset
/// under data the client has not read yet.
async fn linger<R: AsyncRead + Unpin>(reader: &mut ClientReader<R>) {
    let _ = timeout(CLOSE_LINGER, async {
        while reader.next().await != Inbound::Closed {}
    })
    .await;
}

struct Connection<'e> {
    edge: &'e Edge,
    out: Writer,
    session_id: Uuid,
    claims: Claims,
    connection_id: Uuid,
    /// Events the room could not write itself.
    live: Backlog,
    /// The session's room on this node, which this connection is a member of.
    room: Arc<Room>,
}

impl Connection<'_> {
    async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        resume_from: Option<EventId>,
        reader: &mut ClientReader<R>,
    ) -> End {
        let config = &self.edge.inner.config;
        // Read after joining the room: anything newer is in the queue.
        let newest = match self.edge.inner.stream.newest(self.session_id).await {
            Ok(newest) => newest,
            Err(err) => return End::Close(err.into()),
        };
        self.out.outlet.set_last(newest.unwrap_or(0));
        let established = ConnectionEvent::Established {
            connection_id: self.connection_id,
            role: self.claims.role,
            participant_id: self.claims.participant_id,
            last_event_id: newest.map(|p| EventId::new(self.session_id, p)),
            heartbeat_interval_ms: u64::try_from(config.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
        };
        if Box::pin(self.out.send_connection(established))
            .await
            .is_err()
        {
            return End::Gone;
        }
        if let Some(from) = resume_from
            && Box::pin(self.replay(from)).await.is_err()
        {
            return End::Gone;
        }
        let mut shutdown = self.edge.inner.shutdown.subscribe();
        let mut ping = tokio::time::interval_at(
            Instant::now() + config.heartbeat_interval,
            config.heartbeat_interval,
        );
        // One timer for the whole connection, moved on each pong: building a new
        // one per loop turn would register a timer for every event delivered.
        let pong_deadline = tokio::time::sleep(config.heartbeat_timeout);
        tokio::pin!(pong_deadline);
        let mut next_seen_report = Instant::now();
        // Caught up: the room may write to the socket itself from now on
        // (once this task has written what is queued).
        self.out.outlet.set_direct(true).await;
        loop {
            let sent = tokio::select! {
                biased;
                // The guard `wait_for` returns is not `Send`: drop it inside.
                () = async { let _ = shutdown.wait_for(|&stop| stop).await; } => return End::Shutdown,
                message = reader.next() => match message {
                    Inbound::Pong => {
                        let now = Instant::now();
                        pong_deadline.as_mut().reset(now + config.heartbeat_timeout);
                        // At most one sign of life per half interval reaches the
                        // domain, however fast a client sends pongs; half, so that a
                        // client answering every ping is reported every time (the
                        // domain's sweep takes silent connections for dead).
                        if now >= next_seen_report {
                            next_seen_report = now + config.heartbeat_interval / 2;
                            self.presence(PresenceKind::Seen).await;
                        }
                        Ok(())
                    }
                    Inbound::Resume(text) => match text.parse::<EventId>() {
                        Ok(from) => {
                            self.out.outlet.set_direct(false).await;
                            let replayed = Box::pin(self.replay(from)).await;
                            self.out.outlet.set_direct(true).await;
                            replayed
                        }
                        Err(_) => {
                            Box::pin(self.bad_frame("resume: lastEventId is not an event id")).await
                        }
                    },
                    Inbound::BadFrame(why) => Box::pin(self.bad_frame(&why)).await,
                    Inbound::Control(opcode, payload) => {
                        Box::pin(self.out.control(opcode, payload)).await
                    }
                    Inbound::TooLarge => return End::Close(CloseReason::MessageTooLarge),
                    Inbound::Violation(reason) => return End::Close(reason),
                    Inbound::Closed => return End::Gone,
                },
                queued = self.live.recv() => match queued {
                    Queued::Overflowed => return End::Close(CloseReason::SlowConsumer),
                    // A frame the room began is finished whatever else happens.
                    rest @ Queued::Rest(..) => {
                        self.out.outlet.write_queued(&rest, self.out.format).await
                    }
                    _ if self.out.outlet.overflowed() => {
                        return End::Close(CloseReason::SlowConsumer);
                    }
                    item => self.out.outlet.write_queued(&item, self.out.format).await,
                },
                _ = ping.tick() => Box::pin(self.out.send_connection(ConnectionEvent::Ping {})).await,
                () = &mut pong_deadline => {
                    return End::Close(CloseReason::HeartbeatTimeout);
                }
            };
            if sent.is_err() {
                return End::Gone;
            }
        }
    }

    /// Before a shutdown close: writes what is queued, then whatever the stream
    /// holds beyond it that the room had not dispatched yet, so the client's last
    /// event is the stream's newest and its reconnect replays nothing twice.
    async fn flush_queue(&mut self) {
        while let Some(item) = self.live.try_recv() {
            if matches!(item, Queued::Overflowed)
                || self
                    .out
                    .outlet
                    .write_queued(&item, self.out.format)
                    .await
                    .is_err()
            {
                return;
            }
        }
        let stream = Arc::clone(&self.edge.inner.stream);
        let mut pager = Pager::new(&*stream, self.session_id, self.out.outlet.last());
        while let Ok(Page::Events(events)) = pager.next().await {
            for event in events {
                self.out.outlet.set_last(event.position);
                if self.may_see(&event) && self.send_event(event).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Sends every event after `from` this connection may see, then
    /// `connection:reconnected`. When the log no longer reaches `from`, sends
    /// nothing but `recovered: false`: a partial replay is never passed off as whole.
    ///
    /// What the room still holds in memory comes from there; only the rest is
    /// read from the log (see [`crate::recent`]).
    async fn replay(&mut self, from: EventId) -> Result<(), Broken> {
        let started = std::time::Instant::now();
        let mut replayed = 0;
        let mut recovered = true;
        match from.position_in(self.session_id) {
            Err(_) => recovered = false,
            Ok(after) => {
                // Everything up to `reach` must come from the replay (the live
                // queue holds only what is newer).
                let reach = self.out.outlet.last();
                // Where the log takes over, if it must.
                let mut log_from = Some(after);
                if let Some((events, end)) = self.missed_in_room(after).await {
                    replayed += self.send_all(&events, end).await?;
                    let mut position = end;
                    // The room may be behind the stream: wait for it as long as
                    // it moves, rather than read the stream for what it is about
                    // to dispatch. Under load (a storm) 10 000 replays reading
                    // the stream would put the room further behind.
                    while position < reach
                        && self
                            .room
                            .advanced_past(position, Instant::now() + REPLAY_PATIENCE)
                            .await
                    {
                        let wanted = |event: &SessionEvent| self.may_see(event);
                        let Some((events, end)) = self.room.recent_after(position, wanted) else {
                            // Dropped from the window meanwhile.
                            break;
                        };
                        replayed += self.send_all(&events, end).await?;
                        position = end;
                    }
                    log_from = (position < reach).then_some(position);
                }
                if let Some(position) = log_from {
                    let (sent, whole) = Box::pin(self.replay_log(position, reach)).await?;
                    replayed += sent;
                    recovered = whole;
                }
                let source = if log_from.is_some() { "log" } else { "room" };
                metrics::counter!("pollcast_edge_replay_sources_total", "source" => source)
                    .increment(1);
            }
        }
        metrics::histogram!("pollcast_edge_replay_seconds").record(started.elapsed().as_secs_f64());
        let outcome = if recovered { "true" } else { "false" };
        metrics::counter!("pollcast_replays_total", "recovered" => outcome).increment(1);
        let reconnected = ConnectionEvent::Reconnected {
            from_event_id: from,
            replayed,
            recovered,
        };
        self.out.send_connection(reconnected).await
    }

    /// The events after `after` this connection may see, from the room's
    /// window, which one replay at a time fills from the log when it does not
    /// reach back far enough; and the position they run to. `None`: the
    /// replay reads the log itself.
    async fn missed_in_room(&self, after: u64) -> Option<(Vec<Arc<EncodedEvent>>, u64)> {
        let wanted = |event: &SessionEvent| self.may_see(event);
        if let Some(found) = self.room.recent_after(after, wanted) {
            return Some(found);
        }
        let warmed = self
            .room
            .warm(&*self.edge.inner.stream, after)
            .await
            .inspect_err(|err| tracing::debug!(error = %err, "room window not filled"));
        warmed
            .ok()
            .and_then(|()| self.room.recent_after(after, wanted))
    }

    /// Sends replayed events from the room's window, then marks everything up
    /// to `end` passed on; how many were sent.
    async fn send_all(&mut self, events: &[Arc<EncodedEvent>], end: u64) -> Result<u64, Broken> {
        for event in events {
            self.send_encoded(event).await?;
        }
        self.pass(end);
        Ok(events.len() as u64)
    }

    /// Sends the events after `after` this connection may see, from the log,
    /// up to at least `reach`: how many were sent, and whether the log reached
    /// that far. A log that ends sooner is a replica behind the one `newest`
    /// asked: it is waited for, briefly.
    async fn replay_log(&mut self, after: u64, reach: u64) -> Result<(u64, bool), Broken> {
        let stream = Arc::clone(&self.edge.inner.stream);
        let deadline = Instant::now() + REPLAY_PATIENCE;
        let mut wait = Duration::from_millis(20);
        let mut pager = Pager::new(&*stream, self.session_id, after);
        let mut sent = 0;
        loop {
            match pager.next().await {
                Ok(Page::Events(events)) => {
                    for event in events {
                        if self.may_see(&event) {
                            self.send_event(event).await?;
                            sent += 1;
                        }
                    }
                    // Passed on up to here, whatever the next read does: a page
                    // may run past `reach` into what the room has queued
                    // meanwhile, and a replay that fails after it (`recovered:
                    // false`) must not let the queue send those events again.
                    self.pass(pager.position());
                }
                Ok(Page::End) if pager.position() >= reach => {
                    // The client has everything up to where it said.
                    self.pass(pager.position());
                    return Ok((sent, true));
                }
                Ok(Page::Truncated) => return Ok((sent, false)),
                Ok(Page::End) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Ok(Page::End) => {
                    tracing::warn!(
                        reached = pager.position(),
                        reach,
                        "replay fell short of the newest event"
                    );
                    return Ok((sent, false));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "replay read failed");
                    return Ok((sent, false));
                }
            }
        }
    }

    /// Marks every event up to `position` passed on: the queue skips them.
    fn pass(&self, position: u64) {
        let outlet = &self.out.outlet;
        outlet.set_last(outlet.last().max(position));
    }

    /// Encodes a replayed event for this connection alone and sends it.
    async fn send_event(&mut self, event: Arc<SessionEvent>) -> Result<(), Broken> {
        self.send_encoded(&EncodedEvent::new(event)).await
    }

    /// Sends a replayed event in this connection's format (encoding it if no
    /// one has in that format yet).
    async fn send_encoded(&mut self, event: &EncodedEvent) -> Result<(), Broken> {
        match event.framed(self.out.format) {
            Some(frame) => self.out.outlet.write_frame(frame.bytes(), true).await,
            None => Ok(()),
        }
    }

    fn may_see(&self, event: &SessionEvent) -> bool {
        event.event.audience().includes(
            self.claims.role == Role::Presenter,
            self.claims.participant_id,
        )
    }

    async fn bad_frame(&mut self, why: &str) -> Result<(), Broken> {
        let error = ConnectionEvent::Error {
            code: "bad_frame".into(),
            message: why.into(),
        };
        self.out.send_connection(error).await
    }

    /// Reports presence for participants (presenters have none). Takes `&mut`
    /// because the socket inside is `Send` but not `Sync`.
    async fn presence(&mut self, kind: PresenceKind) {
        let Some(participant_id) = self.claims.participant_id else {
            return;
        };
        let signal = PresenceSignal {
            session_id: self.session_id,
            participant_id,
            connection_id: self.connection_id,
            kind,
            at: Timestamp::now(),
        };
        if let Err(err) = self.edge.inner.stream.report_presence(signal).await {
            tracing::warn!(error = %err, "presence not reported");
        }
    }
}

/// How the connection task writes: through the outlet it shares with its room.
struct Writer {
    outlet: Arc<Outlet>,
    format: WireFormat,
    session_id: Uuid,
}

impl Writer {
    /// One envelope in this connection's format: text for JSON, binary for MessagePack.
    async fn send(&self, bytes: &[u8]) -> Result<(), Broken> {
        self.outlet
            .write_frame(Framed::data(self.format, bytes).bytes(), true)
            .await
    }

    async fn send_connection(&self, event: ConnectionEvent) -> Result<(), Broken> {
        let bytes = connection_frame(self.format, self.session_id, event);
        self.send(&bytes).await
    }

    async fn control(&self, opcode: OpCode, payload: Vec<u8>) -> Result<(), Broken> {
        self.outlet
            .write_frame(Framed::new(opcode, &payload).bytes(), false)
            .await
    }

    /// `connection:error`, then the close frame.
    async fn close(&self, reason: &CloseReason) -> Result<(), Broken> {
        let error = ConnectionEvent::Error {
            code: reason.code().to_owned(),
            message: reason.message(),
        };
        self.send_connection(error).await?;
        let status = reason.status();
        metrics::counter!("pollcast_ws_closes_total", "code" => status.to_string()).increment(1);
        let close = Framed::of(Frame::close(status, reason.code().as_bytes()));
        self.outlet.write_frame(close.bytes(), false).await
    }
}
