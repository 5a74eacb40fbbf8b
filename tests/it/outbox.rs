//! Invariant 2: a committed change reaches the stream exactly once, even when the
//! stream is down at commit time or the server restarts with events pending.

use std::sync::Arc;

use pollcast_protocol::SessionEvent;
use pollcast_stream::{EmbeddedStream, EventStream};
use pollcast_tests::client::Presenter;
use pollcast_tests::server::Options;
use pollcast_tests::stream::SwitchableStream;
use pollcast_tests::{Backend, TestServer};
use uuid::Uuid;

/// Makes a session with a few events while the stream is down; returns the
/// presenter, the session and how many events it committed.
async fn changes_while_stream_is_down(t: &TestServer) -> (Presenter, Uuid, u64) {
    let p = t.api.started_session().await;
    t.api.join(&p.code, "Ada").await;
    t.api.join(&p.code, "Bob").await;
    t.api.active_poll(&p).await;
    let session = p.session_id.parse().expect("uuid");
    // created, started, joined ×2, poll created, poll activated
    (p, session, 6)
}

fn assert_exactly_once(events: &[Arc<SessionEvent>], count: u64) {
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (1..=count).collect::<Vec<_>>(),
        "each event once, in order"
    );
    let types: Vec<&str> = events.iter().map(|e| e.event.event_type()).collect();
    assert_eq!(
        types,
        vec![
            "session:created",
            "session:started",
            "participant:joined",
            "participant:joined",
            "poll:created",
            "poll:activated",
        ]
    );
}

async fn events_committed_while_the_stream_is_down_arrive_once_it_is_back(backend: Backend) {
    let stream = SwitchableStream::down();
    let options = Options {
        stream: stream.clone(),
        ..Options::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let (_, session, count) = changes_while_stream_is_down(&t).await;
    assert_eq!(
        stream.newest(session).await.expect("newest"),
        None,
        "nothing got through"
    );
    stream.set_up(true);
    let events = t.events(session, count).await;
    assert_exactly_once(&events, count);
}

async fn events_pending_at_a_restart_are_published_exactly_once_after_it(backend: Backend) {
    let down = SwitchableStream::down();
    let t = TestServer::start_with(
        backend,
        Options {
            stream: down.clone(),
            ..Options::default()
        },
    )
    .await;
    let (p, session, count) = changes_while_stream_is_down(&t).await;
    let fresh: Arc<EmbeddedStream> = Arc::new(EmbeddedStream::default());
    let t = t
        .restart(Options {
            stream: fresh.clone(),
            ..Options::default()
        })
        .await;
    let events = t.events(session, count).await;
    assert_exactly_once(&events, count);
    // Tokens survive the restart, and new changes continue the same order.
    t.api
        .create_poll(
            &p,
            serde_json::json!({ "question": "After?", "options": ["A", "B"] }),
        )
        .await;
    let events = t.events(session, count + 1).await;
    assert_exactly_once(&events[..count as usize], count);
    assert_eq!(events.len() as u64, count + 1);
    assert_eq!(events[count as usize].event.event_type(), "poll:created");
}

/// Events of several sessions published in one relay pass are all marked as
/// published (one statement marks every session's range), so none is sent again.
async fn a_pass_over_many_sessions_marks_each_published(backend: Backend) {
    use pollcast_store::outbox;
    use pollcast_store::sea_orm::{
        ColumnTrait, Database, EntityTrait, PaginatorTrait, QueryFilter,
    };

    let stream = SwitchableStream::down();
    let options = Options {
        stream: stream.clone(),
        ..Options::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(changes_while_stream_is_down(&t).await);
    }
    let db = Database::connect(&t.database_url).await.expect("connect");
    let pending = || async {
        outbox::Entity::find()
            .filter(outbox::Column::PublishedAt.is_null())
            .count(&db)
            .await
            .expect("count pending")
    };
    assert_eq!(pending().await, 18, "every event waits for the stream");
    stream.set_up(true);
    for (_, session, count) in &sessions {
        assert_exactly_once(&t.events(*session, *count).await, *count);
    }
    // The mark follows the publish; wait for it, bounded.
    let marked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while pending().await > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(marked.is_ok(), "{} events still unmarked", pending().await);
    assert_eq!(stream.duplicates(), 0, "no event was published twice");
}

pollcast_tests::on_both_backends!(
    a_pass_over_many_sessions_marks_each_published,
    events_committed_while_the_stream_is_down_arrive_once_it_is_back,
    events_pending_at_a_restart_are_published_exactly_once_after_it,
);
