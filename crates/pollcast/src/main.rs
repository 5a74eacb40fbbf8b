//! The `pollcast` command: parses configuration, starts the server, waits for
//! SIGINT/SIGTERM and shuts down gracefully.

use anyhow::Context;
use clap::Parser;
use pollcast::config::{Command, Config, Role, ServeArgs, StoreArgs};
use pollcast::{ApiSettings, Server, Settings};
use pollcast_domain::TokenKeys;
use tracing_subscriber::EnvFilter;

/// mimalloc, not glibc's malloc: the vote path allocates and frees small objects
/// across threads, and glibc spent 16 % of its samples there (measurements in
/// `docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads start allocating.
    refuse_transparent_huge_pages();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // stderr, as the README says: stdout stays free for command output.
        .with_writer(std::io::stderr)
        // Colours for people at a terminal, not for log files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_env("POLLCAST_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match Config::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate(args) => migrate(args).await,
    }
}

/// Turns transparent huge pages off for this process. mimalloc asks for them
/// (`MADV_HUGEPAGE`) on the memory it reserves, and a 2 MiB page is then
/// resident as soon as one byte of it is touched: at 10 000 idle connections that
/// was 1.5 KiB more per connection and 12 MiB more at rest, for no measurable
/// CPU gain (docs/benchmarks.md, "Memory"). The kernel applies it to every later
/// page fault in the process, whichever thread takes it.
fn refuse_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        // Only memory is at stake: say so and carry on.
        eprintln!("pollcast: could not turn transparent huge pages off: {error}");
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    args.validate()?;
    let metrics = pollcast::telemetry::install(args.region.as_deref())
        .context("installing the metrics recorder")?;
    tokio::spawn(pollcast::telemetry::upkeep(metrics.clone()));
    let keys = TokenKeys::new(&args.secret()?, args.token_lifetime());
    let stream_config = args.stream.stream_config(args.role != Role::Edge);
    let api = match args.role {
        Role::Edge => None,
        Role::Api | Role::All => Some(ApiSettings {
            database_url: args.store.database_url()?,
            store: args.store.options(),
            domain: args.domain_config(),
            rate_limits: args.rate_limits(),
            cors_origins: args.cors_origins.clone(),
            single_node: stream_config.is_embedded(),
        }),
    };
    let edge = (args.role != Role::Api).then(|| {
        let mut edge = args.edge_config();
        edge.max_connections = pollcast::open_files::websocket_budget(
            edge.max_connections,
            args.store.db_max_connections,
        );
        edge
    });
    let listener =
        pollcast::listen(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let stream = pollcast_stream::connect(&stream_config)
        .await
        .context("connecting to the event stream")?;
    let settings = Settings {
        keys,
        api,
        edge,
        metrics: Some(metrics),
        http: args.http_timeouts(),
    };
    let server = Server::start(listener, settings, stream).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn migrate(args: StoreArgs) -> anyhow::Result<()> {
    pollcast_store::connect(&args.database_url()?, args.options())
        .await
        .context("migrating the database")?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
