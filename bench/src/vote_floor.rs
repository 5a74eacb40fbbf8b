//! The vote path's floor: what SQLite itself costs to commit a vote batch on this
//! machine, and what the server's way of driving it adds.
//!
//! Each run creates pollcast's schema (its own migrations) in a fresh file, seeds
//! one session with an active poll and a participant for every vote, then
//! commits `--batches` batches of `--votes` votes with the statements the
//! server's vote batch sends (`pollcast-domain`'s `vote_batch.rs` and `tx.rs`):
//! the session lock, the three reads, the writes as one command, the commit; in
//! WAL with `synchronous=FULL`, as the server runs. Two drivers, alternating
//! run by run:
//!
//! - `direct`: rusqlite on this thread, every statement prepared once. Only
//!   SQLite's own work and the commit's `fsync`: the floor.
//! - `sqlx`: the same statements and values through the server's own store
//!   (`pollcast_store::connect`: sea-orm over sqlx's pool), awaited one after
//!   another from a two-worker tokio runtime, as the batch task awaits them.
//!   Each is a round trip to the thread sqlx runs a SQLite connection on.
//!
//! The figure is the whole process's CPU time (user + system, `/proc/self/stat`)
//! over the batches, per batch and per vote, and each batch's wall time. The
//! tally is checked at the end of every run. Only a temporary file is written.

use std::time::Instant;

