//! The first answer given to a vote request carrying an `Idempotency-Key`.

use sea_orm::entity::prelude::*;

/// One row of `idempotency_keys`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "idempotency_keys")]
pub struct Model {
    /// Participant who sent the key; keys are scoped per participant.
    #[sea_orm(primary_key, auto_increment = false)]
    pub participant_id: Uuid,
    /// The key as sent.
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    /// The first answer (the accepted vote or the rejection), as JSON.
    pub answer: String,
    /// When it was first answered.
    pub created_at: DateTimeUtc,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
