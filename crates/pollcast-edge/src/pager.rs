//! Reading a session's events after a position, a page at a time: the one loop
//! behind a replay, the flush before a shutdown close, and a room's catch-up.

use std::sync::Arc;

use pollcast_protocol::SessionEvent;
use pollcast_stream::{EventStream, StreamError};
use uuid::Uuid;

/// Events read per round trip.
const PAGE: usize = 512;

/// A cursor over one session's log.
pub struct Pager<'s> {
    stream: &'s dyn EventStream,
    session: Uuid,
    /// The newest position read so far (or the starting point).
    position: u64,
}

/// One page.
pub enum Page {
    /// The next events, in order, consecutive from the cursor on.
    Events(Vec<Arc<SessionEvent>>),
    /// Caught up with the log's newest event.
    End,
    /// The log no longer holds the event right after the cursor.
    Truncated,
}

impl<'s> Pager<'s> {
    /// A cursor reading the events after `after`.
    pub fn new(stream: &'s dyn EventStream, session: Uuid, after: u64) -> Self {
        Self {
            stream,
            session,
            position: after,
        }
    }

    /// The newest position read so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next page; moves the cursor past it.
    pub async fn next(&mut self) -> Result<Page, StreamError> {
        let batch = self
            .stream
            .read_after(self.session, self.position, PAGE)
            .await?;
        if batch.truncated {
            return Ok(Page::Truncated);
        }
        match batch.events.last() {
            None => Ok(Page::End),
            Some(last) => {
                self.position = last.position;
                Ok(Page::Events(batch.events))
            }
        }
    }
}
