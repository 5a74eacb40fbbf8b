//! The JetStream engine against a real nats-server: the conformance suite every
//! engine passes, and what only JetStream can get wrong (retried publishes answered
//! either way, a second writer, runs as atomic batches, reads deep in a long
//! history).

use std::sync::Arc;
use std::time::Duration;

use pollcast_protocol::SessionEvent;
use pollcast_stream::conformance::event;
use pollcast_stream::{
    EventStream, JetStreamStream, NatsConfig, Published, Retention, StreamError,
};
use pollcast_tests::nats::{NatsCluster, NatsServer, NatsSuperCluster};
use uuid::Uuid;

/// Stream and subject names of their own, so engines sharing a server never see
/// each other's events or presence signals. Every run of two or more events goes
/// as an atomic batch, so the conformance suite checks batches too.
fn config(urls: Vec<String>) -> NatsConfig {
    let unique = Uuid::now_v7().simple().to_string();
    NatsConfig {
        urls,
        stream_name: format!("T_{unique}"),
        subject_prefix: format!("t{unique}"),
        batch_min: 2,
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

/// The positions and contents a session's log holds, read from its start.
async fn log_of(stream: &JetStreamStream, session: Uuid) -> Vec<SessionEvent> {
    let read = stream.read_after(session, 0, 1000).await.expect("read");
    read.events.iter().map(|e| (**e).clone()).collect()
}

/// A run from an api node whose idea of the tail is stale (another node appended
/// since, or its own earlier batch was stored and the ack lost): JetStream
/// refuses the batch on its first message's expectation, the engine reads the
/// tail and sends only what is new. Nothing is stored twice or out of order.
async fn a_run_from_a_stale_tail_appends_only_what_is_new(urls: Vec<String>, replicas: usize) {
    let mut config = config(urls.clone());
    config.replicas = replicas;
    let a = JetStreamStream::connect(config.clone(), Retention::default())
        .await
        .expect("a");
    let b = JetStreamStream::connect(config.clone(), Retention::default())
        .await
        .expect("b");
    let session = Uuid::now_v7();
    publish_whole(&a, runs(session, 1..=2)).await;
    // b learns the tail (position 2) and keeps it.
    publish_whole(&b, runs(session, 1..=2)).await;
    let a_run = runs(session, 3..=6);
    publish_whole(&a, a_run.clone()).await;
    // b's own events for 3..=9: 3..=6 are a's already, 7..=9 are new.
    let b_run = runs(session, 3..=9);
    publish_whole(&b, b_run.clone()).await;
    let log = log_of(&a, session).await;
    let positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=9).collect::<Vec<_>>());
    assert_eq!(log[2..6], a_run[..], "a's events kept");
    assert_eq!(log[6..], b_run[4..], "b's new events after them");
    // Readers skip a position stored twice, so only the stream itself can show
    // that nothing was.
    let stored = raw_stream(urls[0].clone(), &config.stream_name).await;
    assert_eq!(stored.cached_info().state.messages, 9);
}

async fn raw_stream(url: String, name: &str) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(url).await.expect("raw client");
    async_nats::jetstream::new(client)
        .get_stream(name)
        .await
        .expect("stream")
}

fn runs(session: Uuid, positions: std::ops::RangeInclusive<u64>) -> Vec<SessionEvent> {
    positions.map(|p| event(session, p)).collect()
}

/// Publishes `events` as a run and checks the log took all of them (appended or
/// already there).
async fn publish_whole(stream: &JetStreamStream, events: Vec<SessionEvent>) {
    let count = events.len();
    let run = stream.publish_run(events).await;
    assert!(run.stopped.is_none(), "{:?}", run.stopped);
    assert_eq!(run.taken, count);
}

#[tokio::test]
async fn a_run_from_a_stale_tail_appends_only_what_is_new_on_a_standalone_server() {
    a_run_from_a_stale_tail_appends_only_what_is_new(vec![NatsServer::shared().url()], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_from_a_stale_tail_appends_only_what_is_new_on_a_three_node_cluster_with_r3() {
    let cluster = NatsCluster::start();
    a_run_from_a_stale_tail_appends_only_what_is_new(cluster.urls(), 3).await;
}

/// The headers JetStream stored with the first `count` messages of stream `name`.
async fn stored_headers(url: String, name: &str, count: u64) -> Vec<async_nats::HeaderMap> {
    let stream = raw_stream(url, name).await;
    let mut headers = Vec::new();
    for sequence in 1..=count {
        let message = stream.get_raw_message(sequence).await.expect("message");
        headers.push(message.headers);
    }
    headers
}

fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_owned())
}

