//! One task per process that commits queued work in batches: the votes of every
//! session ([`crate::vote_batch`]) and the due `results:updated` of every poll
//! ([`crate::results`]). Work arrives spread over many sessions, and on SQLite
//! every write is serial anyway: a transaction per item would pay a commit and a
//! dozen statement round trips each; a batch pays them once.
//!
//! The task starts with the first item and ends after an idle interval, so an
//! idle domain holds no task (and no handle on its database).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::Domain;

/// Items that may wait for the task before senders wait to queue.
const QUEUE: usize = 4096;

/// The queue of a batch task, while one runs.
pub(crate) struct Batcher<T> {
    queue: Mutex<Option<mpsc::Sender<T>>>,
}

impl<T> Default for Batcher<T> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(None),
        }
    }
}

/// How a batch task finds its [`Batcher`] in the domain, and what it does.
pub(crate) struct Job<T: 'static, F> {
    /// Where the domain keeps the batcher.
    pub batcher: fn(&Domain) -> &Batcher<T>,
    /// Most items per batch.
    pub max: usize,
    /// Commits one batch.
    pub handle: F,
}

// By hand: a derive would ask `T: Copy`, and only the fields need to be.
impl<T, F: Copy> Clone for Job<T, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, F: Copy> Copy for Job<T, F> {}

impl<T: Send + 'static> Batcher<T> {
    fn queue(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<T>>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` for the running task, starting one when none runs. Drops
    /// `item` only when the runtime is shutting down and runs no new task.
    pub async fn send<F, Fut>(&self, domain: &Domain, job: Job<T, F>, mut item: T)
    where
        F: Fn(Domain, Vec<T>) -> Fut + Copy + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let mut started = None;
            let queue = self
                .queue()
                .get_or_insert_with(|| {
                    let (queue, items) = mpsc::channel(QUEUE);
                    let task = run(domain.clone(), job, items, queue.clone());
                    started = Some(match &domain.inner.store_thread {
                        Some(thread) => thread.runtime().spawn(task),
                        None => tokio::spawn(task),
                    });
                    queue
                })
                .clone();
            match queue.send(item).await {
                Ok(()) => return,
                // The task retired between our lookup and the send (or died):
                // forget its queue if it is still the one listed, and start again.
                Err(mpsc::error::SendError(back)) => {
                    {
                        let mut listed = self.queue();
                        if listed.as_ref().is_some_and(|q| q.same_channel(&queue)) {
                            *listed = None;
                        }
                    }
                    // A task we started that is cancelled before taking anything:
                    // the runtime is shutting down and cancels every new task, so
                    // starting another would spin for ever.
                    if let Some(started) = started
                        && started.await.is_err()
                    {
                        tracing::debug!("batch task not started: the runtime is shutting down");
                        return;
                    }
                    item = back;
                }
            }
        }
    }
}

/// The batch task: everything queued, up to `job.max`, per batch; retires after
/// the domain's idle interval without items.
async fn run<T, F, Fut>(
    domain: Domain,
    job: Job<T, F>,
    mut items: mpsc::Receiver<T>,
    me: mpsc::Sender<T>,
) where
    T: Send + 'static,
    F: Fn(Domain, Vec<T>) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(thread) = &domain.inner.store_thread {
        // sqlx may have replaced its connection (and thread) since the last task.
        thread.pin_sqlite();
    }
    let idle: Duration = domain.inner.config.vote_batch_idle;
    loop {
        let first = match tokio::time::timeout(idle, items.recv()).await {
            Ok(Some(first)) => first,
            _ => break,
        };
        let mut batch = vec![first];
        while batch.len() < job.max {
            match items.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        (job.handle)(domain.clone(), batch).await;
    }
    // Retire: no new sender finds this queue, no sender can add to it, and what
    // is already in it is still committed.
    {
        let mut listed = (job.batcher)(&domain).queue();
        if listed.as_ref().is_some_and(|q| q.same_channel(&me)) {
            *listed = None;
        }
    }
    drop(me);
    items.close();
    let mut rest = Vec::new();
    while let Some(item) = items.recv().await {
        rest.push(item);
        if rest.len() == job.max {
            (job.handle)(domain.clone(), std::mem::take(&mut rest)).await;
        }
    }
    if !rest.is_empty() {
        (job.handle)(domain.clone(), rest).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;
    use std::sync::mpsc as std_mpsc;

    use super::*;

    static BATCHER: LazyLock<Batcher<u32>> = LazyLock::new(Batcher::default);

    type Handle = fn(Domain, Vec<u32>) -> std::future::Ready<()>;

    fn job() -> Job<u32, Handle> {
        Job {
            batcher: |_| &BATCHER,
            max: 16,
            handle: |_, _| std::future::ready(()),
        }
    }

    static RECORDING: LazyLock<Batcher<u32>> = LazyLock::new(Batcher::default);

    /// The name of the thread each batch ran on, sent and received.
    type Ran = (
        mpsc::UnboundedSender<Option<String>>,
        tokio::sync::Mutex<mpsc::UnboundedReceiver<Option<String>>>,
    );

    static RAN_ON: LazyLock<Ran> = LazyLock::new(|| {
        let (ran, on) = mpsc::unbounded_channel();
        (ran, tokio::sync::Mutex::new(on))
    });

    fn recording_job() -> Job<u32, Handle> {
        Job {
            batcher: |_| &RECORDING,
            max: 16,
            handle: |_, _| {
                let thread = std::thread::current().name().map(str::to_owned);
                let _ = RAN_ON.0.send(thread);
                std::future::ready(())
            },
        }
    }

    /// On SQLite, batches run on the store thread, beside sqlx's SQLite thread;
    /// without one, on the caller's runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_run_on_the_store_thread_when_there_is_one() {
        let mut ran_on = RAN_ON.1.lock().await;
        let on_sqlite = crate::testing::domain().await;
        // With one CPU there is no store thread.
        let expected = match on_sqlite.inner.store_thread {
            Some(_) => "pollcast-store",
            None => "tokio-rt-worker",
        };
        for (domain, expected) in [
            (on_sqlite, expected),
            (
                crate::testing::domain_without_store_thread().await,
                "tokio-rt-worker",
            ),
        ] {
            RECORDING.send(&domain, recording_job(), 1).await;
            let thread = tokio::time::timeout(Duration::from_secs(10), ran_on.recv())
                .await
                .expect("the batch ran")
                .expect("recorded");
            assert_eq!(thread.as_deref(), Some(expected));
            // The next domain's batches go to a task of its own.
            *RECORDING.queue() = None;
        }
    }

    /// A runtime shutting down cancels every task it is given: `send` must give
    /// up rather than start one batch task after another for ever (it did, and
    /// hung a test run at 100 % CPU while its runtime was dropped).
    #[test]
    fn send_gives_up_when_the_runtime_shuts_down() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        // On the test's runtime: a store thread's runtime does not shut down
        // with the caller's.
        let domain = rt.block_on(crate::testing::domain_without_store_thread());
        rt.block_on(BATCHER.send(&domain, job(), 1));
        let handle = rt.handle().clone();
        rt.shutdown_background();
        let (done, finished) = std_mpsc::channel();
        std::thread::spawn(move || {
            handle.block_on(BATCHER.send(&domain, job(), 2));
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(10)).is_ok(),
            "send returned"
        );
    }
}
