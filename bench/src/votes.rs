//! Write-path benchmark: the REST round trip of a vote, from request to `201`.
//!
//! Each vote is one session transaction (lock, checks, insert, outbox) plus the
//! HTTP and JSON work around it. `--participants` join, then vote once each with
//! `--concurrency` requests in flight, on a fresh in-process server (SQLite,
//! embedded stream) per run. Loopback only; bounded by the participant count.

use std::time::{Duration, Instant};

use clap::Parser;
use pollcast_bench::{BenchServer, Percentiles, median};
use pollcast_tests::Api;
use pollcast_tests::client::{id_of, option_id};

#[derive(Parser, Debug)]
#[command(about = "pollcast vote latency benchmark (loopback only)")]
struct Args {
    /// Voters (one vote each) per run.
    #[arg(long, default_value_t = 2000)]
    participants: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Runs, each on a fresh server.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// SQLite's `synchronous` setting: `full` (the default) or `normal`.
    #[arg(long, default_value = "full")]
    sqlite_synchronous: String,
}

const RUN_LIMIT: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "votes: {} voters, {} in flight, {} runs",
        args.participants, args.concurrency, args.runs
    );
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        let (latency, rate) = tokio::time::timeout(RUN_LIMIT, one_run(&args))
            .await
            .map_err(|_| anyhow::anyhow!("run {run} exceeded {RUN_LIMIT:?}"))??;
        println!(
            "run {run}: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {rate:.0} votes/s",
            latency.p50, latency.p95, latency.p99, latency.max
        );
        p50s.push(latency.p50);
        p99s.push(latency.p99);
        rates.push(rate);
    }
    println!(
        "median of {} runs: p50 {:.2} ms, p99 {:.2} ms, {:.0} votes/s",
        args.runs,
        median(p50s),
        median(p99s),
        median(rates)
    );
    Ok(())
}

async fn one_run(args: &Args) -> anyhow::Result<(Percentiles, f64)> {
    let sync = match args.sqlite_synchronous.as_str() {
        "full" => pollcast_store::SqliteSync::Full,
        "normal" => pollcast_store::SqliteSync::Normal,
        other => anyhow::bail!("--sqlite-synchronous is full or normal, not {other}"),
    };
    let bench = BenchServer::start_with(sync).await?;
    let api = Api::new(format!("http://{}", bench.server.addr()));
    let presenter = api.started_session().await;
    let poll = api.active_poll(&presenter).await;
    let (poll_id, option) = (id_of(&poll), option_id(&poll, 0));
    let mut tokens = Vec::with_capacity(args.participants);
    for i in 0..args.participants {
        tokens.push(api.join(&presenter.code, &format!("v{i}")).await.token);
    }
    let started = Instant::now();
    let lanes = args.concurrency.max(1);
    let mut handles = Vec::with_capacity(lanes);
    for lane in 0..lanes {
        let mine: Vec<String> = tokens.iter().skip(lane).step_by(lanes).cloned().collect();
        let (api, poll_id, option) = (api.clone(), poll_id.clone(), option.clone());
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(mine.len());
            for token in mine {
                let sent = Instant::now();
                api.vote(&poll_id, &token, &[&option]).await.expect(201);
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(tokens.len());
    for handle in handles {
        latencies.extend(handle.await?);
    }
    let rate = tokens.len() as f64 / started.elapsed().as_secs_f64();
    bench.server.shutdown().await?;
    Ok((Percentiles::of(latencies), rate))
}
