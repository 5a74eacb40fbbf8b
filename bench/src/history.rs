//! What reading a session's history from a position costs on the JetStream engine
//! (the replay a reconnecting client asks for), deep in a long session whose
//! events are interleaved with another session's. Starts its own nats-server
//! (loopback only, bounded by `--events`).
//!
//! Reports the time of `read_after(position, limit)` from positions spread over the
//! session (p50, p99, max), for a one-event read (finding the start is all the
//! work) and a 100-event page.

use std::time::Instant;

use clap::Parser;
use pollcast_bench::Percentiles;
use pollcast_stream::conformance::event;
use pollcast_stream::{EventStream, JetStreamStream, NatsConfig, Retention};
use pollcast_tests::nats::NatsServer;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "Cost of reading a long session's history from a position on JetStream")]
struct Args {
    /// Events in the measured session (at most 200 000).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=200_000))]
    events: u64,
    /// Reads per page size.
    #[arg(long, default_value_t = 200)]
    reads: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = NatsServer::start();
    let stream = JetStreamStream::connect(
        NatsConfig {
            urls: vec![server.url()],
            ..NatsConfig::default()
        },
        Retention {
            max_events: 200_000,
            ..Retention::default()
        },
    )
    .await?;
    let (session, other) = (Uuid::now_v7(), Uuid::now_v7());
    let started = Instant::now();
    let mut other_position = 0;
    for p in 1..=args.events {
        stream.publish(event(session, p)).await?;
        // Another session's events in uneven bursts between ours.
        if p % 5 < 2 || (p / 1000) % 7 == 3 {
            other_position += 1;
            stream.publish(event(other, other_position)).await?;
        }
    }
    println!(
        "published {} + {other_position} events in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );
    for limit in [1usize, 100] {
        let mut times = Vec::new();
        for i in 0..args.reads {
            // Positions spread over the whole session, pseudo-randomly.
            let after = (i * 7919) % (args.events - 1);
            let t = Instant::now();
            let read = stream.read_after(session, after, limit).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(read.events.first().map(|e| e.position) == Some(after + 1));
            anyhow::ensure!(read.events.len() == limit.min((args.events - after) as usize));
        }
        let p = Percentiles::of(times);
        println!(
            "read_after(limit {limit}) from {} positions: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            args.reads, p.p50, p.p99, p.max
        );
        println!(
            "{}",
            serde_json::json!({"events": args.events, "limit": limit, "reads": args.reads,
                "ms": {"p50": p.p50, "p99": p.p99, "max": p.max}})
        );
    }
    Ok(())
}
