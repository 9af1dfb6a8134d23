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
