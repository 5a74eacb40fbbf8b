//! The behaviour every [`EventStream`] engine must have, as a reusable test suite.
//!
//! An engine's tests instantiate it with [`crate::stream_conformance_tests!`], giving
//! a factory that builds a fresh, empty engine with the requested retention. Each
//! check uses fresh session ids, so one engine instance may also be shared.

use std::sync::Arc;
use std::time::Duration;

use pollcast_protocol::{DomainEvent, PresenceKind, PresenceSignal, SessionEvent, Timestamp};
use uuid::Uuid;

use crate::{EventStream, Published, Retention, StreamError};

/// Generates one `#[tokio::test]` per conformance check for the engine built by
/// `$factory`, a closure `|retention: Retention| async { Arc<impl EventStream> }`.
#[macro_export]
macro_rules! stream_conformance_tests {
    ($factory:expr) => {
        $crate::stream_conformance_tests!(@tests $factory;
            publishes_and_reads_back_in_order,
            repeated_position_is_a_duplicate_and_changes_nothing,
            gap_in_positions_is_refused,
            position_zero_is_refused,
            newest_tracks_the_last_appended_position,
            read_after_honours_position_and_limit,
            sessions_are_independent,
            first_event_of_unknown_session_may_start_anywhere,
            subscribers_see_live_events_in_order,
            trimmed_history_is_reported_as_truncated,
            position_beyond_newest_is_reported_as_truncated,
            presence_signals_reach_subscribers_in_order,
            a_run_is_appended_in_order_and_seen_live,
            a_run_takes_what_is_new_and_keeps_what_was_there,
            a_run_past_the_next_position_is_refused_whole,
            a_run_longer_than_a_batch_is_taken_whole,
        );
    };
    (@tests $factory:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let factory = $factory;
                $crate::conformance::$name(&factory).await;
            }
        )+
    };
}

/// A deadline for anything a check awaits, so a broken engine fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);

/// A sample event at `position` of `session`, with content that differs per call
/// (engines' own tests and benchmarks use it too).
pub fn event(session: Uuid, position: u64) -> SessionEvent {
    SessionEvent {
        session_id: session,
        position,
        timestamp: Timestamp::now(),
        event: DomainEvent::ParticipantDisconnected {
            participant_id: Uuid::now_v7(),
            display_name: format!("p{position}"),
        },
    }
}

async fn build<F, Fut, S>(factory: &F, retention: Retention) -> Arc<S>
where
    F: Fn(Retention) -> Fut,
    Fut: std::future::Future<Output = Arc<S>>,
    S: EventStream,
{
    factory(retention).await
}

async fn publish_range<S: EventStream>(
    stream: &S,
    session: Uuid,
    positions: std::ops::RangeInclusive<u64>,
) {
    for p in positions {
        let outcome = stream.publish(event(session, p)).await;
        assert!(
            matches!(outcome, Ok(Published::Appended)),
            "position {p}: {outcome:?}"
        );
    }
}

fn positions(events: &[Arc<SessionEvent>]) -> Vec<u64> {
    events.iter().map(|e| e.position).collect()
}

macro_rules! check {
    ($(#[$doc:meta])* $name:ident, |$stream:ident| $body:block) => {
        $(#[$doc])*
        pub async fn $name<F, Fut, S>(factory: &F)
        where
            F: Fn(Retention) -> Fut,
            Fut: std::future::Future<Output = Arc<S>>,
            S: EventStream,
        {
            let $stream = build(factory, Retention::default()).await;
            $body
        }
    };
}

check!(
    /// Events come back in position order with their content intact.
    publishes_and_reads_back_in_order, |stream| {
    let session = Uuid::now_v7();
    let sent: Vec<SessionEvent> = (1..=5).map(|p| event(session, p)).collect();
    for e in &sent {
        assert_eq!(stream.publish(e.clone()).await.ok(), Some(Published::Appended));
    }
    let read = stream.read_after(session, 0, 100).await.expect("read");
    assert!(!read.truncated);
    let got: Vec<SessionEvent> = read.events.iter().map(|e| (**e).clone()).collect();
    assert_eq!(got, sent);
});

check!(
    /// Publishing a position twice is a no-op the publisher can tell apart.
    repeated_position_is_a_duplicate_and_changes_nothing, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=3).await;
    let replay = event(session, 2);
    assert_eq!(stream.publish(replay).await.ok(), Some(Published::Duplicate));
    let read = stream.read_after(session, 0, 100).await.expect("read");
    assert_eq!(positions(&read.events), vec![1, 2, 3]);
    assert_ne!(read.events[1].event, event(session, 2).event, "original kept");
});

