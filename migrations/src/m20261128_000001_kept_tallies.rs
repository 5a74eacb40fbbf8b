//! Results are kept, not recounted: `polls.total_votes` and one `option_tallies`
//! row per option that has votes, both changed by the vote batch in the
//! transaction that writes the votes. A recount with `GROUP BY` every results
//! interval cost in proportion to the poll's votes (at 40 000 votes it led the
//! profile, `docs/benchmarks.md`); reading the kept tally costs the same at any
//! size. Existing polls are counted once here.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000001_kept_tallies"
    }
}

#[derive(DeriveIden)]
enum Polls {
    Table,
    Id,
    TotalVotes,
}

#[derive(DeriveIden)]
enum OptionTallies {
    Table,
    PollId,
    OptionId,
    Votes,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Polls::Table)
                    .add_column(big_integer(Polls::TotalVotes).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(OptionTallies::Table)
                    .col(uuid(OptionTallies::PollId))
                    .col(uuid(OptionTallies::OptionId))
                    .col(big_integer(OptionTallies::Votes))
                    .primary_key(
                        Index::create()
                            .col(OptionTallies::PollId)
                            .col(OptionTallies::OptionId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(OptionTallies::Table, OptionTallies::PollId)
                            .to(Polls::Table, Polls::Id),
                    )
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        db.execute_unprepared(
            "UPDATE polls SET total_votes = \
             (SELECT COUNT(*) FROM votes WHERE votes.poll_id = polls.id)",
        )
        .await?;
        db.execute_unprepared(
            "INSERT INTO option_tallies (poll_id, option_id, votes) \
             SELECT poll_id, option_id, COUNT(*) FROM vote_choices \
             GROUP BY poll_id, option_id",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(OptionTallies::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Polls::Table)
                    .drop_column(Polls::TotalVotes)
                    .to_owned(),
            )
            .await
    }
}
