//! Replay: `lastEventId` on connect, `resume` on an open connection, lost history,
//! and the seam between replay and live events under a continuous vote storm.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pollcast_edge::EdgeConfig;
use pollcast_protocol::EventId;
use pollcast_tests::client::{Presenter, id_of, option_id};
use pollcast_tests::server::Options;
use pollcast_tests::ws::{Format, WsClient, query};
use pollcast_tests::{Backend, TestServer};
use serde_json::{Value, json};
use uuid::Uuid;

async fn connect_after(
    t: &TestServer,
    p: &Presenter,
    token: &str,
    last: Option<&str>,
    format: Format,
) -> WsClient {
    WsClient::connect(t.server.addr(), &query(&p.session_id, token, last, format)).await
}

fn event_id(frame: &Value) -> String {
    frame["eventId"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no eventId: {frame}"))
}

async fn connecting_with_last_event_id_replays_what_was_missed(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    t.settle(&p.session_id).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    // Ada saw everything up to her own join (position 3).
    let seen = EventId::new(session, 3).to_string();
    let poll = t.api.active_poll(&p).await;
    t.api.join(&p.code, "Bob").await;
    t.api
        .vote(&id_of(&poll), &ada.token, &[&option_id(&poll, 0)])
        .await
        .expect(201);
    t.settle(&p.session_id).await;
    let mut client = connect_after(&t, &p, &ada.token, Some(&seen), format).await;
    client.expect("connection:established").await;
    let mut replayed = Vec::new();
    let reconnected = loop {
        let frame = client.envelope().await;
        if frame["eventType"] == "connection:reconnected" {
            break frame;
        }
        replayed.push(frame["eventType"].as_str().expect("type").to_owned());
    };
    // Bob's join is for presenters only; Ada's vote is hers.
    assert_eq!(
        replayed[..3],
        ["poll:created", "poll:activated", "vote:accepted"]
    );
    assert!(
        replayed[3..].iter().all(|t| t == "results:updated"),
        "{replayed:?}"
    );
    assert_eq!(reconnected["payload"]["fromEventId"], seen.as_str());
    assert_eq!(reconnected["payload"]["replayed"], replayed.len());
    assert_eq!(reconnected["payload"]["recovered"], true);
    assert_eq!(reconnected["eventId"], Value::Null);
    // Then live.
    t.api
        .act(
            &format!("/api/polls/{}/close", id_of(&poll)),
            Some(&p.token),
        )
        .await
        .expect(200);
    loop {
        let frame = client.envelope().await;
        if frame["eventType"] == "poll:closed" {
            break;
        }
        assert_eq!(frame["eventType"], "results:updated");
    }
}

async fn resume_frame_replays_on_an_open_connection(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    t.settle(&p.session_id).await;
    let mut client = connect_after(&t, &p, &p.token, None, format).await;
    let established = client.expect("connection:established").await;
    let start = established["payload"]["lastEventId"]
        .as_str()
        .expect("newest")
        .to_owned();
    t.api.active_poll(&p).await;
    let created = client.expect("poll:created").await;
    let activated = client.expect("poll:activated").await;
    client
        .send_text(&json!({ "eventType": "resume", "lastEventId": start }).to_string())
        .await;
    assert_eq!(
        event_id(&client.expect("poll:created").await),
        event_id(&created)
    );
    assert_eq!(
        event_id(&client.expect("poll:activated").await),
        event_id(&activated)
    );
    let reconnected = client.expect("connection:reconnected").await;
    assert_eq!(reconnected["payload"]["replayed"], 2);
    assert_eq!(reconnected["payload"]["recovered"], true);
    // Live events continue after the replay, without repeating it.
    t.api
        .create_poll(&p, json!({ "question": "Next?", "options": ["A", "B"] }))
        .await;
    let next = client.expect("poll:created").await;
    assert!(event_id(&next) > event_id(&activated));
}

async fn history_that_no_longer_reaches_is_not_recovered(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let other = t.api.create_session("Other").await;
    t.settle(&p.session_id).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let foreign: Uuid = other.session_id.parse().expect("uuid");
    for from in [EventId::new(session, 999), EventId::new(foreign, 1)] {
        let from = from.to_string();
        let mut client = connect_after(&t, &p, &p.token, Some(&from), format).await;
        client.expect("connection:established").await;
        let reconnected = client.expect("connection:reconnected").await;
        assert_eq!(reconnected["payload"]["recovered"], false);
        assert_eq!(reconnected["payload"]["replayed"], 0);
        assert_eq!(reconnected["payload"]["fromEventId"], from.as_str());
        // Live from here on.
        t.api
            .create_poll(&p, json!({ "question": "Q?", "options": ["A", "B"] }))
            .await;
        client.expect("poll:created").await;
    }
}

async fn replay_works_across_a_restart_of_the_embedded_stream(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    t.api.active_poll(&p).await;
    t.settle(&p.session_id).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let t = t.restart(Options::default()).await;
    t.settle(&p.session_id).await;
    let from = EventId::new(session, 1).to_string();
    let mut client = connect_after(&t, &p, &p.token, Some(&from), format).await;
    client.expect("connection:established").await;
    client.expect("session:started").await;
    client.expect("poll:created").await;
    client.expect("poll:activated").await;
    let reconnected = client.expect("connection:reconnected").await;
    assert_eq!(reconnected["payload"]["recovered"], true);
    assert_eq!(reconnected["payload"]["replayed"], 3);
}

/// The seam test: one presenter connection stays up while another drops and
/// reconnects with `lastEventId` again and again during a vote storm; both end
/// with the same sequence of event ids, no gap, no repeat.
async fn reconnecting_client_sees_exactly_what_a_connected_one_sees(format: Format) {
    let _exclusive = pollcast_tests::exclusive().await;
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let voters = futures::future::join_all((0..120).map(|i| {
        let (api, code) = (t.api.clone(), p.code.clone());
        async move { api.join(&code, &format!("voter {i}")).await }
    }))
    .await;
    t.settle(&p.session_id).await;
    let mut steady = connect_after(&t, &p, &p.token, None, format).await;
    let established = steady.expect("connection:established").await;
    let start = established["payload"]["lastEventId"]
        .as_str()
        .expect("newest")
        .to_owned();

    let storming = Arc::new(AtomicBool::new(true));
    let storm = {
        let (api, poll_id, options) = (
            t.api.clone(),
            id_of(&poll),
            (0..3).map(|i| option_id(&poll, i)).collect::<Vec<_>>(),
        );
        let storming = Arc::clone(&storming);
        tokio::spawn(async move {
            for (i, voter) in voters.iter().enumerate() {
                api.vote(&poll_id, &voter.token, &[&options[i % 3]])
                    .await
                    .expect(201);
            }
            storming.store(false, Ordering::SeqCst);
        })
    };

    // The reconnecting client: drop after a few events, reconnect from the last
    // id it saw, until the storm is over.
    let mut bouncing_ids: Vec<String> = Vec::new();
    let mut last = start.clone();
    let mut reconnects = 0;
    while storming.load(Ordering::SeqCst) {
        let mut client = connect_after(&t, &p, &p.token, Some(&last), format).await;
        client.expect("connection:established").await;
        let mut taken = 0;
        loop {
            // Once the storm is over no more events come: stop bouncing.
            let Some(frame) = client
                .envelope_within(std::time::Duration::from_millis(500))
                .await
            else {
                assert!(
                    !storming.load(Ordering::SeqCst),
                    "events stalled during the storm"
                );
                break;
            };
            if frame["eventType"] == "connection:reconnected" {
                assert_eq!(frame["payload"]["recovered"], true);
                continue;
            }
            let id = event_id(&frame);
            bouncing_ids.push(id.clone());
            last = id;
            taken += 1;
            if taken == 7 {
                break;
            }
        }
        drop(client);
        reconnects += 1;
    }
    storm.await.expect("storm");
    assert!(reconnects >= 5, "reconnected {reconnects} times");

    // Drain both to the stream's newest position.
    t.settle(&p.session_id).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let newest = t
        .server
        .stream()
        .newest(session)
        .await
        .expect("newest")
        .expect("some");
    let newest = EventId::new(session, newest).to_string();
    let mut tail = connect_after(&t, &p, &p.token, Some(&last), format).await;
    tail.expect("connection:established").await;
    while last != newest {
        let frame = tail.envelope().await;
        if frame["eventType"] != "connection:reconnected" {
            last = event_id(&frame);
            bouncing_ids.push(last.clone());
        }
    }
    let mut steady_ids = Vec::new();
    while steady_ids.last() != Some(&newest) {
        steady_ids.push(event_id(&steady.envelope().await));
    }
    assert_eq!(
        bouncing_ids.len(),
        steady_ids.len(),
        "same number of events"
    );
    assert_eq!(bouncing_ids, steady_ids, "identical sequences");
    let unique: HashSet<&String> = steady_ids.iter().collect();
    assert_eq!(unique.len(), steady_ids.len(), "no duplicates");
    let positions: Vec<u64> = steady_ids
        .iter()
        .map(|id| {
            id.parse::<EventId>()
                .expect("id")
                .position_in(session)
                .expect("position")
        })
        .collect();
    let first = start
        .parse::<EventId>()
        .expect("id")
        .position_in(session)
        .expect("position");
    assert_eq!(
        positions,
        (first + 1..=first + positions.len() as u64).collect::<Vec<_>>(),
        "no gaps"
    );
    // 120 vote:accepted plus the coalesced results:updated that cover them.
    assert!(
        positions.len() > 120,
        "the storm went through the seam: {}",
        positions.len()
    );
}

pollcast_tests::in_both_formats!(
    connecting_with_last_event_id_replays_what_was_missed,
    resume_frame_replays_on_an_open_connection,
    history_that_no_longer_reaches_is_not_recovered,
    replay_works_across_a_restart_of_the_embedded_stream,
    reconnecting_client_sees_exactly_what_a_connected_one_sees,
);

/// A replay page can run past the newest event the connection was told of, into
/// events committed meanwhile that the room queued for it too. When the read
/// after that page fails (`recovered: false`), the queue must not send those
/// events a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fails_midway_sends_no_event_twice() {
    use pollcast_stream::EventStream;
    use pollcast_tests::stream::SwitchableStream;
    let stream = Arc::new(SwitchableStream::default());
    // The log's path: no room window to answer from.
    let options = Options {
        stream: stream.clone(),
        edge: EdgeConfig {
            room_window_per_member: 0,
            ..EdgeConfig::default()
        },
        ..Options::default()
    };
    let t = TestServer::start_with(Backend::Sqlite, options).await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    t.settle(&p.session_id).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let position = |frame: &Value| {
        frame["eventId"].as_str().map(|id| {
            id.parse::<EventId>()
                .expect("event id")
                .position_in(session)
                .expect("ours")
        })
    };
    let before = stream
        .newest(session)
        .await
        .expect("newest")
        .expect("events");
    stream.arm_read_trap();
    let from = EventId::new(session, 1).to_string();
    let mut client = connect_after(&t, &p, &p.token, Some(&from), Format::Json).await;
    client.expect("connection:established").await;
    tokio::time::timeout(Duration::from_secs(10), stream.first_read_waiting())
        .await
        .expect("the replay reads the log");
    // Committed while the replay waits (a poll created and activated, a vote):
    // in the log the page reads, and queued by the room.
    let poll = t.api.active_poll(&p).await;
    t.api
        .vote(&id_of(&poll), &ada.token, &[&option_id(&poll, 0)])
        .await
        .expect(201);
    t.stream_reaches(session, before + 1).await;
    stream.release_first_read();
    let mut newest_seen = 0;
    let reconnected = loop {
        let frame = client.envelope().await;
        if frame["eventType"] == "connection:reconnected" {
            break frame;
        }
        newest_seen = newest_seen.max(position(&frame).expect("replayed event"));
    };
    assert!(
        newest_seen > before,
        "the page held what was committed meanwhile"
    );
    assert_eq!(reconnected["payload"]["recovered"], false, "{reconnected}");
    // A new event: everything before it on the wire must be newer than the replay.
    t.api
        .act(
            &format!("/api/polls/{}/close", id_of(&poll)),
            Some(&p.token),
        )
        .await
        .expect(200);
    loop {
        let frame = client.envelope().await;
        if let Some(at) = position(&frame) {
            assert!(at > newest_seen, "sent again after the replay: {frame}");
        }
        if frame["eventType"] == "poll:closed" {
            break;
        }
    }
}

