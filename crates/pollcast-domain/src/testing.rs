//! Helpers for the domain's unit tests: a domain on in-memory SQLite and a
//! session ready for votes.

use std::sync::Arc;
use std::time::Duration;

use pollcast_stream::EmbeddedStream;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

use crate::vote_batch::Ballot;
use crate::{Domain, DomainConfig, NewPoll, NewPollOption, TokenKeys};

/// A domain on an in-memory SQLite database (one connection, so one database).
pub(crate) async fn domain() -> Domain {
    domain_with(DomainConfig::default()).await
}

/// [`domain`] with settings of the test's own.
pub(crate) async fn domain_with(config: DomainConfig) -> Domain {
    let (db, stream, keys) = parts().await;
    Domain::new(db, stream, keys, config)
}

/// [`domain`] whose batch tasks run on the caller's runtime, as on PostgreSQL or
/// with one CPU, wherever the test runs.
pub(crate) async fn domain_without_store_thread() -> Domain {
    let (db, stream, keys) = parts().await;
    Domain::with_store_thread(db, stream, keys, DomainConfig::default(), None)
}

async fn parts() -> (sea_orm::DatabaseConnection, Arc<EmbeddedStream>, TokenKeys) {
    let db = pollcast_store::connect("sqlite::memory:", Default::default())
        .await
        .expect("in-memory database");
    let keys = TokenKeys::new(b"vote batch unit tests", Duration::from_secs(60));
    (db, Arc::new(EmbeddedStream::default()), keys)
}

/// A started session with an active two-option poll and `voters` joined:
/// (presenter claims, session, poll, voters).
pub(crate) async fn voting_session(
    domain: &Domain,
    voters: usize,
) -> (crate::Claims, Uuid, pollcast_protocol::Poll, Vec<Uuid>) {
    let created = domain.create_session(None, "Batch").await.expect("session");
    let presenter = domain
        .verify_token(&created.presenter_token)
        .expect("presenter claims");
    let session = created.session.id;
    domain
        .start_session(&presenter, session)
        .await
        .expect("start");
    let poll = domain
        .create_poll(
            &presenter,
            session,
            NewPoll {
                question: "Q?".into(),
                options: vec![
                    NewPollOption::Text("A".into()),
                    NewPollOption::Text("B".into()),
                ],
                kind: Default::default(),
                max_choices: None,
            },
        )
        .await
        .expect("poll");
    domain
        .activate_poll(&presenter, poll.id)
        .await
        .expect("activate");
    let mut joined = Vec::new();
    for i in 0..voters {
        let j = domain
            .join(&created.session.code, &format!("voter {i}"))
            .await
            .expect("join");
        joined.push(j.participant.id);
    }
    (presenter, session, poll, joined)
}

pub(crate) fn ballot(
    session_id: Uuid,
    poll: &pollcast_protocol::Poll,
    voter: Uuid,
    option: usize,
) -> Ballot {
    Ballot {
        session_id,
        poll_id: poll.id,
        participant_id: voter,
        choice: Ok(vec![poll.options[option].id]),
        key: None,
    }
}

/// The session's outbox, in position order: (position, event type).
pub(crate) async fn outbox_of(domain: &Domain, session: Uuid) -> Vec<(i64, String)> {
    use pollcast_store::outbox;
    use sea_orm::QueryOrder;
    outbox::Entity::find()
        .filter(outbox::Column::SessionId.eq(session))
        .order_by_asc(outbox::Column::Position)
        .all(domain.db())
        .await
        .expect("outbox")
        .into_iter()
        .map(|row| (row.position, row.event_type))
        .collect()
}
