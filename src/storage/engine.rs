//! The engine traits: what the Raftstore needs from the place Region data lives.
//!
//! [`StoreEngine`] owns the data of every Region replica on a store and hands out one
//! [`RegionEngine`] per Region. The Raftstore sees nothing else: no RocksDB type crosses these
//! traits, so both layouts (a tablet per Region, or one shared DB) pass one test suite
//! (`tests/engine_suite.rs`).
//!
//! Keys given to a [`RegionEngine`] are user keys inside the Region's [`KeyRange`]; the engine
//! adds its own prefixes ([`super::keys`]). Writes go through a [`WriteBatch`] that is applied
//! atomically and may carry the Region's apply state.

use std::path::Path;
use std::sync::Arc;

use prkv_proto::serverpb::RaftApplyState;

use super::{Index, RegionId, Result};
use crate::config::EngineKind;

/// Column families, the layout Percolator needs: committed values, locks, commit records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    Default,
    Lock,
    Write,
}

impl Cf {
    pub const ALL: [Cf; 3] = [Cf::Default, Cf::Lock, Cf::Write];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Default => "default",
            Cf::Lock => "lock",
            Cf::Write => "write",
        }
    }
}

/// A Region's key range `[start, end)`; an empty `end` means "no upper bound".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl KeyRange {
    /// The whole key space.
    pub fn all() -> Self {
        KeyRange::default()
    }

    pub fn new(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        KeyRange {
            start: start.into(),
            end: end.into(),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }
}

/// Scan direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanDir {
    Forward,
    Reverse,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    /// Deletes `[start, end)`; an empty `end` means the Region's end.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// A set of changes applied atomically to one Region's engine.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    pub(crate) ops: Vec<Op>,
    pub(crate) apply_state: Option<RaftApplyState>,
    data_bytes: usize,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.data_bytes += key.len() + value.len();
        self.ops.push(Op::Put(cf, key.to_vec(), value.to_vec()));
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.data_bytes += key.len();
        self.ops.push(Op::Delete(cf, key.to_vec()));
    }

    /// Deletes the keys in `[start, end)` of `cf`; an empty `end` means the Region's end.
    pub fn delete_range(&mut self, cf: Cf, start: &[u8], end: &[u8]) {
        self.data_bytes += start.len() + end.len();
        self.ops
            .push(Op::DeleteRange(cf, start.to_vec(), end.to_vec()));
    }

    /// Records that this batch completes the application of the log up to
    /// `state.applied_index`. The state is written in the same atomic batch as the data, which
    /// is what makes a tablet's flushed contents self-describing after a crash.
    pub fn set_apply_state(&mut self, state: RaftApplyState) {
        self.apply_state = Some(state);
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.apply_state.is_none()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Bytes of keys and values in the batch (the "user bytes" of write amplification).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    pub fn clear(&mut self) {
        self.ops.clear();
        self.apply_state = None;
        self.data_bytes = 0;
    }
}

/// A consistent point-in-time view of one Region's data.
pub trait Snapshot: Send + Sync {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Calls `f` for each pair in `[start, end)` (empty `end` = the Region's end, both clipped to
    /// the Region) in `dir` order, until `f` returns false.
    fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        dir: ScanDir,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;

    /// Writes the snapshot's data as SST files into `dir`, one per non-empty column family
    /// (`<cf>.sst`): the scan-based Region snapshot of `raft-kv`, ingested by
    /// [`StoreEngine::install_snapshot`] on the receiver.
    fn export_ssts(&self, dir: &Path) -> Result<()>;
}

/// The data of one Region replica.
pub trait RegionEngine: Send + Sync {
    fn region_id(&self) -> RegionId;

    /// The key range this handle serves.
    fn range(&self) -> &KeyRange;

    /// The tablet index (log index the tablet was born at); 0 in `raft-kv` mode.
    fn tablet_index(&self) -> Index;

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Scans the latest data; see [`Snapshot::scan`].
    fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        dir: ScanDir,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;

    /// Applies `batch` atomically. Every key must lie inside [`RegionEngine::range`].
    fn write(&self, batch: &WriteBatch) -> Result<()>;

    fn snapshot(&self) -> Box<dyn Snapshot>;

    /// The apply state of the latest write, durable or not.
    fn apply_state(&self) -> Result<Option<RaftApplyState>>;

    /// The apply state that survives a crash right now: in a tablet, the one in flushed SSTs;
    /// in `raft-kv`, the one in the synced WAL (this call syncs it).
    fn persisted_apply_state(&self) -> Result<Option<RaftApplyState>>;

    /// Approximate on-disk bytes of the Region's data (flushed data only).
    fn approximate_size(&self) -> Result<u64>;

    /// Approximate number of keys of the Region's data.
    fn approximate_keys(&self) -> Result<u64>;

    /// The Region's keys over every column family, counted exactly as far as `limit` (a result
    /// above `limit` means "more"). Not a use of the data: a parked tablet answers from what
    /// it counted when it closed (exact below `EXACT_KEY_COUNT_BELOW`).
    fn count_keys(&self, limit: u64) -> Result<u64>;

    /// Whether the engine is parked: closed while idle, answering size and apply-state queries
    /// from what it recorded when it closed (tablets only; see `storage::park`). Reading or
    /// writing it opens it again; callers that only want statistics should not.
    fn is_parked(&self) -> bool {
        false
    }

