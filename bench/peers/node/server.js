// A peer for side-by-side benchmarks: the part of pollcast's client contract that
// `loadgen` uses, written the way a careful Node.js team would write it, on one of
// two transports:
//
// - `--transport ws`: the contract itself on the `ws` package; each envelope is
//   serialised once and the same buffer sent to every socket of the room.
// - `--transport socketio`: Socket.IO 4 rooms (WebSocket transport only), each
//   envelope the argument of a `pollcast` event (`loadgen --protocol socket-io`);
//   Socket.IO encodes a room broadcast once, too. Engine.IO's ping replaces
//   `heartbeat:ping`.
//
// One process, everything in memory. Nothing is stored, so it is the floor a
// Node.js design reaches on this work, not a rival product: no database, no
// durable outbox, no event stream between processes.
//
//   node server.js --listen 127.0.0.1:8080 [--transport ws|socketio] [--results-interval-ms 50]
//
// Served: POST /api/sessions, /api/sessions/:id/start, /api/sessions/:id/end,
// /api/join, /api/sessions/:id/polls, /api/polls/:id/activate, /api/polls/:id/close,
// /api/polls/:id/votes; GET /api/polls/:id/results, /healthz, /metrics (empty);
// GET /ws with `sessionId`, `token` and `lastEventId` (replay from memory).
// JSON only (no MessagePack). Errors carry the contract's codes.
'use strict';

const http = require('node:http');
const crypto = require('node:crypto');
const { WebSocketServer } = require('ws');
const { Server: SocketIo } = require('socket.io');

