//! `partitioned-raft-kv`: one RocksDB instance ("tablet") per Region replica.
//!
//! ```text
//!   tablets/
//!     7_0/          Region 7, born at log index 0 (bootstrap)
//!     9_1520/       Region 9, installed from a split or snapshot at index 1520
//!     9_880.tomb/   an older generation being removed (left over after a crash)
//! ```
//!
//! A tablet directory is named `<region>_<index>`, where the index is the Raft log index the
//! tablet's contents start from. A Region gets a new generation whenever its data is replaced
//! as a whole (split, snapshot, merge): the new directory is prepared beside the old one and the
//! registry *swaps* to it by opening the higher index; the old one is destroyed once unused.
//! At start-up the highest index of each Region wins and leftovers are removed, so a crash in
//! the middle of a swap leaves a consistent choice.
//!
//! Why this layout pays off (`docs/architecture.md`, section 1): compaction never mixes
//! Regions, a split is a checkpoint (hard links) rather than a rewrite, a new replica receives
//! files as they are, and removing a replica removes a directory.
//!
//! Tablets write no WAL and flush their column families atomically, so a tablet on disk is
//! always a consistent prefix of the Region's log: see the recovery invariant in
//! [`super`]. Memory is shared and bounded by the [`super::flush::FlushController`].
//!
//! File descriptors: a tablet holds its `LOCK`, `MANIFEST`, current (empty) WAL and directory
//! open, plus at most `rocksdb.max-open-files - 10` SSTs (one table-cache shard, see
//! `db_options`); the info log goes to `tracing`, not a file. How many tablets may be open is
//! derived from `RLIMIT_NOFILE` (raised to the hard limit at start): see [`super::fds`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use prkv_proto::serverpb::RaftApplyState;

use super::engine::{KeyRange, RegionEngine, StoreEngine};
use super::flush::FlushController;
use super::park::Parker;
use super::rocks::{cf_of, DbHandle, Layout, RocksRegion, SharedResources};
use super::{Error, Index, RegionId, Result};
use crate::config::{EngineKind, RocksDbConfig};

const TOMBSTONE_SUFFIX: &str = ".tomb";

/// Opens, caches, swaps and destroys the tablets of one store.
pub struct TabletRegistry {
    root: PathBuf,
    shared: Arc<SharedResources>,
    tablets: Arc<Mutex<HashMap<RegionId, Arc<RocksRegion>>>>,
    flush: Arc<FlushController>,
    parker: Arc<Parker>,
}