    /// Writes a consistent copy of the engine into `dir` (hard links where possible), from
    /// which a Region with the same range can be opened.
    fn checkpoint(&self, dir: &Path) -> Result<()>;

    /// Makes everything written so far durable: an atomic flush of every column family (tablet)
    /// or a flush of the shared DB. With `wait = false` the flush is only scheduled.
    fn flush(&self, wait: bool) -> Result<()>;

    /// Bytes held by this Region's memtables (the shared DB's in `raft-kv` mode).
    fn memtable_bytes(&self) -> u64;

    /// Whether flushes or compactions are running or pending in the underlying RocksDB.
    fn background_work_pending(&self) -> bool;

    /// Whether the engine still holds data outside [`RegionEngine::range`]: a tablet that was
    /// checkpointed from a split parent, until [`RegionEngine::trim`] ran. Reads are clipped to
    /// the range either way; an untrimmed tablet is not split again or snapshotted, so garbage
    /// never multiplies. Always false in `raft-kv` mode.
    fn needs_trim(&self) -> Result<bool>;

    /// Deletes the data outside the range and compacts it away (tablets only; idempotent, and
    /// safe to run beside writes, which never touch keys outside the range).
    fn trim(&self) -> Result<()>;
}

/// The data of every Region replica on one store.
pub trait StoreEngine: Send + Sync {
    fn kind(&self) -> EngineKind;

    /// Opens the engine of `region_id` serving `range`, creating it if the store has none.
    /// `tablet_index` names the tablet generation (ignored in `raft-kv` mode).
    fn open_region(
        &self,
        region_id: RegionId,
        range: KeyRange,
        tablet_index: Index,
    ) -> Result<Arc<dyn RegionEngine>>;

    /// The open engine of `region_id`, if any.
    fn region(&self, region_id: RegionId) -> Option<Arc<dyn RegionEngine>>;

    /// The Regions that have data on this store, with their tablet index, found on disk.
    fn list_regions(&self) -> Result<Vec<(RegionId, Index)>>;

    /// Removes every trace of `region_id`'s data (its tablet directory, or its key range and
    /// apply state in the shared DB). Handles still held stay readable until dropped.
    fn destroy_region(&self, region_id: RegionId) -> Result<()>;

    /// At start-up: removes what is left of replicas destroyed before a crash (`destroyed`:
    /// their ids and last ranges). A replica's tombstone is written before its data goes, so a
    /// crash in between leaves the data; a later replica of the same Region on this store
    /// would find it (an apply state far past its empty log). Data of a range that a Region
    /// open here now serves stays. Call after every live Region is opened.
    fn purge_destroyed(&self, destroyed: &[(RegionId, KeyRange)]) -> Result<usize>;

    /// Whether generation `tablet_index` of `region_id` exists on disk. Opening creates what
    /// is missing, so a start-up that expects data checks first: a replica whose tablet
    /// vanished must not come back empty. Always true in `raft-kv` mode (one shared DB).
    fn has_region_data(&self, region_id: RegionId, tablet_index: Index) -> bool;

    /// Takes a damaged replica's data out of service: tablets move, unopened, into `dest` for
    /// inspection (nothing reads them again); `raft-kv` deletes the Region's range, as
    /// [`Self::destroy_region`] does, since one damaged Region cannot be cut out of a shared DB.
    fn quarantine_region(&self, region_id: RegionId, dest: &Path) -> Result<()>;

    /// Sends corruption found while running to `hook` (tablets; `raft-kv` has no per-Region
    /// files to blame, and only returns the error). See [`super::corruption`].
    fn watch_corruption(&self, _hook: super::corruption::Hook) {}

    /// Total memtable bytes across all Regions.
    fn memtable_bytes(&self) -> u64;

    /// The configured memtable limit (`rocksdb.write-buffer-limit`).
    fn memtable_limit(&self) -> u64;

    /// Flushes every open Region.
    fn flush_all(&self) -> Result<()>;

    /// Makes the snapshot files in `dir` (from [`RegionEngine::checkpoint`] of a tablet, or
    /// [`Snapshot::export_ssts`] in `raft-kv`) the data of `region_id` with `range`, applied
    /// through `applied` (index and term). Tablets: the directory becomes tablet generation
    /// `applied.applied_index` (a rename) and replaces the open one; `raft-kv`: the range is
    /// cleared and the files ingested. Durable when this returns; `dir` is consumed.
    fn install_snapshot(
        &self,
        region_id: RegionId,
        range: KeyRange,
        applied: &RaftApplyState,
        dir: &Path,
    ) -> Result<Arc<dyn RegionEngine>>;

    /// Creates the engines of the Regions split off the open Region `parent`: each child gets
    /// the parent's data as of now (the caller has written everything applied before the split)
    /// and the apply state `init`, durably, before this returns. Tablets: a flush, then a
    /// checkpoint (hard links) per child, born at `init.applied_index`; `raft-kv`: only the
    /// children's apply states. An engine left by an earlier, interrupted attempt is replaced.
    /// The parent's own narrower range is opened separately with [`StoreEngine::open_region`].
    fn split_region(
        &self,
        parent: RegionId,
        children: &[(RegionId, KeyRange)],
        init: &RaftApplyState,
    ) -> Result<Vec<Arc<dyn RegionEngine>>>;
}
