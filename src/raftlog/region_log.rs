//! A Region's Raft log as `raft::Storage`: what a `RawNode` reads.
//!
//! The log holds entries `first_index..=last_index`; everything up to the truncated index has
//! been compacted away and is represented only by its `(index, term)` pair, which Raft needs to
//! check the log-matching property of the next append. Writes never go through here: the store
//! writes [`super::LogWriteBatch`]es and then tells the view what changed
//! ([`RegionLog::set_hard_state`], ...), keeping raft-rs's Ready/advance discipline (the
//! storage a `RawNode` reads is only updated after its Ready was persisted).
//!
//! **The entry cache.** raft-rs reads persisted entries back through [`raft::Storage`] to apply
//! them once committed, and asks [`raft::Storage::term`] of recent indexes on every append
//! response. From raft-engine each such read finds the entry's log batch in a file, checks its
//! CRC and decompresses the whole batch, which holds the entries of every Region written in
//! that round: with 64 busy Regions a profile found the store threads spending about a sixth of
//! their time on it. So the entries a round persisted stay in memory ([`EntryCache`]) until
//! they are applied; older ones, and ranges the cache does not hold, come from raft-engine.

use std::collections::VecDeque;

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
    cache: EntryCache,
}

/// A Region's cache of persisted, not yet applied entries holds at most this many bytes. A
/// busy Region's unapplied tail is a round or two of proposals, far less; a follower catching up
/// on a long log would otherwise hold all of it in memory. Beyond the bound the oldest entries
/// go first, and are read back from raft-engine if needed.
pub const ENTRY_CACHE_MAX_BYTES: usize = 8 << 20;

/// Consecutive entries of a Region's log, exactly as raft-engine holds them (see the module doc).
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl EntryCache {
    /// Entries just persisted at `new[0].index..`: as in the log, they replace any cached entry
    /// at or after their first index.
    fn append(&mut self, new: Vec<Entry>) {
        let Some(first) = new.first().map(|e| e.index) else {
            return;
        };
        while self.entries.back().is_some_and(|e| e.index >= first) {
            self.pop_back();
        }
        if self.entries.back().is_some_and(|e| e.index + 1 != first) {
            self.clear(); // a gap: keep the cache one run of consecutive entries
        }
        for e in new {
            self.bytes += RaftLogStore::entry_size(&e);
            self.entries.push_back(e);
        }
        while self.bytes > ENTRY_CACHE_MAX_BYTES && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    /// Drops the entries up to and including `index`.
    fn evict_to(&mut self, index: Index) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            self.pop_front();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= RaftLogStore::entry_size(&e);
        }
    }

    fn pop_back(&mut self) {
        if let Some(e) = self.entries.pop_back() {
            self.bytes -= RaftLogStore::entry_size(&e);
        }
    }

    fn get(&self, index: Index) -> Option<&Entry> {
        let first = self.entries.front()?.index;
        let i = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(i)
    }

    /// `[low, high)` if the cache holds all of it, cut as raft-engine cuts: at least one
    /// entry, then entries while their total stays within `max_size`.
    fn range(&self, low: Index, high: Index, max_size: Option<usize>) -> Option<Vec<Entry>> {
        let first = self.entries.front()?.index;
        let last = self.entries.back()?.index;
        if low < first || high > last + 1 || low >= high {
            return None;
        }
        let start = usize::try_from(low - first).ok()?;
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut total = 0;
        for e in self.entries.range(start..start + (high - low) as usize) {
            total += RaftLogStore::entry_size(e);
            if !out.is_empty() && max_size.is_some_and(|m| total > m) {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }
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
            cache: EntryCache::default(),
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
        let mut s = self.state.write();
        s.truncated = RaftTruncatedState { index, term };
        s.cache.evict_to(index);
    }

    /// Keeps entries the store has just persisted (called after the raft-engine write that
    /// holds them, before the `RawNode` advances past them).
    pub fn cache_persisted(&self, entries: Vec<Entry>) {
        self.state.write().cache.append(entries);
    }

    /// Forgets cached entries up to `index` (applied: Raft reads them no more, except for a
    /// lagging follower, which gets them from raft-engine).
    pub fn evict_cache_to(&self, index: Index) {
        self.state.write().cache.evict_to(index);
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
        s.cache.clear();
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
        let max = max_size.into().map(|m| m as usize);
        {
            let s = self.state.read();
            if low <= s.truncated.index {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            if let Some(v) = s.cache.range(low, high, max) {
                crate::metrics::RAFT_ENTRY_READS_CACHE.inc();
                return Ok(v);
            }
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        crate::metrics::RAFT_ENTRY_READS_ENGINE.inc();
        self.store
            .entries(self.region_id, low, high, max)
            .map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        {
            let s = self.state.read();
            let (t_index, t_term) = (s.truncated.index, s.truncated.term);
            if idx == t_index {
                return Ok(t_term);
            }
            if idx < t_index {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            if let Some(e) = s.cache.get(idx) {
                crate::metrics::RAFT_ENTRY_READS_CACHE.inc();
                return Ok(e.term);
            }
        }
        crate::metrics::RAFT_ENTRY_READS_ENGINE.inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, len: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![7u8; len].into(),
            ..Default::default()
        }
    }

    fn indexes(v: &[Entry]) -> Vec<(u64, u64)> {
        v.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn cache_mirrors_the_log_it_caches() {
        let mut c = EntryCache::default();
        c.append((1..=5).map(|i| entry(i, 1, 10)).collect());
        assert_eq!(
            indexes(&c.range(2, 5, None).unwrap()),
            [(2, 1), (3, 1), (4, 1)]
        );
        assert!(c.range(0, 3, None).is_none(), "below the cache");
        assert!(c.range(4, 7, None).is_none(), "past the cache");
        // A new leader overwrites the suffix from index 4: 5 is gone as well.
        c.append(vec![entry(4, 2, 10)]);
        assert_eq!(indexes(&c.range(3, 5, None).unwrap()), [(3, 1), (4, 2)]);
        assert_eq!(c.get(5).map(|e| e.term), None);
        // A gap (entries the cache never saw) empties it rather than skip indexes.
        c.append(vec![entry(9, 2, 10)]);
        assert_eq!(c.get(4).map(|e| e.term), None);
        assert_eq!(c.get(9).map(|e| e.term), Some(2));
        c.evict_to(9);
        assert!(c.entries.is_empty());
        assert_eq!(c.bytes, 0);
    }

    #[test]
    fn cache_cuts_ranges_and_stays_bounded() {
        let mut c = EntryCache::default();
        c.append((1..=4).map(|i| entry(i, 1, 100)).collect());
        let one = RaftLogStore::entry_size(&entry(1, 1, 100));
        // At least one entry, then as many as fit.
        assert_eq!(c.range(1, 5, Some(1)).unwrap().len(), 1);
        assert_eq!(c.range(1, 5, Some(2 * one)).unwrap().len(), 2);
        assert_eq!(c.range(1, 5, Some(2 * one + 1)).unwrap().len(), 2);
        let big = ENTRY_CACHE_MAX_BYTES / 4;
        c.append((5..=10).map(|i| entry(i, 1, big)).collect());
        assert!(c.bytes <= ENTRY_CACHE_MAX_BYTES);
        assert_eq!(c.entries.back().map(|e| e.index), Some(10));
        let first = c.entries.front().map(|e| e.index).unwrap();
        assert!(first > 5, "the oldest entries went first");
        assert!(c.range(1, 3, None).is_none());
    }
}
