//! The load generator's scenarios, run small against a real server over real
//! sockets, so the tool behind `docs/benchmarks.md` keeps working: every room
//! connected and followed to its end with nothing lost or repeated, and the
//! exact-tally check of `ingest`.

use std::process::Command;

use pollcast_api::RateLimitConfig;
use pollcast_tests::server::Options;
use pollcast_tests::{Backend, TestServer};
use serde_json::Value;

/// Runs `loadgen` against the server with the scenario's arguments; returns
/// its JSON line.
fn loadgen(t: &TestServer, scenario: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("--url")
        .arg(t.api.base())
        .args(scenario)
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"))
}

async fn server() -> TestServer {
    TestServer::start_with(
        Backend::Sqlite,
        Options {
            rate_limits: RateLimitConfig::OFF,
            ..Options::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_counts_every_room_and_loses_nothing() {
    let t = server().await;
    let report = tokio::task::block_in_place(|| {
        loadgen(
            &t,
            &[
                "rooms",
                "--rooms",
                "3",
                "--participants",
                "4",
                "--votes-per-sec",
                "40",
                "--seconds",
                "2",
            ],
        )
    });
    assert_eq!(report["scenario"], "rooms");
    assert_eq!(report["rooms"], 3);
    assert_eq!(report["clients"], 12);
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert_eq!(report["failed_connections"], 0, "{report}");
    // 40 votes a second for 2 s, to the rooms in turn; a room's poll rotates
    // after its four voters (a vote still in flight at a rotation may meet the
    // closed poll, so not every vote need be accepted).
    assert_eq!(report["votes_scheduled"], 80, "{report}");
    assert!(report["votes_sent"].as_u64() >= Some(72), "{report}");
    assert!(report["votes_accepted"].as_u64() >= Some(40), "{report}");
    assert!(
        report["deliveries_per_sec"].as_f64() > Some(0.0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_checks_the_tally_against_the_votes_accepted() {
    let t = server().await;
    let report = tokio::task::block_in_place(|| {
        loadgen(&t, &["ingest", "--voters", "60", "--concurrency", "8"])
    });
    assert_eq!(report["votes_accepted"], 60, "{report}");
    assert_eq!(report["tally_exact"], true, "{report}");
}
