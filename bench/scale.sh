#!/usr/bin/env bash
# Cluster scale (issue 12): NODES real `sessionlb serve` processes on
# 127.0.0.x, each in front of a demo backend of its own (or one shared),
# sharing a PostgreSQL of this script's own (initdb into a temporary
# directory, raised max_connections, pg_stat_statements), measured by
# examples/scale_driver:
#
#   1. start-up of every node on an empty registry;
#   2. at rest: per-node CPU and RSS, PostgreSQL connections (total and per
#      node: every node connects with application_name = its name), registry
#      statements/s (pg_stat_statements) and transactions/s;
#   3. a morning login storm: new users (signed Workbench `user-id` cookies)
#      arrive at RATE/s for STORM s, each placing a session, while BUSY
#      sessions placed before make one request per BUSY_INTERVAL_MS each
#      through random nodes (answers must come from their node's backend);
#      placement latency p50/p99 and placements/s, notification lag p50/p99
#      on OBSERVERS nodes that get no traffic, CPU/RSS/connections under it;
#   4. the broadcast cost: NOTIFY changes written straight into the registry
#      at RATE/s, CPU per notification per node and in PostgreSQL;
#   5. bulk load up to SESSIONS sessions (each row announced like a
#      placement), time until every node holds them, memory per session;
#   6. at rest again, with SESSIONS sessions;
#   7. one more node joins the cluster that holds SESSIONS sessions: time
#      from process start until it answers, holds them all, and routes.
#
# Usage (from anywhere; paths are relative to the repository root):
#
#   bench/scale.sh                                   # 50 nodes, 100,000 sessions
#   NODES=5 SESSIONS=2000 STORM=5 BUSY=20 bench/scale.sh   # a quick look
#
# Settings (environment):
#   NODES=50             sessionlb nodes, at 127.0.0.FIRST_HOST+1 …
#   SESSIONS=100000      sessions in the registry for phases 5-7
#   RATE=200             storm: new users per second (open loop); notify: changes per second
#   STORM=30             storm: seconds
#   BUSY=500             storm: sessions kept busy
#   BUSY_INTERVAL_MS=1000  storm: one request per busy session per this
#   OBSERVERS=2          storm: nodes watched for notification lag (no traffic)
#   POLL_MS=5            storm: observers' /health poll period
#   REST=20              seconds of each at-rest measurement
#   NOTIFY=2000          notify: sessions written one per transaction at RATE/s straight
#                        into the registry (after the same time idle): CPU per change notification
#   PHASES="rest storm notify bulk rest-full join"   which phases run, in this order (a
#                        subset for experiments, e.g. PHASES=rest with EXTRA_CONFIG)
#   BACKENDS=per-node    per-node (stickiness checked by x-backend) | shared
#   NODE_THREADS=1       Pingora threads per node (`threads`)
#   EXTRA_CONFIG=""      extra top-level lines for every node's sessionlb.toml
#                        (e.g. $'pool-size = 2' once that key exists)
#   FIRST_HOST=100       node i listens on 127.0.0.(FIRST_HOST+i):PORT
#   PORT=19787 BACKEND_PORT=19788   ports (per-node backends share the node's address)
#   PG_MAX_CONNECTIONS=1000  PG_OPTS=""  (more `-c name=value` for the postmaster)
#   QUIET_TIMEOUT=0      seconds to wait for a quiet machine first (0 = just report the load)
#   SKIP_BUILD=0 BINARIES=DIR KEEP_BINARIES=DIR   as in e2e.sh (see prepare_binaries in lib.sh)
#   OUT=bench/results/scale-<date>   summary.md, results.json, per-phase JSON, node and PostgreSQL logs
#
# Every process is started here and stopped by PID on exit (also on
# Ctrl-C); the PostgreSQL server is stopped with pg_ctl and its directory
# removed. Only 127.0.0.0/8 is used.

set -euo pipefail

