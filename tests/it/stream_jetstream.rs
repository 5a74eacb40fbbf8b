//! The JetStream engine against a real nats-server: the conformance suite every
//! engine passes, and what only JetStream can get wrong (retried publishes answered
//! either way, a second writer, reads deep in a long history).

use std::sync::Arc;
use std::time::Duration;

use pollcast_stream::conformance::event;
use pollcast_stream::{
    EventStream, JetStreamStream, NatsConfig, Published, Retention, StreamError,
};
use pollcast_tests::nats::{NatsCluster, NatsServer};
use uuid::Uuid;

/// Stream and subject names of their own, so engines sharing a server never see
/// each other's events or presence signals.
fn config(urls: Vec<String>) -> NatsConfig {
    let unique = Uuid::now_v7().simple().to_string();
    NatsConfig {
        urls,
        stream_name: format!("T_{unique}"),
        subject_prefix: format!("t{unique}"),
        ..NatsConfig::default()
    }
}

async fn engine(retention: Retention) -> Arc<JetStreamStream> {
    let server = NatsServer::shared();
    Arc::new(
        JetStreamStream::connect(config(vec![server.url()]), retention)
            .await
            .expect("JetStream engine connects"),
    )
}

mod conformance {
    pollcast_stream::stream_conformance_tests!(|retention| super::engine(retention));
}

/// Two engines over one stream are two api nodes: the second one's view of the
/// tail is stale, and JetStream's expected-sequence check must catch it.
#[tokio::test]
async fn a_second_writer_with_a_stale_tail_gets_duplicate_or_out_of_order_never_a_fork() {
    let server = NatsServer::shared();
    let config = config(vec![server.url()]);
    let a = JetStreamStream::connect(config.clone(), Retention::default())
        .await
        .expect("a");
    let b = JetStreamStream::connect(config, Retention::default())
        .await
        .expect("b");
    let session = Uuid::now_v7();
    assert_eq!(
        a.publish(event(session, 1)).await.ok(),
        Some(Published::Appended)
    );
    // b learns the tail (position 1).
    assert_eq!(
        b.publish(event(session, 1)).await.ok(),
        Some(Published::Duplicate)
    );
    for p in 2..=4 {
        assert_eq!(
            a.publish(event(session, p)).await.ok(),
            Some(Published::Appended)
        );
    }
    // b still believes the tail is 1: its retry of 2 is a duplicate, its 6 a gap.
    assert_eq!(
        b.publish(event(session, 2)).await.ok(),
        Some(Published::Duplicate)
    );
    assert!(matches!(
        b.publish(event(session, 6)).await,
        Err(StreamError::OutOfOrder {
            expected: 5,
            got: 6,
            ..
        })
    ));
    assert_eq!(
        b.publish(event(session, 5)).await.ok(),
        Some(Published::Appended)
    );
    let read = a.read_after(session, 0, 100).await.expect("read");
    let positions: Vec<u64> = read.events.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![1, 2, 3, 4, 5]);
}

/// A publish whose ack was lost comes again, from a relay whose idea of the tail
/// is older than the stream's. On a standalone server the expected-sequence check
/// answers first (wrong last sequence); on a cluster the msg-id window does (a
/// duplicate ack). Both must read as `Duplicate`, and the log must hold it once.
async fn retried_publish_is_a_duplicate(urls: Vec<String>, replicas: usize) {
    let mut config = config(urls);
    config.replicas = replicas;
    let a = JetStreamStream::connect(config.clone(), Retention::default())
        .await
        .expect("engine");
    let b = JetStreamStream::connect(config, Retention::default())
        .await
        .expect("engine");
    let session = Uuid::now_v7();
    for p in 1..=2 {
        assert_eq!(
            a.publish(event(session, p)).await.ok(),
            Some(Published::Appended)
        );
    }
    // b learns the tail (position 2) and keeps it.
    assert_eq!(
        b.publish(event(session, 2)).await.ok(),
        Some(Published::Duplicate)
    );
    let third = event(session, 3);
    assert_eq!(
        a.publish(third.clone()).await.ok(),
        Some(Published::Appended)
    );
    // b sends the very same message (same msg id) with a stale expectation, so
    // the server, not b, has to answer.
    assert_eq!(b.publish(third).await.ok(), Some(Published::Duplicate));
    let all = b.read_after(session, 0, 10).await.expect("read");
    let positions: Vec<u64> = all.events.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![1, 2, 3]);
}

#[tokio::test]
async fn retried_publish_is_a_duplicate_on_a_standalone_server() {
    retried_publish_is_a_duplicate(vec![NatsServer::shared().url()], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_publish_is_a_duplicate_on_a_three_node_cluster_with_r3() {
    let cluster = NatsCluster::start();
    retried_publish_is_a_duplicate(cluster.urls(), 3).await;
}

/// Reads from anywhere in a long history, interleaved with other sessions, come
/// back complete and in order (the search by stream sequence finds the start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_any_position_of_a_long_interleaved_history_are_exact() {
    let engine = engine(Retention::default()).await;
    let (busy, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mut other_position = 0;
    for p in 1..=1500u64 {
        engine.publish(event(busy, p)).await.expect("publish");
        // Uneven interleaving, so sequences are not proportional to positions.
        if p % 7 < 3 || (500..700).contains(&p) {
            other_position += 1;
            engine
                .publish(event(other, other_position))
                .await
                .expect("publish");
        }
    }
    for after in [0u64, 1, 2, 499, 500, 650, 1000, 1337, 1498, 1499, 1500] {
        let read =
            tokio::time::timeout(Duration::from_secs(10), engine.read_after(busy, after, 300))
                .await
                .expect("read in time")
                .expect("read");
        let expected: Vec<u64> = (after + 1..=1500).take(300).collect();
        let got: Vec<u64> = read.events.iter().map(|e| e.position).collect();
        assert_eq!(got, expected, "after {after}");
        assert!(!read.truncated);
        assert!(read.events.iter().all(|e| e.session_id == busy));
    }
}

/// `--nats-token` reaches a server with token auth; without it the engine is
/// refused, with a reason.
#[tokio::test]
async fn a_token_protected_server_takes_the_token_and_refuses_without_it() {
    let server = NatsServer::start_with(&["--auth", "pollcast-test-token"]);
    let mut config = config(vec![server.url()]);
    let refused = JetStreamStream::connect(config.clone(), Retention::default()).await;
    assert!(
        matches!(&refused, Err(StreamError::Unavailable(why)) if why.contains("connecting to NATS")),
        "{:?}",
        refused.err()
    );
    config.token = Some("pollcast-test-token".into());
    let stream = JetStreamStream::connect(config, Retention::default())
        .await
        .expect("connects with the token");
    let session = Uuid::now_v7();
    assert_eq!(
        stream.publish(event(session, 1)).await.ok(),
        Some(Published::Appended)
    );
    stream.ping().await.expect("ready");
}
