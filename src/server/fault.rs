//! Fault injection for the fault tests: a store can be told, through its status port, to stop
//! talking Raft with some other stores. That is a network partition between stores, made
//! without network namespaces or root, which the nemesis (`tests/nemesis.rs`) drives on its
//! seeded schedule.
//!
//! ```text
//!   POST /fault/partition?stores=2,3   drop every Raft message and snapshot to or from 2 and 3
//!   POST /fault/partition?stores=      heal
//!   GET  /fault/partition              the stores cut off now, as JSON
//! ```
//!
//! Messages can also be delayed rather than dropped: each Raft message from the stores named
//! is held for a random time up to `ms` before its store sees it, so they arrive late and out
//! of order (a `MsgTimeoutNow` after the transfer it belonged to was over, a vote from an old
//! term, an append overtaken by a newer one). At most [`MAX_DELAYED`] messages wait at once;
//! beyond that they are dropped, as a congested network would.
//!
//! ```text
//!   POST /fault/delay?stores=2,3&ms=2500   hold messages from 2 and 3 up to 2.5 s
//!   POST /fault/delay?stores=              stop delaying
//! ```
//!
//! `POST /fault/crash?point=<name>` arms a crash point (`crate::crash`).
//!
//! Off unless the process was started with `PRKV_FAULTS=1`: a production store answers these
//! requests with 403, and its transport pays one relaxed atomic load per message.
//! Clients and PD are never cut off: the faults are between stores only.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use parking_lot::RwLock;

use crate::raftstore::StoreId;

/// Whether this process accepts faults (`PRKV_FAULTS=1` at start).
static ENABLED: LazyLock<bool> =
    LazyLock::new(|| std::env::var("PRKV_FAULTS").is_ok_and(|v| v == "1"));

/// Fast path: false while no store is cut off.
static ANY_CUT: AtomicBool = AtomicBool::new(false);
static CUT: RwLock<BTreeSet<StoreId>> = RwLock::new(BTreeSet::new());

/// The number of stores one partition request may name: more is not a cluster this tests.
const MAX_CUT: usize = 64;

/// The most messages held back at once by a delay fault: a bound on the memory and tasks a
/// fault may cost (a busy store receives a few thousand messages a second).
pub const MAX_DELAYED: usize = 10_000;
/// The longest delay a request may ask for: long enough for several election timeouts.
const MAX_DELAY_MS: u64 = 30_000;

/// Fast path: false while no store's messages are delayed.
static ANY_DELAY: AtomicBool = AtomicBool::new(false);
/// Stores whose messages are delayed, and the longest delay.
static DELAY: RwLock<(BTreeSet<StoreId>, u64)> = RwLock::new((BTreeSet::new(), 0));
/// Messages held back now.
pub static DELAYED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn enabled() -> bool {
    *ENABLED
}

/// Raft traffic with `store` is dropped now.
pub fn is_cut(store: StoreId) -> bool {
    ANY_CUT.load(Ordering::Relaxed) && CUT.read().contains(&store)
}

/// The stores cut off now.
pub fn cut_stores() -> Vec<StoreId> {
    CUT.read().iter().copied().collect()
}

/// Parses `stores=2,3` (empty: heal) and makes it the set of stores cut off.
pub fn set_partition(query: &str) -> Result<Vec<StoreId>, String> {
    if !enabled() {
        return Err("faults are off (start the store with PRKV_FAULTS=1)".into());
    }
    let stores = parse_stores(query)?;
    let v: Vec<StoreId> = stores.iter().copied().collect();
    let mut cut = CUT.write();
    *cut = stores;
    ANY_CUT.store(!cut.is_empty(), Ordering::Relaxed);
    tracing::warn!(stores = ?v, "fault: Raft traffic with these stores is dropped");
    Ok(v)
}

/// The longest delay for messages from `store` now, if any.
pub fn delay_from(store: StoreId) -> Option<u64> {
    if !ANY_DELAY.load(Ordering::Relaxed) {
        return None;
    }
    let d = DELAY.read();
    d.0.contains(&store).then_some(d.1)
}

/// Parses `stores=2,3&ms=2500` (no stores: stop delaying) and makes it the delay fault.
pub fn set_delay(query: &str) -> Result<(Vec<StoreId>, u64), String> {
    if !enabled() {
        return Err("faults are off (start the store with PRKV_FAULTS=1)".into());
    }
    let stores = parse_stores(query)?;
    let ms = match query.split('&').find_map(|kv| kv.strip_prefix("ms=")) {
        Some(ms) => ms
            .parse::<u64>()
            .map_err(|e| format!("bad ms {ms:?}: {e}"))?,
        None if stores.is_empty() => 0,
        None => return Err("expected &ms=<longest delay in milliseconds>".into()),
    };
    if ms > MAX_DELAY_MS {
        return Err(format!("ms={ms}: at most {MAX_DELAY_MS}"));
    }
    let v: Vec<StoreId> = stores.iter().copied().collect();
    let mut d = DELAY.write();
    *d = (stores, ms);
    ANY_DELAY.store(!d.0.is_empty() && ms > 0, Ordering::Relaxed);
    tracing::warn!(stores = ?v, ms, "fault: Raft messages from these stores are delayed");
    Ok((v, ms))
}

fn parse_stores(query: &str) -> Result<BTreeSet<StoreId>, String> {
    let list = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("stores="))
        .ok_or_else(|| "expected ?stores=<id>,<id>... (empty to heal)".to_string())?;
    let mut stores = BTreeSet::new();
    for s in list.split(',').filter(|s| !s.is_empty()) {
        let id = s
            .parse::<StoreId>()
            .map_err(|e| format!("bad store id {s:?}: {e}"))?;
        stores.insert(id);
    }
    if stores.len() > MAX_CUT {
        return Err(format!("at most {MAX_CUT} stores"));
    }
    Ok(stores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_requests_are_parsed_or_refused() {
        assert_eq!(
            parse_stores("stores=3,2,3").unwrap(),
            BTreeSet::from([2, 3])
        );
        assert!(parse_stores("stores=").unwrap().is_empty());
        assert!(parse_stores("x=1&stores=4").unwrap().contains(&4));
        assert!(parse_stores("stores=2,x").is_err());
        assert!(parse_stores("nothing").is_err());
        let many: Vec<String> = (0..=MAX_CUT).map(|i| i.to_string()).collect();
        assert!(parse_stores(&format!("stores={}", many.join(","))).is_err());
        // The process-wide switch is off in unit tests: every request is refused.
        assert!(!enabled());
        assert!(set_partition("stores=2").is_err());
        assert!(!is_cut(2));
    }
}
