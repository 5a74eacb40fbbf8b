//! Events committed with the change that caused them, waiting for (or already given to) the stream.

use sea_orm::entity::prelude::*;

/// One row of `outbox`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox")]
pub struct Model {
    /// Session whose stream the event belongs to.
    #[sea_orm(primary_key, auto_increment = false)]
    pub session_id: Uuid,
    /// Position in that stream.
    #[sea_orm(primary_key, auto_increment = false)]
    pub position: i64,
    /// `eventType`, for operators reading the table.
    pub event_type: String,
    /// The domain event as JSON (`{eventType, payload}`).
    pub payload: String,
    /// When the change happened.
    pub occurred_at: DateTimeUtc,
    /// When the stream acknowledged it; `NULL` while pending.
    pub published_at: Option<DateTimeUtc>,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
