#!/usr/bin/env bash
# Run every test of sessionlb: unit tests, the registry suite on PostgreSQL
# and SQLite, and the multi-process integration tests.
#
# Works on a fresh Debian machine with the `postgresql` package installed:
# - installs what the build needs but a fresh machine lacks (cmake, for Pingora),
#   and what the tests use (curl, iproute2, Debian's chromium for the status page);
# - uses the PostgreSQL server at $SESSIONLB_TEST_PG (default: the local one,
#   postgres://postgres@127.0.0.1:5432/postgres) if it can log in there and run
#   a query; with the default URL it otherwise starts a throwaway server (initdb
#   into a temp dir; as root it runs as the `postgres` user) and stops it
#   afterwards, while an explicitly set URL that refuses the login is an error.
# Extra arguments go to `cargo nextest run` (or `cargo test` without nextest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- build and test prerequisites (log, as_root, install_prerequisites) --------
source scripts/prerequisites.sh

# --- PostgreSQL ----------------------------------------------------------------
# A server that merely runs is not enough: a stock Debian cluster `main` wants a
# password on 127.0.0.1, and every DB test would then fail. So the probe logs in
# and runs a query. The default URL falls back to a throwaway server when that
# fails; a URL the user set explicitly must work, or the script stops.
PG_DEFAULT_URL=postgres://postgres@127.0.0.1:5432/postgres
PG_URL_EXPLICIT=${SESSIONLB_TEST_PG:+1}
export SESSIONLB_TEST_PG="${SESSIONLB_TEST_PG:-$PG_DEFAULT_URL}"

pg_bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return; }
  command -v initdb >/dev/null && dirname "$(command -v initdb)" && return
  log "no PostgreSQL server binaries found: apt-get install postgresql"; return 1
}

# The URL with the password of its user info and any `password=` query
# parameter replaced by ***, for messages.
pg_redact() {
  printf '%s' "$1" | sed -E 's|^([a-z]+://[^:/?#@]*):[^@/?#]*@|\1:***@|; s|([?&][Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]=)[^&#]*|\1***|g'
}

# Succeeds when we can log in at URL $1 and run a query (psql never prompts
# for a password here). psql comes with the `postgresql` package.
pg_login_ok() {
  local url=$1 psql="" d
  d=$(pg_bin_dir 2>/dev/null) && [ -x "$d/psql" ] && psql="$d/psql"
  [ -n "$psql" ] || psql=$(command -v psql) || { log "psql not found: apt-get install postgresql"; return 1; }
  [ "$(PGCONNECT_TIMEOUT=3 "$psql" -X -w -Atq -d "$url" -c 'select 1' </dev/null 2>/dev/null)" = 1 ]
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

# Start a throwaway server (trust auth, 127.0.0.1 on a free port) and point
# SESSIONLB_TEST_PG at it; stop_throwaway_pg (an EXIT trap) removes it.
start_throwaway_pg() {
  local bin port run=()
  bin=$(pg_bin_dir)
  PG_TMP=$(mktemp -d /tmp/sessionlb-pg.XXXXXX)
  trap stop_throwaway_pg EXIT
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 55432)
  if [ "$(id -u)" = 0 ]; then chown postgres "$PG_TMP"; run=(runuser -u postgres --); fi
  log "starting a throwaway PostgreSQL on 127.0.0.1:${port}"
  "${run[@]}" "$bin/initdb" -D "$PG_TMP/data" -U postgres --auth=trust -E UTF8 >/dev/null
  "${run[@]}" "$bin/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w \
    -o "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
  export SESSIONLB_TEST_PG="postgres://postgres@127.0.0.1:${port}/postgres"
  pg_login_ok "$SESSIONLB_TEST_PG" || { log "cannot log in to the throwaway PostgreSQL (log: $PG_TMP/server.log)"; return 1; }
}

choose_pg() {
  if pg_login_ok "$SESSIONLB_TEST_PG"; then
    log "using PostgreSQL at $(pg_redact "$SESSIONLB_TEST_PG")"
  elif [ -n "$PG_URL_EXPLICIT" ]; then
    log "cannot log in to PostgreSQL at SESSIONLB_TEST_PG=$(pg_redact "$SESSIONLB_TEST_PG") (is the server up, and do"
    log "the user, password, database and pg_hba.conf allow this login?). Fix it, or unset SESSIONLB_TEST_PG"
    log "to use ${PG_DEFAULT_URL} or else a throwaway server."
    return 1
  else
    log "cannot log in to PostgreSQL at $(pg_redact "$SESSIONLB_TEST_PG") (no server, or it refuses this login)"
    start_throwaway_pg
  fi
}

# `SESSIONLB_TEST_SH_FUNCTIONS_ONLY=1 source scripts/test.sh` defines the
# functions above without running anything (to test them by hand).
if [ -n "${SESSIONLB_TEST_SH_FUNCTIONS_ONLY:-}" ]; then return 0 2>/dev/null || exit 0; fi
install_prerequisites tests
choose_pg

# --- tests -------------------------------------------------------------------------
# The examples as binaries: the scale-harness smoke test runs
# target/debug/examples/scale_driver (a test run builds examples only as test
# harnesses).
cargo build --examples
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast "$@"
  cargo test --doc
else
  log "cargo-nextest not found; using cargo test"
  cargo test --all-targets --no-fail-fast "$@"
fi
