//! The authorisation matrix: no token, forged or expired token, wrong role, and a
//! token of session A on session B's resources.

use pollcast_domain::{Claims, TokenKeys};
use pollcast_protocol::Role;
use pollcast_tests::client::{id_of, option_id};
use pollcast_tests::server::SECRET;
use pollcast_tests::{Backend, Reply, TestServer};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

/// Every endpoint that needs a token, as (method, path, body).
fn protected(session: &str, poll: &str, option: &str) -> Vec<(Method, String, serde_json::Value)> {
    let none = json!({});
    vec![
        (
            Method::GET,
            format!("/api/sessions/{session}"),
            none.clone(),
        ),
        (
            Method::POST,
            format!("/api/sessions/{session}/start"),
            none.clone(),
        ),
        (
            Method::POST,
            format!("/api/sessions/{session}/end"),
            none.clone(),
        ),
        (
            Method::GET,
            format!("/api/sessions/{session}/participants"),
            none.clone(),
        ),
        (
            Method::POST,
            format!("/api/sessions/{session}/polls"),
            json!({ "question": "Q?", "options": ["A", "B"] }),
        ),
        (
            Method::GET,
            format!("/api/sessions/{session}/polls"),
            none.clone(),
        ),
        (Method::GET, format!("/api/polls/{poll}"), none.clone()),
        (
            Method::POST,
            format!("/api/polls/{poll}/activate"),
            none.clone(),
        ),
        (
            Method::POST,
            format!("/api/polls/{poll}/close"),
            none.clone(),
        ),
        (
            Method::POST,
            format!("/api/polls/{poll}/votes"),
            json!({ "optionIds": [option] }),
        ),
        (Method::GET, format!("/api/polls/{poll}/results"), none),
    ]
}

async fn call(
    t: &TestServer,
    method: &Method,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> Reply {
    t.api
        .send(method.clone(), path, token, Some(body.clone()), &[])
        .await
}

async fn missing_forged_or_expired_token_is_unauthorized(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let session = p.session_id.parse().expect("uuid");
    let forged = TokenKeys::new(b"some other secret", Duration::from_secs(60)).issue(
        session,
        Role::Presenter,
        None,
    );
    let expired = TokenKeys::new(SECRET, Duration::from_secs(60)).sign(&Claims {
        session_id: session,
        role: Role::Presenter,
        participant_id: None,
        expires_at: 1,
    });
    let tampered = format!("{}x", p.token);
    for (method, path, body) in protected(&p.session_id, &id_of(&poll), &option_id(&poll, 0)) {
        for token in [
            None,
            Some("garbage"),
            Some(forged.as_str()),
            Some(expired.as_str()),
            Some(tampered.as_str()),
        ] {
            let reply = call(&t, &method, &path, token, &body).await;
            assert_eq!(
                (reply.status, reply.code()),
                (401, "unauthorized"),
                "{method} {path} with {token:?}: {}",
                reply.body
            );
        }
    }
    let basic = t
        .api
        .send(
            Method::GET,
            &format!("/api/sessions/{}", p.session_id),
            None,
            None,
            &[("Authorization", "Basic abc")],
        )
        .await;
    basic.expect_error(401, "unauthorized");
    // Nothing changed: still started, the poll still active.
    let now = t
        .api
        .get(&format!("/api/sessions/{}", p.session_id), Some(&p.token))
        .await
        .expect(200);
    assert_eq!(now["status"], "started");
    assert_eq!(now["activePollId"], id_of(&poll).as_str());
}

async fn participant_token_on_presenter_endpoints_is_forbidden(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let draft = t
        .api
        .create_poll(&p, json!({ "question": "Q?", "options": ["A", "B"] }))
        .await;
    let presenter_only = [
        format!("/api/sessions/{}/start", p.session_id),
        format!("/api/sessions/{}/end", p.session_id),
        format!("/api/polls/{}/activate", id_of(&draft)),
        format!("/api/polls/{}/close", id_of(&poll)),
    ];
    for path in presenter_only {
        t.api
            .act(&path, Some(&j.token))
            .await
            .expect_error(403, "forbidden");
    }
    t.api
        .get(
            &format!("/api/sessions/{}/participants", p.session_id),
            Some(&j.token),
        )
        .await
        .expect_error(403, "forbidden");
    t.api
        .post(
            &format!("/api/sessions/{}/polls", p.session_id),
            Some(&j.token),
            json!({ "question": "Q?", "options": ["A", "B"] }),
        )
        .await
        .expect_error(403, "forbidden");
    let now = t
        .api
        .get(&format!("/api/polls/{}", id_of(&poll)), Some(&p.token))
        .await
        .expect(200);
    assert_eq!(now["status"], "active", "refused requests changed nothing");
}

async fn token_of_another_session_is_forbidden(backend: Backend) {
    let t = TestServer::start(backend).await;
    let a = t.api.started_session().await;
    let a_participant = t.api.join(&a.code, "Ada").await;
    let b = t.api.started_session().await;
    let b_poll = t.api.active_poll(&b).await;
    for token in [&a.token, &a_participant.token] {
        for (method, path, body) in
            protected(&b.session_id, &id_of(&b_poll), &option_id(&b_poll, 0))
        {
            let reply = call(&t, &method, &path, Some(token), &body).await;
            assert_eq!(
                (reply.status, reply.code()),
                (403, "forbidden"),
                "{method} {path}: {}",
                reply.body
            );
        }
    }
    let results = t
        .api
        .get(
            &format!("/api/polls/{}/results", id_of(&b_poll)),
            Some(&b.token),
        )
        .await
        .expect(200);
    assert_eq!(results["totalVotes"], 0);
    let b_now = t
        .api
        .get(&format!("/api/sessions/{}", b.session_id), Some(&b.token))
        .await
        .expect(200);
    assert_eq!(b_now["status"], "started");
}

pollcast_tests::on_both_backends!(
    missing_forged_or_expired_token_is_unauthorized,
    participant_token_on_presenter_endpoints_is_forbidden,
    token_of_another_session_is_forbidden,
);