impl TabletRegistry {
    pub fn open(root: &Path, config: &RocksDbConfig) -> Result<TabletRegistry> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let shared = SharedResources::new(config)?;
        let tablets = Arc::new(Mutex::new(HashMap::new()));
        let flush = FlushController::start(shared.clone(), tablets.clone());
        let parker = Parker::start(shared.clone(), &tablets);
        let registry = TabletRegistry {
            root: root.to_path_buf(),
            shared,
            tablets,
            flush,
            parker,
        };
        registry.remove_leftovers()?;
        Ok(registry)
    }

    /// The directory of a tablet generation.
    pub fn tablet_path(&self, region_id: RegionId, index: Index) -> PathBuf {
        self.root.join(format!("{region_id}_{index}"))
    }

    /// The flush controller, for metrics and tests.
    pub fn flush_controller(&self) -> &FlushController {
        &self.flush
    }

    /// The parker, for tests (`run_once` parks what qualifies now).
    pub fn parker(&self) -> &Parker {
        &self.parker
    }

    /// Tablets open (their RocksDB running) and parked, now.
    pub fn tablet_counts(&self) -> (usize, usize) {
        (self.shared.open_tablets(), self.shared.parked_tablets())
    }

    /// Scans the tablet directory: `(region, index)` of every generation on disk.
    fn scan_dir(&self) -> Result<Vec<(RegionId, Index, PathBuf)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))? {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((r, i)) = parse_tablet_name(&name) {
                found.push((r, i, entry.path()));
            }
        }
        Ok(found)
    }

    /// Removes tombstoned generations and every generation below a Region's newest one.
    fn remove_leftovers(&self) -> Result<()> {
        let mut newest: HashMap<RegionId, Index> = HashMap::new();
        for (r, i, _) in self.scan_dir()? {
            let e = newest.entry(r).or_insert(i);
            *e = (*e).max(i);
        }
        for entry in std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))? {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = match parse_tablet_name(&name) {
                Some((r, i)) => newest.get(&r).is_some_and(|n| i < *n),
                None => name.ends_with(TOMBSTONE_SUFFIX),
            };
            if stale {
                tracing::info!(dir = %entry.path().display(), "removing stale tablet generation");
                std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
            }
        }
        Ok(())
    }

    /// A Region's view of an open tablet, wired to the flush controller.
    fn view(
        &self,
        handle: Arc<DbHandle>,
        region_id: RegionId,
        range: KeyRange,
        index: Index,
    ) -> Result<Arc<RocksRegion>> {
        let flush = self.flush.clone();
        let on_write: Arc<dyn Fn() + Send + Sync> = Arc::new(move || flush.on_write());
        Ok(Arc::new(RocksRegion::new(
            handle,
            region_id,
            range,
            index,
            Layout::Tablet,
            self.shared.clone(),
            Some(on_write),
        )?))
    }

    /// Makes `tablet` the Region's open tablet; a different generation it replaces is retired.
    fn register(
        &self,
        tablets: &mut HashMap<RegionId, Arc<RocksRegion>>,
        tablet: &Arc<RocksRegion>,
    ) {
        if let Some(old) = tablets.insert(tablet.region_id, tablet.clone()) {
            if !Arc::ptr_eq(&old.handle, &tablet.handle) {
                self.retire(&old);
            }
        }
    }

    /// Moves a tablet directory aside and marks it for removal when its last user drops it.
    fn retire(&self, tablet: &RocksRegion) {
        tablet.handle.mark_destroyed();
        tracing::info!(
            region_id = tablet.region_id,
            index = tablet.tablet_index,
            "tablet retired"
        );
    }
}

impl StoreEngine for TabletRegistry {
    fn kind(&self) -> EngineKind {
        EngineKind::PartitionedRaftKv
    }

    /// Opens generation `tablet_index` of the Region. If the cache holds an older generation,
    /// this is a swap: the new tablet replaces it and the old one is destroyed once unused.
    fn open_region(
        &self,
        region_id: RegionId,
        range: KeyRange,
        tablet_index: Index,
    ) -> Result<Arc<dyn RegionEngine>> {
        let mut tablets = self.tablets.lock();
        if let Some(t) = tablets.get(&region_id) {
            if t.tablet_index == tablet_index && t.range == range {
                return Ok(t.clone());
            }
            if t.tablet_index > tablet_index {
                return Err(Error::Other(format!(
                    "Region {region_id}: cannot open tablet index {tablet_index} below the open {}",
                    t.tablet_index
                )));
            }
        }
        if tablets
            .get(&region_id)
            .is_some_and(|t| t.tablet_index == tablet_index)
        {
            // Same generation, new range: a new view over the same handle.
            let handle = tablets[&region_id].handle.clone();
            let view = self.view(handle, region_id, range, tablet_index)?;
            self.register(&mut tablets, &view);
            return Ok(view);
        }
        // A tablet parked before a restart stays closed until its first use.
        let path = self.tablet_path(region_id, tablet_index);
        let handle = DbHandle::open_lazily(&self.shared, &path)?;
        let tablet = self.view(handle, region_id, range, tablet_index)?;
        self.register(&mut tablets, &tablet);
        Ok(tablet)
    }

    fn region(&self, region_id: RegionId) -> Option<Arc<dyn RegionEngine>> {
        self.tablets
            .lock()
            .get(&region_id)
            .map(|t| t.clone() as Arc<dyn RegionEngine>)
    }

