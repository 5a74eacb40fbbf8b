//! One row per option a vote chose: what results are counted from.

use sea_orm::entity::prelude::*;

/// One row of `vote_choices`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "vote_choices")]
pub struct Model {
    /// The vote.
    #[sea_orm(primary_key, auto_increment = false)]
    pub vote_id: Uuid,
    /// The option chosen.
    #[sea_orm(primary_key, auto_increment = false)]
    pub option_id: Uuid,
    /// The poll (denormalised so a tally reads one index).
    pub poll_id: Uuid,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
