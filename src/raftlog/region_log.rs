//! A Region's Raft log as `raft::Storage`: what a `RawNode` reads.
//!
//! The log holds entries `first_index..=last_index`; everything up to the truncated index has
//! been compacted away and is represented only by its `(index, term)` pair, which Raft needs to
//! check the log-matching property of the next append. Writes never go through here: the store
//! writes [`super::LogWriteBatch`]es and then tells the view what changed
//! ([`RegionLog::set_hard_state`], ...), keeping raft-rs's Ready/advance discipline (the
//! storage a `RawNode` reads is only updated after its Ready was persisted).

use parking_lot::RwLock;
use prkv_proto::metapb::{PeerRole, Region};
use prkv_proto::serverpb::RaftTruncatedState;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::RaftLogStore;
use crate::storage::{Index, RegionId};

struct State {
    hard_state: HardState,
    conf_state: ConfState,
    truncated: RaftTruncatedState,
}

/// One Region's view of the shared log store.
pub struct RegionLog {
    region_id: RegionId,
    store: RaftLogStore,
    state: RwLock<State>,
    snap: std::sync::Arc<parking_lot::Mutex<SnapGen>>,
}

/// The leader's snapshot of this Region for followers that need one: Raft asks through
/// [`raft::Storage::snapshot`], the store generates it (see `raftstore/snap.rs`), and Raft's next
/// ask gets it.
#[derive(Default)]
pub struct SnapGen {
    /// Raft asked and no usable snapshot was ready.
    pub requested: bool,
    /// Being generated in the background (`raft-kv`): do not start another.
    pub generating: bool,
    pub ready: Option<Snapshot>,
}

/// The Raft configuration described by a Region's peers. Joint-consensus roles map to the
/// outgoing configuration as in TiKV: an `IncomingVoter` votes only in the new configuration, a
/// `DemotingVoter` only in the old one and becomes a learner after.
pub fn conf_state_from_region(region: &Region) -> ConfState {
    let mut cs = ConfState::default();
    let mut in_joint = false;
    for p in &region.peers {
        match PeerRole::try_from(p.role).unwrap_or(PeerRole::Voter) {
            PeerRole::Voter => {
                cs.voters.push(p.id);
                cs.voters_outgoing.push(p.id);
            }
            PeerRole::Learner => cs.learners.push(p.id),
            PeerRole::IncomingVoter => {
                in_joint = true;
                cs.voters.push(p.id);
            }
            PeerRole::DemotingVoter => {
                in_joint = true;
                cs.voters_outgoing.push(p.id);
                cs.learners_next.push(p.id);
            }
        }
    }
    if !in_joint {
        cs.voters_outgoing.clear();
    }
    cs
}

impl RegionLog {
    /// Loads the Region's log state from the store. A Region with no stored truncated state
    /// starts from an empty log at index 0.
    pub fn load(
        store: RaftLogStore,
        region_id: RegionId,
        region: &Region,
    ) -> crate::storage::Result<RegionLog> {
        let hard_state = store.hard_state(region_id)?.unwrap_or_default();
        let truncated = store.truncated_state(region_id)?.unwrap_or_default();
        let state = State {
            hard_state,
            conf_state: conf_state_from_region(region),
            truncated,
        };
        let log = RegionLog {
            region_id,
            store,
            state: RwLock::new(state),
            snap: Default::default(),
        };
        // Recovery assertion: the log must continue right after the truncated index.
        if let Some(first) = log.store.first_index(region_id) {
            let t = log.state.read().truncated.index;
            assert!(
                first <= t + 1,
                "Region {region_id}: log starts at {first} but is truncated only to {t}: entries are missing"
            );
        }
        Ok(log)
    }

    pub fn region_id(&self) -> RegionId {
        self.region_id
    }

    /// The hard state last handed to [`RegionLog::set_hard_state`].
    pub fn hard_state(&self) -> HardState {
        self.state.read().hard_state.clone()
    }

    /// Updates the cached hard state after it was persisted.
    pub fn set_hard_state(&self, hs: HardState) {
        self.state.write().hard_state = hs;
    }

    /// Updates the cached configuration after a conf change was applied.
    pub fn set_conf_state(&self, cs: ConfState) {
        self.state.write().conf_state = cs;
    }

    /// Updates the cached truncated state after a compaction was persisted.
    pub fn set_truncated(&self, index: Index, term: u64) {
        self.state.write().truncated = RaftTruncatedState { index, term };
    }

    /// The snapshot slot shared with whoever generates snapshots.
    pub fn snap_gen(&self) -> std::sync::Arc<parking_lot::Mutex<SnapGen>> {
        self.snap.clone()
    }

    /// Whether Raft asked for a snapshot that is not there yet (and clears the request).
    pub fn take_snap_request(&self) -> bool {
        let mut g = self.snap.lock();
        std::mem::take(&mut g.requested) && !g.generating
    }

    /// After a snapshot was installed: the log restarts after `index`.
    pub fn restore(&self, index: Index, term: u64, cs: ConfState) {
        let mut s = self.state.write();
        s.truncated = RaftTruncatedState { index, term };
        s.conf_state = cs;
    }

    pub fn truncated(&self) -> (Index, u64) {
        let s = self.state.read();
        (s.truncated.index, s.truncated.term)
    }

    fn last(&self) -> Index {
        let t = self.state.read().truncated.index;
        self.store
            .last_index(self.region_id)
            .map_or(t, |l| l.max(t))
    }
}

impl raft::Storage for RegionLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let s = self.state.read();
        Ok(RaftState::new(s.hard_state.clone(), s.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.state.read().truncated.index + 1;
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().map(|m| m as usize);
        self.store
            .entries(self.region_id, low, high, max)
            .map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (t_index, t_term) = self.truncated();
        if idx == t_index {
            return Ok(t_term);
        }
        if idx < t_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.store.entry(self.region_id, idx) {
            Ok(Some(e)) => Ok(e.term),
            Ok(None) => Err(raft::Error::Store(StorageError::Unavailable)),
            Err(e) => Err(raft::Error::Store(StorageError::Other(Box::new(e)))),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.state.read().truncated.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The ready snapshot if it is recent enough: at or after `request_index` and the log's
    /// truncated index (else the follower could not continue from it with log entries), and
    /// taken after `to` joined.
    /// Otherwise a request for the store, and "try again later" for Raft.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let truncated = self.state.read().truncated.index;
        let mut g = self.snap.lock();
        if let Some(s) = &g.ready {
            let md = s.get_metadata();
            let cs = md.get_conf_state();
            // A follower refuses a snapshot whose configuration does not name it (it was
            // added after the snapshot was taken).
            let names_to = cs
                .voters
                .iter()
                .chain(&cs.learners)
                .chain(&cs.voters_outgoing)
                .chain(&cs.learners_next)
                .any(|id| *id == to);
            if md.index >= request_index.max(truncated) && names_to {
                return Ok(s.clone());
            }
        }
        g.requested = true;
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