NODES=${NODES:-50}
SESSIONS=${SESSIONS:-100000}
RATE=${RATE:-200}
STORM=${STORM:-30}
BUSY=${BUSY:-500}
BUSY_INTERVAL_MS=${BUSY_INTERVAL_MS:-1000}
OBSERVERS=${OBSERVERS:-2}
POLL_MS=${POLL_MS:-5}
REST=${REST:-20}
BACKENDS=${BACKENDS:-per-node}
NODE_THREADS=${NODE_THREADS:-1}
EXTRA_CONFIG=${EXTRA_CONFIG:-}
FIRST_HOST=${FIRST_HOST:-100}
PORT=${PORT:-19787}
BACKEND_PORT=${BACKEND_PORT:-19788}
PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-1000}
PG_OPTS=${PG_OPTS:-}
PHASES=${PHASES:-"rest storm notify bulk rest-full join"}
NOTIFY=${NOTIFY:-2000}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-bench/results/scale-$(date +%Y%m%d-%H%M%S)}

# shellcheck source=bench/lib.sh
. bench/lib.sh
BINS=(sessionlb sessionlb-demo-backend examples/scale_driver)

[[ $BACKENDS == per-node || $BACKENDS == shared ]] || die "BACKENDS must be per-node or shared, not $BACKENDS"
((NODES >= OBSERVERS + 1)) || die "NODES ($NODES) must exceed OBSERVERS ($OBSERVERS)"
((FIRST_HOST + NODES + 1 <= 254)) || die "FIRST_HOST + NODES + 1 must stay below 255 (127.0.0.x addresses)"
for tool in curl ss taskset; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[[ -x $PG_BIN/initdb ]] || die "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)"
for p in "$PORT" "$BACKEND_PORT"; do
	if ss -Hltn "sport = :$p" | grep -q .; then
		die "port $p is in use on some address (set PORT / BACKEND_PORT)"
	fi
done
ALL_CPUS=0-$(($(nproc) - 1))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

prepare_binaries # sets BIN
mkdir -p "$OUT"
MD=$OUT/summary.md
log "results in $OUT; machine load now: $(cut -d' ' -f1-3 /proc/loadavg)"
((QUIET_TIMEOUT == 0)) || wait_quiet || true

# ---------------------------------------------------------------- PostgreSQL

PGDIR=$(mktemp -d /tmp/sessionlb-scale-pg.XXXXXX)
PG_RUN=()
if [[ $(id -u) == 0 ]]; then
	chown postgres "$PGDIR"
	PG_RUN=(runuser -u postgres --)
fi
PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
AT_EXIT+=("${PG_RUN[*]} $PG_BIN/pg_ctl -D $PGDIR/data -m fast -w stop >/dev/null 2>&1; rm -rf $PGDIR")
"${PG_RUN[@]}" "$PG_BIN/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 >"$WORK/initdb.log" 2>&1 ||
	die "initdb failed: $(cat "$WORK/initdb.log")"
# shellcheck disable=SC2086 # PG_OPTS is a list of options
"${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -o "-p $PG_PORT -k $PGDIR \
	-c listen_addresses=127.0.0.1 -c max_connections=$PG_MAX_CONNECTIONS \
	-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.max=1000 $PG_OPTS" start >/dev/null ||
	die "PostgreSQL did not start: $(tail -20 "$PGDIR/server.log")"
PG_PID=$(head -1 "$PGDIR/data/postmaster.pid")
PG_ADMIN=postgres://postgres@127.0.0.1:$PG_PORT/postgres
PG_REGISTRY=postgres://postgres@127.0.0.1:$PG_PORT/sessionlb
psql -X -q -d "$PG_ADMIN" -c 'CREATE DATABASE sessionlb' -c 'CREATE EXTENSION pg_stat_statements' >/dev/null
log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{ print $NF }') on 127.0.0.1:$PG_PORT (PID $PG_PID), max_connections=$PG_MAX_CONNECTIONS"

# ---------------------------------------------------------------- nodes

mkdir -p "$WORK/shared" "$WORK/run"
(
	umask 077
	head -c 32 /dev/urandom | base64 >"$WORK/secure-cookie-key"
)
NODE_LIST=$WORK/nodes.txt
: >"$NODE_LIST"
BACKEND_PIDS=()

name_of() { printf 'n%02d' "$1"; }
ip_of() { echo "127.0.0.$((FIRST_HOST + $1))"; }

