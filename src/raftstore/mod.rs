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
//! [`local_read`] (lease reads served on the caller's thread), [`split`] (the split checker
//! and what a split produces), [`worker`] (background split checks and tablet trims),
//! [`transport`] (the network, real or simulated), [`error`] (what callers are told).
//!
//! [`snap`] (snapshots: generation, transfer, install) and `store/merge.rs` (merging two
//! Regions: prepare, commit, rollback) complete the picture.

pub mod error;
pub mod local_read;
pub mod msg;
pub mod peer;
pub mod snap;
pub mod split;
pub mod store;
pub mod transport;
pub mod worker;

pub use error::{Error, Result};
pub use local_read::LocalReaders;
pub use msg::{
    ChangePeer, MergeRollbackMsg, NoPd, PdReporter, RaftMessage, RegionHeartbeat, RegionSnapshot,
    RegionStatus, SplitCallback, SplitIds, SplitIdsCallback, StoreId, StoreMsg,
};
pub use store::{
    bootstrap_region, discard_bootstrap_region, even_region_key, even_regions, start_store,
    StoreHandle, StoreRouter, StoreStats,
};
pub use transport::{SimNetwork, Transport, Verdict};
