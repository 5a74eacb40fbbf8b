//! How many votes chose each option of a poll, kept by the vote batch in the
//! transaction that writes the votes (an option with no votes has no row).

use sea_orm::entity::prelude::*;

/// One row of `option_tallies`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "option_tallies")]
pub struct Model {
    /// The poll.
    #[sea_orm(primary_key, auto_increment = false)]
    pub poll_id: Uuid,
    /// The option.
    #[sea_orm(primary_key, auto_increment = false)]
    pub option_id: Uuid,
    /// Votes that chose it.
    pub votes: i64,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
