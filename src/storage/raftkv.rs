//! `raft-kv`: every Region of the store in one RocksDB, TiKV's classic layout.
//!
//! Regions are key ranges of the shared DB: a Region's engine is a view that clips reads and
//! writes to its range, and its apply state lives under its own local key ([`super::keys`]).
//! The WAL is on but not synced per write (the Raft log is the durable record); it is synced
//! when the durable apply index is asked for, before Raft-log GC may pass it.
//!
//! This mode exists as the baseline the partitioned engine is measured against: a split here
//! is metadata-only, but a snapshot must scan the range, compaction mixes every Region, and
//! destroying a replica is a range delete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use prkv_proto::serverpb::RaftApplyState;

use super::engine::{Cf, KeyRange, RegionEngine, StoreEngine};
use super::rocks::{DbHandle, Layout, RocksRegion, SharedResources};
use super::{keys, Error, Index, RegionId, Result};
use crate::config::{EngineKind, RocksDbConfig};

pub struct RaftKvEngine {
    handle: Arc<DbHandle>,
    shared: Arc<SharedResources>,
    regions: Mutex<HashMap<RegionId, Arc<RocksRegion>>>,
    path: PathBuf,
}

impl RaftKvEngine {
    pub fn open(path: &Path, config: &RocksDbConfig) -> Result<RaftKvEngine> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let shared = SharedResources::new(config)?;
        let handle = DbHandle::open(&shared, path, false)?;
        Ok(RaftKvEngine {
            handle,
            shared,
            regions: Mutex::new(HashMap::new()),
            path: path.to_path_buf(),
        })
    }
}

impl StoreEngine for RaftKvEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::RaftKv
    }

    fn open_region(
        &self,
        region_id: RegionId,
        range: KeyRange,
        _tablet_index: Index,
    ) -> Result<Arc<dyn RegionEngine>> {
        let mut regions = self.regions.lock();
        if let Some(r) = regions.get(&region_id) {
            if r.range == range {
                return Ok(r.clone());
            }
        }
        let view = Arc::new(RocksRegion::new(
            self.handle.clone(),
            region_id,
            range,
            0,
            Layout::Shared,
            self.shared.clone(),
            None,
        )?);
        regions.insert(region_id, view.clone());
        Ok(view)
    }

    fn region(&self, region_id: RegionId) -> Option<Arc<dyn RegionEngine>> {
        self.regions
            .lock()
            .get(&region_id)
            .map(|r| r.clone() as Arc<dyn RegionEngine>)
    }

    fn list_regions(&self) -> Result<Vec<(RegionId, Index)>> {
        // Apply-state keys are the local keys 0x01 0x02 <id> 0x03; scan them.
        let db = self.handle.db()?;
        let cf = db
            .cf_handle(Cf::Default.name())
            .expect("default column family");
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_lower_bound(keys::apply_state_key(0));
        opts.set_iterate_upper_bound(vec![keys::DATA_PREFIX]);
        let mut it = db.raw_iterator_cf_opt(cf, opts);
        it.seek_to_first();
        let mut out = Vec::new();
        while it.valid() {
            if let Some(k) = it.key() {
                if k.len() == 11 {
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&k[2..10]);
                    out.push((u64::from_be_bytes(id), 0));
                }
            }
            it.next();
        }
        it.status()
            .map_err(|e| super::rocks::rocks_err(&self.path, e))?;
        Ok(out)
    }

    fn destroy_region(&self, region_id: RegionId) -> Result<()> {
        let Some(view) = self.regions.lock().remove(&region_id) else {
            return Err(Error::RegionNotFound(region_id));
        };
        // Remove the Region's data and its apply state in one atomic batch. Keys that another
        // Region open on this store now serves are not this replica's to delete (a stale
        // replica's range can overlap Regions created since), so only the rest goes.
        let others: Vec<KeyRange> = self
            .regions
            .lock()
            .values()
            .map(|r| r.range.clone())
            .collect();
        let db = self.handle.db()?;
        let mut wb = rocksdb::WriteBatch::default();
        for part in subtract_ranges(&view.range, &others) {
            let lo = keys::data_key(&part.start);
            let hi = keys::data_end_key(&part.end);
            for cf in Cf::ALL {
                wb.delete_range_cf(db.cf_handle(cf.name()).expect("column family"), &lo, &hi);
            }
        }
        wb.delete_cf(
            db.cf_handle(Cf::Default.name()).expect("column family"),
            keys::apply_state_key(region_id),
        );
        db.write(wb)
            .map_err(|e| super::rocks::rocks_err(&self.path, e))
    }

    fn purge_destroyed(&self, destroyed: &[(RegionId, KeyRange)]) -> Result<usize> {
        let mut purged = 0;
        for (id, range) in destroyed {
            if self.regions.lock().contains_key(id) {
                continue;
            }
            let db = self.handle.db()?;
            let left = db
                .get_cf(
                    db.cf_handle(Cf::Default.name()).expect("column family"),
                    keys::apply_state_key(*id),
                )
                .map_err(|e| super::rocks::rocks_err(&self.path, e))?;
            if left.is_none() {
                continue; // destroyed whole before the crash
            }
            // A view for `destroy_region`, which spares the ranges of the open Regions.
            self.open_region(*id, range.clone(), 0)?;
            self.destroy_region(*id)?;
            purged += 1;
        }
        Ok(purged)
    }

    fn has_region_data(&self, _region_id: RegionId, _tablet_index: Index) -> bool {
        true
    }

    fn quarantine_region(&self, region_id: RegionId, _dest: &Path) -> Result<()> {
        match self.destroy_region(region_id) {
            Err(Error::RegionNotFound(_)) => Ok(()), // never opened: nothing serves it
            r => r,
        }
    }

    fn memtable_bytes(&self) -> u64 {
        self.shared.wbm.get_usage() as u64
    }

    fn memtable_limit(&self) -> u64 {
        self.shared.config.write_buffer_limit.0
    }

    fn flush_all(&self) -> Result<()> {
        self.handle.flush(true)
    }

    /// The classic way: clear the Region's range, ingest the SSTs the leader scanned out.
    fn install_snapshot(
        &self,
        region_id: RegionId,
        range: KeyRange,
        applied: &RaftApplyState,
        dir: &Path,
    ) -> Result<Arc<dyn RegionEngine>> {
        let lo = keys::data_key(&range.start);
        let hi = keys::data_end_key(&range.end);
        super::rocks::ingest_snapshot(
            &self.handle,
            &lo,
            &hi,
            dir,
            &keys::apply_state_key(region_id),
            applied,
        )?;
        // `dir` stays until the store has recorded the install (Region state `Normal`): a crash
        // before that runs this again from it.
        // A fresh view: it reads the apply state just written.
        self.regions.lock().remove(&region_id);
        self.open_region(region_id, range, applied.applied_index)
    }

    /// Metadata only: the children's keys are already where they belong in the shared DB; each
    /// child gets its apply state, synced before the split is recorded in raft-engine.
    fn split_region(
        &self,
        _parent: RegionId,
        children: &[(RegionId, KeyRange)],
        init: &RaftApplyState,
    ) -> Result<Vec<Arc<dyn RegionEngine>>> {
        let db = self.handle.db()?;
        let default = db.cf_handle(Cf::Default.name()).expect("column family");
        let mut wb = rocksdb::WriteBatch::default();
        for (id, _) in children {
            wb.put_cf(
                default,
                keys::apply_state_key(*id),
                prost::Message::encode_to_vec(init),
            );
        }
        self.handle.write_durable(wb, false)?;
        children
            .iter()
            .map(|(id, range)| self.open_region(*id, range.clone(), init.applied_index))
            .collect()
    }
}

