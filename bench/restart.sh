#!/usr/bin/env bash
# Restart time of a store holding many Regions with unflushed data, for each engine.
#
# A playground (1 PD + 3 stores, so every store holds a replica of every Region) splits into
# --regions Regions (small split thresholds while loading), then takes YCSB A updates for
# --write-for so that most tablets hold unflushed writes (memtables; tablets have no WAL, so a
# restart replays them from the Raft log). Store 1 is SIGKILLed and started again; measured
# from the spawn: until its status port answers (engines open, every replica recovered, gRPC
# serving) and until it reports every Region again (the count refreshes once per Raft tick, so
# this one is up to a tick late). Before the kill, after --idle-wait seconds without load (the
# Regions hibernate), store 1's idle cost: RSS, open descriptors, CPU over 10 s.
# Prints two tables; logs stay in $OUT.
#
#   bench/restart.sh [--regions 1000] [--write-for 20s] [--idle-wait 20]
#                    [--engines "partitioned-raft-kv raft-kv"]
set -euo pipefail

REGIONS=1000
WRITE_FOR=20s
IDLE_WAIT=20
ENGINES="partitioned-raft-kv raft-kv"
while [ $# -gt 0 ]; do
  case "$1" in
    --regions) REGIONS="$2"; shift 2 ;;
    --write-for) WRITE_FOR="$2"; shift 2 ;;
    --idle-wait) IDLE_WAIT="$2"; shift 2 ;;
    --engines) ENGINES="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
KEYS_PER_REGION=1000
RECORDS=$(( REGIONS * KEYS_PER_REGION ))

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/prkv-target}"
cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin prkv >/dev/null
PRKV="$CARGO_TARGET_DIR/release/prkv"

OUT="${OUT:-$(mktemp -d /tmp/prkv-restart.XXXXXX)}"
mkdir -p "$OUT"
PLAYGROUND=""
STORE=""
cleanup() {
  [ -n "$STORE" ] && kill "$STORE" 2>/dev/null || true
  if [ -n "$PLAYGROUND" ]; then kill "$PLAYGROUND" 2>/dev/null || true; wait "$PLAYGROUND" 2>/dev/null || true; fi
}
trap cleanup EXIT

# Split at KEYS_PER_REGION keys (checked every second) so that loading RECORDS keys makes about
# REGIONS Regions; the memtable budget is large enough that nothing must flush for memory.
cat >"$OUT/store.toml" <<EOF
[storage]
reserve-space = "1GiB"
[rocksdb]
write-buffer-limit = "1GiB"
[raftstore]
split-region-check-tick-interval = "1s"
[coprocessor]
region-split-keys = $KEYS_PER_REGION
region-max-keys = $(( KEYS_PER_REGION * 3 / 2 ))
region-split-size = "8MiB"
region-max-size = "12MiB"
EOF

region_count() {
  curl -s http://127.0.0.1:2379/pd/api/v1/regions | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'
}
status_regions() { # status address
  curl -sf "http://$1/status" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["regions"])' 2>/dev/null || echo -1
}
now_ms() { date +%s%3N; }

echo "| engine | Regions on the store | RSS | open fds | idle CPU (% of one core) |" >"$OUT/idle.md"
echo "|---|---|---|---|---|" >>"$OUT/idle.md"
echo "| engine | Regions on the store | memtable bytes at the kill | to serving (status answers) | to every Region reported |" >"$OUT/table.md"
echo "|---|---|---|---|---|" >>"$OUT/table.md"
for ENGINE in $ENGINES; do
  echo "== $ENGINE: $REGIONS Regions =="
  rm -rf "${OUT:?}/$ENGINE"
  "$PRKV" playground --engine "$ENGINE" --store-config "$OUT/store.toml" --data-dir "$OUT/$ENGINE" \
    >"$OUT/$ENGINE.log" 2>&1 &
  PLAYGROUND=$!
  for _ in $(seq 1 120); do grep -q '^ready' "$OUT/$ENGINE.log" && break; sleep 1; done
  grep -q '^ready' "$OUT/$ENGINE.log" || { echo "playground did not start; see $OUT/$ENGINE.log" >&2; exit 1; }
  "$PRKV" bench ycsb --target prkv://127.0.0.1:2379 --workload load --records "$RECORDS" \
    --value-size 100 --threads 128 >"$OUT/$ENGINE-load.txt"
  # Splits trail the load: wait until the Region count stops growing.
  last=0; same=0
  for _ in $(seq 1 300); do
    n=$(region_count); echo "  $n Regions"
    if [ "$n" -eq "$last" ]; then same=$((same + 1)); else same=0; fi
    last=$n
    [ "$same" -ge 5 ] && [ "$n" -ge "$REGIONS" ] && break
    [ "$same" -ge 20 ] && break
    sleep 2
  done
  "$PRKV" bench ycsb --target prkv://127.0.0.1:2379 --workload a --distribution uniform \
    --records "$RECORDS" --value-size 100 --threads 128 --duration "$WRITE_FOR" >"$OUT/$ENGINE-write.txt"
  before=$(status_regions 127.0.0.1:20180)
  pid=$(pgrep -f "store --config $OUT/$ENGINE/store-1.toml")
  # Idle cost of store 1 once its Regions hibernate: RSS, open descriptors, CPU over 10 s.
  sleep "$IDLE_WAIT"
  ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
  t1=$(ticks); sleep 10; t2=$(ticks)
  hz=$(getconf CLK_TCK)
  idle_cpu=$(python3 -c "print(f'{100 * ($t2 - $t1) / $hz / 10:.1f}')")
  rss_mib=$(awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status")
  fds=$(ls "/proc/$pid/fd" | wc -l)
  echo "| $ENGINE | $before | $rss_mib MiB | $fds | $idle_cpu % |" >>"$OUT/idle.md"
  memtables=$(curl -s http://127.0.0.1:20180/metrics | awk '/^prkv_engine_memtable_bytes/ {print $2}')
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  t0=$(now_ms)
  "$PRKV" store --config "$OUT/$ENGINE/store-1.toml" >"$OUT/$ENGINE-restart.log" 2>&1 &
  STORE=$!
  serving=""; all=""
  for _ in $(seq 1 6000); do
    n=$(status_regions 127.0.0.1:20180)
    if [ "$n" -ge 0 ] && [ -z "$serving" ]; then serving=$(( $(now_ms) - t0 )); fi
    if [ "$n" -ge "$before" ]; then all=$(( $(now_ms) - t0 )); break; fi
    sleep 0.05
  done
  echo "  store 1: $before Regions, $memtables memtable bytes; serving after ${serving} ms, all Regions after ${all} ms"
  echo "| $ENGINE | $before | $memtables | ${serving} ms | ${all} ms |" >>"$OUT/table.md"
  kill "$STORE"; wait "$STORE" 2>/dev/null || true; STORE=""
  kill "$PLAYGROUND"; wait "$PLAYGROUND" 2>/dev/null || true; PLAYGROUND=""
  rm -rf "${OUT:?}/$ENGINE"
done
cat "$OUT/idle.md"
echo
cat "$OUT/table.md"
echo "results in $OUT"
