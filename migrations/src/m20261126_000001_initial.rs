//! The initial schema: sessions, polls, participants, votes, idempotency keys and
//! the outbox of events waiting to reach the stream.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000001_initial"
    }
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    Id,
    Code,
    Title,
    Status,
    CreatedAt,
    StartedAt,
    EndedAt,
    ActivePollId,
    LastPosition,
}

#[derive(DeriveIden)]
enum Polls {
    Table,
    Id,
    SessionId,
    Question,
    Kind,
    MaxChoices,
    Status,
    Options,
    CreatedAt,
    ActivatedAt,
    ClosedAt,
}

#[derive(DeriveIden)]
enum Participants {
    Table,
    Id,
    SessionId,
    DisplayName,
    JoinedAt,
    LastSeenAt,
    Connected,
}

#[derive(DeriveIden)]
enum Votes {
    Table,
    Id,
    PollId,
    ParticipantId,
    OptionIds,
    CreatedAt,
}

#[derive(DeriveIden)]
enum VoteChoices {
    Table,
    VoteId,
    PollId,
    OptionId,
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
    ParticipantId,
    Key,
    Answer,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Outbox {
    Table,
    SessionId,
    Position,
    EventType,
    Payload,
    OccurredAt,
    PublishedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Sessions::Table)
                    .col(pk_uuid(Sessions::Id))
                    .col(string_len(Sessions::Code, 6))
                    .col(string_len(Sessions::Title, 800))
                    .col(string_len(Sessions::Status, 16))
                    .col(timestamp_with_time_zone(Sessions::CreatedAt))
                    .col(timestamp_with_time_zone_null(Sessions::StartedAt))
                    .col(timestamp_with_time_zone_null(Sessions::EndedAt))
                    .col(uuid_null(Sessions::ActivePollId))
                    // Newest stream position assigned to the session's events. Bumping
                    // it is the first write of every change to a session, so changes
                    // of one session commit one at a time, in position order.
                    .col(big_integer(Sessions::LastPosition).default(0))
                    .to_owned(),
            )
            .await?;
        // Join codes are unique among sessions that have not ended; ended sessions
        // give their code back. Partial indexes are spelled the same in SQLite and
        // PostgreSQL.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE UNIQUE INDEX sessions_live_code ON sessions (code) WHERE status <> 'ended'",
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("sessions_code")
                    .table(Sessions::Table)
                    .col(Sessions::Code)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Polls::Table)
                    .col(pk_uuid(Polls::Id))
                    .col(uuid(Polls::SessionId))
                    .col(text(Polls::Question))
                    .col(string_len(Polls::Kind, 16))
                    .col(integer(Polls::MaxChoices))
                    .col(string_len(Polls::Status, 16))
                    .col(text(Polls::Options))
                    .col(timestamp_with_time_zone(Polls::CreatedAt))
                    .col(timestamp_with_time_zone_null(Polls::ActivatedAt))
                    .col(timestamp_with_time_zone_null(Polls::ClosedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Polls::Table, Polls::SessionId)
                            .to(Sessions::Table, Sessions::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("polls_session")
                    .table(Polls::Table)
                    .col(Polls::SessionId)
                    .col(Polls::CreatedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Participants::Table)
                    .col(pk_uuid(Participants::Id))
                    .col(uuid(Participants::SessionId))
                    .col(string_len(Participants::DisplayName, 300))
                    .col(timestamp_with_time_zone(Participants::JoinedAt))
                    .col(timestamp_with_time_zone(Participants::LastSeenAt))
                    .col(boolean(Participants::Connected).default(false))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Participants::Table, Participants::SessionId)
                            .to(Sessions::Table, Sessions::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("participants_session")
                    .table(Participants::Table)
                    .col(Participants::SessionId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Votes::Table)
                    .col(pk_uuid(Votes::Id))
                    .col(uuid(Votes::PollId))
                    .col(uuid(Votes::ParticipantId))
                    .col(text(Votes::OptionIds))
                    .col(timestamp_with_time_zone(Votes::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Votes::Table, Votes::PollId)
                            .to(Polls::Table, Polls::Id),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(Votes::Table, Votes::ParticipantId)
                            .to(Participants::Table, Participants::Id),
                    )
                    .to_owned(),
            )
            .await?;
        // Invariant 3: one vote per participant per poll, enforced here and nowhere
        // else that could disagree.
        manager
            .create_index(
                Index::create()
                    .name("votes_one_per_participant")
                    .table(Votes::Table)
                    .col(Votes::PollId)
                    .col(Votes::ParticipantId)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(VoteChoices::Table)
                    .col(uuid(VoteChoices::VoteId))
                    .col(uuid(VoteChoices::PollId))
                    .col(uuid(VoteChoices::OptionId))
                    .primary_key(
                        Index::create()
                            .col(VoteChoices::VoteId)
                            .col(VoteChoices::OptionId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(VoteChoices::Table, VoteChoices::VoteId)
                            .to(Votes::Table, Votes::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("vote_choices_tally")
                    .table(VoteChoices::Table)
                    .col(VoteChoices::PollId)
                    .col(VoteChoices::OptionId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(IdempotencyKeys::Table)
                    .col(uuid(IdempotencyKeys::ParticipantId))
                    .col(string_len(IdempotencyKeys::Key, 255))
                    .col(text(IdempotencyKeys::Answer))
                    .col(timestamp_with_time_zone(IdempotencyKeys::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(IdempotencyKeys::ParticipantId)
                            .col(IdempotencyKeys::Key),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Outbox::Table)
                    .col(uuid(Outbox::SessionId))
                    .col(big_integer(Outbox::Position))
                    .col(string_len(Outbox::EventType, 64))
                    .col(text(Outbox::Payload))
                    .col(timestamp_with_time_zone(Outbox::OccurredAt))
                    .col(timestamp_with_time_zone_null(Outbox::PublishedAt))
                    .primary_key(Index::create().col(Outbox::SessionId).col(Outbox::Position))
                    .to_owned(),
            )
            .await?;
        // The relay scans only what is pending; keep that scan small however long
        // the published history grows.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX outbox_pending ON outbox (session_id, position) WHERE published_at IS NULL",
            )
            .await?;
        // Start-up restores the last day of history into the embedded engine; without
        // this index that would scan every event ever written.
        manager
            .create_index(
                Index::create()
                    .name("outbox_occurred")
                    .table(Outbox::Table)
                    .col(Outbox::OccurredAt)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Outbox::Table.into_iden(),
            IdempotencyKeys::Table.into_iden(),
            VoteChoices::Table.into_iden(),
            Votes::Table.into_iden(),
            Participants::Table.into_iden(),
            Polls::Table.into_iden(),
            Sessions::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
