//! Accepted votes; the unique index on (poll_id, participant_id) is the one-vote rule.

use sea_orm::entity::prelude::*;

/// One row of `votes`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "votes")]
pub struct Model {
    /// Vote id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Poll voted on.
    pub poll_id: Uuid,
    /// Voter.
    pub participant_id: Uuid,
    /// JSON array of chosen option ids, in the order given.
    pub option_ids: String,
    /// Acceptance time.
    pub created_at: DateTimeUtc,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
