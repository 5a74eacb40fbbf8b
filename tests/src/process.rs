//! The real `pollcast` binary as an operator runs it: a process on a free loopback
//! port, configured by flags, stopped with SIGTERM or killed with SIGKILL.
//!
//! Each process writes its log to a file in a temporary directory; a test that
//! fails can print it with [`Pollcast::log`]. A process still running when its
//! [`Pollcast`] is dropped is killed.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::Api;

/// How long a process may take to answer `/healthz` after it was started.
const START: Duration = Duration::from_secs(30);

/// One `pollcast serve` process.
pub struct Pollcast {
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// A client for its REST API.
    pub api: Api,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pollcast {
    /// Starts `binary serve --listen 127.0.0.1:<free port> <args>` with `env`
    /// added to the environment, and waits until `/healthz` answers.
    pub async fn serve(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Pollcast {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut process = Pollcast {
            binary: binary.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            addr,
            api: Api::new(format!("http://{addr}")),
            log: dir.path().join("pollcast.log"),
            _dir: dir,
        };
        process.start_again().await;
        process
    }

    /// The running process's id, to read what the kernel says about it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process again with the same flags on the same port (after
    /// [`Pollcast::kill`]), and waits until `/healthz` answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.binary)
            .arg("serve")
            .args(["--listen", &self.addr.to_string()])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pollcast starts");
        self.child = Some(child);
        let deadline = Instant::now() + START;
        loop {
            if let Ok(reply) = reqwest::get(format!("http://{}/healthz", self.addr)).await
                && reply.status().is_success()
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("pollcast exited with {status}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "pollcast never became healthy; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/readyz` answers `status` (at most 30 s).
    pub async fn wait_ready(&self, status: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = reqwest::get(format!("http://{}/readyz", self.addr))
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            if now == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed {now}, expected {status}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then the exit status (at most 20 s).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "pollcast ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Pollcast {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `binary args…` to completion and returns its exit status and stderr.
pub fn run(binary: &str, args: &[&str]) -> (ExitStatus, String) {
    let output = Command::new(binary)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .expect("pollcast runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