/// A server on a stream that counts its reads (and can hold live events back).
async fn counting_server() -> (Arc<pollcast_tests::stream::SwitchableStream>, TestServer) {
    let stream = Arc::new(pollcast_tests::stream::SwitchableStream::default());
    let options = Options {
        stream: stream.clone(),
        ..Options::default()
    };
    (
        stream,
        TestServer::start_with(Backend::Sqlite, options).await,
    )
}

/// The frames up to `connection:reconnected`: the replayed events' types, and
/// the `connection:reconnected` frame.
async fn replay_of(client: &mut WsClient) -> (Vec<String>, Value) {
    let mut replayed = Vec::new();
    loop {
        let frame = client.envelope().await;
        if frame["eventType"] == "connection:reconnected" {
            return (replayed, frame);
        }
        replayed.push(frame["eventType"].as_str().expect("type").to_owned());
    }
}

/// A client that dropped while its room stayed open on the node is replayed
/// from the room's memory: the stream is not read at all. And the room outlives
/// its last member for a while, so that holds when everyone dropped at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_back_moments_later_is_replayed_from_the_rooms_memory() {
    let (stream, t) = counting_server().await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    t.settle(&p.session_id).await;
    // The presenter's screen holds the room open while the poll runs.
    let mut screen = connect_after(&t, &p, &p.token, None, Format::Json).await;
    let established = screen.expect("connection:established").await;
    let seen = established["payload"]["lastEventId"]
        .as_str()
        .expect("events")
        .to_owned();
    let poll = t.api.active_poll(&p).await;
    t.api
        .vote(&id_of(&poll), &ada.token, &[&option_id(&poll, 0)])
        .await
        .expect(201);
    // What the screen saw after `seen`, up to the vote's results (the last
    // event: nothing else happens in the session).
    let mut saw = Vec::new();
    while saw.last().is_none_or(|t| t != "results:updated") {
        let frame = screen.envelope().await;
        saw.push(frame["eventType"].as_str().expect("type").to_owned());
    }
    drop(screen);
    let edge = t.server.edge().expect("an edge");
    tokio::time::timeout(Duration::from_secs(10), edge.all_closed())
        .await
        .expect("the screen's connection closed");
    assert_eq!(edge.connections(), 0);

    // The presenter again: a participant's connection adds presence events.
    let reads = stream.reads();
    let mut back = connect_after(&t, &p, &p.token, Some(&seen), Format::Json).await;
    back.expect("connection:established").await;
    let (replayed, reconnected) = replay_of(&mut back).await;
    assert_eq!(replayed, saw);
    assert_eq!(reconnected["payload"]["replayed"], replayed.len());
    assert_eq!(reconnected["payload"]["recovered"], true);
    assert_eq!(stream.reads(), reads, "the replay read the stream");
}

