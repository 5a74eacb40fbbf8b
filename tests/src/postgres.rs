//! A throwaway PostgreSQL cluster for the test process.
//!
//! The first test that needs PostgreSQL runs `initdb` into a temporary directory
//! and starts `postgres` on a free loopback port; every test then gets a database
//! of its own. The server runs under a small shell that waits on a pipe from this
//! process: when the test process exits, however it exits, the pipe closes and the
//! shell stops the server and deletes the directory. PostgreSQL refuses to run as
//! root, so as root everything runs as the `postgres` user.
//!
//! Binaries are taken from `POLLCAST_PG_BINDIR`, else `PATH`, else the newest
//! `/usr/lib/postgresql/*/bin`. A cluster that cannot start fails the test: there
//! is no skipping.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pollcast_store::sea_orm::{ConnectionTrait, Database};

/// The running cluster. It accepts TLS as well as plain connections, with a
/// server certificate for `localhost` and `127.0.0.1` signed by a CA of its own
/// ([`Cluster::ca_certificate`]).
pub struct Cluster {
    port: u16,
    ca: PathBuf,
    /// Holds the pipe whose closing stops the server; never read.
    _keeper: Mutex<Child>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

impl Cluster {
    /// The process-wide cluster, started on first use.
    pub fn shared() -> &'static Cluster {
        CLUSTER.get_or_init(|| match Cluster::start() {
            Ok(cluster) => cluster,
            Err(err) => panic!("PostgreSQL test cluster failed to start: {err:#}"),
        })
    }

    /// URL of a fresh, empty database on the cluster.
    pub async fn fresh_database(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        // Listening is not yet accepting queries: retry while the server starts up.
        let deadline = Instant::now() + Duration::from_secs(20);
        let admin = loop {
            match Database::connect(self.url("postgres")).await {
                Ok(db) => break db,
                Err(err) if Instant::now() > deadline => {
                    panic!("test cluster does not accept connections: {err}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        admin.close().await.ok();
        self.url(&name)
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The CA certificate (PEM) that signed the server's certificate, for
    /// `sslrootcert=` in a `verify-full` URL.
    pub fn ca_certificate(&self) -> &Path {
        &self.ca
    }

    fn start() -> anyhow::Result<Cluster> {
        let bin = bindir()?;
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("pollcast-pg-")
            .tempdir()?
            .keep();
        if root {
            run(Command::new("chown").arg("postgres:").arg(&dir))?;
        }
        let data = dir.join("data");
        run(as_cluster_owner(root, &bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data))?;
        let port = free_port()?;
        let ca = certificates(&dir, root)?;
        // fsync and friends off: the cluster lives for one test run.
        let script = r#"
            "$0" -D "$1" -p "$2" -k "$3" -c listen_addresses=127.0.0.1 -c fsync=off \
                -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 \
                -c ssl=on -c ssl_cert_file="$3/server.crt" -c ssl_key_file="$3/server.key" \
                >"$3/postgres.log" 2>&1 &
            pid=$!
            read _ignored
            kill -INT "$pid"
            wait "$pid"
            rm -rf "$3"
        "#;
        let keeper = as_cluster_owner(root, Path::new("sh"))
            .arg("-c")
            .arg(script)
            .arg(bin.join("postgres"))
            .arg(&data)
            .arg(port.to_string())
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let cluster = Cluster {
            port,
            ca,
            _keeper: Mutex::new(keeper),
        };
        cluster.wait_ready(&dir)?;
        Ok(cluster)
    }

    fn wait_ready(&self, dir: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        anyhow::bail!("postgres did not listen within 30 s; log:\n{log}")
    }
}

/// A CA and a server certificate it signed for `localhost` and `127.0.0.1`, made
/// with the `openssl` tool (Debian's PostgreSQL packages depend on it). Returns
/// the CA certificate's path.
fn certificates(dir: &Path, root: bool) -> anyhow::Result<PathBuf> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=pollcast test CA",
        ])
        .args(ec)
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.crt")))?;
    run(Command::new("openssl")
        .args(["req", "-subj", "/CN=localhost"])
        .args(ec)
        .arg("-keyout")
        .arg(dir.join("server.key"))
        .arg("-out")
        .arg(dir.join("server.csr")))?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(dir.join("server.csr"))
        .arg("-CA")
        .arg(dir.join("ca.crt"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-extfile")
        .arg(dir.join("san.ext"))
        .arg("-out")
        .arg(dir.join("server.crt")))?;
    // PostgreSQL refuses a key others may read.
    let key = dir.join("server.key");
    if root {
        run(Command::new("chown").arg("postgres:").arg(&key))?;
    }
    run(Command::new("chmod").arg("600").arg(&key))?;
    Ok(dir.join("ca.crt"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn as_cluster_owner(root: bool, program: &Path) -> Command {
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output()?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("POLLCAST_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|bin| bin.join("initdb").is_file());
    versions.sort();
    versions.pop().ok_or_else(|| {
        anyhow::anyhow!("PostgreSQL server binaries (initdb, postgres) not found; run scripts/test.sh, which installs them")
    })
}
