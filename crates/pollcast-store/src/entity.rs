//! sea-orm entities, one table per module.

pub mod connection;
pub mod idempotency_key;
pub mod option_tally;
pub mod outbox;
pub mod participant;
pub mod poll;
pub mod session;
pub mod vote;
pub mod vote_choice;