/// Clients that reconnect at once to a room this node does not hold yet (their
/// node went away) fill the new room's memory from the stream once, between
/// them, and each gets its whole replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_on_a_new_room_reads_the_stream_once() {
    use pollcast_stream::EventStream;
    let (stream, t) = counting_server().await;
    let p = t.api.started_session().await;
    t.api.join(&p.code, "Ada").await;
    t.api.active_poll(&p).await;
    t.settle(&p.session_id).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    // All of them for a presenter.
    let newest = stream
        .newest(session)
        .await
        .expect("newest")
        .expect("events");
    let from = EventId::new(session, 1).to_string();
    let reads = stream.reads();
    // The first read of the log waits until all of them are connected (and every
    // read after it fails): each replay has begun, and only one may read.
    stream.arm_read_trap();
    // Presenters: their connections report no presence, so the log stays as it is.
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut client = connect_after(&t, &p, &p.token, Some(&from), Format::Json).await;
        client.expect("connection:established").await;
        clients.push(client);
    }
    tokio::time::timeout(Duration::from_secs(10), stream.first_read_waiting())
        .await
        .expect("a replay reads the log");
    stream.release_first_read();
    let replays = futures::future::join_all(clients.iter_mut().map(replay_of)).await;
    for (replayed, reconnected) in &replays {
        assert_eq!(reconnected["payload"]["recovered"], true);
        assert_eq!(replayed.len() as u64, newest - 1, "{replayed:?}");
        assert_eq!(replayed, &replays[0].0);
    }
    assert_eq!(
        stream.reads() - reads,
        1,
        "the stream was read more than once"
    );
}

