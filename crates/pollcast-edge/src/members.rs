//! A room's connections, indexed by who may see what: an event for the
//! presenters or for one participant visits those few connections, not the
//! whole room.
//!
//! Before, every event visited every member to ask whether it was theirs. A
//! room of 10 000 gets a `vote:accepted` (one participant's) per vote and, in a
//! reconnect storm, a `participant:disconnected` and a `participant:connected`
//! (the presenters') per participant: 20 000 presenter-only events each
//! visiting 10 000 members is 2 × 10⁸ visits, while the room's task holds the
//! lock every join and leave needs.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use pollcast_protocol::Audience;
use uuid::Uuid;

use crate::room::Member;

/// A room's members by connection, with the presenters' and each
/// participant's connections apart.
#[derive(Default)]
pub struct Members {
    by_connection: HashMap<Uuid, Member>,
    presenters: HashSet<Uuid>,
    /// A participant's connections (a handful at most, by the per-participant
    /// limit).
    by_participant: HashMap<Uuid, Vec<Uuid>>,
}

impl Members {
    /// Adds a member under its connection id.
    pub fn insert(&mut self, connection: Uuid, member: Member) {
        // A connection id is new for every connection; one seen again replaces
        // the member it had, and its index entries with it.
        self.remove(&connection);
        if member.presenter {
            self.presenters.insert(connection);
        }
        if let Some(participant) = member.participant {
            self.by_participant
                .entry(participant)
                .or_default()
                .push(connection);
        }
        self.by_connection.insert(connection, member);
    }

    /// Removes a member; the member, if there was one.
    pub fn remove(&mut self, connection: &Uuid) -> Option<Member> {
        let member = self.by_connection.remove(connection)?;
        self.unindex(connection, member.presenter, member.participant);
        Some(member)
    }

    /// Takes a connection out of the presenters' and its participant's lists.
    fn unindex(&mut self, connection: &Uuid, presenter: bool, participant: Option<Uuid>) {
        if presenter {
            self.presenters.remove(connection);
        }
        if let Some(participant) = participant
            && let Entry::Occupied(mut mine) = self.by_participant.entry(participant)
        {
            mine.get_mut().retain(|c| c != connection);
            if mine.get().is_empty() {
                mine.remove();
            }
        }
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.by_connection.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_connection.is_empty()
    }

    /// Every member.
    pub fn values(&self) -> impl Iterator<Item = &Member> {
        self.by_connection.values()
    }

