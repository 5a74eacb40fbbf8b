//! The load generator: a process of its own, against a server started
//! separately, so the server's CPU and memory can be read apart from the load's.
//!
//! ```sh
//! pollcast serve --listen 127.0.0.1:8080 --writes-per-second 0 --anonymous-per-second 0 \
//!     --max-participants-per-session 1000000 --max-polls-per-session 100000 &
//! loadgen --url http://127.0.0.1:8080 --server-pid $! fanout --clients 2000 --votes-per-sec 1000
//! ```
//!
//! Scenarios: `fanout` (one session, every participant on a socket, votes at a
//! rate, results coalesced), `reconnect-storm` (the same, and mid-run every client
//! drops and reconnects with `lastEventId` at once), `ingest` (votes as fast as
//! the server takes them, only the presenter on a socket, then the tally checked
//! against the votes accepted), `rooms` (many small sessions, every participant
//! on a socket, votes spread over them). Each run prints a summary and one JSON
//! line.
//! Loopback only; every run is bounded in count and in time.
//!
//! Against separate `api` and `edge` processes (the JetStream engine), `--url`
//! is the API and `--ws-url` the edge, and `--server-pid` is given once for each
//! process that serves the run (the nats-server too): their CPU and memory are
//! summed, and each one's CPU is printed apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use pollcast_bench::client::{self, Incoming};
use pollcast_bench::probe::{Buckets, ProcStat, proc_stat};
use pollcast_protocol::{Timestamp, WireFormat};
use pollcast_tests::client::{Api, Joiner, Presenter, id_of, option_id};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

