//! How many polls and participants a session has, kept on the session row (in the
//! same transaction as the insert), so the per-session caps cost no count per
//! join. Existing sessions are counted once here.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000003_session_counts"
    }
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    PollCount,
    ParticipantCount,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite adds one column per ALTER TABLE.
        manager
            .alter_table(
                Table::alter()
                    .table(Sessions::Table)
                    .add_column(big_integer(Sessions::PollCount).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Sessions::Table)
                    .add_column(big_integer(Sessions::ParticipantCount).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE sessions SET \
                 poll_count = (SELECT COUNT(*) FROM polls WHERE polls.session_id = sessions.id), \
                 participant_count = (SELECT COUNT(*) FROM participants \
                                      WHERE participants.session_id = sessions.id)",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Sessions::PollCount, Sessions::ParticipantCount] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Sessions::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
