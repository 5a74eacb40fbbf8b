//! End-to-end tests of the REST contract over real HTTP, each against a server
//! started in-process on SQLite and on a real PostgreSQL.

mod auth;
mod concurrency;
mod events;
mod health;
mod migrations;
mod nats_configs;
mod outbox;
mod polls;
mod properties;
mod rate_limits;
mod sessions;
mod stream_jetstream;
mod votes;
mod ws_connection;
mod ws_presence;
mod ws_replay;
mod ws_slow_consumer;
