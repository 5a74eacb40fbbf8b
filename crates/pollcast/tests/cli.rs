//! The `pollcast` binary as an operator runs it: a real process, configured by
//! flags and environment, stopped with SIGTERM.

use std::process::{Command, Stdio};

use pollcast_tests::process::{Pollcast, run};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_pollcast");

#[tokio::test]
async fn tokens_survive_a_restart_because_the_secret_is_kept_in_the_data_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    // Configuration by environment works as well as by flags.
    let env = [("POLLCAST_DATA_DIR", data_dir.as_str())];
    let mut first = Pollcast::serve(BIN, &[], &env).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("http://{}/api/sessions", first.addr))
        .json(&json!({ "title": "Keynote" }))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let session = created["session"]["id"].as_str().expect("id").to_owned();
    let token = created["presenterToken"]
        .as_str()
        .expect("token")
        .to_owned();
    assert!(first.terminate().success(), "SIGTERM is a clean exit");

    let secret = dir.path().join("secret");
    assert!(secret.is_file(), "secret generated into the data directory");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may read the secret");
    }

    let mut second = Pollcast::serve(BIN, &[], &env).await;
    let reply = http
        .get(format!("http://{}/api/sessions/{session}", second.addr))
        .bearer_auth(&token)
        .send()
        .await
        .expect("read");
    assert_eq!(reply.status().as_u16(), 200, "the old token still works");
    assert!(second.terminate().success());
}

/// Huge pages would make every 2 MiB the allocator touches resident: the server
/// turns them off for itself, whatever the host's default.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let mut server = Pollcast::serve(BIN, &["--data-dir", &data_dir], &[]).await;
    let pid = server.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "THP still allowed:\n{status}");
    assert!(server.terminate().success());
}

#[test]
fn migrate_creates_the_database_and_exits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let status = Command::new(BIN)
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .expect("pollcast migrate runs");
    assert!(status.success());
    assert!(dir.path().join("pollcast.db").is_file());
}

#[test]
fn a_secret_shorter_than_16_characters_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--secret",
            "tiny-s3cret",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("pollcast runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least 16"), "{stderr}");
    assert!(
        !stderr.contains("tiny-s3cret"),
        "the secret itself is not echoed: {stderr}"
    );
}

#[test]
fn api_and_edge_roles_without_nats_are_refused_with_a_reason() {
    for role in ["api", "edge"] {
        let (status, stderr) = run(
            BIN,
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--role",
                role,
                "--secret",
                "a secret of enough characters",
            ],
        );
        assert!(!status.success(), "--role {role} started without NATS");
        assert!(
            stderr.contains(&format!("--role {role} needs --nats-url")),
            "{stderr}"
        );
    }
}

#[test]
fn an_edge_without_the_api_secret_is_refused_instead_of_inventing_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (status, stderr) = run(
        BIN,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--role",
            "edge",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--data-dir",
            &dir.path().display().to_string(),
        ],
    );
    assert!(!status.success());
    assert!(stderr.contains("--secret"), "{stderr}");
    assert!(
        !dir.path().join("secret").exists(),
        "an edge must not generate a secret"
    );
}

/// Under a low open-files limit the node says so at start-up, caps its WebSocket
/// connections below it, and still answers.
#[tokio::test]
async fn a_low_open_files_limit_is_reported_and_websockets_are_capped_under_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 400 && exec "$0" serve --listen "$1" --data-dir "$2" 2>"$3""#)
        .arg(BIN)
        .arg(format!("127.0.0.1:{port}"))
        .arg(dir.path())
        .arg(&log)
        .stdout(Stdio::null())
        .spawn()
        .expect("pollcast starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let healthy = loop {
        if let Ok(reply) = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await
            && reply.status().is_success()
        {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(healthy, "never healthy: {stderr}");
    assert!(
        stderr.contains("does not fit under the open-files limit"),
        "{stderr}"
    );
    // 400 less the 256 + 16 reserved.
    assert!(stderr.contains("capped_to=128"), "{stderr}");
}

/// A client that sends half a request and then nothing is closed after the
/// header timeout, and so is one idling between requests; meanwhile a normal
/// client on the same node is served as fast as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_and_idle_clients_are_closed_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let server = Pollcast::serve(
        BIN,
        &["--data-dir", &data_dir, "--header-read-timeout-ms", "500"],
        &[],
    )
    .await;
    // Fifty half-sent requests, and one connection idle after a full request.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut tcp = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: pollcast\r\n")
            .await
            .expect("half a request");
        slow.push(tcp);
    }
    let mut idle = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: pollcast\r\n\r\n")
        .await
        .expect("a request");
    let mut answer = [0u8; 512];
    let n = idle.read(&mut answer).await.expect("an answer");
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    // A normal client meanwhile.
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = std::time::Instant::now();
        let reply = http
            .get(format!("http://{}/healthz", server.addr))
            .send()
            .await
            .expect("served");
        assert_eq!(reply.status().as_u16(), 200);
        times.push(t.elapsed());
    }
    times.sort();
    // Queued behind the held connections, requests would wait out their 500 ms.
    let median = times[times.len() / 2];
    assert!(
        median < std::time::Duration::from_millis(100),
        "median {median:?}"
    );
    // Every held connection is closed by the server: reading ends in EOF or a
    // reset (after, at most, a 408 answer).
    for tcp in slow.iter_mut().chain(std::iter::once(&mut idle)) {
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut buffer = [0u8; 512];
            loop {
                match tcp.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a held connection stayed open");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(300),
        "closed too early: {elapsed:?}"
    );
}

