//! The pollcast store: sea-orm entities (one per file), the connection and its
//! migrations, and the few queries more than one service needs.
//!
//! SQLite is the embedded default (one file in the data directory); PostgreSQL is
//! what production runs. Everything here works the same on both.

use std::time::Duration;

use pollcast_migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, SqlErr};

pub mod entity;

pub use entity::{
    connection, idempotency_key, outbox, participant, poll, session, vote, vote_choice,
};
pub use sea_orm;

/// Connects to `url` (`sqlite://…` or `postgres://…`) and applies pending migrations.
///
/// SQLite gets a single connection: it allows one writer at a time anyway, and one
/// connection turns lock contention (SQLITE_BUSY) into an orderly queue.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let sqlite = url.starts_with("sqlite:");
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(if sqlite { 1 } else { max_connections.max(1) })
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    if sqlite {
        // WAL lets readers of the file (backups, `sqlite3` by an operator) coexist
        // with the server; NORMAL sync is durable across process crashes in WAL mode.
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
        db.execute_unprepared("PRAGMA synchronous=NORMAL").await?;
        db.execute_unprepared("PRAGMA foreign_keys=ON").await?;
    }
    migrate(&db).await?;
    Ok(db)
}

/// Applies every migration not yet applied.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}

/// Answers when the database does (used by `/readyz`).
pub async fn ping(db: &DatabaseConnection) -> Result<(), DbErr> {
    db.ping().await
}

/// Whether the error is a unique-constraint violation (a lost race for a key).
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Whether the error means the database could not be reached at all, as opposed
/// to a query that failed.
pub fn is_unavailable(err: &DbErr) -> bool {
    matches!(err, DbErr::Conn(_) | DbErr::ConnectionAcquire(_))
}
