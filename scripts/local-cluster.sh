#!/usr/bin/env bash
# A 3-node sessionlb cluster on one machine, for trying it out:
# nodes on 127.0.0.2-4:8787, each in front of its own demo backend
# (127.0.0.1:8791-8793, named A, B, C), sharing a SQLite registry (or
# $DATABASE, e.g. postgres://postgres@127.0.0.1:5432/postgres), a key and a
# shared-storage folder under ./sessionlb-local-cluster/. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
state="$PWD/sessionlb-local-cluster"
mkdir -p "$state/shared"
key="$state/secure-cookie-key"
[ -f "$key" ] || { (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$key"; echo >> "$key"); }
database="${DATABASE:-sqlite://$state/registry.db}"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
names=(A B C)
for i in 0 1 2; do
  ip="127.0.0.$((i + 2))"; port=$((8791 + i)); name=${names[$i]}
  target/release/sessionlb-demo-backend --listen "127.0.0.1:$port" --name "$name" 2>"$state/backend-$name.log" &
  pids+=($!)
  cat > "$state/node-$name.toml" <<TOML
www-address = "$ip"
www-port = 8787
backend = "127.0.0.1:$port"
database = "$database"
secure-cookie-key-file = "$key"
server-shared-storage-path = "$state/shared"
run-dir = "$state"
metrics-address = "$ip:9787"
grace-period = 0
drain-timeout = 0
TOML
  target/release/sessionlb --config "$state/node-$name.toml" serve 2>"$state/node-$name.log" &
  pids+=($!)
done
sleep 2
target/release/sessionlb --config "$state/node-A.toml" list-nodes
cat <<TXT

Try:  curl -si http://127.0.0.2:8787/            (note the pin cookie sessionlb-affinity and x-backend: no session is created)
      curl -s  http://127.0.0.3:8787/load-balancer/status   (or open it in a browser)
      curl -s  http://127.0.0.2:9787/metrics
      target/release/sessionlb --config $state/node-B.toml offline
Logs: $state/*.log — Ctrl-C stops the cluster.
TXT
wait
