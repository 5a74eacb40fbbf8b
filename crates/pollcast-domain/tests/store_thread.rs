//! On SQLite, with two CPUs or more, the batch tasks' thread and the thread sqlx
//! runs the SQLite connection on share one CPU, and nothing else is pinned (the
//! domain's `store_thread` says why). Its own process: the threads are found by
//! name, as the domain finds sqlx's.

use std::sync::Arc;
use std::time::Duration;

use pollcast_domain::{Domain, DomainConfig, TokenKeys};
use pollcast_stream::EmbeddedStream;

/// The CPUs a `status` file of /proc says its process or thread may use.
fn cpus_allowed(status: &std::path::Path) -> String {
    std::fs::read_to_string(status)
        .expect("status")
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_owned()
}

/// (name, allowed CPUs) of every thread of this process.
fn threads() -> Vec<(String, String)> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .map(|task| {
            let path = task.expect("task").path();
            let name = std::fs::read_to_string(path.join("comm")).expect("comm");
            (name.trim().to_owned(), cpus_allowed(&path.join("status")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlites_thread_is_pinned_beside_the_batch_tasks_thread() {
    let process = cpus_allowed(std::path::Path::new("/proc/self/status"));
    let db = pollcast_store::connect("sqlite::memory:", Default::default())
        .await
        .expect("in-memory database");
    let keys = TokenKeys::new(b"store thread test", Duration::from_secs(60));
    let _domain = Domain::new(
        db,
        Arc::new(EmbeddedStream::default()),
        keys,
        DomainConfig::default(),
    );
    let threads = threads();
    let of = |name: &str| -> Vec<&String> {
        threads
            .iter()
            .filter(|(n, _)| n.starts_with(name))
            .map(|(_, cpus)| cpus)
            .collect()
    };
    let store = of("pollcast-store");
    if !process.contains(['-', ',']) {
        // One CPU: nothing to gain, no thread.
        assert!(store.is_empty(), "{threads:?}");
        return;
    }
    assert_eq!(store.len(), 1, "{threads:?}");
    let cpu = store[0];
    assert!(
        cpu.parse::<usize>().is_ok(),
        "store thread on {cpu}: {threads:?}"
    );
    let sqlite = of("sqlx-sqlite-wor");
    assert!(
        !sqlite.is_empty(),
        "no thread named as sqlx names a SQLite connection's: {threads:?}"
    );
    assert!(sqlite.iter().all(|cpus| *cpus == cpu), "{threads:?}");
    let workers = of("tokio-rt-worker");
    assert!(!workers.is_empty(), "{threads:?}");
    assert!(workers.iter().all(|cpus| **cpus == process), "{threads:?}");
}
