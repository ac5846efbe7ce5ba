#!/usr/bin/env bash
# Instructions per request of the bare forwarder and of sessionlb (user
# space only), with valgrind's callgrind: deterministic, so it is not moved
# by the scheduling noise of a 2-core VM the way req/s and perf samples are.
#
# Usage (from anywhere):
#
#   bench/callgrind.sh bare sessionlb
#
# For each target: start it under callgrind (pinned to PROXY_CPU), warm up,
# zero the counters, run wrk (-c CONNECTIONS, for DURATION), dump, and
# write bench/profiles/<target>-callgrind.txt: total instructions, requests,
# instructions per request, then callgrind_annotate's inclusive and
# exclusive top functions. The raw callgrind.out files stay in
# CALLGRIND_DATA (default /tmp/sessionlb-callgrind; not committed).
#
# Settings (environment): DURATION=15s, CONNECTIONS=16, PROXY_CPU=0,
# LOAD_CPU=1, PROXY_THREADS=1, BARE_ARGS, BASE_PORT=18750, OUT=bench/profiles,
# SKIP_BUILD=0, BINARIES / KEEP_BINARIES
# (as in e2e.sh), CARGO_TARGET_DIR.

set -euo pipefail

DURATION=${DURATION:-15s}
CONNECTIONS=${CONNECTIONS:-16}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROXY_THREADS=${PROXY_THREADS:-1}
BARE_ARGS=${BARE_ARGS:-}
BASE_PORT=${BASE_PORT:-18750}
SKIP_BUILD=${SKIP_BUILD:-0}
CALLGRIND_DATA=${CALLGRIND_DATA:-/tmp/sessionlb-callgrind}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-bench/profiles}

# shellcheck source=bench/lib.sh
. bench/lib.sh

(($# > 0)) || die "usage: bench/callgrind.sh TARGET... (bare sessionlb)"
command -v valgrind >/dev/null || die "valgrind is not installed"
prepare_binaries # sets BIN
mkdir -p "$OUT" "$CALLGRIND_DATA"

# Run the proxies under callgrind: `start` runs "$BIN/..." via this wrapper.
REAL_BIN=$BIN
BIN=$WORK/callgrind-bin
mkdir -p "$BIN/examples"
for b in sessionlb examples/bare_forwarder; do
	name=$(basename "$b")
	cat >"$BIN/$b" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$CALLGRIND_DATA/$name.%p.out "$REAL_BIN/$b" "\$@"
EOF
	chmod +x "$BIN/$b"
done
ln -s "$REAL_BIN/sessionlb-demo-backend" "$BIN/sessionlb-demo-backend"

# Under valgrind start-up is slow: wait_http's 10 s may not be enough.
slow_wait() {
	local port=$1 i
	for ((i = 0; i < 600; i++)); do
		curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$port/bench" 2>/dev/null && return 0
		sleep 0.2
	done
	die "no answer on $port under valgrind"
}

P_BACKEND=$BASE_PORT
start_backend "$LOAD_CPU" "$P_BACKEND"
for target in "$@"; do
	port=$((BASE_PORT + 1))
	BASE_PORT=$port
	headers=()
	case $target in
	bare)
		# shellcheck disable=SC2086 # BARE_ARGS is a list of flags
		start bare "$PROXY_CPU" "$BIN/examples/bare_forwarder" --listen "127.0.0.1:$port" \
			--backend "127.0.0.1:$P_BACKEND" --threads "$PROXY_THREADS" $BARE_ARGS
		slow_wait "$port"
		;;
	sessionlb)
		# start_sessionlb waits 10 s at most; start it ourselves, then reuse known_session.
		mkdir -p "$WORK/shared-storage" "$WORK/run"
		(
			umask 077
			head -c 32 /dev/urandom | base64 >"$WORK/secure-cookie-key"
		)
		fill bench/sessionlb.toml.tmpl "$WORK/sessionlb.toml" WORK="$WORK" PORT="$port" \
			BACKEND="127.0.0.1:$P_BACKEND" THREADS="$PROXY_THREADS"
		start sessionlb "$PROXY_CPU" "$BIN/sessionlb" --config "$WORK/sessionlb.toml" serve
		slow_wait "$port"
		known_session "$port"
		headers=(-H "Cookie: $COOKIE")
		;;
	*) die "unknown target $target" ;;
	esac
	pid=${TPID[$target]}
	taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d5s "${headers[@]}" "http://127.0.0.1:$port/bench" >/dev/null
	callgrind_control -z "$pid" >/dev/null
	taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "${headers[@]}" \
		"http://127.0.0.1:$port/bench" >"$WORK/wrk-$target.txt"
	callgrind_control -d "$pid" >/dev/null
	sleep 1
	requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk-$target.txt")
	# The dump after zeroing is the newest file of this PID.
	out=$(find "$CALLGRIND_DATA" -name "*.$pid.out*" -newer "$WORK/wrk-$target.txt" | sort | tail -1)
	[[ -n $out ]] || die "no callgrind dump for $target"
	total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
	{
		echo "# $target under callgrind: wrk -t1 -c$CONNECTIONS -d$DURATION after a 5 s warm-up; $(date -Iseconds)"
		echo "# requests: $requests; instructions (all threads): $total;" \
			"instructions per request: $(awk -v t="$total" -v r="$requests" 'BEGIN { printf "%.0f", t / r }')"
		echo "## inclusive (callgrind_annotate --inclusive=yes), top 60"
		callgrind_annotate --inclusive=yes --threshold=100 "$out" 2>/dev/null | sed -n '/^Ir/,$p' | awk 'NR <= 62'
		echo "## exclusive, top 40"
		callgrind_annotate --threshold=100 "$out" 2>/dev/null | sed -n '/^Ir/,$p' | awk 'NR <= 42'
	} >"$OUT/$target-callgrind.txt"
	log "$target: $requests requests, $total instructions: $OUT/$target-callgrind.txt ($out)"
done
