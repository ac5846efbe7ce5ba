#!/usr/bin/env bash
# The recorded fault run (issue 11): every case of integration/faults.rs at
# full length (SESSIONLB_FAULTS_FULL=1: 20 s SIGSTOP, 30 s PostgreSQL outage,
# 10,000 lock rounds per lock type, …), one after another, each printing one
# table row. Writes the rows to bench/results/faults-<date>.md (or $1) and
# prints them; paste them into RELIABILITY.md with this command line.
# Needs root (tmpfs mounts) and libfaketime (`apt-get install faketime`).
# Uses scripts/test.sh's PostgreSQL choice (local server or a throwaway one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-bench/results/faults-$(date -u +%Y%m%dT%H%M%SZ).md}
mkdir -p "$(dirname "$out")"
SESSIONLB_TEST_SH_FUNCTIONS_ONLY=1 source scripts/test.sh
install_prerequisites
choose_pg
command -v faketime >/dev/null || { as_root apt-get update -qq; DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq faketime >/dev/null; }
table=$(mktemp)
export SESSIONLB_FAULTS_FULL=1 SESSIONLB_FAULT_TABLE="$table"
{
  echo "| case | requests (HTTP + WebSocket echoes) | failed: healthy sessions via healthy nodes (HTTP + WebSocket) | failed: involving the faulty node | sessions lost (surviving nodes / faulty node) | users of the faulty node rerouted within | every session served again after the heal | left behind |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$out"
status=0
# One case at a time (-j 1): they share the machine's two cores.
cargo nextest run --test integration -E 'test(/^faults::/)' --run-ignored all --no-fail-fast -j 1 --no-capture \
  > "${out%.md}.log" 2>&1 || status=$?
cat "$table" >> "$out"
rm -f "$table"
echo >> "$out"
echo "Command: \`scripts/faults.sh\` ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; exit status of the cases: $status; log: ${out%.md}.log)" >> "$out"
cat "$out"
exit "$status"
