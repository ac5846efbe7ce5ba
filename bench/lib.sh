# shellcheck shell=bash
# Shared helpers of the bench/ scripts (sourced, from the repository root).
#
# Sourcing creates a temporary WORK directory and installs traps that stop
# every process started with `start` (by PID: SIGTERM, then SIGKILL after
# 5 s) and remove WORK on exit, Ctrl-C or SIGTERM.

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	log "FAILED: $*"
	exit 1
}

# Quiet-machine gate (see wait_quiet).
: "${QUIET_TIMEOUT:=900}" "${QUIET_CPU:=15}"

# ---------------------------------------------------------------- processes

WORK=$(mktemp -d /tmp/sessionlb-bench.XXXXXX)
PIDS=()
declare -A TPID # name -> PID

# Stop everything we started, by PID: SIGTERM, then SIGKILL after 5 s.
cleanup() {
	local status=$? pid i
	trap - EXIT INT TERM
	for pid in "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		for ((i = 0; i < 50; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "PID $pid did not stop; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$WORK"
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CPU COMMAND...: run COMMAND pinned to CPU, output to $WORK/NAME.log.
start() {
	local name=$1 cpu=$2
	shift 2
	taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
	PIDS+=("$!")
	# shellcheck disable=SC2034 # read by the scripts that source this file
	TPID[$name]=$!
	log "started $name (PID $!) on core $cpu: $*"
}

# wait_http NAME PORT: wait until GET /bench answers on PORT (10 s at most).
wait_http() {
	local name=$1 port=$2 i
	for ((i = 0; i < 100; i++)); do
		if curl -fsS -o /dev/null "http://127.0.0.1:$port/bench" 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	cat "$WORK/$name.log" >&2 || true
	die "$name does not answer on 127.0.0.1:$port"
}

# fill TEMPLATE OUTPUT KEY=VALUE...: replace @KEY@ by VALUE.
fill() {
	local tmpl=$1 out=$2 kv args=()
	shift 2
	for kv in "$@"; do
		args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
	done
	sed "${args[@]}" "$tmpl" >"$out"
}

# Compilers and linkers of other work on this machine (e.g. cargo builds).
compilers_running() {
	grep -qsxE 'rustc|cargo|cargo-nextest|rust-lld|cc1|cc1plus|collect2|ld|ld.lld|ld.gold|cc|c\+\+|clang' /proc/[0-9]*/comm
}

# CPU accounting, to see whether anything else ran during a measurement.
HZ=$(getconf CLK_TCK)
# sys_ticks: "busy steal" of all cores (busy = user + nice + system + irq + softirq).
sys_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8, $9 }' /proc/stat; }
# pid_ticks PID...: user + system ticks of these processes and of their children.
pid_ticks() {
	local p kids all=()
	for p in "$@"; do
		all+=("$p")
		mapfile -t kids < <(pgrep -P "$p" || true)
		all+=("${kids[@]}")
	done
	for p in "${all[@]}"; do
		cat "/proc/$p/stat" 2>/dev/null || true
	done | awk '{ s += $14 + $15 } END { print s + 0 }'
}

# busy_others: % of one core used over 2 s by processes other than ours.
busy_others() {
	local b0 b1 o0 o1 _s
	read -r b0 _s < <(sys_ticks)
	o0=$(pid_ticks "${PIDS[@]}")
	sleep 2
	read -r b1 _s < <(sys_ticks)
	o1=$(pid_ticks "${PIDS[@]}")
	awk -v b="$((b1 - b0))" -v o="$((o1 - o0))" -v hz="$HZ" 'BEGIN { printf "%.0f", (b - o) / hz / 2 * 100 }'
}

# quiet: no compiler runs and other processes use at most QUIET_CPU % of a core.
quiet() {
	local busy
	! compilers_running || return 1
	busy=$(busy_others)
	((busy <= QUIET_CPU)) || return 1
}

# wait_quiet: wait (up to QUIET_TIMEOUT s) for a quiet machine; 1 if we gave up.
wait_quiet() {
	local waited=0
	until quiet; do
		if ((waited == 0)); then
			log "the machine is busy (a compiler, or other processes > ${QUIET_CPU}% of a core);" \
				"waiting (load: $(cut -d' ' -f1-3 /proc/loadavg))"
		fi
		if ((waited >= QUIET_TIMEOUT)); then
			log "still busy after ${QUIET_TIMEOUT}s; measuring anyway (flagged noisy)"
			return 1
		fi
		sleep 3
		waited=$((waited + 5))
	done
	((waited == 0)) || log "quiet again after ~${waited}s"
	return 0
}

# ---------------------------------------------------------------- binaries

BINS=(sessionlb sessionlb-demo-backend examples/bare_forwarder)

# built_here DIR: whether every binary in DIR was built from this checkout:
# its path is their compilation directory (a NUL-terminated string in the
# debug info).
built_here() {
	local b
	for b in "${BINS[@]}"; do
		[[ -x $1/$b ]] && grep -aqP "\Q$ROOT\E\x00" "$1/$b" || return 1
	done
}

# copy_binaries FROM: copy FROM's binaries to WORK/bin and set BIN to it.
copy_binaries() {
	local b
	mkdir -p "$WORK/bin/examples"
	for b in "${BINS[@]}"; do
		[[ -x $1/$b ]] || die "$1/$b is missing (build without SKIP_BUILD=1)"
		cp "$1/$b" "$WORK/bin/$b"
	done
	BIN=$WORK/bin
}

