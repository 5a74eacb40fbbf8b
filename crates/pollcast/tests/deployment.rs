//! pollcast as a deployment: an api process and edge processes of the real binary
//! on a real nats-server (or a three-node JetStream cluster), over real HTTP and
//! WebSocket sockets. Each test has servers of its own; processes are SIGKILLed
//! the way crashes kill them.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use pollcast_tests::client::{
    Presenter, id_of, option_id, session_with_voters, vote_all, vote_counts,
};
use pollcast_tests::frames::{
    assert_consecutive, assert_same_run, count, listen, positions, until,
};
use pollcast_tests::nats::{NatsCluster, NatsServer};
use pollcast_tests::process::Pollcast;
use pollcast_tests::ws::{Format, Listening, WsClient, query};
use pollcast_tests::{Api, exclusive, reached};
use serde_json::{Value, json};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_pollcast");
const SECRET: &str = "pollcast deployment test secret";

/// Api processes and edge processes on the same NATS.
struct Deployment {
    /// The first api node.
    api: Pollcast,
    /// More api nodes on the same database.
    more_apis: Vec<Pollcast>,
    edges: Vec<Pollcast>,
    _data: tempfile::TempDir,
}

impl Deployment {
    /// One api node on a SQLite file; `extra` flags go to every process
    /// (heartbeat settings, replicas).
    async fn start(nats_urls: &str, edges: usize, extra: &[&str]) -> Deployment {
        Self::start_with(nats_urls, None, 1, edges, extra).await
    }

    /// `apis` api nodes sharing `database_url` (default: a SQLite file, which
    /// suits one node only).
    async fn start_with(
        nats_urls: &str,
        database_url: Option<&str>,
        apis: usize,
        edges: usize,
        extra: &[&str],
    ) -> Deployment {
        let data = tempfile::tempdir().expect("temp dir");
        let data_dir = data.path().display().to_string();
        let common = |role: &'static str| -> Vec<&str> {
            let mut args = vec!["--role", role, "--nats-url", nats_urls, "--secret", SECRET];
            args.extend_from_slice(extra);
            args
        };
        let mut api_args = common("api");
        api_args.extend([
            "--data-dir",
            data_dir.as_str(),
            "--presence-flush-ms",
            "200",
        ]);
        if let Some(url) = database_url {
            api_args.extend(["--database-url", url]);
        }
        let env = [("POLLCAST_LOG", "info")];
        let mut api_nodes = Vec::new();
        for _ in 0..apis {
            api_nodes.push(Pollcast::serve(BIN, &api_args, &env).await);
        }
        let mut started = Vec::new();
        for _ in 0..edges {
            started.push(Pollcast::serve(BIN, &common("edge"), &env).await);
        }
        for process in api_nodes.iter().chain(&started) {
            process.wait_ready(200).await;
        }
        let api = api_nodes.remove(0);
        Deployment {
            api,
            more_apis: api_nodes,
            edges: started,
            _data: data,
        }
    }
}

/// Closes the poll and checks what the presenter got since it connected: one
/// unbroken run of positions holding `votes` accepted votes, and results that
/// count them all (on option 0).
async fn close_and_check(
    d: &Deployment,
    p: &Presenter,
    poll: &Value,
    presenter: &mut Listening,
    votes: u64,
) {
    d.api
        .api
        .act(&format!("/api/polls/{}/close", id_of(poll)), Some(&p.token))
        .await
        .expect(200);
    let frames = until(presenter, "poll:closed").await;
    assert_consecutive(&positions(&p.session_id, &frames));
    assert_eq!(
        count(&frames, "vote:accepted") as u64,
        votes,
        "every vote, once"
    );
    let results = d.api.api.results(&id_of(poll), &p.token).await;
    assert_eq!(vote_counts(&results), vec![votes, 0, 0]);
}

/// Whether the session's first participant is marked connected.
async fn first_connected(api: &Api, p: &Presenter) -> bool {
    api.participants(p).await[0]["connected"] == true
}

/// Votes pouring in from `voters` participants (eight at a time) while a
/// presenter listens on the first edge.
struct Storm {
    p: Presenter,
    poll: Value,
    presenter: Listening,
    /// Votes answered so far.
    done: Arc<AtomicUsize>,
    /// Every vote's status, once all are answered.
    votes: tokio::task::JoinHandle<Vec<u16>>,
}

