//! An HTTP client for the contract's REST API, with one helper per step of a
//! session's life so tests read like the contract.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body (`Null` when empty or not JSON).
    pub body: Value,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    /// The contract error code of an error reply.
    pub fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or("<no error code>")
    }

    /// Asserts the status and returns the body.
    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(self.status, status, "unexpected reply: {}", self.body);
        self.body
    }

    /// Asserts an error reply with this status and code.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.code()),
            (status, code),
            "unexpected reply: {}",
            self.body
        );
        assert!(
            self.body["error"]["message"].is_string(),
            "error without message: {}",
            self.body
        );
    }
}

/// A presenter's handle on a session it created.
#[derive(Debug, Clone)]
pub struct Presenter {
    /// Session id.
    pub session_id: String,
    /// Join code.
    pub code: String,
    /// Presenter token.
    pub token: String,
}

/// A participant who joined.
#[derive(Debug, Clone)]
pub struct Joiner {
    /// Participant id.
    pub id: String,
    /// Participant token.
    pub token: String,
}

/// Client for one server.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

fn str_of(value: &Value) -> String {
    value
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

impl Api {
    /// A client for the server at `base` (`http://host:port`).
    pub fn new(base: String) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            // Let go of an idle connection before the server does: it closes
            // kept-alive connections idle for 10 s (`--header-read-timeout-ms`),
            // and a request sent as that close arrives fails (hyper's
            // `IncompleteMessage`; seen once in six load-generator runs).
            .pool_idle_timeout(std::time::Duration::from_secs(5))
            .build()
            .expect("http client");
        Self { base, http }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; `body` is sent as JSON when given.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.finish(request).await
    }

    /// Sends a request with a raw body.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.finish(request).await
    }

    async fn finish(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request reaches the server");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("response body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            headers,
        }
    }

    /// GET with a token.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None, &[]).await
    }

    /// POST a JSON body with a token.
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.send(Method::POST, path, token, Some(body), &[]).await
    }

    /// POSTs an action that takes no body (`…/start`, `…/end`, `…/activate`,
    /// `…/close`).
    pub async fn act(&self, path: &str, token: Option<&str>) -> Reply {
        self.post(path, token, json!({})).await
    }

    /// Creates a session.
    pub async fn create_session(&self, title: &str) -> Presenter {
        let body = self
            .post("/api/sessions", None, json!({ "title": title }))
            .await
            .expect(201);
        Presenter {
            session_id: str_of(&body["session"]["id"]),
            code: str_of(&body["session"]["code"]),
            token: str_of(&body["presenterToken"]),
        }
    }

    /// Creates and starts a session.
    pub async fn started_session(&self) -> Presenter {
        let presenter = self.create_session("Keynote Q&A").await;
        self.post(
            &format!("/api/sessions/{}/start", presenter.session_id),
            Some(&presenter.token),
            json!({}),
        )
        .await
        .expect(200);
        presenter
    }

    /// Joins with a code.
    pub async fn join(&self, code: &str, name: &str) -> Joiner {
        let body = self
            .post(
                "/api/join",
                None,
                json!({ "code": code, "displayName": name }),
            )
            .await
            .expect(201);
        Joiner {
            id: str_of(&body["participant"]["id"]),
            token: str_of(&body["participantToken"]),
        }
    }

    /// Creates a poll; returns the Poll resource.
    pub async fn create_poll(&self, presenter: &Presenter, body: Value) -> Value {
        self.post(
            &format!("/api/sessions/{}/polls", presenter.session_id),
            Some(&presenter.token),
            body,
        )
        .await
        .expect(201)
    }

    /// Creates and activates a single-choice poll with options A, B, C.
    pub async fn active_poll(&self, presenter: &Presenter) -> Value {
        let poll = self
            .create_poll(
                presenter,
                json!({ "question": "Best talk?", "options": ["A", "B", "C"] }),
            )
            .await;
        self.post(
            &format!("/api/polls/{}/activate", str_of(&poll["id"])),
            Some(&presenter.token),
            json!({}),
        )
        .await
        .expect(200)
    }

    /// The session's participants, as its presenter reads them.
    pub async fn participants(&self, presenter: &Presenter) -> Value {
        let path = format!("/api/sessions/{}/participants", presenter.session_id);
        self.get(&path, Some(&presenter.token)).await.expect(200)
    }

    /// A poll's results, which must be readable with `token`.
    pub async fn results(&self, poll_id: &str, token: &str) -> Value {
        self.get(&format!("/api/polls/{poll_id}/results"), Some(token))
            .await
            .expect(200)
    }

    /// Casts a vote.
    pub async fn vote(&self, poll_id: &str, token: &str, option_ids: &[&str]) -> Reply {
        self.post(
            &format!("/api/polls/{poll_id}/votes"),
            Some(token),
            json!({ "optionIds": option_ids }),
        )
        .await
    }
}

/// A Results resource's vote counts, in the poll's option order.
pub fn vote_counts(results: &Value) -> Vec<u64> {
    results["options"]
        .as_array()
        .unwrap_or_else(|| panic!("no options in {results}"))
        .iter()
        .map(|o| {
            o["votes"]
                .as_u64()
                .unwrap_or_else(|| panic!("no count in {o}"))
        })
        .collect()
}

/// The id of option `index` of a Poll resource.
pub fn option_id(poll: &Value, index: usize) -> String {
    str_of(&poll["options"][index]["id"])
}

/// A resource's `id`.
pub fn id_of(resource: &Value) -> String {
    str_of(&resource["id"])
}

/// `voters` participants joined to a started session with an active poll.
pub async fn session_with_voters(api: &Api, voters: usize) -> (Presenter, Value, Vec<String>) {
    let p = api.started_session().await;
    let poll = api.active_poll(&p).await;
    let mut tokens = Vec::new();
    for i in 0..voters {
        tokens.push(api.join(&p.code, &format!("voter {i}")).await.token);
    }
    (p, poll, tokens)
}

/// Casts one vote per token, eight at a time, counting successes in `done`;
/// returns the statuses.
pub async fn vote_all(
    api: Api,
    poll: String,
    option: String,
    tokens: Vec<String>,
    done: Arc<AtomicUsize>,
) -> Vec<u16> {
    futures::stream::iter(tokens)
        .map(|token| {
            let (api, poll, option, done) =
                (api.clone(), poll.clone(), option.clone(), Arc::clone(&done));
            async move {
                let reply = api.vote(&poll, &token, &[&option]).await;
                done.fetch_add(1, Ordering::SeqCst);
                reply.status
            }
        })
        .buffer_unordered(8)
        .collect()
        .await
}
