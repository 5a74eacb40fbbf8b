//! Polls: drafting with the contract's limits, listing, the state machine.

use pollcast_tests::client::{id_of, option_id};
use pollcast_tests::{Backend, TestServer};
use serde_json::{Value, json};

async fn poll_is_created_as_draft_with_its_options(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let poll = t
        .api
        .create_poll(
            &p,
            json!({ "question": "Best talk?", "options": ["A", {"text": "B"}] }),
        )
        .await;
    assert_eq!(poll["status"], "draft");
    assert_eq!(poll["kind"], "single");
    assert_eq!(poll["maxChoices"], 1);
    assert_eq!(poll["sessionId"], p.session_id.as_str());
    assert_eq!(poll["options"][0]["text"], "A");
    assert_eq!(poll["options"][1]["text"], "B");
    assert_ne!(option_id(&poll, 0), option_id(&poll, 1));
    assert_eq!(poll["activatedAt"], Value::Null);
    assert_eq!(poll["closedAt"], Value::Null);
}

async fn multiple_choice_defaults_max_choices_to_option_count(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let poll = t
        .api
        .create_poll(
            &p,
            json!({ "question": "Which?", "options": ["A", "B", "C"], "kind": "multiple" }),
        )
        .await;
    assert_eq!(poll["maxChoices"], 3);
    let poll = t
        .api
        .create_poll(
            &p,
            json!({ "question": "Which?", "options": ["A", "B", "C"], "kind": "multiple", "maxChoices": 2 }),
        )
        .await;
    assert_eq!(poll["maxChoices"], 2);
}

async fn poll_outside_the_limits_is_validation_failed(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let path = format!("/api/sessions/{}/polls", p.session_id);
    let many: Vec<String> = (0..21).map(|i| format!("option {i}")).collect();
    let bad = [
        json!({ "question": "", "options": ["A", "B"] }),
        json!({ "question": "q".repeat(501), "options": ["A", "B"] }),
        json!({ "question": "Q?", "options": ["A"] }),
        json!({ "question": "Q?", "options": many }),
        json!({ "question": "Q?", "options": ["A", ""] }),
        json!({ "question": "Q?", "options": ["A", "o".repeat(201)] }),
        json!({ "question": "Q?", "options": ["A", "B"], "maxChoices": 2 }),
        json!({ "question": "Q?", "options": ["A", "B"], "kind": "multiple", "maxChoices": 0 }),
        json!({ "question": "Q?", "options": ["A", "B"], "kind": "multiple", "maxChoices": 3 }),
    ];
    for body in bad {
        t.api
            .post(&path, Some(&p.token), body.clone())
            .await
            .expect_error(422, "validation_failed");
    }
    let list = t.api.get(&path, Some(&p.token)).await.expect(200);
    assert_eq!(list, json!([]), "refused polls change nothing");
}

async fn unknown_poll_kind_is_invalid_body(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let path = format!("/api/sessions/{}/polls", p.session_id);
    t.api
        .post(
            &path,
            Some(&p.token),
            json!({ "question": "Q?", "options": ["A", "B"], "kind": "ranked" }),
        )
        .await
        .expect_error(400, "invalid_body");
}

async fn poll_cannot_be_created_in_an_ended_session(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    t.api
        .act(
            &format!("/api/sessions/{}/end", p.session_id),
            Some(&p.token),
        )
        .await
        .expect(200);
    t.api
        .post(
            &format!("/api/sessions/{}/polls", p.session_id),
            Some(&p.token),
            json!({ "question": "Q?", "options": ["A", "B"] }),
        )
        .await
        .expect_error(409, "session_ended");
}

async fn polls_are_listed_in_creation_order_to_any_token(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let j = t.api.join(&p.code, "Ada").await;
    let mut created = Vec::new();
    for i in 0..5 {
        let poll = t
            .api
            .create_poll(
                &p,
                json!({ "question": format!("Q{i}?"), "options": ["A", "B"] }),
            )
            .await;
        created.push(id_of(&poll));
    }
    let path = format!("/api/sessions/{}/polls", p.session_id);
    for token in [&p.token, &j.token] {
        let list = t.api.get(&path, Some(token)).await.expect(200);
        let ids: Vec<String> = list.as_array().expect("array").iter().map(id_of).collect();
        assert_eq!(ids, created);
    }
    let one = t
        .api
        .get(&format!("/api/polls/{}", created[2]), Some(&j.token))
        .await
        .expect(200);
    assert_eq!(one["question"], "Q2?");
}

async fn activation_needs_a_started_session(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let poll = t
        .api
        .create_poll(&p, json!({ "question": "Q?", "options": ["A", "B"] }))
        .await;
    t.api
        .act(
            &format!("/api/polls/{}/activate", id_of(&poll)),
            Some(&p.token),
        )
        .await
        .expect_error(409, "session_not_started");
}

