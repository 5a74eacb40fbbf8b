//! pollcast across regions: three single-server NATS regions joined by gateways
//! into one JetStream super-cluster, every gateway link through a proxy that adds
//! 40 ms each way. The api runs in `eu`, where the events stream lives; an edge
//! runs in each of `us` and `ap` and reads from its region's mirror. All of it is
//! the real binary over real sockets.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use pollcast_tests::client::{self, Presenter, id_of, option_id, session_with_voters, vote_counts};
use pollcast_tests::frames::{
    assert_consecutive, assert_same_run, count, listen, positions, until,
};
use pollcast_tests::nats::NatsSuperCluster;
use pollcast_tests::process::Pollcast;
use pollcast_tests::ws::Listening;
use pollcast_tests::{Api, exclusive, reached};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_pollcast");
const SECRET: &str = "pollcast multi-region test secret";
/// What one ocean crossing costs on the gateway links: 40 ms, or
/// `POLLCAST_TEST_OCEAN_MS` (benchmarks compare with 0).
fn ocean() -> Duration {
    let ms = std::env::var("POLLCAST_TEST_OCEAN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    Duration::from_millis(ms)
}
/// How long a region may take to catch up after its link or server returns (a
/// mirror notices a stalled origin consumer within seconds and starts again).
const CATCH_UP: Duration = Duration::from_secs(60);

/// The api in `eu`, an edge in `us` and one in `ap`.
struct World {
    nats: NatsSuperCluster,
    api: Pollcast,
    us: Pollcast,
    ap: Pollcast,
    _data: tempfile::TempDir,
}

impl World {
    async fn start() -> World {
        let nats = NatsSuperCluster::start(&["eu", "us", "ap"], ocean());
        let data = tempfile::tempdir().expect("temp dir");
        let data_dir = data.path().display().to_string();
        let env = [("POLLCAST_LOG", "info")];
        let eu = nats.url("eu");
        let api = Pollcast::serve(
            BIN,
            &[
                "--role",
                "api",
                "--region",
                "eu",
                "--nats-url",
                &eu,
                "--secret",
                SECRET,
                "--data-dir",
                &data_dir,
                "--presence-flush-ms",
                "200",
            ],
            &env,
        )
        .await;
        api.wait_ready(200).await;
        let edge = |region: &'static str| {
            let url = nats.url(region);
            async move {
                let args = [
                    "--role",
                    "edge",
                    "--region",
                    region,
                    "--nats-url",
                    &url,
                    "--secret",
                    SECRET,
                ];
                Pollcast::serve(BIN, &args, &env).await
            }
        };
        let us = edge("us").await;
        let ap = edge("ap").await;
        us.wait_ready(200).await;
        ap.wait_ready(200).await;
        World {
            nats,
            api,
            us,
            ap,
            _data: data,
        }
    }

    fn rest(&self) -> &Api {
        &self.api.api
    }
}

/// One vote per token on option 0, eight at a time, each accepted; counts
/// answers in `done`.
async fn vote_all(api: Api, poll: Value, tokens: Vec<String>, done: Arc<AtomicUsize>) {
    let (poll_id, option) = (id_of(&poll), option_id(&poll, 0));
    let statuses = client::vote_all(api, poll_id, option, tokens, done).await;
    assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");
}

async fn close_poll(api: &Api, p: &Presenter, poll: &Value) {
    api.act(&format!("/api/polls/{}/close", id_of(poll)), Some(&p.token))
        .await
        .expect(200);
}

/// The first envelope to arrive within `wait` (a region catching up).
async fn first_within(client: &mut Listening, wait: Duration) -> Value {
    client
        .envelope_within(wait)
        .await
        .unwrap_or_else(|| panic!("nothing arrived within {wait:?}"))
}

