//! `429 rate_limited` with `Retry-After`: per token holder for writes with a token,
//! per client address for writes without one. A refused request changes nothing.

use pollcast_api::RateLimitConfig;
use pollcast_tests::client::{id_of, option_id};
use pollcast_tests::server::Options;
use pollcast_tests::{Api, Backend, Reply, TestServer};
use serde_json::json;
use uuid::Uuid;

fn limited(config: RateLimitConfig) -> Options {
    Options {
        rate_limits: config,
        ..Options::default()
    }
}

#[track_caller]
fn assert_rate_limited(reply: &Reply) {
    reply.expect_error(429, "rate_limited");
    let retry_after: u64 = reply.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
}

async fn a_participant_over_the_write_limit_gets_429_and_changes_nothing(backend: Backend) {
    let config = RateLimitConfig {
        writes_per_second: 1,
        // The presenter's setup (start, create, activate) takes three.
        write_burst: 3,
        ..RateLimitConfig::default()
    };
    let t = TestServer::start_with(backend, limited(config)).await;
    let p = t.api.started_session().await;
    let poll = t.api.active_poll(&p).await;
    let ada = t.api.join(&p.code, "Ada").await;
    let poll_id = id_of(&poll);
    t.api
        .vote(&poll_id, &ada.token, &[&option_id(&poll, 0)])
        .await
        .expect(201);
    for _ in 0..2 {
        t.api
            .vote(&poll_id, &ada.token, &[&option_id(&poll, 0)])
            .await
            .expect_error(409, "already_voted");
    }
    t.settle(&p.session_id).await;
    let session: Uuid = p.session_id.parse().expect("uuid");
    let before = t.server.stream().newest(session).await.expect("newest");
    let refused = t
        .api
        .vote(&poll_id, &ada.token, &[&option_id(&poll, 1)])
        .await;
    assert_rate_limited(&refused);
    // Another holder's bucket is untouched.
    let bob = t.api.join(&p.code, "Bob").await;
    t.api
        .vote(&poll_id, &bob.token, &[&option_id(&poll, 1)])
        .await
        .expect(201);
    let results = t.api.results(&poll_id, &p.token).await;
    assert_eq!(results["totalVotes"], 2);
    // No vote:rejected for the refused request: Bob's join, vote and results only.
    t.settle(&p.session_id).await;
    let events = t.events(session, before.expect("some") + 2).await;
    let after: Vec<&str> = events
        .iter()
        .filter(|e| Some(e.position) > before)
        .map(|e| e.event.event_type())
        .collect();
    assert!(!after.contains(&"vote:rejected"), "{after:?}");
}

async fn anonymous_writes_over_the_address_limit_get_429(backend: Backend) {
    let config = RateLimitConfig {
        anonymous_per_second: 1,
        anonymous_burst: 3,
        ..RateLimitConfig::default()
    };
    let t = TestServer::start_with(backend, limited(config)).await;
    let p = t.api.create_session("Town hall").await;
    t.api.join(&p.code, "Ada").await;
    t.api.join(&p.code, "Bob").await;
    let refused = t
        .api
        .post(
            "/api/join",
            None,
            json!({ "code": p.code, "displayName": "Cy" }),
        )
        .await;
    assert_rate_limited(&refused);
    let list = t.api.participants(&p).await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(2),
        "the refused join changed nothing"
    );
    // The presenter writes from its own bucket.
    t.api
        .act(
            &format!("/api/sessions/{}/start", p.session_id),
            Some(&p.token),
        )
        .await
        .expect(200);
}

/// Behind a trusted proxy each forwarded client has its own bucket; from anyone
/// else, `X-Forwarded-For` buys nothing.
async fn forwarded_for_is_believed_only_from_trusted_proxies(backend: Backend) {
    let join = |api: Api, code: String, name: &'static str, client: &'static str| async move {
        api.send(
            reqwest::Method::POST,
            "/api/join",
            None,
            Some(json!({ "code": code, "displayName": name })),
            &[("X-Forwarded-For", client)],
        )
        .await
    };
    for trusted in [false, true] {
        let config = RateLimitConfig {
            anonymous_per_second: 1,
            anonymous_burst: 2,
            trusted_proxies: if trusted {
                vec!["127.0.0.0/8".parse().expect("cidr")]
            } else {
                Vec::new()
            },
            ..RateLimitConfig::default()
        };
        let t = TestServer::start_with(backend, limited(config)).await;
        // Creating the session took one of the loopback address's two.
        let p = t.api.create_session("Town hall").await;
        join(t.api.clone(), p.code.clone(), "Ada", "203.0.113.1")
            .await
            .expect(201);
        let second = join(t.api.clone(), p.code.clone(), "Bob", "203.0.113.1").await;
        let other_client = join(t.api.clone(), p.code.clone(), "Cy", "203.0.113.2").await;
        if trusted {
            second.expect(201);
            other_client.expect(201);
        } else {
            // One bucket for everything from this peer, whatever the header says.
            assert_rate_limited(&second);
            assert_rate_limited(&other_client);
        }
    }
}

pollcast_tests::on_both_backends!(
    a_participant_over_the_write_limit_gets_429_and_changes_nothing,
    anonymous_writes_over_the_address_limit_get_429,
    forwarded_for_is_believed_only_from_trusted_proxies,
);
