//! Every nats-server configuration under `nats/` is one the current nats-server
//! accepts (`nats-server -t`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn configs(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read nats/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            configs(&path, found);
        } else if path.extension().is_some_and(|e| e == "conf") {
            found.push(path);
        }
    }
}

#[test]
fn every_config_under_nats_passes_nats_server_t() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats");
    let mut found = Vec::new();
    configs(&root, &mut found);
    assert!(
        found.len() >= 7,
        "dev.conf, three cluster nodes, three regions: {found:?}"
    );
    for config in found {
        let output = Command::new(pollcast_tests::nats::binary())
            .arg("-t")
            .arg("-c")
            .arg(&config)
            .output()
            .expect("nats-server runs");
        assert!(
            output.status.success(),
            "{}: {}{}",
            config.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