function flag(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const [host, port] = flag('--listen', '127.0.0.1:8080').split(':');
const RESULTS_INTERVAL_MS = Number(flag('--results-interval-ms', '50'));
const TRANSPORT = flag('--transport', 'ws');
if (TRANSPORT !== 'ws' && TRANSPORT !== 'socketio') throw new Error(`unknown transport ${TRANSPORT}`);
const HEARTBEAT_MS = 30_000;
const CODE_ALPHABET = 'ABCDEFGHJKMNPQRSTUVWXYZ23456789';

const sessions = new Map(); // id -> Session
const codes = new Map(); // code -> Session
const polls = new Map(); // id -> { poll, session, tally: number[], voters: Set }
const tokens = new Map(); // token -> { session, role, participantId }

const now = () => new Date().toISOString();

// pollcast's event id: 48 bits of position, version 8, the session id's low bits.
function eventId(session, position) {
  const hex = position.toString(16).padStart(12, '0') + '8' + session.idHex.slice(13);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function newSession(title) {
  let code;
  do {
    code = Array.from(crypto.randomBytes(6), (b) => CODE_ALPHABET[b % CODE_ALPHABET.length]).join('');
  } while (codes.has(code));
  const id = crypto.randomUUID();
  const session = {
    id,
    idHex: id.replaceAll('-', ''),
    resource: {
      id, code, title, status: 'created', createdAt: now(),
      startedAt: null, endedAt: null, activePollId: null,
    },
    log: [], // { position, id, frame: Buffer, to: 'room' | Set of participant ids }
    sockets: new Set(),
    presenters: new Set(),
    byParticipant: new Map(), // participant id -> Set of sockets
    participants: new Map(),
    pending: null, // poll id whose results:updated is scheduled
    timer: null, // its timeout
  };
  sessions.set(id, session);
  codes.set(code, session);
  return session;
}

// Appends an event to the session's log and sends it to whoever may see it.
// `to`: 'room', or the participant ids (besides presenters) that see it.
function emit(session, eventType, payload, to = 'room') {
  const position = session.log.length + 1;
  const id = eventId(session, position);
  const envelope = { eventId: id, eventType, timestamp: now(), sessionId: session.id, payload };
  if (TRANSPORT === 'socketio') {
    session.log.push({ position, id, envelope, to });
    const rooms = to === 'room' ? session.id : [`${session.id}:presenters`, ...[...to].map((p) => `${session.id}:${p}`)];
    io.to(rooms).emit('pollcast', envelope);
    return;
  }
  const frame = Buffer.from(JSON.stringify(envelope));
  session.log.push({ position, id, frame, to });
  if (to === 'room') {
    for (const ws of session.sockets) if (ws.live) ws.send(frame, { binary: false });
  } else {
    for (const ws of session.presenters) if (ws.live) ws.send(frame, { binary: false });
    for (const pid of to) {
      for (const ws of session.byParticipant.get(pid) ?? []) if (ws.live) ws.send(frame, { binary: false });
    }
  }
}

function results(entry, final) {
  return {
    pollId: entry.poll.id,
    totalVotes: entry.voters.size,
    options: entry.poll.options.map((o, i) => ({ optionId: o.id, votes: entry.tally[i] })),
    final,
  };
}

// Sends the scheduled results now (before poll:closed, so the last update equals
// the final results, as the contract asks).
function flushResults(session) {
  if (session.pending === null) return;
  clearTimeout(session.timer);
  const entry = polls.get(session.pending);
  session.pending = null;
  emit(session, 'results:updated', { results: results(entry, false) });
}

function closePoll(session, entry) {
  flushResults(session);
  entry.poll.status = 'closed';
  entry.poll.closedAt = now();
  session.resource.activePollId = null;
  emit(session, 'poll:closed', { poll: entry.poll, results: results(entry, true) });
}

class Failure extends Error {
  constructor(status, code) {
    super(code);
    this.status = status;
    this.code = code;
  }
}

function auth(req, session, role) {
  const header = req.headers.authorization ?? '';
  const claims = tokens.get(header.startsWith('Bearer ') ? header.slice(7) : '');
  if (!claims) throw new Failure(401, 'unauthorized');
  if (session && claims.session !== session) throw new Failure(403, 'forbidden');
  if (role && claims.role !== role) throw new Failure(403, 'forbidden');
  return claims;
}

function sessionOf(id) {
  const session = sessions.get(id);
  if (!session) throw new Failure(404, 'session_not_found');
  return session;
}

function pollOf(id) {
  const entry = polls.get(id);
  if (!entry) throw new Failure(404, 'poll_not_found');
  return entry;
}

function token(claims) {
  const value = crypto.randomBytes(24).toString('base64url');
  tokens.set(value, claims);
  return value;
}

// Route table: [method, pattern, handler(req, params, body) -> [status, body]].
const routes = [
  ['POST', /^\/api\/sessions$/, (req, _, body) => {
    const session = newSession(String(body.title ?? ''));
    emit(session, 'session:created', { session: session.resource });
    const presenterToken = token({ session, role: 'presenter', participantId: null });
    return [201, { session: session.resource, presenterToken }];
  }],
  ['POST', /^\/api\/sessions\/([^/]+)\/start$/, (req, [id]) => {
    const session = sessionOf(id);
    auth(req, session, 'presenter');
    if (session.resource.status !== 'created') throw new Failure(409, 'invalid_state');
    Object.assign(session.resource, { status: 'started', startedAt: now() });
    emit(session, 'session:started', { session: session.resource });
    return [200, session.resource];
  }],
  ['POST', /^\/api\/sessions\/([^/]+)\/end$/, (req, [id]) => {
    const session = sessionOf(id);
    auth(req, session, 'presenter');
    if (session.resource.status === 'ended') throw new Failure(409, 'session_ended');
    if (session.resource.activePollId) closePoll(session, polls.get(session.resource.activePollId));
    Object.assign(session.resource, { status: 'ended', endedAt: now() });
    codes.delete(session.resource.code);
    emit(session, 'session:ended', { session: session.resource });
    return [200, session.resource];
  }],
  ['POST', /^\/api\/join$/, (req, _, body) => {
    const session = codes.get(String(body.code ?? '').toUpperCase());
    if (!session) throw new Failure(404, 'session_not_found');
    const t = now();
    const participant = {
      id: crypto.randomUUID(), sessionId: session.id, displayName: String(body.displayName ?? ''),
      joinedAt: t, lastSeenAt: t, connected: false,
    };
    session.participants.set(participant.id, participant);
    emit(session, 'participant:joined', { participant }, new Set());
    const participantToken = token({ session, role: 'participant', participantId: participant.id });
    return [201, { participant, participantToken, session: session.resource }];
  }],
  ['POST', /^\/api\/sessions\/([^/]+)\/polls$/, (req, [id], body) => {
    const session = sessionOf(id);
    auth(req, session, 'presenter');
    if (session.resource.status === 'ended') throw new Failure(409, 'session_ended');
    const options = body.options ?? [];
    const poll = {
      id: crypto.randomUUID(), sessionId: session.id, question: String(body.question ?? ''),
      kind: 'single', maxChoices: 1, status: 'draft',
      options: options.map((text) => ({ id: crypto.randomUUID(), text: String(text) })),
      createdAt: now(), activatedAt: null, closedAt: null,
    };
    polls.set(poll.id, { poll, session, tally: options.map(() => 0), voters: new Set() });
    emit(session, 'poll:created', { poll });
    return [201, poll];
  }],
  ['POST', /^\/api\/polls\/([^/]+)\/activate$/, (req, [id]) => {
    const entry = pollOf(id);
    const { session } = entry;
    auth(req, session, 'presenter');
    if (session.resource.status !== 'started') throw new Failure(409, 'session_not_started');
    if (entry.poll.status !== 'draft') throw new Failure(409, 'invalid_state');
    if (session.resource.activePollId) closePoll(session, polls.get(session.resource.activePollId));
    Object.assign(entry.poll, { status: 'active', activatedAt: now() });
    session.resource.activePollId = entry.poll.id;
    emit(session, 'poll:activated', { poll: entry.poll });
    return [200, entry.poll];
  }],
  ['POST', /^\/api\/polls\/([^/]+)\/close$/, (req, [id]) => {
    const entry = pollOf(id);
    auth(req, entry.session, 'presenter');
    if (entry.poll.status !== 'active') throw new Failure(409, 'invalid_state');
    closePoll(entry.session, entry);
    return [200, entry.poll];
  }],
  ['POST', /^\/api\/polls\/([^/]+)\/votes$/, (req, [id], body) => {
    const entry = pollOf(id);
    const { session } = entry;
    const claims = auth(req, session, 'participant');
    if (entry.poll.status !== 'active') throw new Failure(409, 'poll_not_active');
    if (entry.voters.has(claims.participantId)) throw new Failure(409, 'already_voted');
    const chosen = body.optionIds ?? [];
    const index = entry.poll.options.findIndex((o) => o.id === chosen[0]);
    if (chosen.length !== 1 || index < 0) throw new Failure(422, 'invalid_option');
    entry.voters.add(claims.participantId);
    entry.tally[index] += 1;
    const vote = {
      id: crypto.randomUUID(), pollId: entry.poll.id, participantId: claims.participantId,
      optionIds: chosen, createdAt: now(),
    };
    emit(session, 'vote:accepted', { vote }, new Set([claims.participantId]));
    // Coalesced: one results:updated per interval for the poll.
    if (session.pending !== entry.poll.id) {
      flushResults(session);
      session.pending = entry.poll.id;
      session.timer = setTimeout(() => flushResults(session), RESULTS_INTERVAL_MS);
    }
    return [201, { vote }];
  }],
  ['GET', /^\/api\/polls\/([^/]+)\/results$/, (req, [id]) => {
    const entry = pollOf(id);
    auth(req, entry.session);
    return [200, results(entry, entry.poll.status === 'closed')];
  }],
  ['GET', /^\/healthz$/, () => [200, {}]],
];

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const path = req.url.split('?')[0];
    if (req.method === 'GET' && path === '/metrics') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('');
      return;
    }
    try {
      for (const [method, pattern, handle] of routes) {
        const m = req.method === method && pattern.exec(path);
        if (!m) continue;
        let body = {};
        if (chunks.length) {
          try { body = JSON.parse(Buffer.concat(chunks)); } catch { throw new Failure(400, 'invalid_body'); }
        }
        const [status, out] = handle(req, m.slice(1), body);
        reply(res, status, out);
        return;
      }
      throw new Failure(404, 'not_found');
    } catch (e) {
      if (!(e instanceof Failure)) throw e;
      reply(res, e.status, { error: { code: e.code, message: e.code } });
    }
  });
});

