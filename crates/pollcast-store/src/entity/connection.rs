//! WebSocket connections of participants, as reported by the edges.

use sea_orm::entity::prelude::*;

/// One row of `connections`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "connections")]
pub struct Model {
    /// The connection id the edge gave it (`connectionId` on the wire).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Its session.
    pub session_id: Uuid,
    /// Its participant.
    pub participant_id: Uuid,
    /// `false` once it closed (kept as a tombstone for a while).
    pub open: bool,
    /// Last sign of life: opening, a heartbeat, or closing.
    pub seen_at: DateTimeUtc,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
