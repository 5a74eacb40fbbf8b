//! WebSocket connections as the presence tracker knows them, so that the
//! per-participant counts are shared by every api node and survive their restarts.
//! A closed row stays a while as a tombstone: signals of one connection may be
//! handled out of order by different api nodes, and a `Connected` arriving after
//! its `Disconnected` must not reopen it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000001_connections"
    }
}

#[derive(DeriveIden)]
enum Connections {
    Table,
    Id,
    SessionId,
    ParticipantId,
    Open,
    SeenAt,
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Connections::Table)
                    .col(pk_uuid(Connections::Id))
                    .col(uuid(Connections::SessionId))
                    .col(uuid(Connections::ParticipantId))
                    .col(boolean(Connections::Open))
                    .col(timestamp_with_time_zone(Connections::SeenAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Connections::Table, Connections::SessionId)
                            .to(Sessions::Table, Sessions::Id),
                    )
                    .to_owned(),
            )
            .await?;
        // "Does this participant have another open connection?"
        manager
            .create_index(
                Index::create()
                    .name("connections_participant")
                    .table(Connections::Table)
                    .col(Connections::ParticipantId)
                    .col(Connections::Open)
                    .to_owned(),
            )
            .await?;
        // The sweep: open connections not heard of for too long, old tombstones.
        manager
            .create_index(
                Index::create()
                    .name("connections_seen")
                    .table(Connections::Table)
                    .col(Connections::Open)
                    .col(Connections::SeenAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Connections::Table).to_owned())
            .await
    }
}
