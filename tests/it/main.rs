//! End-to-end tests of the REST contract over real HTTP, each against a server
//! started in-process on SQLite and on a real PostgreSQL.

mod auth;
mod concurrency;
mod events;
mod health;
mod outbox;
mod polls;
mod sessions;
mod votes;
