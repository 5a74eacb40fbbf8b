//! WebSocket connection frames and refusals: one test per row of the contract's
//! connection tables, in JSON and MessagePack.

use std::time::Duration;

use pollcast_domain::{Claims, TokenKeys};
use pollcast_edge::EdgeConfig;
use pollcast_protocol::{EventId, Role};
use pollcast_tests::client::{Presenter, id_of};
use pollcast_tests::server::{Options, SECRET};
use pollcast_tests::ws::{Format, Incoming, WsClient, query};
use pollcast_tests::{Backend, TestServer};
use serde_json::{Value, json};
use uuid::Uuid;

/// Connects once the stream holds everything the session committed so far.
async fn connect(t: &TestServer, p: &Presenter, token: &str, format: Format) -> WsClient {
    t.settle(&p.session_id).await;
    WsClient::connect(t.server.addr(), &query(&p.session_id, token, None, format)).await
}

async fn established_is_the_first_frame(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let mut presenter = connect(&t, &p, &p.token, format).await;
    let frame = presenter.next().await;
    let Incoming::Frame(established) = frame else {
        panic!("{frame:?}")
    };
    assert_eq!(established["eventType"], "connection:established");
    assert_eq!(established["eventId"], Value::Null);
    assert_eq!(established["sessionId"], p.session_id.as_str());
    let payload = &established["payload"];
    assert_eq!(payload["role"], "presenter");
    assert_eq!(payload["participantId"], Value::Null);
    assert_eq!(payload["heartbeatIntervalMs"], 30_000);
    assert_eq!(payload["lastEventId"], EventId::new(session, 3).to_string());
    assert!(
        payload["connectionId"]
            .as_str()
            .is_some_and(|c| Uuid::parse_str(c).is_ok())
    );
    let mut ada = connect(&t, &p, &j.token, format).await;
    let established = ada.expect("connection:established").await;
    assert_eq!(established["payload"]["role"], "participant");
    assert_eq!(established["payload"]["participantId"], j.id.as_str());
}

async fn refused_connections_get_an_error_then_their_close_code(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let other = t.api.create_session("Other").await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let keys = TokenKeys::new(SECRET, Duration::from_secs(60));
    let expired = keys.sign(&Claims {
        session_id: session,
        role: Role::Presenter,
        participant_id: None,
        expires_at: 1,
    });
    let forged = TokenKeys::new(b"not our secret", Duration::from_secs(60)).issue(
        session,
        Role::Presenter,
        None,
    );
    let ghost = Uuid::now_v7();
    let ghost_token = keys.issue(ghost, Role::Presenter, None);
    let fmt = format.as_query();
    let s = &p.session_id;
    let cases = [
        (
            format!("token={}&format={fmt}", p.token),
            "bad_request",
            4400,
        ),
        (format!("sessionId={s}&format={fmt}"), "bad_request", 4400),
        (
            format!("sessionId=nope&token={}&format={fmt}", p.token),
            "bad_request",
            4400,
        ),
        (
            format!(
                "sessionId={s}&token={}&lastEventId=bogus&format={fmt}",
                p.token
            ),
            "bad_request",
            4400,
        ),
        (
            format!("sessionId={s}&token=garbage&format={fmt}"),
            "unauthorized",
            4401,
        ),
        (
            format!("sessionId={s}&token={forged}&format={fmt}"),
            "unauthorized",
            4401,
        ),
        (
            format!("sessionId={s}&token={expired}&format={fmt}"),
            "unauthorized",
            4401,
        ),
        (
            format!("sessionId={s}&token={}&format={fmt}", other.token),
            "forbidden",
            4403,
        ),
        (
            format!("sessionId={ghost}&token={ghost_token}&format={fmt}"),
            "session_not_found",
            4404,
        ),
    ];
    for (query, code, status) in cases {
        let mut client = WsClient::connect(t.server.addr(), &query).await;
        client.expect_refusal(code, status).await;
    }
    // An unreadable format is refused in JSON, the one format every client reads.
    let mut client = WsClient::connect(
        t.server.addr(),
        &format!("sessionId={s}&token={}&format=xml", p.token),
    )
    .await;
    client.format = Format::Json;
    client.expect_refusal("bad_request", 4400).await;
    assert_eq!(
        t.server.edge().expect("edge part").connections(),
        0,
        "refused connections hold no place"
    );
}

