//! One replica of one Region: a `raft::RawNode` plus what turns its log into a state machine.
//!
//! A peer does no I/O of its own on the Raft side. The store loop ([`super::store`]) collects the
//! `Ready` of every peer with work, persists all of them with one raft-engine write and one
//! fsync, and then calls back into the peer to send, apply and advance. What the peer owns:
//!
//! * **Proposals**: a write is checked (leader, epoch, keys, size, queue bound), encoded as a
//!   `RaftCmdRequest` and proposed; its callback waits in `proposals` until the entry is applied.
//!   An entry applied at the proposal's index but with another term means a new leader
//!   overwrote it: the command did not happen and the caller hears `StaleCommand`.
//! * **Apply**: committed entries go into one engine write batch together with the apply state
//!   (the recovery invariant of [`crate::storage`]); callbacks run only after that write.
//! * **Reads** (Raft thesis section 6.4): a leader holding a valid lease serves from its engine
//!   at once; otherwise the read waits for a ReadIndex round (a quorum confirming leadership)
//!   and for the apply index to reach the read index. The lease starts when a quorum
//!   confirmation was *requested* and lasts `raftstore.raft-store-max-leader-lease`, shorter
//!   than the election timeout; with `check_quorum`, followers refuse to vote for anyone else
//!   within an election timeout of hearing from the leader, so no other leader can commit a write
//!   while the lease holds.
//! * **Hibernation**: an idle Region stops ticking (see [`Peer::maybe_hibernate`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prkv_proto::metapb::{Peer as PeerMeta, PeerRole, Region, RegionEpoch};
use prkv_proto::serverpb::{
    mutation, CommitMerge, MergeState, Mutation, PeerState, PrepareMerge, RaftApplyState,
    RaftCmdRequest, RegionLocalState, RollbackMerge,
};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, ConfChangeV2, Entry, EntryType};
use raft::{RawNode, StateRole};

use super::error::{Error, Result};
use super::local_read::{ReadDelegate, Readable};
use super::msg::{
    ChangePeer, ReadCallback, RegionHeartbeat, RegionSnapshot, SplitCallback, SplitIds,
    WriteCallback,
};
use super::split::{self, RAFT_INIT_LOG_INDEX, RAFT_INIT_LOG_TERM};
use crate::raftlog::{LogWriteBatch, RaftLogStore, RegionLog};
use crate::storage::{Cf, KeyRange, RegionEngine, StoreEngine, WriteBatch, EXACT_KEY_COUNT_BELOW};

/// Proposals waiting for apply, per Region. A leader that cannot commit (lost quorum) must not
/// buffer unboundedly; 4096 in-flight writes per Region is far beyond what a healthy Region
/// needs between two Ready rounds, so reaching it means "overloaded": `ServerIsBusy`.
pub const MAX_PENDING_PROPOSALS: usize = 4096;
/// Reads waiting for a ReadIndex round, per Region, bounded for the same reason.
pub const MAX_PENDING_READS: usize = 4096;

/// The settings a peer needs, derived from `[raftstore]`.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub raft_entry_max_size: u64,
    pub lease: Duration,
    pub hibernate: bool,
    /// A tablet is flushed for Raft-log GC only when its log above the durable apply index
    /// holds more entries than this, or more bytes than `log_gc_size_limit`.
    pub log_gc_count_limit: u64,
    pub log_gc_size_limit: u64,
}

struct Proposal {
    index: u64,
    term: u64,
    /// Client writes the entry carries (the store joins a round's plain writes to a Region).
    writes: usize,
    cb: WriteCallback,
    proposed_at: Instant,
}

/// Proposals waiting for their entries to apply, oldest first, and how many client writes they
/// carry: the bound on pending work counts writes, not entries.
#[derive(Default)]
struct Proposals {
    queue: VecDeque<Proposal>,
    writes: usize,
}

impl Proposals {
    fn push_back(&mut self, p: Proposal) {
        self.writes += p.writes;
        self.queue.push_back(p);
    }

    fn front(&self) -> Option<&Proposal> {
        self.queue.front()
    }

    fn pop_front(&mut self) -> Option<Proposal> {
        let p = self.queue.pop_front()?;
        self.writes -= p.writes;
        Some(p)
    }

    fn drain(&mut self) -> impl Iterator<Item = Proposal> + '_ {
        self.writes = 0;
        self.queue.drain(..)
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn writes(&self) -> usize {
        self.writes
    }
}

struct PendingRead {
    batch: u64,
    cb: ReadCallback,
    issued_at: Option<Instant>,
    read_index: Option<u64>,
    ticks: usize,
}

/// What applying a batch of entries changed beyond the data.
#[derive(Default)]
pub struct ApplyOutcome {
    /// The Region's membership changed and its new state was persisted.
    pub region_changed: bool,
    /// This replica was removed from the Region and must be destroyed.
    pub removed: bool,
    /// The leader asked to compact the log up to this index.
    pub compact_to: Option<u64>,
    /// New Regions split off this one, with their engines (already durable, with their Raft
    /// state in raft-engine): the store creates their peers.
    pub split: Vec<(Region, Arc<dyn RegionEngine>)>,
    /// A CommitMerge reached apply: the store takes in the source (it needs both peers), then
    /// applies `rest`. Everything before it is applied.
    pub commit_merge: Option<PendingCommitMerge>,
}

/// A CommitMerge entry waiting for the store (see [`ApplyOutcome::commit_merge`]).
pub struct PendingCommitMerge {
    pub index: u64,
    pub term: u64,
    pub cmd: CommitMerge,
    pub rest: Vec<Entry>,
}

pub struct Peer {
    pub region: Region,
    pub meta: PeerMeta,
    pub raw: RawNode<RegionLog>,
    pub engine: Arc<dyn RegionEngine>,
    kv: Arc<dyn StoreEngine>,
    log: RaftLogStore,
    cfg: PeerConfig,
    proposals: Proposals,
    reads: VecDeque<PendingRead>,
    next_read_batch: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    lease_until: Option<Instant>,
    lease_term: u64,
    /// Idle: not ticked until a message or command arrives.
    pub hibernated: bool,
    idle_ticks: usize,
    /// The term and role seen at the last `on_role_maybe_changed`.
    last_term: u64,
    was_leader: bool,
    /// `region` reflects membership changes through this log index (see `RegionLocalState`).
    conf_index: u64,
    /// PD should hear from this leader soon: it just became leader or its membership changed.
    pub pd_dirty: bool,
    /// Bytes of entries applied since this peer was built, and its value when the applied
    /// index was `log_mark.0`: once the tablet is durable through `log_mark.0`, the log above
    /// its durable apply index holds at most `applied_bytes - log_mark.1` bytes.
    applied_bytes: u64,
    log_mark: (u64, u64),
    /// Bytes and keys written since the last split check (the split checker's trigger).
    pub split_check_bytes: u64,
    pub split_check_keys: u64,
    /// Set while a split check of this Region waits in the worker's queue or runs.
    pub split_check_queued: Arc<std::sync::atomic::AtomicBool>,
    /// This replica's Region is frozen for a merge (state Merging; see `MergeState`).
    pub merge_state: Option<MergeState>,
    /// This leader proposed a PrepareMerge that has not applied yet: it takes no writes, so
    /// that none lands after the freeze.
    merge_proposed: bool,
    /// The epoch this replica started from in this process: recovered from disk, created, or
    /// jumped to by its latest snapshot. Every epoch change since came from applying its own
    /// log, entry by entry (see [`Peer::applied_past_by_log`]).
    epoch_from: RegionEpoch,
    /// Where this peer publishes its read state for readers on other threads
    /// ([`super::local_read`]), and the last state published (compared, so that an unchanged
    /// state costs no lock).
    delegate: Option<Arc<ReadDelegate>>,
    published: Option<PublishedRead>,
    /// No lease may come from a quorum confirmation requested before this instant: the last
    /// moment a leadership transfer was seen in progress (the transferee may be elected
    /// without waiting out the lease, so confirmations from before it prove nothing).
    lease_fence: Option<Instant>,
    /// The last term in which this peer saw a leadership transfer of its own in progress. No
    /// lease for the rest of that term, even once the transfer is over: a `MsgTimeoutNow` it
    /// sent may still be on its way (delayed, or re-sent), and its target, still in this term,
    /// campaigns on it at once, with votes granted however recently we were heard from. Only
    /// a new term makes such a message harmless (raft-rs drops messages of older terms).
    transfer_term: u64,
}

