#!/usr/bin/env bash
# End-to-end proxy throughput: wrk against the demo backend directly and
# through nginx, HAProxy, a bare Pingora forwarder (examples/bare_forwarder.rs,
# the floor of our stack) and one sessionlb node routing a known session.
#
# Usage (from anywhere; paths are relative to the repository root):
#
#   bench/e2e.sh                                  # 5 rounds, wrk -t1 -c64 -d10s
#   ROUNDS=7 DURATION=15s CONNECTIONS=128 bench/e2e.sh
#
# Settings (environment):
#   ROUNDS=5           measured rounds; each round runs every target once,
#                      in an order rotated by one target per round
#   DURATION=10s       wrk -d of every measured run
#   WARMUP=3s          wrk -d of one uncounted warm-up run per target
#   CONNECTIONS=64     wrk -c
#   THREADS=1          wrk -t
#   TARGETS="direct nginx haproxy bare sessionlb"   which targets, in round-1 order;
#                      also `sessionlb-anon`: the same sessionlb node, requests
#                      without any cookie (each an anonymous browser's first
#                      request: a pin chosen and signed), e.g.
#                      TARGETS="sessionlb sessionlb-anon" for cookie-less vs pinned
#   PROXY_CPU=0        core every proxy is pinned to (taskset -c)
#   LOAD_CPU=1         core wrk and the backend are pinned to
#   PROXY_THREADS=1    Pingora worker threads of the bare forwarder and of sessionlb
#   BARE_ARGS=""       extra flags for the bare forwarder (e.g. "--keepalive-pool 256")
#   BASE_PORT=18600    ports BASE_PORT..BASE_PORT+4 are used on 127.0.0.1
#   QUIET_TIMEOUT=900  before each run, wait up to this many seconds while a
#                      compiler (rustc, cc1, ld, ...) runs on the machine or other
#                      processes use more than QUIET_CPU=15 % of a core; a run is
#                      flagged "noisy" if we gave up waiting, a compiler ran right
#                      after it, or others used > 10 % of a core (or steal) during it
#   SKIP_BUILD=0       1 = use the existing release binaries
#   BINARIES=DIR       use the binaries saved by an earlier run with KEEP_BINARIES=DIR
#                      (the cargo target dir may be shared: see prepare_binaries in lib.sh; KEEP_BINARIES=DIR saves them)
#   OUT=bench/results/e2e-<date>   where the raw wrk outputs, raw.tsv and summary.md go
#                      (summary.md by bench/summarize.sh, which can also pool several runs)
#   CARGO_TARGET_DIR   as for cargo (default: ./target)
#
# Every process is started here, pinned, and stopped by PID on exit (also on
# Ctrl-C). Before measuring, the script checks that sessionlb routes the
# known session (200, `x-backend: bench`, no new Set-Cookie) and fails
# otherwise; afterwards it checks sessionlb's metrics (one placement, no
# rejected cookies, every request routed locally with 2xx).
#
# All targets get the same request, including the sessionlb pin cookie:
# `GET /bench` (2-byte body) with `Cookie: sessionlb-affinity=...` — except
# `sessionlb-anon`, which sends no cookie.

set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
TARGETS=${TARGETS:-"direct nginx haproxy bare sessionlb"}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROXY_THREADS=${PROXY_THREADS:-1}
BARE_ARGS=${BARE_ARGS:-}
BASE_PORT=${BASE_PORT:-18600}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-900}
QUIET_CPU=${QUIET_CPU:-15}
SKIP_BUILD=${SKIP_BUILD:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-bench/results/e2e-$(date +%Y%m%d-%H%M%S)}

P_DIRECT=$BASE_PORT
P_NGINX=$((BASE_PORT + 1))
P_HAPROXY=$((BASE_PORT + 2))
P_BARE=$((BASE_PORT + 3))
P_SLB=$((BASE_PORT + 4))
# The backend listens on P_DIRECT; "direct" is wrk straight to it.