async fn only_a_draft_poll_can_be_activated_and_only_an_active_one_closed(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t
        .api
        .create_poll(&p, json!({ "question": "Q?", "options": ["A", "B"] }))
        .await;
    let id = id_of(&poll);
    let activate = format!("/api/polls/{id}/activate");
    let close = format!("/api/polls/{id}/close");
    t.api
        .act(&close, Some(&p.token))
        .await
        .expect_error(409, "invalid_state");
    let active = t.api.act(&activate, Some(&p.token)).await.expect(200);
    assert_eq!(active["status"], "active");
    assert!(active["activatedAt"].is_string());
    t.api
        .act(&activate, Some(&p.token))
        .await
        .expect_error(409, "invalid_state");
    let closed = t.api.act(&close, Some(&p.token)).await.expect(200);
    assert_eq!(closed["status"], "closed");
    assert!(closed["closedAt"].is_string());
    t.api
        .act(&close, Some(&p.token))
        .await
        .expect_error(409, "invalid_state");
    t.api
        .act(&activate, Some(&p.token))
        .await
        .expect_error(409, "invalid_state");
}

async fn activating_a_poll_closes_the_previous_one(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let first = t.api.active_poll(&p).await;
    let second = t.api.active_poll(&p).await;
    let first_now = t
        .api
        .get(&format!("/api/polls/{}", id_of(&first)), Some(&p.token))
        .await
        .expect(200);
    assert_eq!(first_now["status"], "closed");
    assert_eq!(second["status"], "active");
    let session = t
        .api
        .get(&format!("/api/sessions/{}", p.session_id), Some(&p.token))
        .await
        .expect(200);
    assert_eq!(session["activePollId"], id_of(&second).as_str());
}

async fn unknown_or_malformed_poll_id_is_poll_not_found(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let unknown = uuid::Uuid::now_v7().to_string();
    for id in [unknown.as_str(), "not-a-uuid"] {
        t.api
            .get(&format!("/api/polls/{id}"), Some(&p.token))
            .await
            .expect_error(404, "poll_not_found");
        t.api
            .act(&format!("/api/polls/{id}/activate"), Some(&p.token))
            .await
            .expect_error(404, "poll_not_found");
        t.api
            .act(&format!("/api/polls/{id}/close"), Some(&p.token))
            .await
            .expect_error(404, "poll_not_found");
        t.api
            .get(&format!("/api/polls/{id}/results"), Some(&p.token))
            .await
            .expect_error(404, "poll_not_found");
        t.api
            .vote(id, &j.token, &[&unknown])
            .await
            .expect_error(404, "poll_not_found");
    }
}

/// A session's polls and participants are capped, with a clear 409, and a refusal
/// changes nothing.
async fn polls_and_participants_past_the_session_caps_are_invalid_state(backend: Backend) {
    let options = pollcast_tests::server::Options {
        domain: pollcast_domain::DomainConfig {
            max_polls_per_session: 2,
            max_participants_per_session: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let p = t.api.create_session("Town hall").await;
    let path = format!("/api/sessions/{}/polls", p.session_id);
    let body = json!({ "question": "Q?", "options": ["A", "B"] });
    for _ in 0..2 {
        t.api
            .post(&path, Some(&p.token), body.clone())
            .await
            .expect(201);
    }
    let refused = t.api.post(&path, Some(&p.token), body).await;
    refused.expect_error(409, "invalid_state");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 2 polls"))
    );
    let list = t.api.get(&path, Some(&p.token)).await.expect(200);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    t.api.join(&p.code, "Ada").await;
    t.api.join(&p.code, "Bob").await;
    t.api
        .post(
            "/api/join",
            None,
            json!({ "code": p.code, "displayName": "Cy" }),
        )
        .await
        .expect_error(409, "invalid_state");
    let participants = t.api.participants(&p).await;
    assert_eq!(participants.as_array().map(Vec::len), Some(2));
}

pollcast_tests::on_both_backends!(
    poll_is_created_as_draft_with_its_options,
    multiple_choice_defaults_max_choices_to_option_count,
    poll_outside_the_limits_is_validation_failed,
    polls_and_participants_past_the_session_caps_are_invalid_state,
    unknown_poll_kind_is_invalid_body,
    poll_cannot_be_created_in_an_ended_session,
    polls_are_listed_in_creation_order_to_any_token,
    activation_needs_a_started_session,
    only_a_draft_poll_can_be_activated_and_only_an_active_one_closed,
    activating_a_poll_closes_the_previous_one,
    unknown_or_malformed_poll_id_is_poll_not_found,
);