#[derive(Parser, Debug)]
#[command(about = "pollcast load generator (loopback only, bounded)")]
struct Args {
    /// The server, `http://127.0.0.1:PORT`; it must run with rate limits off.
    #[arg(long)]
    url: String,
    /// Where the WebSockets and the delivery histogram (`/metrics`) are, when
    /// an edge process serves them apart from the API; default: `--url`.
    #[arg(long)]
    ws_url: Option<String>,
    /// A process that serves the run (the server; with separate processes,
    /// each of them and the nats-server), to read its CPU time and memory
    /// from /proc. Repeat for each; the figures are their sum.
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Source addresses 127.0.0.1..=127.0.0.N for the sockets (more than one
    /// when the clients would run out of ports on one address).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// `json` or `msgpack`.
    #[arg(long, default_value = "json")]
    format: String,
    /// The server's WebSocket protocol: pollcast's, or Socket.IO for the Node.js
    /// peer in `bench/peers/node` (JSON only).
    #[arg(long, value_enum, default_value = "pollcast")]
    protocol: client::Protocol,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// One session, every participant connected, votes at a steady rate.
    Fanout {
        /// Participant sockets (plus one presenter).
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        /// Votes per second (each participant votes once per poll; polls rotate).
        #[arg(long, default_value_t = 1000)]
        votes_per_sec: u32,
        /// Seconds of load (at most 120).
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
    /// Like `fanout`, and halfway through every client drops and reconnects
    /// with `lastEventId` at once.
    ReconnectStorm {
        /// Participant sockets (plus one presenter).
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Votes per second while the storm happens.
        #[arg(long, default_value_t = 200)]
        votes_per_sec: u32,
        /// Seconds of load (at most 120); the storm is at half time.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Many sessions of a few dozen participants, every one connected, votes at
    /// a steady total rate spread over the sessions in turn.
    Rooms {
        /// Sessions, each with its presenter connected.
        #[arg(long, default_value_t = 200)]
        rooms: usize,
        /// Participant sockets per session.
        #[arg(long, default_value_t = 25)]
        participants: usize,
        /// Votes per second, all sessions together.
        #[arg(long, default_value_t = 1000)]
        votes_per_sec: u32,
        /// Seconds of load (at most 120).
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
    /// Votes as fast as the server takes them: every participant votes once on
    /// one poll, `concurrency` requests in flight; only the presenter listens.
    Ingest {
        /// Participants, each voting once (no sockets).
        #[arg(long, default_value_t = 20_000)]
        voters: usize,
        /// Vote requests in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds at most (at most 120); the run ends sooner when all voted.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

/// Longest any phase may take, so a broken run cannot hang the machine.
const PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Longest wait for one connection or one answer.
const WAIT: Duration = Duration::from_secs(30);

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Commit-to-parsed latency of each live event, microseconds.
    latencies_us: Vec<u32>,
    /// Room-wide events (every member gets them), live or replayed.
    room_events: u64,
    /// Every event with an id.
    frames: u64,
    /// Events at or before a position already seen.
    duplicates: u64,
    /// Positions skipped between two events received (from the first one seen).
    /// A presenter sees every event but `vote:rejected` (the voter's alone).
    gaps: u64,
    /// `vote:rejected` events received: the positions a presenter skips.
    rejections: u64,
    /// The connection failed or was closed by the server.
    failed: bool,
    /// From the storm signal to `connection:reconnected`.
    recovery: Option<Duration>,
    /// What `connection:reconnected` said.
    recovered: Option<bool>,
}

fn room_wide(event_type: &str) -> bool {
    event_type.starts_with("session:")
        || event_type.starts_with("poll:")
        || event_type == "results:updated"
}

/// Phases every client follows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Run,
    Storm,
}

struct Client {
    server: SocketAddr,
    source: IpAddr,
    session: String,
    session_id: uuid::Uuid,
    token: String,
    format: WireFormat,
    format_name: &'static str,
    protocol: client::Protocol,
}

impl Client {
    fn query(&self, last: Option<&str>) -> String {
        let mut q = format!(
            "sessionId={}&token={}&format={}",
            self.session, self.token, self.format_name
        );
        if let Some(last) = last {
            q.push_str("&lastEventId=");
            q.push_str(last);
        }
        q
    }

    /// Reads until `session:ended`, reconnecting once when the phase turns to
    /// `Storm`. `ready` counts established connections.
    async fn run(self, ready: Arc<AtomicU64>, mut phase: watch::Receiver<Phase>) -> Seen {
        let mut seen = Seen::default();
        let Ok(mut ws) = client::connect(
            self.server,
            self.source,
            &self.query(None),
            WAIT,
            self.protocol,
        )
        .await
        else {
            seen.failed = true;
            ready.fetch_add(1, Ordering::Relaxed);
            return seen;
        };
        let mut last_position = 0u64;
        let mut last_id: Option<String> = None;
        let mut replaying = false;
        let mut ended = false;
        let mut storm_started: Option<Instant> = None;
        // Until the storm, or until the generator says there will be none.
        let mut watching = true;
        loop {
            let incoming = tokio::select! {
                incoming = client::next(&mut ws, self.format, self.protocol) => incoming,
                changed = phase.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    if *phase.borrow() != Phase::Storm {
                        continue;
                    }
                    watching = false;
                    storm_started = Some(Instant::now());
                    drop(ws);
                    match client::connect(self.server, self.source, &self.query(last_id.as_deref()), WAIT, self.protocol).await {
                        Ok(again) => ws = again,
                        Err(_) => { seen.failed = true; return seen; }
                    }
                    replaying = true;
                    continue;
                }
            };
            let head = match incoming {
                Ok(Incoming::Envelope(head)) => head,
                Ok(Incoming::Other) => continue,
                Ok(Incoming::Closed(_)) | Err(_) => {
                    seen.failed = true;
                    return seen;
                }
            };
            match (head.event_id, head.event_type.as_str()) {
                (None, "connection:established") if storm_started.is_none() => {
                    ready.fetch_add(1, Ordering::Relaxed);
                }
                (None, "connection:reconnected") => {
                    replaying = false;
                    seen.recovery = storm_started.map(|t| t.elapsed());
                    seen.recovered = head.payload.and_then(|p| p.recovered);
                    if ended {
                        return seen;
                    }
                }
                (None, _) => {}
                (Some(id), event_type) => {
                    let Ok(position) = id.position_in(self.session_id) else {
                        seen.failed = true;
                        return seen;
                    };
                    if position <= last_position {
                        seen.duplicates += 1;
                        continue;
                    }
                    if last_position > 0 {
                        seen.gaps += position - last_position - 1;
                    }
                    if event_type == "vote:rejected" {
                        seen.rejections += 1;
                    }
                    last_position = position;
                    last_id = Some(id.to_string());
                    seen.frames += 1;
                    if room_wide(event_type) {
                        seen.room_events += 1;
                    }
                    if !replaying {
                        let lag_ms = Timestamp::now().unix_millis() - head.timestamp.unix_millis();
                        seen.latencies_us
                            .push(u32::try_from(lag_ms.max(0) * 1000).unwrap_or(u32::MAX));
                    }
                    // A replay can hold the session's end when the reconnect came
                    // late; the run ends for this client after `connection:reconnected`.
                    if event_type == "session:ended" {
                        ended = true;
                        if !replaying {
                            return seen;
                        }
                    }
                }
            }
        }
    }
}

/// One session of the run: its presenter and the participants who joined.
struct Room {
    presenter: Presenter,
    joined: Vec<Joiner>,
}

/// The votes sent and how they were answered.
#[derive(Default)]
struct VoteLoad {
    sent: u64,
    accepted: u64,
    /// Time the sender fell behind its schedule at the end.
    behind: Duration,
    /// From the first vote sent to the last answered.
    elapsed: Duration,
}

/// A room's poll as the vote sender sees it.
enum RoomPoll {
    /// Taking votes: the poll, the index of its next voter, and the votes sent
    /// to it.
    Open(Value, usize, Vec<JoinHandle<()>>),
    /// Everyone voted; once every vote is answered the presenter closes the
    /// poll and opens the next.
    Rotating(JoinHandle<Value>),
}

/// Sends votes at `rate` for `length`, to the rooms in turn, rotating a room's
/// poll when everyone in it has voted. A rotation (close, create, activate: three
/// writes) runs beside the schedule, and the rooms not rotating take the votes
/// meanwhile: awaited in the sender, 200 rooms filling their polls together
/// stalled it for seconds, and the votes it owed then went out as one burst. It
/// closes the poll when its votes are answered, so none meets a closed poll.
async fn vote(
    api: &Api,
    rooms: &[Room],
    rate: u32,
    length: Duration,
    storm: Option<(Duration, watch::Sender<Phase>)>,
) -> anyhow::Result<VoteLoad> {
    let in_flight = Arc::new(Semaphore::new(512));
    let accepted = Arc::new(AtomicU64::new(0));
    let mut load = VoteLoad::default();
    let mut polls = Vec::with_capacity(rooms.len());
    for room in rooms {
        polls.push(RoomPoll::Open(
            api.active_poll(&room.presenter).await,
            0,
            Vec::new(),
        ));
    }
    let mut turn = 0usize;
    let tick = Duration::from_millis(10);
    let per_tick = f64::from(rate) * tick.as_secs_f64();
    let started = Instant::now();
    let mut owed = 0.0;
    let mut storm = storm;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < length {
        ticker.tick().await;
        if let Some((at, _)) = &storm
            && started.elapsed() >= *at
            && let Some((_, signal)) = storm.take()
        {
            let _ = signal.send(Phase::Storm);
        }
        owed += per_tick;
        // Rooms passed over since the last vote: when every room is rotating (or
        // empty), what is owed waits for the next tick.
        let mut passed = 0;
        while owed >= 1.0 && passed < rooms.len() {
            let at = turn % rooms.len();
            let room = &rooms[at];
            turn += 1;
            if let RoomPoll::Rotating(rotation) = &mut polls[at] {
                if !rotation.is_finished() {
                    passed += 1;
                    continue;
                }
                polls[at] = RoomPoll::Open(rotation.await?, 0, Vec::new());
            }
            let RoomPoll::Open(poll, next, votes) = &mut polls[at] else {
                passed += 1;
                continue;
            };
            if room.joined.is_empty() {
                passed += 1;
                continue;
            }
            if *next == room.joined.len() {
                let (api, presenter) = (api.clone(), room.presenter.clone());
                let close = format!("/api/polls/{}/close", id_of(poll));
                let votes = std::mem::take(votes);
                polls[at] = RoomPoll::Rotating(tokio::spawn(async move {
                    for vote in votes {
                        // A vote task that failed was counted as not accepted.
                        let _answered = vote.await;
                    }
                    api.act(&close, Some(&presenter.token)).await;
                    api.active_poll(&presenter).await
                }));
                passed += 1;
                continue;
            }
            passed = 0;
            owed -= 1.0;
            let (api, token) = (api.clone(), room.joined[*next].token.clone());
            let (poll_id, option) = (id_of(poll), option_id(poll, *next % 3));
            let permit = Arc::clone(&in_flight).acquire_owned().await?;
            let accepted = Arc::clone(&accepted);
            votes.push(tokio::spawn(async move {
                if api.vote(&poll_id, &token, &[option.as_str()]).await.status == 201 {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            }));
            *next += 1;
            load.sent += 1;
        }
    }
    load.behind = started.elapsed().saturating_sub(length);
    // A rotation still running ends before the sessions do.
    for poll in polls {
        if let RoomPoll::Rotating(rotation) = poll {
            rotation.await?;
        }
    }
    // Every vote answered before the run ends.
    let _all = in_flight.acquire_many(512).await?;
    load.accepted = accepted.load(Ordering::Relaxed);
    load.elapsed = started.elapsed();
    Ok(load)
}

/// Every voter votes once on a new poll, `concurrency` at a time, for at most
/// `length`; then the poll is closed and its final tally must equal the votes
/// accepted. Returns the load and whether the tally was exact.
async fn ingest(
    api: &Api,
    presenter: &Presenter,
    voters: &[Joiner],
    concurrency: usize,
    length: Duration,
) -> anyhow::Result<(VoteLoad, bool)> {
    use futures::StreamExt;
    let poll = api.active_poll(presenter).await;
    let poll_id = id_of(&poll);
    let started = Instant::now();
    let statuses: Vec<u16> = futures::stream::iter(voters.iter().enumerate())
        .take_while(|_| std::future::ready(started.elapsed() < length))
        .map(|(i, voter)| {
            let (api, poll_id, option) = (api.clone(), poll_id.clone(), option_id(&poll, i % 3));
            async move {
                api.vote(&poll_id, &voter.token, &[option.as_str()])
                    .await
                    .status
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let load = VoteLoad {
        sent: statuses.len() as u64,
        accepted: statuses.iter().filter(|&&s| s == 201).count() as u64,
        behind: Duration::ZERO,
        elapsed: started.elapsed(),
    };
    api.act(
        &format!("/api/polls/{poll_id}/close"),
        Some(&presenter.token),
    )
    .await;
    let results = api.results(&poll_id, &presenter.token).await;
    let exact = results["totalVotes"].as_u64() == Some(load.accepted)
        && pollcast_tests::client::vote_counts(&results)
            .iter()
            .sum::<u64>()
            == load.accepted;
    Ok((load, exact))
}

/// Percentile of sorted microseconds, in milliseconds.
fn pct(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[at]) / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let api_url = args.url.trim_end_matches('/').to_owned();
    let ws_url = args
        .ws_url
        .as_deref()
        .unwrap_or(&args.url)
        .trim_end_matches('/')
        .to_owned();
    let loopback = |url: &str| -> anyhow::Result<SocketAddr> {
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .parse()
            .map_err(|_| anyhow::anyhow!("{url}: must be http://127.x.y.z:PORT"))?;
        anyhow::ensure!(addr.ip().is_loopback(), "load goes to loopback only");
        Ok(addr)
    };
    loopback(&api_url)?;
    let server = loopback(&ws_url)?;
    anyhow::ensure!(
        args.protocol == client::Protocol::Pollcast || args.format == "json",
        "Socket.IO runs carry JSON only"
    );
    let (format, format_name) = match args.format.as_str() {
        "msgpack" => (WireFormat::MessagePack, "msgpack"),
        _ => (WireFormat::Json, "json"),
    };
    // `rooms` sessions of `per_room` participants each, who listen on a socket
    // when `listening`; `rate` 0: as fast as taken.
    let (scenario, rooms, per_room, listening, rate, seconds, concurrency) = match args.scenario {
        Scenario::Fanout {
            clients,
            votes_per_sec,
            seconds,
        } => ("fanout", 1, clients, true, votes_per_sec, seconds, 0),
        Scenario::ReconnectStorm {
            clients,
            votes_per_sec,
            seconds,
        } => (
            "reconnect-storm",
            1,
            clients,
            true,
            votes_per_sec,
            seconds,
            0,
        ),
        Scenario::Rooms {
            rooms,
            participants,
            votes_per_sec,
            seconds,
        } => (
            "rooms",
            rooms.max(1),
            participants,
            true,
            votes_per_sec,
            seconds,
            0,
        ),
        Scenario::Ingest {
            voters,
            concurrency,
            seconds,
        } => ("ingest", 1, voters, false, 0, seconds, concurrency),
    };
    let clients = rooms * per_room;
    let length = Duration::from_secs(seconds.min(120));
    let server_pids: Vec<String> = args.server_pid.iter().map(u32::to_string).collect();
    // Every serving process's figures, in `--server-pid` order; none when one
    // cannot be read (it exited), so a sum never leaves a process out.
    let read_server = || -> Option<Vec<ProcStat>> {
        if server_pids.is_empty() {
            return None;
        }
        server_pids.iter().map(|p| proc_stat(p).ok()).collect()
    };
    // Delivery is measured where the sockets are, publishing where the relay
    // runs: the edge's and the api's `/metrics` (one server's, unsplit).
    let delivery_metrics = format!("{ws_url}/metrics");
    let publish_metrics = format!("{api_url}/metrics");
    let api = Api::new(api_url);
    let scrape = |url: &str, name: &'static str| {
        let url = url.to_owned();
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            Some(Buckets::from_scrape(&text, name))
        }
    };
    let scrape_both = || async {
        (
            scrape(&delivery_metrics, "pollcast_event_delivery_seconds").await,
            scrape(&publish_metrics, "pollcast_event_publish_seconds").await,
        )
    };

    // Set-up: the sessions, their participants, a socket each.
    let mut sessions = Vec::with_capacity(rooms);
    for _ in 0..rooms {
        let presenter = api.started_session().await;
        let joined =
            tokio::time::timeout(PHASE_LIMIT, join_all(&api, &presenter, per_room)).await??;
        sessions.push(Room { presenter, joined });
    }
    let idle_server = read_server();
    let ready = Arc::new(AtomicU64::new(0));
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    // Each socket's room; a room's presenter comes first among its sockets.
    let mut task_rooms = Vec::with_capacity(clients + rooms);
    let mut tasks = Vec::with_capacity(clients + rooms);
    for (r, room) in sessions.iter().enumerate() {
        let listeners = if listening { room.joined.len() } else { 0 };
        let tokens = std::iter::once(room.presenter.token.clone())
            .chain(room.joined.iter().take(listeners).map(|j| j.token.clone()));
        for token in tokens {
            let i = tasks.len();
            let source = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(args.sources.max(1))) as u8);
            let client = Client {
                server,
                source: IpAddr::V4(source),
                session: room.presenter.session_id.clone(),
                session_id: room.presenter.session_id.parse()?,
                token,
                format,
                format_name,
                protocol: args.protocol,
            };
            task_rooms.push(r);
            tasks.push(tokio::spawn(
                client.run(Arc::clone(&ready), phase_rx.clone()),
            ));
            // Connect in waves: a listen backlog of thousands at once drops SYNs.
            if i % 256 == 255 {
                while ready.load(Ordering::Relaxed) + 64 < i as u64 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    let deadline = Instant::now() + PHASE_LIMIT;
    while ready.load(Ordering::Relaxed) < tasks.len() as u64 {
        anyhow::ensure!(Instant::now() < deadline, "clients did not connect in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_server = read_server();
    let (before_buckets, before_publish) = scrape_both().await;
    let own_before = proc_stat("self")?;
    let started = Instant::now();

    // Load.
    let storm = (scenario == "reconnect-storm").then(|| (length / 2, phase_tx));
    let (votes, exact) = if scenario == "ingest" {
        let room = &sessions[0];
        let (votes, exact) =
            ingest(&api, &room.presenter, &room.joined, concurrency, length).await?;
        (votes, Some(exact))
    } else {
        (vote(&api, &sessions, rate, length, storm).await?, None)
    };
    for room in &sessions {
        let ended = format!("/api/sessions/{}/end", room.presenter.session_id);
        api.act(&ended, Some(&room.presenter.token)).await;
    }
    let mut seen = Vec::with_capacity(tasks.len());
    for task in tasks {
        match tokio::time::timeout(WAIT, task).await {
            Ok(Ok(s)) => seen.push(s),
            _ => seen.push(Seen {
                failed: true,
                ..Seen::default()
            }),
        }
    }
    let wall = started.elapsed();
    let own_after = proc_stat("self")?;
    let after_server = read_server();
    let (after_buckets, after_publish) = scrape_both().await;

    // Figures.
    // Every member of a room must have seen what its presenter saw.
    let mut presenter_saw = vec![0u64; rooms];
    for (i, s) in seen.iter().enumerate().rev() {
        presenter_saw[task_rooms[i]] = s.room_events;
    }
    let lost: u64 = seen
        .iter()
        .zip(&task_rooms)
        .filter(|(s, _)| !s.failed)
        .map(|(s, &r)| presenter_saw[r].saturating_sub(s.room_events))
        .sum();
    let duplicates: u64 = seen.iter().map(|s| s.duplicates).sum();
    // Events no client of a room received: the holes in its presenter's
    // positions (its first socket's) less the `vote:rejected` its voters got. A
    // fault every client shares (an event published to nobody, a replay that
    // skips one) leaves the counts above equal; it shows here.
    let mut holes = vec![0u64; rooms];
    let mut rejections = vec![0u64; rooms];
    for (i, (s, &r)) in seen.iter().zip(&task_rooms).enumerate() {
        if i == 0 || task_rooms[i - 1] != r {
            holes[r] = s.gaps;
        }
        rejections[r] += s.rejections;
    }
    let unseen: u64 = holes
        .iter()
        .zip(&rejections)
        .map(|(h, r)| h.saturating_sub(*r))
        .sum();
    let failed = seen.iter().filter(|s| s.failed).count();
    let frames: u64 = seen.iter().map(|s| s.frames).sum();
    let mut latencies: Vec<u32> = seen
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    // Each serving process's CPU over the load, and their sum.
    let server_cpus: Option<Vec<f64>> =
        connected_server.as_ref().zip(after_server).map(|(a, b)| {
            a.iter()
                .zip(&b)
                .map(|(a, b)| b.cpu_seconds - a.cpu_seconds)
                .collect()
        });
    let server_cpu = server_cpus.as_ref().map(|c| c.iter().sum::<f64>());
    let own_cpu = own_after.cpu_seconds - own_before.cpu_seconds;
    let per_frame_us = |cpu: f64| {
        if frames > 0 {
            cpu * 1e6 / frames as f64
        } else {
            0.0
        }
    };
    // Each serving process's RSS growth from idle to every socket connected,
    // per connection, and their sum.
    let rss_by_process: Option<Vec<f64>> = idle_server.zip(connected_server).map(|(a, b)| {
        a.iter()
            .zip(&b)
            .map(|(a, b)| {
                b.rss_bytes.saturating_sub(a.rss_bytes) as f64 / 1024.0 / task_rooms.len() as f64
            })
            .collect()
    });
    let rss_per_conn = rss_by_process.as_ref().map(|r| r.iter().sum::<f64>());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let own_share = own_cpu / wall.as_secs_f64() / threads;
    let saturated = own_share > 0.9 || votes.behind > Duration::from_millis(500);
    // Votes the schedule asked for: fewer sent means the answers came too slowly
    // for the 512 requests in flight, that is, the server did not keep up.
    let scheduled = (f64::from(rate) * length.as_secs_f64()).round() as u64;
    let p99_between = |before: Option<Buckets>, after: Option<Buckets>| {
        before
            .zip(after)
            .and_then(|(b, a)| a.since(&b).quantile_ms(0.99))
    };
    let server_p99 = p99_between(before_buckets, after_buckets);
    let publish_p99 = p99_between(before_publish, after_publish);
    // Microseconds, sorted, as `pct` takes them.
    let mut recoveries: Vec<u32> = seen
        .iter()
        .filter_map(|s| s.recovery)
        .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
        .collect();
    recoveries.sort_unstable();
    let worst_recovery = pct(&recoveries, 1.0);
    let unrecovered = seen.iter().filter(|s| s.recovered == Some(false)).count();

    if scenario == "ingest" {
        println!(
            "{scenario}: {clients} voters, {concurrency} in flight, presenter listening ({format_name}); tally exact: {}",
            exact == Some(true)
        );
    } else if scenario == "rooms" {
        println!(
            "{scenario}: {rooms} sessions of {per_room} clients + presenter ({format_name}), {rate} votes/s in all for {:.0} s",
            length.as_secs_f64()
        );
    } else {
        println!(
            "{scenario}: {clients} clients + presenter ({format_name}), {rate} votes/s for {:.0} s",
            length.as_secs_f64()
        );
    }
    println!(
        "  latency commit→parsed: p50 {:.1} ms, p90 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1} (server histogram p99 {}; of it commit→stream ack p99 {})",
        pct(&latencies, 0.5),
        pct(&latencies, 0.9),
        pct(&latencies, 0.99),
        pct(&latencies, 0.999),
        pct(&latencies, 1.0),
        server_p99.map_or("n/a".into(), |v| format!("{v:.1} ms")),
        publish_p99.map_or("n/a".into(), |v| format!("{v:.1} ms")),
    );
    println!(
        "  {:.0} deliveries/s, {:.0} votes/s accepted ({} of {} sent); lost {lost}, duplicated {duplicates}, unseen by every client {unseen}, failed connections {failed}",
        frames as f64 / wall.as_secs_f64(),
        votes.accepted as f64 / votes.elapsed.as_secs_f64().max(1e-9),
        votes.accepted,
        votes.sent,
    );
    if rate > 0 && (votes.sent as f64) < 0.95 * scheduled as f64 {
        println!(
            "  only {} of {scheduled} scheduled votes sent: the server did not answer fast enough",
            votes.sent
        );
    }
    if let Some(cpu) = server_cpu {
        println!(
            "  server CPU {:.2} s: {:.2} µs per delivered frame, {:.0} µs per accepted vote (all CPU divided by votes), RSS {:.1} KiB per connection",
            cpu,
            per_frame_us(cpu),
            if votes.accepted > 0 {
                cpu * 1e6 / votes.accepted as f64
            } else {
                0.0
            },
            rss_per_conn.unwrap_or(0.0),
        );
        if let Some(cpus) = server_cpus.as_ref().filter(|c| c.len() > 1) {
            let each: Vec<String> = cpus
                .iter()
                .zip(&server_pids)
                .map(|(c, p)| format!("pid {p} {c:.2} s"))
                .collect();
            println!("  server CPU by process: {}", each.join(", "));
        }
    }
    println!(
        "  load generator CPU {:.2} s ({:.2} µs per frame, {:.0} % of the machine){}",
        own_cpu,
        per_frame_us(own_cpu),
        own_share * 100.0,
        if saturated {
            ": SATURATED, figures understate the server"
        } else {
            ", unsaturated"
        },
    );
    if scenario == "reconnect-storm" {
        println!(
            "  storm: {} reconnected, recovery p50 {:.0} / p99 {:.0} / slowest {:.0} ms, recovered:false {}",
            recoveries.len(),
            pct(&recoveries, 0.5),
            pct(&recoveries, 0.99),
            worst_recovery,
            unrecovered
        );
    }
    let line = json!({
        "scenario": scenario,
        "clients": clients,
        "rooms": rooms,
        "format": format_name,
        "votes_per_sec_target": rate,
        "seconds": wall.as_secs_f64(),
        "latency_ms": {
            "p50": pct(&latencies, 0.5), "p90": pct(&latencies, 0.9), "p99": pct(&latencies, 0.99),
            "p999": pct(&latencies, 0.999), "max": pct(&latencies, 1.0),
        },
        "server_histogram_p99_ms": server_p99,
        "server_publish_p99_ms": publish_p99,
        "deliveries_per_sec": frames as f64 / wall.as_secs_f64(),
        "votes_per_sec": votes.accepted as f64 / votes.elapsed.as_secs_f64().max(1e-9),
        "votes_sent": votes.sent,
        "votes_scheduled": scheduled,
        "votes_accepted": votes.accepted,
        "lost": lost,
        "duplicated": duplicates,
        "unseen": unseen,
        "failed_connections": failed,
        "server_cpu_us_per_frame": server_cpu.map(per_frame_us),
        "server_cpu_seconds_by_process": server_cpus,
        "server_cpu_us_per_vote": server_cpu.map(|c| if votes.accepted > 0 { c * 1e6 / votes.accepted as f64 } else { 0.0 }),
        "server_rss_kib_per_connection": rss_per_conn,
        "server_rss_kib_per_connection_by_process": rss_by_process,
        "loadgen_cpu_us_per_frame": per_frame_us(own_cpu),
        "loadgen_saturated": saturated,
        "storm_recovery_max_ms": (scenario == "reconnect-storm").then_some(worst_recovery),
        "storm_recovery_p50_ms": (scenario == "reconnect-storm").then(|| pct(&recoveries, 0.5)),
        "storm_recovery_p99_ms": (scenario == "reconnect-storm").then(|| pct(&recoveries, 0.99)),
        "storm_unrecovered": (scenario == "reconnect-storm").then_some(unrecovered),
        "tally_exact": exact,
    });
    println!("{line}");
    Ok(())
}

/// Joins `n` participants, 32 at a time.
async fn join_all(api: &Api, presenter: &Presenter, n: usize) -> anyhow::Result<Vec<Joiner>> {
    use futures::StreamExt;
    let joined = futures::stream::iter(0..n)
        .map(|i| {
            let (api, code) = (api.clone(), presenter.code.clone());
            async move { api.join(&code, &format!("L{i}")).await }
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await;
    Ok(joined)
}
