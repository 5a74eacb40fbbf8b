//! How an edge should follow its rooms on JetStream, measured: what opening
//! `--rooms` rooms costs with each way of consuming, on a standalone nats-server
//! and on a three-node cluster started for the run (loopback only, bounded).
//!
//! - `core`: a core NATS subscription per room (what pollcast does; history and
//!   gaps come from Direct Get);
//! - `ordered`: an ordered (ephemeral, R1) consumer per room, filtered on the
//!   room's subject;
//! - `durable`: a durable pull consumer per room.
//!
//! Reported: time to open all rooms, per-room open latency (p50, p99, max), and the
//! servers' resident memory before and after. One JSON line per run follows the
//! human summary.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use clap::{Parser, ValueEnum};
use pollcast_bench::Percentiles;
use pollcast_stream::{JetStreamStream, NatsConfig, Retention};
use pollcast_tests::nats::{NatsCluster, NatsServer};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    Core,
    Ordered,
    Durable,
}

#[derive(Parser, Debug)]
#[command(about = "Cost of following N rooms on JetStream, per consumption design")]
struct Args {
    /// How rooms are followed.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Rooms to open (at most 20 000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    rooms: u32,
    /// Run on a three-node cluster with an R3 stream instead of one server.
    #[arg(long)]
    cluster: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (single, cluster) = if args.cluster {
        (None, Some(NatsCluster::start()))
    } else {
        (Some(NatsServer::start()), None)
    };
    let servers: Vec<&NatsServer> = match (&single, &cluster) {
        (Some(s), _) => vec![s],
        (_, Some(c)) => c.nodes.iter().collect(),
        _ => unreachable!("one of the two"),
    };
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let config = NatsConfig {
        urls: urls.clone(),
        replicas: servers.len(),
        ..NatsConfig::default()
    };
    // The engine creates the stream the way a deployment does.
    let _engine = JetStreamStream::connect(config.clone(), Retention::default()).await?;
    let client = async_nats::connect(urls.clone()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(&config.stream_name).await?;
    if args.mode != Mode::Core {
        // nats-server 2.15 allows 1 000 consumers per stream unless the stream sets
        // a (positive) limit of its own; -1 no longer means unlimited (error 10026).
        let mut lifted = stream.info().await?.config.clone();
        lifted.max_consumers = 20_000;
        js.update_stream(lifted).await?;
        stream = js.get_stream(&config.stream_name).await?;
    }
    let memory = || -> u64 { servers.iter().filter_map(|s| s.pid()).map(rss_kib).sum() };
    let before = memory();
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(args.rooms as usize);
    let mut keep_subscriptions = Vec::new();
    let mut keep_consumers = Vec::new();
    let mut opened = 0;
    for i in 0..args.rooms {
        if Instant::now() > deadline {
            break;
        }
        let subject = format!("{}.session.{}", config.subject_prefix, Uuid::now_v7());
        let t = Instant::now();
        let result: anyhow::Result<()> = async {
            match args.mode {
                Mode::Core => {
                    keep_subscriptions.push(client.subscribe(subject).await?);
                    // A subscription exists once the server has it: a round trip.
                    client.flush().await?;
                }
                Mode::Ordered => {
                    let consumer = stream
                        .create_consumer(pull::OrderedConfig {
                            filter_subject: subject,
                            deliver_policy: DeliverPolicy::New,
                            ..Default::default()
                        })
                        .await?;
                    keep_consumers.push(consumer.cached_info().name.clone());
                }
                Mode::Durable => {
                    let name = format!("room-{i}");
                    stream
                        .create_consumer(pull::Config {
                            durable_name: Some(name.clone()),
                            filter_subject: subject,
                            deliver_policy: DeliverPolicy::New,
                            ..Default::default()
                        })
                        .await?;
                    keep_consumers.push(name);
                }
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            println!("stopped after {opened} rooms: {err}");
            break;
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        opened += 1;
    }
    let total = started.elapsed();
    let after = memory();
    let p = Percentiles::of(latencies);
    let shape = if args.cluster {
        "3-node cluster, R3 stream"
    } else {
        "standalone"
    };
    println!(
        "{:?} on {shape}: {opened}/{} rooms in {:.2} s; open p50 {:.3} ms, p99 {:.3} ms, max {:.1} ms; \
         server RSS {} → {} MiB (+{:.1} KiB per room)",
        args.mode,
        args.rooms,
        total.as_secs_f64(),
        p.p50,
        p.p99,
        p.max,
        before / 1024,
        after / 1024,
        after.saturating_sub(before) as f64 / f64::from(opened.max(1)),
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": format!("{:?}", args.mode).to_lowercase(),
            "cluster": args.cluster,
            "rooms": opened,
            "seconds": total.as_secs_f64(),
            "open_ms": { "p50": p.p50, "p99": p.p99, "max": p.max },
            "server_rss_kib": { "before": before, "after": after },
        })
    );
    Ok(())
}
