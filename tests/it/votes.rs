//! Voting rules, rejections, idempotency and results.

use pollcast_protocol::{Audience, DomainEvent};
use pollcast_tests::client::{Presenter, id_of, option_id, vote_counts};
use pollcast_tests::{Api, Backend, TestServer};
use serde_json::{Value, json};
use uuid::Uuid;

async fn multiple_poll(api: &Api, p: &Presenter, max_choices: u32) -> Value {
    let poll = api
        .create_poll(
            p,
            json!({ "question": "Which?", "options": ["A", "B", "C", "D"], "kind": "multiple", "maxChoices": max_choices }),
        )
        .await;
    api.act(
        &format!("/api/polls/{}/activate", id_of(&poll)),
        Some(&p.token),
    )
    .await
    .expect(200)
}

async fn accepted_vote_answers_201_and_counts(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let (poll_id, b) = (id_of(&poll), option_id(&poll, 1));
    let body = t.api.vote(&poll_id, &j.token, &[&b]).await.expect(201);
    let vote = &body["vote"];
    assert_eq!(vote["pollId"], poll_id.as_str());
    assert_eq!(vote["participantId"], j.id.as_str());
    assert_eq!(vote["optionIds"], json!([b]));
    assert!(vote["id"].is_string() && vote["createdAt"].is_string());
    let r = t.api.results(&poll_id, &j.token).await;
    assert_eq!(r["pollId"], poll_id.as_str());
    assert_eq!(r["totalVotes"], 1);
    assert_eq!(r["final"], false);
    let counts: Vec<(String, u64)> = r["options"]
        .as_array()
        .expect("options")
        .iter()
        .map(|o| {
            (
                id_of(&json!({"id": o["optionId"]})),
                o["votes"].as_u64().expect("votes"),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = (0..3)
        .map(|i| (option_id(&poll, i), u64::from(i == 1)))
        .collect();
    assert_eq!(counts, expected, "counts in the poll's option order");
}

async fn second_vote_on_same_poll_is_rejected_with_already_voted(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    t.api
        .vote(&poll_id, &j.token, &[&option_id(&poll, 0)])
        .await
        .expect(201);
    t.api
        .vote(&poll_id, &j.token, &[&option_id(&poll, 1)])
        .await
        .expect_error(409, "already_voted");
    let r = t.api.results(&poll_id, &p.token).await;
    assert_eq!(r["totalVotes"], 1);
    assert_eq!(
        r["options"][1]["votes"], 0,
        "the rejected vote changed nothing"
    );
}

async fn rejected_vote_sends_vote_rejected_to_the_submitter_alone(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    t.api
        .vote(&poll_id, &j.token, &[&Uuid::now_v7().to_string()])
        .await
        .expect_error(422, "invalid_option");
    let session: Uuid = p.session_id.parse().expect("uuid");
    // created, joined, started, poll created, poll activated, vote rejected
    let events = t.events(session, 6).await;
    let last = &events[5].event;
    match last {
        DomainEvent::VoteRejected {
            poll_id: pid,
            participant_id,
            reason,
            message,
        } => {
            assert_eq!(pid.to_string(), poll_id);
            assert_eq!(participant_id.to_string(), j.id);
            assert_eq!(reason, "invalid_option");
            assert!(!message.is_empty());
        }
        other => panic!("expected vote:rejected, got {other:?}"),
    }
    let participant: Uuid = j.id.parse().expect("uuid");
    assert_eq!(last.audience(), Audience::Participant(participant));
    assert!(!last.audience().includes(true, None), "not even presenters");
}

async fn vote_on_draft_or_closed_poll_is_poll_not_active(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let draft = t
        .api
        .create_poll(&p, json!({ "question": "Q?", "options": ["A", "B"] }))
        .await;
    t.api
        .vote(&id_of(&draft), &j.token, &[&option_id(&draft, 0)])
        .await
        .expect_error(409, "poll_not_active");
    let active = t.api.active_poll(&p).await;
    // A vote while it is active: the server now knows it as active, and must
    // still read its status again for the next vote.
    let bo = t.api.join(&p.code, "Bo").await;
    t.api
        .vote(&id_of(&active), &bo.token, &[&option_id(&active, 0)])
        .await
        .expect(201);
    t.api
        .act(
            &format!("/api/polls/{}/close", id_of(&active)),
            Some(&p.token),
        )
        .await
        .expect(200);
    t.api
        .vote(&id_of(&active), &j.token, &[&option_id(&active, 0)])
        .await
        .expect_error(409, "poll_not_active");
}

async fn vote_for_an_option_not_in_the_poll_is_invalid_option(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let earlier = t.api.active_poll(&p).await;
    let current = t.api.active_poll(&p).await;
    for bad in [
        Uuid::now_v7().to_string(),
        "garbage".into(),
        option_id(&earlier, 0),
    ] {
        t.api
            .vote(&id_of(&current), &j.token, &[&bad])
            .await
            .expect_error(422, "invalid_option");
    }
}

async fn single_choice_takes_exactly_one_option(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    t.api
        .vote(
            &poll_id,
            &j.token,
            &[&option_id(&poll, 0), &option_id(&poll, 1)],
        )
        .await
        .expect_error(422, "too_many_choices");
    t.api
        .vote(&poll_id, &j.token, &[])
        .await
        .expect_error(422, "validation_failed");
    t.api
        .vote(&poll_id, &j.token, &[&option_id(&poll, 2)])
        .await
        .expect(201);
}

async fn multiple_choice_takes_1_to_max_choices_distinct_options(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = multiple_poll(&t.api, &p, 2).await;
    let poll_id = id_of(&poll);
    let (a, b, c) = (
        option_id(&poll, 0),
        option_id(&poll, 1),
        option_id(&poll, 2),
    );
    let ada = t.api.join(&p.code, "Ada").await;
    t.api
        .vote(&poll_id, &ada.token, &[&a, &b, &c])
        .await
        .expect_error(422, "too_many_choices");
    t.api
        .vote(&poll_id, &ada.token, &[&a, &a])
        .await
        .expect_error(422, "validation_failed");
    t.api
        .vote(&poll_id, &ada.token, &[&a, &b])
        .await
        .expect(201);
    let bob = t.api.join(&p.code, "Bob").await;
    t.api.vote(&poll_id, &bob.token, &[&b]).await.expect(201);
    let r = t.api.results(&poll_id, &p.token).await;
    assert_eq!(r["totalVotes"], 2, "votes, not options chosen");
    assert_eq!(vote_counts(&r), vec![1, 2, 0, 0]);
}

async fn presenter_cannot_vote(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    t.api
        .vote(&id_of(&poll), &p.token, &[&option_id(&poll, 0)])
        .await
        .expect_error(403, "forbidden");
}

async fn repeated_idempotency_key_returns_the_first_answer_and_casts_once(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    let path = format!("/api/polls/{poll_id}/votes");
    let send = |option: String| {
        let api = t.api.clone();
        let (path, token) = (path.clone(), j.token.clone());
        async move {
            api.send(
                reqwest::Method::POST,
                &path,
                Some(&token),
                Some(json!({ "optionIds": [option] })),
                &[("Idempotency-Key", "retry-1")],
            )
            .await
        }
    };
    let first = send(option_id(&poll, 0)).await.expect(201);
    let again = send(option_id(&poll, 0)).await.expect(201);
    assert_eq!(first, again, "the same answer, byte for byte");
    let r = t.api.results(&poll_id, &p.token).await;
    assert_eq!(r["totalVotes"], 1);
}

async fn idempotency_key_replays_a_rejection_too(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let path = format!("/api/polls/{}/votes", id_of(&poll));
    let headers = [("Idempotency-Key", "k-2")];
    let send = |option: String| {
        t.api.send(
            reqwest::Method::POST,
            &path,
            Some(&j.token),
            Some(json!({ "optionIds": [option] })),
            &headers,
        )
    };
    send("not-an-option".into())
        .await
        .expect_error(422, "invalid_option");
    // Same key, now a valid body: still the first answer, and nothing is cast.
    send(option_id(&poll, 0))
        .await
        .expect_error(422, "invalid_option");
    let r = t.api.results(&id_of(&poll), &p.token).await;
    assert_eq!(r["totalVotes"], 0);
}

async fn results_are_final_once_the_poll_closes(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let j = t.api.join(&p.code, "Ada").await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    t.api
        .vote(&poll_id, &j.token, &[&option_id(&poll, 2)])
        .await
        .expect(201);
    t.api
        .act(&format!("/api/polls/{poll_id}/close"), Some(&p.token))
        .await
        .expect(200);
    let r = t.api.results(&poll_id, &j.token).await;
    assert_eq!(r["final"], true);
    assert_eq!(r["options"][2]["votes"], 1);
}

async fn votes_stay_correct_while_batch_tasks_retire_and_restart(backend: Backend) {
    let options = pollcast_tests::server::Options {
        domain: pollcast_domain::DomainConfig {
            vote_batch_idle: std::time::Duration::from_millis(10),
            ..pollcast_domain::DomainConfig::default()
        },
        ..pollcast_tests::server::Options::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    let mut voters = Vec::new();
    for i in 0..5 {
        let voter = t.api.join(&p.code, &format!("voter {i}")).await;
        t.api
            .vote(&poll_id, &voter.token, &[&option_id(&poll, 0)])
            .await
            .expect(201);
        voters.push(voter);
        // Time passes with no votes: the batch task retires, and the next vote
        // starts a new one.
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    for voter in &voters {
        t.api
            .vote(&poll_id, &voter.token, &[&option_id(&poll, 1)])
            .await
            .expect_error(409, "already_voted");
    }
    let results = t.api.results(&poll_id, &p.token).await;
    assert_eq!(vote_counts(&results), vec![5, 0, 0]);
}

/// A validly signed token is no credential when its participant does not exist
/// (a database reset under the same secret) or belongs to another session; and
/// such a voter never fails honest votes sent at the same time.
async fn token_of_an_unknown_participant_is_unauthorized_and_harms_no_one(backend: Backend) {
    let t = TestServer::start(backend).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let poll_id = id_of(&poll);
    let option = option_id(&poll, 0);
    let session: Uuid = p.session_id.parse().expect("uuid");
    let keys = pollcast_domain::TokenKeys::new(
        pollcast_tests::server::SECRET,
        std::time::Duration::from_secs(60),
    );
    let ghost = keys.issue(
        session,
        pollcast_protocol::Role::Participant,
        Some(Uuid::now_v7()),
    );
    let other = t.api.started_session().await;
    let elsewhere = t.api.join(&other.code, "Elsewhere").await;
    let borrowed = keys.issue(
        session,
        pollcast_protocol::Role::Participant,
        Some(elsewhere.id.parse().expect("uuid")),
    );
    let mut honest = Vec::new();
    for i in 0..40 {
        honest.push(t.api.join(&p.code, &format!("voter {i}")).await.token);
    }
    let mut replies = Vec::new();
    for token in honest.iter().chain([&ghost, &borrowed]) {
        let (api, poll_id, option, token) = (
            t.api.clone(),
            poll_id.clone(),
            option.clone(),
            token.clone(),
        );
        replies.push(tokio::spawn(async move {
            api.vote(&poll_id, &token, &[&option]).await
        }));
    }
    let mut statuses = Vec::new();
    for reply in replies {
        statuses.push(reply.await.expect("vote task"));
    }
    for reply in &statuses[..40] {
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    for reply in &statuses[40..] {
        reply.expect_error(401, "unauthorized");
    }
    let results = t.api.results(&poll_id, &p.token).await;
    assert_eq!(vote_counts(&results), vec![40, 0, 0]);
}

/// A results update still waiting in its coalescing window when the process goes
/// (a crash loses it the same way) is published by the next start.
async fn results_left_waiting_by_a_stopped_process_are_published_after_the_restart(
    backend: Backend,
) {
    let waiting = pollcast_tests::server::Options {
        domain: pollcast_domain::DomainConfig {
            results_interval: std::time::Duration::from_secs(30),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = TestServer::start_with(backend, waiting).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let ada = t.api.join(&p.code, "Ada").await;
    t.api
        .vote(&id_of(&poll), &ada.token, &[&option_id(&poll, 1)])
        .await
        .expect(201);
    let t = t.restart(Default::default()).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let events = t.events_through(session, 0, "results:updated").await;
    let Some(DomainEvent::ResultsUpdated { results }) = events.last().map(|e| &e.event) else {
        panic!("no results:updated: {events:?}");
    };
    assert_eq!(results.total_votes, 1);
    assert_eq!(results.options[1].votes, 1);
}

/// The clean-up removes idempotency answers and published events older than the
/// retention, while votes go on, and nothing younger: a retry inside the window
/// still gets its first answer.
async fn clean_up_removes_only_what_is_past_the_retention_while_votes_flow(backend: Backend) {
    use pollcast_store::sea_orm::{
        ActiveValue::Set, ColumnTrait, Database, EntityTrait, PaginatorTrait, QueryFilter,
        sea_query::Expr,
    };
    use pollcast_store::{idempotency_key, outbox};
    let options = pollcast_tests::server::Options {
        domain: pollcast_domain::DomainConfig {
            retention: std::time::Duration::from_secs(3600),
            cleanup_every: std::time::Duration::from_millis(50),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let (poll_id, option) = (id_of(&poll), option_id(&poll, 0));
    let ada = t.api.join(&p.code, "Ada").await;
    let bob = t.api.join(&p.code, "Bob").await;
    let vote_path = format!("/api/polls/{poll_id}/votes");
    let body = json!({ "optionIds": [option] });
    let first = t
        .api
        .send(
            reqwest::Method::POST,
            &vote_path,
            Some(&ada.token),
            Some(body.clone()),
            &[("Idempotency-Key", "fresh")],
        )
        .await
        .expect(201);
    t.settle(&p.session_id).await;
    // Two hours old: an answer of Bob's and the session's first three events.
    let db = Database::connect(&t.database_url).await.expect("connect");
    let two_hours_ago = chrono::Utc::now() - chrono::Duration::hours(2);
    idempotency_key::Entity::insert(idempotency_key::ActiveModel {
        participant_id: Set(bob.id.parse().expect("uuid")),
        key: Set("old".into()),
        answer: Set(r#"{"outcome":"rejected","reason":"poll_not_active","message":"old"}"#.into()),
        created_at: Set(two_hours_ago),
    })
    .exec_without_returning(&db)
    .await
    .expect("old answer");
    let session: Uuid = p.session_id.parse().expect("uuid");
    outbox::Entity::update_many()
        .col_expr(outbox::Column::OccurredAt, Expr::value(two_hours_ago))
        .filter(outbox::Column::SessionId.eq(session))
        .filter(outbox::Column::Position.lte(3))
        .exec(&db)
        .await
        .expect("backdate events");
    let events_before = outbox::Entity::find()
        .filter(outbox::Column::SessionId.eq(session))
        .count(&db)
        .await
        .expect("count");
    // Votes flow while the clean-up runs.
    let mut voters = Vec::new();
    for i in 0..30 {
        let voter = t.api.join(&p.code, &format!("voter {i}")).await;
        let (api, poll_id, option) = (t.api.clone(), poll_id.clone(), option_id(&poll, 0));
        voters.push(tokio::spawn(async move {
            api.vote(&poll_id, &voter.token, &[&option]).await.status
        }));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let old_answers = idempotency_key::Entity::find()
            .filter(idempotency_key::Column::Key.eq("old"))
            .count(&db)
            .await
            .expect("count");
        let old_events = outbox::Entity::find()
            .filter(outbox::Column::SessionId.eq(session))
            .filter(outbox::Column::Position.lte(3))
            .count(&db)
            .await
            .expect("count");
        if old_answers == 0 && old_events == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old rows never removed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for voter in voters {
        assert_eq!(voter.await.expect("voter"), 201);
    }
    // Everything younger is still there: the fresh answer, and every other event.
    let again = t
        .api
        .send(
            reqwest::Method::POST,
            &vote_path,
            Some(&ada.token),
            Some(body),
            &[("Idempotency-Key", "fresh")],
        )
        .await
        .expect(201);
    assert_eq!(again, first, "the first answer, again");
    let events_after_first_three = outbox::Entity::find()
        .filter(outbox::Column::SessionId.eq(session))
        .filter(outbox::Column::Position.lte(i64::try_from(events_before).expect("count")))
        .count(&db)
        .await
        .expect("count");
    assert_eq!(events_after_first_three, events_before - 3);
    let results = t.api.results(&poll_id, &p.token).await;
    assert_eq!(vote_counts(&results), vec![31, 0, 0]);
    db.close().await.ok();
}

pollcast_tests::on_both_backends!(
    votes_stay_correct_while_batch_tasks_retire_and_restart,
    accepted_vote_answers_201_and_counts,
    second_vote_on_same_poll_is_rejected_with_already_voted,
    rejected_vote_sends_vote_rejected_to_the_submitter_alone,
    vote_on_draft_or_closed_poll_is_poll_not_active,
    vote_for_an_option_not_in_the_poll_is_invalid_option,
    single_choice_takes_exactly_one_option,
    multiple_choice_takes_1_to_max_choices_distinct_options,
    presenter_cannot_vote,
    repeated_idempotency_key_returns_the_first_answer_and_casts_once,
    idempotency_key_replays_a_rejection_too,
    results_are_final_once_the_poll_closes,
    token_of_an_unknown_participant_is_unauthorized_and_harms_no_one,
    results_left_waiting_by_a_stopped_process_are_published_after_the_restart,
    clean_up_removes_only_what_is_past_the_retention_while_votes_flow,
);
