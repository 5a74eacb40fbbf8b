//! Sessions: lifecycle, join code and the session's newest stream position.

use sea_orm::entity::prelude::*;

/// One row of `sessions`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sessions")]
pub struct Model {
    /// Session id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Join code, upper case.
    pub code: String,
    /// Title.
    pub title: String,
    /// `created` | `started` | `ended`.
    pub status: String,
    /// Creation time.
    pub created_at: DateTimeUtc,
    /// Start time.
    pub started_at: Option<DateTimeUtc>,
    /// End time.
    pub ended_at: Option<DateTimeUtc>,
    /// The poll open for votes.
    pub active_poll_id: Option<Uuid>,
    /// Newest stream position assigned to this session's events.
    pub last_position: i64,
    /// Polls drafted in the session (for the per-session cap).
    pub poll_count: i64,
    /// Participants who joined (for the per-session cap).
    pub participant_count: i64,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
