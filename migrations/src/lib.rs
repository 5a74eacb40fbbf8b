//! Schema migrations of the pollcast store, applied at start-up and by
//! `pollcast migrate`. Each migration is one file named after the date it was
//! written; never edit a migration that has shipped, add a new one.

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_initial;
mod m20261127_000001_connections;
mod m20261127_000002_retention;
mod m20261127_000003_session_counts;
mod m20261127_000004_participant_order;
mod m20261128_000001_kept_tallies;

/// Runs pollcast's migrations in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_initial::Migration),
            Box::new(m20261127_000001_connections::Migration),
            Box::new(m20261127_000002_retention::Migration),
            Box::new(m20261127_000003_session_counts::Migration),
            Box::new(m20261127_000004_participant_order::Migration),
            Box::new(m20261128_000001_kept_tallies::Migration),
        ]
    }
}
