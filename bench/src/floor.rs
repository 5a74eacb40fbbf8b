//! The fan-out floor: what one frame written to one loopback socket costs on this
//! machine when a program does nothing else.
//!
//! Opens `--sockets` TCP connections to itself on 127.0.0.1 and, every
//! `--interval-ms` for `--seconds`, writes one `--frame-bytes` frame (an unmasked
//! WebSocket text frame, as a server sends) to every one of them from
//! `--writers` threads, each owning its share of the sockets. Plain non-blocking
//! `write` system calls: no runtime, no queue, no wake-ups, no encoding. A child
//! process (this program again, with `--read`) holds the other ends and reads
//! them, as the load generator's clients would, so the kernel's receive path
//! runs as it does in a benchmark, and each process has its own descriptors.
//!
//! The figure is the writer threads' CPU time (from `/proc/thread-self/schedstat`,
//! nanoseconds on a CPU) divided by the frames written: the bound below which no
//! server's CPU per delivered frame can go here. On loopback the receiver's
//! side of TCP runs in the sender's system call, so the floor includes it, as
//! pollcast's figure does. Also printed: how long one round (one frame to every
//! socket) takes, which bounds how soon the last socket of a room can have an
//! event. Traffic stays on loopback; every run is bounded in time.

use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use pollcast_bench::{Percentiles, median};
use tokio::io::AsyncReadExt;

#[derive(Parser, Debug)]
#[command(about = "the bare-write floor of a fan-out on this machine (loopback only)")]
struct Args {
    /// Sockets written to, each once per round.
    #[arg(long, default_value_t = 2000)]
    sockets: usize,
    /// Bytes of each frame's payload.
    #[arg(long, default_value_t = 200)]
    frame_bytes: usize,
    /// Time between the starts of two rounds.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Length of a run.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Threads writing, each to its share of the sockets.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Runs, each with fresh sockets.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Internal: be the reading side, connecting `--sockets` times to this
    /// loopback address; prints the bytes read once every socket has closed.
    #[arg(long, hide = true)]
    read: Option<std::net::SocketAddr>,
}

/// One run's figures.
struct Run {
    writes: u64,
    would_block: u64,
    cpu_us_per_write: f64,
    /// Milliseconds from a round's start to its last write.
    rounds: Percentiles,
    /// Milliseconds from a round's start to each write: the least delay an
    /// event could have on its way to each client, were it committed at the
    /// round's start.
    delays: Percentiles,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.sockets > 0 && args.writers > 0,
        "--sockets and --writers must be > 0"
    );
    rlimit::increase_nofile_limit(u64::MAX)?;
    if let Some(addr) = args.read {
        anyhow::ensure!(addr.ip().is_loopback(), "loopback only");
        println!("{}", read_all(addr, args.sockets)?);
        return Ok(());
    }
    println!(
        "floor: {} sockets, {}-byte frames every {} ms for {} s, {} writer thread(s), {} runs",
        args.sockets, args.frame_bytes, args.interval_ms, args.seconds, args.writers, args.runs
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let figures = one_run(&args)?;
        println!(
            "run {run}: {} writes ({} would have blocked), {:.2} µs of writer CPU per write; \
             one round to every socket: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
             round start to a socket's write: p50 {:.1} ms, p99 {:.1} ms",
            figures.writes,
            figures.would_block,
            figures.cpu_us_per_write,
            figures.rounds.p50,
            figures.rounds.p99,
            figures.rounds.max,
            figures.delays.p50,
            figures.delays.p99,
        );
        println!(
            "{}",
            serde_json::json!({
                "scenario": "floor",
                "sockets": args.sockets,
                "frame_bytes": args.frame_bytes,
                "writers": args.writers,
                "writes": figures.writes,
                "would_block": figures.would_block,
                "cpu_us_per_write": figures.cpu_us_per_write,
                "round_ms": {
                    "p50": figures.rounds.p50,
                    "p99": figures.rounds.p99,
                    "max": figures.rounds.max,
                },
                "write_delay_ms": {
                    "p50": figures.delays.p50,
                    "p99": figures.delays.p99,
                    "max": figures.delays.max,
                },
            })
        );
        runs.push(figures);
    }
    println!(
        "median of {} runs: {:.2} µs per write, round p50 {:.1} ms, write delay p99 {:.1} ms",
        runs.len(),
        median(runs.iter().map(|r| r.cpu_us_per_write).collect()),
        median(runs.iter().map(|r| r.rounds.p50).collect()),
        median(runs.iter().map(|r| r.delays.p99).collect()),
    );
    Ok(())
}

