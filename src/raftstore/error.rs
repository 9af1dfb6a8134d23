//! Errors a Region command can end with, shaped like TiKV's `errorpb` so that the server maps
//! them one to one and clients retry the way they do against TiKV.

use prkv_proto::metapb::{Peer, Region};

use crate::storage::RegionId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// This replica is not the leader; `leader` is the one it knows of, if any.
    #[error("Region {region_id}: not leader (leader is {leader:?})")]
    NotLeader {
        region_id: RegionId,
        leader: Option<Peer>,
    },
    /// The request's epoch is not the Region's current one (it split, merged or changed
    /// membership); `current_regions` is what this store holds now.
    #[error("epoch not match: current Regions {current_regions:?}")]
    EpochNotMatch { current_regions: Vec<Region> },
    #[error("Region {0} not found on this store")]
    RegionNotFound(RegionId),
    #[error("key {key:?} is not in Region {}", region.id)]
    KeyNotInRegion { key: Vec<u8>, region: Box<Region> },
    /// A bounded queue is full; retry later.
    #[error("server is busy: {reason}")]
    ServerIsBusy { reason: String },
    /// The proposal would produce an entry above `raftstore.raft-entry-max-size`.
    #[error("Region {region_id}: raft entry of {entry_size} bytes is too large")]
    RaftEntryTooLarge {
        region_id: RegionId,
        entry_size: u64,
    },
    /// The command was proposed but overwritten by a new leader's log; it did not happen.
    #[error("Region {region_id}: command dropped by a leader change (term {term})")]
    StaleCommand { region_id: RegionId, term: u64 },
    /// A read could not be confirmed in time (e.g. the leader lost its quorum).
    #[error("Region {region_id}: read index timed out")]
    ReadIndexTimeout { region_id: RegionId },
    #[error("store is stopping")]
    StoreStopped,
    /// No answer within the caller's deadline; the command may or may not have happened.
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("storage: {0}")]
    Storage(String),
    /// RocksDB found a Region's data damaged on disk (e.g. a block whose checksum does not
    /// match). The replica is refused and rebuilt from the others (`raftstore/store/damage.rs`).
    #[error("storage: {0}")]
    Corruption(String),
    /// Split keys that cannot cut the Region (outside it, unordered, or at its start).
    #[error("invalid split: {0}")]
    InvalidSplit(String),
    /// The Region is frozen for a merge (between its PrepareMerge and the merge's commit or
    /// rollback): clients back off, reload the Region from PD and retry.
    #[error("Region {0} is merging")]
    ProposalInMergingMode(RegionId),
    /// A merge that cannot be made (not adjacent, replicas not aligned, another merge running).
    #[error("invalid merge: {0}")]
    InvalidMerge(String),
    /// Free disk space on this store is below `storage.reserve-space`: data writes are refused
    /// until space returns (reads go on).
    #[error("store {store_id}: disk full ({available} bytes free, storage.reserve-space is {reserve} bytes): writes refused, reads go on")]
    DiskFull {
        store_id: u64,
        available: u64,
        reserve: u64,
    },
    /// PD could not be asked (for split ids); retry later.
    #[error("PD: {0}")]
    Pd(String),
}

impl From<crate::storage::Error> for Error {
    fn from(e: crate::storage::Error) -> Self {
        match e {
            crate::storage::Error::Corruption { .. } => Error::Corruption(e.to_string()),
            e => Error::Storage(e.to_string()),
        }
    }
}

impl Error {
    /// Whether a client may retry the same command (possibly elsewhere) and expect success.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Error::RaftEntryTooLarge { .. }
                | Error::KeyNotInRegion { .. }
                | Error::InvalidSplit(_)
                | Error::InvalidMerge(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;