/// A request body that stalls midway is answered `400 invalid_body` after the body
/// timeout, and the connection closes.
#[tokio::test]
async fn a_body_that_stalls_is_refused_after_the_body_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let server = Pollcast::serve(
        BIN,
        &["--data-dir", &data_dir, "--body-read-timeout-ms", "300"],
        &[],
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    tcp.write_all(
        b"POST /api/sessions HTTP/1.1\r\nHost: pollcast\r\nContent-Type: application/json\r\n\
          Content-Length: 40\r\n\r\n{\"title\":",
    )
    .await
    .expect("a third of a request");
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("answered and closed within 5 s");
    assert!(read.is_ok() || !answer.is_empty());
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("invalid_body"), "{text}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
}

/// With `--cors-origins`, a browser app on an allowed origin gets its preflight
/// answered and may read every answer (errors and the paging `Link` included);
/// other origins get no CORS headers, so their browsers withhold the answer. With
/// `--ws-origins`, a page on another origin is refused with 4403 before its token
/// is looked at, while clients that send no `Origin` are let in.
#[tokio::test]
async fn browser_origins_are_checked_against_the_allow_lists() {
    use pollcast_tests::ws::{WsClient, query};
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let app = "https://app.example.com";
    let server = Pollcast::serve(
        BIN,
        &[
            "--data-dir",
            &data_dir,
            "--cors-origins",
            "https://APP.example.com:443,http://localhost:5173",
            "--ws-origins",
            app,
        ],
        &[],
    )
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);

    let preflight = http
        .request(reqwest::Method::OPTIONS, format!("{base}/api/sessions"))
        .header("origin", app)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], app);
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .expect("ascii");
    assert!(methods.contains("POST"), "{methods}");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("idempotency-key"));

    let created = http
        .post(format!("{base}/api/sessions"))
        .header("origin", app)
        .json(&json!({ "title": "Browser" }))
        .send()
        .await
        .expect("create");
    assert_eq!(created.headers()["access-control-allow-origin"], app);
    let exposed = created.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(
        exposed.contains("link") && exposed.contains("retry-after"),
        "{exposed}"
    );
    let created: Value = created.json().await.expect("json");
    let session = created["session"]["id"].as_str().expect("id").to_owned();
    let token = created["presenterToken"]
        .as_str()
        .expect("token")
        .to_owned();

    // Errors carry the header too, or a browser app could not read its 422.
    let refused = http
        .post(format!("{base}/api/sessions"))
        .header("origin", app)
        .json(&json!({ "title": "" }))
        .send()
        .await
        .expect("invalid create");
    assert_eq!(refused.status().as_u16(), 422);
    assert_eq!(refused.headers()["access-control-allow-origin"], app);

    for stranger in ["https://evil.example.com", "http://app.example.com", "null"] {
        let reply = http
            .get(format!("{base}/api/sessions/{session}"))
            .bearer_auth(&token)
            .header("origin", stranger)
            .send()
            .await
            .expect("read");
        assert!(
            !reply.headers().contains_key("access-control-allow-origin"),
            "{stranger} was allowed"
        );
    }

    let q = query(&session, &token, None, pollcast_tests::ws::Format::Json);
    let mut page = WsClient::connect_from(server.addr, &q, app).await;
    page.expect("connection:established").await;
    let mut native = WsClient::connect(server.addr, &q).await;
    native.expect("connection:established").await;
    let mut foreign = WsClient::connect_from(server.addr, &q, "https://evil.example.com").await;
    foreign.expect_refusal("forbidden", 4403).await;
    // Before the token: a forged one is refused for its origin, not with 4401.
    let forged = query(&session, "forged", None, pollcast_tests::ws::Format::Json);
    let mut foreign =
        WsClient::connect_from(server.addr, &forged, "https://evil.example.com").await;
    foreign.expect_refusal("forbidden", 4403).await;
}

