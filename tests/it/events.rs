//! The events a change causes: which, in what order, with what payload, to whom.

use pollcast_protocol::{Audience, DomainEvent, SessionEvent};
use pollcast_tests::client::{id_of, option_id};
use pollcast_tests::{Backend, TestServer};
use std::sync::Arc;
use uuid::Uuid;

fn types(events: &[Arc<SessionEvent>]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.event_type()).collect()
}

async fn a_session_s_life_produces_its_events_in_commit_order(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    t.api
        .vote(&poll_id, &j.token, &[&option_id(&poll, 0)])
        .await
        .expect(201);
    let session: Uuid = p.session_id.parse().expect("uuid");
    // The coalesced update first, so the rest of the order is fixed.
    t.events_through(session, 6, "results:updated").await;
    t.api
        .act(
            &format!("/api/sessions/{}/end", p.session_id),
            Some(&p.token),
        )
        .await
        .expect(200);
    let events = t.events_through(session, 7, "session:ended").await;
    assert_eq!(
        types(&events),
        vec![
            "session:created",
            "session:started",
            "participant:joined",
            "poll:created",
            "poll:activated",
            "vote:accepted",
            "results:updated",
            "results:updated",
            "poll:closed",
            "session:ended",
        ]
    );
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=10).collect::<Vec<_>>(), "no gap, no repeat");
    let ids: Vec<String> = events.iter().map(|e| e.event_id().to_string()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "later events have later ids"
    );
    assert!(events.iter().all(|e| e.session_id == session));
    match &events[8].event {
        DomainEvent::PollClosed { poll, results } => {
            assert_eq!(poll.id.to_string(), poll_id);
            assert!(results.is_final);
            assert_eq!(results.total_votes, 1);
        }
        other => panic!("expected poll:closed, got {other:?}"),
    }
    match &events[9].event {
        DomainEvent::SessionEnded { session } => assert!(session.ended_at.is_some()),
        other => panic!("expected session:ended, got {other:?}"),
    }
}

async fn presence_and_votes_go_only_to_those_the_contract_names(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    t.api
        .vote(&id_of(&poll), &j.token, &[&option_id(&poll, 1)])
        .await
        .expect(201);
    let session: Uuid = p.session_id.parse().expect("uuid");
    let ada: Uuid = j.id.parse().expect("uuid");
    let events = t.events(session, 6).await;
    let joined = events
        .iter()
        .find(|e| e.event.event_type() == "participant:joined")
        .expect("joined");
    assert_eq!(joined.event.audience(), Audience::Presenters);
    let accepted = events
        .iter()
        .find(|e| e.event.event_type() == "vote:accepted")
        .expect("accepted");
    assert_eq!(
        accepted.event.audience(),
        Audience::ParticipantAndPresenters(ada)
    );
    assert!(accepted.event.audience().includes(false, Some(ada)));
    assert!(
        !accepted
            .event
            .audience()
            .includes(false, Some(Uuid::now_v7()))
    );
    let activated = events
        .iter()
        .find(|e| e.event.event_type() == "poll:activated")
        .expect("activated");
    assert_eq!(activated.event.audience(), Audience::Room);
}

async fn results_updated_follows_every_vote_within_its_interval(backend: Backend) {
    let _exclusive = pollcast_tests::exclusive().await;
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    let session: Uuid = p.session_id.parse().expect("uuid");
    let mut voters = Vec::new();
    for i in 0..10 {
        voters.push(t.api.join(&p.code, &format!("voter {i}")).await);
    }
    for v in &voters {
        t.api
            .vote(&poll_id, &v.token, &[&option_id(&poll, 0)])
            .await
            .expect(201);
    }
    // 5 setup events, 10 joins, 10 accepted votes, then at least one update.
    let newest_vote = 5 + 10 + 10;
    t.stream_reaches(session, newest_vote as u64).await;
    let events = loop {
        let events = t.events(session, newest_vote as u64).await;
        let covered = events.iter().rev().find_map(|e| match &e.event {
            DomainEvent::ResultsUpdated { results } if results.total_votes == 10 => Some(()),
            _ => None,
        });
        if covered.is_some() {
            break events;
        }
        let next = events.len() as u64 + 1;
        t.stream_reaches(session, next).await;
    };
    let updates = events
        .iter()
        .filter(|e| e.event.event_type() == "results:updated")
        .count();
    assert!(
        updates < 10,
        "{updates} updates for 10 votes: not coalesced"
    );
    // Every accepted vote is covered by a results:updated within its interval
    // (50 ms). The bound is loose on purpose: it fails when results wait for
    // anything slower than the interval (the 5 s audit, a stalled task), while
    // the cores the tests share can hold one tick back by 100 ms and more (seen:
    // 154 ms). The 100 ms promise itself is measured by the benchmarks and by
    // `pollcast_results_lag_seconds`, not by a timed test.
    for (i, vote) in events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event.event_type() == "vote:accepted")
    {
        let cover = events[i..]
            .iter()
            .find(|e| e.event.event_type() == "results:updated")
            .expect("a results:updated after every vote");
        let lag = cover.timestamp.unix_millis() - vote.timestamp.unix_millis();
        assert!(lag <= 1000, "results lagged a vote by {lag} ms");
    }
}

async fn last_results_before_poll_closed_equal_the_final_results(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    for i in 0..5 {
        let v = t.api.join(&p.code, &format!("voter {i}")).await;
        t.api
            .vote(&poll_id, &v.token, &[&option_id(&poll, i % 3)])
            .await
            .expect(201);
    }
    // Close at once: the coalesced update is still pending.
    t.api
        .act(&format!("/api/polls/{poll_id}/close"), Some(&p.token))
        .await
        .expect(200);
    let session: Uuid = p.session_id.parse().expect("uuid");
    let events = t.events_through(session, 0, "poll:closed").await;
    let closed_at = events
        .iter()
        .position(|e| e.event.event_type() == "poll:closed")
        .expect("closed");
    let DomainEvent::PollClosed {
        results: final_results,
        ..
    } = &events[closed_at].event
    else {
        unreachable!()
    };
    let last_update = events[..closed_at]
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            DomainEvent::ResultsUpdated { results } => Some(results),
            _ => None,
        })
        .expect("a results:updated before poll:closed");
    assert_eq!(last_update, final_results);
    assert_eq!(final_results.total_votes, 5);
}

async fn activating_a_poll_emits_closed_for_the_previous_then_activated(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let first = t.api.active_poll(&p).await;
    let second = t.api.active_poll(&p).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    // created, started, created, activated, created, updated, closed, activated
    let events = t.events(session, 8).await;
    let tail: Vec<(&str, String)> = events[5..]
        .iter()
        .map(|e| {
            let poll = match &e.event {
                DomainEvent::ResultsUpdated { results } => results.poll_id,
                DomainEvent::PollClosed { poll, .. } | DomainEvent::PollActivated { poll } => {
                    poll.id
                }
                other => panic!("unexpected {other:?}"),
            };
            (e.event.event_type(), poll.to_string())
        })
        .collect();
    assert_eq!(
        tail,
        vec![
            ("results:updated", id_of(&first)),
            ("poll:closed", id_of(&first)),
            ("poll:activated", id_of(&second)),
        ]
    );
}

pollcast_tests::on_both_backends!(
    a_session_s_life_produces_its_events_in_commit_order,
    presence_and_votes_go_only_to_those_the_contract_names,
    results_updated_follows_every_vote_within_its_interval,
    last_results_before_poll_closed_equal_the_final_results,
    activating_a_poll_emits_closed_for_the_previous_then_activated,
);
