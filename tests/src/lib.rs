//! Harness for pollcast's end-to-end tests: a real PostgreSQL cluster and real
//! nats-server processes started by the tests themselves, servers started in-process on `127.0.0.1:0` against SQLite or
//! PostgreSQL, an HTTP client speaking the contract, and a stream wrapper that can
//! be switched off to simulate an outage.

pub mod client;
pub mod frames;
pub mod nats;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod server;
pub mod stream;
pub mod ws;

pub use client::{Api, Reply};
pub use server::{Backend, TestServer};

/// Generates one `#[tokio::test]` per backend for each scenario
/// `async fn name(backend: Backend)` in scope: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await;
                }
            )+
        }
    };
}

/// Generates one `#[tokio::test]` per wire format for each scenario
/// `async fn name(format: ws::Format)` in scope: `json::name` and `msgpack::name`.
#[macro_export]
macro_rules! in_both_formats {
    ($($name:ident),+ $(,)?) => {
        mod json {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::ws::Format::Json).await;
                }
            )+
        }
        mod msgpack {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::ws::Format::MessagePack).await;
                }
            )+
        }
    };
}

/// Held by tests that load the machine (hundreds of clients) and by tests that
/// assert latency bounds, so the two never run at the same time: a latency
/// assertion should measure pollcast, not a neighbouring load test.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Waits (at most 30 s) until `counter` reaches `n`: a test's background load
/// has got that far.
pub async fn reached(counter: &std::sync::atomic::AtomicUsize, n: usize) {
    use std::sync::atomic::Ordering;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while counter.load(Ordering::SeqCst) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck at {}",
            counter.load(Ordering::SeqCst)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
