# Shared by the bench scripts (source it): builds prkv, watches a playground and its stores.
# Sets ROOT and PRKV; the caller sets OUT before using the playground helpers.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/prkv-target}"
cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin prkv >/dev/null
PRKV="$CARGO_TARGET_DIR/release/prkv"

PLAYGROUND=""
STORE=""
cleanup() {
  [ -n "$STORE" ] && kill "$STORE" 2>/dev/null || true
  if [ -n "$PLAYGROUND" ]; then kill "$PLAYGROUND" 2>/dev/null || true; wait "$PLAYGROUND" 2>/dev/null || true; fi
}
trap cleanup EXIT

now_ms() { date +%s%3N; }

# The Region count a store's status page reports, or -1 while it does not answer.
status_regions() { # status address
  curl -sf "http://$1/status" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["regions"])' 2>/dev/null || echo -1
}

# Starts a playground of ENGINE with $OUT/store.toml in $OUT/ENGINE (PLAYGROUND holds its pid)
# and waits for its `ready` line.
start_playground() { # engine
  rm -rf "${OUT:?}/$1"
  "$PRKV" playground --engine "$1" --store-config "$OUT/store.toml" --data-dir "$OUT/$1" \
    >"$OUT/$1.log" 2>&1 &
  PLAYGROUND=$!
  for _ in $(seq 1 120); do grep -q '^ready' "$OUT/$1.log" && break; sleep 1; done
  grep -q '^ready' "$OUT/$1.log" || { echo "playground did not start; see $OUT/$1.log" >&2; exit 1; }
}

# SIGKILLs store 1 of ENGINE's playground (pid PID) and starts it again (STORE holds the new
# pid). Sets SERVING and ALL: ms from the spawn until its status port answers, and until it
# reports BEFORE Regions again.
restart_store1() { # engine pid before
  kill -9 "$2"
  while kill -0 "$2" 2>/dev/null; do sleep 0.05; done
  local t0 n
  t0=$(now_ms)
  "$PRKV" store --config "$OUT/$1/store-1.toml" >"$OUT/$1-restart.log" 2>&1 &
  STORE=$!
  SERVING=""; ALL=""
  for _ in $(seq 1 12000); do
    n=$(status_regions 127.0.0.1:20180)
    if [ "$n" -ge 0 ] && [ -z "$SERVING" ]; then SERVING=$(( $(now_ms) - t0 )); fi
    if [ "$n" -ge "$3" ]; then ALL=$(( $(now_ms) - t0 )); break; fi
    sleep 0.05
  done
}

# Stops what restart_store1 and start_playground started.
stop_all() {
  kill "$STORE"; wait "$STORE" 2>/dev/null || true; STORE=""
  kill "$PLAYGROUND"; wait "$PLAYGROUND" 2>/dev/null || true; PLAYGROUND=""
}

# A process's cost while idle: sets IDLE_CPU (% of one core over SECS), RSS_MIB and FDS.
idle_cost() { # pid secs
  local t1 t2 hz
  t1=$(awk '{print $14 + $15}' "/proc/$1/stat"); sleep "$2"; t2=$(awk '{print $14 + $15}' "/proc/$1/stat")
  hz=$(getconf CLK_TCK)
  IDLE_CPU=$(python3 -c "print(f'{100 * ($t2 - $t1) / $hz / $2:.1f}')")
  RSS_MIB=$(awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status")
  FDS=$(ls "/proc/$1/fd" | wc -l)
}
