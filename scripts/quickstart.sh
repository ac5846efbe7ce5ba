#!/usr/bin/env bash
# The README's first command: one sessionlb node on the embedded defaults in
# front of the bundled demo backend, on a fresh Debian machine with Rust.
#
# - installs what the build lacks (cmake, a C compiler), as scripts/test.sh does;
# - builds the release binaries (or uses those in $SESSIONLB_BIN_DIR);
# - starts the demo backend on 127.0.0.1:8788 and `sessionlb serve --quick-start`
#   on 127.0.0.1:8787 (SQLite registry, generated key and shared storage under
#   ./sessionlb-quickstart/, or --state-dir DIR); metrics on 127.0.0.1:9787.
# Ctrl-C (or SIGTERM) stops both. Extra arguments go to `sessionlb serve`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/prerequisites.sh

bin=${SESSIONLB_BIN_DIR:-}
if [ -z "$bin" ]; then
  install_prerequisites
  cargo build --release --bins
  bin=target/release
fi

"$bin/sessionlb-demo-backend" --listen 127.0.0.1:8788 --name demo &
backend=$!
node=""
stop() {
  trap - INT TERM
  if [ -n "$node" ]; then kill -TERM "$node" 2>/dev/null || true; wait "$node" 2>/dev/null || true; fi
  kill -TERM "$backend" 2>/dev/null || true
  wait "$backend" 2>/dev/null || true
  exit 0
}
trap stop INT TERM
trap 'kill "$backend" 2>/dev/null || true' EXIT

"$bin/sessionlb" serve --quick-start "$@" &
node=$!
log "open http://127.0.0.1:8787/ (the demo backend answers through sessionlb); Ctrl-C stops"
wait "$node"
