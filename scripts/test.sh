#!/usr/bin/env bash
# Runs every check and test of pollcast: formatting, clippy, unit tests, the
# stream conformance suite and the end-to-end tests against SQLite and a real
# PostgreSQL that the tests start themselves. Installs the PostgreSQL server
# binaries first when they are missing (Debian/Ubuntu, needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
  [ -n "${POLLCAST_PG_BINDIR:-}" ] && [ -x "$POLLCAST_PG_BINDIR/initdb" ] && return 0
  command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if ! have_postgres; then
  echo "== installing PostgreSQL server binaries"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
fi
have_postgres || { echo "PostgreSQL server binaries still missing" >&2; exit 1; }
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "running as root needs a 'postgres' user to run the test cluster" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# One closing line for the whole run: cargo's own last line is the summary of
# whichever test binary happened to run last (often doc-tests with 0 tests).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