read -r -a TARGET_LIST <<<"$TARGETS"

# shellcheck source=bench/lib.sh
. bench/lib.sh

port_of() {
	case $1 in
	direct) echo "$P_DIRECT" ;;
	nginx) echo "$P_NGINX" ;;
	haproxy) echo "$P_HAPROXY" ;;
	bare) echo "$P_BARE" ;;
	sessionlb | sessionlb-anon) echo "$P_SLB" ;;
	*) die "unknown target $1" ;;
	esac
}

has_target() {
	local t
	for t in "${TARGET_LIST[@]}"; do
		[[ $t == "$1" ]] && return 0
	done
	return 1
}

# ---------------------------------------------------------------- build

for tool in wrk nginx haproxy taskset curl pgrep; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
for p in "$P_DIRECT" "$P_NGINX" "$P_HAPROXY" "$P_BARE" "$P_SLB"; do
	if ss -Hltn "sport = :$p" | grep -q .; then
		die "port $p is in use (set BASE_PORT)"
	fi
done

prepare_binaries # sets BIN

mkdir -p "$OUT"
RAW=$OUT/raw.tsv
{
	echo "# bench/e2e.sh $(date -Iseconds)"
	echo "# git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
	echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)"
	echo "# wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (warm-up $WARMUP); proxies on core $PROXY_CPU, wrk + backend on core $LOAD_CPU"
	echo "# rounds=$ROUNDS targets=${TARGET_LIST[*]} proxy_threads=$PROXY_THREADS bare_args='$BARE_ARGS'"
	echo "# $(nginx -v 2>&1); $(haproxy -v | head -1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
	printf 'round\ttarget\treq_per_s\tp50_ms\tp99_ms\tnon2xx\tsocket_errors\trequests\tproxy_cpu_pct\tproxy_cpu_us_per_req\tload_core_cpu_pct\tload1_before\tother_cpu_pct\tsteal_pct\tnoisy\n'
} >"$RAW"

# ---------------------------------------------------------------- start targets

start_backend "$LOAD_CPU" "$P_DIRECT"
! has_target nginx || start_nginx "$PROXY_CPU" "$P_NGINX" "$P_DIRECT"
! has_target haproxy || start_haproxy "$PROXY_CPU" "$P_HAPROXY" "$P_DIRECT"
# shellcheck disable=SC2086 # BARE_ARGS is a list of flags
! has_target bare || start_bare "$PROXY_CPU" "$P_BARE" "$P_DIRECT" "$PROXY_THREADS" $BARE_ARGS

COOKIE=""
if has_target sessionlb || has_target sessionlb-anon; then
	start_sessionlb "$PROXY_CPU" "$P_SLB" "$P_DIRECT" "$PROXY_THREADS"
	known_session "$P_SLB" # sets COOKIE
	metrics_before=$(curl -fsS "http://127.0.0.1:$P_SLB/metrics")
fi
# Every target gets the same request headers.
WRK_HEADERS=()
[[ -z $COOKIE ]] || WRK_HEADERS=(-H "Cookie: $COOKIE")

# headers_of TARGET: the request headers wrk sends to TARGET.
headers_of() {
	HEADERS=("${WRK_HEADERS[@]}")
	[[ $1 != sessionlb-anon ]] || HEADERS=()
}

# Sanity: every proxy reaches the backend.
for t in "${TARGET_LIST[@]}"; do
	headers_of "$t"
	headers=$(curl -fsS -D - -o /dev/null "${HEADERS[@]}" "http://127.0.0.1:$(port_of "$t")/bench" | tr -d '\r')
	grep -qi '^x-backend: bench$' <<<"$headers" || die "$t does not reach the backend: $headers"
	if [[ $t == sessionlb-anon ]] && ! grep -qi '^set-cookie: sessionlb-affinity=v' <<<"$headers"; then
		die "a cookie-less request through sessionlb got no cookie: $headers"
	fi