/// A run goes as one atomic batch (one acknowledgement for all of it): its
/// messages carry one batch id, numbered in order; a lone event goes as before,
/// with its event id as message id.
#[tokio::test]
async fn a_run_is_stored_as_one_atomic_batch() {
    let server = NatsServer::shared();
    let config = config(vec![server.url()]);
    let stream = JetStreamStream::connect(config.clone(), Retention::default())
        .await
        .expect("engine");
    let session = Uuid::now_v7();
    assert_eq!(
        stream.publish(event(session, 1)).await.ok(),
        Some(Published::Appended)
    );
    publish_whole(&stream, runs(session, 2..=9)).await;
    let headers = stored_headers(server.url(), &config.stream_name, 9).await;
    assert!(header(&headers[0], "Nats-Batch-Id").is_none());
    assert!(header(&headers[0], "Nats-Msg-Id").is_some());
    let batch = header(&headers[1], "Nats-Batch-Id").expect("a batch id");
    for (number, stored) in (1..).zip(&headers[1..]) {
        assert_eq!(header(stored, "Nats-Batch-Id").as_ref(), Some(&batch));
        assert_eq!(
            header(stored, "Nats-Batch-Sequence"),
            Some(number.to_string())
        );
    }
}

/// A run shorter than `batch_min` goes one event per acknowledgement: for a few
/// events a batch costs the server more than single publishes.
#[tokio::test]
async fn a_run_shorter_than_batch_min_goes_one_event_at_a_time() {
    let server = NatsServer::shared();
    let config = NatsConfig {
        batch_min: 9,
        ..config(vec![server.url()])
    };
    let stream = JetStreamStream::connect(config.clone(), Retention::default())
        .await
        .expect("engine");
    let session = Uuid::now_v7();
    publish_whole(&stream, runs(session, 1..=8)).await;
    publish_whole(&stream, runs(session, 9..=17)).await;
    let headers = stored_headers(server.url(), &config.stream_name, 17).await;
    assert!(
        headers[..8]
            .iter()
            .all(|h| header(h, "Nats-Batch-Id").is_none())
    );
    assert!(
        headers[8..]
            .iter()
            .all(|h| header(h, "Nats-Batch-Id").is_some())
    );
}

/// A stream that stops taking batches (an operator turned `allow_atomic` off
/// after the engine started) refuses the next one; the run then goes one event at
/// a time, exactly, and so do later runs.
#[tokio::test]
async fn a_run_on_a_stream_that_refuses_batches_goes_one_event_at_a_time() {
    let server = NatsServer::shared();
    let config = config(vec![server.url()]);
    let stream = JetStreamStream::connect(config.clone(), Retention::default())
        .await
        .expect("engine");
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("raw"));
    let mut definition = js
        .get_stream(&config.stream_name)
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    definition.allow_atomic_publish = false;
    js.update_stream(definition).await.expect("batches off");
    let session = Uuid::now_v7();
    let sent = runs(session, 1..=8);
    publish_whole(&stream, sent[..5].to_vec()).await;
    publish_whole(&stream, sent[5..].to_vec()).await;
    assert_eq!(log_of(&stream, session).await, sent);
    let headers = stored_headers(server.url(), &config.stream_name, 8).await;
    assert!(headers.iter().all(|h| header(h, "Nats-Batch-Id").is_none()));
}

/// An edge in another region reads from its region's mirror, which copies what
/// the origin stored: a backlog stored as atomic batches reaches the mirror's
/// readers and live subscribers whole and in order, like single publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_reach_another_regions_mirror_whole_and_in_order() {
    let regions = NatsSuperCluster::start(&["eu", "us"], Duration::from_millis(1));
    let origin = config(vec![regions.url("eu")]);
    let api = JetStreamStream::connect(origin.clone(), Retention::default())
        .await
        .expect("api engine in eu");
    let edge = JetStreamStream::connect(
        NatsConfig {
            urls: vec![regions.url("us")],
            manage_streams: false,
            regional_reads: true,
            ..origin
        },
        Retention::default(),
    )
    .await
    .expect("edge engine in us");
    let session = Uuid::now_v7();
    let mut live = edge.subscribe(session).await.expect("subscribe in us");
    let sent = runs(session, 1..=150);
    // A lone first event, then batches: the mirror sees both kinds.
    publish_whole(&api, sent[..1].to_vec()).await;
    publish_whole(&api, sent[1..].to_vec()).await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.last() != Some(&150) {
        match tokio::time::timeout_at(deadline, live.next()).await {
            Ok(Ok(event)) => seen.push(event.position),
            // Core delivery may skip; the mirror's log below is the judge.
            Ok(Err(StreamError::Lagged { .. })) => {}
            Ok(Err(err)) => panic!("live: {err}"),
            Err(_) => panic!("live events in us stopped at {:?}", seen.last()),
        }
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "live order: {seen:?}");
    let mut log = Vec::new();
    while log.len() < sent.len() {
        let read = edge
            .read_after(session, log.len() as u64, 1000)
            .await
            .expect("read the mirror");
        assert!(
            !read.events.is_empty(),
            "mirror read stopped at {}",
            log.len()
        );
        log.extend(read.events.iter().map(|e| (**e).clone()));
    }
    assert_eq!(log, sent);
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