use clap::{Parser, ValueEnum};
use pollcast_bench::probe::proc_stat;
use pollcast_bench::{Percentiles, median};
use pollcast_store::{StoreOptions, connect};
use rusqlite::types::Value as Param;
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "the vote batch's SQLite floor on this machine, and what sqlx adds")]
struct Args {
    /// Votes per batch.
    #[arg(long, default_value_t = 1)]
    votes: usize,
    /// Batches committed per run.
    #[arg(long, default_value_t = 2000)]
    batches: usize,
    /// Runs of each driver, alternating.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only this driver (both by default).
    #[arg(long)]
    driver: Option<Driver>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Driver {
    Direct,
    Sqlx,
}

/// One statement with its values, as the server would send it.
struct Sql {
    text: String,
    values: Vec<Param>,
}

/// What was seeded: the ids a batch refers to.
struct Seed {
    session: Param,
    poll: Param,
    options: Vec<Uuid>,
    participants: Vec<Param>,
}

/// One run's figures.
struct Run {
    votes_stored: i64,
    cpu_us_per_batch: f64,
    batch_ms: Percentiles,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.votes > 0 && args.batches > 0 && args.runs > 0,
        "--votes, --batches and --runs must be > 0"
    );
    let drivers = match args.driver {
        Some(driver) => vec![driver],
        None => vec![Driver::Direct, Driver::Sqlx],
    };
    println!(
        "vote-floor: {} batches of {} vote(s) per run, {} run(s) per driver",
        args.batches, args.votes, args.runs
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut results: Vec<(Driver, Vec<Run>)> = drivers.iter().map(|d| (*d, Vec::new())).collect();
    for run in 1..=args.runs {
        for (driver, runs) in &mut results {
            let figures = one_run(&runtime, &args, *driver)?;
            println!(
                "run {run} {driver:?}: {:.0} µs of CPU per batch, {:.1} per vote; \
                 batch wall time p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                figures.cpu_us_per_batch,
                figures.cpu_us_per_batch / args.votes as f64,
                figures.batch_ms.p50,
                figures.batch_ms.p99,
                figures.batch_ms.max,
            );
            println!(
                "{}",
                serde_json::json!({
                    "scenario": "vote-floor",
                    "driver": format!("{driver:?}").to_lowercase(),
                    "votes_per_batch": args.votes,
                    "batches": args.batches,
                    "votes_stored": figures.votes_stored,
                    "cpu_us_per_batch": figures.cpu_us_per_batch,
                    "cpu_us_per_vote": figures.cpu_us_per_batch / args.votes as f64,
                    "batch_ms": {
                        "p50": figures.batch_ms.p50,
                        "p99": figures.batch_ms.p99,
                        "max": figures.batch_ms.max,
                    },
                })
            );
            runs.push(figures);
        }
    }
    for (driver, runs) in &results {
        let cpu = median(runs.iter().map(|r| r.cpu_us_per_batch).collect());
        println!(
            "median of {} {driver:?} runs: {cpu:.0} µs of CPU per batch of {}, {:.1} per vote, \
             batch wall time p50 {:.2} ms",
            runs.len(),
            args.votes,
            cpu / args.votes as f64,
            median(runs.iter().map(|r| r.batch_ms.p50).collect()),
        );
    }
    Ok(())
}

fn one_run(runtime: &tokio::runtime::Runtime, args: &Args, driver: Driver) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("floor.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    // The server's schema, by the server's migrations.
    runtime.block_on(async { connect(&url, StoreOptions::default()).await?.close().await })?;
    let mut conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
    )?;
    let seed = seed(&mut conn, args.votes * args.batches)?;
    let batches: Vec<Vec<Sql>> = seed
        .participants
        .chunks(args.votes)
        .enumerate()
        .map(|(i, voters)| batch(&seed, voters, (i * args.votes) as i64))
        .collect();
    let mut wall = Vec::with_capacity(batches.len());
    let before = proc_stat("self")?;
    match driver {
        Driver::Direct => {
            for statements in &batches {
                let start = Instant::now();
                direct(&conn, statements)?;
                wall.push(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Driver::Sqlx => runtime.block_on(async {
            let db = connect(&url, StoreOptions::default()).await?;
            for statements in &batches {
                let start = Instant::now();
                through_sqlx(&db, statements).await?;
                wall.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            db.close().await?;
            anyhow::Ok(())
        })?,
    }
    let after = proc_stat("self")?;
    // Every vote counted once, whichever driver wrote it.
    let (votes, total): (i64, i64) = conn.query_row(
        "SELECT (SELECT count(*) FROM votes), (SELECT total_votes FROM polls)",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let expected = (args.votes * args.batches) as i64;
    anyhow::ensure!(
        votes == expected && total == expected,
        "{driver:?}: {votes} votes stored and {total} counted, {expected} cast"
    );
    Ok(Run {
        votes_stored: votes,
        cpu_us_per_batch: (after.cpu_seconds - before.cpu_seconds) * 1e6 / args.batches as f64,
        batch_ms: Percentiles::of(wall),
    })
}

fn id() -> Uuid {
    Uuid::now_v7()
}

fn blob(id: Uuid) -> Param {
    // How sqlx stores a `Uuid` in SQLite: its 16 bytes.
    Param::Blob(id.as_bytes().to_vec())
}

fn now() -> Param {
    Param::Text("2026-11-29T08:21:52.709+00:00".to_owned())
}

/// One session, live, with one active three-option poll and `voters` participants.
fn seed(conn: &mut rusqlite::Connection, voters: usize) -> anyhow::Result<Seed> {
    let session = blob(id());
    let poll = blob(id());
    let options = vec![id(), id(), id()];
    let option_list = serde_json::to_string(
        &options
            .iter()
            .zip(["A", "B", "C"])
            .map(|(id, text)| serde_json::json!({"id": id, "text": text}))
            .collect::<Vec<_>>(),
    )?;
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO sessions (id, code, title, status, created_at, started_at, \
         participant_count, poll_count) VALUES (?1, 'FLOOR1', 'Floor', 'live', ?2, ?2, ?3, 1)",
        rusqlite::params![session, now(), voters as i64],
    )?;
    tx.execute(
        "INSERT INTO polls (id, session_id, question, kind, max_choices, status, options, \
         created_at, activated_at) VALUES (?1, ?2, 'Best talk?', 'single', 1, 'active', ?3, ?4, ?4)",
        rusqlite::params![poll, session, option_list, now()],
    )?;
    let mut participants = Vec::with_capacity(voters);
    {
        let mut insert = tx.prepare(
            "INSERT INTO participants (id, session_id, display_name, joined_at, last_seen_at) \
             VALUES (?1, ?2, 'voter', ?3, ?3)",
        )?;
        for _ in 0..voters {
            let participant = blob(id());
            insert.execute(rusqlite::params![participant, session, now()])?;
            participants.push(participant);
        }
    }
    tx.commit()?;
    Ok(Seed {
        session,
        poll,
        options,
        participants,
    })
}

/// `n` placeholders, comma-separated.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The statements of one batch, in the order and shape the server sends them:
/// the lock, three reads, and the writes (one command on SQLite). `position` is
/// the session's last event position before the batch.
fn batch(seed: &Seed, voters: &[Param], position: i64) -> Vec<Sql> {
    let n = voters.len();
    let mut votes = Vec::new();
    let mut choices = Vec::new();
    let mut outbox = Vec::new();
    let mut tallies = [0i64; 3];
    for (i, voter) in voters.iter().enumerate() {
        let vote = id();
        let option = seed.options[i % seed.options.len()];
        tallies[i % seed.options.len()] += 1;
        votes.extend([
            blob(vote),
            seed.poll.clone(),
            voter.clone(),
            Param::Text(format!("[\"{option}\"]")),
            now(),
        ]);
        choices.extend([blob(vote), blob(option), seed.poll.clone()]);
        // A `vote:accepted` payload of the server's size.
        let payload = serde_json::json!({
            "eventType": "vote:accepted",
            "payload": {"vote": {"id": vote, "pollId": Uuid::nil(), "participantId": Uuid::nil(),
                "optionIds": [option], "createdAt": "2026-11-29T08:21:52.709Z"}},
        });
        outbox.extend([
            seed.session.clone(),
            Param::Integer(position + 1 + i as i64),
            Param::Text("vote:accepted".to_owned()),
            Param::Text(payload.to_string()),
            now(),
            Param::Null,
        ]);
    }
    let chosen: Vec<(usize, i64)> = tallies
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, votes)| *votes > 0)
        .collect();
    let mut tally_values = Vec::new();
    for (option, votes) in &chosen {
        tally_values.extend([
            seed.poll.clone(),
            blob(seed.options[*option]),
            Param::Integer(*votes),
        ]);
    }
    let rows = |n: usize, columns: usize| vec![format!("({})", marks(columns)); n].join(", ");
    let writes = [
        Sql {
            text: format!(
                "INSERT INTO \"votes\" (\"id\", \"poll_id\", \"participant_id\", \"option_ids\", \
                 \"created_at\") VALUES {}",
                rows(n, 5)
            ),
            values: votes,
        },
        Sql {
            text: format!(
                "INSERT INTO \"vote_choices\" (\"vote_id\", \"option_id\", \"poll_id\") VALUES {}",
                rows(n, 3)
            ),
            values: choices,
        },
        Sql {
            text: "UPDATE \"polls\" SET \"total_votes\" = \"total_votes\" + (CASE WHEN \
                   (\"polls\".\"id\" = ?) THEN ? ELSE ? END) WHERE \"polls\".\"id\" IN (?)"
                .to_owned(),
            values: vec![
                seed.poll.clone(),
                Param::Integer(n as i64),
                Param::Integer(0),
                seed.poll.clone(),
            ],
        },
        Sql {
            text: format!(
                "INSERT INTO \"option_tallies\" (\"poll_id\", \"option_id\", \"votes\") VALUES {} \
                 ON CONFLICT (\"poll_id\", \"option_id\") DO UPDATE SET \"votes\" = \
                 \"option_tallies\".\"votes\" + \"excluded\".\"votes\"",
                rows(chosen.len(), 3)
            ),
            values: tally_values,
        },
        Sql {
            text:
                "UPDATE \"sessions\" SET \"last_position\" = (CASE WHEN (\"sessions\".\"id\" = ?) \
                   THEN ? ELSE \"last_position\" END) WHERE \"sessions\".\"id\" IN (?)"
                    .to_owned(),
            values: vec![
                seed.session.clone(),
                Param::Integer(position + n as i64),
                seed.session.clone(),
            ],
        },
        Sql {
            text: format!(
                "INSERT INTO \"outbox\" (\"session_id\", \"position\", \"event_type\", \"payload\", \
                 \"occurred_at\", \"published_at\") VALUES {}",
                rows(n, 6)
            ),
            values: outbox,
        },
    ];
    let mut combined = Sql {
        text: String::new(),
        values: Vec::new(),
    };
    for write in writes {
        combined.text.push_str(&write.text);
        combined.text.push_str(";\n");
        combined.values.extend(write.values);
    }
    vec![
        Sql {
            text: "UPDATE \"sessions\" SET \"last_position\" = \"last_position\" WHERE \
                   \"sessions\".\"id\" IN (?) RETURNING \"id\", \"code\", \"title\", \"status\", \
                   \"created_at\", \"started_at\", \"ended_at\", \"active_poll_id\", \
                   \"last_position\", \"poll_count\", \"participant_count\""
                .to_owned(),
            values: vec![seed.session.clone()],
        },
        Sql {
            text: "SELECT \"polls\".\"id\", \"polls\".\"status\" FROM \"polls\" WHERE \
                   \"polls\".\"id\" IN (?)"
                .to_owned(),
            values: vec![seed.poll.clone()],
        },
        Sql {
            text: format!(
                "SELECT \"participants\".\"id\", \"participants\".\"session_id\" FROM \
                 \"participants\" WHERE \"participants\".\"id\" IN ({})",
                marks(n)
            ),
            values: voters.to_vec(),
        },
        Sql {
            text: format!(
                "SELECT \"votes\".\"poll_id\", \"votes\".\"participant_id\" FROM \"votes\" WHERE \
                 \"votes\".\"poll_id\" IN (?) AND \"votes\".\"participant_id\" IN ({})",
                marks(n)
            ),
            values: std::iter::once(seed.poll.clone())
                .chain(voters.iter().cloned())
                .collect(),
        },
        combined,
    ]
}

/// Runs one batch with rusqlite on this thread: the floor. The combined writes
/// are split back into their statements, as SQLite runs them anyway.
fn direct(conn: &rusqlite::Connection, statements: &[Sql]) -> anyhow::Result<()> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let (writes, reads) = statements
        .split_last()
        .ok_or_else(|| anyhow::anyhow!("empty"))?;
    for read in reads {
        let mut statement = conn.prepare_cached(&read.text)?;
        let mut rows = statement.query(rusqlite::params_from_iter(&read.values))?;
        // Read what the server reads: every row's first column.
        while let Some(row) = rows.next()? {
            let _: rusqlite::types::Value = row.get(0)?;
        }
    }
    let mut values = writes.values.iter();
    for text in writes.text.split(";\n").filter(|s| !s.is_empty()) {
        let mut statement = conn.prepare_cached(text)?;
        let count = statement.parameter_count();
        statement.execute(rusqlite::params_from_iter(values.by_ref().take(count)))?;
    }
    conn.prepare_cached("COMMIT")?.execute([])?;
    Ok(())
}

fn sea_value(param: &Param) -> sea_orm::Value {
    match param {
        Param::Null => sea_orm::Value::String(None),
        Param::Integer(i) => (*i).into(),
        Param::Real(f) => (*f).into(),
        Param::Text(s) => s.clone().into(),
        Param::Blob(b) => b.clone().into(),
    }
}

/// Runs one batch as the server's batch task does: a transaction from the pool,
/// each statement awaited in turn.
async fn through_sqlx(db: &sea_orm::DatabaseConnection, statements: &[Sql]) -> anyhow::Result<()> {
    let txn = db.begin().await?;
    let (writes, reads) = statements
        .split_last()
        .ok_or_else(|| anyhow::anyhow!("empty"))?;
    let statement = |sql: &Sql| {
        Statement::from_sql_and_values(
            DbBackend::Sqlite,
            sql.text.clone(),
            sql.values.iter().map(sea_value),
        )
    };
    for read in reads {
        for row in txn.query_all_raw(statement(read)).await? {
            let _: Vec<u8> = row.try_get_by_index(0)?;
        }
    }
    txn.execute_raw(statement(writes)).await?;
    txn.commit().await?;
    Ok(())
}
