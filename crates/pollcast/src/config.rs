//! Command-line and environment configuration: each flag is also a `POLLCAST_…`
//! variable; flags win over variables, variables over defaults.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pollcast_api::RateLimitConfig;
use pollcast_domain::DomainConfig;
use pollcast_edge::EdgeConfig;

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
    Serve(ServeArgs),
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
}

/// `pollcast serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the API (and `/metrics`) listens on.
    #[arg(long, env = "POLLCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// State.
    #[command(flatten)]
    pub store: StoreArgs,
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
    /// Writes without a token one IP may make at once.
    #[arg(long, env = "POLLCAST_ANONYMOUS_BURST", default_value_t = RateLimitConfig::default().anonymous_burst)]
    pub anonymous_burst: u32,
}

impl StoreArgs {
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
    /// The token secret: the configured one, or the one kept in the data directory
    /// (generated on first start, so restarts keep tokens valid).
    pub fn secret(&self) -> anyhow::Result<Vec<u8>> {
        match &self.secret {
            Some(secret) if secret.len() >= 16 => Ok(secret.as_bytes().to_vec()),
            Some(_) => anyhow::bail!("--secret must be at least 16 characters"),
            None => stored_secret(&self.store.data_dir),
        }
    }

    /// Domain settings from the flags.
    pub fn domain_config(&self) -> DomainConfig {
        DomainConfig {
            token_lifetime: Duration::from_secs(self.token_ttl_secs),
            results_interval: Duration::from_millis(self.results_interval_ms),
            admin_key: self.admin_key.clone(),
            presence_flush: Duration::from_millis(self.presence_flush_ms.max(1)),
            ..DomainConfig::default()
        }
    }

    /// Rate limits from the flags.
    pub fn rate_limits(&self) -> RateLimitConfig {
        RateLimitConfig {
            writes_per_second: self.writes_per_second,
            write_burst: self.write_burst,
            anonymous_per_second: self.anonymous_per_second,
            anonymous_burst: self.anonymous_burst,
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
            ..EdgeConfig::default()
        }
    }
}

fn stored_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join("secret");
    match fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => anyhow::bail!("{} is too short to be a secret", path.display()),
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