/// The parts of `range` that none of `others` covers (empty `end` = unbounded).
fn subtract_ranges(range: &KeyRange, others: &[KeyRange]) -> Vec<KeyRange> {
    let mut parts = vec![range.clone()];
    for o in others {
        let mut next = Vec::new();
        for p in parts {
            // An empty end is unbounded.
            let overlaps = (p.end.is_empty() || o.start.as_slice() < p.end.as_slice())
                && (o.end.is_empty() || p.start.as_slice() < o.end.as_slice());
            if !overlaps {
                next.push(p);
                continue;
            }
            if o.start.as_slice() > p.start.as_slice() {
                next.push(KeyRange::new(p.start.clone(), o.start.clone()));
            }
            if !o.end.is_empty() && (p.end.is_empty() || o.end.as_slice() < p.end.as_slice()) {
                next.push(KeyRange::new(o.end.clone(), p.end.clone()));
            }
        }
        parts = next;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: &str, b: &str) -> KeyRange {
        KeyRange::new(a.as_bytes().to_vec(), b.as_bytes().to_vec())
    }

    #[test]
    fn destroying_a_replica_spares_ranges_other_regions_serve() {
        assert_eq!(subtract_ranges(&r("b", "m"), &[]), vec![r("b", "m")]);
        assert_eq!(
            subtract_ranges(&r("b", "m"), &[r("d", "f")]),
            vec![r("b", "d"), r("f", "m")]
        );
        assert_eq!(subtract_ranges(&r("b", "m"), &[r("a", "z")]), vec![]);
        assert_eq!(
            subtract_ranges(&r("b", "m"), &[r("m", "z")]),
            vec![r("b", "m")]
        );
        assert_eq!(
            subtract_ranges(&r("b", ""), &[r("d", "")]),
            vec![r("b", "d")]
        );
        assert_eq!(
            subtract_ranges(&r("", ""), &[r("d", "f")]),
            vec![r("", "d"), r("f", "")]
        );
        assert_eq!(
            subtract_ranges(&r("b", "m"), &[r("a", "c"), r("k", "")]),
            vec![r("c", "k")]
        );
    }
}
