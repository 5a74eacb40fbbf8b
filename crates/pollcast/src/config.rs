//! Command-line and environment configuration: each flag is also a `POLLCAST_…`
//! variable; flags win over variables, variables over defaults.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use pollcast_api::RateLimitConfig;
use pollcast_domain::DomainConfig;
use pollcast_edge::EdgeConfig;
use pollcast_protocol::Origin;
use pollcast_stream::{NatsConfig, Retention, StreamConfig};

/// pollcast: the real-time backbone of live audience sessions.
#[derive(Debug, Parser)]
#[command(
    name = "pollcast",
    version,
    about = "pollcast: the real-time backbone of live audience sessions"
)]
pub struct Config {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(StoreArgs),
}

/// Where state lives.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Directory for the SQLite database and the generated token secret.
    #[arg(long, env = "POLLCAST_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Database URL; default: SQLite file `pollcast.db` in the data directory.
    #[arg(long, env = "POLLCAST_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Maximum PostgreSQL connections.
    #[arg(long, env = "POLLCAST_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// SQLite durability: `full` (every answered commit survives a power loss) or
    /// `normal` (faster; survives a crash of the process, not of the machine).
    #[arg(long, env = "POLLCAST_SQLITE_SYNCHRONOUS", value_enum, default_value_t = SqliteSynchronous::Full)]
    pub sqlite_synchronous: SqliteSynchronous,
}

/// `--sqlite-synchronous`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SqliteSynchronous {
    /// `PRAGMA synchronous=FULL`.
    Full,
    /// `PRAGMA synchronous=NORMAL`.
    Normal,
}

/// What one `pollcast serve` process runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// REST API, domain, outbox relay, presence tracking (needs the database).
    Api,
    /// WebSocket edge only (`/ws`; needs no database).
    Edge,
    /// Both, in one process.
    #[default]
    All,
}

/// Which event stream, and how much history it keeps.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// NATS server URLs of one cluster, comma-separated (`nats://…`, `tls://…`).
    /// When given, the JetStream engine is used; otherwise the embedded one.
    #[arg(long, env = "POLLCAST_NATS_URL", value_delimiter = ',')]
    pub nats_url: Vec<String>,
    /// A NATS `.creds` file (JWT and nkey seed).
    #[arg(long, env = "POLLCAST_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// A NATS auth token.
    #[arg(long, env = "POLLCAST_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// Replicas of the JetStream streams (3 on a three-node cluster).
    #[arg(long, env = "POLLCAST_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=5))]
    pub stream_replicas: u16,
    /// Name of the JetStream events stream.
    #[arg(long, env = "POLLCAST_STREAM_NAME", default_value = "POLLCAST_EVENTS")]
    pub stream_name: String,
    /// History kept per session (e.g. `24h`, `90m`); also capped at 100 000 events.
    #[arg(long, env = "POLLCAST_STREAM_MAX_AGE", default_value = "24h",
          value_parser = humantime::parse_duration)]
    pub stream_max_age: Duration,
    /// Memory for the embedded stream's history across all sessions, in MiB; past
    /// it, the quietest sessions lose their oldest events first.
    #[arg(long, env = "POLLCAST_HISTORY_MEMORY_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub history_memory_mb: u64,
}

impl StreamArgs {
    /// The engine these flags ask for; `manage_streams`: this process creates or
    /// updates the JetStream streams (api nodes) rather than waiting for them.
    pub fn stream_config(&self, manage_streams: bool) -> StreamConfig {
        let retention = Retention {
            max_age: self.stream_max_age,
            ..Retention::default()
        };
        let nats = (!self.nats_url.is_empty()).then(|| NatsConfig {
            urls: self.nats_url.clone(),
            credentials_file: self.nats_creds.clone(),
            token: self.nats_token.clone(),
            stream_name: self.stream_name.clone(),
            replicas: usize::from(self.stream_replicas),
            connection_name: format!("pollcast-{}", std::process::id()),
            manage_streams,
            // Edges read in their own region; api nodes write to the origin.
            regional_reads: !manage_streams,
            ..NatsConfig::default()
        });
        StreamConfig {
            retention,
            memory_budget: usize::try_from(self.history_memory_mb << 20).unwrap_or(usize::MAX),
            nats,
        }
    }
}

