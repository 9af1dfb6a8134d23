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

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

OUT="${OUT:-$(mktemp -d /tmp/prkv-restart.XXXXXX)}"
mkdir -p "$OUT"

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

echo "| engine | Regions on the store | RSS | open fds | idle CPU (% of one core) |" >"$OUT/idle.md"
echo "|---|---|---|---|---|" >>"$OUT/idle.md"
echo "| engine | Regions on the store | memtable bytes at the kill | to serving (status answers) | to every Region reported |" >"$OUT/table.md"
echo "|---|---|---|---|---|" >>"$OUT/table.md"
for ENGINE in $ENGINES; do
  echo "== $ENGINE: $REGIONS Regions =="
  start_playground "$ENGINE"
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
  idle_cost "$pid" 10
  echo "| $ENGINE | $before | $RSS_MIB MiB | $FDS | $IDLE_CPU % |" >>"$OUT/idle.md"
  memtables=$(curl -s http://127.0.0.1:20180/metrics | awk '/^prkv_engine_memtable_bytes/ {print $2}')
  restart_store1 "$ENGINE" "$pid" "$before"
  echo "  store 1: $before Regions, $memtables memtable bytes; serving after ${SERVING} ms, all Regions after ${ALL} ms"
  echo "| $ENGINE | $before | $memtables | ${SERVING} ms | ${ALL} ms |" >>"$OUT/table.md"
  stop_all
  rm -rf "${OUT:?}/$ENGINE"
done
cat "$OUT/idle.md"
echo
cat "$OUT/table.md"
echo "results in $OUT"
