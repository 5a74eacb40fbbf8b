//! The Prometheus recorder: every metric pollcast records, described (`# HELP`)
//! and registered at start-up so dashboards and alerts see each series before
//! its first event, and latency as histograms (buckets, not client-side
//! quantiles) so a fleet's percentiles can be computed by summing nodes.
//!
//! The metrics are recorded where the thing happens (`metrics::counter!` and
//! friends in each crate); this file is the catalogue. A test of the binary checks
//! that every name here is on `/metrics` from the start.

use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, dense around the contract's 100 ms promise.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
];

/// How often recorded histogram samples are folded into their buckets. Samples
/// wait in a lock-free buffer until then, so this bounds that buffer to about a
/// second of frames.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The contract's domain event types, one delivery series each.
pub const EVENT_TYPES: [&str; 11] = [
    "session:created",
    "session:started",
    "session:ended",
    "poll:created",
    "poll:activated",
    "poll:closed",
    "vote:accepted",
    "vote:rejected",
    "results:updated",
    "participant:joined",
    "participant:disconnected",
];

/// Every histogram, with its `# HELP`.
pub const HISTOGRAMS: [(&str, &str); 8] = [
    (
        "pollcast_event_delivery_seconds",
        "Event commit to its frame written to a client socket, per live frame (the 100 ms promise)",
    ),
    (
        "pollcast_event_publish_seconds",
        "Event commit to the event stream's acknowledgement",
    ),
    (
        "pollcast_http_request_duration_seconds",
        "REST request latency by route template and status",
    ),
    (
        "pollcast_results_lag_seconds",
        "First vote not yet covered to the results:updated that covers it, committed",
    ),
    (
        "pollcast_edge_event_lag_seconds",
        "Event commit to the edge room handing it to its connections",
    ),
    (
        "pollcast_edge_fanout_seconds",
        "One event queued for every member of a room",
    ),
    (
        "pollcast_edge_replay_seconds",
        "One replay (connect with lastEventId, or resume)",
    ),
    (
        "pollcast_vote_batch_size",
        "Votes committed in one batch transaction",
    ),
];

/// Every counter, with its `# HELP`.
pub const COUNTERS: [(&str, &str); 15] = [
    (
        "pollcast_ws_frames_sent_total",
        "WebSocket data frames written to clients, by format",
    ),
    (
        "pollcast_ws_closes_total",
        "WebSocket connections closed by the server, by close code",
    ),
    (
        "pollcast_replays_total",
        "Replays served, by whether history still reached the asked position",
    ),
    (
        "pollcast_votes_total",
        "Votes answered, by outcome (accepted or the rejection's error code)",
    ),
    (
        "pollcast_http_timeouts_total",
        "HTTP connections or requests ended by a timeout, by kind (header_read, body_read)",
    ),
    (
        "pollcast_http_accept_errors_total",
        "Failed accepts (such as EMFILE); the listener pauses and goes on",
    ),
    ("pollcast_http_rate_limited_total", "Requests answered 429"),
    (
        "pollcast_edge_refused_total",
        "WebSocket connections refused at admission, by error code",
    ),
    (
        "pollcast_edge_slow_consumers_total",
        "WebSocket clients closed with 4500 for not reading",
    ),
    (
        "pollcast_edge_write_timeouts_total",
        "WebSocket clients dropped for a write that did not complete",
    ),
    (
        "pollcast_edge_replay_sources_total",
        "Replays served from the room's recent events in memory alone (room), or reading the event stream (log)",
    ),
    (
        "pollcast_edge_event_encodings_total",
        "Events encoded for the wire (once per event and format on each edge)",
    ),
    (
        "pollcast_cleanup_rows_total",
        "Rows removed by retention, by table",
    ),
    (
        "pollcast_presence_swept_total",
        "Connections closed because no edge reported them",
    ),
    (
        "pollcast_presence_dropped_total",
        "Presence signals an edge could not hand to the stream",
    ),
];