done

# ---------------------------------------------------------------- measure

# to_ms VALUE: wrk latency ("812.00us", "1.23ms", "1.01s", "2.00m") in ms.
to_ms() {
	awk -v v="$1" 'BEGIN {
		n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
		f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
		if (f < 0) { print "NaN"; exit 1 }
		printf "%.3f", n * f
	}'
}

# run_wrk TARGET DURATION OUTFILE
run_wrk() {
	headers_of "$1"
	taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2" --latency "${HEADERS[@]}" \
		"http://127.0.0.1:$(port_of "$1")/bench" >"$3" 2>&1
}

# measure TARGET OUTFILE: run wrk for DURATION and set, in % of one core
# during the run: PROXY_CPU_PCT (the target proxy, all its threads and
# worker processes), LOAD_CPU_PCT (backend + wrk, i.e. the load core),
# OTHER_CPU (processes other than ours and wrk) and STEAL (the hypervisor).
measure() {
	local t0 t1 b0 b1 s0 s1 o0 o1 x0 x1 k0 k1 wu ws proxy=() name=${1%-anon}
	[[ $1 == direct ]] || proxy=("${TPID[$name]}")
	read -r b0 s0 < <(sys_ticks)
	o0=$(pid_ticks "${PIDS[@]}")
	x0=$(pid_ticks "${proxy[@]}")
	k0=$(pid_ticks "${TPID[backend]}")
	t0=$EPOCHREALTIME
	TIMEFORMAT='%3U %3S'
	if ! { time run_wrk "$1" "$DURATION" "$2"; } 2>"$WORK/wrk-time"; then
		die "wrk failed against $1: $(cat "$2" "$WORK/wrk-time")"
	fi
	t1=$EPOCHREALTIME
	read -r b1 s1 < <(sys_ticks)
	o1=$(pid_ticks "${PIDS[@]}")
	x1=$(pid_ticks "${proxy[@]}")
	k1=$(pid_ticks "${TPID[backend]}")
	read -r wu ws <"$WORK/wrk-time"
	PROXY_CPU_PCT=$(awk -v x="$((x1 - x0))" -v hz="$HZ" -v t0="$t0" -v t1="$t1" \
		'BEGIN { printf "%.1f", x / hz / (t1 - t0) * 100 }')
	LOAD_CPU_PCT=$(awk -v k="$((k1 - k0))" -v wu="$wu" -v ws="$ws" -v hz="$HZ" -v t0="$t0" -v t1="$t1" \
		'BEGIN { printf "%.1f", (k / hz + wu + ws) / (t1 - t0) * 100 }')
	OTHER_CPU=$(awk -v b="$((b1 - b0))" -v o="$((o1 - o0))" -v wu="$wu" -v ws="$ws" -v hz="$HZ" \
		-v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f", ((b - o) / hz - wu - ws) / (t1 - t0) * 100 }')
	STEAL=$(awk -v s="$((s1 - s0))" -v hz="$HZ" -v t0="$t0" -v t1="$t1" \
		'BEGIN { printf "%.1f", s / hz / (t1 - t0) * 100 }')
}

# record ROUND TARGET OUTFILE LOAD NOISY: one line of raw.tsv.
record() {
	local round=$1 target=$2 file=$3 rps p50 p99 non2xx sock reqs us_per_req
	rps=$(awk '/^Requests\/sec:/ { print $2 }' "$file")
	[[ -n $rps ]] || die "no Requests/sec in $file: $(cat "$file")"
	p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$file")")
	p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$file")")
	non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$file")
	sock=$(awk '/Socket errors:/ { sub(/.*Socket errors: */, ""); gsub(/ /, ""); print }' "$file")
	non2xx=${non2xx:-0}
	if ((non2xx > 0)); then
		die "$target answered $non2xx non-2xx responses in round $round: $(cat "$file")"
	fi
	reqs=$(awk '/requests in/ { print $1 }' "$file")
	us_per_req=$(awk -v c="$PROXY_CPU_PCT" -v r="$rps" 'BEGIN { printf "%.2f", c / 100 / r * 1e6 }')
	printf '%s\t%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "$rps" "$p50" \
		"$p99" "$non2xx" "${sock:--}" "$reqs" "$PROXY_CPU_PCT" "$us_per_req" "$LOAD_CPU_PCT" "$4" \
		"$OTHER_CPU" "$STEAL" "$5" >>"$RAW"
	log "round $round $target: $rps req/s, p50 $p50 ms, p99 $p99 ms; CPU: proxy $PROXY_CPU_PCT% ($us_per_req µs/req)," \
		"load core $LOAD_CPU_PCT%, other $OTHER_CPU%, steal $STEAL%${sock:+; socket errors $sock}"
}

