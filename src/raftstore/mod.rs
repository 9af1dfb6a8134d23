//! The Raftstore: every Region replica of a store as a Raft group, driven by one loop.
//!
//! ```text
//!   clients ──Write/Read──▶ StoreRouter ──▶ store loop (store.rs)
//!                                              │  per peer (peer.rs): RawNode, proposals,
//!                                              │  reads, apply
//!   other stores ◀──RaftMessage── Transport ◀──┤
//!                                              ▼
//!                          raft-engine (one write + fsync per round, all Regions)
//!                          Region engines (one apply write per Region per round)
//! ```
//!
//! Read in this order: [`msg`] (what goes in and out), [`store`] (the loop and its Ready
//! round), [`peer`] (one replica: proposals, reads and leases, apply, hibernation),
//! [`transport`] (the network, real or simulated), [`error`] (what callers are told).
//!
//! Not here yet: Raft-log GC, snapshots (a replica added to a Region replays the log from the
//! start, which works while no log is compacted), split and merge.

pub mod error;
pub mod msg;
pub mod peer;
pub mod store;
pub mod transport;

pub use error::{Error, Result};
pub use msg::{
    ChangePeer, NoPd, PdReporter, RaftMessage, RegionHeartbeat, RegionSnapshot, RegionStatus,
    StoreId, StoreMsg,
};
pub use store::{
    bootstrap_region, discard_bootstrap_region, even_region_key, even_regions, start_store,
    StoreHandle, StoreRouter, StoreStats,
};
pub use transport::{SimNetwork, Transport, Verdict};
