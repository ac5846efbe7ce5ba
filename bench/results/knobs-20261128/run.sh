#!/usr/bin/env bash
# Knob experiments: each a separate e2e.sh run (3 rounds).
set -u
cd /work/wt-bench
export BINARIES=/tmp/sessionlb-bench-bin ROUNDS=3 QUIET_TIMEOUT=600
run() { local name=$1; shift; echo "=== $name: $*"; env "$@" OUT=/tmp/knobs/$name bench/e2e.sh > /tmp/knobs/$name.log 2>&1; echo "rc=$?"; sed -n '/^| target/,/^Runs flagged/p' /tmp/knobs/$name/summary.md; }
run c16 CONNECTIONS=16
run c256 CONNECTIONS=256
run threads1 TARGETS="bare sessionlb" PROXY_THREADS=1
run threads2 TARGETS="bare sessionlb" PROXY_THREADS=2
run pool16 TARGETS="bare" BARE_ARGS="--keepalive-pool 16"
run pool128 TARGETS="bare" BARE_ARGS="--keepalive-pool 128"
run pool1024 TARGETS="bare" BARE_ARGS="--keepalive-pool 1024"
run nosteal TARGETS="bare" BARE_ARGS="--no-work-stealing"