/// Without the flags, no CORS headers are sent and every origin may open `/ws`.
#[tokio::test]
async fn without_allow_lists_there_is_no_cors_and_any_origin_connects() {
    use pollcast_tests::ws::{WsClient, query};
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let server = Pollcast::serve(BIN, &["--data-dir", &data_dir], &[]).await;
    let http = reqwest::Client::new();
    let created = http
        .post(format!("http://{}/api/sessions", server.addr))
        .header("origin", "https://app.example.com")
        .json(&json!({ "title": "No CORS" }))
        .send()
        .await
        .expect("create");
    assert!(
        !created
            .headers()
            .contains_key("access-control-allow-origin")
    );
    let created: Value = created.json().await.expect("json");
    let session = created["session"]["id"].as_str().expect("id");
    let token = created["presenterToken"].as_str().expect("token");
    let q = query(session, token, None, pollcast_tests::ws::Format::Json);
    let mut page = WsClient::connect_from(server.addr, &q, "https://anywhere.example").await;
    page.expect("connection:established").await;
}

/// Origins in the flags are checked at start, with the flag's name in the error.
#[test]
fn a_malformed_origin_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let (status, output) = run(
        BIN,
        &[
            "serve",
            "--data-dir",
            &data_dir,
            "--ws-origins",
            "app.example.com",
        ],
    );
    assert!(!status.success());
    assert!(output.contains("--ws-origins"), "{output}");
    assert!(output.contains("not an origin"), "{output}");
}

/// A database URL that asks for TLS gets it: `sslmode=require` encrypts every
/// connection of the pool, `verify-full` with the server's CA in `sslrootcert`
/// works, and `verify-full` against a CA the binary does not trust is refused at
/// start with the reason, instead of falling back to plain TCP.
#[tokio::test]
async fn postgres_urls_asking_for_tls_get_it() {
    use pollcast_store::sea_orm::{ConnectionTrait, Database, Statement};
    let cluster = pollcast_tests::postgres::Cluster::shared();
    let plain = cluster.fresh_database().await;
    let (server_url, database) = plain.rsplit_once('/').expect("url with a database");
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();

    let required = format!("{plain}?sslmode=require");
    let mut server = Pollcast::serve(
        BIN,
        &["--data-dir", &data_dir, "--database-url", &required],
        &[],
    )
    .await;
    let p = server.api.started_session().await;
    server.api.join(&p.code, "Ada").await;

    let admin = Database::connect(format!("{server_url}/postgres?sslmode=disable"))
        .await
        .expect("admin connection");
    let row = admin
        .query_one_raw(Statement::from_string(
            admin.get_database_backend(),
            format!(
                "SELECT count(*) AS n, bool_and(s.ssl) AS all_tls \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = '{database}'"
            ),
        ))
        .await
        .expect("query")
        .expect("a row");
    let connections: i64 = row.try_get("", "n").expect("n");
    let all_tls: Option<bool> = row.try_get("", "all_tls").expect("all_tls");
    assert!(
        connections >= 1,
        "pollcast holds no connection to {database}"
    );
    assert_eq!(all_tls, Some(true), "a plain connection in the pool");
    assert!(server.terminate().success());

    let ca = cluster.ca_certificate().display().to_string();
    let verified = format!("{plain}?sslmode=verify-full&sslrootcert={ca}");
    let (status, output) = run(BIN, &["migrate", "--database-url", &verified]);
    assert!(status.success(), "verify-full with the CA: {output}");

    let untrusted = format!("{plain}?sslmode=verify-full");
    let (status, output) = run(BIN, &["migrate", "--database-url", &untrusted]);
    assert!(
        !status.success(),
        "a certificate no CA vouches for was accepted"
    );
    assert!(output.to_lowercase().contains("certificate"), "{output}");
}
