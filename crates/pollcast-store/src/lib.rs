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
    connection, idempotency_key, option_tally, outbox, participant, poll, session, vote,
    vote_choice,
};
pub use sea_orm;

/// How SQLite makes commits durable (`PRAGMA synchronous` in WAL mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SqliteSync {
    /// Every commit is on disk before it is answered: an OS crash or power loss
    /// loses nothing that was answered 201. Group commit pays for it once per
    /// batch of votes.
    #[default]
    Full,
    /// Commits survive a crash of the process, not of the machine: the last
    /// commits before a power loss may be lost. Faster; choose it knowingly.
    Normal,
}

/// How to connect to the store.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Pool size for PostgreSQL (SQLite always uses one connection).
    pub max_connections: u32,
    /// SQLite's durability (ignored for PostgreSQL, whose own settings rule).
    pub sqlite_sync: SqliteSync,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            sqlite_sync: SqliteSync::Full,
        }
    }
}

/// Connects to `url` (`sqlite://…` or `postgres://…`) and applies pending migrations.
///
/// SQLite gets a single connection: it allows one writer at a time anyway, and one
/// connection turns lock contention (SQLITE_BUSY) into an orderly queue.
pub async fn connect(url: &str, store: StoreOptions) -> Result<DatabaseConnection, DbErr> {
    let max_connections = store.max_connections;
    let sqlite = url.starts_with("sqlite:");
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(if sqlite { 1 } else { max_connections.max(1) })
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    if sqlite {
        // sqlx pings a connection before lending it out, and SQLite's ping is a
        // round trip to the connection's own thread: two thread wake-ups per
        // transaction for a file that cannot hang up. sqlx still pings it when
        // it comes back to the pool, which replaces a connection whose thread died.
        options.test_before_acquire(false);
        // One connection for the process's life: its thread is pinned beside the
        // batch tasks' (pollcast-domain's `store_thread`), and a connection sqlx
        // replaced after its default 30 minutes would come on a thread not pinned.
        options.map_sqlx_sqlite_pool_opts(|pool| pool.max_lifetime(None).idle_timeout(None));
    }
    let db = Database::connect(options).await?;
    if sqlite {
        // WAL lets readers of the file (backups, `sqlite3` by an operator) coexist
        // with the server.
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
        db.execute_unprepared(match store.sqlite_sync {
            SqliteSync::Full => "PRAGMA synchronous=FULL",
            SqliteSync::Normal => "PRAGMA synchronous=NORMAL",
        })
        .await?;
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

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, Statement};

    use super::*;

    async fn synchronous(sync: SqliteSync) -> i64 {
        let options = StoreOptions {
            sqlite_sync: sync,
            ..StoreOptions::default()
        };
        let db = connect("sqlite::memory:", options).await.expect("connect");
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "PRAGMA synchronous",
            ))
            .await
            .expect("pragma")
            .expect("a row");
        row.try_get_by_index::<i64>(0).expect("a number")
    }

    #[tokio::test]
    async fn sqlite_is_durable_by_default_and_normal_only_when_asked() {
        assert_eq!(synchronous(SqliteSync::default()).await, 2, "FULL");
        assert_eq!(synchronous(SqliteSync::Normal).await, 1, "NORMAL");
    }
}