# prepare_binaries: build the release binaries (unless SKIP_BUILD=1 or
# BINARIES=DIR is given), copy them to WORK/bin and set BIN to it.
#
# The cargo target directory may be shared with other worktrees of this
# repository (CARGO_TARGET_DIR): their builds produce the same artifact names,
# replace target/release/* at any time, and can even make cargo take our
# crate for fresh when it was last built from another checkout. So we run
# private copies, checked to have been built from this checkout; when they
# were not, the crate roots are touched (mtime only) to force cargo to
# rebuild them from here, once. KEEP_BINARIES=DIR saves the checked copies
# for later runs with BINARIES=DIR.
prepare_binaries() {
	local b release=${CARGO_TARGET_DIR:-$ROOT/target}/release
	if [[ -n ${BINARIES:-} ]]; then
		release=$BINARIES
	elif [[ ${SKIP_BUILD:-0} != 1 ]]; then
		log "building release binaries (target dir: ${CARGO_TARGET_DIR:-$ROOT/target})"
		cargo build --release --bins --examples
		if ! built_here "$release"; then
			log "the release binaries were built from another checkout; rebuilding from $ROOT"
			touch src/main.rs src/lib.rs src/bin/demo_backend.rs examples/bare_forwarder.rs
			cargo build --release --bins --examples
		fi
	fi
	copy_binaries "$release"
	built_here "$BIN" || die "the binaries in $release were not built from $ROOT" \
		"(another worktree built into the shared target dir?); build again without SKIP_BUILD/BINARIES"
	if [[ -n ${KEEP_BINARIES:-} ]]; then
		mkdir -p "$KEEP_BINARIES/examples"
		for b in "${BINS[@]}"; do
			cp "$BIN/$b" "$KEEP_BINARIES/$b"
		done
		log "binaries kept in $KEEP_BINARIES (reuse with BINARIES=$KEEP_BINARIES)"
	fi
}

# ---------------------------------------------------------------- targets

# start_backend CPU PORT: the demo backend, named "bench".
start_backend() {
	start backend "$1" "$BIN/sessionlb-demo-backend" --listen "127.0.0.1:$2" --name bench
	wait_http backend "$2"
}

# start_nginx CPU PORT BACKEND_PORT
start_nginx() {
	mkdir -p "$WORK/nginx-tmp"
	fill bench/nginx.conf.tmpl "$WORK/nginx.conf" WORK="$WORK" LISTEN="127.0.0.1:$2" BACKEND="127.0.0.1:$3"
	nginx -t -q -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx-error.log" || die "nginx rejects its configuration"
	start nginx "$1" nginx -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx-error.log"
	wait_http nginx "$2"
}

# start_haproxy CPU PORT BACKEND_PORT
start_haproxy() {
	fill bench/haproxy.cfg.tmpl "$WORK/haproxy.cfg" LISTEN="127.0.0.1:$2" BACKEND="127.0.0.1:$3"
	haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy rejects its configuration"
	start haproxy "$1" haproxy -db -f "$WORK/haproxy.cfg"
	wait_http haproxy "$2"
}

# start_bare CPU PORT BACKEND_PORT THREADS [EXTRA_FLAGS...]
start_bare() {
	local cpu=$1 port=$2 backend=$3 threads=$4
	shift 4
	start bare "$cpu" "$BIN/examples/bare_forwarder" --listen "127.0.0.1:$port" \
		--backend "127.0.0.1:$backend" --threads "$threads" "$@"
	wait_http bare "$port"
}

# start_sessionlb CPU PORT BACKEND_PORT THREADS: one node, SQLite registry,
# a generated 0600 key and a shared-storage folder in WORK.
start_sessionlb() {
	mkdir -p "$WORK/shared-storage" "$WORK/run"
	(
		umask 077
		head -c 32 /dev/urandom | base64 >"$WORK/secure-cookie-key"
	)
	fill bench/sessionlb.toml.tmpl "$WORK/sessionlb.toml" WORK="$WORK" PORT="$2" \
		BACKEND="127.0.0.1:$3" THREADS="$4"
	start sessionlb "$1" "$BIN/sessionlb" --config "$WORK/sessionlb.toml" serve
	wait_http sessionlb "$2"
}

# known_session PORT: make a browser known to sessionlb, set COOKIE to the
# cookie it gets (`name=value`: a pin; with sessionlb before issue 8, an
# affinity cookie and its session), and check that requests carrying it are
# routed as they are: 200 from the bench backend, "ok", no new Set-Cookie.
known_session() {
	local port=$1 headers i
	headers=$(curl -fsS -D - -o /dev/null "http://127.0.0.1:$port/bench" | tr -d '\r')
	COOKIE=$(awk -F': ' 'tolower($1) == "set-cookie" { split($2, c, ";"); print c[1] }' <<<"$headers")
	[[ $COOKIE == sessionlb-affinity=v[12].* ]] || die "sessionlb set no affinity cookie; headers:
$headers"
	log "known session: $COOKIE"
	for i in 1 2 3; do
		headers=$(curl -fsS -D - -o "$WORK/body" -H "Cookie: $COOKIE" "http://127.0.0.1:$port/bench" | tr -d '\r')
		grep -qi '^x-backend: bench$' <<<"$headers" || die "sessionlb did not reach the bench backend:
$headers"
		if grep -qi '^set-cookie:' <<<"$headers"; then
			die "sessionlb set a new cookie on a known session (request $i):
$headers"
		fi
		[[ $(cat "$WORK/body") == ok ]] || die "unexpected body through sessionlb: $(cat "$WORK/body")"
	done
	log "sessionlb routes the known session (x-backend: bench, no Set-Cookie)"
}
