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
runs=${RUNS:-3}
lines=()
for run in $(seq 1 "$runs"); do
    dir=$(mktemp -d)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    if [ -n "$peer" ]; then
        node bench/peers/node/server.js --listen "127.0.0.1:$port" --transport "$peer" \
            2>"$dir/server.log" &
    else
        # shellcheck disable=SC2086
        "${SERVER_BIN:-./target/release/pollcast}" serve --listen "127.0.0.1:$port" --data-dir "$dir" \
            --writes-per-second 0 --anonymous-per-second 0 \
            --max-participants-per-session 1000000 --max-polls-per-session 1000000 \
            ${SERVER_FLAGS:-} 2>"$dir/server.log" &
    fi
    server=$!
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "== run $run of $runs"
    out=$(timeout 600 ./target/release/loadgen --url "http://127.0.0.1:$port" \
        --server-pid "$server" --format "${FORMAT:-json}" --protocol "$protocol" "$@") || true
    echo "$out" | sed '$d'
    lines+=("$(echo "$out" | tail -n 1)")
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$dir"
done
printf '%s\n' "${lines[@]}"
