//! A room's window of its most recent events, in memory: what a client that
//! dropped moments ago missed, so its replay needs nothing from the log.
//!
//! Without it, every reconnecting client reads every event since its drop from
//! the stream. A reconnect storm is then clients × events reads, and each drop
//! adds an event (`participant:disconnected`) that all the others read too: on
//! JetStream, 10 000 clients reconnecting at once kept the nats-server busy in
//! Direct Get until most replays timed out.
//!
//! The window holds consecutive positions only, ending at the newest event the
//! room has dispatched. It keeps events by an estimate of their memory (see
//! [`cost`]), the room's budget growing with its members (a storm's replays and
//! its presence events both grow with them). What it does not reach back to is
//! read from the log, as before.

use std::collections::VecDeque;
use std::sync::Arc;

use pollcast_protocol::{SessionEvent, WireFormat};

use crate::frame::EncodedEvent;

/// Memory a room keeps of recent events per member, by default.
pub const BUDGET_PER_MEMBER: usize = 2 * 1024;
/// The least a room keeps, however few its members.
const MIN_BUDGET: usize = 256 * 1024;
/// The most a room keeps, however many its members.
const MAX_BUDGET: usize = 32 * 1024 * 1024;
/// What an event costs beyond its frame: the window's slot, the `Arc`s, the
/// decoded event's fixed part.
const EVENT_OVERHEAD: usize = 192;

/// The memory budget of a room with `members` members, keeping `per_member`
/// bytes each within bounds; none at all when `per_member` is 0.
pub fn budget(members: usize, per_member: usize) -> usize {
    if per_member == 0 {
        return 0;
    }
    members
        .saturating_mul(per_member)
        .clamp(MIN_BUDGET, MAX_BUDGET)
}

/// An estimate of what an event held in the window costs: its JSON frame twice
/// (the decoded event holds about what its frame says, and most rooms encode
/// one format, JSON for the presenter's screen) and a fixed overhead. The
/// estimate encodes the JSON frame if no member has yet; a replay would.
pub fn cost(event: &EncodedEvent) -> usize {
    let frame = event
        .framed(WireFormat::Json)
        .map_or(0, |f| f.bytes().len());
    EVENT_OVERHEAD + 2 * frame
}

/// One room's window; see the module documentation.
pub struct Recent {
    /// Consecutive positions, oldest first, each with its [`cost`].
    events: VecDeque<(Arc<EncodedEvent>, usize)>,
    /// The newest position the window accounts for: the room dispatched every
    /// event up to it. Held or not, nothing at or before it is still to come.
    end: u64,
    /// Sum of the held events' costs.
    bytes: usize,
}

impl Recent {
    /// An empty window of a room that starts after `end`.
    pub fn new(end: u64) -> Self {
        Self {
            events: VecDeque::new(),
            end,
            bytes: 0,
        }
    }

    /// The position the window reaches back to: it holds every event after it.
    pub fn start(&self) -> u64 {
        self.end - self.events.len() as u64
    }

    /// The newest position the window accounts for.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Memory the held events are estimated to take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends the next event the room dispatches, then drops the oldest past
    /// `budget`. An event at or before the end is a repeat and is ignored; one
    /// past a hole (which a room never dispatches) empties the window first, so
    /// it never answers across the hole.
    pub fn push(&mut self, event: Arc<EncodedEvent>, budget: usize) {
        let position = event.position();
        if position <= self.end {
            return;
        }
        if position > self.end + 1 {
            self.skip_to(position - 1);
        }
        let cost = cost(&event);
        self.events.push_back((event, cost));
        self.bytes += cost;
        self.end = position;
        self.trim(budget);
    }

    /// Forgets everything and starts again after `end`: the room moved past a
    /// hole the log could not fill.
    pub fn skip_to(&mut self, end: u64) {
        self.events.clear();
        self.bytes = 0;
        self.end = self.end.max(end);
    }

    /// Puts older events read from the log in front of the window: `older` must
    /// be consecutive and end right before [`Recent::start`], and all of it must
    /// fit in `budget` with what is held; otherwise nothing changes (the window
    /// moved, or the events would only push each other out). Whether they went in.
    pub fn prepend(&mut self, older: Vec<Arc<EncodedEvent>>, budget: usize) -> bool {
        let (Some(first), Some(newest)) = (older.first(), older.last()) else {
            return false;
        };
        let consecutive = newest.position() - first.position() + 1 == older.len() as u64;
        if newest.position() != self.start() || !consecutive {
            return false;
        }
        let costs: Vec<usize> = older.iter().map(|e| cost(e)).collect();
        let total: usize = costs.iter().sum();
        if self.bytes + total > budget {
            return false;
        }
        for (event, cost) in older.into_iter().zip(costs).rev() {
            self.events.push_front((event, cost));
        }
        self.bytes += total;
        true
    }

