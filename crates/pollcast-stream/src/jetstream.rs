//! The JetStream engine: every session's log in one NATS JetStream stream, for
//! deployments of several api and edge processes (and, later, regions).
//!
//! Layout (see `nats/` and `docs/architecture.md`):
//! - events: stream `<stream>` (default `POLLCAST_EVENTS`), subjects
//!   `<prefix>.session.<sessionId>`, one subject per session, file storage. The
//!   per-subject message limit is the history window in events, `max_age` the one in
//!   time. A message is the MessagePack envelope the WebSocket's MessagePack format
//!   uses, with the event id as `Nats-Msg-Id`.
//! - presence: work-queue stream `<stream>_PRESENCE`, subject `<prefix>.presence`,
//!   one durable pull consumer shared by every api node, so each signal is handled by
//!   one node and survives a restart of all of them.
//!
//! Ordering. A publish carries `Nats-Expected-Last-Subject-Sequence`: the stream
//! sequence of the session's previous position, so JetStream itself refuses a second
//! writer's out-of-order append. A retried publish comes back as a duplicate ack
//! (clustered: the msg-id window is checked first) or as a wrong-last-sequence error
//! (standalone: the expectation is checked first); both are read as `Duplicate` after
//! looking at the subject's tail on the stream leader.
//!
//! Runs. A session's backlog (a run of at least [`NatsConfig::batch_min`] events)
//! goes in atomic batches (ADR-50, nats-server 2.12+, the stream's
//! `allow_atomic`): the first message carries the expectation, the last the
//! commit, and one acknowledgement answers for all; the server stores all of
//! them or none. A batch may not carry `Nats-Msg-Id`, and needs none: a retried
//! batch fails the expectation and is read as duplicates from the tail, as
//! above. One event per acknowledgement paces a session at 3 000–5 000 events a
//! second; a batch costs the server a staging store of its own, so short runs
//! still go one by one.
//!
//! Reading. Positions are consecutive within a subject, so the message at a position
//! is found by searching stream sequences with Direct Get `next_by_subj`
//! (interpolation and bisection steps alternating: O(log n) probes worst case, one or
//! two when the session's messages are evenly spread), then read in batches with
//! Direct Get `batch` (nats-server 2.11+), answered by any replica.
//!
//! Live events reach edges through a core NATS subscription on
//! `<prefix>.live.<sessionId>`, where the stream republishes each message once it
//! has stored it, not a consumer: no consumer is created per room, so opening
//! 10 000 rooms costs the meta leader nothing. (Subscribing to the stream's own
//! subject would show a message when it is sent, before it is stored, or even when
//! the stream refuses it; during a leader change a room could then run ahead of
//! the stream.) Core delivery is at most once, so a subscription also reports
//! [`StreamError::Lagged`] after every reconnect of the client, after a
//! slow-consumer drop, and when it has been silent for a while; the room then reads
//! what it missed from the stream, which is the source of truth.
//!
//! Regions. In a super-cluster (one NATS cluster per region, joined by gateways)
//! the events stream lives in the cluster of the api that created it (its
//! placement is kept on every later update, so an api started elsewhere never
//! moves it). An edge whose NATS cluster is another one reads from a mirror of
//! the stream in its own cluster, `<stream>_MIRROR_<cluster>`, which it creates
//! when missing: the mirror keeps the origin's sequences and positions, answers
//! Direct Gets locally, and republishes what it has stored to
//! `<prefix>.region.<cluster>.live.<sessionId>`, where that region's rooms
//! subscribe. So live events and replays never cross a gateway at read time, a
//! region cut off from the origin keeps serving what it holds, and when the link
//! returns the mirror catches up in order and its republish carries the rest.
//! A mirror may be behind the origin: a reader asking for more than it holds is
//! told there is nothing yet (not that history is lost), and gets the rest live.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::header::{
    self, NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    self, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, Placement, RetentionPolicy,
};
use async_nats::jetstream::{self, Context, ErrorCode};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, ServerAddr, Subject, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use pollcast_protocol::{DomainEvent, Envelope, PresenceSignal, SessionEvent, WireFormat};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};
use uuid::Uuid;

use crate::{
    EventStream, LiveEvents, PresenceFeed, PresenceSignals, Published, PublishedRun, ReadBatch,
    Retention, StreamError, Subscription, publish_each,
};

/// Messages asked for per Direct Get batch request.
const DIRECT_BATCH: usize = 256;
/// Longest wait for any one answer from NATS.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a JetStream API answer or a publish acknowledgement.
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Name of the durable consumer every api node pulls presence signals from.
const PRESENCE_CONSUMER: &str = "pollcast-presence";
/// Presence signals waiting to be published before new ones are dropped (and
/// counted): presence heals itself (heartbeats re-open, the sweep closes), a
/// connection task must never wait for NATS.
const PRESENCE_QUEUE: usize = 1 << 16;
/// Silence after which a live subscription asks its room to check the stream, and
/// the spacing of the checks after that: covers an event that reached the stream
/// but not the subscription (published just before it was registered, or lost in
/// a reconnect the client did not report).
const SILENCE_CHECKS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(15),
];
/// Sessions whose newest (position, sequence) the publisher remembers.
const TAIL_CACHE: usize = 100_000;
/// Most events in one atomic batch. The server takes up to 1 000; a smaller batch
/// bounds what the server stages for it and what a refused batch sends again.
const BATCH_MAX: usize = 256;
/// [`NatsConfig::batch_min`] unless set otherwise.
pub const DEFAULT_BATCH_MIN: usize = 64;
/// Atomic batches this process has open at once. The server refuses more than 50
/// per stream, from all api nodes together; past this, runs wait for a turn
/// (a batch is open for one round trip).
const BATCHES_AT_ONCE: usize = 16;

