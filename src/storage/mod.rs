//! The storage layer of one store: where Region data lives and how it survives a crash.
//!
//! A store keeps two kinds of state (see `docs/architecture.md`, "Storage layout"):
//!
//! * **The Raft log** of every Region, in one shared [`raft-engine`](crate::raftlog) instance.
//!   Appends of all Regions are batched into one write with one fsync.
//! * **The Region data**, behind the [`StoreEngine`] / [`RegionEngine`] traits, in one of two
//!   layouts chosen by `storage.engine` and fixed at bootstrap ([`ident`]):
//!   - [`tablet`] (`partitioned-raft-kv`, the default): one RocksDB per Region replica under
//!     `tablets/<region>_<index>`. No WAL; all column families flush atomically.
//!   - [`raftkv`] (`raft-kv`): every Region in one RocksDB with its WAL on, TiKV's classic layout
//!     and our baseline.
//!
//! # The recovery invariant
//!
//! Every apply batch carries the Region's apply state (the last applied log index) in the *same*
//! RocksDB write batch as the data it applied ([`WriteBatch::set_apply_state`]). A tablet writes
//! no WAL, so after a crash it holds exactly what its last atomic flush wrote: the data of log
//! entries `1..=applied_index` and nothing of later entries, never a partial batch. The store
//! then replays entries `applied_index+1..` from raft-engine. Consequently Raft-log GC must never
//! delete an entry above a Region's *durable* apply index
//! ([`RegionEngine::persisted_apply_state`]); a tablet whose flushed index lags is flushed
//! rather than allowed to hold the log back.
//!
//! In `raft-kv` mode the WAL plays the role of the flush: the WAL is written on every batch but
//! synced only when the durable index is asked for, before log GC passes it.
//!
//! # Keys
//!
//! Engines store user keys under a data prefix and per-Region metadata under a local prefix
//! ([`keys`]), in three column families ([`Cf`]): `default`, `lock` and `write`, the layout
//! Percolator transactions need.
//!
//! Read next: [`engine`] for the traits, then [`tablet`].

pub mod corruption;
pub mod disk;
pub mod engine;
pub mod fds;
pub mod flush;
pub mod ident;
pub mod keys;
pub mod park;
pub mod raftkv;
mod rocks;
mod signal;
pub mod tablet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use engine::{Cf, KeyRange, RegionEngine, ScanDir, StoreEngine, WriteBatch};
pub use rocks::{export_engine_stats, wake_parkers};

use crate::config::{Config, EngineKind};

/// Below this many keys a Region's key count is counted, not estimated: RocksDB's estimate
/// counts keys deleted since the last flush (and a split child's keys outside its range until
/// it is trimmed), so an emptied Region would look as full as it was, and PD's merge checker,
/// which looks for nearly empty Regions, would never pick it. Counting this many is cheap.
pub const EXACT_KEY_COUNT_BELOW: u64 = 1024;

/// A Region's identifier, allocated by PD.
pub type RegionId = u64;
/// A Raft log index.
pub type Index = u64;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("RocksDB error at {path}: {message}")]
    Rocks { path: PathBuf, message: String },
    #[error("raft-engine error: {0}")]
    RaftEngine(#[from] raft_engine::Error),
    #[error("I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupted {what}: {detail}")]
    Corruption { what: String, detail: String },
    #[error(
        "storage.engine is \"{configured}\" but the data dir {data_dir} was bootstrapped with \
         \"{found}\"; set storage.engine = \"{found}\" or use a new storage.data-dir"
    )]
    EngineMismatch {
        data_dir: PathBuf,
        configured: EngineKind,
        found: EngineKind,
    },
    #[error("key {key:?} is not in Region {region_id}'s range {range:?}")]
    KeyNotInRange {
        region_id: RegionId,
        key: Vec<u8>,
        range: KeyRange,
    },
    #[error("Region {0} has no engine on this store")]
    RegionNotFound(RegionId),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether this is running out of file descriptors (`EMFILE`/`ENFILE`): transient, waited
    /// out rather than failed on (`fds`).
    pub fn is_fd_exhaustion(&self) -> bool {
        match self {
            Error::Rocks { message, .. } => fds::message_is_exhaustion(message),
            Error::Io { source, .. } => fds::is_exhaustion(source),
            Error::RaftEngine(raft_engine::Error::Io(e)) => fds::is_exhaustion(e),
            Error::RaftEngine(e) => fds::message_is_exhaustion(&e.to_string()),
            _ => false,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The engines of one store: the shared Raft log and the Region data.
pub struct Engines {
    pub raft: crate::raftlog::RaftLogStore,
    pub kv: Arc<dyn StoreEngine>,
}

impl Engines {
    /// Opens (bootstrapping if new) the data dir described by `config`.
    ///
    /// The engine kind is checked against `store.toml` before anything else is touched: opening a
    /// `raft-kv` data dir as `partitioned-raft-kv` (or the reverse) fails and changes no file.
    pub fn open(config: &Config) -> Result<Engines> {
        let data_dir = &config.storage.data_dir;
        ident::check_or_bootstrap(data_dir, config.storage.engine)?;
        let raft =
            crate::raftlog::RaftLogStore::open(&config.raft_engine_dir(), &config.raft_engine)?;
        let kv: Arc<dyn StoreEngine> = match config.storage.engine {
            EngineKind::PartitionedRaftKv => Arc::new(tablet::TabletRegistry::open(
                &data_dir.join("tablets"),
                &config.rocksdb,
            )?),
            EngineKind::RaftKv => Arc::new(raftkv::RaftKvEngine::open(
                &data_dir.join("db"),
                &config.rocksdb,
            )?),
        };
        Ok(Engines { raft, kv })
    }
}
