//! Results stay exact and the one-vote rule holds when requests race.

use futures::future::join_all;
use pollcast_tests::client::{id_of, option_id, vote_counts};
use pollcast_tests::{Backend, TestServer};
use serde_json::json;

async fn two_hundred_participants_voting_at_once_are_counted_exactly(backend: Backend) {
    let _exclusive = pollcast_tests::exclusive().await;
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    let voters = join_all((0..200).map(|i| {
        let (api, code) = (t.api.clone(), p.code.clone());
        async move { api.join(&code, &format!("voter {i}")).await }
    }))
    .await;
    let options: Vec<String> = (0..3).map(|i| option_id(&poll, i)).collect();
    let replies = join_all(voters.iter().enumerate().map(|(i, v)| {
        let (api, poll_id, option) = (t.api.clone(), poll_id.clone(), options[i % 3].clone());
        let token = v.token.clone();
        async move { api.vote(&poll_id, &token, &[&option]).await }
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let results = t.api.results(&poll_id, &p.token).await;
    assert_eq!(results["totalVotes"], 200);
    assert_eq!(vote_counts(&results), vec![67, 67, 66]);
}

async fn same_participant_racing_twenty_votes_gets_exactly_one_accepted(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    let option = option_id(&poll, 0);
    let options = [option.as_str()];
    let replies = join_all((0..20).map(|_| t.api.vote(&poll_id, &j.token, &options))).await;
    let accepted = replies.iter().filter(|r| r.status == 201).count();
    assert_eq!(accepted, 1, "{replies:?}");
    for reply in replies.iter().filter(|r| r.status != 201) {
        reply.expect_error(409, "already_voted");
    }
    let results = t.api.results(&poll_id, &p.token).await;
    assert_eq!(results["totalVotes"], 1);
}

async fn racing_requests_with_one_idempotency_key_all_get_the_one_vote(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    let path = format!("/api/polls/{poll_id}/votes");
    let body = json!({ "optionIds": [option_id(&poll, 1)] });
    let replies = join_all((0..20).map(|_| {
        t.api.send(
            reqwest::Method::POST,
            &path,
            Some(&j.token),
            Some(body.clone()),
            &[("Idempotency-Key", "storm")],
        )
    }))
    .await;
    let first = replies[0].clone().expect(201);
    for reply in replies {
        assert_eq!(
            reply.expect(201),
            first,
            "every retry gets the first answer"
        );
    }
    let results = t.api.results(&poll_id, &p.token).await;
    assert_eq!(results["totalVotes"], 1);
}

pollcast_tests::on_both_backends!(
    two_hundred_participants_voting_at_once_are_counted_exactly,
    same_participant_racing_twenty_votes_gets_exactly_one_accepted,
    racing_requests_with_one_idempotency_key_all_get_the_one_vote,
);