# wait_health NAME URL SECONDS: until URL answers 200.
wait_health() {
	local deadline=$((SECONDS + $3))
	until curl -fsS -o /dev/null "$2" 2>/dev/null; do
		if ((SECONDS >= deadline)); then
			tail -20 "$WORK/$1.log" >&2 || true
			die "$1 does not answer on $2"
		fi
		sleep 0.05
	done
}

declare -A NODE_T0
if [[ $BACKENDS == shared ]]; then
	start backend "$ALL_CPUS" "$BIN/sessionlb-demo-backend" --listen "127.0.0.1:$BACKEND_PORT" --name bench
	BACKEND_PIDS+=("${TPID[backend]}")
	wait_health backend "http://127.0.0.1:$BACKEND_PORT/bench" 10
fi

# backend_of I: the address of node I's backend.
backend_of() {
	if [[ $BACKENDS == per-node ]]; then echo "$(ip_of "$1"):$BACKEND_PORT"; else echo "127.0.0.1:$BACKEND_PORT"; fi
}

# start_backend_of I: node I's own backend (per-node backends only).
start_backend_of() {
	local name
	name=$(name_of "$1")
	[[ $BACKENDS == per-node ]] || return 0
	start "backend-$name" "$ALL_CPUS" "$BIN/sessionlb-demo-backend" --listen "$(backend_of "$1")" --name "$name"
	BACKEND_PIDS+=("${TPID[backend-$name]}")
}

# start_node I: node I (its start time in NODE_T0[I]); appends it to NODE_LIST.
start_node() {
	local i=$1 name ip
	name=$(name_of "$i")
	ip=$(ip_of "$i")
	cat >"$WORK/$name.toml" <<-TOML
		www-address = "$ip"
		www-port = $PORT
		backend = "$(backend_of "$i")"
		database = "$PG_REGISTRY?application_name=$name"
		secure-cookie-key-file = "$WORK/secure-cookie-key"
		server-shared-storage-path = "$WORK/shared"
		run-dir = "$WORK/run"
		threads = $NODE_THREADS
		grace-period = 0
		shutdown-timeout = 1
		log-level = "warn"
		# The driver reads /metrics on the public port (loopback may); a
		# metrics listener per node would collide on 127.0.0.1:9787.
		metrics-address = ""
		$EXTRA_CONFIG

		[locks]
		lock-type = "advisory"
	TOML
	NODE_T0[$i]=$EPOCHREALTIME
	start "$name" "$ALL_CPUS" "$BIN/sessionlb" --config "$WORK/$name.toml" serve
	echo "$name $ip $PORT ${TPID[$name]}" >>"$NODE_LIST"
}

log "starting $NODES nodes ($BACKENDS backends)"
# The first node creates the schema and defines the cluster; the others start together.
for ((i = 1; i <= NODES; i++)); do
	start_backend_of "$i"
done
start_node 1
wait_health n01 "http://$(ip_of 1):$PORT/health" 60
for ((i = 2; i <= NODES; i++)); do
	start_node "$i"
done
for ((i = 1; i <= NODES; i++)); do
	wait_health "$(name_of "$i")" "http://$(ip_of "$i"):$PORT/health" 120
	# (polled in order: a node's time is an upper bound once earlier ones were slower)
	echo "$(name_of "$i") $(awk -v a="${NODE_T0[$i]}" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')"
done >"$WORK/startup.txt"
if [[ $BACKENDS == per-node ]]; then
	for ((i = 1; i <= NODES; i++)); do
		wait_health "backend-$(name_of "$i")" "http://$(backend_of "$i")/bench" 10
	done
fi
log "all $NODES nodes answer /health; machine load: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- measure

PER_NODE_FLAG=()
[[ $BACKENDS == per-node ]] && PER_NODE_FLAG=(--per-node-backends)
driver() {
	local phase=$1
	shift
	"$BIN/examples/scale_driver" --nodes "$NODE_LIST" --pg-admin "$PG_ADMIN" --pg-registry "$PG_REGISTRY" \
		--pg-pid "$PG_PID" --backend-pids "$(
			IFS=,
			echo "${BACKEND_PIDS[*]}"
		)" --key "$WORK/secure-cookie-key" --hz "$HZ" \
		--md "$MD" --json "$OUT/$phase.json" "$@"
}

