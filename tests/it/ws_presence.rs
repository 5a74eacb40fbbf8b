//! Heartbeat and presence: silent clients are closed with 4408, answered pings keep
//! a connection and move `lastSeenAt`, and `participant:disconnected` follows the
//! last connection of a participant, whatever closed it.

use std::time::Duration;

use pollcast_domain::DomainConfig;
use pollcast_edge::EdgeConfig;
use pollcast_tests::client::Presenter;
use pollcast_tests::server::Options;
use pollcast_tests::ws::{Format, Incoming, Listening, WsClient, query};
use pollcast_tests::{Backend, TestServer};
use serde_json::{Value, json};

/// Heartbeat every 100 ms, silence tolerated for 300 ms, presence flushed every 50 ms.
fn fast_heartbeat() -> Options {
    Options {
        edge: EdgeConfig {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(300),
            ..EdgeConfig::default()
        },
        domain: DomainConfig {
            presence_flush: Duration::from_millis(50),
            ..DomainConfig::default()
        },
        ..Options::default()
    }
}

async fn connect(t: &TestServer, p: &Presenter, token: &str) -> WsClient {
    t.settle(&p.session_id).await;
    let mut client = WsClient::connect(
        t.server.addr(),
        &query(&p.session_id, token, None, Format::Json),
    )
    .await;
    client.expect("connection:established").await;
    client
}

/// Ada as the presenter's participant list shows her.
async fn ada_in_list(t: &TestServer, p: &Presenter) -> Value {
    let list = t.api.participants(p).await;
    list[0].clone()
}

/// Waits (at most 5 s) until Ada's list entry satisfies `check`.
async fn until_ada(t: &TestServer, p: &Presenter, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ada = ada_in_list(t, p).await;
        if check(&ada) {
            return ada;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached: {ada}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The presenter's next `participant:disconnected`, skipping other events.
async fn next_disconnect(presenter: &mut Listening) -> Value {
    loop {
        let frame = presenter.envelope().await;
        if frame["eventType"] == "participant:disconnected" {
            return frame;
        }
    }
}

async fn silent_client_is_closed_with_4408_and_reported_disconnected(backend: Backend) {
    let t = TestServer::start_with(backend, fast_heartbeat()).await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    let mut presenter = connect(&t, &p, &p.token).await.listen();
    let mut silent = connect(&t, &p, &ada.token).await;
    silent.auto_pong = false;
    until_ada(&t, &p, |a| a["connected"] == true).await;
    let started = tokio::time::Instant::now();
    let mut pings = 0;
    loop {
        match silent.next().await {
            Incoming::Frame(f) if f["eventType"] == "heartbeat:ping" => pings += 1,
            Incoming::Frame(f) if f["eventType"] == "connection:error" => {
                assert_eq!(f["payload"]["code"], "heartbeat_timeout");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(silent.next().await, Incoming::Close(4408));
    let waited = started.elapsed();
    assert!(pings >= 2, "pings came every 100 ms: {pings}");
    assert!(waited < Duration::from_secs(2), "closed after {waited:?}");
    let gone = next_disconnect(&mut presenter).await;
    assert_eq!(gone["payload"]["participantId"], ada.id.as_str());
    assert_eq!(gone["payload"]["displayName"], "Ada");
    let listed = ada_in_list(&t, &p).await;
    assert_eq!(listed["connected"], false, "committed with the event");
}

async fn answered_heartbeats_keep_the_connection_and_move_last_seen(backend: Backend) {
    let t = TestServer::start_with(backend, fast_heartbeat()).await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    let joined = ada_in_list(&t, &p).await;
    let mut client = connect(&t, &p, &ada.token).await;
    // Four timeouts' worth of heartbeats, each answered.
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::Instant::now() < until {
        match client.next().await {
            Incoming::Frame(f) if f["eventType"] == "heartbeat:ping" => client.pong().await,
            other => panic!("unexpected {other:?}"),
        }
    }
    let seen = until_ada(&t, &p, |a| {
        a["lastSeenAt"].as_str() > joined["lastSeenAt"].as_str()
    })
    .await;
    assert_eq!(seen["connected"], true);
    // Still open: a resume answers.
    client
        .send_text(&json!({ "eventType": "resume", "lastEventId": "x" }).to_string())
        .await;
    assert_eq!(
        client.expect("connection:error").await["payload"]["code"],
        "bad_frame"
    );
}

async fn disconnected_is_sent_once_the_last_connection_is_gone(backend: Backend) {
    let t = TestServer::start_with(backend, fast_heartbeat()).await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    let mut presenter = connect(&t, &p, &p.token).await.listen();
    // Both answer heartbeats, so only their closing can disconnect Ada.
    let first = connect(&t, &p, &ada.token).await.listen();
    let second = connect(&t, &p, &ada.token).await.listen();
    until_ada(&t, &p, |a| a["connected"] == true).await;
    drop(first);
    drop(second);
    let gone = next_disconnect(&mut presenter).await;
    assert_eq!(gone["payload"]["participantId"], ada.id.as_str());
    until_ada(&t, &p, |a| a["connected"] == false).await;
    // Nothing else about Ada follows: the next event is the one made now.
    t.api
        .create_poll(&p, json!({ "question": "After?", "options": ["A", "B"] }))
        .await;
    assert_eq!(presenter.envelope().await["eventType"], "poll:created");
}

async fn graceful_shutdown_leaves_no_participant_marked_connected(backend: Backend) {
    let t = TestServer::start_with(backend, fast_heartbeat()).await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    let _listening = connect(&t, &p, &ada.token).await.listen();
    until_ada(&t, &p, |a| a["connected"] == true).await;
    let stopped = t.stop().await;
    let row = stopped.participant(&ada.id).await;
    assert!(!row.connected, "the shutdown's disconnects were applied");
}

async fn a_pong_flood_reaches_the_domain_as_one_sign_of_life(backend: Backend) {
    let stream = std::sync::Arc::new(pollcast_tests::stream::SwitchableStream::default());
    let options = Options {
        stream: stream.clone(),
        ..Options::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let p = t.api.started_session().await;
    let ada = t.api.join(&p.code, "Ada").await;
    let mut presenter = connect(&t, &p, &p.token).await.listen();
    let mut client = connect(&t, &p, &ada.token).await;
    for _ in 0..200 {
        client.pong().await;
    }
    client.close().await;
    next_disconnect(&mut presenter).await;
    use pollcast_protocol::PresenceKind;
    assert_eq!(stream.reported(PresenceKind::Connected), 1);
    assert_eq!(
        stream.reported(PresenceKind::Seen),
        1,
        "one per heartbeat interval"
    );
    assert_eq!(stream.reported(PresenceKind::Disconnected), 1);
}

pollcast_tests::on_both_backends!(
    a_pong_flood_reaches_the_domain_as_one_sign_of_life,
    graceful_shutdown_leaves_no_participant_marked_connected,
    silent_client_is_closed_with_4408_and_reported_disconnected,
    answered_heartbeats_keep_the_connection_and_move_last_seen,
    disconnected_is_sent_once_the_last_connection_is_gone,
);