/// Envelopes until (and including) the first of `event_type`, each allowed
/// [`CATCH_UP`] (a region catching up may pause longer than `until` waits).
async fn until_caught_up(client: &mut Listening, event_type: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = first_within(client, CATCH_UP).await;
        let done = frame["eventType"] == event_type;
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

/// `(cluster the stream lives in, its mirror's name if any)` as JetStream
/// reports it for `stream`, asked through `url`.
async fn stream_cluster(url: &str, stream: &str) -> (String, Option<String>) {
    let client = async_nats::connect(url).await.expect("nats client");
    let reply = client
        .request(format!("$JS.API.STREAM.INFO.{stream}"), "".into())
        .await
        .expect("stream info");
    let info: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    (
        info["cluster"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        info["config"]["mirror"]["name"].as_str().map(str::to_owned),
    )
}

/// The cumulative buckets `(le, count)` of `pollcast_event_delivery_seconds` on
/// an edge, summed over event types; checks every series carries `region`.
async fn delivery_buckets(edge: &Pollcast, region: &str) -> Vec<(f64, u64)> {
    let text = reqwest::get(format!("http://{}/metrics", edge.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("pollcast_event_delivery_seconds_bucket{") else {
            continue;
        };
        assert!(rest.contains(&format!("region=\"{region}\"")), "{line}");
        let le = rest
            .split("le=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("le label");
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect("bound")
        };
        let n = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .expect("count");
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, total)) => *total += n,
            None => buckets.push((le, n)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of what was recorded between two readings of the buckets,
/// interpolated within a bucket as Prometheus' `histogram_quantile` does; and
/// how many samples that was.
fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> (f64, u64) {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let old = before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            (le, n - old)
        })
        .collect();
    let total = delta.last().map_or(0, |b| b.1);
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(bound, n) in &delta {
        if n as f64 >= rank {
            if bound.is_infinite() {
                return (lower.0, total);
            }
            let within = (rank - lower.1 as f64) / ((n - lower.1).max(1) as f64);
            return (lower.0 + (bound - lower.0) * within, total);
        }
        lower = (bound, n);
    }
    (f64::NAN, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_serve_the_same_sequence_survive_a_cut_link_and_a_lost_server() {
    let _guard = exclusive().await;
    let mut w = World::start().await;

    // The stream lives where the api is; each edge region has a mirror of it.
    let (home, _) = stream_cluster(&w.nats.url("eu"), "POLLCAST_EVENTS").await;
    assert_eq!(home, "eu");
    for region in ["us", "ap"] {
        let mirror = format!("POLLCAST_EVENTS_MIRROR_{region}");
        let (cluster, origin) = stream_cluster(&w.nats.url(region), &mirror).await;
        assert_eq!(cluster, region, "{mirror} is placed in its own region");
        assert_eq!(origin.as_deref(), Some("POLLCAST_EVENTS"));
    }

    // 1. Both regions see the same events, with the same ids, in the same order.
    let (p, poll, tokens) = session_with_voters(w.rest(), 20).await;
    let mut on_us = listen(&w.us, &p, None).await;
    let mut on_ap = listen(&w.ap, &p, None).await;
    vote_all(w.rest().clone(), poll.clone(), tokens, Arc::default()).await;
    close_poll(w.rest(), &p, &poll).await;
    let seen_us = until(&mut on_us, "poll:closed").await;
    let seen_ap = until(&mut on_ap, "poll:closed").await;
    assert_same_run(&p.session_id, &seen_us, &seen_ap);
    assert_eq!(count(&seen_us, "vote:accepted"), 20);
    assert_eq!(count(&seen_ap, "vote:accepted"), 20);

    // What an ocean costs, in steady state: each edge's own delivery histogram
    // over one more poll's worth of votes.
    let before = [
        delivery_buckets(&w.us, "us").await,
        delivery_buckets(&w.ap, "ap").await,
    ];
    let measured = w.rest().active_poll(&p).await;
    let voters: Vec<String> = {
        let mut voters = Vec::new();
        for i in 0..40 {
            voters.push(w.rest().join(&p.code, &format!("measured {i}")).await.token);
        }
        voters
    };
    vote_all(w.rest().clone(), measured.clone(), voters, Arc::default()).await;
    close_poll(w.rest(), &p, &measured).await;
    let measured_us = until(&mut on_us, "poll:closed").await;
    let measured_ap = until(&mut on_ap, "poll:closed").await;
    assert_eq!(measured_us, measured_ap, "both were up to date");
    for (edge, region, before) in [(&w.us, "us", &before[0]), (&w.ap, "ap", &before[1])] {
        let after = delivery_buckets(edge, region).await;
        let (p50, n) = quantile(before, &after, 0.5);
        let (p99, _) = quantile(before, &after, 0.99);
        assert!(n > 0, "{region} recorded its deliveries");
        eprintln!(
            "delivery in {region} ({:?} each way to eu): p50 {:.1} ms, p99 {:.1} ms over {n} frames",
            ocean(),
            p50 * 1000.0,
            p99 * 1000.0
        );
    }
    // Everything since the later of the two starts.
    let (mut seen_us, mut seen_ap) = (seen_us, seen_ap);
    seen_us.extend(measured_us);
    seen_ap.extend(measured_ap);
    let later = seen_ap.len().min(seen_us.len());
    let seen_us = seen_us[seen_us.len() - later..].to_vec();

    // 2. A client that read half of it in us carries on in ap: exactly the rest.
    let half = seen_us.len() / 2;
    let last_id = seen_us[half - 1]["eventId"]
        .as_str()
        .expect("id")
        .to_owned();
    let mut moved = listen(&w.ap, &p, Some(&last_id)).await;
    let replay = until(&mut moved, "connection:reconnected").await;
    assert_eq!(replay.last().expect("frame")["payload"]["recovered"], true);
    assert_eq!(
        &replay[..replay.len() - 1],
        &seen_us[half..],
        "exactly the rest"
    );
    drop(moved);

    // 3. The links into ap are cut. us goes on; ap keeps its sockets, stays
    //    ready (it serves what its mirror holds) and receives nothing meanwhile.
    w.nats.gateway("ap").cut();
    let second = w
        .rest()
        .create_poll(
            &p,
            json!({ "question": "During the cut?", "options": ["a", "b"] }),
        )
        .await;
    let during = until(&mut on_us, "poll:created").await;
    assert_eq!(during.len(), 1, "{during:?}");
    assert_eq!(during[0]["payload"]["poll"]["id"], second["id"]);
    assert!(
        on_ap
            .envelope_within(Duration::from_millis(500))
            .await
            .is_none(),
        "the cut region cannot have seen the new poll"
    );
    w.ap.wait_ready(200).await;
    // A client moving from us to ap during the cut, ahead of ap's mirror: it
    // has everything it claims, so nothing is missing and nothing is replayed.
    let newest = during[0]["eventId"].as_str().expect("id").to_owned();
    let mut ahead = listen(&w.ap, &p, Some(&newest)).await;
    let replay = until(&mut ahead, "connection:reconnected").await;
    assert_eq!(replay.len(), 1, "nothing to replay: {replay:?}");
    assert_eq!(replay[0]["payload"]["recovered"], true);
    assert_eq!(replay[0]["payload"]["replayed"], 0);

    // The link returns: ap catches up in order, and the client that came in
    // ahead gets what follows its id and nothing twice.
    w.nats.gateway("ap").restore();
    let restored = Instant::now();
    let caught_up = first_within(&mut on_ap, CATCH_UP).await;
    eprintln!(
        "ap caught up {:?} after its links returned",
        restored.elapsed()
    );
    assert_eq!(caught_up, during[0], "ap resumes exactly where it stopped");
    let third = w
        .rest()
        .create_poll(
            &p,
            json!({ "question": "After the cut?", "options": ["a", "b"] }),
        )
        .await;
    let after_us = until(&mut on_us, "poll:created").await;
    let after_ap = until(&mut on_ap, "poll:created").await;
    assert_eq!(after_us, after_ap);
    assert_eq!(
        after_us.last().expect("frame")["payload"]["poll"]["id"],
        third["id"]
    );
    let next_ahead = first_within(&mut ahead, CATCH_UP).await;
    assert_eq!(
        next_ahead, after_us[0],
        "the first event after its id, once"
    );
    let mut all_ap = positions(&p.session_id, &seen_ap);
    all_ap.extend(positions(&p.session_id, &[caught_up]));
    all_ap.extend(positions(&p.session_id, &after_ap));
    assert_consecutive(&all_ap);
    drop(ahead);

    // 4. ap's nats-server dies mid-storm and comes back: its edge catches up in
    //    order and misses nothing.
    let (p2, poll2, tokens) = session_with_voters(w.rest(), 60).await;
    let mut storm_ap = listen(&w.ap, &p2, None).await;
    let mut storm_us = listen(&w.us, &p2, None).await;
    let done = Arc::new(AtomicUsize::new(0));
    let storm = tokio::spawn(vote_all(
        w.rest().clone(),
        poll2.clone(),
        tokens,
        Arc::clone(&done),
    ));
    reached(&done, 15).await;
    w.nats.server("ap").kill();
    reached(&done, 40).await;
    w.nats.server("ap").start_again();
    let restarted = Instant::now();
    storm.await.expect("storm");
    close_poll(w.rest(), &p2, &poll2).await;
    let got_ap = until_caught_up(&mut storm_ap, "poll:closed").await;
    eprintln!(
        "ap caught up {:?} after its nats-server restarted",
        restarted.elapsed()
    );
    let got_us = until(&mut storm_us, "poll:closed").await;
    assert_same_run(&p2.session_id, &got_ap, &got_us);
    assert_eq!(count(&got_ap, "vote:accepted"), 60, "every vote, once");
    assert_eq!(count(&got_us, "vote:accepted"), 60, "every vote, once");
    let results = w.rest().results(&id_of(&poll2), &p2.token).await;
    assert_eq!(vote_counts(&results), vec![60, 0, 0]);

    drop((on_us, on_ap, storm_us, storm_ap));
}
