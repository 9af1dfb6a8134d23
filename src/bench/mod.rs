//! Load generators behind `prkv bench`. Benchmarks are commands, never timed tests; their
//! results go to `BENCHMARKS.md` with the command that produced them.

pub mod add_replica;
pub mod batch_client;
pub mod engine;
pub mod raftstore;
pub mod regions;
pub mod split;
pub mod ycsb;