    fn list_regions(&self) -> Result<Vec<(RegionId, Index)>> {
        let mut newest: HashMap<RegionId, Index> = HashMap::new();
        for (r, i, _) in self.scan_dir()? {
            let e = newest.entry(r).or_insert(i);
            *e = (*e).max(i);
        }
        let mut v: Vec<_> = newest.into_iter().collect();
        v.sort_unstable();
        Ok(v)
    }

    fn destroy_region(&self, region_id: RegionId) -> Result<()> {
        let open = self.tablets.lock().remove(&region_id);
        match open {
            Some(t) => self.retire(&t),
            None => {
                for (r, _, path) in self.scan_dir()? {
                    if r == region_id {
                        let tomb = path.with_extension("tomb");
                        std::fs::rename(&path, &tomb).map_err(|e| Error::io(&path, e))?;
                        std::fs::remove_dir_all(&tomb).map_err(|e| Error::io(&tomb, e))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn purge_destroyed(&self, destroyed: &[(RegionId, KeyRange)]) -> Result<usize> {
        let ids: std::collections::HashSet<RegionId> = destroyed.iter().map(|(r, _)| *r).collect();
        let mut purged = 0;
        for (r, _, path) in self.scan_dir()? {
            if ids.contains(&r) && !self.tablets.lock().contains_key(&r) {
                let tomb = path.with_extension("tomb");
                std::fs::rename(&path, &tomb).map_err(|e| Error::io(&path, e))?;
                std::fs::remove_dir_all(&tomb).map_err(|e| Error::io(&tomb, e))?;
                purged += 1;
            }
        }
        Ok(purged)
    }

    fn has_region_data(&self, region_id: RegionId, tablet_index: Index) -> bool {
        self.tablet_path(region_id, tablet_index).is_dir()
    }

    /// Every generation of the Region moves into `dest`. The open one moves once closed, when
    /// its last user (a reader, a snapshot) lets go: RocksDB must not write into a directory
    /// that moved.
    fn quarantine_region(&self, region_id: RegionId, dest: &Path) -> Result<()> {
        std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
        let open = self.tablets.lock().remove(&region_id);
        let open_path = open.as_ref().map(|t| t.handle.path.clone());
        if let Some(t) = open {
            let name = t.handle.path.file_name().unwrap_or_default().to_owned();
            t.handle.move_when_closed(dest.join(name));
        }
        for (r, i, path) in self.scan_dir()? {
            if r == region_id && Some(&path) != open_path.as_ref() {
                let to = dest.join(format!("{r}_{i}"));
                std::fs::rename(&path, &to).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(())
    }

    fn watch_corruption(&self, hook: super::corruption::Hook) {
        super::corruption::watch(&self.root, hook);
    }

    fn memtable_bytes(&self) -> u64 {
        self.shared.wbm.get_usage() as u64
    }

    fn memtable_limit(&self) -> u64 {
        self.shared.config.write_buffer_limit.0
    }

    fn flush_all(&self) -> Result<()> {
        let tablets: Vec<_> = self.tablets.lock().values().cloned().collect();
        for t in tablets {
            t.flush(true)?; // a parked tablet has nothing to flush, and stays closed
        }
        Ok(())
    }

    /// The snapshot directory (a checkpoint of the leader's tablet) becomes the new tablet
    /// generation by a rename: no byte of data is rewritten.
    fn install_snapshot(
        &self,
        region_id: RegionId,
        range: KeyRange,
        applied: &RaftApplyState,
        dir: &Path,
    ) -> Result<Arc<dyn RegionEngine>> {
        let index = applied.applied_index;
        let path = self.tablet_path(region_id, index);
        {
            let tablets = self.tablets.lock();
            if let Some(t) = tablets.get(&region_id) {
                if t.tablet_index >= index {
                    return Err(Error::Other(format!(
                        "Region {region_id}: snapshot at {index} is not newer than tablet {}",
                        t.tablet_index
                    )));
                }
            }
        }
        if path.exists() {
            // A leftover of an interrupted install of this same snapshot.
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::rename(dir, &path).map_err(|e| Error::io(dir, e))?;
        crate::crash_point!("snapshot_install_after_rename");
        let handle = DbHandle::open(&self.shared, &path, true)?;
        // The checkpoint carries the leader's apply state as of its last write; the snapshot's
        // index may be later (admin entries change no data). Record the snapshot's.
        let db = handle.db()?;
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_cf(
            cf_of(&db, super::engine::Cf::Default),
            super::keys::apply_state_key(region_id),
            prost::Message::encode_to_vec(applied),
        );
        handle.write_durable(wb, true)?;
        let tablet = self.view(handle, region_id, range, index)?;
        self.register(&mut self.tablets.lock(), &tablet);
        Ok(tablet)
    }

    /// A split is O(1) in the Region's size: one flush of the parent, then per child a
    /// checkpoint (hard links of the parent's SSTs) and one tiny flushed write of its apply
    /// state. The children hold the parent's keys outside their ranges until trimmed.
    fn split_region(
        &self,
        parent: RegionId,
        children: &[(RegionId, KeyRange)],
        init: &RaftApplyState,
    ) -> Result<Vec<Arc<dyn RegionEngine>>> {
        let parent_tablet = self
            .tablets
            .lock()
            .get(&parent)
            .cloned()
            .ok_or(Error::RegionNotFound(parent))?;
        // Memtables into SSTs first, so every checkpoint below is hard links only.
        crate::metrics::TABLET_FLUSHES
            .with_label_values(&["split"])
            .inc();
        parent_tablet.handle.flush(true)?;
        let mut out: Vec<Arc<dyn RegionEngine>> = Vec::with_capacity(children.len());
        for (id, range) in children {
            let index = init.applied_index;
            let path = self.tablet_path(*id, index);
            // Out of descriptors, the checkpoint waits for the parker (`storage::fds`); each
            // attempt starts from nothing.
            let shared = self.shared.clone();
            super::fds::retry_while_exhausted(
                "checkpointing a split child",
                &|| shared.park_signal.wake(),
                |e: &Error| e.is_fd_exhaustion(),
                || {
                    if path.exists() {
                        // Left by an interrupted attempt at this same split (the split's
                        // Region states were not persisted, or we would not be here).
                        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                    }
                    parent_tablet.handle.checkpoint(&path)
                },
            )?;
            let handle = DbHandle::open(&self.shared, &path, true)?;
            let mut wb = rocksdb::WriteBatch::default();
            let db = handle.db()?;
            let default = cf_of(&db, super::engine::Cf::Default);
            wb.delete_cf(default, super::keys::apply_state_key(parent));
            wb.put_cf(
                default,
                super::keys::apply_state_key(*id),
                prost::Message::encode_to_vec(init),
            );
            handle.write_durable(wb, true)?;
            drop(db);
            let tablet = self.view(handle, *id, range.clone(), index)?;
            self.register(&mut self.tablets.lock(), &tablet);
            // A split into many children would open them all at once: past the cap, each
            // closes again at once (flushed already; its trim, queued, reopens it later).
            if self.shared.open_tablets() > self.shared.tablet_cap() {
                if let Err(e) = tablet.try_park() {
                    tracing::warn!(region_id = *id, error = %e, "parking a split child failed");
                }
            }
            out.push(tablet);
        }
        Ok(out)
    }
}

impl Drop for TabletRegistry {
    fn drop(&mut self) {
        super::corruption::unwatch(&self.root);
        self.flush.shutdown();
        self.parker.shutdown();
    }
}

/// Parses `<region>_<index>`.
fn parse_tablet_name(name: &str) -> Option<(RegionId, Index)> {
    let (r, i) = name.split_once('_')?;
    Some((r.parse().ok()?, i.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablet_names() {
        assert_eq!(parse_tablet_name("7_0"), Some((7, 0)));
        assert_eq!(parse_tablet_name("9_1520"), Some((9, 1520)));
        assert_eq!(parse_tablet_name("9_1520.tomb"), None);
        assert_eq!(parse_tablet_name("LOCK"), None);
    }
}
