//! Real nats-server processes for tests: standalone servers, three-node JetStream
//! clusters, and super-clusters of single-server regions joined by gateways
//! (through delaying proxies), on free loopback ports, each with its own store in
//! a temporary directory.
//!
//! Every server runs under a small shell that waits on a pipe from this process
//! (the same trick as the PostgreSQL harness): when the [`NatsServer`] is dropped,
//! or the test process exits however it exits, the pipe closes and the shell kills
//! the server. [`NatsServer::kill`] SIGKILLs the server itself, as a crash would;
//! [`NatsServer::start_again`] brings it back on the same port and store.
//!
//! The binary is `POLLCAST_NATS_SERVER`, else `nats-server` on `PATH`. A missing
//! binary fails the test: there is no skipping (`scripts/test.sh` installs one).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::proxy::DelayProxy;

/// One nats-server with JetStream.
pub struct NatsServer {
    /// Client port.
    port: u16,
    /// The command line (after the binary).
    args: Vec<String>,
    /// Store, config and log; removed on drop.
    dir: PathBuf,
    /// The shell that owns the server; its stdin is the pipe.
    keeper: Option<Child>,
    /// The nats-server process itself.
    pid: Option<u32>,
    _tmp: Option<TempDir>,
}

/// How long a server may take to say it is ready.
const READY: Duration = Duration::from_secs(20);

impl NatsServer {
    /// A standalone JetStream server.
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// A standalone JetStream server with extra command-line flags (say,
    /// `--auth <token>`).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let tmp = tempfile::Builder::new()
            .prefix("pollcast-nats-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.join("store").display().to_string(),
            "--server_name".into(),
            format!("test-{port}"),
        ];
        let args = args
            .into_iter()
            .chain(extra.iter().map(|a| (*a).to_owned()))
            .collect();
        let mut server = NatsServer {
            port,
            args,
            dir,
            keeper: None,
            pid: None,
            _tmp: Some(tmp),
        };
        server.start_again();
        server
    }

    /// Writes `text` to `config` and starts a server on it (client port `port`,
    /// files in `dir`, `owner` the temporary directory to remove on drop).
    fn from_config(
        port: u16,
        dir: PathBuf,
        config: &Path,
        text: &str,
        owner: Option<TempDir>,
    ) -> Result<NatsServer, String> {
        write_file(config, text);
        let mut server = NatsServer {
            port,
            args: vec!["-c".into(), config.display().to_string()],
            dir,
            keeper: None,
            pid: None,
            _tmp: owner,
        };
        server.try_start_again()?;
        Ok(server)
    }

    /// The process-wide standalone server, started on first use, for tests that
    /// only need some server (each uses its own stream names).
    pub fn shared() -> &'static NatsServer {
        static SHARED: OnceLock<NatsServer> = OnceLock::new();
        SHARED.get_or_init(NatsServer::start)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL (no lame-duck mode, no flush) and waits until
    /// its port is closed.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if let Some(mut keeper) = self.keeper.take() {
            drop(keeper.stdin.take());
            let _ = keeper.wait();
        }
        let deadline = Instant::now() + READY;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "nats-server did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server (again) on the same port and store, and waits until it
    /// says it is ready.
    pub fn start_again(&mut self) {
        if let Err(log) = self.try_start_again() {
            panic!(
                "nats-server did not start (fatal error, or not ready within {READY:?}); log:\n{log}"
            );
        }
    }

    /// [`NatsServer::start_again`], returning the log when the server stops
    /// with a fatal error (say, its port taken) or is not ready in time.
    fn try_start_again(&mut self) -> Result<(), String> {
        assert!(self.keeper.is_none(), "server already running");
        let log = self.dir.join("nats.log");
        let pid_file = self.dir.join("nats.pid");
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&pid_file);
        let script = r#"
            bin="$1"; log="$2"; pidfile="$3"; shift 3
            "$bin" "$@" >"$log" 2>&1 &
            pid=$!
            echo "$pid" >"$pidfile"
            read _ignored
            kill -KILL "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
        "#;
        let keeper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(binary())
            .arg(&log)
            .arg(&pid_file)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.keeper = Some(keeper);
        let deadline = Instant::now() + READY;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server is ready") {
                break;
            }
            if text.contains("[FTL]") || Instant::now() > deadline {
                return Err(text);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = std::fs::read_to_string(&pid_file).expect("pid file");
        self.pid = Some(pid.trim().parse().expect("pid"));
        Ok(())
    }

    /// The nats-server process id, while it runs (benchmarks read its memory).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut keeper) = self.keeper.take() {
            drop(keeper.stdin.take());
            let _ = keeper.wait();
        }
    }
}

