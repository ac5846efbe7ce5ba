#!/usr/bin/env bash
# Profile proxies under the load of bench/e2e.sh with perf: software
# cpu-clock sampling (hardware counters are not available in this VM) with
# DWARF call graphs, then text summaries — self time by symbol, inclusive
# time by symbol, time by DSO — under bench/profiles/.
#
# Usage (from anywhere):
#
#   bench/profile.sh bare sessionlb          # any of: bare sessionlb nginx haproxy
#
# Settings (environment): DURATION=10 (seconds sampled), CONNECTIONS=64,
# THREADS=1 (wrk), FREQ=499 (samples/s), STACK=32768 (bytes of stack
# copied per sample; Pingora's async stacks are deep),
# PROXY_CPU=0, LOAD_CPU=1, PERF_CPU=LOAD_CPU (perf itself, off the proxy's core),
# PROXY_THREADS=1, BARE_ARGS, BASE_PORT=18700, OUT=bench/profiles,
# PERF_DATA=/tmp/sessionlb-perf (perf.data files, kept for `perf report`;
# not committed), SKIP_BUILD=0, BINARIES / KEEP_BINARIES
# (as in e2e.sh), CARGO_TARGET_DIR.
#
# sessionlb is profiled routing a known session (same cookie check as e2e.sh).
# DWARF unwinding copies the stack on every sample: the profiled proxy runs
# somewhat slower than unprofiled; compare shares, not absolute rates.

set -euo pipefail

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
FREQ=${FREQ:-499}
STACK=${STACK:-32768}
PERF_CPU=${PERF_CPU:-${LOAD_CPU:-1}}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROXY_THREADS=${PROXY_THREADS:-1}
BARE_ARGS=${BARE_ARGS:-}
BASE_PORT=${BASE_PORT:-18700}
SKIP_BUILD=${SKIP_BUILD:-0}
PERF_DATA=${PERF_DATA:-/tmp/sessionlb-perf}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-bench/profiles}

# shellcheck source=bench/lib.sh
. bench/lib.sh

(($# > 0)) || die "usage: bench/profile.sh TARGET... (bare sessionlb nginx haproxy)"
command -v perf >/dev/null || die "perf is not installed (apt-get install linux-perf)"
prepare_binaries # sets BIN
mkdir -p "$OUT" "$PERF_DATA"

P_BACKEND=$BASE_PORT
start_backend "$LOAD_CPU" "$P_BACKEND"
HEADERS=()
for target in "$@"; do
	port=$((BASE_PORT + 1))
	BASE_PORT=$port
	case $target in
	bare)
		# shellcheck disable=SC2086 # BARE_ARGS is a list of flags
		start_bare "$PROXY_CPU" "$port" "$P_BACKEND" "$PROXY_THREADS" $BARE_ARGS
		;;
	sessionlb)
		start_sessionlb "$PROXY_CPU" "$port" "$P_BACKEND" "$PROXY_THREADS"
		known_session "$port"
		HEADERS=(-H "Cookie: $COOKIE")
		;;
	nginx) start_nginx "$PROXY_CPU" "$port" "$P_BACKEND" ;;
	haproxy) start_haproxy "$PROXY_CPU" "$port" "$P_BACKEND" ;;
	*) die "unknown target $target" ;;
	esac
	pid=${TPID[$target]}
	if [[ $target == nginx ]]; then
		pid=$(pgrep -P "$pid" | head -1) # the worker
	fi

	wait_quiet || log "profiling on a busy machine"
	# Warm up, then sample the proxy while wrk keeps it busy.
	taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d3s "${HEADERS[@]}" "http://127.0.0.1:$port/bench" >/dev/null
	taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$((DURATION + 2))s" --latency "${HEADERS[@]}" \
		"http://127.0.0.1:$port/bench" >"$OUT/$target-wrk.txt" &
	wrk_pid=$!
	sleep 1
	data=$PERF_DATA/$target.data
	log "sampling $target (PID $pid) for ${DURATION}s at ${FREQ} Hz"
	taskset -c "$PERF_CPU" perf record -q -e cpu-clock -F "$FREQ" --call-graph "dwarf,$STACK" -p "$pid" \
		-o "$data" -- sleep "$DURATION"
	wait "$wrk_pid"
	HEADERS=()

	report() { perf report -i "$data" --stdio --no-inline "$@" 2>/dev/null | grep -v '^$'; }
	{
		echo "# $target under wrk -t$THREADS -c$CONNECTIONS (while sampled: $(awk '/^Requests\/sec/ { print $2 }' "$OUT/$target-wrk.txt") req/s)"
		echo "# perf record -e cpu-clock -F $FREQ --call-graph dwarf -p <proxy> -- sleep $DURATION; $(date -Iseconds)"
		echo "## self time by symbol (perf report --no-children --sort dso,sym -g none)"
		report --no-children --sort dso,sym -g none --percent-limit 0.4
	} >"$OUT/$target-self.txt"
	{
		echo "# $target: inclusive time by symbol (perf report --children --sort sym -g none), >= 1.5%"
		report --children --sort sym -g none --percent-limit 1.5
	} >"$OUT/$target-inclusive.txt"
	{
		echo "# $target: time by DSO"
		report --no-children --sort dso -g none
	} >"$OUT/$target-dso.txt"
	log "$target: $OUT/$target-{self,inclusive,dso}.txt; perf data in $data"
done
