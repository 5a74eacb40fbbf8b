#!/usr/bin/env bash
# Runs the load generator against a freshly started release server, RUNS times
# (default 3), each on a new server and database, and prints every run's JSON line
# last. Loopback only; every run is bounded.
#
#   bench/loadgen.sh fanout --clients 2000 --votes-per-sec 1000 --seconds 15
#   RUNS=5 FORMAT=msgpack bench/loadgen.sh reconnect-storm --clients 10000
#   bench/loadgen.sh ingest --voters 20000 --concurrency 64
#   bench/loadgen.sh rooms --rooms 200 --participants 25 --votes-per-sec 1000
#
# Extra server flags: SERVER_FLAGS="--sqlite-synchronous normal" bench/loadgen.sh …
# On the JetStream engine (a fresh nats-server per run, `nats-server` on PATH or
# POLLCAST_NATS_SERVER), one process or separate api and edge processes:
#   ENGINE=jetstream bench/loadgen.sh fanout …               (pollcast --role all)
#   ENGINE=jetstream SPLIT=1 bench/loadgen.sh fanout …       (--role api + --role edge)
# The server CPU then counts every serving process, the nats-server included.
# Another server build (say, a baseline from a worktree): SERVER_BIN=/path/to/pollcast
# A Node.js peer instead of pollcast, side by side (bench/peers/node, JSON only):
#   PEER=ws bench/loadgen.sh fanout --clients 2000 --votes-per-sec 1000 --seconds 15
#   PEER=socketio bench/loadgen.sh fanout --clients 2000 --votes-per-sec 1000 --seconds 15
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p pollcast -p pollcast-bench
peer=${PEER:-}
protocol=pollcast
case "$peer" in
    "" | ws) ;;
    socketio) protocol=socket-io ;;
    *) echo "PEER is ws or socketio" >&2; exit 2 ;;
esac
if [ -n "$peer" ] && [ ! -d bench/peers/node/node_modules ]; then
    (cd bench/peers/node && npm ci --no-audit --no-fund -q)
fi
engine=${ENGINE:-embedded}
case "$engine" in
    embedded) ;;
    jetstream)
        [ -z "$peer" ] || { echo "ENGINE=jetstream is pollcast's, not a peer's" >&2; exit 2; }
        nats=${POLLCAST_NATS_SERVER:-$(command -v nats-server || true)}
        [ -x "$nats" ] || { echo "ENGINE=jetstream needs nats-server (POLLCAST_NATS_SERVER)" >&2; exit 2; }
        ;;
    *) echo "ENGINE is embedded or jetstream" >&2; exit 2 ;;
esac
[ -z "${SPLIT:-}" ] || [ "$engine" = jetstream ] || { echo "SPLIT=1 needs ENGINE=jetstream" >&2; exit 2; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_healthy() {
    for _ in $(seq 100); do
        curl -fs "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "not healthy: $1" >&2
    return 1
}
runs=${RUNS:-3}
lines=()
for run in $(seq 1 "$runs"); do
    dir=$(mktemp -d)
    port=$(free_port)
    ws_port=$port
    pids=()
    if [ -n "$peer" ]; then
        node bench/peers/node/server.js --listen "127.0.0.1:$port" --transport "$peer" \
            2>"$dir/server.log" &
        pids+=($!)
    else
        engine_flags=()
        if [ "$engine" = jetstream ]; then
            nats_port=$(free_port)
            nats_monitor=$(free_port)
            "$nats" -js -a 127.0.0.1 -p "$nats_port" -m "$nats_monitor" -sd "$dir/nats" \
                2>"$dir/nats.log" &
            nats_pid=$!
            wait_healthy "http://127.0.0.1:$nats_monitor/healthz?js-enabled-only=true"
            engine_flags=(--nats-url "nats://127.0.0.1:$nats_port")
        fi
        common=(--writes-per-second 0 --anonymous-per-second 0
            --max-participants-per-session 1000000 --max-polls-per-session 1000000
            --secret "loadgen-secret-$run-$$-0123456789abcdef")
        server_bin=${SERVER_BIN:-./target/release/pollcast}
        if [ -n "${SPLIT:-}" ]; then
            ws_port=$(free_port)
            # shellcheck disable=SC2086
            "$server_bin" serve --role api --listen "127.0.0.1:$port" --data-dir "$dir" \
                "${engine_flags[@]}" "${common[@]}" ${SERVER_FLAGS:-} 2>"$dir/server.log" &
            pids+=($!)
            # shellcheck disable=SC2086
            "$server_bin" serve --role edge --listen "127.0.0.1:$ws_port" \
                "${engine_flags[@]}" "${common[@]}" ${SERVER_FLAGS:-} 2>"$dir/edge.log" &
            pids+=($!)
        else
            # shellcheck disable=SC2086
            "$server_bin" serve --listen "127.0.0.1:$port" --data-dir "$dir" \
                "${engine_flags[@]}" "${common[@]}" ${SERVER_FLAGS:-} 2>"$dir/server.log" &
            pids+=($!)
        fi
        if [ "$engine" = jetstream ]; then pids+=("$nats_pid"); fi
    fi
    wait_healthy "http://127.0.0.1:$port/healthz"
    [ "$ws_port" = "$port" ] || wait_healthy "http://127.0.0.1:$ws_port/healthz"
    echo "== run $run of $runs"
    pid_flags=()
    for pid in "${pids[@]}"; do pid_flags+=(--server-pid "$pid"); done
    out=$(timeout 600 ./target/release/loadgen --url "http://127.0.0.1:$port" \
        --ws-url "http://127.0.0.1:$ws_port" "${pid_flags[@]}" \
        --format "${FORMAT:-json}" --protocol "$protocol" "$@") || true
    echo "$out" | sed '$d'
    lines+=("$(echo "$out" | tail -n 1)")
    # The pollcast processes first, the nats-server they use last.
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
done
printf '%s\n' "${lines[@]}"
