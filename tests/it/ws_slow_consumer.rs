//! Invariant 4: a stalled client never delays anyone else. One client stops reading
//! while 200 others receive a burst; the 200 get every event within a latency
//! bound, and the stalled one is closed with 4500 once its queue overflows.

use std::time::Duration;

use pollcast_domain::NewPoll;
use pollcast_edge::EdgeConfig;
use pollcast_protocol::PollKind;
use pollcast_tests::server::Options;
use pollcast_tests::ws::{Format, Incoming, WsClient, query};
use pollcast_tests::{Backend, TestServer};

const LISTENERS: usize = 200;
const BURST: usize = 400;
/// Worst delivery latency (commit → read by the client) any of the 200 may see.
/// Generous because the 200 clients, the server and the burst's writer share two
/// cores in this one process; measured worst cases are in docs/benchmarks.md.
const LATENCY_BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_is_closed_with_4500_and_the_room_goes_on() {
    let _exclusive = pollcast_tests::exclusive().await;
    let options = Options {
        edge: EdgeConfig {
            send_queue_bytes: 32 * 1024,
            socket_send_buffer: Some(16 * 1024),
            // Long enough that the server's blocked write to the stalled client
            // completes once it reads again, so the close frame can be seen.
            write_timeout: Duration::from_secs(60),
            ..EdgeConfig::default()
        },
        // The burst is made of polls: more than a session may have by default.
        domain: pollcast_domain::DomainConfig {
            max_polls_per_session: 1000,
            ..Default::default()
        },
        ..Options::default()
    };
    let t = TestServer::start_with(Backend::Sqlite, options).await;
    let p = t.api.started_session().await;
    let listeners = futures::future::join_all((0..LISTENERS).map(|i| {
        let (api, code) = (t.api.clone(), p.code.clone());
        async move { api.join(&code, &format!("listener {i}")).await }
    }))
    .await;
    t.settle(&p.session_id).await;
    let addr = t.server.addr();

    // The stalled client: a tiny receive buffer, and it reads nothing until the end.
    let mut stalled = WsClient::connect_with_buffer(
        addr,
        &query(&p.session_id, &p.token, None, Format::Json),
        Some(4096),
    )
    .await;
    stalled.expect("connection:established").await;

    let mut readers = Vec::new();
    for listener in &listeners {
        let mut client = WsClient::connect(
            addr,
            &query(&p.session_id, &listener.token, None, Format::Json),
        )
        .await;
        client.expect("connection:established").await;
        readers.push(tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut ids = Vec::with_capacity(BURST);
            while ids.len() < BURST {
                let frame = client.envelope().await;
                assert_eq!(frame["eventType"], "poll:created", "{frame}");
                let sent = chrono_millis(&frame["timestamp"]);
                let lag = Duration::from_millis(u64::try_from(now_millis() - sent).unwrap_or(0));
                worst = worst.max(lag);
                ids.push(frame["eventId"].as_str().expect("id").to_owned());
            }
            (worst, ids)
        }));
    }

    // The burst: polls with long questions, so the stalled queue overflows fast.
    let claims = t
        .server
        .domain()
        .expect("api part")
        .verify_token(&p.token)
        .expect("presenter claims");
    let session = p.session_id.parse().expect("uuid");
    for i in 0..BURST {
        let poll = NewPoll {
            question: format!("Question {i}: {}", "?".repeat(400)),
            options: vec!["A".to_owned().into(), "B".to_owned().into()],
            kind: PollKind::Single,
            max_choices: None,
        };
        t.server
            .domain()
            .expect("api part")
            .create_poll(&claims, session, poll)
            .await
            .expect("poll");
    }

    let mut worst = Duration::ZERO;
    let mut sequences = Vec::new();
    for reader in readers {
        let (lag, ids) = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("every listener gets the burst")
            .expect("reader");
        worst = worst.max(lag);
        sequences.push(ids);
    }
    assert!(
        sequences.iter().all(|ids| ids == &sequences[0]),
        "same events, same order"
    );
    assert!(worst < LATENCY_BOUND, "worst latency {worst:?}");
    eprintln!(
        "slow-consumer test: worst latency of {LISTENERS} listeners over {BURST} events: {worst:?}"
    );

    // Now the stalled client reads: some events, then the slow-consumer close.
    let mut received = 0;
    loop {
        match stalled.next().await {
            Incoming::Frame(f) if f["eventType"] == "poll:created" => received += 1,
            Incoming::Frame(f) if f["eventType"] == "connection:error" => {
                assert_eq!(f["payload"]["code"], "slow_consumer");
                break;
            }
            Incoming::Frame(f) if f["eventType"] == "heartbeat:ping" => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stalled.next().await, Incoming::Close(4500));
    assert!(
        received < BURST,
        "the stalled client was cut off ({received} events)"
    );
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn chrono_millis(value: &serde_json::Value) -> i64 {
    let text = value.as_str().expect("timestamp");
    let at: pollcast_protocol::Timestamp =
        serde_json::from_value(serde_json::json!(text)).expect("RFC 3339");
    at.unix_millis()
}
