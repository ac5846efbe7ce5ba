#!/usr/bin/env bash
# Profile proxies under the load of bench/e2e.sh with perf: software
# cpu-clock sampling (hardware counters are not available in this VM) with
# DWARF call graphs, then text summaries under bench/profiles/: self time
# by symbol (<target>-self.txt), inclusive time by symbol (-inclusive.txt),
# time by DSO (-dso.txt), CPU per request by category (-breakdown.txt,
# bench/perf_breakdown.py), and system calls per request (-syscalls.txt,
# `perf trace -s` during a separate 5 s wrk run).
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
	SYSCALL_HEADERS=("${HEADERS[@]}")
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
		if [[ $target == sessionlb ]]; then
			echo "## sessionlb's own functions, inclusive, >= 0.05%"
			report --children --sort sym -g none --percent-limit 0.05 | grep -E 'sessionlb::' || true
		fi
	} >"$OUT/$target-inclusive.txt"
	{
		echo "# $target: time by DSO"
		report --no-children --sort dso -g none
	} >"$OUT/$target-dso.txt"
	# CPU per request by category (requests while sampled ~ wrk's rate x DURATION).
	{
		echo "# $target: CPU per request by category (bench/perf_breakdown.py)"
		perf script -i "$data" --no-inline 2>/dev/null |
			python3 bench/perf_breakdown.py "$FREQ" \
				"$(awk -v d="$DURATION" '/^Requests\/sec/ { printf "%d", $2 * d }' "$OUT/$target-wrk.txt")"
	} >"$OUT/$target-breakdown.txt"

	# System calls per request: `perf trace -s` attached for exactly one wrk run.
	taskset -c "$PERF_CPU" perf trace -s -p "$pid" -o "$WORK/trace.txt" &
	trace_pid=$!
	sleep 1
	taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d5s "${SYSCALL_HEADERS[@]}" \
		"http://127.0.0.1:$port/bench" >"$WORK/trace-wrk.txt"
	kill -INT "$trace_pid"
	wait "$trace_pid" || true
	requests=$(awk '/requests in/ { print $1 }' "$WORK/trace-wrk.txt")
	{
		echo "# $target: system calls per request (perf trace -s during one wrk -c$CONNECTIONS -d5s run, $requests requests;"
		echo "# tracing slows the proxy, the counts per request stay meaningful)"
		awk -v r="$requests" '$2 ~ /^[0-9]+$/ && $1 ~ /^[a-z_0-9]+$/ { c[$1] += $2; t += $2 }
			END { printf "%-20s %8.2f\n", "total", t / r; for (k in c) if (c[k] / r >= 0.01) printf "%-20s %8.2f\n", k, c[k] / r }' \
			"$WORK/trace.txt" | sort -k2 -rn
	} >"$OUT/$target-syscalls.txt"
	log "$target: $OUT/$target-{self,inclusive,dso,breakdown,syscalls}.txt; perf data in $data"
done
