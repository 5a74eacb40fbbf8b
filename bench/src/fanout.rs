//! Fan-out benchmark: how long an event takes from its commit to every screen.
//!
//! Starts pollcast in-process on 127.0.0.1:0 (SQLite in a temp dir, embedded
//! stream), joins `--participants` participants, opens one WebSocket per
//! participant plus the presenter's, then commits `--events` room-wide events
//! (`poll:created`) at `--rate` per second and records, for every client and every
//! event, the time from the event's commit timestamp to the client having parsed
//! it. Also records the REST latency of the commits. Repeats `--runs` times with a
//! fresh server and prints percentiles per run and the median of each across runs.
//!
//! Traffic stays on loopback; every run is bounded in count and in time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use pollcast_bench::{BenchServer, Percentiles, median};
use pollcast_tests::Api;
use pollcast_tests::ws::{Format, WsClient, query};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "pollcast fan-out latency benchmark (loopback only)")]
struct Args {
    /// WebSocket clients besides the presenter.
    #[arg(long, default_value_t = 1000)]
    participants: usize,
    /// Room-wide events per run.
    #[arg(long, default_value_t = 200)]
    events: usize,
    /// Events committed per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Runs, each on a fresh server.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// `json` or `msgpack`.
    #[arg(long, default_value = "json")]
    format: String,
    /// Use a running server (`http://127.0.0.1:PORT`, loopback only) instead of
    /// starting one in this process. Start it with rate limits off.
    #[arg(long)]
    url: Option<String>,
}

/// Per-run hard limit, so a broken run cannot hang the machine.
const RUN_LIMIT: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let format = match args.format.as_str() {
        "msgpack" => Format::MessagePack,
        _ => Format::Json,
    };
    println!(
        "fanout: {} clients + presenter, {} events at {}/s, {:?}, {} runs",
        args.participants, args.events, args.rate, format, args.runs
    );
    let mut summaries = Vec::new();
    for run in 1..=args.runs {
        let summary = tokio::time::timeout(RUN_LIMIT, one_run(&args, format))
            .await
            .map_err(|_| anyhow::anyhow!("run {run} exceeded {RUN_LIMIT:?}"))??;
        println!("run {run}: {summary}");
        summaries.push(summary);
    }
    let median = |pick: fn(&Summary) -> f64| median(summaries.iter().map(pick).collect());
    println!(
        "median of {} runs: delivery p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms; commit (REST) p50 {:.1} ms, p99 {:.1} ms",
        summaries.len(),
        median(|s| s.delivery.p50),
        median(|s| s.delivery.p95),
        median(|s| s.delivery.p99),
        median(|s| s.delivery.max),
        median(|s| s.commit.p50),
        median(|s| s.commit.p99),
    );
    Ok(())
}

struct Summary {
    samples: usize,
    delivery: Percentiles,
    commit: Percentiles,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} deliveries: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms | commit p50 {:.1} ms, p99 {:.1} ms",
            self.samples,
            self.delivery.p50,
            self.delivery.p95,
            self.delivery.p99,
            self.delivery.max,
            self.commit.p50,
            self.commit.p99
        )
    }
}

fn now_millis() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

async fn one_run(args: &Args, format: Format) -> anyhow::Result<Summary> {
    match &args.url {
        Some(url) => {
            let addr: std::net::SocketAddr = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()?;
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "the benchmark only targets loopback"
            );
            measure(args, format, addr).await
        }
        None => in_process_run(args, format).await,
    }
}

async fn in_process_run(args: &Args, format: Format) -> anyhow::Result<Summary> {
    let bench = BenchServer::start().await?;
    let summary = measure(args, format, bench.server.addr()).await;
    bench.server.shutdown().await?;
    summary
}

/// One run against the server at `addr`: a fresh session, its clients, the events.
async fn measure(
    args: &Args,
    format: Format,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Summary> {
    let api = Api::new(format!("http://{addr}"));
    let presenter = api.started_session().await;

    let mut tokens = Vec::with_capacity(args.participants + 1);
    tokens.push(presenter.token.clone());
    for chunk in (0..args.participants).collect::<Vec<_>>().chunks(100) {
        let joined = futures::future::join_all(chunk.iter().map(|i| {
            let (api, code) = (api.clone(), presenter.code.clone());
            async move { api.join(&code, &format!("p{i}")).await.token }
        }))
        .await;
        tokens.extend(joined);
    }
    let expected = args.events;
    let mut readers = Vec::with_capacity(tokens.len());
    for token in &tokens {
        let mut client =
            WsClient::connect(addr, &query(&presenter.session_id, token, None, format)).await;
        client.expect("connection:established").await;
        readers.push(tokio::spawn(async move {
            let mut lags = Vec::with_capacity(expected);
            while lags.len() < expected {
                let frame = client.envelope().await;
                if frame["eventType"] != "poll:created" {
                    continue;
                }
                let at: pollcast_protocol::Timestamp =
                    serde_json::from_value(frame["timestamp"].clone()).expect("timestamp");
                lags.push(now_millis() - at.unix_millis() as f64);
            }
            lags
        }));
    }

    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut tick = tokio::time::interval(interval);
    let mut commits = Vec::with_capacity(args.events);
    let path = format!("/api/sessions/{}/polls", presenter.session_id);
    for i in 0..args.events {
        tick.tick().await;
        let started = Instant::now();
        let body = json!({ "question": format!("Question {i}?"), "options": ["A", "B", "C"] });
        api.post(&path, Some(&presenter.token), body)
            .await
            .expect(201);
        commits.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut deliveries = Vec::with_capacity(tokens.len() * args.events);
    for reader in readers {
        deliveries.extend(reader.await?);
    }
    Ok(Summary {
        samples: deliveries.len(),
        delivery: Percentiles::of(deliveries),
        commit: Percentiles::of(commits),
    })
}
