//! The Raft log of every Region on a store, in one shared `raft-engine` instance.
//!
//! raft-engine is a log-structured store built for many Raft groups: each write appends one
//! record to the current log file and an in-memory index maps each Region's entries to their
//! file positions. One [`LogWriteBatch`] can carry entries, hard states and metadata of many
//! Regions, and [`RaftLogStore::write`] persists it with one fsync: this is how the Raftstore
//! turns the `Ready`s of many Regions into one disk sync (group commit).
//!
//! Per Region, the store keeps (keys inside raft-engine's per-Region key space):
//!
//! | key  | value                                   |
//! |------|-----------------------------------------|
//! | `hs` | Raft `HardState` (term, vote, commit)   |
//! | `rs` | `RegionLocalState` (range, peers, epoch, tablet index) |
//! | `ts` | `RaftTruncatedState` (log compacted up to here) |
//!
//! Compaction ([`LogWriteBatch::compact_to`]) drops entries below an index and records the
//! truncated state in the same batch; purging ([`RaftLogStore::purge`]) later deletes log files
//! no Region needs. The caller decides *how far* to compact: never above the Region's durable
//! apply index (see the recovery invariant in [`crate::storage`]).
//!
//! [`RegionLog`] is a Region's read view, implementing `raft::Storage` for a `RawNode`.

mod region_log;

use std::path::Path;
use std::sync::Arc;

use prkv_proto::serverpb::{RaftTruncatedState, RegionLocalState};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};
use raft_engine::{Command, Engine, LogBatch, MessageExt};

pub use region_log::{conf_state_from_region, RegionLog, SnapGen};

use crate::config::RaftEngineConfig;
use crate::storage::{Error, Index, RegionId, Result};

const HARD_STATE_KEY: &[u8] = b"hs";
const REGION_STATE_KEY: &[u8] = b"rs";
const TRUNCATED_STATE_KEY: &[u8] = b"ts";

/// Tells raft-engine how to read a Raft entry's index.
#[derive(Clone)]
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// The store's shared Raft log. Cheap to clone.
#[derive(Clone)]
pub struct RaftLogStore {
    engine: Arc<Engine>,
}

/// Changes to the logs of any number of Regions, written atomically by one
/// [`RaftLogStore::write`].
#[derive(Default)]
pub struct LogWriteBatch {
    batch: LogBatch,
}

impl LogWriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `entries` (consecutive indexes) to the Region's log. Entries at or after the
    /// first appended index that the log already holds are replaced, as Raft requires when a
    /// new leader overwrites an uncommitted suffix.
    pub fn append(&mut self, region_id: RegionId, entries: &[Entry]) -> Result<()> {
        for w in entries.windows(2) {
            assert_eq!(
                w[0].index + 1,
                w[1].index,
                "Region {region_id}: appended entries are not consecutive"
            );
        }
        self.batch.add_entries::<EntryExt>(region_id, entries)?;
        Ok(())
    }

    pub fn put_hard_state(&mut self, region_id: RegionId, hs: &HardState) -> Result<()> {
        self.batch
            .put_message(region_id, HARD_STATE_KEY.to_vec(), hs)?;
        Ok(())
    }

    pub fn put_region_state(
        &mut self,
        region_id: RegionId,
        state: &RegionLocalState,
    ) -> Result<()> {
        self.batch
            .put(region_id, REGION_STATE_KEY.to_vec(), state.encode_to_vec())?;
        Ok(())
    }

    /// Drops the Region's entries below `index + 1`, i.e. up to and including `index`, and
    /// records `(index, term)` as the truncated state.
    pub fn compact_to(&mut self, region_id: RegionId, index: Index, term: u64) -> Result<()> {
        let ts = RaftTruncatedState { index, term };
        self.batch
            .put(region_id, TRUNCATED_STATE_KEY.to_vec(), ts.encode_to_vec())?;
        self.batch
            .add_command(region_id, Command::Compact { index: index + 1 });
        Ok(())
    }

    /// Removes everything the store holds about the Region (its replica was destroyed).
    pub fn clean(&mut self, region_id: RegionId) {
        self.batch.add_command(region_id, Command::Clean);
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    pub fn approximate_size(&self) -> usize {
        self.batch.approximate_size()
    }
}

/// How long a raft-engine write waits for file descriptors before it gives up (see
/// [`RaftLogStore::write`]): the parker frees descriptors within a round or two (a second
/// each); half a minute without any means something else holds them all.
pub const RAFT_WRITE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

