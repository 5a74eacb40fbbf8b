//! What publishing a session's waiting events costs on the JetStream engine, one
//! event per acknowledgement against one atomic batch per run, by run length.
//! Starts its own nats-server (file store, loopback only, bounded by `--events`).
//!
//! For each run length it publishes `--events` events as runs of that length,
//! `--sessions` sessions side by side (as the relay does), once with every run
//! as a batch and once one event at a time, alternating, `--rounds` times. It
//! reports the wall time and the nats-server's CPU per event, medians over the
//! rounds: what [`NatsConfig::batch_min`] trades.

use std::time::Instant;

use clap::Parser;
use futures::StreamExt;
use pollcast_bench::median;
use pollcast_bench::probe::proc_stat;
use pollcast_stream::conformance::event;
use pollcast_stream::{EventStream, JetStreamStream, NatsConfig, Retention};
use pollcast_tests::nats::NatsServer;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "JetStream publishing: one event per ack against atomic batches, by run length")]
struct Args {
    /// Events published per run length, way and round (at most 100 000).
    #[arg(long, default_value_t = 8_000, value_parser = clap::value_parser!(u64).range(64..=100_000))]
    events: u64,
    /// Run lengths to measure (each 1 to 1 000).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16,32,64,256",
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    runs: Vec<u64>,
    /// Sessions published side by side.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sessions: u64,
    /// Rounds (each: both ways, alternating).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

/// CPU seconds the nats-server has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(proc_stat(&pid.to_string())?.cpu_seconds)
}

async fn engine(server: &NatsServer, batch_min: usize) -> anyhow::Result<JetStreamStream> {
    let unique = Uuid::now_v7().simple().to_string();
    Ok(JetStreamStream::connect(
        NatsConfig {
            urls: vec![server.url()],
            stream_name: format!("B_{unique}"),
            subject_prefix: format!("b{unique}"),
            batch_min,
            ..NatsConfig::default()
        },
        Retention::default(),
    )
    .await?)
}

/// Publishes `events` events per session as runs of `run`, the sessions side by
/// side; returns (wall µs, nats-server CPU µs) per event.
async fn measure(
    stream: &JetStreamStream,
    pid: u32,
    events: u64,
    run: u64,
    sessions: u64,
) -> anyhow::Result<(f64, f64)> {
    let per_session = (events / sessions).max(run);
    let cpu = cpu_seconds(pid)?;
    let started = Instant::now();
    let published: Vec<usize> = futures::stream::iter(0..sessions)
        .map(|_| async move {
            let session = Uuid::now_v7();
            let mut taken = 0;
            let mut next = 1;
            while next <= per_session {
                let last = (next + run - 1).min(per_session);
                let outcome = stream
                    .publish_run((next..=last).map(|p| event(session, p)).collect())
                    .await;
                if let Some(err) = outcome.stopped {
                    anyhow::bail!("publish failed: {err}");
                }
                taken += outcome.taken;
                next = last + 1;
            }
            Ok(taken)
        })
        .buffer_unordered(usize::try_from(sessions)?)
        .collect::<Vec<anyhow::Result<usize>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu;
    let total = published.iter().sum::<usize>() as f64;
    anyhow::ensure!(total == (per_session * sessions) as f64, "events lost");
    Ok((wall * 1e6 / total, cpu * 1e6 / total))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = NatsServer::start();
    let pid = server
        .pid()
        .ok_or_else(|| anyhow::anyhow!("no nats-server pid"))?;
    let batched = engine(&server, 2).await?;
    let single = engine(&server, usize::MAX).await?;
    println!(
        "{} events per way and round, {} session(s) side by side, {} rounds; medians",
        args.events, args.sessions, args.rounds
    );
    println!(
        "| run length | one per ack: wall, server CPU per event | batched: wall, server CPU per event |"
    );
    println!("|---|---|---|");
    for &run in &args.runs {
        let (mut one, mut batch) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            one.push(measure(&single, pid, args.events, run, args.sessions).await?);
            batch.push(measure(&batched, pid, args.events, run, args.sessions).await?);
        }
        let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
        println!(
            "| {run} | {:.1} µs, {:.1} µs | {:.1} µs, {:.1} µs |",
            med(&one, |x| x.0),
            med(&one, |x| x.1),
            med(&batch, |x| x.0),
            med(&batch, |x| x.1),
        );
    }
    Ok(())
}
