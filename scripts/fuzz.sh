#!/usr/bin/env bash
# Run every cargo-fuzz target from its checked-in corpus (fuzz/corpus/<target>)
# and print one line per target: executions, seconds, executions per second.
#   scripts/fuzz.sh                 # CI smoke: 10 s per target (dev profile)
#   scripts/fuzz.sh --runs 1000000  # the recorded long run (RELIABILITY.md)
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); without
# them it says so and exits 0: the stable test integration/fuzz_corpus.rs
# replays the same corpus through the same targets on every `scripts/test.sh`.
# New inputs found go to a scratch corpus, not into fuzz/corpus (minimise and
# add them by hand: `cargo fuzz cmin`); crashes are left in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The smoke run builds the targets with the dev profile (no optimisation,
# to keep CI short: a cold build took 655 s of CPU here, 5–6 min on two idle
# cores); the long run builds them optimised.
limit=(-max_total_time=10)
profile=(--dev)
if [ "${1:-}" = --runs ]; then limit=(-runs="${2:?--runs N}"); profile=(); fi
if ! cargo +nightly --version >/dev/null 2>&1 || ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "[fuzz.sh] nightly Rust or cargo-fuzz missing: skipping the fuzz run (the corpus is replayed by scripts/test.sh)" >&2
  exit 0
fi
# No sanitizer: the library forbids unsafe code; the targets look for panics,
# overflows (debug assertions are on) and broken invariants.
cargo +nightly fuzz build -s none "${profile[@]}" >&2
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for target in $(cargo +nightly fuzz list); do
  mkdir -p "$scratch/$target"
  start=$(date +%s.%N)
  log="$scratch/$target.log"
  if cargo +nightly fuzz run -s none "${profile[@]}" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
      "${limit[@]}" -print_final_stats=1 >"$log" 2>&1; then result=ok; else result=FAILED; status=1; fi
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(echo "scale=0; ${runs:-0} / $secs" | bc)
  printf '%-16s %s: %s executions in %.0f s (%s/s)\n' "$target" "$result" "${runs:-?}" "$secs" "$rate"
  [ "$result" = ok ] || tail -n 40 "$log" >&2
done
exit "$status"
