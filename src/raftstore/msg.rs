//! Messages into a store's loop, and the callbacks that answer them.

use prkv_proto::metapb::{Peer, Region, RegionEpoch};
use prkv_proto::serverpb::Mutation;

use super::error::Result;
use crate::storage::engine::Snapshot;
use crate::storage::RegionId;

pub type StoreId = u64;

/// A Raft message between two replicas of a Region, or a store-level heartbeat (`region_id` 0).
#[derive(Clone, Debug)]
pub struct RaftMessage {
    pub region_id: RegionId,
    pub from_peer: Peer,
    pub to_peer: Peer,
    pub region_epoch: RegionEpoch,
    pub message: raft::eraftpb::Message,
    /// The sender's view of the Region, so that a store that has no replica yet can create one
    /// (a peer being added).
    pub region: Option<Region>,
    /// The log index through which `region` reflects membership changes (the sender's applied
    /// index).
    pub region_conf_index: u64,
    /// The leader tells followers that the Region goes idle: they stop ticking until the next
    /// message (see hibernation in `peer.rs`).
    pub hibernate: bool,
    pub from_store: StoreId,
    pub to_store: StoreId,
}

impl RaftMessage {
    /// A store-to-store liveness heartbeat; not addressed to any Region.
    pub fn store_heartbeat(from_store: StoreId, to_store: StoreId) -> RaftMessage {
        RaftMessage {
            region_id: 0,
            from_peer: Peer::default(),
            to_peer: Peer::default(),
            region_epoch: RegionEpoch::default(),
            message: raft::eraftpb::Message::default(),
            region: None,
            region_conf_index: 0,
            hibernate: false,
            from_store,
            to_store,
        }
    }

    pub fn is_store_heartbeat(&self) -> bool {
        self.region_id == 0
    }
}

pub type WriteCallback = Box<dyn FnOnce(Result<()>) + Send>;
pub type ReadCallback = Box<dyn FnOnce(Result<RegionSnapshot>) + Send>;

/// The answer to a read: a snapshot of the Region's data, and the Region and leader term it was
/// taken under (callers check keys against the range; read-modify-writes fence on the term).
pub struct RegionSnapshot {
    pub snap: Box<dyn Snapshot>,
    pub region: Region,
    pub term: u64,
}

/// A Region leader's report to PD (sent on leadership and membership changes, and
/// periodically).
#[derive(Clone, Debug)]
pub struct RegionHeartbeat {
    pub region: Region,
    pub leader: Peer,
    pub term: u64,
    /// Replicas still catching up with the leader's log.
    pub pending_peers: Vec<Peer>,
    pub approximate_size: u64,
    pub approximate_keys: u64,
}

/// Where a store's reports to PD go. Implementations must not block (the store loop calls
/// them): queue and drop when full.
pub trait PdReporter: Send + Sync {
    fn region_heartbeat(&self, hb: RegionHeartbeat);
}

/// For stores that run without PD (tests, in-process benchmarks).
pub struct NoPd;

impl PdReporter for NoPd {
    fn region_heartbeat(&self, _hb: RegionHeartbeat) {}
}

/// A membership change.
#[derive(Clone, Debug)]
pub enum ChangePeer {
    AddVoter(Peer),
    AddLearner(Peer),
    Remove(Peer),
}

/// What a store's loop receives.
pub enum StoreMsg {
    Raft(Box<RaftMessage>),
    Write {
        region_id: RegionId,
        epoch: RegionEpoch,
        mutations: Vec<Mutation>,
        /// Apply only if committed in this term (0 = unconditionally); see `term_fence` in
        /// `serverpb.proto`.
        term_fence: u64,
        cb: WriteCallback,
    },
    /// A linearizable read: answered with an engine snapshot that reflects every write
    /// acknowledged before the read arrived.
    Read {
        region_id: RegionId,
        epoch: RegionEpoch,
        cb: ReadCallback,
    },
    ChangePeers {
        region_id: RegionId,
        changes: Vec<ChangePeer>,
        cb: WriteCallback,
    },
    TransferLeader {
        region_id: RegionId,
        to: Peer,
    },
    /// Asks for the store's view of a Region (for tests and tools).
    QueryRegion {
        region_id: RegionId,
        cb: Box<dyn FnOnce(Option<RegionStatus>) + Send>,
    },
    Stop,
}

/// A replica's state as seen by its store.
#[derive(Clone, Debug)]
pub struct RegionStatus {
    pub region: Region,
    pub peer: Peer,
    pub leader_id: u64,
    pub term: u64,
    pub applied_index: u64,
    /// Raft log entries up to here were compacted away.
    pub truncated_index: u64,
    pub hibernated: bool,
}
