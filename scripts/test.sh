#!/usr/bin/env bash
# The one test command (README, CI): makes sure PostgreSQL and Redis are installed and running,
# points the tests at them, then checks formatting and lints and runs every test.
#
#   CRM_TEST_POSTGRES_URL  PostgreSQL server the tests create their databases on
#                          (default postgres://postgres@127.0.0.1:5432/postgres)
#   CRM_TEST_REDIS_URL     Redis server (default redis://127.0.0.1:6379)
# It also installs the tests' real peers when they are missing: Python packages
# (tests/peers/requirements.txt: an SMTP server, a webhook receiver, an OpenAPI validator) and
# npm packages (tests/peers/grpcweb: a gRPC-Web client library), and Prometheus; and it checks the
# Helm chart (tests/peers/chart_check.py) before the Rust tests.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-contrib
    # Local test server: trust connections from this machine only.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    done
  fi
  log "starting PostgreSQL"
  for version in $(ls /etc/postgresql); do
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && return; sleep 1; done
  echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1
}

ensure_redis() {
  # The fault tests also start Redis servers of their own: the binary must be here.
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    log "installing Redis"
    apt_install redis-server
  fi
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then return; fi
  log "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/test.log
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return; sleep 1; done
  echo "Redis did not start on 127.0.0.1:6379" >&2; exit 1
}

ensure_python_peers() {
  # Real peers of the end-to-end tests written in Python (an SMTP server, a webhook receiver
  # verifying signatures with the Standard Webhooks library, an OpenAPI validator and a generic
  # client driven by the gateway's document), pinned.
  if ! command -v python3 >/dev/null; then
    log "installing Python"
    apt_install python3 python3-pip
  fi
  if ! python3 -c "import aiosmtpd, standardwebhooks, openapi_spec_validator, jsonschema, helm, kubernetes_validate, yaml" 2>/dev/null; then
    log "installing the test peers' Python packages"
    python3 -m pip install --quiet --disable-pip-version-check -r tests/peers/requirements.txt \
      || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages -r tests/peers/requirements.txt
  fi
}

ensure_node_peers() {
  # A real gRPC-Web client library (Connect-ES) under Node, pinned by its package-lock.json.
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "installing Node.js"
    apt_install nodejs npm
  fi
  local dir=tests/peers/grpcweb
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
    log "installing the test peers' npm packages"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error && touch node_modules)
  fi
}

ensure_prometheus() {
  # Debian's Prometheus package: promtool checks the chart's alert rules, and a real Prometheus
  # scrapes a cluster in the end-to-end tests.
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    log "installing Prometheus"
    apt_install prometheus
  fi
}

ensure_postgres
ensure_redis
ensure_python_peers
ensure_node_peers
ensure_prometheus
export CRM_TEST_POSTGRES_URL="${CRM_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export CRM_TEST_REDIS_URL="${CRM_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

log "Helm chart"
# Rendered by a real Helm engine, every object validated against the Kubernetes schemas (1.29
# and the newest), the alert rules by promtool, the dashboards and the chart's promises.
python3 tests/peers/chart_check.py --require-promtool

log "format"
cargo fmt --all --check
log "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "build"
cargo build --workspace --locked --bins
log "test"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
set +e
cargo test --workspace --locked --all-targets 2>&1 | tee "$results"
status=${PIPESTATUS[0]}
set -e
# One closing line with the totals of every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$results"
exit "$status"