/// A room a moment behind the stream (a loaded edge's) dispatches what it is
/// missing by itself: a replay that needs it waits for the room rather than
/// read the stream, and still ends whole. (Whether the replay looks before or
/// after the room catches up is up to the scheduler; the wait itself is the
/// room's unit test `a_wait_for_the_room_ends_when_it_dispatches_or_at_the_deadline`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waits_for_a_room_behind_the_stream_rather_than_read_it() {
    let (stream, t) = counting_server().await;
    let p = t.api.started_session().await;
    t.settle(&p.session_id).await;
    let mut screen = connect_after(&t, &p, &p.token, None, Format::Json).await;
    let established = screen.expect("connection:established").await;
    let seen = established["payload"]["lastEventId"]
        .as_str()
        .expect("events")
        .to_owned();
    // In the stream, not yet in the room.
    stream.hold_live(true);
    t.api.active_poll(&p).await;
    t.settle(&p.session_id).await;

    let reads = stream.reads();
    let mut back = connect_after(&t, &p, &p.token, Some(&seen), Format::Json).await;
    back.expect("connection:established").await;
    stream.hold_live(false);
    let (replayed, reconnected) = replay_of(&mut back).await;
    assert_eq!(replayed, ["poll:created", "poll:activated"]);
    assert_eq!(reconnected["payload"]["recovered"], true);
    assert_eq!(stream.reads(), reads, "the replay read the stream");
    screen.expect("poll:created").await;
    screen.expect("poll:activated").await;
}
