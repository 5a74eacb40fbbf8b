//! `publish-runs` (the atomic batches' figures in `docs/benchmarks.md`), run small
//! against the nats-server it starts: every run length measured both ways.

use std::process::Command;

#[test]
fn publish_runs_measures_every_run_length_both_ways() {
    let output = Command::new(env!("CARGO_BIN_EXE_publish-runs"))
        .args([
            "--events",
            "64",
            "--runs",
            "2,64",
            "--rounds",
            "1",
            "--sessions",
            "2",
        ])
        .output()
        .expect("publish-runs runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "publish-runs failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for run in ["2", "64"] {
        let row = stdout
            .lines()
            .find(|line| line.starts_with(&format!("| {run} |")))
            .unwrap_or_else(|| panic!("no row for {run}: {stdout}"));
        // Two cells (one per ack, batched), each a wall time and a CPU figure.
        assert_eq!(row.matches("µs").count(), 4, "{row}");
    }
}