    /// Offers to the members that `audiences` reach (every member if one of
    /// them is the room; else only the presenters and participants named),
    /// each once; `offer` says whether to keep the member.
    pub fn offer(&mut self, audiences: &[Audience], mut offer: impl FnMut(&Member) -> bool) {
        if audiences.contains(&Audience::Room) {
            let mut dropped = Vec::new();
            self.by_connection.retain(|connection, member| {
                let keep = offer(member);
                if !keep {
                    dropped.push((*connection, member.presenter, member.participant));
                }
                keep
            });
            for (connection, presenter, participant) in dropped {
                self.unindex(&connection, presenter, participant);
            }
            return;
        }
        let mut targets = Vec::new();
        for audience in audiences {
            let (presenters, participant) = match *audience {
                // (The room's was handled above.)
                Audience::Room | Audience::Presenters => (true, None),
                Audience::ParticipantAndPresenters(p) => (true, Some(p)),
                Audience::Participant(p) => (false, Some(p)),
            };
            if presenters {
                targets.extend(self.presenters.iter().copied());
            }
            if let Some(mine) = participant.and_then(|p| self.by_participant.get(&p)) {
                targets.extend(mine.iter().copied());
            }
        }
        targets.sort_unstable();
        targets.dedup();
        for connection in targets {
            let keep = self.by_connection.get(&connection).is_none_or(&mut offer);
            if !keep {
                self.remove(&connection);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pollcast_protocol::WireFormat;

    use super::*;
    use crate::outlet::Outlet;

    fn member(presenter: bool, participant: Option<Uuid>) -> Member {
        let sink = Box::new(tokio::io::sink());
        // Never offered anything here: the queue's end can go.
        let (outlet, _) = Outlet::new(sink, "json", 1 << 20, Duration::from_secs(1));
        Member {
            presenter,
            participant,
            format: WireFormat::Json,
            outlet,
        }
    }

    /// A presenter, Ada on two connections, Bob on one: their connection ids.
    fn room() -> (Members, Uuid, [Uuid; 2], Uuid, Uuid, Uuid) {
        let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let mut members = Members::default();
        let presenter = Uuid::now_v7();
        members.insert(presenter, member(true, None));
        let ada_conns = [Uuid::now_v7(), Uuid::now_v7()];
        for c in ada_conns {
            members.insert(c, member(false, Some(ada)));
        }
        let bob_conn = Uuid::now_v7();
        members.insert(bob_conn, member(false, Some(bob)));
        (members, presenter, ada_conns, bob_conn, ada, bob)
    }

    /// The connections `offer` visits for `audiences`, sorted.
    fn visited(members: &mut Members, audiences: &[Audience]) -> Vec<Uuid> {
        let mut seen = Vec::new();
        let ids: HashMap<*const Member, Uuid> = members
            .by_connection
            .iter()
            .map(|(id, m)| (m as *const Member, *id))
            .collect();
        members.offer(audiences, |m| {
            seen.push(ids[&(m as *const Member)]);
            true
        });
        seen.sort_unstable();
        seen
    }

    fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
        ids.sort_unstable();
        ids
    }

    #[test]
    fn each_audience_visits_its_connections_once() {
        let (mut members, presenter, ada_conns, bob_conn, ada, bob) = room();
        assert_eq!(
            visited(&mut members, &[Audience::Presenters]),
            vec![presenter]
        );
        assert_eq!(
            visited(&mut members, &[Audience::Participant(ada)]),
            sorted(ada_conns.to_vec())
        );
        assert_eq!(
            visited(&mut members, &[Audience::ParticipantAndPresenters(bob)]),
            sorted(vec![presenter, bob_conn])
        );
        assert_eq!(
            visited(
                &mut members,
                &[
                    Audience::Presenters,
                    Audience::ParticipantAndPresenters(bob)
                ]
            ),
            sorted(vec![presenter, bob_conn]),
            "the presenter once for both"
        );
        assert_eq!(
            visited(&mut members, &[Audience::Participant(Uuid::now_v7())]),
            Vec::<Uuid>::new()
        );
        let everyone = sorted(vec![presenter, ada_conns[0], ada_conns[1], bob_conn]);
        assert_eq!(
            visited(&mut members, &[Audience::Participant(ada), Audience::Room]),
            everyone
        );
    }

    #[test]
    fn a_member_refused_is_gone_from_every_index() {
        let (mut members, _, ada_conns, _, ada, _) = room();
        // Ada's connections refuse an event of hers (a full queue).
        members.offer(&[Audience::Participant(ada)], |_| false);
        assert_eq!(members.len(), 2);
        assert!(!members.by_participant.contains_key(&ada));
        assert_eq!(
            visited(&mut members, &[Audience::Participant(ada)]),
            Vec::<Uuid>::new()
        );
        assert!(!members.by_connection.contains_key(&ada_conns[0]));
        // The presenter and Bob refuse a room-wide one.
        let (mut members, presenter, ada_conns, bob_conn, _, bob) = room();
        members.offer(&[Audience::Room], |m| {
            !m.presenter && m.participant != Some(bob)
        });
        assert_eq!(members.len(), 2);
        assert!(members.presenters.is_empty());
        assert!(!members.by_participant.contains_key(&bob));
        assert!(members.remove(&presenter).is_none());
        assert!(members.remove(&bob_conn).is_none());
        for connection in ada_conns {
            assert!(members.remove(&connection).is_some());
        }
        assert!(members.is_empty() && members.by_participant.is_empty());
    }
}
