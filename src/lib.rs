//! prkv: a distributed, transactional key-value store in which every Region keeps its data in a
//! RocksDB instance of its own.
//!
//! The crate's folders are its architecture (see `docs/architecture.md` for the guided tour):
//!
//! * [`config`]: the TOML configuration, TiKV's key names, strict validation.
//! * [`storage`]: where Region data lives, the two engine kinds, the recovery invariant.
//! * [`raftlog`]: the Raft log of every Region in one shared raft-engine.
//! * [`bench`]: load generators behind `prkv bench`.
//!
//! Start reading at [`storage`].

pub mod bench;
pub mod check;
pub mod config;
pub mod crash;
pub mod ctl;
pub mod metrics;
pub mod pd;
pub mod playground;
pub mod raftlog;
pub mod raftstore;
pub mod server;
pub mod storage;
pub mod txn;
