//! The floor programs behind `docs/benchmarks.md`, run small. The fan-out's:
//! every frame of every round written, every byte of them read by its child
//! process, and the figures it prints taken from what it did. The vote path's:
//! every batch committed by both drivers, every vote stored and counted.

use std::process::Command;

use serde_json::Value;

#[test]
fn the_floor_writes_a_frame_to_every_socket_every_round() {
    let output = Command::new(env!("CARGO_BIN_EXE_floor"))
        .args(["--sockets", "50", "--interval-ms", "50", "--seconds", "1"])
        .args(["--writers", "2", "--runs", "1", "--frame-bytes", "300"])
        .output()
        .expect("floor runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "floor failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find(|line| line.starts_with('{'))
        .expect("a JSON line");
    let figures: Value = serde_json::from_str(line).expect("JSON");
    // 20 rounds of 50 ms in a second, one frame to each of 50 sockets.
    assert_eq!(figures["writes"], 1000, "{figures}");
    assert_eq!(figures["would_block"], 0, "{figures}");
    assert_eq!(figures["writers"], 2, "{figures}");
    let cpu = figures["cpu_us_per_write"].as_f64().expect("cpu");
    assert!(cpu > 0.0 && cpu < 10_000.0, "{figures}");
    let (p50, max) = (
        figures["write_delay_ms"]["p50"].as_f64().expect("p50"),
        figures["write_delay_ms"]["max"].as_f64().expect("max"),
    );
    assert!(
        p50 <= max && max <= figures["round_ms"]["max"].as_f64().expect("round"),
        "{figures}"
    );
}

#[test]
fn the_vote_floor_commits_every_batch_with_both_drivers() {
    let output = Command::new(env!("CARGO_BIN_EXE_vote-floor"))
        .args(["--votes", "3", "--batches", "20", "--runs", "1"])
        .output()
        .expect("vote-floor runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "vote-floor failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let runs: Vec<Value> = stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    let drivers: Vec<&str> = runs.iter().filter_map(|r| r["driver"].as_str()).collect();
    assert_eq!(drivers, ["direct", "sqlx"], "{stdout}");
    for run in &runs {
        assert_eq!(run["votes_stored"], 60, "{run}");
        assert_eq!(run["votes_per_batch"], 3, "{run}");
        let cpu = run["cpu_us_per_batch"].as_f64().expect("cpu");
        assert!((0.0..1_000_000.0).contains(&cpu), "{run}");
        let (p50, max) = (
            run["batch_ms"]["p50"].as_f64().expect("p50"),
            run["batch_ms"]["max"].as_f64().expect("max"),
        );
        assert!(0.0 < p50 && p50 <= max, "{run}");
    }
}
