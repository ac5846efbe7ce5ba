#!/usr/bin/env bash
# The wire, against the peers, in one run (issue 12): what an IDE's traffic
# feels through sessionlb, nginx and HAProxy (both configured as sticky
# reverse proxies, bench/wire-*.tmpl), the bare Pingora forwarder
# (examples/bare_forwarder.rs: the floor of our stack, so that what is
# sessionlb's own shows apart from what is Pingora's) and directly:
#
#   - WebSocket echo round trips with 1, 100 and 1,000 sockets open through
#     the proxy: RATE messages/s in all, spread evenly over the sockets (each
#     socket one message in flight), SIZE-byte text messages; p50/p99 round
#     trip, and the latency each proxy adds over the direct run of the same
#     round;
#   - one BULK_BYTES (1 GiB) upload and one download through each: MiB/s,
#     and the proxy's CPU per GiB.
#
# The backend and the client are examples/wire_driver (the backend as cheap
# as possible: echo, discard, one shared download buffer). Every proxy is
# pinned to PROXY_CPU with one worker; client and backend share LOAD_CPU.
#
# Usage (from anywhere; paths are relative to the repository root):
#
#   bench/wire.sh                                # 3 rounds, all tests
#   ROUNDS=1 SOCKETS="1 100" BULK_BYTES=268435456 bench/wire.sh
#   PROFILE=1 bench/wire.sh                      # and perf profiles of sessionlb and nginx
#
# Settings (environment):
#   ROUNDS=3             each round runs every test on every target, the
#                        target order rotated by one per round
#   SOCKETS="1 100 1000" open WebSockets per WebSocket test
#   RATE=1000            messages/s over all sockets; DURATION=10 s recorded after WARMUP=2 s
#   SIZE=100             bytes per message
#   BULK_BYTES=1073741824  bytes per upload and per download (0 = no bulk tests)
#   TARGETS="direct nginx haproxy bare sessionlb"
#   PROXY_CPU=0 LOAD_CPU=1 PROXY_THREADS=1 (Pingora threads of sessionlb)
#   BASE_PORT=18800      ports BASE_PORT..BASE_PORT+4 on 127.0.0.1
#   QUIET_TIMEOUT=900 QUIET_CPU=15   wait for a quiet machine before each run (see e2e.sh);
#                        a run is flagged noisy when others used > 10 % of a core during it
#   PROFILE=0            1: afterwards, perf profiles (cpu-clock, DWARF call graphs) of
#                        sessionlb, bare and nginx during the largest WebSocket test and both bulk
#                        transfers, summarised in OUT/profile-*.txt; PERF_DATA=DIR keeps the
#                        perf.data files there (for `perf report -i`; not committed)
#   SKIP_BUILD=0 BINARIES=DIR KEEP_BINARIES=DIR   as in e2e.sh
#   OUT=bench/results/wire-<date>   raw.tsv, summary.md, profiles
#
# Before measuring, sessionlb must route the known session (see
# known_session in lib.sh); afterwards it must have placed nothing and
# rejected no cookie. Every process is started here and stopped by PID.

set -euo pipefail

ROUNDS=${ROUNDS:-3}
SOCKETS=${SOCKETS:-"1 100 1000"}
RATE=${RATE:-1000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
SIZE=${SIZE:-100}
BULK_BYTES=${BULK_BYTES:-1073741824}
TARGETS=${TARGETS:-"direct nginx haproxy bare sessionlb"}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROXY_THREADS=${PROXY_THREADS:-1}
BASE_PORT=${BASE_PORT:-18800}
PROFILE=${PROFILE:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-bench/results/wire-$(date +%Y%m%d-%H%M%S)}

# shellcheck source=bench/lib.sh
. bench/lib.sh
BINS=(sessionlb examples/wire_driver examples/bare_forwarder)

read -r -a TARGET_LIST <<<"$TARGETS"
read -r -a SOCKET_LIST <<<"$SOCKETS"
P_DIRECT=$BASE_PORT
port_of() {
	case $1 in
	direct) echo "$P_DIRECT" ;;
	nginx) echo $((BASE_PORT + 1)) ;;
	haproxy) echo $((BASE_PORT + 2)) ;;
	sessionlb) echo $((BASE_PORT + 3)) ;;
	bare) echo $((BASE_PORT + 4)) ;;
	*) die "unknown target $1" ;;
	esac
}

for tool in nginx haproxy taskset curl pgrep python3; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
((PROFILE == 0)) || command -v perf >/dev/null || die "perf is not installed (apt-get install linux-perf)"
for t in "${TARGET_LIST[@]}"; do
	if ss -Hltn "sport = :$(port_of "$t")" | grep -q .; then
		die "port $(port_of "$t") is in use (set BASE_PORT)"
	fi
done
# 1,000 sockets through a proxy: 2,000 descriptors in the proxy, 1,000 in the client and the backend.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

