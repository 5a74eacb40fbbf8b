//! Sessions and joining: create, read, start, end, join codes, participants.

use pollcast_domain::DomainConfig;
use pollcast_tests::server::Options;
use pollcast_tests::{Backend, TestServer};
use reqwest::Method;
use serde_json::json;

const ALPHABET: &str = "ABCDEFGHJKMNPQRSTUVWXYZ23456789";

async fn create_session_answers_201_with_session_and_presenter_token(backend: Backend) {
    let t = TestServer::start(backend).await;
    let body = t
        .api
        .post("/api/sessions", None, json!({ "title": "Keynote Q&A" }))
        .await
        .expect(201);
    let session = &body["session"];
    assert_eq!(session["title"], "Keynote Q&A");
    assert_eq!(session["status"], "created");
    assert_eq!(session["startedAt"], json!(null));
    assert_eq!(session["endedAt"], json!(null));
    assert_eq!(session["activePollId"], json!(null));
    let code = session["code"].as_str().expect("code");
    assert_eq!(code.len(), 6);
    assert!(code.chars().all(|c| ALPHABET.contains(c)), "{code}");
    let id = session["id"].as_str().expect("id");
    assert_eq!(
        uuid::Uuid::parse_str(id).expect("uuid").get_version_num(),
        7
    );
    assert_eq!(id, id.to_lowercase());
    let created = session["createdAt"].as_str().expect("createdAt");
    assert!(created.ends_with('Z') && created.len() == 24, "{created}");
    assert!(
        body["presenterToken"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
}

async fn session_title_must_be_1_to_200_characters(backend: Backend) {
    let t = TestServer::start(backend).await;
    for title in [String::new(), "   ".into(), "x".repeat(201)] {
        t.api
            .post("/api/sessions", None, json!({ "title": title }))
            .await
            .expect_error(422, "validation_failed");
    }
    t.api
        .post("/api/sessions", None, json!({ "title": "é".repeat(200) }))
        .await
        .expect(201);
}

/// The same 422 on every database: PostgreSQL cannot even store U+0000.
async fn text_with_nul_or_control_characters_is_validation_failed(backend: Backend) {
    let t = TestServer::start(backend).await;
    for title in ["a\u{0}b", "bell\u{7}", "two\nlines", "esc\u{1b}[0m"] {
        t.api
            .post("/api/sessions", None, json!({ "title": title }))
            .await
            .expect_error(422, "validation_failed");
    }
    let p = t.api.create_session("Town hall").await;
    t.api
        .post(
            "/api/join",
            None,
            json!({ "code": p.code, "displayName": "Ada\u{0}" }),
        )
        .await
        .expect_error(422, "validation_failed");
    let path = format!("/api/sessions/{}/polls", p.session_id);
    for body in [
        json!({ "question": "Q\u{0}?", "options": ["A", "B"] }),
        json!({ "question": "Q?", "options": ["A", "B\u{0}"] }),
        json!({ "question": "Q?", "options": ["A", "B\nC"] }),
    ] {
        t.api
            .post(&path, Some(&p.token), body)
            .await
            .expect_error(422, "validation_failed");
    }
    let list = t.api.get(&path, Some(&p.token)).await.expect(200);
    assert_eq!(list, json!([]), "refused polls change nothing");
    // Tabs and newlines are fine in a question.
    let poll = t
        .api
        .create_poll(
            &p,
            json!({ "question": "Line one\n\tline two?", "options": ["A", "B"] }),
        )
        .await;
    assert_eq!(poll["question"], "Line one\n\tline two?");
}

async fn malformed_or_mistyped_body_is_invalid_body(backend: Backend) {
    let t = TestServer::start(backend).await;
    let raw = t
        .api
        .send_raw(Method::POST, "/api/sessions", None, b"{not json".to_vec())
        .await;
    raw.expect_error(400, "invalid_body");
    for body in [json!({ "title": 42 }), json!({}), json!([1, 2])] {
        t.api
            .post("/api/sessions", None, body)
            .await
            .expect_error(400, "invalid_body");
    }
}

async fn body_over_64_kib_is_payload_too_large(backend: Backend) {
    let t = TestServer::start(backend).await;
    let huge = json!({ "title": "x".repeat(70 * 1024) })
        .to_string()
        .into_bytes();
    t.api
        .send_raw(Method::POST, "/api/sessions", None, huge)
        .await
        .expect_error(413, "payload_too_large");
}

async fn admin_key_when_configured_guards_session_creation(backend: Backend) {
    let options = Options {
        domain: DomainConfig {
            admin_key: Some("s3cret-admin".into()),
            ..DomainConfig::default()
        },
        ..Options::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let body = json!({ "title": "Board meeting" });
    t.api
        .post("/api/sessions", None, body.clone())
        .await
        .expect_error(401, "unauthorized");
    t.api
        .post("/api/sessions", Some("wrong"), body.clone())
        .await
        .expect_error(401, "unauthorized");
    t.api
        .post("/api/sessions", Some("s3cret-admin"), body)
        .await
        .expect(201);
}

async fn any_token_of_the_session_reads_it(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let j = t.api.join(&p.code, "Ada").await;
    let path = format!("/api/sessions/{}", p.session_id);
    for token in [&p.token, &j.token] {
        let body = t.api.get(&path, Some(token)).await.expect(200);
        assert_eq!(body["id"], p.session_id.as_str());
        assert_eq!(body["title"], "Town hall");
    }
}

async fn start_moves_created_to_started_once(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let path = format!("/api/sessions/{}/start", p.session_id);
    let body = t.api.act(&path, Some(&p.token)).await.expect(200);
    assert_eq!(body["status"], "started");
    assert!(body["startedAt"].is_string());
    t.api
        .act(&path, Some(&p.token))
        .await
        .expect_error(409, "invalid_state");
}

async fn end_closes_the_active_poll_and_cannot_repeat(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let path = format!("/api/sessions/{}/end", p.session_id);
    let body = t.api.act(&path, Some(&p.token)).await.expect(200);
    assert_eq!(body["status"], "ended");
    assert!(body["endedAt"].is_string());
    assert_eq!(body["activePollId"], json!(null));
    let poll_path = format!("/api/polls/{}", poll["id"].as_str().expect("id"));
    let closed = t.api.get(&poll_path, Some(&p.token)).await.expect(200);
    assert_eq!(closed["status"], "closed");
    t.api
        .act(&path, Some(&p.token))
        .await
        .expect_error(409, "session_ended");
    let start = format!("/api/sessions/{}/start", p.session_id);
    t.api
        .act(&start, Some(&p.token))
        .await
        .expect_error(409, "invalid_state");
}

async fn join_matches_code_case_insensitively(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let body = t
        .api
        .post(
            "/api/join",
            None,
            json!({ "code": p.code.to_lowercase(), "displayName": "Ada" }),
        )
        .await
        .expect(201);
    assert_eq!(body["participant"]["displayName"], "Ada");
    assert_eq!(body["participant"]["sessionId"], p.session_id.as_str());
    assert_eq!(body["session"]["id"], p.session_id.as_str());
    assert!(body["participantToken"].is_string());
    assert!(body["participant"]["joinedAt"].is_string());
    assert_eq!(body["participant"]["connected"], false);
}

async fn join_with_unknown_code_is_session_not_found(backend: Backend) {
    let t = TestServer::start(backend).await;
    for code in ["ZZZZZZ", "nope", "", "0OIL01"] {
        t.api
            .post(
                "/api/join",
                None,
                json!({ "code": code, "displayName": "Ada" }),
            )
            .await
            .expect_error(404, "session_not_found");
    }
}

async fn join_of_ended_session_is_session_ended(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let end = format!("/api/sessions/{}/end", p.session_id);
    t.api.act(&end, Some(&p.token)).await.expect(200);
    t.api
        .post(
            "/api/join",
            None,
            json!({ "code": p.code, "displayName": "Ada" }),
        )
        .await
        .expect_error(409, "session_ended");
}

async fn display_name_must_be_1_to_64_characters(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    for name in [String::new(), " ".into(), "n".repeat(65)] {
        t.api
            .post(
                "/api/join",
                None,
                json!({ "code": p.code, "displayName": name }),
            )
            .await
            .expect_error(422, "validation_failed");
    }
    t.api.join(&p.code, &"n".repeat(64)).await;
}

async fn presenter_lists_participants_in_join_order(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.create_session("Town hall").await;
    let ada = t.api.join(&p.code, "Ada").await;
    let bob = t.api.join(&p.code, "Bob").await;
    let list = t.api.participants(&p).await;
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(ids, vec![ada.id.as_str(), bob.id.as_str()]);
    assert_eq!(list[0]["displayName"], "Ada");
    assert!(list[0]["lastSeenAt"].is_string());
}

/// The `rel="next"` target of a reply's `Link` header, if it has one.
fn next_link(reply: &pollcast_tests::client::Reply) -> Option<String> {
    let link = reply.headers.get("link")?.to_str().ok()?;
    let target = link.strip_prefix('<')?.split_once(">; rel=\"next\"")?.0;
    Some(target.to_owned())
}

async fn participants_and_polls_page_by_keyset_with_a_next_link(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let mut joined = Vec::new();
    for i in 0..7 {
        joined.push(t.api.join(&p.code, &format!("P{i}")).await.id);
    }
    let token = Some(p.token.as_str());
    let first = format!("/api/sessions/{}/participants?limit=3", p.session_id);
    let mut seen = Vec::new();
    let mut next = Some(first);
    let mut pages = 0;
    while let Some(path) = next.take() {
        let reply = t.api.get(&path, token).await;
        next = next_link(&reply);
        let page = reply.expect(200);
        let page = page.as_array().expect("a page is the contract's array");
        assert!(page.len() <= 3, "{path}: {} items", page.len());
        seen.extend(
            page.iter()
                .map(|x| x["id"].as_str().expect("id").to_owned()),
        );
        pages += 1;
        if pages == 1 {
            // A join between two pages lands on a later page, neither skipped
            // nor repeated (an offset would do one or the other).
            joined.push(t.api.join(&p.code, "Late").await.id);
        }
        assert!(pages <= 4, "paging does not end");
    }
    assert_eq!(seen, joined, "8 participants in 3 pages, in join order");
    assert_eq!(pages, 3);

    // Unpaged, the whole list, as the contract answers it.
    let all = t.api.participants(&p).await;
    assert_eq!(all.as_array().expect("array").len(), 8);

    // Polls page the same way.
    for i in 0..3 {
        t.api
            .create_poll(
                &p,
                json!({ "question": format!("Q{i}"), "options": ["a", "b"] }),
            )
            .await;
    }
    let path = format!("/api/sessions/{}/polls?limit=2", p.session_id);
    let reply = t.api.get(&path, token).await;
    let next = next_link(&reply).expect("a second page of polls");
    assert_eq!(reply.expect(200).as_array().expect("array").len(), 2);
    let reply = t.api.get(&next, token).await;
    assert_eq!(next_link(&reply), None, "the last page links nowhere");
    let last = reply.expect(200);
    assert_eq!(last.as_array().expect("array").len(), 1);
    assert_eq!(last[0]["question"], "Q2");

    // A bad limit, or a cursor that is not an item of this list, is refused.
    let other = t.api.create_session("Other").await;
    let stranger = t.api.join(&other.code, "Stranger").await;
    for query in [
        "limit=0".to_owned(),
        "limit=1001".to_owned(),
        "limit=x".to_owned(),
        "after=not-a-uuid".to_owned(),
        format!("after={}", stranger.id),
    ] {
        let path = format!("/api/sessions/{}/participants?{query}", p.session_id);
        t.api
            .get(&path, token)
            .await
            .expect_error(422, "validation_failed");
    }
}

async fn live_join_codes_are_unique_and_ended_sessions_release_theirs(backend: Backend) {
    use pollcast_store::sea_orm::{ConnectionTrait, Database};
    let t = TestServer::start(backend).await;
    let a = t.api.started_session().await;
    let b = t.api.create_session("Other").await;
    let db = Database::connect(&t.database_url).await.expect("connect");
    let give_b_the_code_of_a = format!(
        "UPDATE sessions SET code = '{}' WHERE code = '{}'",
        a.code, b.code
    );
    assert!(
        db.execute_unprepared(&give_b_the_code_of_a).await.is_err(),
        "two live sessions must not share a code"
    );
    let end = format!("/api/sessions/{}/end", a.session_id);
    t.api.act(&end, Some(&a.token)).await.expect(200);
    db.execute_unprepared(&give_b_the_code_of_a)
        .await
        .expect("an ended session's code is free again");
    let joined = t
        .api
        .post(
            "/api/join",
            None,
            json!({ "code": a.code, "displayName": "Ada" }),
        )
        .await
        .expect(201);
    assert_eq!(
        joined["session"]["id"],
        b.session_id.as_str(),
        "the live one wins"
    );
}

async fn unknown_route_is_not_found(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.api
        .get("/api/nothing", None)
        .await
        .expect_error(404, "not_found");
    let p = t.api.create_session("Town hall").await;
    t.api
        .get("/api/sessions/not-a-uuid", Some(&p.token))
        .await
        .expect_error(404, "session_not_found");
    let other = uuid::Uuid::now_v7();
    t.api
        .get(&format!("/api/sessions/{other}"), Some(&p.token))
        .await
        .expect_error(403, "forbidden");
}

pollcast_tests::on_both_backends!(
    create_session_answers_201_with_session_and_presenter_token,
    session_title_must_be_1_to_200_characters,
    text_with_nul_or_control_characters_is_validation_failed,
    malformed_or_mistyped_body_is_invalid_body,
    body_over_64_kib_is_payload_too_large,
    admin_key_when_configured_guards_session_creation,
    any_token_of_the_session_reads_it,
    start_moves_created_to_started_once,
    end_closes_the_active_poll_and_cannot_repeat,
    join_matches_code_case_insensitively,
    join_with_unknown_code_is_session_not_found,
    join_of_ended_session_is_session_ended,
    display_name_must_be_1_to_64_characters,
    presenter_lists_participants_in_join_order,
    participants_and_polls_page_by_keyset_with_a_next_link,
    live_join_codes_are_unique_and_ended_sessions_release_theirs,
    unknown_route_is_not_found,
);
