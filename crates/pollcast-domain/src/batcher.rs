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

    /// Queues `item` for the running task, starting one when none runs.
    pub async fn send<F, Fut>(&self, domain: &Domain, job: Job<T, F>, mut item: T)
    where
        F: Fn(Domain, Vec<T>) -> Fut + Copy + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let queue = self
                .queue()
                .get_or_insert_with(|| {
                    let (queue, items) = mpsc::channel(QUEUE);
                    tokio::spawn(run(domain.clone(), job, items, queue.clone()));
                    queue
                })
                .clone();
            match queue.send(item).await {
                Ok(()) => return,
                // The task retired between our lookup and the send (or died):
                // forget its queue if it is still the one listed, and start again.
                Err(mpsc::error::SendError(back)) => {
                    let mut listed = self.queue();
                    if listed.as_ref().is_some_and(|q| q.same_channel(&queue)) {
                        *listed = None;
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
