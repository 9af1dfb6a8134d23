#!/usr/bin/env bash
# A store holding many idle Regions: its RSS, open descriptors and idle CPU, and its restart
# time, for each engine.
#
# A playground (1 PD + 3 stores; every store holds a replica of every Region) is cut into
# --regions Regions by `prkv bench regions` (batch splits through the gRPC API), and
# --keys-per-region keys go into each. After --idle-wait seconds without load (the Regions
# hibernate; partitioned tablets idle for rocksdb.tablet-idle-timeout park), store 1's RSS,
# descriptors and CPU over 20 s are measured. Store 1 is then SIGKILLed and started again;
# measured from the spawn until its status port answers (engines open, every replica recovered
# and checked, gRPC serving) and until it reports every Region again.
# Prints two tables; logs stay in $OUT.
#
#   bench/idle-regions.sh [--regions 20000] [--keys-per-region 10] [--idle-wait 60]
#                         [--idle-timeout 30s] [--engines "partitioned-raft-kv raft-kv"]
set -euo pipefail

REGIONS=20000
KEYS=10
IDLE_WAIT=60
IDLE_TIMEOUT=30s
ENGINES="partitioned-raft-kv raft-kv"
while [ $# -gt 0 ]; do
  case "$1" in
    --regions) REGIONS="$2"; shift 2 ;;
    --keys-per-region) KEYS="$2"; shift 2 ;;
    --idle-wait) IDLE_WAIT="$2"; shift 2 ;;
    --idle-timeout) IDLE_TIMEOUT="$2"; shift 2 ;;
    --engines) ENGINES="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

OUT="${OUT:-$(mktemp -d /tmp/prkv-idle.XXXXXX)}"
mkdir -p "$OUT"

# No size-based splits (the Regions stay as cut); the default cap of open tablets
# (rocksdb.max-open-tablets = 1000) and a short idle timeout, so the wait below sees them park.
cat >"$OUT/store.toml" <<EOF
[storage]
reserve-space = "1GiB"
[rocksdb]
tablet-idle-timeout = "$IDLE_TIMEOUT"
EOF

metric() { # status address, metric name
  curl -sf "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}'
}

echo "| engine | Regions on the store | tablets open / parked | hibernated | RSS | open fds | idle CPU (% of one core) |" >"$OUT/idle.md"
echo "|---|---|---|---|---|---|---|" >>"$OUT/idle.md"
echo "| engine | Regions on the store | to serving (status answers) | to every Region reported |" >"$OUT/table.md"
echo "|---|---|---|---|" >>"$OUT/table.md"
for ENGINE in $ENGINES; do
  echo "== $ENGINE: $REGIONS Regions =="
  start_playground "$ENGINE"
  "$PRKV" bench regions --pd 127.0.0.1:2379 --count "$REGIONS" --keys-per-region "$KEYS" \
    | tee "$OUT/$ENGINE-regions.txt"
  # Every replica must exist on store 1 before it is measured.
  for _ in $(seq 1 600); do
    n=$(status_regions 127.0.0.1:20180)
    [ "$n" -ge "$REGIONS" ] && break
    sleep 1
  done
  before=$(status_regions 127.0.0.1:20180)
  pid=$(pgrep -f "store --config $OUT/$ENGINE/store-1.toml")
  # PD balances leaders after the splits, waking Regions; wait until 99% of them sleep.
  t_quiet=$(now_ms)
  for _ in $(seq 1 900); do
    hib=$(metric 127.0.0.1:20180 prkv_hibernated_regions)
    [ "${hib:-0}" -ge $(( before * 99 / 100 )) ] && break
    sleep 1
  done
  echo "  store 1 holds $before Regions, $hib hibernated after $(( ($(now_ms) - t_quiet) / 1000 )) s; idle for $IDLE_WAIT s more"
  sleep "$IDLE_WAIT"
  idle_cost "$pid" 20
  open=$(metric 127.0.0.1:20180 prkv_engine_tablets_open)
  parked=$(metric 127.0.0.1:20180 prkv_engine_tablets_parked)
  hib=$(metric 127.0.0.1:20180 prkv_hibernated_regions)
  echo "| $ENGINE | $before | $open / $parked | $hib | $RSS_MIB MiB | $FDS | $IDLE_CPU % |" | tee -a "$OUT/idle.md"
  restart_store1 "$ENGINE" "$pid" "$before"
  echo "  store 1: serving after ${SERVING} ms, all $before Regions after ${ALL} ms"
  echo "| $ENGINE | $before | ${SERVING} ms | ${ALL} ms |" >>"$OUT/table.md"
  stop_all
  [ -n "${KEEP:-}" ] || rm -rf "${OUT:?}/$ENGINE"
done
cat "$OUT/idle.md"
echo
cat "$OUT/table.md"
echo "results in $OUT"
