//! What the benchmark binaries share: an in-process server and percentiles.

use std::sync::Arc;

pub mod client;
pub mod probe;

use pollcast::{ApiSettings, Server, Settings};
use pollcast_api::RateLimitConfig;
use pollcast_domain::{DomainConfig, TokenKeys};
use pollcast_edge::EdgeConfig;
use pollcast_stream::EmbeddedStream;

/// A server on 127.0.0.1:0 with a SQLite file in a temp dir, the embedded stream,
/// no rate limits and no per-session caps (benchmarks measure the path, not the
/// limits).
pub struct BenchServer {
    /// The server.
    pub server: Server,
    _dir: tempfile::TempDir,
}

impl BenchServer {
    /// Starts one, with SQLite's durability as given.
    pub async fn start_with(
        sqlite_sync: pollcast_store::SqliteSync,
    ) -> anyhow::Result<BenchServer> {
        let dir = tempfile::tempdir()?;
        let listener = pollcast::listen(([127, 0, 0, 1], 0).into())?;
        let settings = Settings {
            keys: TokenKeys::new(
                b"pollcast benchmark secret, loopback only",
                std::time::Duration::from_secs(24 * 60 * 60),
            ),
            api: Some(ApiSettings {
                database_url: format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("bench.db").display()
                ),
                store: pollcast_store::StoreOptions {
                    max_connections: 8,
                    sqlite_sync,
                },
                // Benchmarks measure the path, not the limits: each fan-out event
                // is a poll, and runs may send more than a session's cap.
                domain: DomainConfig {
                    max_polls_per_session: u32::MAX,
                    max_participants_per_session: u32::MAX,
                    ..DomainConfig::default()
                },
                single_node: true,
                rate_limits: RateLimitConfig::OFF,
                cors_origins: Vec::new(),
            }),
            edge: Some(EdgeConfig::default()),
            metrics: None,
            http: pollcast::HttpTimeouts::default(),
        };
        let server = Server::start(listener, settings, Arc::new(EmbeddedStream::default())).await?;
        Ok(BenchServer { server, _dir: dir })
    }
}

impl BenchServer {
    /// Starts one with the default (durable) SQLite settings.
    pub async fn start() -> anyhow::Result<BenchServer> {
        Self::start_with(pollcast_store::SqliteSync::default()).await
    }
}

/// Percentiles of a sample, in the sample's unit.
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `samples` (nearest rank); panics on an empty sample.
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        Self {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The median of `values`.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
