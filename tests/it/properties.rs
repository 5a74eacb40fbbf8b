//! Generated inputs against a real server: client WebSocket frames and request
//! bodies (fuzzing on stable Rust, run in every test run), and random sequences
//! of presenter and participant actions checked against a model of the session
//! and poll state machines. Longer, coverage-guided runs: `fuzz/` and
//! `docs/operations.md`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use pollcast_tests::ws::{Format, RawClient, client_frame, query};
use pollcast_tests::{Backend, TestServer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Panics so far on the threads named `threads`, so a panic inside a server task
/// (which tokio catches and the client only sees as a dropped socket) fails the
/// property that caused it. Counted by thread name: each test's server runs on a
/// [`runtime`] of its own name, so another test's failing assertion (a panic on
/// that test's thread) is never taken for this server's.
fn panics_on(threads: &str) -> usize {
    panic_counts()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(threads)
        .copied()
        .unwrap_or(0)
}

/// The counts behind [`panics_on`]; the first call installs the hook.
fn panic_counts() -> &'static Mutex<HashMap<String, usize>> {
    static COUNTS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    COUNTS.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(name) = std::thread::current().name() {
                *panic_counts()
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(name.to_owned())
                    .or_default() += 1;
            }
            previous(info);
        }));
        Mutex::default()
    })
}

/// A panic in a task on a test's runtime counts against that runtime's name
/// only: what the two fuzzing tests rely on to tell a server's panic from
/// another test's failure.
#[test]
fn a_panic_counts_against_the_runtime_it_happened_on() {
    let rt = runtime("panicking-runtime");
    let before = (panics_on("panicking-runtime"), panics_on("quiet-runtime"));
    let joined = rt.block_on(rt.spawn(async { panic!("on purpose") }));
    assert!(joined.is_err_and(|e| e.is_panic()));
    assert_eq!(panics_on("panicking-runtime"), before.0 + 1);
    assert_eq!(panics_on("quiet-runtime"), before.1);
}

/// A runtime for a test's server whose threads (workers and blocking pool) are
/// all named `threads`.
fn runtime(threads: &str) -> tokio::runtime::Runtime {
    panic_counts();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Something a client writes after the upgrade.
#[derive(Clone, Debug)]
enum Piece {
    /// One frame: first header byte (FIN, RSV, opcode), payload, masking key.
    Frame {
        first: u8,
        payload: Vec<u8>,
        mask: Option<[u8; 4]>,
    },
    /// Bytes that need not be a frame at all.
    Junk(Vec<u8>),
}

impl Piece {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Piece::Frame {
                first,
                payload,
                mask,
            } => client_frame(*first, payload, *mask),
            Piece::Junk(bytes) => bytes.clone(),
        }
    }

    /// A frame the contract answers without closing: masked, final, and either
    /// UTF-8 text (a pong, a resume or a `bad_frame`) or a small ping or pong.
    fn keeps_the_connection(&self) -> bool {
        match self {
            Piece::Frame {
                first: 0x81,
                payload,
                mask: Some(_),
            } => std::str::from_utf8(payload).is_ok(),
            Piece::Frame {
                first: 0x89 | 0x8A,
                payload,
                mask: Some(_),
            } => payload.len() <= 125,
            _ => false,
        }
    }
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(br#"{"eventType":"heartbeat:pong"}"#.to_vec()),
        "[ -~]{0,60}".prop_map(|id| {
            format!(r#"{{"eventType":"resume","lastEventId":"{id}"}}"#).into_bytes()
        }),
        any::<String>().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..300),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    let first = prop_oneof![
        4 => Just(0x81u8),
        1 => prop::sample::select(vec![0x01u8, 0x80, 0x82, 0x88, 0x89, 0x8A, 0xC1, 0x83, 0x09]),
        1 => any::<u8>(),
    ];
    let mask = prop_oneof![9 => any::<[u8; 4]>().prop_map(Some), 1 => Just(None)];
    prop_oneof![
        9 => (first, payload(), mask).prop_map(|(first, payload, mask)| Piece::Frame {
            first,
            payload,
            mask
        }),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Piece::Junk),
    ]
}