/// Three JetStream servers joined by routes into one cluster.
pub struct NatsCluster {
    /// The nodes, in the order of [`NatsCluster::urls`].
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three nodes and waits until they have elected a JetStream meta
    /// leader. The ports are picked (bound to port 0 and let go) before the
    /// nodes bind them, and in CI another test's connection took one first:
    /// a node died with "address already in use", and once a cluster answered
    /// "JetStream system temporarily unavailable" for the whole of a test. So a
    /// cluster that fails to start or elects no leader within [`READY`] is
    /// started again on new ports, its logs printed, up to three times in all.
    pub fn start() -> NatsCluster {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let logs = match Self::start_once() {
                Ok(cluster) if cluster.has_meta_leader() => return cluster,
                Ok(cluster) => format!("no JetStream meta leader:\n{}", cluster.logs()),
                Err(log) => format!("a node did not start:\n{log}"),
            };
            eprintln!("cluster start, attempt {attempt} of {ATTEMPTS}: {logs}");
        }
        panic!("no three-node cluster in {ATTEMPTS} attempts (logs above)");
    }

    fn start_once() -> Result<NatsCluster, String> {
        let tmp = tempfile::Builder::new()
            .prefix("pollcast-nats-cluster-")
            .tempdir()
            .expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect();
        let mut nodes = Vec::new();
        let base = tmp.path().to_path_buf();
        let mut tmp = Some(tmp);
        for (i, (port, route)) in ports.iter().enumerate() {
            let dir = base.join(format!("n{i}"));
            std::fs::create_dir_all(&dir).expect("node dir");
            let config = dir.join("node.conf");
            let text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{port}\n\
                 jetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{ name: pollcast-test, listen: 127.0.0.1:{route}, routes: [{routes}] }}\n",
                store = dir.join("store").display(),
                routes = routes.join(", "),
            );
            // The first node owns the directory of all three.
            let owner = if i == 0 { tmp.take() } else { None };
            nodes.push(NatsServer::from_config(*port, dir, &config, &text, owner)?);
        }
        Ok(NatsCluster { nodes })
    }

    /// Waits up to [`READY`] until a node's log says a meta leader was elected
    /// ("Self is new JetStream cluster metadata leader" on the leader,
    /// "JetStream cluster new metadata leader: …" on the others).
    fn has_meta_leader(&self) -> bool {
        let deadline = Instant::now() + READY;
        loop {
            if self
                .nodes
                .iter()
                .any(|node| node.log().contains("metadata leader"))
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node's log, for failure messages.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, node)| format!("--- n{i}\n{}", node.log()))
            .collect()
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }
}

/// Regions of one server each, joined by gateways into one JetStream
/// super-cluster. Every region's gateway listener sits behind a [`DelayProxy`],
/// so each gateway link costs the proxy's delay each way, and a region's inbound
/// links can be cut.
pub struct NatsSuperCluster {
    /// Region names, in the order of `servers`.
    pub regions: Vec<String>,
    /// One server per region; its NATS cluster is named after the region.
    pub servers: Vec<NatsServer>,
    /// The proxy in front of each region's gateway listener.
    pub gateways: Vec<DelayProxy>,
}

impl NatsSuperCluster {
    /// Starts one server per region. The JetStream meta leader (a majority of
    /// all regions) is elected a few seconds later; pollcast waits for it.
    pub fn start(regions: &[&str], gateway_delay: Duration) -> NatsSuperCluster {
        let tmp = tempfile::Builder::new()
            .prefix("pollcast-nats-super-")
            .tempdir()
            .expect("temp dir");
        let base = tmp.path().to_path_buf();
        let mut tmp = Some(tmp);
        let ports: Vec<(u16, u16, u16)> = regions
            .iter()
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let gateways: Vec<DelayProxy> = ports
            .iter()
            .map(|&(_, _, gateway)| {
                DelayProxy::start(([127, 0, 0, 1], gateway).into(), gateway_delay)
            })
            .collect();
        let remotes: Vec<String> = regions
            .iter()
            .zip(&gateways)
            .map(|(name, proxy)| {
                format!(
                    "{{ name: {name}, url: \"nats://127.0.0.1:{}\" }}",
                    proxy.port()
                )
            })
            .collect();
        let mut servers = Vec::new();
        for (i, (region, (port, route, gateway))) in regions.iter().zip(&ports).enumerate() {
            let dir = base.join(region);
            std::fs::create_dir_all(&dir).expect("region dir");
            let config = dir.join("server.conf");
            // A route to itself: a one-server cluster still needs "configured
            // routes" for clustered JetStream. Gateways advertise their proxy,
            // so no server learns a way around it.
            let text = format!(
                "server_name: {region}\nlisten: 127.0.0.1:{port}\n\
                 jetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{ name: {region}, listen: 127.0.0.1:{route}, \
                 routes: [\"nats-route://127.0.0.1:{route}\"] }}\n\
                 gateway {{ name: {region}, listen: 127.0.0.1:{gateway}, \
                 advertise: \"127.0.0.1:{proxy}\", gateways: [{remotes}] }}\n",
                store = dir.join("store").display(),
                proxy = gateways[i].port(),
                remotes = remotes.join(", "),
            );
            let owner = if i == 0 { tmp.take() } else { None };
            servers.push(
                NatsServer::from_config(*port, dir, &config, &text, owner)
                    .unwrap_or_else(|log| panic!("nats-server did not start; log:\n{log}")),
            );
        }
        NatsSuperCluster {
            regions: regions.iter().map(|r| (*r).to_owned()).collect(),
            servers,
            gateways,
        }
    }

    fn index(&self, region: &str) -> usize {
        self.regions
            .iter()
            .position(|r| r == region)
            .unwrap_or_else(|| panic!("no region {region}"))
    }

    /// The server of `region`.
    pub fn server(&mut self, region: &str) -> &mut NatsServer {
        let i = self.index(region);
        &mut self.servers[i]
    }

    /// The client URL of `region`'s server.
    pub fn url(&self, region: &str) -> String {
        self.servers[self.index(region)].url()
    }

    /// The proxy in front of `region`'s gateway listener: cutting it cuts every
    /// link into the region.
    pub fn gateway(&self, region: &str) -> &DelayProxy {
        &self.gateways[self.index(region)]
    }
}

fn write_file(path: &Path, text: &str) {
    let mut file = std::fs::File::create(path).expect("create file");
    file.write_all(text.as_bytes()).expect("write file");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The nats-server binary.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("POLLCAST_NATS_SERVER") {
        return PathBuf::from(path);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("nats-server not found; run scripts/test.sh, which installs it")
}