/// Every gauge, with its `# HELP`.
pub const GAUGES: [(&str, &str); 3] = [
    (
        "pollcast_ws_connections",
        "Open WebSocket connections on this node",
    ),
    (
        "pollcast_ws_rooms",
        "Session rooms open on this node (with members, or for a short while after the last left)",
    ),
    (
        "pollcast_outbox_pending",
        "Committed events not yet published to the event stream, as the relay's last sweep found them (pending over a second; all of them after a failure)",
    ),
];

/// Installs the process-wide recorder and registers every metric, labelled with
/// `region` when one is given. Call it once, before anything records, and run
/// [`upkeep`] beside it.
pub fn install(region: Option<&str>) -> Result<PrometheusHandle, BuildError> {
    let mut builder = PrometheusBuilder::new();
    if let Some(region) = region {
        builder = builder.add_global_label("region", region);
    }
    let handle = builder
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("pollcast_vote_batch_size".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
        )?
        .install_recorder()?;
    for (name, help) in HISTOGRAMS {
        let unit = if name.ends_with("_seconds") {
            Unit::Seconds
        } else {
            Unit::Count
        };
        metrics::describe_histogram!(name, unit, help);
    }
    for (name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for (name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
    }
    register();
    Ok(handle)
}

/// Creates the series dashboards and alerts query, at zero, so they exist before
/// the first event (a histogram or counter that is never touched is not rendered).
fn register() {
    for event_type in EVENT_TYPES {
        let _registered =
            metrics::histogram!("pollcast_event_delivery_seconds", "event_type" => event_type);
    }
    for name in [
        "pollcast_event_publish_seconds",
        "pollcast_results_lag_seconds",
        "pollcast_edge_event_lag_seconds",
        "pollcast_edge_fanout_seconds",
        "pollcast_edge_replay_seconds",
        "pollcast_vote_batch_size",
    ] {
        let _registered = metrics::histogram!(name);
    }
    // The routes the latency alert and dashboards watch first.
    for (method, route, status) in [
        ("POST", "/api/polls/{poll_id}/votes", "201"),
        ("POST", "/api/join", "201"),
    ] {
        let _registered = metrics::histogram!("pollcast_http_request_duration_seconds",
            "method" => method, "route" => route, "status" => status);
    }
    for format in ["json", "msgpack"] {
        metrics::counter!("pollcast_ws_frames_sent_total", "format" => format).absolute(0);
    }
    for recovered in ["true", "false"] {
        metrics::counter!("pollcast_replays_total", "recovered" => recovered).absolute(0);
    }
    for source in ["room", "log"] {
        metrics::counter!("pollcast_edge_replay_sources_total", "source" => source).absolute(0);
    }
    metrics::counter!("pollcast_votes_total", "outcome" => "accepted").absolute(0);
    for code in ["1001", "4408", "4429", "4500"] {
        metrics::counter!("pollcast_ws_closes_total", "code" => code).absolute(0);
    }
    for code in [
        "bad_request",
        "unauthorized",
        "forbidden",
        "session_not_found",
        "too_many_connections",
        "unavailable",
    ] {
        metrics::counter!("pollcast_edge_refused_total", "code" => code).absolute(0);
    }
    for table in ["idempotency_keys", "outbox"] {
        metrics::counter!("pollcast_cleanup_rows_total", "table" => table).absolute(0);
    }
    for kind in ["header_read", "body_read"] {
        metrics::counter!("pollcast_http_timeouts_total", "kind" => kind).absolute(0);
    }
    for name in [
        "pollcast_http_accept_errors_total",
        "pollcast_http_rate_limited_total",
        "pollcast_edge_slow_consumers_total",
        "pollcast_edge_write_timeouts_total",
        "pollcast_edge_event_encodings_total",
        "pollcast_presence_swept_total",
        "pollcast_presence_dropped_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for (name, _) in GAUGES {
        metrics::gauge!(name).set(0.0);
    }
}

/// Folds histogram samples into buckets every [`UPKEEP_EVERY`], for as long as
/// the process runs.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}
