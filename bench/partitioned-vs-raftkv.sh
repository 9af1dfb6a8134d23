#!/usr/bin/env bash
# partitioned-raft-kv vs raft-kv under a write-heavy load, whole clusters side by side: for each
# engine, a prkv playground (1 PD + 3 stores, every store with rocksdb.write-buffer-limit =
# 256MiB and Regions split at 64 MiB, so the load ends spread over 64+ Regions) takes
#   1. a 100%-insert load of --total-mib MiB of user data (YCSB "load", hashed keys), then
#   2. YCSB A (50% reads, 50% updates, zipfian) for --duration.
# Write amplification = bytes the three store processes caused to be written to disk during the
# load (write_bytes of /proc/PID/io: Raft log, WAL, flushes, compactions, snapshots) divided by
# the user bytes, all three replicas together (raft-engine compresses log batches, so this can
# be below 3). Compactions may still run after the load: the figure is taken again after
# --settle seconds of idleness.
# Prints one table with ratios; JSON results and logs stay in $OUT.
#
#   bench/partitioned-vs-raftkv.sh [--total-mib 4096] [--value-size 1024] [--threads 256]
#                                  [--duration 60s] [--settle 30] [--split-mib 64]
#                                  [--pre-split N] [--mode raw|raw-batch]
# (--split-mib 10240 keeps the load in one Region: no splits. --pre-split N cuts the key space
# into N Regions before the load, as users pre-split for a bulk load: Regions then split only
# past --split-mib. --mode raw-batch sends through BatchCommands streams, as TiKV's Go client
# does, instead of tikv-client 0.4's unary calls.) KEEP=1 keeps the clusters' data
# directories (logs included); ENGINES="raft-kv" runs one engine (no ratio table then).
set -euo pipefail

TOTAL_MIB=4096
VALUE_SIZE=1024
KEY_SIZE=16
THREADS=256
DURATION=60s
SETTLE=30
SPLIT_MIB=64
PRE_SPLIT=0
MODE=raw
while [ $# -gt 0 ]; do
  case "$1" in
    --total-mib) TOTAL_MIB="$2"; shift 2 ;;
    --value-size) VALUE_SIZE="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --settle) SETTLE="$2"; shift 2 ;;
    --split-mib) SPLIT_MIB="$2"; shift 2 ;;
    --pre-split) PRE_SPLIT="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
RECORDS=$(( TOTAL_MIB * 1048576 / (KEY_SIZE + VALUE_SIZE) ))

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

OUT="${OUT:-$(mktemp -d /tmp/prkv-engines.XXXXXX)}"
mkdir -p "$OUT"

# Both engines get the same settings; only storage.engine differs.
cat >"$OUT/store.toml" <<EOF
[storage]
# The load fills the disk far more than a test does: keep the write refusal out of the way.
reserve-space = "1GiB"
[rocksdb]
write-buffer-limit = "256MiB"
[raft-engine]
# Purge Raft-log files once they pass 1 GiB instead of 10 GiB: three stores on one disk.
purge-threshold = "1GiB"
[coprocessor]
region-split-size = "${SPLIT_MIB}MiB"
region-max-size = "$(( SPLIT_MIB * 3 / 2 ))MiB"
EOF

store_pids() { pgrep -f "store --config $OUT/$1/store-" | tr '\n' ' '; }
write_bytes() { # pids...
  local sum=0 b
  for p in "$@"; do
    b=$(awk '/^write_bytes/ {print $2}' "/proc/$p/io" 2>/dev/null || echo 0)
    sum=$(( sum + b ))
  done
  echo "$sum"
}

