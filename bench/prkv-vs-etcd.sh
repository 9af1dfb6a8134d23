#!/usr/bin/env bash
# Side by side on this machine: a prkv playground (1 PD + 3 stores) and a 3-member etcd 3.4
# (Debian's etcd-server), both on loopback, driven by the same generator (`prkv bench ycsb`):
#   1. raw puts (YCSB "insert": 100% new keys), 16 B keys, 256 B values
#   2. linearizable point reads (YCSB "c" over the loaded keys)
# prkv runs each twice: through tikv-client 0.4 (one unary call per request), and through
# BatchCommands streams (`--mode raw-batch`, as TiKV's Go client sends).
# Prints one table with ratios; the JSON results stay in $OUT.
#
#   bench/prkv-vs-etcd.sh [--threads 256] [--duration 30s] [--records 100000]
set -euo pipefail

THREADS=256
DURATION=30s
RECORDS=100000
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --records) RECORDS="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/prkv-target}"
cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin prkv >/dev/null
PRKV="$CARGO_TARGET_DIR/release/prkv"
command -v etcd >/dev/null || { echo "etcd not found: apt-get install -y etcd-server" >&2; exit 1; }

OUT="${OUT:-$(mktemp -d /tmp/prkv-vs-etcd.XXXXXX)}"
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# --- etcd: 3 members on 127.0.0.1:23791-23793 (peers 23801-23803) ---
CLUSTER="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$OUT/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --logger zap --log-level error \
    >"$OUT/etcd-$i.log" 2>&1 &
  PIDS+=($!)
done
ETCD="etcd://127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"

# --- prkv: the playground on its default ports ---
"$PRKV" playground --data-dir "$OUT/prkv" >"$OUT/prkv.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do grep -q '^ready' "$OUT/prkv.log" && break; sleep 1; done
grep -q '^ready' "$OUT/prkv.log" || { echo "prkv playground did not start; see $OUT/prkv.log" >&2; exit 1; }
PRKV_T="prkv://127.0.0.1:2379"
sleep 3 # etcd elects its leader meanwhile

run() { # name target workload [mode]
  "$PRKV" bench ycsb --target "$2" --workload "$3" --mode "${4:-raw}" --threads "$THREADS" \
    --duration "$DURATION" --records "$RECORDS" --json "$OUT/$1.json" >"$OUT/$1.txt"
  cat "$OUT/$1.txt"
}
run etcd-insert "$ETCD" insert
run prkv-insert "$PRKV_T" insert
run prkv-insert-batch "$PRKV_T" insert raw-batch
"$PRKV" bench ycsb --target "$ETCD" --workload load --threads "$THREADS" --records "$RECORDS" >/dev/null
"$PRKV" bench ycsb --target "$PRKV_T" --workload load --threads "$THREADS" --records "$RECORDS" >/dev/null
run etcd-read "$ETCD" c
run prkv-read "$PRKV_T" c
run prkv-read-batch "$PRKV_T" c raw-batch

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(n):
    r = json.load(open(f"{out}/{n}.json"))
    p99 = max(s["p99_us"] for s in r["per_op"])
    return r["ops_per_sec"], p99, r["errors"]
print("| test | etcd ops/s | prkv ops/s | prkv/etcd | etcd p99 ms | prkv p99 ms | errors (etcd/prkv) |")
print("|---|---|---|---|---|---|---|")
for name, what in [("insert", "raw put, 256 B"), ("insert-batch", "raw put, 256 B, BatchCommands"),
                   ("read", "linearizable get"), ("read-batch", "linearizable get, BatchCommands")]:
    e, p = load(f"etcd-{name.split('-')[0]}"), load(f"prkv-{name}")
    print(f"| {what} | {e[0]:.0f} | {p[0]:.0f} | {p[0]/e[0]:.2f}x | {e[1]/1000:.1f} | {p[1]/1000:.1f} | {e[2]}/{p[2]} |")
PY
echo "results in $OUT"
