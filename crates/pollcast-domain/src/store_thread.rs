//! On SQLite, the batch tasks run on a thread of their own, on the same CPU as the
//! thread sqlx runs the SQLite connection on.
//!
//! sqlx drives a SQLite connection from a thread of its own, and every statement
//! is a round trip to that thread and back. When the task awaiting the answer
//! runs on another CPU, each trip wakes an idle CPU twice, and on a virtual
//! machine waking a CPU (an inter-processor interrupt, an exit to the
//! hypervisor) costs more than the statement. The vote batch's own statements,
//! sent as the batch task sends them, cost 440–900 µs of CPU per batch of one
//! across two CPUs and about 250 µs with both threads on one CPU
//! (`docs/benchmarks.md`, "The vote path's floor"). So the vote and results batch
//! tasks run on a current-thread runtime on this thread, and this thread and
//! sqlx's are pinned to one CPU, where a trip is two context switches on that
//! CPU. Nothing else is pinned: the edge, HTTP and the relay keep every CPU.
//!
//! sqlx starts the connection's thread itself, so it is found by the name sqlx
//! gives it. Should sqlx rename it, nothing is pinned and only speed is lost (a
//! test says so). The store keeps its one SQLite connection for the process's
//! life, so the thread found stays the one in use.

use rustix::thread::{CpuSet, Pid, sched_getaffinity, sched_setaffinity};
use tokio::sync::oneshot;

/// The start of the name sqlx gives a SQLite connection's thread
/// (`sqlx-sqlite-worker-N`), as the kernel keeps it (15 bytes).
const SQLX_SQLITE_THREAD: &str = "sqlx-sqlite-wor";

/// A thread running a current-thread runtime on one CPU; it stops when dropped.
pub(crate) struct StoreThread {
    runtime: tokio::runtime::Handle,
    cpu: CpuSet,
    stop: Option<oneshot::Sender<()>>,
}

impl StoreThread {
    /// Starts the thread on one of the CPUs this process may use, and pins
    /// sqlx's SQLite threads there. `None` when the process has one CPU (nothing
    /// to gain) or the thread cannot be started (the batch tasks then run on the
    /// caller's runtime, as they would on PostgreSQL).
    pub fn start() -> Option<Self> {
        let allowed = sched_getaffinity(None).ok()?;
        let count = usize::try_from(allowed.count()).ok()?;
        if count < 2 {
            return None;
        }
        // Several servers on one machine spread over its CPUs. Every store of one
        // process takes the same CPU: pinning finds sqlx's threads by name, so it
        // pins them all (a server has one store; a test process, many).
        let nth = std::process::id() as usize % count;
        let chosen = (0..CpuSet::MAX_CPU)
            .filter(|&cpu| allowed.is_set(cpu))
            .nth(nth)?;
        let mut cpu = CpuSet::new();
        cpu.set(chosen);
        let (started, runtime) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("pollcast-store".to_owned())
            .spawn(move || {
                if let Err(error) = sched_setaffinity(None, &cpu) {
                    tracing::debug!(%error, "store thread not pinned");
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::warn!(%error, "no store thread: its runtime did not start");
                        return;
                    }
                };
                if started.send(runtime.handle().clone()).is_ok() {
                    // Stopped, or its owner gone: either way, done. Tasks still on
                    // it are dropped with the runtime, here, outside any task.
                    let _ = runtime.block_on(stopped);
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no store thread");
            return None;
        }
        let runtime = runtime.recv().ok()?;
        let thread = Self {
            runtime,
            cpu,
            stop: Some(stop),
        };
        thread.pin_sqlite();
        Some(thread)
    }

    /// Where the batch tasks are spawned.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Pins every thread of the process that sqlx runs a SQLite connection on to
    /// this thread's CPU. Called at start and whenever a batch task starts, in
    /// case sqlx replaced its connection; a thread already pinned is pinned again,
    /// which costs a system call.
    pub fn pin_sqlite(&self) {
        for tid in sqlite_threads() {
            if let Err(error) = sched_setaffinity(Some(tid), &self.cpu) {
                tracing::debug!(%error, "sqlx's SQLite thread not pinned");
            }
        }
    }
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The ids of this process's threads that sqlx runs SQLite connections on.
fn sqlite_threads() -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if !comm.starts_with(SQLX_SQLITE_THREAD) {
                return None;
            }
            Pid::from_raw(task.file_name().to_str()?.parse().ok()?)
        })
        .collect()
}