async fn connections_beyond_the_per_participant_limit_close_with_4429(format: Format) {
    let options = Options {
        edge: EdgeConfig {
            max_connections_per_participant: 2,
            ..EdgeConfig::default()
        },
        ..Options::default()
    };
    let t = TestServer::start_with(Backend::Sqlite, options).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let mut first = connect(&t, &p, &j.token, format).await;
    first.expect("connection:established").await;
    let mut second = connect(&t, &p, &j.token, format).await;
    second.expect("connection:established").await;
    let mut third = connect(&t, &p, &j.token, format).await;
    third.expect_refusal("too_many_connections", 4429).await;
    // Presenters and other participants are not counted against Ada.
    let mut bob = connect(&t, &p, &t.api.join(&p.code, "Bob").await.token, format).await;
    bob.expect("connection:established").await;
    first.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = connect(&t, &p, &j.token, format).await;
        let frame = again.envelope().await;
        if frame["eventType"] == "connection:established" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place never came back"
        );
    }
}

async fn live_events_reach_the_room_in_order(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let mut presenter = connect(&t, &p, &p.token, format).await;
    let mut ada = connect(&t, &p, &j.token, format).await;
    presenter.expect("connection:established").await;
    ada.expect("connection:established").await;
    let poll = t.api.active_poll(&p).await;
    for client in [&mut presenter, &mut ada] {
        let created = client.expect("poll:created").await;
        let activated = client.expect("poll:activated").await;
        assert_eq!(created["payload"]["poll"]["id"], id_of(&poll).as_str());
        assert_eq!(activated["payload"]["poll"]["status"], "active");
        let (a, b) = (
            created["eventId"].as_str().expect("id"),
            activated["eventId"].as_str().expect("id"),
        );
        assert!(a < b, "later events have later ids");
        assert!(
            created["timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        assert_eq!(created["sessionId"], p.session_id.as_str());
    }
}

async fn events_go_only_to_the_connections_the_contract_names(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let a = t.api.join(&p.code, "Ada").await;
    let b = t.api.join(&p.code, "Bob").await;
    let mut presenter = connect(&t, &p, &p.token, format).await;
    let mut ada = connect(&t, &p, &a.token, format).await;
    let mut bob = connect(&t, &p, &b.token, format).await;
    for client in [&mut presenter, &mut ada, &mut bob] {
        client.expect("connection:established").await;
    }
    let poll = t.api.active_poll(&p).await;
    let option = poll["options"][0]["id"]
        .as_str()
        .expect("option")
        .to_owned();
    t.api
        .vote(&id_of(&poll), &a.token, &[&option])
        .await
        .expect(201);
    t.api
        .vote(&id_of(&poll), &a.token, &[&option])
        .await
        .expect_error(409, "already_voted");
    t.api.join(&p.code, "Cy").await;
    t.api
        .act(
            &format!("/api/polls/{}/close", id_of(&poll)),
            Some(&p.token),
        )
        .await
        .expect(200);
    let mut seen = Vec::new();
    for client in [&mut presenter, &mut ada, &mut bob] {
        let mut types = Vec::new();
        loop {
            let frame = client.envelope().await;
            let kind = frame["eventType"].as_str().expect("type").to_owned();
            if kind == "vote:rejected" {
                assert_eq!(frame["payload"]["reason"], "already_voted");
                assert_eq!(frame["payload"]["participantId"], a.id.as_str());
            }
            let done = kind == "poll:closed";
            if kind != "results:updated" {
                types.push(kind);
            }
            if done {
                break;
            }
        }
        seen.push(types);
    }
    let room = ["poll:created", "poll:activated"];
    let with = |extra: &[&str]| -> Vec<String> {
        room.iter()
            .chain(extra)
            .map(|s| s.to_string())
            .chain(["poll:closed".to_owned()])
            .collect()
    };
    assert_eq!(
        seen[0],
        with(&["vote:accepted", "participant:joined"]),
        "presenter"
    );
    assert_eq!(
        seen[1],
        with(&["vote:accepted", "vote:rejected"]),
        "the voter"
    );
    assert_eq!(seen[2], with(&[]), "another participant");
}

async fn unknown_client_frames_get_bad_frame_and_the_connection_stays_open(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let mut client = connect(&t, &p, &p.token, format).await;
    client.expect("connection:established").await;
    for junk in [
        r#"{"eventType":"vote"}"#,
        "not json",
        r#"{"eventType":"resume","lastEventId":"nope"}"#,
    ] {
        client.send_text(junk).await;
        let error = client.expect("connection:error").await;
        assert_eq!(error["payload"]["code"], "bad_frame", "{junk}");
    }
    t.api.active_poll(&p).await;
    client.expect("poll:created").await;
}

async fn client_frame_over_4_kib_closes_with_1009(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let mut client = connect(&t, &p, &p.token, format).await;
    client.expect("connection:established").await;
    let big = format!(
        r#"{{"eventType":"heartbeat:pong","pad":"{}"}}"#,
        "x".repeat(4200)
    );
    client.send_text(&big).await;
    loop {
        match client.next().await {
            Incoming::Close(code) => {
                assert_eq!(code, 1009);
                break;
            }
            Incoming::Frame(_) => {}
            Incoming::Ended => panic!("closed without a close frame"),
        }
    }
}

async fn shutdown_flushes_then_closes_with_1001(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.started_session().await;
    let mut client = connect(&t, &p, &p.token, format).await;
    client.expect("connection:established").await;
    t.api.active_poll(&p).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    t.stream_reaches(session, 4).await;
    t.server.shutdown().await.expect("clean shutdown");
    client.expect("poll:created").await;
    client.expect("poll:activated").await;
    client.expect_refusal("going_away", 1001).await;
}

async fn every_domain_event_reaches_its_audience(format: Format) {
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.create_session("Town hall").await;
    let a = t.api.join(&p.code, "Ada").await;
    let mut presenter = connect(&t, &p, &p.token, format).await;
    let mut ada = connect(&t, &p, &a.token, format).await;
    presenter.expect("connection:established").await;
    ada.expect("connection:established").await;
    t.api
        .act(
            &format!("/api/sessions/{}/start", p.session_id),
            Some(&p.token),
        )
        .await
        .expect(200);
    let poll = t.api.active_poll(&p).await;
    let option = poll["options"][0]["id"]
        .as_str()
        .expect("option")
        .to_owned();
    t.api
        .vote(&id_of(&poll), &a.token, &[&option])
        .await
        .expect(201);
    t.api
        .vote(&id_of(&poll), &a.token, &[&option])
        .await
        .expect_error(409, "already_voted");
    let bob = t.api.join(&p.code, "Bob").await;
    let bob_ws = connect(&t, &p, &bob.token, format).await;
    drop(bob_ws);
    t.api
        .act(
            &format!("/api/sessions/{}/end", p.session_id),
            Some(&p.token),
        )
        .await
        .expect(200);
    let mut types = std::collections::BTreeSet::new();
    let mut ended = false;
    while !(ended && types.contains("participant:disconnected")) {
        let frame = presenter.envelope().await;
        let kind = frame["eventType"].as_str().expect("type").to_owned();
        assert!(frame["eventId"].is_string(), "{frame}");
        ended |= kind == "session:ended";
        types.insert(kind);
    }
    let expected = [
        "participant:disconnected",
        "participant:joined",
        "poll:activated",
        "poll:closed",
        "poll:created",
        "results:updated",
        "session:ended",
        "session:started",
        "vote:accepted",
    ];
    assert_eq!(
        types.iter().map(String::as_str).collect::<Vec<_>>(),
        expected
    );
    loop {
        let frame = ada.envelope().await;
        if frame["eventType"] == "vote:rejected" {
            assert_eq!(frame["payload"]["pollId"], id_of(&poll).as_str());
            break;
        }
    }
}

async fn heartbeat_ping_arrives_in_the_connection_format(format: Format) {
    let options = Options {
        edge: EdgeConfig {
            heartbeat_interval: Duration::from_millis(50),
            ..EdgeConfig::default()
        },
        ..Options::default()
    };
    let t = TestServer::start_with(Backend::Sqlite, options).await;
    let p = t.api.started_session().await;
    let mut client = connect(&t, &p, &p.token, format).await;
    let established = client.expect("connection:established").await;
    assert_eq!(established["payload"]["heartbeatIntervalMs"], 50);
    let Incoming::Frame(ping) = client.next().await else {
        panic!("no ping")
    };
    assert_eq!(ping["eventType"], "heartbeat:ping");
    assert_eq!(ping["eventId"], Value::Null);
    assert_eq!(ping["payload"], json!({}));
}

pollcast_tests::in_both_formats!(
    every_domain_event_reaches_its_audience,
    heartbeat_ping_arrives_in_the_connection_format,
    established_is_the_first_frame,
    refused_connections_get_an_error_then_their_close_code,
    connections_beyond_the_per_participant_limit_close_with_4429,
    live_events_reach_the_room_in_order,
    events_go_only_to_the_connections_the_contract_names,
    unknown_client_frames_get_bad_frame_and_the_connection_stays_open,
    client_frame_over_4_kib_closes_with_1009,
    shutdown_flushes_then_closes_with_1001,
);

/// RFC 6455 wants a protocol error answered with a close frame (1002, or 1007 for
/// text that is not UTF-8), not a dropped socket; and a server must fail the
/// connection on an unmasked client frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002_or_1007() {
    use pollcast_tests::ws::{RawClient, client_frame};
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.create_session("Town hall").await;
    t.settle(&p.session_id).await;
    let q = query(&p.session_id, &p.token, None, Format::Json);
    let key = Some([0x12, 0x34, 0x56, 0x78]);
    let pong = br#"{"eventType":"heartbeat:pong"}"#;
    let mut fragmented_bad_utf8 = client_frame(0x01, b"\xe2\x82", key);
    fragmented_bad_utf8.extend(client_frame(0x80, b"\x28", key));
    let mut interleaved = client_frame(0x01, b"{", key);
    interleaved.extend(client_frame(0x81, pong, key));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "invalid UTF-8 text",
            client_frame(0x81, b"\xff\xfe", key),
            1007,
        ),
        ("invalid UTF-8 across fragments", fragmented_bad_utf8, 1007),
        ("RSV1 set", client_frame(0xC1, pong, key), 1002),
        ("reserved opcode 3", client_frame(0x83, b"x", key), 1002),
        ("126-byte ping", client_frame(0x89, &[0u8; 126], key), 1002),
        ("fragmented ping", client_frame(0x09, b"x", key), 1002),
        ("1-byte close payload", client_frame(0x88, b"x", key), 1002),
        (
            "close code 1005, which is never sent",
            client_frame(0x88, &1005u16.to_be_bytes(), key),
            1002,
        ),
        ("a new message inside a fragmented one", interleaved, 1002),
        (
            "continuation with no message open",
            client_frame(0x80, pong, key),
            1002,
        ),
        ("unmasked text", client_frame(0x81, pong, None), 1002),
        ("unmasked ping", client_frame(0x89, b"x", None), 1002),
    ];
    for (what, bytes, status) in cases {
        let mut client = RawClient::connect(t.server.addr(), &q).await;
        client.send_raw(&bytes).await;
        assert_eq!(client.close_status().await, Some(status), "{what}");
    }
    // The same bytes, masked and well formed, are a pong like any other.
    let mut client = RawClient::connect(t.server.addr(), &q).await;
    client.send_raw(&client_frame(0x81, pong, key)).await;
    client
        .send_raw(&client_frame(0x88, &1000u16.to_be_bytes(), key))
        .await;
    assert_eq!(
        client.close_status().await,
        Some(1000),
        "a clean close is echoed"
    );
}

/// A client may send frames right behind its handshake, without waiting for
/// the 101 (RFC 6455 §4.1). They reach the server with the request, so hyper
/// has read them by the upgrade; the connection must read them first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_handshake_are_read() {
    use pollcast_tests::ws::{RawClient, client_frame};
    let t = TestServer::start(Backend::Sqlite).await;
    let p = t.api.create_session("Town hall").await;
    t.settle(&p.session_id).await;
    let q = query(&p.session_id, &p.token, None, Format::Json);
    let key = Some([0x0a, 0x0b, 0x0c, 0x0d]);
    let mut early = client_frame(0x81, br#"{"eventType":"heartbeat:pong"}"#, key);
    early.extend(client_frame(0x88, &1000u16.to_be_bytes(), key));
    let mut client = RawClient::connect_sending(t.server.addr(), &q, &early).await;
    assert_eq!(
        client.close_status().await,
        Some(1000),
        "the close sent with the handshake is echoed"
    );
}