/// `pollcast serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the server (and `/metrics`) listens on.
    #[arg(long, env = "POLLCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// What this process runs: `api`, `edge` or `all`. `api` and `edge` need
    /// `--nats-url`: separate processes share the JetStream engine.
    #[arg(long, env = "POLLCAST_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// The region this node serves (`eu-west`, say): every metric carries it as
    /// a `region` label, so dashboards and alerts can tell regions apart. Unset:
    /// no label.
    #[arg(long, env = "POLLCAST_REGION", value_parser = parse_region)]
    pub region: Option<String>,
    /// State.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The event stream.
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Token signing secret; default: generated once into the data directory.
    #[arg(long, env = "POLLCAST_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// When set, creating a session requires `Authorization: Bearer <admin key>`.
    #[arg(long, env = "POLLCAST_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, env = "POLLCAST_TOKEN_TTL_SECS", default_value_t = 24 * 60 * 60)]
    pub token_ttl_secs: u64,
    /// How long `results:updated` coalesces votes, in milliseconds (at most 90).
    #[arg(long, env = "POLLCAST_RESULTS_INTERVAL_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=90))]
    pub results_interval_ms: u64,
    /// Idempotency answers and published events are removed from the database once
    /// older than this (e.g. `48h`); at least `--stream-max-age`.
    #[arg(long, env = "POLLCAST_RETENTION", default_value = "24h",
          value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Longest wait for a request's headers, in milliseconds: from a new
    /// connection's first byte on, and between requests on a kept-alive connection
    /// (so idle keep-alive connections close too). Covers the WebSocket upgrade.
    #[arg(long, env = "POLLCAST_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,
    /// Most polls one session may have (409 `invalid_state` beyond).
    #[arg(long, env = "POLLCAST_MAX_POLLS_PER_SESSION", default_value_t = 200)]
    pub max_polls_per_session: u32,
    /// Most participants one session may have (409 `invalid_state` beyond).
    #[arg(
        long,
        env = "POLLCAST_MAX_PARTICIPANTS_PER_SESSION",
        default_value_t = 100_000
    )]
    pub max_participants_per_session: u32,
    /// Longest pause while a request body arrives, in milliseconds.
    #[arg(long, env = "POLLCAST_BODY_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_ms: u64,
    /// How often heartbeat answers are written to `lastSeenAt`, in milliseconds.
    #[arg(long, env = "POLLCAST_PRESENCE_FLUSH_MS", default_value_t = 1000)]
    pub presence_flush_ms: u64,
    /// Interval of `heartbeat:ping`, in milliseconds.
    #[arg(long, env = "POLLCAST_HEARTBEAT_INTERVAL_MS", default_value_t = 30_000)]
    pub heartbeat_interval_ms: u64,
    /// Close (4408) after this long without `heartbeat:pong`, in milliseconds.
    #[arg(long, env = "POLLCAST_HEARTBEAT_TIMEOUT_MS", default_value_t = 60_000)]
    pub heartbeat_timeout_ms: u64,
    /// Most WebSocket connections on this node (4429 beyond).
    #[arg(long, env = "POLLCAST_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Most WebSocket connections per participant on this node (4429 beyond).
    #[arg(
        long,
        env = "POLLCAST_MAX_CONNECTIONS_PER_PARTICIPANT",
        default_value_t = 5
    )]
    pub max_connections_per_participant: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (4500).
    #[arg(long, env = "POLLCAST_SEND_QUEUE_BYTES", default_value_t = 1 << 20)]
    pub send_queue_bytes: usize,
    /// Bytes of recent events a room keeps in memory per member, so that a
    /// reconnecting client's replay need not read the event stream (a room
    /// keeps at least 256 KiB, at most 32 MiB); 0 keeps none.
    #[arg(long, env = "POLLCAST_ROOM_WINDOW_PER_MEMBER", default_value_t = pollcast_edge::recent::BUDGET_PER_MEMBER)]
    pub room_window_per_member: usize,
    /// Writes per second per token holder (0: unlimited).
    #[arg(long, env = "POLLCAST_WRITES_PER_SECOND", default_value_t = RateLimitConfig::default().writes_per_second)]
    pub writes_per_second: u32,
    /// Writes a token holder may make at once.
    #[arg(long, env = "POLLCAST_WRITE_BURST", default_value_t = RateLimitConfig::default().write_burst)]
    pub write_burst: u32,
    /// Writes without a token (create session, join) per second per client IP
    /// (0: unlimited). Generous: a whole venue may share one address.
    #[arg(long, env = "POLLCAST_ANONYMOUS_PER_SECOND", default_value_t = RateLimitConfig::default().anonymous_per_second)]
    pub anonymous_per_second: u32,
    /// Peers (CIDRs, comma-separated) whose `X-Forwarded-For` names the client for
    /// rate limits: your load balancers. Empty: the header is ignored.
    #[arg(long, env = "POLLCAST_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Browser origins (`https://app.example.com`, comma-separated) whose pages may
    /// call the REST API from another site (CORS). Empty: no CORS headers, so
    /// browsers allow only same-origin pages.
    #[arg(long, env = "POLLCAST_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<Origin>,
    /// Browser origins whose pages may open `/ws` (4403 for others). Empty: any
    /// page. Clients that send no `Origin` (not browsers) are always let in.
    #[arg(long, env = "POLLCAST_WS_ORIGINS", value_delimiter = ',')]
    pub ws_origins: Vec<Origin>,
    /// Writes without a token one IP may make at once.
    #[arg(long, env = "POLLCAST_ANONYMOUS_BURST", default_value_t = RateLimitConfig::default().anonymous_burst)]
    pub anonymous_burst: u32,
}

