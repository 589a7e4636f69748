#!/usr/bin/env bash
# The soak of issue 15: starts the release meterd with loadtest/soak.toml on a
# fresh data dir, drives `meterd-loadtest soak` against it for DURATION seconds
# (default 1200), then plots the CSV. Output in OUT (default loadtest/soak-out).
#   cargo build --release -p meterd -p meterd-loadtest --bins
#   loadtest/soak.sh [DURATION] [extra soak flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-1200}
shift || true
out=${OUT:-loadtest/soak-out}
mkdir -p "$out"
data=$(mktemp -d)
sed "s#^data_dir = .*#data_dir = \"$data\"#" loadtest/soak.toml > "$out/soak.toml"
target/release/meterd --config "$out/soak.toml" > "$out/meterd.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  curl -fs http://127.0.0.1:8490/healthz > /dev/null 2>&1 && break
  sleep 0.2
done
target/release/meterd-loadtest soak --addr 127.0.0.1:8490 --server-pid "$pid" \
  --duration "$duration" --csv "$out/soak.csv" --dedupe-window 120 "$@" | tee "$out/soak.txt"
du -sh "$data" | tee -a "$out/soak.txt"
py=python3; [ -x /usr/bin/python3 ] && py=/usr/bin/python3
"$py" loadtest/plot_soak.py "$out/soak.csv" "$out/soak.png"