check!(
    /// A position past the next one is refused with the position expected.
    gap_in_positions_is_refused, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=2).await;
    match stream.publish(event(session, 4)).await {
        Err(StreamError::OutOfOrder { expected, got, .. }) => {
            assert_eq!((expected, got), (3, 4));
        }
        other => panic!("gap accepted: {other:?}"),
    }
    assert_eq!(stream.newest(session).await.expect("newest"), Some(2));
});

check!(
    /// Positions start at 1.
    position_zero_is_refused, |stream| {
    let session = Uuid::now_v7();
    assert!(matches!(
        stream.publish(event(session, 0)).await,
        Err(StreamError::InvalidPosition)
    ));
    assert_eq!(stream.newest(session).await.expect("newest"), None);
});

check!(
    /// `newest` is `None` before the first event, then the last position appended.
    newest_tracks_the_last_appended_position, |stream| {
    let session = Uuid::now_v7();
    assert_eq!(stream.newest(session).await.expect("newest"), None);
    publish_range(&*stream, session, 1..=7).await;
    assert_eq!(stream.newest(session).await.expect("newest"), Some(7));
});

check!(
    /// Reads start strictly after the position given and return at most `limit`.
    read_after_honours_position_and_limit, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=10).await;
    let read = stream.read_after(session, 4, 3).await.expect("read");
    assert_eq!(positions(&read.events), vec![5, 6, 7]);
    assert!(!read.truncated);
    let tail = stream.read_after(session, 10, 3).await.expect("read");
    assert!(tail.events.is_empty());
    assert!(!tail.truncated, "caught up is not truncated");
});

check!(
    /// One session's positions do not affect another's.
    sessions_are_independent, |stream| {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    publish_range(&*stream, a, 1..=3).await;
    publish_range(&*stream, b, 1..=2).await;
    assert_eq!(stream.newest(a).await.expect("newest"), Some(3));
    assert_eq!(stream.newest(b).await.expect("newest"), Some(2));
    let read = stream.read_after(b, 0, 100).await.expect("read");
    assert!(read.events.iter().all(|e| e.session_id == b));
});

check!(
    /// A session's log may begin at any position (history before it lives elsewhere
    /// or is gone), and continues consecutively from there.
    first_event_of_unknown_session_may_start_anywhere, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 57..=58).await;
    let read = stream.read_after(session, 56, 10).await.expect("read");
    assert_eq!(positions(&read.events), vec![57, 58]);
    assert!(!read.truncated);
    assert!(stream.read_after(session, 10, 10).await.expect("read").truncated);
});

check!(
    /// A subscriber receives every event published after it subscribed, in order.
    subscribers_see_live_events_in_order, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=2).await;
    let mut live = stream.subscribe(session).await.expect("subscribe");
    publish_range(&*stream, session, 3..=6).await;
    publish_range(&*stream, Uuid::now_v7(), 1..=1).await;
    let mut seen = Vec::new();
    for _ in 3..=6 {
        let next = tokio::time::timeout(WAIT, live.next()).await;
        let event = next.expect("live event in time").expect("live event");
        assert_eq!(event.session_id, session);
        seen.push(event.position);
    }
    assert_eq!(seen, vec![3, 4, 5, 6]);
});

fn run(session: Uuid, positions: std::ops::RangeInclusive<u64>) -> Vec<SessionEvent> {
    positions.map(|p| event(session, p)).collect()
}

check!(
    /// A run is appended at its positions, reads back intact and reaches live
    /// subscribers in order.
    a_run_is_appended_in_order_and_seen_live, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=2).await;
    let mut live = stream.subscribe(session).await.expect("subscribe");
    let sent = run(session, 3..=10);
    let published = stream.publish_run(sent.clone()).await;
    assert!(published.stopped.is_none(), "{:?}", published.stopped);
    assert_eq!(published.taken, 8);
    let read = stream.read_after(session, 2, 100).await.expect("read");
    let got: Vec<SessionEvent> = read.events.iter().map(|e| (**e).clone()).collect();
    assert_eq!(got, sent);
    let mut seen = Vec::new();
    while seen.len() < sent.len() {
        let next = tokio::time::timeout(WAIT, live.next()).await;
        seen.push(next.expect("live event in time").expect("live event").position);
    }
    assert_eq!(seen, (3..=10).collect::<Vec<_>>());
    assert_eq!(stream.newest(session).await.expect("newest"), Some(10));
});

