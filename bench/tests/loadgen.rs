//! The load generator's scenarios, run small against a real server over real
//! sockets, so the tool behind `docs/benchmarks.md` keeps working: every room
//! connected and followed to its end with nothing lost or repeated, and the
//! exact-tally check of `ingest`. The Node.js peers of the side-by-side runs
//! (`bench/peers/node`) are held to the same, and so is the JetStream set-up of
//! separate api and edge processes on a real nats-server.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use pollcast_api::RateLimitConfig;
use pollcast_domain::{DomainConfig, TokenKeys};
use pollcast_stream::{NatsConfig, StreamConfig};
use pollcast_tests::nats::NatsServer;
use pollcast_tests::server::{Options, SECRET};
use pollcast_tests::{Backend, TestServer};
use serde_json::Value;

/// Runs `loadgen` against the server with the scenario's arguments; returns
/// its JSON line.
fn loadgen(t: &TestServer, scenario: &[&str]) -> Value {
    loadgen_at(t.api.base(), scenario)
}

/// [`loadgen`] against any server's base URL (`args` may add `--ws-url`).
fn loadgen_at(url: &str, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("--url")
        .arg(url)
        .args(args)
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"))
}

async fn server() -> TestServer {
    TestServer::start_with(
        Backend::Sqlite,
        Options {
            rate_limits: RateLimitConfig::OFF,
            ..Options::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_counts_every_room_and_loses_nothing() {
    let t = server().await;
    let report = tokio::task::block_in_place(|| {
        loadgen(
            &t,
            &[
                "rooms",
                "--rooms",
                "3",
                "--participants",
                "4",
                "--votes-per-sec",
                "40",
                "--seconds",
                "2",
            ],
        )
    });
    assert_eq!(report["scenario"], "rooms");
    assert_eq!(report["rooms"], 3);
    assert_eq!(report["clients"], 12);
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert_eq!(report["unseen"], 0, "{report}");
    assert_eq!(report["failed_connections"], 0, "{report}");
    // 40 votes a second for 2 s, to the rooms in turn; a room's poll rotates
    // after its four voters (a vote still in flight at a rotation may meet the
    // closed poll, so not every vote need be accepted).
    assert_eq!(report["votes_scheduled"], 80, "{report}");
    assert!(report["votes_sent"].as_u64() >= Some(72), "{report}");
    assert!(report["votes_accepted"].as_u64() >= Some(40), "{report}");
    assert!(
        report["deliveries_per_sec"].as_f64() > Some(0.0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_checks_the_tally_against_the_votes_accepted() {
    let t = server().await;
    let report = tokio::task::block_in_place(|| {
        loadgen(&t, &["ingest", "--voters", "60", "--concurrency", "8"])
    });
    assert_eq!(report["votes_accepted"], 60, "{report}");
    assert_eq!(report["tally_exact"], true, "{report}");
    assert_eq!(report["unseen"], 0, "{report}");
}

/// A Node.js peer process, killed when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bench/peers/node` with `transport` on a port of the system's choice
/// (installing its packages first when they are missing); returns it and its URL.
fn peer(transport: &str) -> (Peer, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/node");
    if !dir.join("node_modules").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--quiet"])
            .current_dir(&dir)
            .status()
            .expect("npm runs (Node.js and npm are needed for the side-by-side peers)");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
    let mut child = Command::new("node")
        .arg(dir.join("server.js"))
        .args(["--listen", "127.0.0.1:0", "--transport", transport])
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    let stderr = child.stderr.take().expect("stderr");
    let peer = Peer(child);
    let mut line = String::new();
    BufReader::new(stderr)
        .read_line(&mut line)
        .expect("the peer says where it listens");
    let address = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|a| a.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (peer, format!("http://{address}"))
}

/// Both transports of the Node.js peer carry a storm with replay as pollcast
/// does: every client reconnects with `lastEventId` and misses nothing, so the
/// side-by-side figures compare servers doing the same work.
#[test]
fn the_node_peers_carry_the_scenarios_without_loss() {
    for (transport, protocol) in [("ws", "pollcast"), ("socketio", "socket-io")] {
        let (_peer, url) = peer(transport);
        let report = loadgen_at(
            &url,
            &[
                "--protocol",
                protocol,
                "reconnect-storm",
                "--clients",
                "20",
                "--votes-per-sec",
                "40",
                "--seconds",
                "2",
            ],
        );
        assert_eq!(report["clients"], 20, "{transport}: {report}");
        assert_eq!(report["lost"], 0, "{transport}: {report}");
        assert_eq!(report["duplicated"], 0, "{transport}: {report}");
        assert_eq!(report["unseen"], 0, "{transport}: {report}");
        assert_eq!(report["failed_connections"], 0, "{transport}: {report}");
        assert_eq!(report["storm_unrecovered"], 0, "{transport}: {report}");
        assert!(
            report["votes_accepted"].as_u64() >= Some(40),
            "{transport}: {report}"
        );
        assert!(
            report["deliveries_per_sec"].as_f64() > Some(0.0),
            "{transport}: {report}"
        );
    }
}

/// A server running one part only (the api's or the edge's), in this process,
/// over its own connection to `nats`.
async fn part(nats: &NatsServer, stream_name: &str, api: Option<&Path>) -> pollcast::Server {
    let stream = pollcast_stream::connect(&StreamConfig {
        nats: Some(NatsConfig {
            urls: vec![nats.url()],
            stream_name: stream_name.into(),
            manage_streams: api.is_some(),
            ..NatsConfig::default()
        }),
        ..StreamConfig::default()
    })
    .await
    .expect("JetStream engine");
    let settings = pollcast::Settings {
        keys: TokenKeys::new(SECRET, Duration::from_secs(3600)),
        api: api.map(|dir| pollcast::ApiSettings {
            database_url: format!("sqlite://{}?mode=rwc", dir.join("pollcast.db").display()),
            store: pollcast_store::StoreOptions::default(),
            domain: DomainConfig::default(),
            rate_limits: RateLimitConfig::OFF,
            cors_origins: Vec::new(),
            single_node: false,
        }),
        edge: api.is_none().then(pollcast_edge::EdgeConfig::default),
        metrics: None,
        http: pollcast::HttpTimeouts::default(),
    };
    let listener = pollcast::listen(([127, 0, 0, 1], 0).into()).expect("bind");
    pollcast::Server::start(listener, settings, stream)
        .await
        .expect("server part starts")
}

/// The split set-up `bench/loadgen.sh` runs with `ENGINE=jetstream SPLIT=1`:
/// the REST calls go to the api, every socket to the edge (the api serves no
/// `/ws`, so a client sent there fails), and the CPU of each serving process
/// is reported apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_run_across_an_api_and_an_edge_on_jetstream() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let stream_name = "LOADGEN_SPLIT";
    let api = part(&nats, stream_name, Some(dir.path())).await;
    let edge = part(&nats, stream_name, None).await;
    let (api_url, edge_url) = (
        format!("http://{}", api.addr()),
        format!("http://{}", edge.addr()),
    );
    let (this, nats_pid) = (
        std::process::id().to_string(),
        nats.pid().expect("nats-server runs").to_string(),
    );
    let report = tokio::task::block_in_place(|| {
        loadgen_at(
            &api_url,
            &[
                "--ws-url",
                &edge_url,
                "--server-pid",
                &this,
                "--server-pid",
                &nats_pid,
                "rooms",
                "--rooms",
                "2",
                "--participants",
                "4",
                "--votes-per-sec",
                "20",
                "--seconds",
                "2",
            ],
        )
    });
    assert_eq!(report["clients"], 8, "{report}");
    assert_eq!(report["failed_connections"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert_eq!(report["unseen"], 0, "{report}");
    assert!(report["votes_accepted"].as_u64() >= Some(10), "{report}");
    assert!(
        report["deliveries_per_sec"].as_f64() > Some(0.0),
        "{report}"
    );
    let by_process = report["server_cpu_seconds_by_process"]
        .as_array()
        .unwrap_or_else(|| panic!("CPU by process: {report}"));
    assert_eq!(by_process.len(), 2, "{report}");
    // The sum is what the per-frame figure divides.
    let sum: f64 = by_process.iter().filter_map(Value::as_f64).sum();
    let per_frame = report["server_cpu_us_per_frame"]
        .as_f64()
        .expect("per frame");
    let frames = report["deliveries_per_sec"].as_f64().expect("rate")
        * report["seconds"].as_f64().expect("seconds");
    assert!(
        (per_frame * frames / 1e6 - sum).abs() < 1e-6 * sum.max(1.0) + 1e-3,
        "{report}"
    );
    api.shutdown().await.expect("api stops");
    edge.shutdown().await.expect("edge stops");
}