/// How to reach NATS and what to call things there.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URLs of one cluster (`nats://host:4222`, `tls://…` for TLS).
    pub urls: Vec<String>,
    /// A `.creds` file (JWT and nkey seed) for servers with decentralised auth.
    pub credentials_file: Option<PathBuf>,
    /// A token, for servers with token auth.
    pub token: Option<String>,
    /// The events stream; the presence stream is this name with `_PRESENCE`.
    pub stream_name: String,
    /// First token of every subject, so several deployments can share a server.
    pub subject_prefix: String,
    /// Replicas of both streams (1 standalone, 3 on a three-node cluster).
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` (capped at the history age).
    pub duplicate_window: Duration,
    /// Name of this client in the server's connection list.
    pub connection_name: String,
    /// Create or update the streams at start-up to match this configuration. Api
    /// nodes do; edges only wait for the streams to exist, so that an edge
    /// started with other flags can never reconfigure (say, shrink) them.
    pub manage_streams: bool,
    /// Read from a mirror in this process's own NATS cluster when the events
    /// stream lives in another one (edges in a region other than the api's).
    pub regional_reads: bool,
    /// Shortest run of a session's events sent as one atomic batch; shorter runs
    /// go one event per acknowledgement. The server stages each batch in a store
    /// of its own, which costs more than a few single publishes (measured in
    /// `docs/benchmarks.md`, "Atomic batches").
    pub batch_min: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".into()],
            credentials_file: None,
            token: None,
            stream_name: "POLLCAST_EVENTS".into(),
            subject_prefix: "pollcast".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            connection_name: "pollcast".into(),
            manage_streams: true,
            regional_reads: false,
            batch_min: DEFAULT_BATCH_MIN,
        }
    }
}

/// The stream this process reads events from: the events stream itself, or its
/// mirror in this process's region.
struct Reader {
    /// Handle for Direct Gets and leader lookups.
    stream: stream::Stream<()>,
    /// Its name (Direct Get batches address it).
    name: String,
    /// Live subjects are this plus `.<sessionId>`.
    live_prefix: String,
    /// A mirror may be behind the origin; asking for more than it holds is
    /// "nothing yet", never a truncation.
    mirror: bool,
}

/// A session's newest event as the stream holds it.
#[derive(Clone, Copy, Debug)]
struct Tail {
    position: u64,
    sequence: u64,
}

/// The JetStream engine.
pub struct JetStreamStream {
    client: Client,
    js: Context,
    /// Handle on the events stream, for the publisher's leader lookups.
    events: stream::Stream<()>,
    /// Where reads and live events come from.
    reader: Reader,
    config: NatsConfig,
    /// Newest (position, sequence) per session as this process last published or
    /// saw it: the expectation for the next publish, saving a lookup per event.
    tails: Mutex<HashMap<Uuid, Tail>>,
    /// Counts (re)connections and slow-consumer drops: each may have lost core
    /// messages, so every live subscription reports a lag when it moves.
    epoch: watch::Receiver<u64>,
    /// Presence signals on their way to NATS.
    presence_tx: mpsc::Sender<PresenceSignal>,
    /// Whether the events stream takes atomic batches (`allow_atomic`, and a
    /// server that knows it); runs are published one event at a time otherwise.
    atomic: AtomicBool,
    /// Turns for open atomic batches ([`BATCHES_AT_ONCE`]).
    batch_turns: Semaphore,
}

/// Why an atomic batch was not stored.
enum BatchRefused {
    /// The first message's expectation failed: the session's tail is not the one
    /// assumed (another writer, or this batch sent before).
    WrongLastSequence,
    /// The server does not take this batch as one; its events may go one by
    /// one. `lasting` when the stream takes no batches at all.
    NotAsBatch { lasting: bool, why: String },
    /// No answer, or another refusal.
    Failed(StreamError),
}

impl JetStreamStream {
    /// Connects to NATS and creates or updates both streams to match `config` and
    /// `retention`. A JetStream cluster that has not elected a leader yet is waited
    /// for (up to 30 s).
    pub async fn connect(config: NatsConfig, retention: Retention) -> Result<Self, StreamError> {
        let (epoch_tx, epoch) = watch::channel(0u64);
        let mut options = ConnectOptions::new()
            .name(&config.connection_name)
            .request_timeout(Some(REQUEST_TIMEOUT))
            // Unlimited reconnects: an edge keeps its sockets through an outage.
            .max_reconnects(None)
            .event_callback(move |event| {
                let epoch = epoch_tx.clone();
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("connected to NATS");
                            epoch.send_modify(|e| *e += 1);
                        }
                        Event::SlowConsumer(sid) => {
                            tracing::warn!(sid, "NATS dropped messages for a slow subscription");
                            epoch.send_modify(|e| *e += 1);
                        }
                        Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        other => tracing::info!(event = %other, "NATS"),
                    }
                }
            });
        if let Some(path) = &config.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                StreamError::Unavailable(format!("reading {}: {e}", path.display()))
            })?;
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        let addrs = config
            .urls
            .iter()
            .map(|url| url.parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StreamError::Unavailable(format!("bad NATS URL: {e}")))?;
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| StreamError::Unavailable(format!("connecting to NATS: {e}")))?;
        // A publish lost in a reconnect is retried (and deduplicated) by the relay;
        // waiting long for its ack only delays everything behind it.
        let js = jetstream::ContextBuilder::new()
            .timeout(JETSTREAM_TIMEOUT)
            .build(client.clone());
        let cluster = client.server_info().cluster.filter(|c| !c.is_empty());
        ensure_streams(&js, &config, retention, cluster.as_deref()).await?;
        let events = js
            .get_stream_no_info(&config.stream_name)
            .await
            .map_err(|e| unavailable("opening the events stream", e))?;
        // A server before 2.12 drops `allow_atomic` from the configuration, and
        // would store a batch's messages as plain ones, unchecked.
        let atomic = js
            .get_stream(&config.stream_name)
            .await
            .map_err(|e| unavailable("reading the events stream's configuration", e))?
            .cached_info()
            .config
            .allow_atomic_publish;
        if !atomic {
            tracing::warn!(
                stream = %config.stream_name,
                "the events stream takes no atomic batches (allow_atomic, nats-server 2.12+): a session's events are published one at a time"
            );
        }
        let reader = retrying(|| open_reader(&js, &config, cluster.as_deref())).await?;
        if reader.mirror {
            tracing::info!(mirror = %reader.name, "reading events from this region's mirror");
        }
        let (presence_tx, presence_rx) = mpsc::channel(PRESENCE_QUEUE);
        tokio::spawn(publish_presence(
            js.clone(),
            presence_subject(&config),
            presence_rx,
        ));
        Ok(Self {
            client,
            js,
            events,
            reader,
            config,
            tails: Mutex::new(HashMap::new()),
            epoch,
            presence_tx,
            atomic: AtomicBool::new(atomic),
            batch_turns: Semaphore::new(BATCHES_AT_ONCE),
        })
    }

    fn subject(&self, session: Uuid) -> String {
        format!("{}.session.{session}", self.config.subject_prefix)
    }

    /// Where the stream read from republishes a session's events once it has
    /// stored them.
    fn live_subject(&self, session: Uuid) -> String {
        format!("{}.{session}", self.reader.live_prefix)
    }

    fn tails(&self) -> MutexGuard<'_, HashMap<Uuid, Tail>> {
        self.tails.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, session: Uuid, tail: Tail) {
        let mut tails = self.tails();
        if tails.len() >= TAIL_CACHE && !tails.contains_key(&session) {
            // Simpler than an LRU and just as correct: a miss costs one lookup.
            tails.clear();
        }
        tails.insert(session, tail);
    }

    /// The session's newest event as this process last published or saw it, else
    /// as the stream leader has it.
    async fn publisher_tail(&self, session: Uuid) -> Result<Option<Tail>, StreamError> {
        if let Some(tail) = self.tails().get(&session).copied() {
            return Ok(Some(tail));
        }
        let tail = self.leader_tail(&self.events, session).await?;
        if let Some(tail) = tail {
            self.remember(session, tail);
        }
        Ok(tail)
    }

    /// Sends `payloads` to `subject` as one atomic batch whose first message
    /// expects the subject's last sequence to be `expected` (0: no message yet);
    /// returns the stream sequence of the last one.
    async fn send_batch(
        &self,
        subject: &Subject,
        expected: u64,
        payloads: &[Bytes],
    ) -> Result<u64, BatchRefused> {
        let _turn = self.batch_turns.acquire().await.map_err(|_| {
            BatchRefused::Failed(StreamError::Unavailable("the engine is closing".into()))
        })?;
        let id = Uuid::now_v7().simple().to_string();
        let headers = |number: usize| {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_BATCH_ID, id.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, header::HeaderValue::from(number));
            if number == 1 {
                // The server checks it against the stream as it was before the
                // batch, and allows it on the first message only.
                headers.insert(
                    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    header::HeaderValue::from(expected),
                );
            }
            headers
        };
        let Some((last, first)) = payloads.split_last() else {
            return Err(BatchRefused::Failed(StreamError::Unavailable(
                "an empty batch".into(),
            )));
        };
        // All but the last without a reply: the commit's acknowledgement answers
        // for the batch, and one round trip is the point.
        for (number, payload) in (1..).zip(first) {
            self.client
                .publish_with_headers(subject.clone(), headers(number), payload.clone())
                .await
                .map_err(|e| BatchRefused::Failed(unavailable("publishing a batch", e)))?;
        }
        let mut commit = headers(payloads.len());
        commit.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
        let message = PublishMessage::build()
            .payload(last.clone())
            .headers(commit);
        let ack = self
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(|e| BatchRefused::Failed(unavailable("publishing a batch", e)))?
            .await;
        match ack {
            Ok(ack)
                if ack.batch_id.as_deref() == Some(id.as_str())
                    && ack.batch_size == Some(payloads.len() as u64) =>
            {
                Ok(ack.sequence)
            }
            // Stored, but not as the batch sent: a server that does not know
            // batches stored the last message alone, or all of them unchecked.
            Ok(ack) => Err(BatchRefused::Failed(StreamError::Unavailable(format!(
                "batch {id} acknowledged as {:?} of {:?} messages",
                ack.batch_id, ack.batch_size
            )))),
            Err(err) if matches!(err.kind(), PublishErrorKind::WrongLastSequence) => {
                Err(BatchRefused::WrongLastSequence)
            }
            Err(err) => match api_error(&err) {
                Some(code) if NOT_AS_BATCH.contains(&code) => Err(BatchRefused::NotAsBatch {
                    lasting: code == ErrorCode::ATOMIC_PUBLISH_DISABLED,
                    why: err.to_string(),
                }),
                _ => Err(BatchRefused::Failed(unavailable(
                    "batch not acknowledged",
                    err,
                ))),
            },
        }
    }

    /// The session's newest event, asked of the leader of `stream` (publishing
    /// must not act on a replica that is behind).
    async fn leader_tail(
        &self,
        stream: &stream::Stream<()>,
        session: Uuid,
    ) -> Result<Option<Tail>, StreamError> {
        let found = stream
            .get_last_raw_message_by_subject(&self.subject(session))
            .await;
        tail_of(found, raw_not_found, "reading the session's tail")
    }

    /// The session's oldest retained event, asked of the leader of the stream
    /// read from.
    async fn leader_first(&self, session: Uuid) -> Result<Option<Tail>, StreamError> {
        let found = self
            .reader
            .stream
            .raw_message_builder()
            .next_by_subject(self.subject(session))
            .sequence(1)
            .send()
            .await;
        tail_of(found, raw_not_found, "reading the session's oldest event")
    }

    /// Whether the log really no longer holds (or never held) the event after
    /// `after`, asked of the stream leader. Direct Gets are answered by any
    /// replica, and one that is behind (during a leader change, say) would make a
    /// reader give up on history that exists; so a truncation seen there is
    /// confirmed here before anyone acts on it.
    async fn truly_truncated(&self, session: Uuid, after: u64) -> Result<bool, StreamError> {
        let Some(tail) = self.leader_tail(&self.reader.stream, session).await? else {
            return Ok(after != 0 && !self.reader.mirror);
        };
        if after >= tail.position {
            return Ok(after > tail.position && !self.reader.mirror);
        }
        Ok(self
            .leader_first(session)
            .await?
            .is_none_or(|first| first.position > after + 1))
    }

    /// The first message of `subject` at or after stream sequence `from` (Direct
    /// Get, any replica), with its position.
    async fn next_at(&self, subject: &str, from: u64) -> Result<Option<Tail>, StreamError> {
        let found = self
            .reader
            .stream
            .direct_get_next_for_subject(subject, Some(from.max(1)))
            .await;
        tail_of(found, direct_not_found, "direct get")
    }

    /// The newest message of `subject` (Direct Get, any replica).
    async fn direct_tail(&self, subject: &str) -> Result<Option<Tail>, StreamError> {
        let found = self
            .reader
            .stream
            .direct_get_last_for_subject(subject)
            .await;
        tail_of(found, direct_not_found, "direct get")
    }

    /// The stream sequence of position `target` of `subject`, given a message
    /// before it (`lo`) and one at or after it (`hi`).
    ///
    /// The window `(lo.sequence, upper]` always holds the target. Each probe asks
    /// for the first message of the subject at or after a guess; the answer either
    /// is the target, raises `lo`, or proves nothing of the subject lies between the
    /// guess and the answer, which lowers `upper`. Guesses alternate between
    /// interpolation (positions are consecutive, sequences roughly proportional) and
    /// bisection, so the worst case stays logarithmic.
    async fn locate(
        &self,
        subject: &str,
        mut lo: Tail,
        mut hi: Tail,
        target: u64,
    ) -> Result<u64, StreamError> {
        let mut upper = hi.sequence;
        let mut bisect = false;
        while lo.sequence + 1 < upper {
            let guess = if bisect {
                lo.sequence + (upper - lo.sequence).div_ceil(2)
            } else {
                let span = u128::from(hi.sequence - lo.sequence);
                let ahead = u128::from(target - lo.position);
                let positions = u128::from(hi.position - lo.position).max(1);
                lo.sequence + u64::try_from(ahead * span / positions).unwrap_or(u64::MAX)
            };
            bisect = !bisect;
            let guess = guess.clamp(lo.sequence + 1, upper);
            let Some(found) = self.next_at(subject, guess).await? else {
                break;
            };
            match found.position.cmp(&target) {
                std::cmp::Ordering::Equal => return Ok(found.sequence),
                std::cmp::Ordering::Less => lo = found,
                std::cmp::Ordering::Greater => {
                    hi = found;
                    upper = upper.min(guess - 1).max(lo.sequence);
                }
            }
        }
        // Nothing left between: the target is the next message after `lo` (or gone,
        // which the caller sees from the first position it reads).
        Ok(lo.sequence + 1)
    }

    /// `read_after` from whichever replicas answer first.
    async fn read_direct(
        &self,
        session: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<ReadBatch, StreamError> {
        let subject = self.subject(session);
        // A mirror without (all of) what the reader has seen is behind the
        // origin, which never means lost history.
        let behind_is_loss = !self.reader.mirror;
        let Some(tail) = self.direct_tail(&subject).await? else {
            return Ok(ReadBatch {
                events: Vec::new(),
                truncated: after != 0 && behind_is_loss,
            });
        };
        if after >= tail.position || limit == 0 {
            return Ok(ReadBatch {
                events: Vec::new(),
                truncated: after > tail.position && behind_is_loss,
            });
        }
        let target = after + 1;
        let start = if tail.position == target {
            tail.sequence
        } else {
            match self.next_at(&subject, 1).await? {
                None => {
                    return Ok(ReadBatch {
                        events: Vec::new(),
                        truncated: true,
                    });
                }
                Some(first) if first.position >= target => first.sequence,
                Some(first) => self.locate(&subject, first, tail, target).await?,
            }
        };
        let mut events: Vec<Arc<SessionEvent>> = Vec::new();
        let mut next = start;
        while events.len() < limit {
            let want = (limit - events.len()).min(DIRECT_BATCH);
            let batch = self.read_batch(&subject, next, want).await?;
            let full = batch.len() == want;
            for (sequence, event) in batch {
                next = sequence + 1;
                // Only ever hand out a consecutive run: a reader must not skip.
                let expected = events.last().map_or(event.position, |e| e.position + 1);
                if event.position != expected || event.position <= after {
                    continue;
                }
                events.push(Arc::new(event));
            }
            if !full {
                break;
            }
        }
        let truncated = events.first().is_some_and(|e| e.position > target);
        Ok(ReadBatch { events, truncated })
    }

    /// Up to `batch` messages of `subject` from stream sequence `from` on, with one
    /// Direct Get batch request (nats-server 2.11+).
    async fn read_batch(
        &self,
        subject: &str,
        from: u64,
        batch: usize,
    ) -> Result<Vec<(u64, SessionEvent)>, StreamError> {
        #[derive(serde::Serialize)]
        struct Request<'a> {
            seq: u64,
            next_by_subj: &'a str,
            batch: usize,
        }
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable("subscribing for a batch", e))?;
        let body = serde_json::to_vec(&Request {
            seq: from.max(1),
            next_by_subj: subject,
            batch,
        })
        .map_err(|e| StreamError::Corrupt(e.to_string()))?;
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", self.reader.name),
                inbox,
                Bytes::from(body),
            )
            .await
            .map_err(|e| unavailable("direct get batch", e))?;
        let mut events = Vec::new();
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let Ok(reply) = tokio::time::timeout_at(deadline, replies.next()).await else {
                return Err(StreamError::Unavailable(
                    "direct get batch timed out".into(),
                ));
            };
            let Some(message) = reply else {
                return Err(StreamError::Unavailable(
                    "direct get batch: subscription ended".into(),
                ));
            };
            match message.status.map(|s| s.as_u16()) {
                // 204: end of the batch; 404: nothing (left) to read.
                Some(204 | 404) => break,
                Some(status) => {
                    return Err(StreamError::Unavailable(format!(
                        "direct get batch: {status} {}",
                        message.description.unwrap_or_default()
                    )));
                }
                None => {
                    let sequence = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Sequence"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .ok_or_else(|| StreamError::Corrupt("message without sequence".into()))?;
                    events.push((sequence, decode(&message.payload)?));
                    if events.len() >= batch {
                        break;
                    }
                }
            }
        }
        let _ = replies.unsubscribe().await;
        Ok(events)
    }
}

/// Creates or updates the events and presence streams and the presence consumer
/// (or, unless `manage_streams`, waits for them to exist). A stream created here
/// is placed in `cluster`, the NATS cluster this process is connected to; an
/// existing one keeps its placement, so an api in another region never moves it.
async fn ensure_streams(
    js: &Context,
    config: &NatsConfig,
    retention: Retention,
    cluster: Option<&str>,
) -> Result<(), StreamError> {
    let events = events_stream(config, retention);
    let presence = presence_stream(config);
    retrying(|| async {
        if !config.manage_streams {
            for name in [&events.name, &presence.name] {
                js.get_stream(name)
                    .await
                    .map_err(|e| unavailable("waiting for the api to create the streams", e))?;
            }
            return Ok(());
        }
        for wanted in [&events, &presence] {
            let mut wanted = wanted.clone();
            wanted.placement = placement(js, &wanted.name, cluster).await?;
            js.create_or_update_stream(wanted)
                .await
                .map_err(|e| unavailable("creating the streams", e))?;
        }
        let presence = js
            .get_stream(&presence.name)
            .await
            .map_err(|e| unavailable("opening the presence stream", e))?;
        presence
            .get_or_create_consumer(PRESENCE_CONSUMER, presence_consumer())
            .await
            .map_err(|e| unavailable("creating the presence consumer", e))?;
        Ok(())
    })
    .await
}

/// Runs `attempt` until it succeeds, for up to 30 s: a JetStream cluster answers
/// nothing until it has elected its meta leader.
async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, StreamError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StreamError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(err) if Instant::now() < deadline => {
                tracing::info!(error = %err, "JetStream not ready yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// The placement to give stream `name`: the one it has, or `cluster` for a new
/// stream.
async fn placement(
    js: &Context,
    name: &str,
    cluster: Option<&str>,
) -> Result<Option<Placement>, StreamError> {
    match js.get_stream(name).await {
        Ok(existing) => Ok(existing.cached_info().config.placement.clone()),
        Err(err) if stream_not_found(&err.kind()) => Ok(cluster.map(|cluster| Placement {
            cluster: Some(cluster.to_owned()),
            tags: Vec::new(),
        })),
        Err(err) => Err(unavailable("looking up a stream", err)),
    }
}

fn stream_not_found(kind: &GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// The stream to read from: the events stream, or (for `regional_reads` in a
/// cluster other than the stream's) this cluster's mirror of it, created when
/// missing.
async fn open_reader(
    js: &Context,
    config: &NatsConfig,
    cluster: Option<&str>,
) -> Result<Reader, StreamError> {
    let origin = js
        .get_stream(&config.stream_name)
        .await
        .map_err(|e| unavailable("opening the events stream", e))?;
    let info = origin.cached_info();
    let home = info.cluster.as_ref().and_then(|c| c.name.as_deref());
    let local = match (cluster, home) {
        (Some(local), Some(home)) if config.regional_reads && local != home => local,
        _ => {
            return Ok(Reader {
                stream: js
                    .get_stream_no_info(&config.stream_name)
                    .await
                    .map_err(|e| unavailable("opening the events stream", e))?,
                name: config.stream_name.clone(),
                live_prefix: format!("{}.live", config.subject_prefix),
                mirror: false,
            });
        }
    };
    let wanted = mirror_stream(config, &info.config, local);
    let name = wanted.name.clone();
    let live_prefix = region_live_prefix(config, local);
    if let Err(err) = js.get_stream(&name).await {
        if !stream_not_found(&err.kind()) {
            return Err(unavailable("looking up this region's mirror", err));
        }
        // Another edge of the region may create it at the same moment: the same
        // definition is accepted twice, and a different one is used as it is.
        if let Err(err) = js.create_stream(wanted).await {
            tracing::info!(error = %err, mirror = %name, "mirror not created here; using the existing one");
        }
    }
    Ok(Reader {
        stream: js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| unavailable("opening this region's mirror", e))?,
        name,
        live_prefix,
        mirror: true,
    })
}

/// The mirror of the events stream (`origin`) in NATS cluster `cluster`: the same
/// history limits, its own replicas (this process's `replicas`), Direct Get, and a
/// republish of what it stores to the region's live subjects.
pub fn mirror_stream(
    config: &NatsConfig,
    origin: &stream::Config,
    cluster: &str,
) -> stream::Config {
    stream::Config {
        name: format!("{}_MIRROR_{}", config.stream_name, name_token(cluster)),
        mirror: Some(stream::Source {
            name: origin.name.clone(),
            ..Default::default()
        }),
        retention: RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_messages_per_subject: origin.max_messages_per_subject,
        max_age: origin.max_age,
        num_replicas: config.replicas,
        discard: DiscardPolicy::Old,
        allow_direct: true,
        deny_delete: true,
        placement: Some(Placement {
            cluster: Some(cluster.to_owned()),
            tags: Vec::new(),
        }),
        republish: Some(stream::Republish {
            source: format!("{}.session.*", config.subject_prefix),
            destination: format!(
                "{}.{{{{wildcard(1)}}}}",
                region_live_prefix(config, cluster)
            ),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Where the mirror in `cluster` republishes: this plus `.<sessionId>`.
fn region_live_prefix(config: &NatsConfig, cluster: &str) -> String {
    format!(
        "{}.region.{}.live",
        config.subject_prefix,
        name_token(cluster)
    )
}

/// `cluster` as a stream-name part and subject token: NATS cluster names may hold
/// characters (`.`, say) that those may not.
fn name_token(cluster: &str) -> String {
    cluster
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The events stream's definition (also kept as `nats/streams/*.json`).
pub fn events_stream(config: &NatsConfig, retention: Retention) -> stream::Config {
    stream::Config {
        name: config.stream_name.clone(),
        subjects: vec![format!("{}.session.*", config.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_messages_per_subject: i64::try_from(retention.max_events).unwrap_or(i64::MAX),
        max_age: retention.max_age,
        duplicate_window: config.duplicate_window.min(retention.max_age),
        num_replicas: config.replicas,
        discard: DiscardPolicy::Old,
        allow_direct: true,
        // Runs of a session's events go as one batch: see the module documentation.
        allow_atomic_publish: true,
        deny_delete: true,
        // Live delivery of what is stored, never of what was merely sent: see
        // the module documentation.
        republish: Some(stream::Republish {
            source: format!("{}.session.*", config.subject_prefix),
            destination: format!("{}.live.{{{{wildcard(1)}}}}", config.subject_prefix),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// The presence stream's definition (also kept as `nats/streams/*.json`).
pub fn presence_stream(config: &NatsConfig) -> stream::Config {
    stream::Config {
        name: format!("{}_PRESENCE", config.stream_name),
        subjects: vec![presence_subject(config)],
        retention: RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // A signal older than this describes a connection long gone either way.
        max_age: Duration::from_secs(3600),
        num_replicas: config.replicas,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

fn presence_consumer() -> pull::Config {
    pull::Config {
        durable_name: Some(PRESENCE_CONSUMER.into()),
        ack_policy: AckPolicy::Explicit,
        // An api node that took signals and died hands them on after this long.
        ack_wait: Duration::from_secs(10),
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

fn presence_subject(config: &NatsConfig) -> String {
    format!("{}.presence", config.subject_prefix)
}

/// The position and sequence of a message looked up by subject; `None` when the
/// lookup found nothing.
fn tail_of<K>(
    found: Result<StreamMessage, async_nats::error::Error<K>>,
    not_found: fn(&K) -> bool,
    what: &str,
) -> Result<Option<Tail>, StreamError>
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq,
{
    match found {
        Ok(message) => Ok(Some(Tail {
            position: decode(&message.payload)?.position,
            sequence: message.sequence,
        })),
        Err(err) if not_found(&err.kind()) => Ok(None),
        Err(err) => Err(unavailable(what, err)),
    }
}

fn direct_not_found(kind: &DirectGetErrorKind) -> bool {
    matches!(kind, DirectGetErrorKind::NotFound)
}

fn raw_not_found(kind: &LastRawMessageErrorKind) -> bool {
    matches!(kind, LastRawMessageErrorKind::NoMessageFound)
}

/// JetStream's refusals of a batch as a batch, after which its events may still
/// go one by one.
const NOT_AS_BATCH: [ErrorCode; 4] = [
    ErrorCode::ATOMIC_PUBLISH_DISABLED,
    ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT,
    ErrorCode::ATOMIC_PUBLISH_INCOMPLETE_BATCH,
    ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH,
];

/// The JetStream API error code behind a refused publish, if it was one.
fn api_error(err: &async_nats::jetstream::context::PublishError) -> Option<ErrorCode> {
    std::error::Error::source(err)?
        .downcast_ref::<jetstream::Error>()
        .map(|e| e.error_code())
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> StreamError {
    StreamError::Unavailable(format!("{what}: {err}"))
}

/// The envelope on NATS is the WebSocket's MessagePack envelope.
fn encode(event: &SessionEvent) -> Result<Bytes, StreamError> {
    WireFormat::MessagePack
        .encode(&Envelope::from(event))
        .map(Bytes::from)
        .map_err(|e| StreamError::Corrupt(e.to_string()))
}

fn decode(payload: &[u8]) -> Result<SessionEvent, StreamError> {
    let envelope: Envelope<DomainEvent> = WireFormat::MessagePack
        .decode(payload)
        .map_err(|e| StreamError::Corrupt(e.to_string()))?;
    let id = envelope
        .event_id
        .ok_or_else(|| StreamError::Corrupt("event without an id".into()))?;
    let position = id
        .position_in(envelope.session_id)
        .map_err(|e| StreamError::Corrupt(e.to_string()))?;
    Ok(SessionEvent {
        session_id: envelope.session_id,
        position,
        timestamp: envelope.timestamp,
        event: envelope.event,
    })
}

#[async_trait]
impl EventStream for JetStreamStream {
    async fn publish(&self, event: SessionEvent) -> Result<Published, StreamError> {
        if event.position == 0 {
            return Err(StreamError::InvalidPosition);
        }
        let session = event.session_id;
        let subject = self.subject(session);
        let payload = encode(&event)?;
        let id = event.event_id().to_string();
        // A lost race (another node appended first) costs one more lookup; three
        // in a row means something keeps writing, and the relay will come back.
        for _ in 0..3 {
            let tail = self.publisher_tail(session).await?;
            if let Some(tail) = tail {
                if event.position <= tail.position {
                    return Ok(Published::Duplicate);
                }
                if event.position != tail.position + 1 {
                    return Err(StreamError::OutOfOrder {
                        session,
                        expected: tail.position + 1,
                        got: event.position,
                    });
                }
            }
            let message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id)
                // 0: the subject must be empty (the session's first event here).
                .expected_last_subject_sequence(tail.map_or(0, |t| t.sequence));
            let ack = self
                .js
                .send_publish(subject.clone(), message)
                .await
                .map_err(|e| unavailable("publishing", e))?;
            match ack.await {
                Ok(ack) if ack.duplicate => {
                    self.tails().remove(&session);
                    return Ok(Published::Duplicate);
                }
                Ok(ack) => {
                    self.remember(
                        session,
                        Tail {
                            position: event.position,
                            sequence: ack.sequence,
                        },
                    );
                    return Ok(Published::Appended);
                }
                Err(err) if matches!(err.kind(), PublishErrorKind::WrongLastSequence) => {
                    self.tails().remove(&session);
                }
                Err(err) => {
                    self.tails().remove(&session);
                    return Err(unavailable("publish not acknowledged", err));
                }
            }
        }
        Err(StreamError::Unavailable(format!(
            "session {session}: the stream's tail kept moving"
        )))
    }

    async fn publish_run(&self, mut events: Vec<SessionEvent>) -> PublishedRun {
        let one_session_in_order = events.windows(2).all(|pair| {
            pair[1].session_id == pair[0].session_id && pair[1].position == pair[0].position + 1
        });
        let Some(first) = events.first() else {
            return PublishedRun::default();
        };
        if events.len() < self.config.batch_min.max(2)
            || !one_session_in_order
            || first.position == 0
            || !self.atomic.load(Ordering::Relaxed)
        {
            return publish_each(self, events).await;
        }
        let session = first.session_id;
        let stopped = |taken, err| PublishedRun {
            taken,
            stopped: Some(err),
        };
        let payloads = match events.iter().map(encode).collect::<Result<Vec<_>, _>>() {
            Ok(payloads) => payloads,
            Err(err) => return stopped(0, err),
        };
        let subject = Subject::from(self.subject(session));
        let mut taken = 0;
        let mut races = 0;
        while taken < events.len() {
            let tail = match self.publisher_tail(session).await {
                Ok(tail) => tail,
                Err(err) => return stopped(taken, err),
            };
            if let Some(tail) = tail {
                // Already in the stream: sent before, or by another node.
                while events
                    .get(taken)
                    .is_some_and(|e| e.position <= tail.position)
                {
                    taken += 1;
                }
                let Some(next) = events.get(taken) else { break };
                if next.position != tail.position + 1 {
                    let err = StreamError::OutOfOrder {
                        session,
                        expected: tail.position + 1,
                        got: next.position,
                    };
                    return stopped(taken, err);
                }
            }
            let end = events.len().min(taken + BATCH_MAX);
            let expected = tail.map_or(0, |t| t.sequence);
            match self
                .send_batch(&subject, expected, &payloads[taken..end])
                .await
            {
                Ok(sequence) => {
                    let position = events[end - 1].position;
                    self.remember(session, Tail { position, sequence });
                    taken = end;
                }
                Err(BatchRefused::WrongLastSequence) => {
                    self.tails().remove(&session);
                    races += 1;
                    if races == 3 {
                        let err = StreamError::Unavailable(format!(
                            "session {session}: the stream's tail kept moving"
                        ));
                        return stopped(taken, err);
                    }
                }
                Err(BatchRefused::NotAsBatch { lasting, why }) => {
                    self.tails().remove(&session);
                    if lasting && self.atomic.swap(false, Ordering::Relaxed) {
                        tracing::warn!(reason = %why, "the events stream refuses atomic batches; publishing one event at a time");
                    } else {
                        tracing::debug!(reason = %why, "batch refused as a batch; publishing its events one at a time");
                    }
                    let rest = publish_each(self, events.split_off(taken)).await;
                    return PublishedRun {
                        taken: taken + rest.taken,
                        stopped: rest.stopped,
                    };
                }
                Err(BatchRefused::Failed(err)) => {
                    // Perhaps stored after all: the next try reads the tail.
                    self.tails().remove(&session);
                    return stopped(taken, err);
                }
            }
        }
        PublishedRun {
            taken,
            stopped: None,
        }
    }

    async fn read_after(
        &self,
        session: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<ReadBatch, StreamError> {
        let read = self.read_direct(session, after, limit).await?;
        if read.truncated && !self.truly_truncated(session, after).await? {
            return Err(StreamError::Unavailable(
                "a stream replica is behind; read again".into(),
            ));
        }
        Ok(read)
    }

    async fn newest(&self, session: Uuid) -> Result<Option<u64>, StreamError> {
        Ok(self
            .direct_tail(&self.subject(session))
            .await?
            .map(|t| t.position))
    }

    async fn subscribe(&self, session: Uuid) -> Result<Subscription, StreamError> {
        let subscriber = self
            .client
            .subscribe(self.live_subject(session))
            .await
            .map_err(|e| unavailable("subscribing", e))?;
        let mut epoch = self.epoch.clone();
        epoch.mark_unchanged();
        Ok(Box::new(NatsLive {
            subscriber,
            epoch,
            silence: Box::pin(tokio::time::sleep(SILENCE_CHECKS[0])),
            checks: 0,
        }))
    }

    async fn ping(&self) -> Result<(), StreamError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(StreamError::Unavailable("not connected to NATS".into()));
        }
        // The stream read from: a region cut off from the origin still serves
        // what its mirror holds, so it stays ready.
        tokio::time::timeout(REQUEST_TIMEOUT, self.js.get_stream(&self.reader.name))
            .await
            .map_err(|_| StreamError::Unavailable("JetStream did not answer".into()))?
            .map(|_| ())
            .map_err(|e| unavailable("JetStream", e))
    }

    async fn report_presence(&self, signal: PresenceSignal) -> Result<(), StreamError> {
        self.presence_tx.try_send(signal).map_err(|_| {
            metrics::counter!("pollcast_presence_dropped_total").increment(1);
            StreamError::Unavailable("presence queue full".into())
        })
    }

    async fn presence(&self) -> Result<PresenceFeed, StreamError> {
        let stream = self
            .js
            .get_stream(format!("{}_PRESENCE", self.config.stream_name))
            .await
            .map_err(|e| unavailable("opening the presence stream", e))?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(PRESENCE_CONSUMER, presence_consumer())
            .await
            .map_err(|e| unavailable("opening the presence consumer", e))?;
        Ok(Box::new(NatsPresence {
            consumer,
            messages: None,
            unacked: Vec::new(),
        }))
    }
}

/// Publishes presence signals in the order reported, never holding up a reporter.
async fn publish_presence(js: Context, subject: String, mut rx: mpsc::Receiver<PresenceSignal>) {
    while let Some(signal) = rx.recv().await {
        let payload = match WireFormat::MessagePack.encode(&signal) {
            Ok(bytes) => Bytes::from(bytes),
            Err(err) => {
                tracing::error!(error = %err, "presence signal not encodable");
                continue;
            }
        };
        match js.publish(subject.clone(), payload).await {
            Ok(ack) => {
                // Acknowledgements are awaited off the queue, so they pipeline.
                tokio::spawn(async move {
                    if let Err(err) = ack.await {
                        metrics::counter!("pollcast_presence_dropped_total").increment(1);
                        tracing::warn!(error = %err, "presence signal not stored");
                    }
                });
            }
            Err(err) => {
                metrics::counter!("pollcast_presence_dropped_total").increment(1);
                tracing::warn!(error = %err, "presence signal not published");
            }
        }
    }
}

struct NatsLive {
    subscriber: Subscriber,
    epoch: watch::Receiver<u64>,
    /// Fires after a silence; see [`SILENCE_CHECKS`].
    silence: Pin<Box<Sleep>>,
    checks: usize,
}

#[async_trait]
impl LiveEvents for NatsLive {
    async fn next(&mut self) -> Result<Arc<SessionEvent>, StreamError> {
        loop {
            tokio::select! {
                biased;
                changed = self.epoch.changed() => {
                    changed.map_err(|_| StreamError::Closed)?;
                    return Err(StreamError::Lagged { skipped: 0 });
                }
                message = self.subscriber.next() => {
                    let Some(message) = message else {
                        return Err(StreamError::Closed);
                    };
                    self.checks = 0;
                    self.silence.as_mut().reset(Instant::now() + SILENCE_CHECKS[0]);
                    match decode(&message.payload) {
                        Ok(event) => return Ok(Arc::new(event)),
                        Err(err) => tracing::warn!(error = %err, "undecodable event on NATS"),
                    }
                }
                () = &mut self.silence => {
                    self.checks = (self.checks + 1).min(SILENCE_CHECKS.len() - 1);
                    self.silence.as_mut().reset(Instant::now() + SILENCE_CHECKS[self.checks]);
                    return Err(StreamError::Lagged { skipped: 0 });
                }
            }
        }
    }
}

struct NatsPresence {
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    /// The batch handed out last: acknowledged when the next one is asked for,
    /// that is, once the caller has applied it.
    unacked: Vec<jetstream::Message>,
}

impl NatsPresence {
    /// The consumer's message stream, opened when first needed or after it ended.
    async fn messages(&mut self) -> &mut pull::Stream {
        let messages = match self.messages.take() {
            Some(messages) => messages,
            None => loop {
                match self.consumer.messages().await {
                    Ok(messages) => break messages,
                    Err(err) => {
                        tracing::warn!(error = %err, "presence consumer unavailable");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            },
        };
        self.messages.insert(messages)
    }

    /// Keeps a delivered message's signal in `batch`; the message is
    /// acknowledged with the batch. One that cannot be decoded is dropped (and
    /// acknowledged all the same). Nothing here waits, so once a message is
    /// taken `next_batch` returns without another await point: a caller that
    /// drops the future cannot lose a signal already taken off the stream.
    fn take(&mut self, message: jetstream::Message, batch: &mut Vec<PresenceSignal>) {
        match WireFormat::MessagePack.decode::<PresenceSignal>(&message.payload) {
            Ok(signal) => batch.push(signal),
            Err(err) => tracing::warn!(error = %err, "undecodable presence signal dropped"),
        }
        self.unacked.push(message);
    }
}

#[async_trait]
impl PresenceSignals for NatsPresence {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<PresenceSignal>, StreamError> {
        for done in std::mem::take(&mut self.unacked) {
            if let Err(err) = done.ack().await {
                tracing::warn!(error = %err, "presence ack failed; the signal comes again");
            }
        }
        let mut batch = Vec::new();
        // Wait for the first signal...
        while batch.is_empty() {
            match self.messages().await.next().await {
                Some(Ok(message)) => self.take(message, &mut batch),
                Some(Err(err)) => {
                    // Missed heartbeats during an outage and the like: the pull
                    // stream recovers by itself; don't spin meanwhile.
                    tracing::debug!(error = %err, "presence consumer");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => self.messages = None,
            }
        }
        // ...then take those already delivered behind it, without waiting.
        while batch.len() < max {
            let Some(messages) = self.messages.as_mut() else {
                break;
            };
            let Some(Some(Ok(message))) = messages.next().now_or_never() else {
                break;
            };
            self.take(message, &mut batch);
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nats/streams/` is what operators read and `nats stream add` takes; it must
    /// be exactly what the engine creates with the default flags.
    #[test]
    fn stream_definitions_under_nats_match_the_engine() {
        let config = NatsConfig::default();
        let events: stream::Config =
            serde_json::from_str(include_str!("../../../nats/streams/POLLCAST_EVENTS.json"))
                .expect("events stream JSON");
        assert_eq!(events, events_stream(&config, Retention::default()));
        let presence: stream::Config = serde_json::from_str(include_str!(
            "../../../nats/streams/POLLCAST_EVENTS_PRESENCE.json"
        ))
        .expect("presence stream JSON");
        assert_eq!(presence, presence_stream(&config));
    }

    #[test]
    fn an_event_survives_the_nats_encoding_with_its_position() {
        let event = SessionEvent {
            session_id: Uuid::now_v7(),
            position: 123_456,
            timestamp: pollcast_protocol::Timestamp::now(),
            event: DomainEvent::ParticipantDisconnected {
                participant_id: Uuid::now_v7(),
                display_name: "Ada".into(),
            },
        };
        let bytes = encode(&event).expect("encodes");
        assert_eq!(decode(&bytes).expect("decodes"), event);
        assert!(decode(b"not msgpack").is_err());
    }
}