/// Whatever a client writes, the server answers with a close frame the RFC or the
/// contract names (1000 for a clean close, 1002, 1007, 1009), never with a panic or
/// a silently dropped socket; a client that sends only frames the contract accepts
/// keeps its connection until it closes it; and the server serves the next client.
#[test]
fn any_client_frames_end_in_a_close_frame_the_protocol_names() {
    const THREADS: &str = "fuzzed-frames-server";
    let rt = runtime(THREADS);
    let t = rt.block_on(TestServer::start(Backend::Sqlite));
    let p = rt.block_on(async {
        let p = t.api.create_session("Fuzzed").await;
        t.settle(&p.session_id).await;
        p
    });
    let q = query(&p.session_id, &p.token, None, Format::Json);
    let before = panics_on(THREADS);
    let mut runner = TestRunner::new(Config {
        cases: 160,
        ..Config::default()
    });
    let key = Some([0x0a, 0x0b, 0x0c, 0x0d]);
    let result = runner.run(&prop::collection::vec(piece(), 1..8), |pieces| {
        let (status, wrote_all) = rt.block_on(async {
            let mut client = RawClient::connect(t.server.addr(), &q).await;
            let mut wrote_all = true;
            for piece in &pieces {
                wrote_all &= client.try_send_raw(&piece.bytes()).await.is_ok();
            }
            // A clean close, then enough filler to complete any frame a piece left
            // open, so every case ends without waiting for a timeout.
            let _ = client
                .try_send_raw(&client_frame(0x88, &1000u16.to_be_bytes(), key))
                .await;
            let _ = client.try_send_raw(&[0u8; 4200]).await;
            (client.close_status().await, wrote_all)
        });
        if pieces.iter().all(Piece::keeps_the_connection) {
            prop_assert_eq!(status, Some(1000), "a well-behaved client was closed");
        } else {
            prop_assert!(
                matches!(status, Some(1000 | 1002 | 1007 | 1009))
                    || (status.is_none() && !wrote_all),
                "closed with {:?}",
                status
            );
        }
        prop_assert_eq!(panics_on(THREADS), before, "the server panicked");
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // Still serving.
    rt.block_on(async {
        let mut client = pollcast_tests::ws::WsClient::connect(t.server.addr(), &q).await;
        client.expect("connection:established").await;
    });
}

/// One presenter or participant action. Indexes pick among the polls and
/// participants that exist when the action runs (modulo their number).
#[derive(Clone, Debug)]
enum Action {
    Start,
    End,
    Join,
    CreatePoll {
        options: usize,
    },
    Activate(usize),
    Close(usize),
    Vote {
        participant: usize,
        poll: usize,
        option: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        1 => Just(Action::Start),
        1 => Just(Action::End),
        2 => Just(Action::Join),
        2 => (2usize..5).prop_map(|options| Action::CreatePoll { options }),
        2 => any::<usize>().prop_map(Action::Activate),
        1 => any::<usize>().prop_map(Action::Close),
        5 => (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(participant, poll, option)| Action::Vote { participant, poll, option }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Created,
    Started,
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PollState {
    Draft,
    Active,
    Closed,
}

impl PollState {
    fn as_str(self) -> &'static str {
        match self {
            PollState::Draft => "draft",
            PollState::Active => "active",
            PollState::Closed => "closed",
        }
    }
}

/// What the contract says the session looks like after the actions so far.
struct ModelPoll {
    id: String,
    options: Vec<String>,
    state: PollState,
    counts: Vec<u64>,
    voters: Vec<usize>,
}

/// Runs `actions` against a fresh server and against the contract's model, and
/// checks every answer and, at the end, every poll and tally.
async fn run_actions(backend: Backend, actions: &[Action]) -> Result<(), TestCaseError> {
    let options = pollcast_tests::server::Options {
        rate_limits: pollcast_api::RateLimitConfig::OFF,
        ..Default::default()
    };
    let t = TestServer::start_with(backend, options).await;
    let p = t.api.create_session("Model").await;
    let token = Some(p.token.as_str());
    let mut status = Status::Created;
    let mut polls: Vec<ModelPoll> = Vec::new();
    let mut participants: Vec<String> = Vec::new();
    for (step, action) in actions.iter().enumerate() {
        // (status, error code) the contract prescribes, and the model's change.
        let (reply, expected) = match *action {
            Action::Start => {
                let reply = t
                    .api
                    .act(&format!("/api/sessions/{}/start", p.session_id), token)
                    .await;
                let expected = if status == Status::Created {
                    status = Status::Started;
                    (200, "")
                } else {
                    (409, "invalid_state")
                };
                (reply, expected)
            }
            Action::End => {
                let reply = t
                    .api
                    .act(&format!("/api/sessions/{}/end", p.session_id), token)
                    .await;
                let expected = if status == Status::Ended {
                    (409, "session_ended")
                } else {
                    status = Status::Ended;
                    for poll in polls.iter_mut().filter(|x| x.state == PollState::Active) {
                        poll.state = PollState::Closed;
                    }
                    (200, "")
                };
                (reply, expected)
            }
            Action::Join => {
                let body = serde_json::json!({ "code": p.code, "displayName": format!("P{step}") });
                let reply = t.api.post("/api/join", None, body).await;
                let expected = if status == Status::Ended {
                    (409, "session_ended")
                } else {
                    participants.push(
                        reply.body["participantToken"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                    (201, "")
                };
                (reply, expected)
            }
            Action::CreatePoll { options } => {
                let texts: Vec<String> = (0..options).map(|i| format!("O{i}")).collect();
                let body = serde_json::json!({ "question": format!("Q{step}"), "options": texts });
                let reply = t
                    .api
                    .post(
                        &format!("/api/sessions/{}/polls", p.session_id),
                        token,
                        body,
                    )
                    .await;
                let expected = if status == Status::Ended {
                    (409, "session_ended")
                } else {
                    let ids = reply.body["options"]
                        .as_array()
                        .map(|o| {
                            o.iter()
                                .map(|x| x["id"].as_str().unwrap_or_default().to_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                    polls.push(ModelPoll {
                        id: reply.body["id"].as_str().unwrap_or_default().to_owned(),
                        options: ids,
                        state: PollState::Draft,
                        counts: vec![0; options],
                        voters: Vec::new(),
                    });
                    (201, "")
                };
                (reply, expected)
            }
            Action::Activate(i) | Action::Close(i) if polls.is_empty() => {
                let _ = i;
                continue;
            }
            Action::Activate(i) => {
                let i = i % polls.len();
                let reply = t
                    .api
                    .act(&format!("/api/polls/{}/activate", polls[i].id), token)
                    .await;
                let expected = match (status, polls[i].state) {
                    (Status::Ended, _) => (409, "session_ended"),
                    (Status::Created, _) => (409, "session_not_started"),
                    (_, PollState::Draft) => {
                        for poll in polls.iter_mut().filter(|x| x.state == PollState::Active) {
                            poll.state = PollState::Closed;
                        }
                        polls[i].state = PollState::Active;
                        (200, "")
                    }
                    _ => (409, "invalid_state"),
                };
                (reply, expected)
            }
            Action::Close(i) => {
                let i = i % polls.len();
                let reply = t
                    .api
                    .act(&format!("/api/polls/{}/close", polls[i].id), token)
                    .await;
                let expected = if polls[i].state == PollState::Active {
                    polls[i].state = PollState::Closed;
                    (200, "")
                } else {
                    (409, "invalid_state")
                };
                (reply, expected)
            }
            Action::Vote { .. } if polls.is_empty() || participants.is_empty() => continue,
            Action::Vote {
                participant,
                poll,
                option,
            } => {
                let (who, i) = (participant % participants.len(), poll % polls.len());
                let option = option % polls[i].options.len();
                let reply = t
                    .api
                    .vote(
                        &polls[i].id,
                        &participants[who],
                        &[polls[i].options[option].as_str()],
                    )
                    .await;
                let expected = if polls[i].state != PollState::Active {
                    (409, "poll_not_active")
                } else if polls[i].voters.contains(&who) {
                    (409, "already_voted")
                } else {
                    polls[i].voters.push(who);
                    polls[i].counts[option] += 1;
                    (201, "")
                };
                (reply, expected)
            }
        };
        let (code, error) = expected;
        prop_assert_eq!(
            reply.status,
            code,
            "step {} {:?}: {}",
            step,
            action,
            reply.body
        );
        if !error.is_empty() {
            prop_assert_eq!(reply.code(), error, "step {} {:?}", step, action);
        }
    }

    // The server's view, over REST, equals the model's.
    let session = t
        .api
        .get(&format!("/api/sessions/{}", p.session_id), token)
        .await
        .expect(200);
    let expected_status = match status {
        Status::Created => "created",
        Status::Started => "started",
        Status::Ended => "ended",
    };
    prop_assert_eq!(session["status"].as_str(), Some(expected_status));
    let active = polls
        .iter()
        .find(|x| x.state == PollState::Active)
        .map(|x| x.id.as_str());
    prop_assert_eq!(session["activePollId"].as_str(), active);
    let listed = t
        .api
        .get(&format!("/api/sessions/{}/polls", p.session_id), token)
        .await
        .expect(200);
    let listed = listed.as_array().cloned().unwrap_or_default();
    prop_assert_eq!(listed.len(), polls.len());
    for (poll, seen) in polls.iter().zip(&listed) {
        prop_assert_eq!(
            seen["id"].as_str(),
            Some(poll.id.as_str()),
            "creation order"
        );
        prop_assert_eq!(seen["status"].as_str(), Some(poll.state.as_str()));
        let results = t.api.results(&poll.id, &p.token).await;
        prop_assert_eq!(
            pollcast_tests::client::vote_counts(&results),
            poll.counts.clone()
        );
        prop_assert_eq!(
            results["totalVotes"].as_u64(),
            Some(poll.voters.len() as u64)
        );
        prop_assert_eq!(
            results["final"].as_bool(),
            Some(poll.state == PollState::Closed)
        );
    }
    Ok(())
}

fn state_machines_follow_the_contract(backend: Backend, cases: u32) {
    let rt = runtime("state-machines-server");
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(action(), 1..32), |actions| {
        rt.block_on(run_actions(backend, &actions))
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// Random sequences of start, end, join, create, activate, close and vote give the
/// answers the contract prescribes, step by step, and leave the polls, the
/// session's active poll and every tally as a model of the contract says.
#[test]
fn session_and_poll_state_machines_follow_the_contract_on_sqlite() {
    state_machines_follow_the_contract(Backend::Sqlite, 32);
}

/// The same on PostgreSQL, fewer cases (each needs a database of its own).
#[test]
fn session_and_poll_state_machines_follow_the_contract_on_postgres() {
    state_machines_follow_the_contract(Backend::Postgres, 10);
}

/// Whatever the interleaving of concurrent votes and however long the coalescing
/// interval, every `results:updated` a screen sees counts no fewer votes than the
/// one before, the last one before `poll:closed` is final and exact, and
/// `poll:closed` and REST carry the same exact tally.
#[test]
fn coalesced_results_end_exact_whatever_the_interleaving() {
    use pollcast_tests::client::{id_of, option_id, vote_counts};
    use pollcast_tests::ws::WsClient;
    use std::time::Duration;
    let rt = runtime("state-machines-server");
    let mut runner = TestRunner::new(Config {
        cases: 16,
        ..Config::default()
    });
    let schedule = (
        1u64..=90,
        prop::collection::vec((0usize..3, 0u64..30), 1..40),
    );
    let result = runner.run(&schedule, |(interval_ms, votes)| {
        rt.block_on(async {
            let mut options = pollcast_tests::server::Options {
                rate_limits: pollcast_api::RateLimitConfig::OFF,
                ..Default::default()
            };
            options.domain.results_interval = Duration::from_millis(interval_ms);
            let t = TestServer::start_with(Backend::Sqlite, options).await;
            let p = t.api.started_session().await;
            let poll = t.api.active_poll(&p).await;
            let poll_id = id_of(&poll);
            let mut joined = Vec::new();
            for i in 0..votes.len() {
                joined.push(t.api.join(&p.code, &format!("V{i}")).await);
            }
            let q = query(&p.session_id, &p.token, None, Format::Json);
            let mut screen = WsClient::connect(t.server.addr(), &q).await;
            screen.expect("connection:established").await;
            // Each vote starts after its own delay: the generated interleaving.
            let casts = votes.iter().zip(&joined).map(|(&(option, delay_ms), who)| {
                let (api, poll, option) =
                    (t.api.clone(), poll_id.clone(), option_id(&poll, option));
                async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    api.vote(&poll, &who.token, &[option.as_str()]).await.status
                }
            });
            let statuses = futures::future::join_all(casts).await;
            prop_assert!(statuses.iter().all(|&s| s == 201), "{:?}", statuses);
            let mut expected = vec![0u64; 3];
            for &(option, _) in &votes {
                expected[option] += 1;
            }
            t.api
                .act(&format!("/api/polls/{poll_id}/close"), Some(&p.token))
                .await
                .expect(200);

            let mut last_total = 0;
            let mut last_seen: Option<serde_json::Value> = None;
            let closed = loop {
                let frame = screen.envelope().await;
                match frame["eventType"].as_str() {
                    Some("results:updated")
                        if frame["payload"]["results"]["pollId"] == poll_id.as_str() =>
                    {
                        let results = frame["payload"]["results"].clone();
                        let total = results["totalVotes"].as_u64().unwrap_or_default();
                        prop_assert!(
                            total >= last_total,
                            "results went back: {} then {}",
                            last_total,
                            total
                        );
                        last_total = total;
                        last_seen = Some(results);
                    }
                    Some("poll:closed") => break frame,
                    _ => {}
                }
            };
            let last_seen = last_seen.expect("at least one results:updated");
            prop_assert_eq!(
                vote_counts(&last_seen),
                expected.clone(),
                "last results before the close"
            );
            prop_assert_eq!(last_seen["final"].as_bool(), Some(true));
            prop_assert_eq!(vote_counts(&closed["payload"]["results"]), expected.clone());
            let rest = t.api.results(&poll_id, &p.token).await;
            prop_assert_eq!(vote_counts(&rest), expected);
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// JSON of any shape, with the contract's field names more likely than others.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let key = prop_oneof![
        3 => prop::sample::select(vec![
            "title", "code", "displayName", "question", "options", "kind", "maxChoices",
            "optionIds", "text",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        any::<String>().prop_map(Value::String),
        "[ -~]{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => any::<String>().prop_map(String::into_bytes),
    ]
}

/// Any body on any write endpoint gets a status the contract names and, when it
/// is refused, the contract's error body, and changes nothing: no participant
/// joins and no poll is created on a refused request. Never a 5xx.
#[test]
fn any_request_body_gets_a_contract_answer_and_a_refusal_changes_nothing() {
    const THREADS: &str = "fuzzed-bodies-server";
    let rt = runtime(THREADS);
    let options = pollcast_tests::server::Options {
        rate_limits: pollcast_api::RateLimitConfig::OFF,
        ..Default::default()
    };
    let t = rt.block_on(TestServer::start_with(Backend::Sqlite, options));
    let (p, voter, poll) = rt.block_on(async {
        let p = t.api.started_session().await;
        let voter = t.api.join(&p.code, "Voter").await;
        let poll = pollcast_tests::client::id_of(&t.api.active_poll(&p).await);
        (p, voter, poll)
    });
    let count = |path: String| {
        let (api, token) = (t.api.clone(), p.token.clone());
        async move {
            let list = api.get(&path, Some(&token)).await.expect(200);
            list.as_array().map_or(0, Vec::len)
        }
    };
    let participants_path = format!("/api/sessions/{}/participants", p.session_id);
    let polls_path = format!("/api/sessions/{}/polls", p.session_id);
    let endpoints = [
        ("/api/sessions".to_owned(), None),
        ("/api/join".to_owned(), None),
        (polls_path.clone(), Some(p.token.clone())),
        (
            format!("/api/polls/{poll}/votes"),
            Some(voter.token.clone()),
        ),
    ];
    let before = panics_on(THREADS);
    let mut runner = TestRunner::new(Config {
        cases: 400,
        ..Config::default()
    });
    let result = runner.run(&(0..endpoints.len(), body()), |(endpoint, body)| {
        rt.block_on(async {
            let (path, token) = &endpoints[endpoint];
            let joined = count(participants_path.clone()).await;
            let polls = count(polls_path.clone()).await;
            let reply = t
                .api
                .send_raw(reqwest::Method::POST, path, token.as_deref(), body)
                .await;
            prop_assert!(
                matches!(
                    reply.status,
                    200 | 201 | 400 | 401 | 403 | 404 | 409 | 413 | 422
                ),
                "{} answered {}: {}",
                path,
                reply.status,
                reply.body
            );
            if reply.status >= 400 {
                prop_assert!(reply.body["error"]["code"].is_string(), "{}", reply.body);
                prop_assert!(reply.body["error"]["message"].is_string(), "{}", reply.body);
                prop_assert_eq!(count(participants_path.clone()).await, joined);
                prop_assert_eq!(count(polls_path.clone()).await, polls);
            }
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    assert_eq!(panics_on(THREADS), before, "the server panicked");
}