/// What [`Peer::publish_reads`] last published: the lease's end, the term, the epoch and the
/// engine (by address).
#[derive(Clone, Copy, PartialEq, Eq)]
struct PublishedRead {
    until: Instant,
    term: u64,
    version: u64,
    conf_ver: u64,
    engine: usize,
}

/// A replica whose log trails the leader's commit index by more than this is reported to PD as
/// pending (still catching up), and PD does not promote it yet. Small enough that a promoted
/// learner catches up within a round trip, large enough that a busy Region's healthy followers
/// (a few entries behind at any instant) are not pending.
const PENDING_LAG: u64 = 64;

/// A PrepareMerge is proposed only if every replica has all but this many entries: the
/// CommitMerge carries the entries after the slowest replica's, in one Raft entry.
const MAX_MERGE_CATCH_UP: u64 = 128;

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Peer {
    /// Builds a peer from the persisted state: Raft state from `log`, applied state from
    /// `engine`. Committed entries above the engine's apply index are replayed by the first
    /// Readies (raft-rs hands out `applied+1..=commit` again).
    pub fn new(
        region: Region,
        meta: PeerMeta,
        log: RaftLogStore,
        engine: Arc<dyn RegionEngine>,
        kv: Arc<dyn StoreEngine>,
        cfg: PeerConfig,
        conf_index: u64,
    ) -> Result<Peer> {
        let storage = RegionLog::load(log.clone(), region.id, &region)?;
        let apply = engine.apply_state()?.unwrap_or_default();
        let mut hs = raft::Storage::initial_state(&storage)
            .map(|s| s.hard_state)
            .unwrap_or_default();
        // Entries committed by a LightReady are applied before the next hard state is written,
        // so after a crash the engine may be ahead of the persisted commit index. Whatever was
        // applied was committed: raise the commit index (raft-rs insists applied <= commit).
        if apply.applied_index > hs.commit {
            let last = raft::Storage::last_index(&storage).unwrap_or(0);
            assert!(
                apply.applied_index <= last,
                "Region {}: engine applied {} but the log ends at {last}: applied data has no log",
                region.id,
                apply.applied_index
            );
            hs.commit = apply.applied_index;
            storage.set_hard_state(hs);
        }
        let raft_cfg = raft::Config {
            id: meta.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied: apply.applied_index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_cfg
            .validate()
            .map_err(|e| Error::Storage(format!("raft config: {e}")))?;
        let raw = RawNode::new(&raft_cfg, storage, &discard_logger()).map_err(|e| {
            Error::Storage(format!("Region {}: creating raft node: {e}", region.id))
        })?;
        let epoch_from = region.region_epoch.unwrap_or_default();
        Ok(Peer {
            region,
            meta,
            raw,
            engine,
            kv,
            log,
            cfg,
            proposals: Proposals::default(),
            reads: VecDeque::new(),
            next_read_batch: 1,
            applied_index: apply.applied_index,
            applied_term: apply.applied_term,
            lease_until: None,
            lease_term: 0,
            hibernated: false,
            idle_ticks: 0,
            last_term: 0,
            was_leader: false,
            conf_index,
            pd_dirty: false,
            applied_bytes: 0,
            log_mark: (apply.applied_index, 0),
            // A Region new to this store (bootstrapped, split off, restarted) is checked once.
            split_check_bytes: u64::MAX / 2,
            split_check_keys: u64::MAX / 2,
            split_check_queued: Default::default(),
            merge_state: None,
            merge_proposed: false,
            epoch_from,
            delegate: None,
            published: None,
            lease_fence: None,
            transfer_term: 0,
        })
    }

    pub fn region_id(&self) -> u64 {
        self.region.id
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// The leader as a Region peer, if known.
    pub fn leader(&self) -> Option<PeerMeta> {
        let id = self.leader_id();
        self.region.peers.iter().find(|p| p.id == id).cloned()
    }

    pub fn peer_by_id(&self, id: u64) -> Option<PeerMeta> {
        self.region.peers.iter().find(|p| p.id == id).cloned()
    }

    /// The peer this leader is handing its leadership to, while a transfer is in progress.
    fn transferring_to(&self) -> Option<u64> {
        self.raw.raft.lead_transferee
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            region_id: self.region.id,
            leader: self.leader(),
        }
    }

    fn check_epoch(&self, epoch: &RegionEpoch) -> Result<()> {
        let current = self.region.region_epoch.unwrap_or_default();
        if epoch.version != current.version {
            return Err(Error::EpochNotMatch {
                current_regions: vec![self.region.clone()],
            });
        }
        Ok(())
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        let r = &self.region;
        if key >= r.start_key.as_slice() && (r.end_key.is_empty() || key < r.end_key.as_slice()) {
            Ok(())
        } else {
            Err(Error::KeyNotInRegion {
                key: key.to_vec(),
                region: Box::new(r.clone()),
            })
        }
    }

    /// A Region frozen for a merge takes no writes, reads, splits or membership changes: a read
    /// could miss writes the target already took for this range, and anything else would
    /// change what the target takes in.
    fn check_not_merging(&self) -> Result<()> {
        if self.merge_state.is_some() || self.merge_proposed {
            return Err(Error::ProposalInMergingMode(self.region.id));
        }
        Ok(())
    }

    /// Wakes a hibernated peer: it ticks again from now on.
    pub fn wake(&mut self) {
        self.hibernated = false;
        self.idle_ticks = 0;
    }

    /// Whether a write could be proposed here now: this peer leads and is not handing its
    /// leadership over, the Region is not merging, the epoch is current and every key is in
    /// the Region. The store checks each write with it before it joins others in one entry
    /// (`Store::batch_write`), so that one bad write fails alone.
    pub fn check_write(&self, epoch: &RegionEpoch, mutations: &[Mutation]) -> Result<()> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.transferring_to().is_some() {
            // raft-rs would drop the proposal. Naming this peer as the leader would send the
            // client straight back here, and it would spend its retries before the transfer
            // ends; with no leader named, clients back off and ask PD again, as in an election.
            // (ServerIsBusy is no better: tikv-client 0.4 hands it to the application.)
            return Err(Error::NotLeader {
                region_id: self.region.id,
                leader: None,
            });
        }
        self.check_not_merging()?;
        self.check_epoch(epoch)?;
        for m in mutations {
            self.check_key(&m.key)?;
            if m.op == mutation::Op::DeleteRange as i32 && !m.value.is_empty() {
                let end_ok = self.region.end_key.is_empty() || m.value <= self.region.end_key;
                if !end_ok {
                    return Err(Error::KeyNotInRegion {
                        key: m.value.clone(),
                        region: Box::new(self.region.clone()),
                    });
                }
            }
        }
        Ok(())
    }

    /// Proposes a write. On error the callback has not been consumed and the error is returned.
    pub fn propose_write(
        &mut self,
        epoch: &RegionEpoch,
        mutations: Vec<Mutation>,
        term_fence: u64,
        cb: WriteCallback,
    ) -> std::result::Result<(), (Error, WriteCallback)> {
        self.propose_writes(epoch, mutations, term_fence, 1, cb)
    }

    /// Proposes `writes` client writes, their mutations together, as one entry; `cb` answers
    /// them all. On error the callback has not been consumed and the error is returned.
    pub fn propose_writes(
        &mut self,
        epoch: &RegionEpoch,
        mutations: Vec<Mutation>,
        term_fence: u64,
        writes: usize,
        cb: WriteCallback,
    ) -> std::result::Result<(), (Error, WriteCallback)> {
        self.wake();
        if let Err(e) = self.check_write(epoch, &mutations) {
            return Err((e, cb));
        }
        if self.proposals.writes() + writes > MAX_PENDING_PROPOSALS {
            return Err((
                Error::ServerIsBusy {
                    reason: format!(
                        "Region {} has {} writes pending",
                        self.region.id,
                        self.proposals.writes()
                    ),
                },
                cb,
            ));
        }
        let cmd = RaftCmdRequest {
            region_id: self.region.id,
            region_epoch: Some(*epoch),
            mutations,
            compact_log_index: 0,
            term_fence,
            ..Default::default()
        };
        let data = cmd.encode_to_vec();
        if data.len() as u64 > self.cfg.raft_entry_max_size {
            return Err((
                Error::RaftEntryTooLarge {
                    region_id: self.region.id,
                    entry_size: data.len() as u64,
                },
                cb,
            ));
        }
        if self.raw.propose(vec![], data).is_err() {
            // Dropped by raft-rs (e.g. this leader was just removed from the group): whoever
            // leads, it is not this peer.
            return Err((
                Error::NotLeader {
                    region_id: self.region.id,
                    leader: None,
                },
                cb,
            ));
        }
        self.track_writes(writes, cb);
        Ok(())
    }

    /// Proposes a membership change (joint consensus when more than one change).
    pub fn propose_conf_change(
        &mut self,
        changes: &[ChangePeer],
        cb: WriteCallback,
    ) -> std::result::Result<(), (Error, WriteCallback)> {
        self.wake();
        if !self.is_leader() {
            return Err((self.not_leader(), cb));
        }
        if let Err(e) = self.check_not_merging() {
            return Err((e, cb));
        }
        let mut cc = ConfChangeV2::default();
        let mut context = Vec::new();
        for c in changes {
            let (t, p) = match c {
                ChangePeer::AddVoter(p) => (ConfChangeType::AddNode, p),
                ChangePeer::AddLearner(p) => (ConfChangeType::AddLearnerNode, p),
                ChangePeer::Remove(p) => (ConfChangeType::RemoveNode, p),
            };
            let mut single = raft::eraftpb::ConfChangeSingle::default();
            single.set_change_type(t);
            single.node_id = p.id;
            cc.changes.push(single);
            // The context carries the store of each peer, which Raft itself does not know.
            context.extend_from_slice(&p.id.to_be_bytes());
            context.extend_from_slice(&p.store_id.to_be_bytes());
        }
        cc.context = context.into();
        if let Err(e) = self.raw.propose_conf_change(vec![], cc) {
            return Err((
                Error::Storage(format!(
                    "Region {}: conf change refused: {e}",
                    self.region.id
                )),
                cb,
            ));
        }
        self.track_proposal(cb);
        Ok(())
    }

    /// Checks a split request on the leader (before asking PD for ids).
    pub fn check_split(&self, epoch: &RegionEpoch, keys: &[Vec<u8>]) -> Result<()> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.check_epoch(epoch)?;
        self.check_not_merging()?;
        split::check_split_keys(&self.region, keys)
    }

    /// Proposes a batch split. The callback hears the resulting Regions once it is applied.
    pub fn propose_split(
        &mut self,
        epoch: &RegionEpoch,
        keys: &[Vec<u8>],
        ids: &[SplitIds],
        cb: SplitCallback,
    ) {
        self.wake();
        if let Err(e) = self.check_split(epoch, keys) {
            return cb(Err(e));
        }
        let batch = match split::batch_split(&self.region, keys, ids) {
            Ok(b) => b,
            Err(e) => return cb(Err(e)),
        };
        // The epoch is checked again at apply, so the Regions it produces are these.
        let regions = match split::split_regions(&self.region, &batch) {
            Ok(r) => r,
            Err(e) => return cb(Err(e)),
        };
        let cmd = RaftCmdRequest {
            region_id: self.region.id,
            region_epoch: self.region.region_epoch,
            split: Some(batch),
            ..Default::default()
        };
        let data = cmd.encode_to_vec();
        if data.len() as u64 > self.cfg.raft_entry_max_size {
            return cb(Err(Error::RaftEntryTooLarge {
                region_id: self.region.id,
                entry_size: data.len() as u64,
            }));
        }
        if self.proposals.writes() >= MAX_PENDING_PROPOSALS {
            return cb(Err(Error::ServerIsBusy {
                reason: format!("Region {} has too many pending proposals", self.region.id),
            }));
        }
        if self.raw.propose(vec![], data).is_err() {
            return cb(Err(self.not_leader()));
        }
        tracing::info!(
            region_id = self.region.id,
            pieces = regions.len(),
            "split proposed"
        );
        self.track_proposal(Box::new(move |res| cb(res.map(|()| regions))));
    }

    /// Remembers the entry just proposed, so its callback runs when it is applied.
    fn track_proposal(&mut self, cb: WriteCallback) {
        self.track_writes(1, cb);
    }

    /// Remembers the entry just proposed, carrying `writes` client writes.
    fn track_writes(&mut self, writes: usize, cb: WriteCallback) {
        self.proposals.push_back(Proposal {
            index: self.raw.raft.raft_log.last_index(),
            term: self.term(),
            writes,
            cb,
            proposed_at: Instant::now(),
        });
    }

    fn lease_valid(&self, now: Instant) -> bool {
        self.readable_until().is_some_and(|t| now < t)
    }

    /// Until when this peer may serve reads from its lease, whatever the time now: it leads,
    /// holds a lease of its term, has applied an entry of that term (so everything committed
    /// before is applied), and is handing its leadership to nobody.
    fn readable_until(&self) -> Option<Instant> {
        if self.is_leader()
            && self.lease_term == self.term()
            && self.applied_term == self.term()
            && self.transferring_to().is_none()
            && self.transfer_term != self.term()
        {
            self.lease_until
        } else {
            None
        }
    }

    /// Starts handing leadership to `to`. The lease ends now: the transferee campaigns at
    /// once, and followers do not refuse a transfer's votes for having heard from us.
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
        self.note_transfer();
    }

    /// Records that a transfer is in progress (started here, or forwarded by a follower and
    /// stepped): the lease ends, and no confirmation requested before now may renew it.
    pub fn note_transfer(&mut self) {
        if self.transferring_to().is_some() {
            self.lease_until = None;
            self.lease_fence = Some(Instant::now());
            self.transfer_term = self.term();
            self.publish_reads();
        }
    }

    /// Hands this peer its delegate for local reads ([`super::local_read`]) and publishes.
    pub fn set_read_delegate(&mut self, d: Arc<ReadDelegate>) {
        self.delegate = Some(d);
        self.published = None;
        self.publish_reads();
    }

    /// Publishes what readers on other threads may do, if it changed. Called by the store
    /// after every change that can end or move the right to read (see `local_read`).
    pub fn publish_reads(&mut self) {
        let Some(d) = &self.delegate else {
            return;
        };
        let readable = if self.check_not_merging().is_ok() {
            self.readable_until()
        } else {
            None
        };
        let epoch = self.region.region_epoch.unwrap_or_default();
        let now = readable.map(|until| PublishedRead {
            until,
            term: self.term(),
            version: epoch.version,
            conf_ver: epoch.conf_ver,
            engine: Arc::as_ptr(&self.engine) as *const () as usize,
        });
        if now == self.published {
            return;
        }
        self.published = now;
        d.publish(readable.map(|until| Readable {
            until,
            term: self.term(),
            region: self.region.clone(),
            engine: self.engine.clone(),
        }));
    }

    fn snapshot(&self) -> RegionSnapshot {
        RegionSnapshot {
            snap: self.engine.snapshot(),
            region: self.region.clone(),
            term: self.term(),
        }
    }

    /// Starts a linearizable read.
    pub fn read(&mut self, epoch: &RegionEpoch, cb: ReadCallback) {
        self.wake();
        if !self.is_leader() {
            return cb(Err(self.not_leader()));
        }
        if let Err(e) = self.check_not_merging() {
            return cb(Err(e));
        }
        if let Err(e) = self.check_epoch(epoch) {
            return cb(Err(e));
        }
        if self.lease_valid(Instant::now()) {
            return cb(Ok(self.snapshot()));
        }
        if self.reads.len() >= MAX_PENDING_READS {
            return cb(Err(Error::ServerIsBusy {
                reason: format!("Region {} has too many pending reads", self.region.id),
            }));
        }
        self.reads.push_back(PendingRead {
            batch: 0,
            cb,
            issued_at: None,
            read_index: None,
            ticks: 0,
        });
        self.maybe_issue_reads();
    }

    /// Sends one ReadIndex request covering every read not yet issued. raft-rs drops ReadIndex
    /// requests of a leader that has not committed in its term, so they wait for that.
    fn maybe_issue_reads(&mut self) {
        if !self.is_leader() || !self.raw.raft.commit_to_current_term() {
            return;
        }
        if !self.reads.iter().any(|r| r.issued_at.is_none()) {
            return;
        }
        let batch = self.next_read_batch;
        self.next_read_batch += 1;
        let now = Instant::now();
        for r in self.reads.iter_mut().filter(|r| r.issued_at.is_none()) {
            r.batch = batch;
            r.issued_at = Some(now);
        }
        self.raw.read_index(batch.to_be_bytes().to_vec());
    }

    /// Handles confirmed ReadIndex rounds.
    pub fn on_read_states(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            let batch = u64::from_be_bytes(bytes);
            let mut issued = None;
            for r in self.reads.iter_mut().filter(|r| r.batch == batch) {
                r.read_index = Some(rs.index);
                issued = r.issued_at;
            }
            // A quorum confirmed leadership as of the request: the lease runs from then.
            if let Some(at) = issued {
                if self.is_leader() {
                    self.renew_lease(at);
                }
            }
        }
        self.serve_reads();
        self.publish_reads();
    }

    fn renew_lease(&mut self, from: Instant) {
        self.note_transfer();
        if self.transferring_to().is_some()
            || self.lease_fence.is_some_and(|f| from <= f)
            || self.transfer_term == self.term()
        {
            return;
        }
        let until = from + self.cfg.lease;
        if self.lease_term != self.term() {
            self.lease_term = self.term();
            self.lease_until = Some(until);
        } else {
            self.lease_until = Some(self.lease_until.map_or(until, |t| t.max(until)));
        }
    }

    /// Answers reads whose read index has been applied.
    fn serve_reads(&mut self) {
        while let Some(r) = self.reads.front() {
            match r.read_index {
                Some(idx) if idx <= self.applied_index => {
                    let r = self.reads.pop_front().expect("front exists");
                    (r.cb)(Ok(self.snapshot()));
                }
                _ => break,
            }
        }
    }

    /// Called after each Ready round: notices leadership changes.
    pub fn on_role_maybe_changed(&mut self) {
        let leader = self.is_leader();
        // Elected: the term usually changed a round earlier, when this peer became a candidate,
        // so a new term alone does not tell.
        let elected = leader && (self.term() != self.last_term || !self.was_leader);
        self.was_leader = leader;
        if elected {
            // PD routes clients: tell it at once, not at the next heartbeat tick.
            self.pd_dirty = true;
            tracing::debug!(
                region_id = self.region.id,
                term = self.term(),
                "became leader"
            );
        }
        if self.term() != self.last_term || !leader {
            self.last_term = self.term();
            // A PrepareMerge proposed in an older term either applies (and freezes the Region
            // on every replica) or was dropped; either way the fence is no longer ours.
            self.merge_proposed = false;
            if !self.is_leader() {
                self.lease_until = None;
                for r in self.reads.drain(..) {
                    (r.cb)(Err(Error::NotLeader {
                        region_id: self.region.id,
                        leader: None,
                    }));
                }
            }
        }
        self.maybe_issue_reads();
        self.publish_reads();
    }

    /// This leader's report to PD; `None` on followers.
    pub fn heartbeat(&self) -> Option<RegionHeartbeat> {
        if !self.is_leader() {
            return None;
        }
        let committed = self.raw.raft.raft_log.committed;
        let pending_peers = self
            .region
            .peers
            .iter()
            .filter(|p| p.id != self.meta.id)
            .filter(|p| {
                self.raw
                    .raft
                    .prs()
                    .get(p.id)
                    .is_none_or(|pr| pr.matched == 0 || pr.matched + PENDING_LAG < committed)
            })
            .copied()
            .collect();
        Some(RegionHeartbeat {
            region: self.region.clone(),
            leader: self.meta,
            term: self.term(),
            pending_peers,
            approximate_size: self.engine.approximate_size().unwrap_or(0),
            approximate_keys: self.approximate_keys(),
        })
    }

    /// The engine's estimate of this Region's keys, counted exactly when it is small: the
    /// estimate counts keys deleted since the last flush (and a split-born tablet's keys
    /// outside its range until it is trimmed), so an emptied Region would look as full as it
    /// was, and PD's merge checker, which looks for nearly empty Regions, would never pick it.
    fn approximate_keys(&self) -> u64 {
        let estimate = self.engine.approximate_keys().unwrap_or(0);
        if estimate > EXACT_KEY_COUNT_BELOW {
            return estimate;
        }
        self.engine
            .count_keys(EXACT_KEY_COUNT_BELOW)
            .unwrap_or(estimate)
    }

    /// Drives Raft's clock. Returns whether the peer did anything beyond ticking.
    pub fn tick(&mut self) {
        self.raw.tick();
        let timeout = self.cfg.election_tick * 2;
        let mut expired = Vec::new();
        for (i, r) in self.reads.iter_mut().enumerate() {
            r.ticks += 1;
            if r.ticks > timeout {
                expired.push(i);
            }
        }
        for i in expired.into_iter().rev() {
            if let Some(r) = self.reads.remove(i) {
                (r.cb)(Err(Error::ReadIndexTimeout {
                    region_id: self.region.id,
                }));
            }
        }
        self.count_idle_tick();
    }

    /// A leader with nothing in flight for two election timeouts tells its followers to
    /// hibernate and stops ticking itself; followers hibernate when told. Any message, write
    /// or read wakes the peer. A follower whose leader's store falls silent is woken by the
    /// store (see `store.rs`), so a hibernated Region still fails over.
    fn count_idle_tick(&mut self) {
        if !self.cfg.hibernate || !self.is_leader() {
            return;
        }
        let r = &self.raw.raft;
        let last = r.raft_log.last_index();
        let busy = !self.proposals.is_empty()
            || !self.reads.is_empty()
            || r.raft_log.committed != last
            || self.applied_index != last
            || r.prs()
                .iter()
                .any(|(id, pr)| *id != self.meta.id && pr.matched != last);
        if busy {
            self.idle_ticks = 0;
        } else {
            self.idle_ticks += 1;
        }
    }

    /// Whether the leader has been idle long enough to hibernate (see `count_idle_tick`).
    pub fn wants_hibernate(&self) -> bool {
        self.cfg.hibernate
            && self.is_leader()
            && self.idle_ticks >= self.cfg.election_tick * 2
            && !self.hibernated
    }

    /// Applies committed entries: data and apply state in one engine write, then callbacks.
    pub fn apply(&mut self, entries: Vec<Entry>) -> Result<ApplyOutcome> {
        let mut outcome = ApplyOutcome::default();
        let mut wb = WriteBatch::new();
        let mut results: Vec<(u64, u64, Option<Error>)> = Vec::new();
        let mut last = None;
        let mut entries = entries.into_iter();
        while let Some(e) = entries.next() {
            if e.index <= self.applied_index {
                continue; // replayed after a restart, already in the engine
            }
            self.applied_bytes += e.data.len() as u64;
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let mut err = None;
                    if !e.data.is_empty() {
                        // A malformed entry would apply differently nowhere (every replica
                        // decodes the same bytes), but it means corruption: stop, do not guess.
                        let cmd = RaftCmdRequest::decode(e.data.as_ref()).unwrap_or_else(|err| {
                            panic!(
                                "Region {}: entry {} is not a RaftCmdRequest: {err}",
                                self.region.id, e.index
                            )
                        });
                        let current = self.region.region_epoch.unwrap_or_default();
                        if let Some(batch) = &cmd.split {
                            if e.index <= self.conf_index {
                                // Replayed after a restart: the split was persisted with it.
                                results.push((e.index, e.term, None));
                                last = Some((e.index, e.term));
                                continue;
                            }
                            // Data before the split must be in the parent's engine when the
                            // children's engines are made from it.
                            self.flush_apply(
                                &mut wb,
                                e.index - 1,
                                prev_term(last, self.applied_term),
                            )?;
                            match self.apply_split(e.index, e.term, cmd.region_epoch, batch) {
                                Ok(children) => {
                                    outcome.split.extend(children);
                                    outcome.region_changed = true;
                                    self.pd_dirty = true;
                                }
                                Err(er) => err = Some(er),
                            }
                        } else if cmd.prepare_merge.is_some()
                            || cmd.commit_merge.is_some()
                            || cmd.rollback_merge.is_some()
                        {
                            if e.index <= self.conf_index {
                                // Replayed after a restart: persisted with the Region state.
                                results.push((e.index, e.term, None));
                                last = Some((e.index, e.term));
                                continue;
                            }
                            // Like a split, a merge command changes the Region: what came
                            // before is written first.
                            self.flush_apply(
                                &mut wb,
                                e.index - 1,
                                prev_term(last, self.applied_term),
                            )?;
                            if let Some(cm) = cmd.commit_merge {
                                outcome.commit_merge = Some(PendingCommitMerge {
                                    index: e.index,
                                    term: e.term,
                                    cmd: cm,
                                    rest: entries.collect(),
                                });
                                break;
                            }
                            let res = match (&cmd.prepare_merge, &cmd.rollback_merge) {
                                (Some(pm), _) => {
                                    self.merge_proposed = false;
                                    self.apply_prepare_merge(e.index, cmd.region_epoch, pm)
                                }
                                (_, Some(rb)) => self.apply_rollback_merge(e.index, rb),
                                _ => unreachable!("one of the merge commands is set"),
                            };
                            match res {
                                Ok(()) => {
                                    outcome.region_changed = true;
                                    self.pd_dirty = true;
                                }
                                Err(er) => err = Some(er),
                            }
                        } else if cmd.compact_log_index > 0 {
                            let c = outcome.compact_to.get_or_insert(0);
                            *c = (*c).max(cmd.compact_log_index);
                        } else if cmd.term_fence != 0 && cmd.term_fence != e.term {
                            err = Some(Error::StaleCommand {
                                region_id: self.region.id,
                                term: cmd.term_fence,
                            });
                        } else if cmd.region_epoch.as_ref().map_or(0, |ep| ep.version)
                            != current.version
                        {
                            err = Some(Error::EpochNotMatch {
                                current_regions: vec![self.region.clone()],
                            });
                        } else {
                            for m in &cmd.mutations {
                                self.split_check_bytes += (m.key.len() + m.value.len()) as u64;
                                self.split_check_keys += 1;
                            }
                            apply_mutations(&mut wb, &cmd.mutations);
                        }
                    }
                    results.push((e.index, e.term, err));
                }
                EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                    // Data before the change must be durable in order with it.
                    self.flush_apply(&mut wb, e.index - 1, prev_term(last, self.applied_term))?;
                    let removed = self.apply_conf_change(&e)?;
                    outcome.region_changed = true;
                    self.pd_dirty = true;
                    results.push((e.index, e.term, None));
                    if removed {
                        // Nothing after our own removal concerns this replica.
                        outcome.removed = true;
                        last = Some((e.index, e.term));
                        break;
                    }
                }
            }
            last = Some((e.index, e.term));
        }
        if let Some((index, term)) = last {
            self.flush_apply(&mut wb, index, term)?;
        }
        let now_leader = self.is_leader();
        for (index, term, err) in results {
            while let Some(p) = self.proposals.front() {
                if p.index > index {
                    break;
                }
                let p = self.proposals.pop_front().expect("front exists");
                if p.index == index && p.term == term {
                    if err.is_none() && now_leader && term == self.term() {
                        let from = p.proposed_at;
                        self.renew_lease(from);
                    }
                    (p.cb)(err.clone().map_or(Ok(()), Err));
                } else {
                    (p.cb)(Err(Error::StaleCommand {
                        region_id: self.region.id,
                        term: p.term,
                    }));
                }
            }
        }
        self.serve_reads();
        // Before the store creates split Regions or takes in a merge (`local_read`).
        self.publish_reads();
        Ok(outcome)
    }

    /// Applies a batch split at log index `index`: creates the children's engines from this
    /// Region's, records the new Regions and the children's initial Raft state in one synced
    /// raft-engine write, and narrows this Region. A split whose epoch or keys no longer fit is
    /// an error for the proposer and changes nothing (every replica decides the same way).
    fn apply_split(
        &mut self,
        index: u64,
        term: u64,
        epoch: Option<RegionEpoch>,
        batch: &prkv_proto::serverpb::BatchSplit,
    ) -> Result<Vec<(Region, Arc<dyn RegionEngine>)>> {
        let current = self.region.region_epoch.unwrap_or_default();
        let epoch = epoch.unwrap_or_default();
        if epoch.version != current.version || epoch.conf_ver != current.conf_ver {
            return Err(Error::EpochNotMatch {
                current_regions: vec![self.region.clone()],
            });
        }
        let regions = split::split_regions(&self.region, batch)?;
        let mut children = Vec::new();
        for r in &regions[1..] {
            // A child this store already knows (a replica of it was created here and later
            // destroyed, recorded by a tombstone) must not come back from an old split.
            if let Some(state) = self.log.region_state(r.id)? {
                tracing::warn!(
                    region_id = self.region.id,
                    child = r.id,
                    state = state.state,
                    "split child already known on this store; not creating it"
                );
                continue;
            }
            children.push(r.clone());
        }
        let init = RaftApplyState {
            applied_index: RAFT_INIT_LOG_INDEX,
            applied_term: RAFT_INIT_LOG_TERM,
            ..Default::default()
        };
        let specs: Vec<(u64, KeyRange)> = children
            .iter()
            .map(|r| (r.id, KeyRange::new(r.start_key.clone(), r.end_key.clone())))
            .collect();
        let engines = self.kv.split_region(self.region.id, &specs, &init)?;
        let mut lb = LogWriteBatch::new();
        for r in &children {
            lb.put_region_state(
                r.id,
                &RegionLocalState {
                    state: PeerState::Normal as i32,
                    region: Some(r.clone()),
                    tablet_index: RAFT_INIT_LOG_INDEX,
                    destroyed_peer_id: 0,
                    conf_index: RAFT_INIT_LOG_INDEX,
                    merge_state: None,
                },
            )?;
            let hs = raft::eraftpb::HardState {
                term: RAFT_INIT_LOG_TERM,
                commit: RAFT_INIT_LOG_INDEX,
                ..Default::default()
            };
            lb.put_hard_state(r.id, &hs)?;
            lb.compact_to(r.id, RAFT_INIT_LOG_INDEX, RAFT_INIT_LOG_TERM)?;
        }
        let parent = regions[0].clone();
        lb.put_region_state(
            parent.id,
            &RegionLocalState {
                state: PeerState::Normal as i32,
                region: Some(parent.clone()),
                tablet_index: self.engine.tablet_index(),
                destroyed_peer_id: 0,
                conf_index: index,
                merge_state: None,
            },
        )?;
        crate::crash_point!("split_before_region_states");
        // Durability boundary: the children exist and the parent is narrowed, or neither.
        self.log.write(&mut lb, true)?;
        self.engine = self.kv.open_region(
            parent.id,
            KeyRange::new(parent.start_key.clone(), parent.end_key.clone()),
            self.engine.tablet_index(),
        )?;
        assert_eq!(
            self.engine.range().end,
            parent.end_key,
            "Region {}: engine range not narrowed by the split",
            parent.id
        );
        self.region = parent;
        self.conf_index = index;
        self.applied_index = index;
        self.applied_term = term;
        self.split_check_bytes = 0;
        self.split_check_keys = 0;
        crate::metrics::SPLITS.inc();
        tracing::info!(
            region_id = self.region.id,
            index,
            children = ?children.iter().map(|r| r.id).collect::<Vec<_>>(),
            "split applied"
        );
        Ok(children.into_iter().zip(engines).collect())
    }

    /// Checks a merge of this Region (the source) into `target` against the Regions as they
    /// are: adjacent, with replicas on the same stores, all voters. The same check runs on
    /// the leader before proposing and on every replica when the PrepareMerge applies (with
    /// the target the leader recorded), so every replica decides alike.
    fn check_merge_target(&self, target: &Region) -> Result<()> {
        let s = &self.region;
        let adjacent = (!s.end_key.is_empty() && s.end_key == target.start_key)
            || (!target.end_key.is_empty() && target.end_key == s.start_key);
        if !adjacent {
            return Err(Error::InvalidMerge(format!(
                "Regions {} and {} are not adjacent",
                s.id, target.id
            )));
        }
        let stores = |r: &Region| {
            let mut v: Vec<(u64, bool)> = r
                .peers
                .iter()
                .map(|p| (p.store_id, p.role == PeerRole::Voter as i32))
                .collect();
            v.sort_unstable();
            v
        };
        let (a, b) = (stores(s), stores(target));
        if a != b || a.iter().any(|(_, voter)| !voter) {
            return Err(Error::InvalidMerge(format!(
                "replicas of Regions {} and {} are not on the same stores as voters",
                s.id, target.id
            )));
        }
        Ok(())
    }

    /// Proposes freezing this Region for a merge into `target` (this store's replica of the
    /// target, so that the leader here can later propose the CommitMerge on it).
    pub fn propose_prepare_merge(&mut self, target: &Region, cb: WriteCallback) {
        self.wake();
        if !self.is_leader() {
            return cb(Err(self.not_leader()));
        }
        if let Err(e) = self.check_not_merging() {
            return cb(Err(e));
        }
        if let Err(e) = self.check_merge_target(target) {
            return cb(Err(e));
        }
        // Every replica must hold the log from `min_index` on (the CommitMerge carries the
        // entries after it for the ones that lag), and the target carries them in one entry:
        // so every replica must be close behind.
        let last = self.raw.raft.raft_log.last_index();
        let truncated = self.raw.store().truncated().0;
        let min_index = self
            .raw
            .raft
            .prs()
            .iter()
            .map(|(_, pr)| pr.matched)
            .min()
            .unwrap_or(0);
        if min_index < truncated || min_index == 0 || last - min_index > MAX_MERGE_CATCH_UP {
            return cb(Err(Error::InvalidMerge(format!(
                "Region {}: a replica lags (matched {min_index}, last {last}, truncated {truncated})",
                self.region.id
            ))));
        }
        // The CommitMerge carries these entries in one Raft entry: one that could not be
        // proposed (`RaftEntryTooLarge`) would leave the source frozen for good, since
        // `min_index` never changes once prepared. Nine tenths of the limit leave room for the
        // CommitMerge's own fields and encoding.
        let carried = match self.raw.raft.raft_log.entries(
            min_index + 1,
            None,
            raft::GetEntriesContext::empty(false),
        ) {
            Ok(es) => es
                .iter()
                .map(|e| e.data.len() as u64 + e.context.len() as u64 + 32)
                .sum::<u64>(),
            Err(e) => {
                return cb(Err(Error::InvalidMerge(format!(
                    "Region {}: reading the entries a merge would carry: {e}",
                    self.region.id
                ))))
            }
        };
        if carried > self.cfg.raft_entry_max_size / 10 * 9 {
            return cb(Err(Error::InvalidMerge(format!(
                "Region {}: the entries after {min_index} ({carried} bytes) would not fit one \
                 CommitMerge under raftstore.raft-entry-max-size; a replica lags",
                self.region.id
            ))));
        }
        let cmd = RaftCmdRequest {
            region_id: self.region.id,
            region_epoch: self.region.region_epoch,
            prepare_merge: Some(PrepareMerge {
                min_index,
                target: Some(target.clone()),
            }),
            ..Default::default()
        };
        if self.raw.propose(vec![], cmd.encode_to_vec()).is_err() {
            return cb(Err(self.not_leader()));
        }
        self.merge_proposed = true;
        self.publish_reads();
        tracing::info!(
            region_id = self.region.id,
            target = target.id,
            min_index,
            "merge prepared (proposed)"
        );
        self.track_proposal(cb);
    }

    /// Proposes a merge admin command built by the store (CommitMerge on the target,
    /// RollbackMerge on the source).
    pub fn propose_merge_admin(&mut self, mut cmd: RaftCmdRequest, cb: WriteCallback) {
        self.wake();
        if !self.is_leader() {
            return cb(Err(self.not_leader()));
        }
        cmd.region_id = self.region.id;
        cmd.region_epoch = self.region.region_epoch;
        let data = cmd.encode_to_vec();
        if data.len() as u64 > self.cfg.raft_entry_max_size {
            return cb(Err(Error::RaftEntryTooLarge {
                region_id: self.region.id,
                entry_size: data.len() as u64,
            }));
        }
        if self.raw.propose(vec![], data).is_err() {
            return cb(Err(self.not_leader()));
        }
        self.track_proposal(cb);
    }

    /// Applies a PrepareMerge: the Region is frozen (state Merging, version and conf_ver bumped
    /// so that every request or command made against the old epoch fails).
    fn apply_prepare_merge(
        &mut self,
        index: u64,
        epoch: Option<RegionEpoch>,
        pm: &PrepareMerge,
    ) -> Result<()> {
        let current = self.region.region_epoch.unwrap_or_default();
        let epoch = epoch.unwrap_or_default();
        if epoch.version != current.version || epoch.conf_ver != current.conf_ver {
            return Err(Error::EpochNotMatch {
                current_regions: vec![self.region.clone()],
            });
        }
        if self.merge_state.is_some() {
            return Err(Error::ProposalInMergingMode(self.region.id));
        }
        let target = pm
            .target
            .clone()
            .ok_or_else(|| Error::InvalidMerge("PrepareMerge without a target".into()))?;
        self.check_merge_target(&target)?;
        let mut region = self.region.clone();
        region.region_epoch = Some(RegionEpoch {
            version: current.version + 1,
            conf_ver: current.conf_ver + 1,
        });
        let ms = MergeState {
            min_index: pm.min_index,
            target: Some(target),
            commit: index,
        };
        self.persist_region(&region, PeerState::Merging, Some(ms.clone()), index)?;
        self.region = region;
        self.merge_state = Some(ms);
        // `apply` records the entry as applied (in the engine, unflushed) when its batch ends.
        tracing::info!(region_id = self.region.id, index, "merge prepared");
        Ok(())
    }

    /// Applies a RollbackMerge: the merge prepared at `commit` is off, the Region takes writes
    /// again (with a new version, so that nothing made against the frozen epoch applies).
    fn apply_rollback_merge(&mut self, index: u64, rb: &RollbackMerge) -> Result<()> {
        if self.merge_state.as_ref().map(|m| m.commit) != Some(rb.commit) {
            return Err(Error::InvalidMerge(format!(
                "Region {}: no merge prepared at {} to roll back",
                self.region.id, rb.commit
            )));
        }
        let mut region = self.region.clone();
        let mut epoch = region.region_epoch.unwrap_or_default();
        epoch.version += 1;
        region.region_epoch = Some(epoch);
        self.persist_region(&region, PeerState::Normal, None, index)?;
        self.region = region;
        self.merge_state = None;
        tracing::info!(region_id = self.region.id, index, "merge rolled back");
        Ok(())
    }

    /// Takes in a merged source (by the store, which checked and moved its data): this Region
    /// becomes `merged` with `engine`, as of the CommitMerge at `index`, durably.
    pub fn finish_commit_merge(
        &mut self,
        merged: Region,
        engine: Arc<dyn RegionEngine>,
        index: u64,
        term: u64,
        result: Result<()>,
    ) {
        if result.is_ok() {
            self.region = merged;
            self.engine = engine;
            self.conf_index = index;
            self.pd_dirty = true;
            self.split_check_bytes = u64::MAX / 2;
            self.split_check_keys = u64::MAX / 2;
        }
        self.applied_index = index;
        self.applied_term = term;
        while let Some(p) = self.proposals.front() {
            if p.index > index {
                break;
            }
            let p = self.proposals.pop_front().expect("front exists");
            if p.index == index && p.term == term {
                (p.cb)(result.clone());
            } else {
                (p.cb)(Err(Error::StaleCommand {
                    region_id: self.region.id,
                    term: p.term,
                }));
            }
        }
    }

    /// The Region state this replica persists, as of log index `conf_index`.
    pub fn region_state(
        &self,
        region: &Region,
        state: PeerState,
        merge_state: Option<MergeState>,
        conf_index: u64,
    ) -> RegionLocalState {
        RegionLocalState {
            state: state as i32,
            region: Some(region.clone()),
            tablet_index: self.engine.tablet_index(),
            destroyed_peer_id: 0,
            conf_index,
            merge_state,
        }
    }

    fn persist_region(
        &mut self,
        region: &Region,
        state: PeerState,
        merge_state: Option<MergeState>,
        index: u64,
    ) -> Result<()> {
        // Durable through the entry *before* this one, not this one: a crash between the
        // engine's flush and the raft-engine write below must leave this entry to be replayed
        // (under the old Region state, which it was made against). Once the new state is
        // written, its `conf_index` tells a replay that the entry is done.
        assert_eq!(
            self.applied_index,
            index - 1,
            "Region {}: a Region state change at {index} applied out of order",
            self.region.id
        );
        self.make_durable_through(index - 1, self.applied_term)?;
        crate::crash_point!("merge_before_region_state");
        let rs = self.region_state(region, state, merge_state, index);
        let mut lb = LogWriteBatch::new();
        lb.put_region_state(region.id, &rs)?;
        // Durability boundary: the Region's new state is on disk before anyone acts on it.
        self.log.write(&mut lb, true)?;
        self.conf_index = index;
        Ok(())
    }

    /// Takes in a snapshot that the store installed: the Region, its engine and the applied
    /// position all jump to the snapshot's.
    pub fn on_snapshot_installed(
        &mut self,
        region: Region,
        engine: Arc<dyn RegionEngine>,
        index: u64,
        term: u64,
    ) {
        self.raw
            .store()
            .restore(index, term, crate::raftlog::conf_state_from_region(&region));
        if let Some(me) = region.peers.iter().find(|p| p.id == self.meta.id) {
            self.meta = *me;
        }
        self.epoch_from = region.region_epoch.unwrap_or_default();
        self.region = region;
        self.engine = engine;
        self.applied_index = index;
        self.applied_term = term;
        self.conf_index = index;
        self.split_check_bytes = u64::MAX / 2;
        self.split_check_keys = u64::MAX / 2;
    }

    /// Whether this replica moved past `epoch` by applying its own log: it held `epoch` or an
    /// older one in this process, and every change since was an entry it applied. Then every
    /// entry made against `epoch` that was ordered before the change was applied here.
    pub fn applied_past_by_log(&self, epoch: Option<RegionEpoch>) -> bool {
        let (now, from, e) = (
            self.region.region_epoch.unwrap_or_default(),
            self.epoch_from,
            epoch.unwrap_or_default(),
        );
        let passed = (now.version > e.version || now.conf_ver > e.conf_ver)
            && now.version >= e.version
            && now.conf_ver >= e.conf_ver;
        passed && from.version <= e.version && from.conf_ver <= e.conf_ver
    }

    /// Makes the engine durable through `index` (its apply state says so, on disk) before a
    /// Region state persisted at `index` changes the epoch or the merge state.
    ///
    /// A restart replays the log from the engine's durable apply index under the Region state
    /// it finds in raft-engine. An entry made against an older state (an older epoch, or before
    /// a PrepareMerge froze the Region) is refused there; its writes, which were in memtables
    /// only, would be lost. So no replay may cross a Region-state change. (Before this, a
    /// crash right after a PrepareMerge lost the source's last writes, and the merge copied
    /// their old values, or deleted keys, into the target.)
    pub(crate) fn make_durable_through(&mut self, index: u64, term: u64) -> Result<()> {
        // The apply state is written even if this peer counts `index` as applied already: a
        // membership change (or an entry skipped on replay) advances `applied_index` without
        // writing it, and the engine's own apply state may then be below `index`. (An
        // assertion below caught that: a PrepareMerge right after a membership change.)
        let mut wb = WriteBatch::new();
        if index >= self.applied_index {
            wb.set_apply_state(RaftApplyState {
                applied_index: index,
                applied_term: term,
                ..Default::default()
            });
            self.engine.write(&wb)?;
            self.applied_index = index;
            self.applied_term = term;
        }
        if self.kv.kind() == crate::config::EngineKind::PartitionedRaftKv {
            crate::metrics::TABLET_FLUSHES
                .with_label_values(&["region_state"])
                .inc();
            self.engine.flush(true)?;
        }
        // Tablets: what the flushed SSTs hold; raft-kv: the shared WAL, synced.
        let durable = self
            .engine
            .persisted_apply_state()?
            .map_or(0, |s| s.applied_index);
        assert!(
            durable >= index,
            "Region {}: engine durable through {durable}, not {index}, at a Region state change",
            self.region.id
        );
        Ok(())
    }

    /// Writes `wb` with the apply state `index`/`term`, if anything moved. `term` must be the
    /// term of the entry at `index`: a snapshot made at this apply state carries it, and a
    /// follower whose log disagrees with it at `index` would reject every append after it.
    fn flush_apply(&mut self, wb: &mut WriteBatch, index: u64, term: u64) -> Result<()> {
        if index <= self.applied_index && wb.is_empty() {
            return Ok(());
        }
        let index = index.max(self.applied_index);
        wb.set_apply_state(RaftApplyState {
            applied_index: index,
            applied_term: term,
            ..Default::default()
        });
        self.engine.write(wb)?;
        wb.clear();
        self.applied_index = index;
        self.applied_term = term;
        Ok(())
    }

    /// Applies a membership change to Raft and to the Region, and persists the Region.
    /// Returns whether this replica was removed.
    fn apply_conf_change(&mut self, e: &Entry) -> Result<bool> {
        if e.index <= self.conf_index {
            // Our Region (taken from the leader that created this replica) already has it.
            self.applied_index = e.index;
            self.applied_term = e.term;
            return Ok(false);
        }
        let cc = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            let mut cc = ConfChangeV2::default();
            cc.merge_from_bytes(e.data.as_ref()).unwrap_or_else(|err| {
                panic!(
                    "Region {}: bad conf change at {}: {err}",
                    self.region.id, e.index
                )
            });
            cc
        } else {
            let mut v1 = raft::eraftpb::ConfChange::default();
            v1.merge_from_bytes(e.data.as_ref()).unwrap_or_else(|err| {
                panic!(
                    "Region {}: bad conf change at {}: {err}",
                    self.region.id, e.index
                )
            });
            // We only propose V2; a V1 entry converts to a one-change V2.
            let mut single = raft::eraftpb::ConfChangeSingle::default();
            single.set_change_type(v1.get_change_type());
            single.node_id = v1.node_id;
            let mut cc = ConfChangeV2::default();
            cc.changes.push(single);
            cc.context = v1.context;
            cc
        };
        let cs = self.raw.apply_conf_change(&cc).unwrap_or_else(|err| {
            panic!(
                "Region {}: conf change at {} failed: {err}",
                self.region.id, e.index
            )
        });
        self.raw.store().set_conf_state(cs.clone());
        // Store ids of added peers travel in the context as (peer id, store id) pairs.
        let mut stores = std::collections::HashMap::new();
        for pair in cc.context.chunks_exact(16) {
            let id = u64::from_be_bytes(pair[..8].try_into().expect("8 bytes"));
            let store = u64::from_be_bytes(pair[8..].try_into().expect("8 bytes"));
            stores.insert(id, store);
        }
        let known: std::collections::HashMap<u64, u64> = self
            .region
            .peers
            .iter()
            .map(|p| (p.id, p.store_id))
            .collect();
        let in_joint = !cs.voters_outgoing.is_empty();
        let mut ids: Vec<u64> = cs
            .voters
            .iter()
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners)
            .chain(&cs.learners_next)
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut peers = Vec::new();
        for id in ids {
            let role = if cs.learners.contains(&id) {
                PeerRole::Learner
            } else if in_joint && cs.voters.contains(&id) && !cs.voters_outgoing.contains(&id) {
                PeerRole::IncomingVoter
            } else if in_joint && !cs.voters.contains(&id) && cs.voters_outgoing.contains(&id) {
                PeerRole::DemotingVoter
            } else {
                PeerRole::Voter
            };
            let store_id = stores
                .get(&id)
                .or_else(|| known.get(&id))
                .copied()
                .unwrap_or(0);
            peers.push(PeerMeta {
                id,
                store_id,
                role: role as i32,
                is_witness: false,
            });
        }
        self.region.peers = peers;
        let mut epoch = self.region.region_epoch.unwrap_or_default();
        epoch.conf_ver += cc.changes.len().max(1) as u64;
        self.region.region_epoch = Some(epoch);
        let removed = !self.region.peers.iter().any(|p| p.id == self.meta.id);
        if let Some(me) = self.region.peers.iter().find(|p| p.id == self.meta.id) {
            self.meta = *me;
        }
        let state = RegionLocalState {
            state: if removed {
                PeerState::Tombstone
            } else {
                PeerState::Normal
            } as i32,
            region: Some(self.region.clone()),
            tablet_index: self.engine.tablet_index(),
            destroyed_peer_id: 0,
            conf_index: e.index,
            merge_state: None,
        };
        self.conf_index = e.index;
        let mut lb = LogWriteBatch::new();
        lb.put_region_state(self.region.id, &state)?;
        self.log.write(&mut lb, true)?;
        self.applied_index = e.index;
        self.applied_term = e.term;
        Ok(removed)
    }

    /// Proposes Raft-log GC when enough applied entries piled up: up to the lowest index every
    /// live replica has, so that a healthy follower never needs a snapshot. Each replica then
    /// compacts no further than its own durable apply index.
    pub fn maybe_propose_compact(&mut self, threshold: u64) {
        // A merging Region keeps its log: lagging replicas may need it (see `MergeState`). So
        // does one whose PrepareMerge is proposed but not applied yet: a compaction proposed
        // now would apply after it and cut the log below `min_index`, which the CommitMerge
        // must carry from (the merge would wait for ever).
        if !self.is_leader() || self.hibernated || self.merge_state.is_some() || self.merge_proposed
        {
            return;
        }
        let truncated = self.raw.store().truncated().0;
        if self.applied_index < truncated + threshold {
            return;
        }
        // Followers that answer hold GC back to what they have; one that stopped answering
        // (its store is down) does not, and will catch up from a snapshot.
        let min_matched = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, pr)| **id == self.meta.id || pr.recent_active)
            .map(|(_, pr)| pr.matched)
            .min()
            .unwrap_or(0);
        let target = self.applied_index.min(min_matched);
        if target <= truncated {
            return;
        }
        let cmd = RaftCmdRequest {
            region_id: self.region.id,
            compact_log_index: target,
            ..Default::default()
        };
        if self.raw.propose(vec![], cmd.encode_to_vec()).is_ok() {
            tracing::debug!(region_id = self.region.id, target, "proposed raft log GC");
        }
    }

    /// Compacts this replica's log up to `index`, but never above the engine's durable apply
    /// index: entries above it are the only copy of data not yet flushed (the recovery
    /// invariant).
    ///
    /// A tablet that holds GC back is flushed only once its log above the durable index passes
    /// `raftstore.raft-log-gc-count-limit` entries or `raft-log-gc-size-limit` bytes. Otherwise
    /// the log simply waits for the flush that memory pressure brings (`storage::flush`): a
    /// flush each GC round, as a first version did, cut every busy tablet's memtable into a
    /// small SST every few seconds, and compacting those doubled the write amplification of a
    /// write-heavy load spread over many Regions (BENCHMARKS.md). The limits, and raft-engine's
    /// purge (which flushes the tablets pinning its oldest files), bound the log meanwhile.
    pub fn compact_log(&mut self, index: u64) -> Result<()> {
        let durable = self
            .engine
            .persisted_apply_state()?
            .map_or(0, |s| s.applied_index);
        // A compaction ordered after a PrepareMerge (proposed before it by a leader that did
        // not know) stops at the merge's `min_index`: the CommitMerge carries the entries after
        // it from this log. `merge_state` is set in log order, so every replica cuts alike.
        let index = match &self.merge_state {
            Some(ms) => index.min(ms.min_index),
            None => index,
        };
        let target = index.min(durable);
        let behind_entries = self.applied_index.saturating_sub(durable);
        // An upper bound: the tablet is durable at least through the mark.
        let behind_bytes = self.applied_bytes - self.log_mark.1;
        if durable >= self.log_mark.0 {
            self.log_mark = (self.applied_index, self.applied_bytes);
        }
        if durable < index
            && (behind_entries > self.cfg.log_gc_count_limit
                || behind_bytes > self.cfg.log_gc_size_limit)
        {
            tracing::debug!(
                region_id = self.region.id,
                behind_entries,
                behind_bytes,
                "flushing the tablet: its unflushed log passed the GC limits"
            );
            crate::metrics::TABLET_FLUSHES
                .with_label_values(&["gc_limit"])
                .inc();
            self.engine.flush(false)?;
        }
        let truncated = self.raw.store().truncated().0;
        if target <= truncated {
            return Ok(());
        }
        let term = match self.log.entry(self.region.id, target)? {
            Some(e) => e.term,
            None => return Ok(()),
        };
        // TigerBeetle-style boundary check: what we drop must be durable in the engine.
        assert!(
            target <= durable,
            "Region {}: compacting to {target} above durable {durable}",
            self.region.id
        );
        let mut wb = LogWriteBatch::new();
        wb.compact_to(self.region.id, target, term)?;
        self.log.write(&mut wb, false)?;
        self.raw.store().set_truncated(target, term);
        Ok(())
    }

    /// Fails everything pending (the peer is being destroyed or the store stops).
    pub fn fail_all(&mut self, err: Error) {
        for p in self.proposals.drain() {
            (p.cb)(Err(err.clone()));
        }
        for r in self.reads.drain(..) {
            (r.cb)(Err(err.clone()));
        }
    }
}

fn cf_of(name: &str) -> Cf {
    match name {
        "lock" => Cf::Lock,
        "write" => Cf::Write,
        _ => Cf::Default,
    }
}

/// The term of the entry just before the one being applied: the last one this apply batch
/// went through, else the last one applied before it. (`applied_term` alone is wrong when the
/// batch's earlier entries, written but not yet recorded as applied, are of a newer term.)
fn prev_term(last: Option<(u64, u64)>, applied_term: u64) -> u64 {
    last.map_or(applied_term, |(_, term)| term)
}

fn apply_mutations(wb: &mut WriteBatch, mutations: &[Mutation]) {
    for m in mutations {
        let cf = cf_of(&m.cf);
        match mutation::Op::try_from(m.op).unwrap_or(mutation::Op::Put) {
            mutation::Op::Put => wb.put(cf, &m.key, &m.value),
            mutation::Op::Delete => wb.delete(cf, &m.key),
            mutation::Op::DeleteRange => wb.delete_range(cf, &m.key, &m.value),
        }
    }
}
