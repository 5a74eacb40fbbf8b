//! Participants of a session.

use sea_orm::entity::prelude::*;

/// One row of `participants`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "participants")]
pub struct Model {
    /// Participant id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Session joined.
    pub session_id: Uuid,
    /// Name given at join.
    pub display_name: String,
    /// Join time.
    pub joined_at: DateTimeUtc,
    /// Last sign of life.
    pub last_seen_at: DateTimeUtc,
    /// Whether a WebSocket connection of theirs is open.
    pub connected: bool,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