wait_quiet || true
log "warm-up: $WARMUP per target (not counted)"
for t in "${TARGET_LIST[@]}"; do
	run_wrk "$t" "$WARMUP" "$OUT/warmup-$t.txt" || die "wrk failed against $t: $(cat "$OUT/warmup-$t.txt")"
done

n=${#TARGET_LIST[@]}
for ((r = 1; r <= ROUNDS; r++)); do
	for ((k = 0; k < n; k++)); do
		t=${TARGET_LIST[$(((k + r - 1) % n))]}
		noisy=no
		wait_quiet || noisy=yes
		load=$(cut -d' ' -f1 /proc/loadavg)
		measure "$t" "$OUT/round$r-$t.txt"
		! compilers_running || noisy=yes
		# More than 10% of a core used by others, or stolen: not a quiet run.
		awk -v o="$OTHER_CPU" -v s="$STEAL" 'BEGIN { exit !(o > 10 || s > 10) }' && noisy=yes
		record "$r" "$t" "$OUT/round$r-$t.txt" "$load" "$noisy"
	done
done

# ---------------------------------------------------------------- check sessionlb

if has_target sessionlb || has_target sessionlb-anon; then
	metrics_after=$(curl -fsS "http://127.0.0.1:$P_SLB/metrics")
	metric() { awk -v m="$1" 'index($1, m) == 1 { s += $2 } END { printf "%.0f", s }' <<<"$2"; }
	placed=$(($(metric sessionlb_placements_total "$metrics_after") - $(metric sessionlb_placements_total "$metrics_before")))
	rejected=$(metric sessionlb_rejected_cookies_total "$metrics_after")
	local_ok=$(($(metric 'sessionlb_requests_total{class="2xx",route="local"}' "$metrics_after") -
		$(metric 'sessionlb_requests_total{class="2xx",route="local"}' "$metrics_before")))
	pins=$(($(metric sessionlb_pins_issued_total "$metrics_after") - $(metric sessionlb_pins_issued_total "$metrics_before")))
	wrk_total=$({ cat "$OUT"/*-sessionlb.txt "$OUT"/*-sessionlb-anon.txt 2>/dev/null || true; } |
		awk '/requests in/ { s += $1 } END { printf "%.0f", s }')
	{
		echo "# sessionlb during the runs: $placed placements, $pins pins issued, $rejected rejected cookies,"
		echo "# $local_ok requests routed locally with 2xx; wrk counted $wrk_total completed requests"
	} | tee -a "$RAW" >&2
	if ! has_target sessionlb-anon; then
		((placed == 0)) || die "sessionlb placed $placed new sessions during the runs: the known session was not used"
	fi
	((rejected == 0)) || die "sessionlb rejected $rejected cookies"
	((local_ok >= wrk_total)) || die "sessionlb routed fewer requests ($local_ok) than wrk completed ($wrk_total)"
fi

# ---------------------------------------------------------------- summary

bench/summarize.sh "$RAW" >"$OUT/summary.md"
cat "$OUT/summary.md"
log "raw numbers: $RAW; wrk outputs and summary.md in $OUT"