{
	echo "# bench/scale.sh $(date -Iseconds)"
	echo
	echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
	echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(free -g | awk '/^Mem:/ { print $2 }') GiB, $(uname -sr); load (1/5/15 min) at start $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "- $NODES nodes (threads = $NODE_THREADS, $BACKENDS backends), PostgreSQL $("$PG_BIN/postgres" --version | awk '{ print $NF }') max_connections = $PG_MAX_CONNECTIONS"
	echo "- settings: SESSIONS=$SESSIONS RATE=$RATE STORM=$STORM BUSY=$BUSY BUSY_INTERVAL_MS=$BUSY_INTERVAL_MS OBSERVERS=$OBSERVERS POLL_MS=$POLL_MS REST=$REST${EXTRA_CONFIG:+ EXTRA_CONFIG='$EXTRA_CONFIG'}"
	echo
	echo "### Start-up on an empty registry"
	echo
	sort -k2 -n "$WORK/startup.txt" | awk '{ t[NR] = $2 } END {
		printf "- time from process start to the first /health answer: min %.2f / median %.2f / max %.2f s (%d nodes started together after the first)\n\n", t[1], t[int((NR + 1) / 2)], t[NR], NR }'
} >"$MD"
cp "$WORK/startup.txt" "$OUT/startup.txt"

# join: a node joins the cluster that holds the sessions (its backend is
# started first, so that only the node's own start-up is timed).
join_phase() {
	local want started_us
	JOIN=$((NODES + 1))
	start_backend_of "$JOIN"
	[[ $BACKENDS == shared ]] || wait_health "backend-$(name_of $JOIN)" "http://$(backend_of $JOIN)/bench" 10
	want=$(PGOPTIONS='-c search_path=sessionlb,public' psql -X -Atq -d "$PG_REGISTRY" -c 'SELECT count(*) FROM sessionlb_sessions')
	start_node "$JOIN"
	started_us=${NODE_T0[$JOIN]/./}
	driver join join --join-node "$(name_of $JOIN)" --started-ns "${started_us}000" --sessions "$want"
}

JOIN=$NODES
DONE=()
for phase in $PHASES; do
	case $phase in
	rest) driver rest-empty rest --label "empty registry" --seconds "$REST" ;;
	storm)
		driver storm storm --rate "$RATE" --duration "$STORM" --busy "$BUSY" --busy-interval-ms "$BUSY_INTERVAL_MS" \
			--observers "$OBSERVERS" --poll-ms "$POLL_MS" --run "u$(date +%s)" "${PER_NODE_FLAG[@]}"
		;;
	notify) driver notify notify --rate "$RATE" --count "$NOTIFY" ;;
	bulk) driver bulk bulk --total "$SESSIONS" ;;
	rest-full) driver rest-full rest --label "$SESSIONS sessions" --seconds "$REST" ;;
	join) join_phase ;;
	*) die "unknown phase $phase (rest storm notify bulk rest-full join)" ;;
	esac
	DONE+=("$phase")
done

# ---------------------------------------------------------------- results

{
	echo
	echo "Machine load (1/5/15 min) at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} >>"$MD"
jq -s 'reduce .[] as $p ({}; . + $p)' <(for phase in "${DONE[@]}"; do
	f=$phase
	[[ $phase == rest ]] && f=rest-empty
	jq --arg k "$f" '{($k): .}' "$OUT/$f.json"
done) >"$OUT/results.json"
# Warnings and errors the nodes logged (their logs go with WORK).
for ((i = 1; i <= JOIN; i++)); do
	f=$WORK/$(name_of "$i").log
	if [[ -s $f ]]; then
		echo "== $(name_of "$i") ($(wc -l <"$f") lines; last 20)"
		tail -20 "$f"
	fi
done >"$OUT/node-logs.txt"
[[ -s $OUT/node-logs.txt ]] || rm -f "$OUT/node-logs.txt"
cp "$PGDIR/server.log" "$OUT/postgres.log"
log "summary: $MD; figures: $OUT/results.json"