// The position after which `lastEventId` asks for events (0 for none).
const positionOf = (lastEventId) => parseInt(lastEventId.replaceAll('-', '').slice(0, 12), 16) || 0;

const io = TRANSPORT === 'socketio'
  ? new SocketIo(server, { transports: ['websocket'], perMessageDeflate: false, serveClient: false, maxHttpBufferSize: 4096 })
  : null;

// Socket.IO: the same admission, replay and seam as the ws transport, in rooms.
io?.on('connection', (socket) => {
  const query = socket.handshake.query;
  const session = sessions.get(query.sessionId);
  const claims = tokens.get(query.token ?? '');
  if (!session || !claims || claims.session !== session) {
    socket.emit('pollcast', {
      eventId: null, eventType: 'connection:error', timestamp: now(), sessionId: query.sessionId,
      payload: { code: 'unauthorized', message: 'unauthorized' },
    });
    socket.disconnect(true);
    return;
  }
  const last = session.log.at(-1);
  socket.emit('pollcast', {
    eventId: null, eventType: 'connection:established', timestamp: now(), sessionId: session.id,
    payload: {
      connectionId: socket.id, role: claims.role, participantId: claims.participantId,
      lastEventId: last ? last.id : null, heartbeatIntervalMs: 25_000,
    },
  });
  // Replay and joining the rooms happen in one turn of the event loop: nothing
  // can be emitted between them.
  if (query.lastEventId) {
    let replayed = 0;
    for (const event of session.log.slice(positionOf(query.lastEventId))) {
      if (event.to === 'room' || claims.role === 'presenter' || event.to.has(claims.participantId)) {
        socket.emit('pollcast', event.envelope);
        replayed += 1;
      }
    }
    socket.emit('pollcast', {
      eventId: null, eventType: 'connection:reconnected', timestamp: now(), sessionId: session.id,
      payload: { fromEventId: query.lastEventId, replayed, recovered: true },
    });
  }
  socket.join(claims.role === 'presenter'
    ? [session.id, `${session.id}:presenters`]
    : [session.id, `${session.id}:${claims.participantId}`]);
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 4096 });

