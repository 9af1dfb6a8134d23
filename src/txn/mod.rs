//! Transactions: Percolator, as TiKV serves it, on every Region.
//!
//! [`codec`] is the storage layout (lock, write and default column families, TiKV's encodings);
//! [`mvcc`] reads versions from a Region snapshot and holds the rules of every command
//! (prewrite, commit, rollback, check status, pessimistic locks, GC). The gRPC side, with
//! latches and Raft, is `server/txn.rs`.

pub mod codec;
pub mod mvcc;