prepare_binaries # sets BIN
mkdir -p "$OUT"
RAW=$OUT/raw.tsv
{
	echo "# bench/wire.sh $(date -Iseconds)"
	echo "# git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
	echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr); load at start $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "# proxies on core $PROXY_CPU (one worker; sessionlb threads=$PROXY_THREADS), client + backend on core $LOAD_CPU"
	echo "# ws: sockets=${SOCKET_LIST[*]} rate=$RATE/s size=$SIZE B duration=${DURATION}s warmup=${WARMUP}s; bulk: $BULK_BYTES bytes; rounds=$ROUNDS"
	echo "# $(nginx -v 2>&1); $(haproxy -v | head -1)"
	printf 'round\ttest\ttarget\tp50_us\tp90_us\tp99_us\tp999_us\tmax_us\tmessages\tmsgs_per_s\tlate\tmib_per_s\tseconds\tproxy_cpu_pct\tproxy_cpu_per_unit\tproxy_rss_mb\tload1\tother_cpu_pct\tsteal_pct\tnoisy\n'
} >"$RAW"

# ---------------------------------------------------------------- targets

start backend "$LOAD_CPU" "$BIN/examples/wire_driver" backend --listen "127.0.0.1:$P_DIRECT"
wait_http backend "$P_DIRECT"
has_target() { [[ " ${TARGET_LIST[*]} " == *" $1 "* ]]; }
! has_target nginx || start_nginx "$PROXY_CPU" "$(port_of nginx)" "$P_DIRECT" bench/wire-nginx.conf.tmpl
! has_target haproxy || start_haproxy "$PROXY_CPU" "$(port_of haproxy)" "$P_DIRECT" bench/wire-haproxy.cfg.tmpl
! has_target bare || start_bare "$PROXY_CPU" "$(port_of bare)" "$P_DIRECT" "$PROXY_THREADS"
COOKIE=""
if has_target sessionlb; then
	start_sessionlb "$PROXY_CPU" "$(port_of sessionlb)" "$P_DIRECT" "$PROXY_THREADS"
	known_session "$(port_of sessionlb)" # sets COOKIE
	metrics_before=$(curl -fsS "http://127.0.0.1:$(port_of sessionlb)/metrics")
fi
# Every target gets the same cookie (the proxies hash it or ignore it).
COOKIE_ARGS=()
[[ -z $COOKIE ]] || COOKIE_ARGS=(--cookie "$COOKIE")

# The proxy's process (nginx: its worker).
proxy_pids() {
	[[ $1 == direct ]] && return 0
	echo "${TPID[$1]}"
}

# ---------------------------------------------------------------- measure

# run_test TEST TARGET: one run of the client; prints its figures.
run_test() {
	local test=$1 target=$2 port
	port=$(port_of "$target")
	case $test in
	ws-*)
		taskset -c "$LOAD_CPU" "$BIN/examples/wire_driver" ws --url "ws://127.0.0.1:$port/ws" "${COOKIE_ARGS[@]}" \
			--sockets "${test#ws-}" --rate "$RATE" --size "$SIZE" --warmup "$WARMUP" --duration "$DURATION"
		;;
	up | down)
		taskset -c "$LOAD_CPU" "$BIN/examples/wire_driver" bulk --base "http://127.0.0.1:$port" "${COOKIE_ARGS[@]}" \
			--direction "$test" --bytes "$BULK_BYTES"
		;;
	esac
}

# rss_mb PID...: resident memory of these processes and their children, in MB.
rss_mb() {
	local p all=()
	for p in "$@"; do
		all+=("$p")
		mapfile -t -O "${#all[@]}" all < <(pgrep -P "$p" || true)
	done
	for p in "${all[@]}"; do
		awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true
	done | awk '{ s += $1 } END { printf "%.1f", s / 1024 }'
}

