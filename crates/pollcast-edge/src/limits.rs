//! Connection limits per node and per participant (4429), and the count graceful
//! shutdown waits on.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use uuid::Uuid;

/// Open connections on this node.
pub struct Limits {
    max_node: usize,
    max_participant: usize,
    state: Mutex<Counts>,
    /// Publishes the node's open-connection count, so shutdown can wait for zero.
    open: watch::Sender<usize>,
}

#[derive(Default)]
struct Counts {
    node: usize,
    participants: HashMap<Uuid, usize>,
}

/// One admitted connection; dropping it frees its place.
pub struct Admission<'a> {
    limits: &'a Limits,
    participant: Option<Uuid>,
}

impl Limits {
    /// Limits of `max_node` connections, `max_participant` per participant.
    pub fn new(max_node: usize, max_participant: usize) -> Self {
        Self {
            max_node,
            max_participant,
            state: Mutex::new(Counts::default()),
            open: watch::channel(0).0,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection of `participant` (`None`: a presenter), if both limits
    /// allow it.
    pub fn admit(&self, participant: Option<Uuid>) -> Option<Admission<'_>> {
        let mut counts = self.counts();
        if counts.node >= self.max_node {
            return None;
        }
        if let Some(p) = participant {
            let mine = counts.participants.entry(p).or_default();
            if *mine >= self.max_participant {
                return None;
            }
            *mine += 1;
        }
        counts.node += 1;
        self.open.send_replace(counts.node);
        Some(Admission {
            limits: self,
            participant,
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.counts().node
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|&n| n == 0).await;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let mut counts = self.limits.counts();
        counts.node = counts.node.saturating_sub(1);
        if let Some(p) = self.participant
            && let Some(mine) = counts.participants.get_mut(&p)
        {
            *mine -= 1;
            if *mine == 0 {
                counts.participants.remove(&p);
            }
        }
        self.limits.open.send_replace(counts.node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_limit_counts_only_that_participant() {
        let limits = Limits::new(10, 2);
        let ada = Uuid::now_v7();
        let first = limits.admit(Some(ada));
        let second = limits.admit(Some(ada));
        assert!(first.is_some() && second.is_some());
        assert!(limits.admit(Some(ada)).is_none());
        assert!(limits.admit(Some(Uuid::now_v7())).is_some());
        drop(first);
        assert!(limits.admit(Some(ada)).is_some(), "a place freed is free");
    }

    #[test]
    fn node_limit_counts_everyone() {
        let limits = Limits::new(2, 5);
        let _a = limits.admit(None);
        let _b = limits.admit(Some(Uuid::now_v7()));
        assert!(limits.admit(None).is_none());
        assert_eq!(limits.open(), 2);
    }
}
