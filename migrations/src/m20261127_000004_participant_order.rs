//! The participants list is read in join order and paged by `(joined_at, id)`: an
//! index in that order makes every page a range scan instead of a sort of the
//! whole session (up to 100 000 rows). It replaces the index on `session_id`
//! alone, whose work it covers.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000004_participant_order"
    }
}

#[derive(DeriveIden)]
enum Participants {
    Table,
    SessionId,
    JoinedAt,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("participants_session_joined")
                    .table(Participants::Table)
                    .col(Participants::SessionId)
                    .col(Participants::JoinedAt)
                    .col(Participants::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("participants_session")
                    .table(Participants::Table)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
            .drop_index(
                Index::drop()
                    .name("participants_session_joined")
                    .table(Participants::Table)
                    .to_owned(),
            )
            .await
    }
}