fn one_run(args: &Args) -> anyhow::Result<Run> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    let sockets = args.sockets;
    let readers = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--read",
            &addr.to_string(),
            "--sockets",
            &sockets.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut accepted = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        accepted.push(stream);
    }
    let frame = Arc::new(text_frame(args.frame_bytes));
    let rounds = args.seconds * 1000 / args.interval_ms.max(1);
    let interval = Duration::from_millis(args.interval_ms);
    let share = sockets.div_ceil(args.writers);
    let mut shares: Vec<Vec<TcpStream>> = Vec::new();
    let mut accepted = accepted.into_iter().peekable();
    while accepted.peek().is_some() {
        shares.push(accepted.by_ref().take(share).collect());
    }
    // Every writer starts each round together; the round ends with the last.
    let barrier = Arc::new(Barrier::new(shares.len()));
    let writers: Vec<_> = shares
        .into_iter()
        .map(|mine| {
            let (frame, barrier) = (Arc::clone(&frame), Arc::clone(&barrier));
            std::thread::spawn(move || write_rounds(mine, &frame, rounds, interval, &barrier))
        })
        .collect();
    let (mut writes, mut would_block, mut cpu_ns) = (0, 0, 0);
    let mut round_ms = vec![0f64; usize::try_from(rounds)?];
    let mut delays = Vec::new();
    for writer in writers {
        let figures = writer
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        writes += figures.writes;
        would_block += figures.would_block;
        cpu_ns += figures.cpu_ns;
        for (slowest, ms) in round_ms.iter_mut().zip(figures.round_ms) {
            *slowest = slowest.max(ms);
        }
        delays.extend(
            figures
                .delays_us
                .into_iter()
                .map(|us| f64::from(us) / 1000.0),
        );
    }
    let output = readers.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "the reading process failed");
    let received: u64 = String::from_utf8(output.stdout)?.trim().parse()?;
    anyhow::ensure!(
        received == writes * frame.len() as u64,
        "the readers got {received} bytes of {} written",
        writes * frame.len() as u64
    );
    Ok(Run {
        writes,
        would_block,
        cpu_us_per_write: cpu_ns as f64 / 1000.0 / writes.max(1) as f64,
        rounds: Percentiles::of(round_ms),
        delays: Percentiles::of(delays),
    })
}

/// The reading side: `sockets` connections to `addr` on one thread, each read
/// until the writer closes it; returns the bytes read.
fn read_all(addr: std::net::SocketAddr, sockets: usize) -> anyhow::Result<u64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let mut tasks = Vec::with_capacity(sockets);
        for _ in 0..sockets {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut total = 0u64;
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    total += n as u64;
                }
                total
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await?;
        }
        Ok(total)
    })
}

/// What one writer thread did.
struct Written {
    writes: u64,
    would_block: u64,
    cpu_ns: u64,
    round_ms: Vec<f64>,
    /// Microseconds from the round's start to each write.
    delays_us: Vec<u32>,
}

fn write_rounds(
    mut sockets: Vec<TcpStream>,
    frame: &[u8],
    rounds: u64,
    interval: Duration,
    barrier: &Barrier,
) -> anyhow::Result<Written> {
    let mut written = Written {
        writes: 0,
        would_block: 0,
        cpu_ns: 0,
        round_ms: Vec::new(),
        delays_us: Vec::with_capacity(sockets.len() * usize::try_from(rounds)?),
    };
    let cpu_before = thread_cpu_ns()?;
    let start = Instant::now();
    for round in 0..rounds {
        barrier.wait();
        let begun = Instant::now();
        for socket in &mut sockets {
            match socket.write(frame) {
                // A partial write would split a frame; at these rates the
                // socket buffer never fills, and the check below would show it.
                Ok(n) if n == frame.len() => {
                    written.writes += 1;
                    let delay = begun.elapsed().as_micros();
                    written
                        .delays_us
                        .push(u32::try_from(delay).unwrap_or(u32::MAX));
                }
                Ok(_) => anyhow::bail!("a partial write"),
                Err(err) if err.kind() == ErrorKind::WouldBlock => written.would_block += 1,
                Err(err) => return Err(err.into()),
            }
        }
        written
            .round_ms
            .push(begun.elapsed().as_secs_f64() * 1000.0);
        let next = start + interval * u32::try_from(round + 1)?;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    written.cpu_ns = thread_cpu_ns()? - cpu_before;
    Ok(written)
}

/// An unmasked, final WebSocket text frame carrying `payload` bytes of `x`.
fn text_frame(payload: usize) -> Vec<u8> {
    let mut frame = vec![0x81];
    match payload {
        0..=125 => frame.push(payload as u8),
        126..=65_535 => {
            frame.push(126);
            frame.extend_from_slice(&(payload as u16).to_be_bytes());
        }
        _ => {
            frame.push(127);
            frame.extend_from_slice(&(payload as u64).to_be_bytes());
        }
    }
    frame.resize(frame.len() + payload, b'x');
    frame
}

/// Nanoseconds this thread has run on a CPU (the first field of its schedstat).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let first = stat.split_whitespace().next().unwrap_or_default();
    Ok(first.parse()?)
}