impl RaftLogStore {
    pub fn open(dir: &Path, config: &RaftEngineConfig) -> Result<RaftLogStore> {
        let cfg = raft_engine::Config {
            dir: dir.to_string_lossy().into_owned(),
            target_file_size: raft_engine::ReadableSize(config.target_file_size.0),
            purge_threshold: raft_engine::ReadableSize(config.purge_threshold.0),
            ..Default::default()
        };
        let engine = Engine::open(cfg)?;
        Ok(RaftLogStore {
            engine: Arc::new(engine),
        })
    }

    /// Persists `batch`; with `sync`, one fsync covers every Region in it. Returns the bytes
    /// written. The batch is left empty and reusable.
    /// Writes `batch`. Out of file descriptors (raft-engine rotating to a new log file), the
    /// write waits for the parker and is repeated from a copy taken beforehand, kept only
    /// while descriptors run low (`storage::fds`): a failed raft-engine write consumes its
    /// batch. Still failing after [`RAFT_WRITE_PATIENCE`], the error is returned (the store
    /// then stops: its Raft state would be unknown).
    pub fn write(&self, batch: &mut LogWriteBatch, sync: bool) -> Result<usize> {
        if !crate::storage::fds::near_limit() {
            return Ok(self.engine.write(&mut batch.batch, sync)?);
        }
        let copy = batch.batch.clone();
        let started = std::time::Instant::now();
        crate::storage::fds::retry_while_exhausted(
            "writing the Raft log",
            &crate::storage::wake_parkers,
            |e: &Error| e.is_fd_exhaustion() && started.elapsed() < RAFT_WRITE_PATIENCE,
            || {
                let mut attempt = copy.clone();
                let n = self.engine.write(&mut attempt, sync)?;
                batch.batch = LogBatch::default();
                Ok(n)
            },
        )
    }

    pub fn hard_state(&self, region_id: RegionId) -> Result<Option<HardState>> {
        Ok(self
            .engine
            .get_message::<HardState>(region_id, HARD_STATE_KEY)?)
    }

    pub fn region_state(&self, region_id: RegionId) -> Result<Option<RegionLocalState>> {
        self.get_prost(region_id, REGION_STATE_KEY, "RegionLocalState")
    }

    pub fn truncated_state(&self, region_id: RegionId) -> Result<Option<RaftTruncatedState>> {
        self.get_prost(region_id, TRUNCATED_STATE_KEY, "RaftTruncatedState")
    }

    fn get_prost<M: prost::Message + Default>(
        &self,
        region_id: RegionId,
        key: &[u8],
        what: &str,
    ) -> Result<Option<M>> {
        match self.engine.get(region_id, key) {
            None => Ok(None),
            Some(bytes) => M::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| Error::Corruption {
                    what: format!("{what} of Region {region_id} in raft-engine"),
                    detail: e.to_string(),
                }),
        }
    }

    pub fn first_index(&self, region_id: RegionId) -> Option<Index> {
        self.engine.first_index(region_id)
    }

    pub fn last_index(&self, region_id: RegionId) -> Option<Index> {
        self.engine.last_index(region_id)
    }

    /// Entries `[low, high)`, stopping early once `max_size` bytes are reached (but always at
    /// least one entry).
    pub fn entries(
        &self,
        region_id: RegionId,
        low: Index,
        high: Index,
        max_size: Option<usize>,
    ) -> Result<Vec<Entry>> {
        let mut out = Vec::with_capacity((high.saturating_sub(low)).min(1024) as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(region_id, low, high, max_size, &mut out)?;
        Ok(out)
    }

    pub fn entry(&self, region_id: RegionId, index: Index) -> Result<Option<Entry>> {
        Ok(self.engine.get_entry::<EntryExt>(region_id, index)?)
    }

    /// Every Region with anything in the log store.
    pub fn regions(&self) -> Vec<RegionId> {
        let mut v = self.engine.raft_groups();
        v.sort_unstable();
        v
    }

    /// Deletes log files no Region needs any more. Returns the Regions whose old entries keep
    /// the oldest files alive: the caller should compact their logs (after flushing their
    /// tablets) so that the next purge can go further.
    pub fn purge(&self) -> Result<Vec<RegionId>> {
        Ok(self.engine.purge_expired_files()?)
    }

    /// Bytes of log files on disk.
    pub fn used_bytes(&self) -> usize {
        self.engine.get_used_size()
    }

    /// Size of an encoded entry, as raft-engine will store it (for size limits).
    pub fn entry_size(e: &Entry) -> usize {
        e.compute_size() as usize
    }
}
