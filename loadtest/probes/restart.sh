#!/bin/bash
# How long meterd takes to answer /healthz after a SIGKILL under batched ingest,
# the restart that loads the dedupe ids back (issue 24's twelfth pass).
#
#   loadtest/probes/restart.sh MAKE_BIN SECONDS RATE BIN...
#
# MAKE_BIN (a meterd binary) ingests batches of 1000 fresh events at RATE
# batches/s for SECONDS (durability "fsync", dedupe_memory DEDUPE_MEMORY, 32MB by
# default, so ids spill to runs), is SIGKILLed, and its data directory is kept.
# Then each BIN starts on a fresh copy of it, ROUNDS times (2), interleaved: one
# line per start with the seconds to /healthz, the RSS, and meterd's own
# "replayed the WAL" figures. Needs target/release/meterd-loadtest and curl.
set -euo pipefail
MAKE_BIN=$1 SECONDS_=$2 RATE=$3; shift 3
ROUNDS=${ROUNDS:-2} MEM=${DEDUPE_MEMORY:-32MB}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LT=$ROOT/target/release/meterd-loadtest
T=$(mktemp -d /tmp/meterd-restart.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$T"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
config() {
  sed -e "s|^data_dir = .*|data_dir = \"$1\"|" -e 's|^durability = .*|durability = "fsync"|' \
      -e "s|^dedupe_window = .*|dedupe_window = \"1h\"\ndedupe_memory = \"$MEM\"|" "$ROOT/loadtest/meterd-bench.toml"
}
wait_healthy() { until curl -fs -o /dev/null "http://127.0.0.1:$1/healthz"; do sleep 0.05; done; }

P=$(port); config "$T/made" > "$T/make.toml"
METERD_LISTEN=127.0.0.1:$P RUST_LOG=warn "$MAKE_BIN" --config "$T/make.toml" > "$T/make.log" 2>&1 &
PID=$!; wait_healthy "$P"
"$LT" ingest-batch --addr "127.0.0.1:$P" --connections 8 --rate "$RATE" --duration "$SECONDS_" --warmup 0 --quiet | tail -1
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
echo "made: $(du -sh "$T/made/wal/ids" | cut -f1) of id files, $(ls "$T/made/wal/dedupe" | grep -c '\.run$') runs"

for r in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    rm -rf "$T/data"; cp -a "$T/made" "$T/data"; config "$T/data" > "$T/m.toml"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    P=$(port); s=$(date +%s.%N)
    METERD_LISTEN=127.0.0.1:$P RUST_LOG=info "$bin" --config "$T/m.toml" > "$T/run.log" 2>&1 &
    PID=$!; wait_healthy "$P"; e=$(date +%s.%N)
    printf '%s round %s: /healthz after %.2f s, rss %s kB; %s\n' "$bin" "$r" "$(echo "$e - $s" | bc)" \
      "$(ps -o rss= -p "$PID" | tr -d ' ')" "$(grep -o 'records=.*' "$T/run.log" | head -1)"
    kill "$PID"; wait "$PID" 2>/dev/null || true
  done
done