    /// The events after `after` that `wanted` accepts, in order, and the
    /// position they run to; `None` when the window does not reach back to
    /// `after`, or not forward to it: a position the room has not seen is the
    /// log's to judge (the room may lag behind it, or the position may not exist).
    pub fn after(
        &self,
        after: u64,
        mut wanted: impl FnMut(&SessionEvent) -> bool,
    ) -> Option<(Vec<Arc<EncodedEvent>>, u64)> {
        let start = self.start();
        if after < start || after > self.end {
            return None;
        }
        // At most the window's length, by the checks above.
        let skip = usize::try_from(after - start).unwrap_or(usize::MAX);
        let events = self
            .events
            .range(skip.min(self.events.len())..)
            .filter(|(event, _)| wanted(&event.event))
            .map(|(event, _)| Arc::clone(event))
            .collect();
        Some((events, self.end))
    }

    fn trim(&mut self, budget: usize) {
        while self.bytes > budget
            && let Some((_, cost)) = self.events.pop_front()
        {
            self.bytes -= cost;
        }
    }
}

#[cfg(test)]
mod tests {
    use pollcast_protocol::{DomainEvent, Timestamp};
    use uuid::Uuid;

    use super::*;

    fn event(position: u64) -> Arc<EncodedEvent> {
        Arc::new(EncodedEvent::new(Arc::new(SessionEvent {
            session_id: Uuid::nil(),
            position,
            timestamp: Timestamp::now(),
            event: DomainEvent::ParticipantDisconnected {
                participant_id: Uuid::nil(),
                display_name: "Ada".into(),
            },
        })))
    }

    fn positions(window: &Recent, after: u64) -> Option<Vec<u64>> {
        window
            .after(after, |_| true)
            .map(|(events, _)| events.iter().map(|e| e.position()).collect())
    }

    #[test]
    fn answers_from_its_start_on_and_not_before() {
        let mut window = Recent::new(10);
        for position in 11..=14 {
            window.push(event(position), MAX_BUDGET);
        }
        assert_eq!(window.start(), 10);
        assert_eq!(positions(&window, 10), Some(vec![11, 12, 13, 14]));
        assert_eq!(positions(&window, 12), Some(vec![13, 14]));
        assert_eq!(positions(&window, 14), Some(vec![]));
        assert_eq!(positions(&window, 15), None, "past the end");
        assert_eq!(positions(&window, 9), None);
    }

    #[test]
    fn the_filter_chooses_events_but_not_the_end() {
        let mut window = Recent::new(0);
        for position in 1..=6 {
            window.push(event(position), MAX_BUDGET);
        }
        let (events, end) = window
            .after(0, |e| e.position % 2 == 0)
            .expect("reaches back");
        let got: Vec<u64> = events.iter().map(|e| e.position()).collect();
        assert_eq!(got, vec![2, 4, 6]);
        assert_eq!(end, 6);
    }

    #[test]
    fn the_oldest_go_once_over_budget() {
        let one = cost(&event(1));
        let mut window = Recent::new(0);
        for position in 1..=10 {
            window.push(event(position), 3 * one);
        }
        assert_eq!(window.bytes(), 3 * one);
        assert_eq!(window.start(), 7);
        assert_eq!(positions(&window, 6), None);
        assert_eq!(positions(&window, 7), Some(vec![8, 9, 10]));
    }

    #[test]
    fn repeats_are_ignored_and_a_hole_empties_it() {
        let mut window = Recent::new(0);
        for position in [1, 2, 2, 1, 3] {
            window.push(event(position), MAX_BUDGET);
        }
        assert_eq!(positions(&window, 0), Some(vec![1, 2, 3]));
        window.push(event(7), MAX_BUDGET);
        assert_eq!(window.start(), 6, "nothing before the hole is answered");
        assert_eq!(positions(&window, 3), None);
        assert_eq!(positions(&window, 6), Some(vec![7]));
        window.skip_to(20);
        assert_eq!((window.start(), window.end(), window.bytes()), (20, 20, 0));
    }

    #[test]
    fn older_events_go_in_front_only_where_they_join_and_fit() {
        let one = cost(&event(1));
        let mut window = Recent::new(5);
        window.push(event(6), MAX_BUDGET);
        assert!(
            !window.prepend((1..=4).map(event).collect(), MAX_BUDGET),
            "a hole at 5"
        );
        assert!(
            !window.prepend([1, 2, 5].into_iter().map(event).collect(), MAX_BUDGET),
            "not consecutive"
        );
        assert!(
            !window.prepend((3..=5).map(event).collect(), 3 * one),
            "over budget"
        );
        assert!(!window.prepend(Vec::new(), MAX_BUDGET));
        assert_eq!(window.start(), 5, "unchanged by the refusals");
        assert!(window.prepend((3..=5).map(event).collect(), MAX_BUDGET));
        assert_eq!(positions(&window, 2), Some(vec![3, 4, 5, 6]));
        assert_eq!(window.bytes(), 4 * one);
    }

    #[test]
    fn the_budget_grows_with_the_members_within_bounds() {
        assert_eq!(budget(0, BUDGET_PER_MEMBER), MIN_BUDGET);
        assert_eq!(budget(10_000, 2048), 10_000 * 2048);
        assert_eq!(budget(usize::MAX, BUDGET_PER_MEMBER), MAX_BUDGET);
        assert_eq!(budget(10_000, 0), 0, "off");
    }
}