# measure ROUND TEST TARGET: run it and append a line to RAW.
measure() {
	local round=$1 test=$2 target=$3 noisy=no load out b0 b1 s0 s1 o0 o1 x0 x1 t0 t1 pids=()
	mapfile -t pids < <(proxy_pids "$target")
	wait_quiet || noisy=yes
	load=$(cut -d' ' -f1 /proc/loadavg)
	read -r b0 s0 < <(sys_ticks)
	o0=$(pid_ticks "${PIDS[@]}")
	x0=$(pid_ticks "${pids[@]}")
	t0=$EPOCHREALTIME
	TIMEFORMAT='%3U %3S'
	{ time run_test "$test" "$target"; } >"$WORK/client-out" 2>"$WORK/client-time" &
	local client=$! rss=-
	# The proxy's memory halfway through the recorded part (WebSocket tests: all sockets open).
	if [[ $test == ws-* && $target != direct ]]; then
		sleep "$(awk -v w="$WARMUP" -v d="$DURATION" 'BEGIN { print w + d / 2 }')"
		rss=$(rss_mb "${pids[@]}")
	fi
	if ! wait "$client"; then
		die "$test through $target failed: $(cat "$WORK/client-out" "$WORK/client-time")"
	fi
	out=$(cat "$WORK/client-out")
	t1=$EPOCHREALTIME
	read -r b1 s1 < <(sys_ticks)
	o1=$(pid_ticks "${PIDS[@]}")
	x1=$(pid_ticks "${pids[@]}")
	local cu cs
	read -r cu cs < <(tail -1 "$WORK/client-time")
	local secs proxy other steal
	secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
	proxy=$(awk -v x="$((x1 - x0))" -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.1f", x / hz / s * 100 }')
	other=$(awk -v b="$((b1 - b0))" -v o="$((o1 - o0))" -v cu="$cu" -v cs="$cs" -v hz="$HZ" -v s="$secs" \
		'BEGIN { printf "%.1f", ((b - o) / hz - cu - cs) / s * 100 }')
	steal=$(awk -v x="$((s1 - s0))" -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.1f", x / hz / s * 100 }')
	! compilers_running || noisy=yes
	awk -v o="$other" -v s="$steal" 'BEGIN { exit !(o > 10 || s > 10) }' && noisy=yes
	local line
	case $test in
	ws-*)
		# p50 p90 p99 p999 max messages rate late errors; CPU per message in µs over the whole run
		line=$(awk -F'\t' -v proxy="$proxy" -v s="$secs" -v w="$WARMUP" -v d="$DURATION" '{
			per = proxy / 100 * s / ($6 * (w + d) / d) * 1e6
			printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\t%s\t%.2f", $1, $2, $3, $4, $5, $6, $7, $8, proxy, per }' <<<"$out")
		;;
	*)
		# bytes seconds MiB/s; proxy CPU-seconds per GiB
		line=$(awk -F'\t' -v proxy="$proxy" -v s="$secs" '{
			printf "-\t-\t-\t-\t-\t-\t-\t-\t%s\t%s\t%s\t%.3f", $3, $2, proxy, proxy / 100 * s / ($1 / 1073741824) }' <<<"$out")
		;;
	esac
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$test" "$target" "$line" "$rss" "$load" "$other" "$steal" "$noisy" >>"$RAW"
	log "round $round $test $target: $(tr '\t' ' ' <<<"$out"); proxy CPU $proxy%, RSS $rss MB, others $other%${noisy/no/}"
}

TESTS=()
for s in "${SOCKET_LIST[@]}"; do TESTS+=("ws-$s"); done
((BULK_BYTES == 0)) || TESTS+=(up down)
n=${#TARGET_LIST[@]}
for ((r = 1; r <= ROUNDS; r++)); do
	for test in "${TESTS[@]}"; do
		for ((k = 0; k < n; k++)); do
			measure "$r" "$test" "${TARGET_LIST[$(((k + r - 1) % n))]}"
		done
	done
done

# ---------------------------------------------------------------- check sessionlb

if has_target sessionlb; then
	metrics_after=$(curl -fsS "http://127.0.0.1:$(port_of sessionlb)/metrics")
	metric() { awk -v m="$1" 'index($1, m) == 1 { s += $2 } END { printf "%.0f", s }' <<<"$2"; }
	placed=$(($(metric sessionlb_placements_total "$metrics_after") - $(metric sessionlb_placements_total "$metrics_before")))
	rejected=$(metric sessionlb_rejected_cookies_total "$metrics_after")
	echo "# sessionlb during the runs: $placed placements, $rejected rejected cookies" | tee -a "$RAW" >&2
	((placed == 0)) || die "sessionlb placed $placed sessions during the runs: the known session was not used"
	((rejected == 0)) || die "sessionlb rejected $rejected cookies"
fi

# ---------------------------------------------------------------- profiles

if ((PROFILE == 1)); then
	for target in sessionlb bare nginx; do
		has_target "$target" || continue
		pid=${TPID[$target]}
		[[ $target == nginx ]] && pid=$(pgrep -P "$pid" | head -1) # the worker
		for test in "ws-${SOCKET_LIST[-1]}" up down; do
			[[ $test == ws-* ]] || ((BULK_BYTES > 0)) || continue
			data=${PERF_DATA:-$WORK}/perf-$target-$test.data
			mkdir -p "$(dirname "$data")"
			taskset -c "$LOAD_CPU" perf record -q -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$pid" -o "$data" &
			perf_pid=$!
			sleep 0.5
			out=$(run_test "$test" "$target")
			kill -INT "$perf_pid"
			wait "$perf_pid" || true
			report() { perf report -i "$data" --stdio --no-inline "$@" 2>/dev/null | grep -v '^$'; }
			{
				echo "# $target, $test ($(tr '\t' ' ' <<<"$out")): self time by DSO and symbol, >= 0.5%"
				report --no-children --sort dso,sym -g none --percent-limit 0.5
			} >"$OUT/profile-$target-$test-self.txt"
			{
				echo "# $target, $test: inclusive time by symbol, >= 2%"
				report --children --sort sym -g none --percent-limit 2
			} >"$OUT/profile-$target-$test-inclusive.txt"
			log "profiled $target during $test: $OUT/profile-$target-$test-*.txt"
		done
	done
fi

python3 bench/wire_summary.py "$RAW" >"$OUT/summary.md"
cat "$OUT/summary.md"
log "raw numbers: $RAW; summary: $OUT/summary.md"