impl Storm {
    async fn start(d: &Deployment, voters: usize) -> Storm {
        let (p, poll, tokens) = session_with_voters(&d.api.api, voters).await;
        let presenter = listen(&d.edges[0], &p, None).await;
        let done = Arc::new(AtomicUsize::new(0));
        let votes = tokio::spawn(vote_all(
            d.api.api.clone(),
            id_of(&poll),
            option_id(&poll, 0),
            tokens,
            Arc::clone(&done),
        ));
        Storm {
            p,
            poll,
            presenter,
            done,
            votes,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_edges_get_identical_sequences_and_move_between_edges_without_gaps() {
    let _guard = exclusive().await;
    let nats = NatsServer::start();
    let d = Deployment::start(&nats.url(), 2, &[]).await;
    let (p, poll, tokens) = session_with_voters(&d.api.api, 20).await;
    let mut on_a = listen(&d.edges[0], &p, None).await;
    let mut on_b = listen(&d.edges[1], &p, None).await;
    let statuses = vote_all(
        d.api.api.clone(),
        id_of(&poll),
        option_id(&poll, 0),
        tokens,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");
    d.api
        .api
        .act(
            &format!("/api/polls/{}/close", id_of(&poll)),
            Some(&p.token),
        )
        .await
        .expect(200);
    let seen_a = until(&mut on_a, "poll:closed").await;
    let seen_b = until(&mut on_b, "poll:closed").await;
    // Each edge starts a fresh client at its own newest event, and one edge may
    // not yet have received the last joins when its client connects: the runs
    // may start apart, but from the later start they are the same frames.
    assert_same_run(&p.session_id, &seen_a, &seen_b);
    assert_eq!(count(&seen_a, "vote:accepted"), 20);
    assert_eq!(count(&seen_b, "vote:accepted"), 20);

    // A client that had read half of it on edge B comes back on edge A.
    let half = seen_a.len() / 2;
    let last_id = seen_a[half - 1]["eventId"].as_str().expect("id").to_owned();
    drop(on_b);
    let mut moved = WsClient::connect(
        d.edges[0].addr,
        &query(&p.session_id, &p.token, Some(&last_id), Format::Json),
    )
    .await
    .listen();
    assert_eq!(
        moved.envelope().await["eventType"],
        "connection:established"
    );
    let replay = until(&mut moved, "connection:reconnected").await;
    let reconnected = replay.last().expect("frame");
    assert_eq!(reconnected["payload"]["recovered"], true);
    assert_eq!(
        &replay[..replay.len() - 1],
        &seen_a[half..],
        "exactly the rest"
    );
    // And live events continue on the new edge with nothing repeated.
    let second = d
        .api
        .api
        .create_poll(&p, json!({ "question": "Next?", "options": ["a", "b"] }))
        .await;
    let live = until(&mut moved, "poll:created").await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["payload"]["poll"]["id"], second["id"]);
    let mut all = positions(&p.session_id, &seen_a);
    all.extend(positions(&p.session_id, &live));
    assert_consecutive(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_storm_and_restarted_loses_nothing_and_keeps_order() {
    let _guard = exclusive().await;
    let mut nats = NatsServer::start();
    let d = Deployment::start(&nats.url(), 1, &[]).await;
    let Storm {
        p,
        poll,
        mut presenter,
        done,
        votes: storm,
    } = Storm::start(&d, 80).await;
    reached(&done, 20).await;
    nats.kill();
    // Both roles report the outage; writes go on committing to the outbox.
    d.api.wait_ready(503).await;
    d.edges[0].wait_ready(503).await;
    reached(&done, 50).await;
    nats.start_again();
    d.api.wait_ready(200).await;
    d.edges[0].wait_ready(200).await;
    let statuses = storm.await.expect("storm");
    assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");
    close_and_check(&d, &p, &poll, &mut presenter, 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_killed_with_events_in_the_outbox_delivers_each_once_after_its_restart() {
    let _guard = exclusive().await;
    let mut nats = NatsServer::start();
    let mut d = Deployment::start(&nats.url(), 1, &[]).await;
    let (p, poll, tokens) = session_with_voters(&d.api.api, 30).await;
    let mut presenter = listen(&d.edges[0], &p, None).await;
    // With NATS gone, every vote commits and its events wait in the outbox.
    nats.kill();
    let statuses = vote_all(
        d.api.api.clone(),
        id_of(&poll),
        option_id(&poll, 1),
        tokens,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");
    d.api.kill();
    nats.start_again();
    d.api.start_again().await;
    d.api.wait_ready(200).await;
    d.api
        .api
        .act(
            &format!("/api/polls/{}/close", id_of(&poll)),
            Some(&p.token),
        )
        .await
        .expect(200);
    let frames = until(&mut presenter, "poll:closed").await;
    let got = positions(&p.session_id, &frames);
    assert_consecutive(&got);
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), got.len());
    assert_eq!(
        count(&frames, "vote:accepted"),
        30,
        "each pending event once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_gets_its_participants_disconnected_within_the_heartbeat_timeout() {
    let _guard = exclusive().await;
    let nats = NatsServer::start();
    let heartbeat = [
        "--heartbeat-interval-ms",
        "300",
        "--heartbeat-timeout-ms",
        "1000",
    ];
    let mut d = Deployment::start(&nats.url(), 2, &heartbeat).await;
    let p = d.api.api.started_session().await;
    let ada = d.api.api.join(&p.code, "Ada").await;
    let mut presenter = listen(&d.edges[0], &p, None).await;
    let participant = WsClient::connect(
        d.edges[1].addr,
        &query(&p.session_id, &ada.token, None, Format::Json),
    )
    .await
    .listen();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !first_connected(&d.api.api, &p).await {
        assert!(Instant::now() < deadline, "never marked connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.edges[1].kill();
    let killed = Instant::now();
    let left = tokio::time::timeout(
        Duration::from_secs(8),
        until(&mut presenter, "participant:disconnected"),
    )
    .await
    .expect("participant:disconnected after the edge died");
    let elapsed = killed.elapsed();
    assert_eq!(
        left.last().expect("frame")["payload"]["participantId"],
        ada.id
    );
    // Timeout 1 s, plus the api's flush interval twice and a second of slack.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(!first_connected(&d.api.api, &p).await);
    drop(participant);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_with_a_leader_change_and_a_node_lost_mid_storm_loses_nothing() {
    let _guard = exclusive().await;
    let mut cluster = NatsCluster::start();
    let urls = cluster.urls().join(",");
    let d = Deployment::start(&urls, 1, &["--stream-replicas", "3"]).await;
    let Storm {
        p,
        poll,
        mut presenter,
        done,
        votes: storm,
    } = Storm::start(&d, 60).await;
    reached(&done, 15).await;
    // A leader change for certain (the killed node may not be the leader).
    let nats = async_nats::connect(cluster.urls())
        .await
        .expect("nats client");
    let stepdown = nats
        .request("$JS.API.STREAM.LEADER.STEPDOWN.POLLCAST_EVENTS", "".into())
        .await
        .expect("stream leader steps down");
    assert!(
        !String::from_utf8_lossy(&stepdown.payload).contains("\"error\""),
        "{:?}",
        stepdown.payload
    );
    reached(&done, 30).await;
    cluster.nodes[0].kill();
    let statuses = storm.await.expect("storm");
    assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");
    close_and_check(&d, &p, &poll, &mut presenter, 60).await;
}

/// Whether the tracker has closed connection `id` (read from the database).
async fn connection_closed(database_url: &str, id: &str) -> bool {
    use pollcast_store::sea_orm::{Database, EntityTrait};
    let db = Database::connect(database_url).await.expect("connect");
    let id: Uuid = id.parse().expect("uuid");
    let row = pollcast_store::connection::Entity::find_by_id(id)
        .one(&db)
        .await
        .expect("query");
    db.close().await.ok();
    row.is_some_and(|r| !r.open)
}

/// A participant's connection, listened to, and its connection id.
async fn participant_connection(
    edge: &Pollcast,
    p: &Presenter,
    token: &str,
) -> (Listening, String) {
    let mut client = WsClient::connect(edge.addr, &query(&p.session_id, token, None, Format::Json))
        .await
        .listen();
    let established = client.envelope().await;
    let id = established["payload"]["connectionId"]
        .as_str()
        .expect("connection id")
        .to_owned();
    (client, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_survive_an_api_restart_and_two_api_nodes_emit_one_disconnect() {
    let _guard = exclusive().await;
    let nats = NatsServer::start();
    let database = pollcast_tests::postgres::Cluster::shared()
        .fresh_database()
        .await;
    let mut d = Deployment::start_with(&nats.url(), Some(&database), 2, 1, &[]).await;
    let p = d.api.api.started_session().await;
    let ada = d.api.api.join(&p.code, "Ada").await;
    let mut presenter = listen(&d.edges[0], &p, None).await;
    let (first, first_id) = participant_connection(&d.edges[0], &p, &ada.token).await;
    let (second, _) = participant_connection(&d.edges[0], &p, &ada.token).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !first_connected(&d.api.api, &p).await {
        assert!(Instant::now() < deadline, "never marked connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The counts are in the database: an api node that crashes forgets nothing.
    d.api.kill();
    d.api.start_again().await;
    d.api.wait_ready(200).await;

    // One of two connections goes: Ada is still connected.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !connection_closed(&database, &first_id).await {
        assert!(Instant::now() < deadline, "the close was never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A marker event: nothing about Ada may come before it.
    d.more_apis[0]
        .api
        .create_poll(&p, json!({ "question": "marker 1", "options": ["a", "b"] }))
        .await;
    let frames = until(&mut presenter, "poll:created").await;
    assert_eq!(count(&frames, "participant:disconnected"), 0, "{frames:?}");
    assert!(first_connected(&d.api.api, &p).await);

    // The last one goes: exactly one disconnect, whichever node handled it.
    drop(second);
    let left = until(&mut presenter, "participant:disconnected").await;
    assert_eq!(
        left.last().expect("frame")["payload"]["participantId"],
        ada.id
    );
    d.api
        .api
        .create_poll(&p, json!({ "question": "marker 2", "options": ["a", "b"] }))
        .await;
    let after = until(&mut presenter, "poll:created").await;
    assert_eq!(
        count(&after, "participant:disconnected"),
        0,
        "a second disconnect: {after:?}"
    );
    assert!(!first_connected(&d.api.api, &p).await);
}