impl StoreArgs {
    /// How to connect.
    pub fn options(&self) -> pollcast_store::StoreOptions {
        pollcast_store::StoreOptions {
            max_connections: self.db_max_connections,
            sqlite_sync: match self.sqlite_synchronous {
                SqliteSynchronous::Full => pollcast_store::SqliteSync::Full,
                SqliteSynchronous::Normal => pollcast_store::SqliteSync::Normal,
            },
        }
    }

    /// The database URL, defaulting to a SQLite file in the data directory (created
    /// if missing).
    pub fn database_url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        Ok(format!(
            "sqlite://{}?mode=rwc",
            self.data_dir.join("pollcast.db").display()
        ))
    }
}

impl ServeArgs {
    /// Refuses combinations that cannot work, saying why.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.retention < self.stream.stream_max_age {
            anyhow::bail!(
                "--retention ({}) must be at least --stream-max-age ({}): replays and \
                 restarts read the outbox as far back as the history window",
                humantime::format_duration(self.retention),
                humantime::format_duration(self.stream.stream_max_age)
            );
        }
        if self.role != Role::All && self.stream.nats_url.is_empty() {
            let role = if self.role == Role::Api {
                "api"
            } else {
                "edge"
            };
            anyhow::bail!(
                "--role {role} needs --nats-url: api and edge processes share events through \
                 NATS JetStream (the embedded stream lives inside one process; use --role all)"
            );
        }
        Ok(())
    }

    /// The token secret: the configured one, or the one kept in the data directory.
    /// An api (or whole) node generates it on first start, so restarts keep tokens
    /// valid; an edge only reads it, because a secret of its own would refuse every
    /// token the api issues.
    pub fn secret(&self) -> anyhow::Result<Vec<u8>> {
        match &self.secret {
            Some(secret) if secret.len() >= 16 => Ok(secret.as_bytes().to_vec()),
            Some(_) => anyhow::bail!("--secret must be at least 16 characters"),
            None => stored_secret(&self.store.data_dir, self.role != Role::Edge),
        }
    }

    /// How long issued tokens stay valid.
    pub fn token_lifetime(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }

    /// Domain settings from the flags.
    pub fn domain_config(&self) -> DomainConfig {
        DomainConfig {
            results_interval: Duration::from_millis(self.results_interval_ms),
            admin_key: self.admin_key.clone(),
            presence_flush: Duration::from_millis(self.presence_flush_ms.max(1)),
            // Live connections report at least every half heartbeat interval and
            // are closed by their edge after the timeout; one more flush interval
            // and a second of slack cover the way to the database.
            presence_timeout: Duration::from_millis(
                self.heartbeat_timeout_ms + 2 * self.presence_flush_ms.max(1) + 1000,
            ),
            retention: self.retention,
            max_polls_per_session: self.max_polls_per_session,
            max_participants_per_session: self.max_participants_per_session,
            ..DomainConfig::default()
        }
    }

    /// HTTP timeouts from the flags.
    pub fn http_timeouts(&self) -> crate::HttpTimeouts {
        crate::HttpTimeouts {
            header_read: Duration::from_millis(self.header_read_timeout_ms),
            body_read: Duration::from_millis(self.body_read_timeout_ms),
            ..crate::HttpTimeouts::default()
        }
    }

    /// Rate limits from the flags.
    pub fn rate_limits(&self) -> RateLimitConfig {
        RateLimitConfig {
            writes_per_second: self.writes_per_second,
            write_burst: self.write_burst,
            anonymous_per_second: self.anonymous_per_second,
            anonymous_burst: self.anonymous_burst,
            trusted_proxies: self.trusted_proxies.clone(),
        }
    }

    /// WebSocket edge settings from the flags.
    pub fn edge_config(&self) -> EdgeConfig {
        EdgeConfig {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms.max(1)),
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms.max(1)),
            max_connections: self.max_connections,
            max_connections_per_participant: self.max_connections_per_participant,
            send_queue_bytes: self.send_queue_bytes,
            room_window_per_member: self.room_window_per_member,
            allowed_origins: self.ws_origins.clone(),
            ..EdgeConfig::default()
        }
    }
}

fn stored_secret(data_dir: &Path, generate: bool) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join("secret");
    match fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => anyhow::bail!("{} is too short to be a secret", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && !generate => {
            anyhow::bail!(
                "an edge checks the tokens the api issues: give it the api's --secret \
                 (or POLLCAST_SECRET); {} does not exist",
                path.display()
            )
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    }
    fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    Ok(secret.into_bytes())
}

/// A region name: what a Prometheus label value and a NATS name can both carry.
fn parse_region(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("1-64 letters, digits, '-' or '_'".into())
    }
}