check!(
    /// A run that starts with positions already in the log (a relay sending again
    /// what it sent before) counts them as taken, leaves them as they were and
    /// appends the rest.
    a_run_takes_what_is_new_and_keeps_what_was_there, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=5).await;
    let before = stream.read_after(session, 0, 100).await.expect("read");
    let published = stream.publish_run(run(session, 3..=8)).await;
    assert!(published.stopped.is_none(), "{:?}", published.stopped);
    assert_eq!(published.taken, 6);
    let after = stream.read_after(session, 0, 100).await.expect("read");
    assert_eq!(positions(&after.events), (1..=8).collect::<Vec<_>>());
    assert_eq!(after.events[..5], before.events[..], "originals kept");
    let again = stream.publish_run(run(session, 2..=4)).await;
    assert_eq!((again.taken, again.stopped.is_none()), (3, true));
    assert_eq!(stream.newest(session).await.expect("newest"), Some(8));
});

check!(
    /// A run that would leave a gap is refused before anything of it is stored,
    /// with the position expected.
    a_run_past_the_next_position_is_refused_whole, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=2).await;
    let published = stream.publish_run(run(session, 4..=6)).await;
    assert_eq!(published.taken, 0);
    match published.stopped {
        Some(StreamError::OutOfOrder { expected, got, .. }) => assert_eq!((expected, got), (3, 4)),
        other => panic!("gap accepted: {other:?}"),
    }
    assert_eq!(stream.newest(session).await.expect("newest"), Some(2));
});

check!(
    /// A run longer than an engine sends at once is taken whole and in order.
    a_run_longer_than_a_batch_is_taken_whole, |stream| {
    let session = Uuid::now_v7();
    let sent = run(session, 1..=700);
    let published = stream.publish_run(sent.clone()).await;
    assert!(published.stopped.is_none(), "{:?}", published.stopped);
    assert_eq!(published.taken, 700);
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let read = stream.read_after(session, got.len() as u64, 1000).await.expect("read");
        assert!(!read.events.is_empty(), "read stopped at {}", got.len());
        got.extend(read.events.iter().map(|e| (**e).clone()));
    }
    assert_eq!(got, sent);
});

/// Once retention drops events, a read from before them says so.
pub async fn trimmed_history_is_reported_as_truncated<F, Fut, S>(factory: &F)
where
    F: Fn(Retention) -> Fut,
    Fut: std::future::Future<Output = Arc<S>>,
    S: EventStream,
{
    let retention = Retention {
        max_events: 3,
        ..Retention::default()
    };
    let stream = build(factory, retention).await;
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=6).await;
    let old = stream.read_after(session, 1, 100).await.expect("read");
    assert!(old.truncated, "positions 2 and 3 are gone");
    assert_eq!(positions(&old.events), vec![4, 5, 6]);
    let kept = stream.read_after(session, 3, 100).await.expect("read");
    assert!(!kept.truncated);
    assert_eq!(positions(&kept.events), vec![4, 5, 6]);
    // Dropped positions are still recognised as repeats.
    assert_eq!(
        stream.publish(event(session, 2)).await.ok(),
        Some(Published::Duplicate)
    );
}

check!(
    /// A position the log never reached (a client from a previous incarnation) cannot
    /// be resumed from.
    position_beyond_newest_is_reported_as_truncated, |stream| {
    let session = Uuid::now_v7();
    publish_range(&*stream, session, 1..=2).await;
    assert!(stream.read_after(session, 9, 10).await.expect("read").truncated);
    assert!(stream.read_after(Uuid::now_v7(), 9, 10).await.expect("read").truncated);
});

check!(
    /// Presence signals reported by edges reach every presence subscriber, in the
    /// order they were reported.
    presence_signals_reach_subscribers_in_order, |stream| {
    let mut feed = stream.presence().await.expect("presence feed");
    let session = Uuid::now_v7();
    let sent: Vec<PresenceSignal> = [PresenceKind::Connected, PresenceKind::Seen, PresenceKind::Disconnected]
        .into_iter()
        .map(|kind| PresenceSignal {
            session_id: session,
            participant_id: Uuid::now_v7(),
            connection_id: Uuid::now_v7(),
            kind,
            at: Timestamp::now(),
        })
        .collect();
    for signal in &sent {
        stream.report_presence(*signal).await.expect("report");
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        // A batch of at most 2: the three signals cannot all come in one.
        let next = tokio::time::timeout(WAIT, feed.next_batch(2)).await.expect("signal in time");
        let batch = next.expect("signals");
        assert!((1..=2).contains(&batch.len()), "batch of {}", batch.len());
        // A shared engine may carry other checks' signals too.
        got.extend(batch.into_iter().filter(|signal| signal.session_id == session));
    }
    assert_eq!(got, sent);
});
