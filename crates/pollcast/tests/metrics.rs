//! `/metrics` of the real binary: every metric described and present before any
//! traffic, and each one moving when the thing it counts happens.

use std::time::{Duration, Instant};

use pollcast::telemetry::{COUNTERS, EVENT_TYPES, GAUGES, HISTOGRAMS};
use pollcast_tests::client::{id_of, option_id};
use pollcast_tests::process::Pollcast;
use pollcast_tests::ws::{Format, WsClient, query};

const BIN: &str = env!("CARGO_BIN_EXE_pollcast");

async fn scrape(server: &Pollcast) -> String {
    reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text")
}

/// The value of the series `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = series_name == name
                && labels.iter().all(|(k, v)| {
                    series_labels
                        .split(',')
                        .any(|l| l == format!("{k}=\"{v}\""))
                });
            matches.then(|| value.parse().ok()).flatten()
        })
}

/// Scrapes until `check` holds (metrics trail the events by the recorder's
/// upkeep, up to a second), failing after 10 s with the last scrape.
async fn until(server: &Pollcast, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(server).await;
        if check(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never held; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn at_least(text: &str, name: &str, labels: &[(&str, &str)], n: f64) -> bool {
    sample(text, name, labels).is_some_and(|v| v >= n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_described_from_the_start_and_moves_with_what_it_counts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let server = Pollcast::serve(BIN, &["--data-dir", &data_dir], &[]).await;

    // Before any traffic: described, typed, present, at zero.
    let text = scrape(&server).await;
    for (name, _) in HISTOGRAMS.iter().chain(&COUNTERS).chain(&GAUGES) {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}"
        );
    }
    for (name, _) in HISTOGRAMS {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name} is not a histogram"
        );
    }
    for event_type in EVENT_TYPES {
        let bucket = [("event_type", event_type), ("le", "0.1")];
        assert_eq!(
            sample(&text, "pollcast_event_delivery_seconds_bucket", &bucket),
            Some(0.0),
            "no 100 ms bucket for {event_type}"
        );
    }
    assert_eq!(sample(&text, "pollcast_ws_connections", &[]), Some(0.0));

    // Traffic: a presenter screen, a voter, a vote and a duplicate.
    let api = &server.api;
    let p = api.started_session().await;
    let q = query(&p.session_id, &p.token, None, Format::Json);
    let mut screen = WsClient::connect(server.addr, &q).await;
    screen.expect("connection:established").await;
    let ada = api.join(&p.code, "Ada").await;
    let poll = api.active_poll(&p).await;
    let (poll_id, option) = (id_of(&poll), option_id(&poll, 0));
    api.vote(&poll_id, &ada.token, &[option.as_str()])
        .await
        .expect(201);
    api.vote(&poll_id, &ada.token, &[option.as_str()])
        .await
        .expect_error(409, "already_voted");
    let last = loop {
        let frame = screen.envelope().await;
        if frame["eventType"] == "results:updated" {
            break frame["eventId"].as_str().expect("event id").to_owned();
        }
    };
    until(
        &server,
        "votes, deliveries, frames and gauges counted",
        |text| {
            let vote = |outcome| sample(text, "pollcast_votes_total", &[("outcome", outcome)]);
            vote("accepted") == Some(1.0)
                && vote("already_voted") == Some(1.0)
                && at_least(
                    text,
                    "pollcast_event_delivery_seconds_count",
                    &[("event_type", "poll:activated")],
                    1.0,
                )
                && at_least(
                    text,
                    "pollcast_event_delivery_seconds_count",
                    &[("event_type", "results:updated")],
                    1.0,
                )
                && at_least(
                    text,
                    "pollcast_ws_frames_sent_total",
                    &[("format", "json")],
                    5.0,
                )
                && at_least(text, "pollcast_event_publish_seconds_count", &[], 6.0)
                && at_least(
                    text,
                    "pollcast_http_request_duration_seconds_count",
                    &[("route", "/api/polls/{poll_id}/votes"), ("status", "201")],
                    1.0,
                )
                && sample(text, "pollcast_ws_connections", &[]) == Some(1.0)
                && sample(text, "pollcast_ws_rooms", &[]) == Some(1.0)
                && sample(text, "pollcast_outbox_pending", &[]) == Some(0.0)
        },
    )
    .await;

    // A replay, a refusal, and the screen leaving.
    let q = query(&p.session_id, &p.token, Some(&last), Format::Json);
    let mut again = WsClient::connect(server.addr, &q).await;
    again.expect("connection:established").await;
    again.expect("connection:reconnected").await;
    let forged = query(&p.session_id, "forged", None, Format::Json);
    let mut refused = WsClient::connect(server.addr, &forged).await;
    refused.expect_refusal("unauthorized", 4401).await;
    drop((screen, again));
    until(&server, "replay, close and disconnects counted", |text| {
        sample(text, "pollcast_replays_total", &[("recovered", "true")]) == Some(1.0)
            // The screen kept the room open: the replay came from its memory.
            && sample(text, "pollcast_edge_replay_sources_total", &[("source", "room")])
                == Some(1.0)
            && sample(text, "pollcast_ws_closes_total", &[("code", "4401")]) == Some(1.0)
            && sample(
                text,
                "pollcast_edge_refused_total",
                &[("code", "unauthorized")],
            ) == Some(1.0)
            && sample(text, "pollcast_ws_connections", &[]) == Some(0.0)
    })
    .await;
}

/// `--region` labels every series, so one dashboard tells the regions apart.
#[tokio::test]
async fn a_region_labels_every_series() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let server = Pollcast::serve(BIN, &["--data-dir", &data_dir, "--region", "eu-west"], &[]).await;
    let text = scrape(&server).await;
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(samples.len() > 50, "too few series: {}", samples.len());
    for line in samples {
        assert!(line.contains("region=\"eu-west\""), "unlabelled: {line}");
    }
    let bucket = [
        ("event_type", "poll:activated"),
        ("le", "0.1"),
        ("region", "eu-west"),
    ];
    assert_eq!(
        sample(&text, "pollcast_event_delivery_seconds_bucket", &bucket),
        Some(0.0)
    );
}

/// A region name that could not be a label value is refused at start, saying why.
#[test]
fn a_malformed_region_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();
    let (status, output) = pollcast_tests::process::run(
        BIN,
        &["serve", "--data-dir", &data_dir, "--region", "eu west\""],
    );
    assert!(!status.success());
    assert!(output.contains("--region"), "{output}");
}
