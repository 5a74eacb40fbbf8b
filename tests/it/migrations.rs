//! Migrations that rewrite data, run over data written by the schema before them.

use chrono::Utc;
use pollcast_migrations::{Migrator, MigratorTrait};
use pollcast_store::sea_orm::sea_query::{Alias, Query};
use pollcast_store::sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, Database, EntityTrait, QueryFilter,
};
use pollcast_store::{option_tally, participant, poll, session, vote, vote_choice};
use pollcast_tests::Backend;
use pollcast_tests::postgres::Cluster;
use uuid::Uuid;

/// Migrations before the kept tallies.
const BEFORE_KEPT_TALLIES: u32 = 5;

async fn kept_tallies_are_counted_from_the_votes_already_cast(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display()),
        Backend::Postgres => Cluster::shared().fresh_database().await,
    };
    let db = Database::connect(&url).await.expect("connect");
    Migrator::up(&db, Some(BEFORE_KEPT_TALLIES))
        .await
        .expect("older migrations");

    let now = Utc::now();
    let session_id = Uuid::now_v7();
    session::Entity::insert(session::ActiveModel {
        id: Set(session_id),
        code: Set("ABC123".into()),
        title: Set("Before".into()),
        status: Set("started".into()),
        created_at: Set(now),
        started_at: Set(Some(now)),
        ended_at: Set(None),
        active_poll_id: Set(None),
        last_position: Set(0),
        poll_count: Set(2),
        participant_count: Set(3),
    })
    .exec_without_returning(&db)
    .await
    .expect("session");
    // Two polls of three options; the poll entity already has the new column, so
    // the old rows are written column by column.
    let options: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let options_json = serde_json::to_string(
        &options
            .iter()
            .map(|id| serde_json::json!({ "id": id, "text": "x" }))
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let polls = [Uuid::now_v7(), Uuid::now_v7()];
    for poll_id in polls {
        let insert = Query::insert()
            .into_table(Alias::new("polls"))
            .columns(
                [
                    "id",
                    "session_id",
                    "question",
                    "kind",
                    "max_choices",
                    "status",
                    "options",
                    "created_at",
                ]
                .map(Alias::new),
            )
            .values_panic([
                poll_id.into(),
                session_id.into(),
                "Q?".into(),
                "multiple".into(),
                3.into(),
                "active".into(),
                options_json.clone().into(),
                now.into(),
            ])
            .to_owned();
        db.execute(&insert).await.expect("old poll row");
    }
    // The first poll: three voters choosing {0}, {0, 1}, {0, 2}; the second none.
    let chosen = [vec![0], vec![0, 1], vec![0, 2]];
    for picks in &chosen {
        let participant_id = Uuid::now_v7();
        participant::Entity::insert(participant::ActiveModel {
            id: Set(participant_id),
            session_id: Set(session_id),
            display_name: Set("voter".into()),
            joined_at: Set(now),
            last_seen_at: Set(now),
            connected: Set(false),
        })
        .exec_without_returning(&db)
        .await
        .expect("participant");
        let vote_id = Uuid::now_v7();
        let option_ids: Vec<Uuid> = picks.iter().map(|&i| options[i]).collect();
        vote::Entity::insert(vote::ActiveModel {
            id: Set(vote_id),
            poll_id: Set(polls[0]),
            participant_id: Set(participant_id),
            option_ids: Set(serde_json::to_string(&option_ids).expect("json")),
            created_at: Set(now),
        })
        .exec_without_returning(&db)
        .await
        .expect("vote");
        for option_id in option_ids {
            vote_choice::Entity::insert(vote_choice::ActiveModel {
                vote_id: Set(vote_id),
                option_id: Set(option_id),
                poll_id: Set(polls[0]),
            })
            .exec_without_returning(&db)
            .await
            .expect("choice");
        }
    }

    Migrator::up(&db, None).await.expect("kept tallies");

    let totals: Vec<i64> = {
        let mut totals = Vec::new();
        for poll_id in polls {
            let row = poll::Entity::find_by_id(poll_id)
                .one(&db)
                .await
                .expect("read poll")
                .expect("poll");
            totals.push(row.total_votes);
        }
        totals
    };
    assert_eq!(totals, [3, 0], "votes cast, not options chosen");
    let mut tallies: Vec<(Uuid, i64)> = option_tally::Entity::find()
        .filter(option_tally::Column::PollId.eq(polls[0]))
        .all(&db)
        .await
        .expect("tallies")
        .into_iter()
        .map(|row| (row.option_id, row.votes))
        .collect();
    tallies.sort();
    assert_eq!(
        tallies,
        vec![(options[0], 3), (options[1], 1), (options[2], 1)]
    );
    let untouched = option_tally::Entity::find()
        .filter(option_tally::Column::PollId.eq(polls[1]))
        .all(&db)
        .await
        .expect("tallies");
    assert!(untouched.is_empty(), "a poll without votes has no rows");
}

pollcast_tests::on_both_backends!(kept_tallies_are_counted_from_the_votes_already_cast);
