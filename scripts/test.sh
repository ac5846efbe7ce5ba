#!/usr/bin/env bash
# Run every test of sessionlb: unit tests, the registry suite on PostgreSQL
# and SQLite, and the multi-process integration tests.
#
# Works on a fresh Debian machine with the `postgresql` package installed:
# - installs what the build needs but a fresh machine lacks (cmake, for Pingora);
# - uses the PostgreSQL server at $SESSIONLB_TEST_PG (default: the local one,
#   postgres://postgres@127.0.0.1:5432/postgres) and, if none answers there,
#   starts a throwaway server (initdb into a temp dir; as root it runs as the
#   `postgres` user) and stops it afterwards.
# Extra arguments go to `cargo nextest run` (or `cargo test` without nextest).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

# --- build prerequisites -----------------------------------------------------
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(build-essential)
command -v curl >/dev/null || missing+=(curl)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- PostgreSQL ----------------------------------------------------------------
export SESSIONLB_TEST_PG="${SESSIONLB_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}"

pg_bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return; }
  command -v initdb >/dev/null && dirname "$(command -v initdb)" && return
  log "no PostgreSQL server binaries found: apt-get install postgresql"; return 1
}

pg_answers() {
  local bin; bin=$(pg_bin_dir) || return 1
  "$bin/pg_isready" -q -d "$1" -t 3 2>/dev/null || { command -v pg_isready >/dev/null && pg_isready -q -d "$1" -t 3; }
}

PG_TMP=""
stop_throwaway_pg() {
  [ -n "$PG_TMP" ] || return 0
  local bin; bin=$(pg_bin_dir)
  log "stopping the throwaway PostgreSQL"
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$bin/pg_ctl" -D "$PG_TMP/data" -m fast -w stop >/dev/null 2>&1 || true
  else "$bin/pg_ctl" -D "$PG_TMP/data" -m fast -w stop >/dev/null 2>&1 || true; fi
  rm -rf "$PG_TMP"
}

if pg_answers "$SESSIONLB_TEST_PG"; then
  log "using PostgreSQL at ${SESSIONLB_TEST_PG}"
else
  bin=$(pg_bin_dir)
  PG_TMP=$(mktemp -d /tmp/sessionlb-pg.XXXXXX)
  trap stop_throwaway_pg EXIT
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 55432)
  run=()
  if [ "$(id -u)" = 0 ]; then chown postgres "$PG_TMP"; run=(runuser -u postgres --); fi
  log "no PostgreSQL answers at ${SESSIONLB_TEST_PG}; starting a throwaway server on 127.0.0.1:${port}"
  "${run[@]}" "$bin/initdb" -D "$PG_TMP/data" -U postgres --auth=trust -E UTF8 >/dev/null
  "${run[@]}" "$bin/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w \
    -o "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
  export SESSIONLB_TEST_PG="postgres://postgres@127.0.0.1:${port}/postgres"
fi

# --- tests -------------------------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast "$@"
  cargo test --doc
else
  log "cargo-nextest not found; using cargo test"
  cargo test --all-targets --no-fail-fast "$@"
fi
