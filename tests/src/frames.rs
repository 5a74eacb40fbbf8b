//! What a test reads off a WebSocket: frames up to an event, the positions of
//! their event ids, and checks that a sequence has no gap, repeat or reordering.

use pollcast_protocol::EventId;
use serde_json::Value;
use uuid::Uuid;

use crate::client::Presenter;
use crate::process::Pollcast;
use crate::ws::{Format, Listening, WsClient, query};

/// A presenter listening on `edge`, past `connection:established`.
pub async fn listen(edge: &Pollcast, p: &Presenter, last_event_id: Option<&str>) -> Listening {
    let client = WsClient::connect(
        edge.addr,
        &query(&p.session_id, &p.token, last_event_id, Format::Json),
    )
    .await;
    let mut listening = client.listen();
    let established = listening.envelope().await;
    assert_eq!(
        established["eventType"], "connection:established",
        "{established}"
    );
    listening
}

/// Envelopes until (and including) the first of `event_type`.
pub async fn until(client: &mut Listening, event_type: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = client.envelope().await;
        let done = frame["eventType"] == event_type;
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

/// Stream positions of domain events (connection frames have no id).
pub fn positions(session: &str, frames: &[Value]) -> Vec<u64> {
    let session: Uuid = session.parse().expect("uuid");
    frames
        .iter()
        .filter_map(|f| f["eventId"].as_str())
        .map(|id| {
            id.parse::<EventId>()
                .expect("event id")
                .position_in(session)
                .expect("an id of this session")
        })
        .collect()
}

/// Asserts that positions run without a gap or a repeat.
#[track_caller]
pub fn assert_consecutive(positions: &[u64]) {
    assert!(!positions.is_empty());
    let expected: Vec<u64> = (positions[0]..positions[0] + positions.len() as u64).collect();
    assert_eq!(positions, expected.as_slice(), "gap, repeat or reordering");
}

/// How many of `frames` are of `event_type`.
pub fn count(frames: &[Value], event_type: &str) -> usize {
    frames
        .iter()
        .filter(|f| f["eventType"] == event_type)
        .count()
}

/// Asserts that two clients of one session, which may have joined at different
/// points (an edge whose region is behind announces an older newest event), each
/// got an unbroken run, and that from the later start on they got the same
/// frames: same ids, same order, same content.
#[track_caller]
pub fn assert_same_run(session: &str, a: &[Value], b: &[Value]) {
    let (pa, pb) = (positions(session, a), positions(session, b));
    assert_consecutive(&pa);
    assert_consecutive(&pb);
    let skip_a = usize::try_from(pb[0].saturating_sub(pa[0])).expect("small");
    let skip_b = usize::try_from(pa[0].saturating_sub(pb[0])).expect("small");
    assert_eq!(
        &pa[skip_a..],
        &pb[skip_b..],
        "the same positions from the later start"
    );
    assert!(a[skip_a..] == b[skip_b..], "same ids but different frames");
}
