//! The `pollcast` binary as an operator runs it: a real process, configured by
//! flags and environment, stopped with SIGTERM.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_pollcast");

/// A `pollcast serve` process on a free loopback port.
struct Serving {
    child: Child,
    base: String,
}

impl Serving {
    async fn start(data_dir: &Path) -> Serving {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            // Configuration by environment works as well as by flags.
            .env("POLLCAST_DATA_DIR", data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pollcast starts");
        let serving = Serving {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        serving.wait_healthy().await;
        serving
    }

    /// Polls `/healthz` until the process answers (at most 20 s).
    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(reply) = reqwest::get(format!("{}/healthz", self.base)).await
                && reply.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "pollcast never became healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then the exit status (at most 20 s).
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "pollcast ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn tokens_survive_a_restart_because_the_secret_is_kept_in_the_data_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = Serving::start(dir.path()).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/api/sessions", first.base))
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

    let second = Serving::start(dir.path()).await;
    let reply = http
        .get(format!("{}/api/sessions/{session}", second.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("read");
    assert_eq!(reply.status().as_u16(), 200, "the old token still works");
    assert!(second.terminate().success());
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
