//! Polls; options are stored with the poll as a JSON array because they never change after creation and are always read together.

use sea_orm::entity::prelude::*;

/// One row of `polls`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "polls")]
pub struct Model {
    /// Poll id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Owning session.
    pub session_id: Uuid,
    /// Question.
    pub question: String,
    /// `single` | `multiple`.
    pub kind: String,
    /// Most options a vote may choose.
    pub max_choices: i32,
    /// `draft` | `active` | `closed`.
    pub status: String,
    /// JSON array of `{id, text}` in presentation order.
    pub options: String,
    /// Creation time.
    pub created_at: DateTimeUtc,
    /// Activation time.
    pub activated_at: Option<DateTimeUtc>,
    /// Close time.
    pub closed_at: Option<DateTimeUtc>,
    /// Votes cast, kept by the vote batch (see `option_tally`).
    pub total_votes: i64,
}

/// No relations are navigated through the ORM; joins are explicit queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