for ENGINE in ${ENGINES:-partitioned-raft-kv raft-kv}; do
  echo "== $ENGINE: $RECORDS records of $((KEY_SIZE + VALUE_SIZE)) B ($TOTAL_MIB MiB) =="
  start_playground "$ENGINE"
  if [ "$PRE_SPLIT" -gt 1 ]; then
    "$PRKV" bench regions --pd 127.0.0.1:2379 --layout ycsb --count "$PRE_SPLIT" --keys-per-region 0
  fi
  # shellcheck disable=SC2046
  set -- $(store_pids "$ENGINE")
  [ $# -eq 3 ] || { echo "expected 3 store processes, found $#" >&2; exit 1; }
  before=$(write_bytes "$@")
  "$PRKV" bench ycsb --target prkv://127.0.0.1:2379 --workload load --records "$RECORDS" --mode "$MODE" \
    --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" --threads "$THREADS" \
    --json "$OUT/$ENGINE-load.json" | tee "$OUT/$ENGINE-load.txt"
  after_load=$(write_bytes "$@")
  sleep "$SETTLE"
  settled=$(write_bytes "$@")
  # Where the bytes came from, by the stores' own counters (since they started, so the load
  # and the settling): RocksDB flushes, compactions and WAL, and the Raft log.
  breakdown=$(curl -s http://127.0.0.1:2379/pd/api/v1/stores | python3 -c '
import json, sys, urllib.request
tot = {}
for s in json.load(sys.stdin)["stores"]:
    text = urllib.request.urlopen("http://%s/metrics" % s["store"]["status_address"]).read().decode()
    for line in text.splitlines():
        if line.startswith("prkv_engine_bytes{"):
            kind = line.split("kind=\"")[1].split("\"")[0]
            tot[kind] = tot.get(kind, 0) + int(float(line.split()[-1]))
        elif line.startswith("raft_engine_write_size_sum"):
            tot["raft_log"] = tot.get("raft_log", 0) + int(float(line.split()[-1]))
        elif line.startswith("prkv_tablet_flushes_total{"):
            kind = "flushes_" + line.split("reason=\"")[1].split("\"")[0]
            tot[kind] = tot.get(kind, 0) + int(float(line.split()[-1]))
        elif line.startswith("prkv_engine_write_stall_micros"):
            tot["write_stall_micros"] = tot.get("write_stall_micros", 0) + int(float(line.split()[-1]))
        elif line.startswith("prkv_engine_memory_flushes_total"):
            tot["flushes_memory"] = tot.get("flushes_memory", 0) + int(float(line.split()[-1]))
print(json.dumps(tot))')
  "$PRKV" bench ycsb --target prkv://127.0.0.1:2379 --workload a --records "$RECORDS" --mode "$MODE" \
    --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" --threads "$THREADS" --duration "$DURATION" \
    --json "$OUT/$ENGINE-a.json" | tee "$OUT/$ENGINE-a.txt"
  regions=$(curl -s http://127.0.0.1:2379/pd/api/v1/regions | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
  disk=$(du -sb "$OUT/$ENGINE" | cut -f1)
  cat >"$OUT/$ENGINE-io.json" <<EOF
{"load_write_bytes": $((after_load - before)), "settled_write_bytes": $((settled - before)),
 "breakdown": $breakdown,
 "user_bytes": $((RECORDS * (KEY_SIZE + VALUE_SIZE))), "regions": $regions, "disk_bytes": $disk}
EOF
  kill "$PLAYGROUND"; wait "$PLAYGROUND" 2>/dev/null || true; PLAYGROUND=""
  [ -n "${KEEP:-}" ] || rm -rf "${OUT:?}/$ENGINE"
done

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for e in ["partitioned-raft-kv", "raft-kv"]:
    try:
        open(f"{out}/{e}-io.json").close()
    except FileNotFoundError:
        continue  # ENGINES ran only the other one
    load = json.load(open(f"{out}/{e}-load.json"))
    a = json.load(open(f"{out}/{e}-a.json"))
    io = json.load(open(f"{out}/{e}-io.json"))
    rows[e] = dict(
        load_ops=load["ops_per_sec"],
        load_mib=load["ops_per_sec"] * io["user_bytes"] / max(load["ops"], 1) / 2**20,
        wa_load=io["load_write_bytes"] / io["user_bytes"],
        wa_settled=io["settled_write_bytes"] / io["user_bytes"],
        a_ops=a["ops_per_sec"],
        a_p99=max(s["p99_us"] for s in a["per_op"]) / 1000,
        regions=io["regions"],
        disk=io["disk_bytes"] / 2**30,
        errors=f'{load["errors"]}/{a["errors"]}',
    )
print("| engine | insert ops/s | insert MiB/s | write amp. (load) | write amp. (settled) | YCSB A ops/s | A p99 ms | Regions | disk GiB | errors (load/A) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for e, r in rows.items():
    print(f'| {e} | {r["load_ops"]:.0f} | {r["load_mib"]:.1f} | {r["wa_load"]:.2f} | {r["wa_settled"]:.2f} | {r["a_ops"]:.0f} | {r["a_p99"]:.1f} | {r["regions"]} | {r["disk"]:.2f} | {r["errors"]} |')
print("\nBytes per user byte, by source (the stores' counters, all replicas; raft log = raft-engine's batches after its compression):")
print("| engine | flush | compaction write | compaction read | RocksDB WAL | raft log | disk written (settled) |")
print("|---|---|---|---|---|---|---|")
for e in rows:
    io = json.load(open(f"{out}/{e}-io.json"))
    b, u = io.get("breakdown", {}), io["user_bytes"]
    f = lambda k: b.get(k, 0) / u
    print(f'| {e} | {f("flush_write"):.2f} | {f("compaction_write"):.2f} | {f("compaction_read"):.2f} | {f("wal_write"):.2f} | {f("raft_log"):.2f} | {rows[e]["wa_settled"]:.2f} |')
print("\nTablet flushes prkv asked for, by reason (RocksDB's own, of full memtables, not counted):")
for e in rows:
    b = json.load(open(f"{out}/{e}-io.json")).get("breakdown", {})
    print(f'  {e}: ' + ", ".join(f'{k[len("flushes_"):]} {v}' for k, v in sorted(b.items()) if k.startswith("flushes_")))
print("\nSeconds RocksDB writes waited in write stalls during the load and settling (all stores; each holds up a store loop):")
for e in rows:
    b = json.load(open(f"{out}/{e}-io.json")).get("breakdown", {})
    print(f'  {e}: {b.get("write_stall_micros", 0) / 1e6:.1f} s')
if len(rows) < 2:
    sys.exit(0)
p, k = rows["partitioned-raft-kv"], rows["raft-kv"]
print(f'\npartitioned / raft-kv: inserts {p["load_ops"]/k["load_ops"]:.2f}x, '
      f'write amp. {p["wa_settled"]/k["wa_settled"]:.2f}x (settled), YCSB A {p["a_ops"]/k["a_ops"]:.2f}x')
PY
echo "results in $OUT"