// Socket.IO handles its own upgrades (on /socket.io/).
if (!io) server.on('upgrade', (req, socket, head) => {
  wss.handleUpgrade(req, socket, head, (ws) => {
    const query = new URL(req.url, 'http://peer').searchParams;
    const session = sessions.get(query.get('sessionId'));
    const claims = tokens.get(query.get('token') ?? '');
    const refuse = (code, name) => {
      ws.send(JSON.stringify({
        eventId: null, eventType: 'connection:error', timestamp: now(),
        sessionId: query.get('sessionId'), payload: { code: name, message: name },
      }));
      ws.close(code);
    };
    if (!session) return refuse(4404, 'session_not_found');
    if (!claims) return refuse(4401, 'unauthorized');
    if (claims.session !== session) return refuse(4403, 'forbidden');
    Object.assign(ws, { role: claims.role, participantId: claims.participantId, live: false });
    const last = session.log.at(-1);
    ws.send(JSON.stringify({
      eventId: null, eventType: 'connection:established', timestamp: now(), sessionId: session.id,
      payload: {
        connectionId: crypto.randomUUID(), role: claims.role, participantId: claims.participantId,
        lastEventId: last ? last.id : null, heartbeatIntervalMs: HEARTBEAT_MS,
      },
    }));
    session.sockets.add(ws);
    if (claims.role === 'presenter') session.presenters.add(ws);
    else {
      if (!session.byParticipant.has(claims.participantId)) session.byParticipant.set(claims.participantId, new Set());
      session.byParticipant.get(claims.participantId).add(ws);
    }
    // Replay: everything after lastEventId this socket may see, then the seam.
    // The log is in memory, so the replay and going live happen in one turn of the
    // event loop: nothing can be emitted between them.
    const from = query.get('lastEventId');
    if (from) {
      let replayed = 0;
      for (const event of session.log.slice(positionOf(from))) {
        if (event.to === 'room' || ws.role === 'presenter' || event.to.has(ws.participantId)) {
          ws.send(event.frame, { binary: false });
          replayed += 1;
        }
      }
      ws.send(JSON.stringify({
        eventId: null, eventType: 'connection:reconnected', timestamp: now(), sessionId: session.id,
        payload: { fromEventId: from, replayed, recovered: true },
      }));
    }
    ws.live = true;
    const ping = setInterval(() => ws.send(JSON.stringify({
      eventId: null, eventType: 'heartbeat:ping', timestamp: now(), sessionId: session.id, payload: {},
    })), HEARTBEAT_MS);
    ws.on('message', () => {}); // heartbeat:pong; nothing else is expected
    ws.on('close', () => {
      clearInterval(ping);
      session.sockets.delete(ws);
      session.presenters.delete(ws);
      session.byParticipant.get(ws.participantId)?.delete(ws);
    });
  });
});

server.keepAliveTimeout = 10_000;
// The address on stderr's first line: with port 0 the system picks one.
server.listen(Number(port), host, () => console.error(`node peer (${TRANSPORT}) on ${host}:${server.address().port}`));
