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
    /// The sender's Region no longer contains `to_peer`: a stale replica is told to go.
    pub tombstone: bool,
    /// The sender's replica is gone without a membership change (refused as damaged): a
    /// hibernated receiver must wake and tick, or a Region whose leader it was would wait
    /// for that leader forever (its store stays alive, so nothing else wakes it).
    pub wake_up: bool,
    /// A merge's source leader asking whether the merge may roll back, or a replica's answer
    /// (see `store/merge.rs`).
    pub merge_rollback: Option<MergeRollbackMsg>,
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
            tombstone: false,
            wake_up: false,
            merge_rollback: None,
            from_store,
            to_store,
        }
    }

    /// A message between replicas that carries no Raft message, only its flags (a tombstone
    /// notice, a wake-up): every flag off, to be set by the caller.
    pub fn signal(
        region_id: RegionId,
        from_peer: Peer,
        to_peer: Peer,
        region_epoch: RegionEpoch,
        from_store: StoreId,
    ) -> RaftMessage {
        RaftMessage {
            region_id,
            from_peer,
            to_peer,
            region_epoch,
            message: raft::eraftpb::Message::default(),
            region: None,
            region_conf_index: 0,
            hibernate: false,
            tombstone: false,
            wake_up: false,
            merge_rollback: None,
            from_store,
            to_store: to_peer.store_id,
        }
    }

    pub fn is_store_heartbeat(&self) -> bool {
        self.region_id == 0
    }
}

/// The rollback check of a merge whose target moved on (see `store/merge.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeRollbackMsg {
    /// From the source's leader: may the merge prepared through `commit` roll back?
    Query { commit: u64 },
    /// From a replica of the source: yes. `witness`: its target replica moved past the
    /// recorded epoch by applying its own log, which proves no CommitMerge can apply.
    Agree { commit: u64, witness: bool },
}

pub type WriteCallback = Box<dyn FnOnce(Result<()>) + Send>;
/// Answered with every Region the split produced (the shrunk original first), in key order.
pub type SplitCallback = Box<dyn FnOnce(Result<Vec<Region>>) + Send>;
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

/// The ids PD allocated for one new Region of a split: the Region's, and one peer id per peer
/// of the Region being split, in its peer order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitIds {
    pub new_region_id: u64,
    pub new_peer_ids: Vec<u64>,
}

pub type SplitIdsCallback = Box<dyn FnOnce(Result<Vec<SplitIds>>) + Send>;

/// Where a store's reports to PD go, and how it asks PD for split ids. Implementations must not
/// block (the store loop calls them): queue and drop when full, answer through callbacks.
pub trait PdReporter: Send + Sync {
    fn region_heartbeat(&self, hb: RegionHeartbeat);

    /// Allocates ids for `count` new Regions split off `region` (PD's AskBatchSplit).
    fn ask_batch_split(&self, region: Region, count: usize, cb: SplitIdsCallback);

    /// Tells PD the Regions a split produced (ReportBatchSplit), ahead of their heartbeats.
    fn report_batch_split(&self, regions: Vec<Region>);
}

/// For stores that run without PD (tests, in-process benchmarks). Split ids come from a
/// process-wide counter, far above the ids tests give their bootstrapped Regions.
pub struct NoPd;

static NO_PD_NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 32);

impl PdReporter for NoPd {
    fn region_heartbeat(&self, _hb: RegionHeartbeat) {}

    fn ask_batch_split(&self, region: Region, count: usize, cb: SplitIdsCallback) {
        let next = || NO_PD_NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ids = (0..count)
            .map(|_| SplitIds {
                new_region_id: next(),
                new_peer_ids: region.peers.iter().map(|_| next()).collect(),
            })
            .collect();
        cb(Ok(ids))
    }

    fn report_batch_split(&self, _regions: Vec<Region>) {}
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
    /// Merges Region `region_id` (the source) into its neighbour `target_id`: the source's
    /// leader proposes a PrepareMerge, then drives the merge to its commit or rollback (see
    /// `raftstore::merge`). The callback hears whether the PrepareMerge applied.
    PrepareMerge {
        region_id: RegionId,
        target_id: RegionId,
        cb: WriteCallback,
    },
    /// Splits a Region at `split_keys` (user keys as stored): the leader checks the request,
    /// asks PD for ids, then proposes the split. Sent by the split checker, by PD and by the
    /// `SplitRegion` RPC.
    SplitRegion {
        region_id: RegionId,
        epoch: RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        cb: SplitCallback,
    },
    /// Splits a Region at its middle key (PD's split operator without keys); the leader's
    /// region worker finds the key.
    HalfSplit {
        region_id: RegionId,
        epoch: RegionEpoch,
    },
    /// Second half of `SplitRegion`, once PD answered with ids.
    ProposeSplit {
        region_id: RegionId,
        epoch: RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        ids: Vec<SplitIds>,
        cb: SplitCallback,
    },
    /// How the transfer of a snapshot to `to_peer_id` ended (Raft retries a failed one).
    SnapshotStatus {
        region_id: RegionId,
        to_peer_id: u64,
        ok: bool,
    },
    /// RocksDB found generation `tablet_index` of the Region's tablet damaged while running
    /// (`storage::corruption`): the replica is refused and rebuilt from the others.
    ReplicaDamaged {
        region_id: RegionId,
        tablet_index: u64,
        reason: String,
    },
    /// Asks for the store's view of a Region (for tests and tools).
    QueryRegion {
        region_id: RegionId,
        cb: Box<dyn FnOnce(Option<RegionStatus>) + Send>,
    },
    /// Asks for the store's view of every Region replica it holds (for tests and tools).
    QueryRegions {
        cb: Box<dyn FnOnce(Vec<RegionStatus>) + Send>,
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
