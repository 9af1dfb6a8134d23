//! RocksDB underneath both engine kinds: shared resources, options, and the [`RegionEngine`]
//! implementation over one RocksDB instance.
//!
//! Every RocksDB of a store shares one [`SharedResources`]: one `Env` (so background flush and
//! compaction threads are per store, not per tablet), one block cache and one
//! `WriteBufferManager` sized by `rocksdb.write-buffer-limit`. RocksDB's informational log goes to
//! `tracing` instead of a `LOG` file per instance: one file descriptor less per tablet.
//!
//! This is the only module that names RocksDB types; they never leave it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prkv_proto::serverpb::RaftApplyState;
use prost::Message;
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Env, FlushOptions,
    InfoLogger, LogLevel, Options, ReadOptions, ReadTier, WriteBufferManager, WriteOptions, DB,
};

use super::engine::{Cf, KeyRange, Op, RegionEngine, ScanDir, Snapshot, WriteBatch};
use super::park::{self, ParkedInfo};
use super::signal;
use super::{keys, Error, Index, RegionId, Result};
use crate::config::RocksDbConfig;

/// Arena blocks are what the WriteBufferManager charges. RocksDB's default (1/8 of a memtable)
/// would charge 4MiB to every tablet that receives a single write, so 1,000 lightly written
/// tablets would "use" gigabytes; 64KiB keeps the charge close to real use.
const ARENA_BLOCK_SIZE: usize = 64 << 10;

extern "C" {
    /// `native/lazy_dir_env.cc`: RocksDB's default Env, except that directory handles hold no
    /// file descriptor between fsyncs (saving four descriptors per tablet).
    fn prkv_lazy_dir_env_create() -> *mut librocksdb_sys::rocksdb_env_t;
}

/// Resources shared by every RocksDB instance of a store.
pub(crate) struct SharedResources {
    /// Options every instance starts from: they carry one RocksDB `Statistics` object, so that
    /// all tablets of the store count into it (see [`export_engine_stats`]).
    base: Options,
    env: Env,
    cache: Cache,
    pub(crate) wbm: WriteBufferManager,
    pub(crate) config: RocksDbConfig,
    /// Time origin for "oldest unflushed write" and "last used" stamps.
    pub(crate) epoch: Instant,
    /// Tablets open and parked now (not the shared raft-kv DB).
    open_tablets: AtomicUsize,
    parked_tablets: AtomicUsize,
    /// Wakes the parker when a tablet opens beyond `rocksdb.max-open-tablets`.
    pub(crate) park_signal: signal::Signal,
    /// How the process's file descriptors are spent (`storage::fds`).
    pub(crate) fd_budget: super::fds::FdBudget,
}

impl SharedResources {
    pub(crate) fn new(config: &RocksDbConfig) -> Result<Arc<SharedResources>> {
        // SAFETY: the shim returns a freshly allocated `rocksdb_env_t` that `Env` now owns and
        // destroys on drop.
        let mut env = unsafe { Env::from_raw(prkv_lazy_dir_env_create()) };
        // Flushes run in the high-priority pool so that a compaction backlog never delays the
        // flushes that free write-buffer memory.
        let jobs = config.max_background_jobs.max(2);
        env.set_high_priority_background_threads((jobs / 2).max(1));
        env.set_low_priority_background_threads((jobs - jobs / 2).max(1));
        let cache = Cache::new_lru_cache(config.block_cache_size.0 as usize);
        // allow_stall: writers wait when memtables reach the limit until flushes free memory;
        // this is what bounds memory when writes outrun flushes.
        let wbm = WriteBufferManager::new_write_buffer_manager(
            config.write_buffer_limit.0 as usize,
            true,
        );
        let fd_budget =
            super::fds::FdBudget::from_limit(super::fds::raise_limit(), config.max_open_files);
        let cap = fd_budget.tablet_cap(config.max_open_tablets);
        if config.max_open_tablets == 0 || cap < config.max_open_tablets {
            tracing::info!(
                fd_limit = fd_budget.limit,
                reserve = fd_budget.reserve,
                per_tablet = fd_budget.per_tablet,
                open_tablets = cap,
                configured = config.max_open_tablets,
                "rocksdb.max-open-tablets lowered to what file descriptors allow"
            );
        }
        crate::metrics::FD_LIMIT.set(fd_budget.limit as i64);
        crate::metrics::TABLET_CAP.set(cap as i64);
        let mut base = Options::default();
        base.enable_statistics();
        // Counters only: timers would cost a clock read per operation.
        base.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptTimers);
        let shared = Arc::new(SharedResources {
            base,
            env,
            cache,
            wbm,
            config: config.clone(),
            epoch: Instant::now(),
            open_tablets: AtomicUsize::new(0),
            parked_tablets: AtomicUsize::new(0),
            park_signal: signal::Signal::default(),
            fd_budget,
        });
        let mut sources = STATS_SOURCES.lock();
        sources.retain(|w| w.strong_count() > 0);
        sources.push(Arc::downgrade(&shared));
        Ok(shared)
    }

    /// Nanoseconds since [`Self::epoch`], never 0.
    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().max(1) as u64
    }

    /// How many tablets may be open at once (`storage::fds`).
    pub(crate) fn tablet_cap(&self) -> usize {
        self.fd_budget.tablet_cap(self.config.max_open_tablets)
    }

    /// Before a tablet opens: if open tablets are well past the cap (a burst of splits or
    /// snapshots outran the parker), waits for the parker to catch up, up to
    /// [`ADMISSION_WAIT`]. The opener (the store loop, the region worker) slows down instead
    /// of taking descriptors that RocksDB's flushes and raft-engine will need.
    ///
    /// It waits only while the parker makes progress: tablets it cannot park now (running a
    /// flush or compaction, in use) must not hold the opener for long.
    fn wait_for_room(&self) {
        let cap = self.tablet_cap();
        let allowed = cap + cap / 8 + 4;
        if self.open_tablets() < allowed {
            return;
        }
        crate::metrics::TABLET_ADMISSION_WAITS.inc();
        let started = Instant::now();
        let mut last = (self.open_tablets(), Instant::now());
        while self.open_tablets() >= allowed && started.elapsed() < ADMISSION_WAIT {
            self.park_signal.wake();
            std::thread::sleep(std::time::Duration::from_millis(5));
            let open = self.open_tablets();
            if open < last.0 {
                last = (open, Instant::now());
            } else if last.1.elapsed() > std::time::Duration::from_millis(50) {
                break; // the parker is stuck on busy tablets: go on
            }
        }
    }

    pub(crate) fn open_tablets(&self) -> usize {
        self.open_tablets.load(Ordering::Relaxed)
    }

    pub(crate) fn parked_tablets(&self) -> usize {
        self.parked_tablets.load(Ordering::Relaxed)
    }

    /// Options for one RocksDB instance. `tablet` selects the per-Region layout: WAL off
    /// (callers disable it per write) and atomic flush, so the column families and the apply
    /// state are always persisted together.
    pub(crate) fn db_options(&self, tablet: bool) -> (Options, Vec<ColumnFamilyDescriptor>) {
        let mut db = self.base.clone();
        db.create_if_missing(true);
        db.create_missing_column_families(true);
        db.set_env(&self.env);
        db.set_write_buffer_manager(&self.wbm);
        db.set_max_background_jobs(self.config.max_background_jobs);
        // Errors only: RocksDB warns on every stalled write, which under a write-heavy load
        // would flood the log; stalls are visible in the memtable metrics instead.
        db.set_info_logger(InfoLogger::new_callback_logger(
            LogLevel::Error,
            // RocksDB prints its option dump at "header" level whatever the threshold: keep
            // that out of the error log.
            |level, msg| match level {
                LogLevel::Error | LogLevel::Fatal => {
                    tracing::error!(target: "rocksdb", "{}", msg.trim_end())
                }
                _ => tracing::debug!(target: "rocksdb", "{}", msg.trim_end()),
            },
        ));
        db.set_skip_stats_update_on_db_open(true);
        // SAFETY: `db` is a live Options object; the setter only stores a flag in it.
        unsafe {
            librocksdb_sys::rocksdb_options_set_avoid_flush_during_shutdown(
                rocksdb::AsRawPtr::as_raw_ptr(&db),
                u8::from(self.config.skip_flush_on_close),
            );
        }
        db.set_keep_log_file_num(1);
        if tablet {
            db.set_atomic_flush(true);
            db.set_max_open_files(self.config.max_open_files);
            // One shard: RocksDB rounds each shard's share of `max_open_files - 10` up to one
            // reader, so with its default 64 shards a tablet could keep 64 SSTs open, not 10,
            // and the descriptor budget (`storage::fds`) would be off by six times.
            db.set_table_cache_num_shard_bits(0);
            db.set_max_file_opening_threads(1);
            // A tablet's manifest rarely grows; keep it small so reopening is quick.
            db.set_max_manifest_file_size(4 << 20);
        } else {
            // One DB holds every Region: give it the file budget of many tablets (TiKV's
            // raft-kv default is 40960, above this machine's default fd limit of 20000).
            db.set_max_open_files(4096);
            db.set_max_total_wal_size(1 << 30);
        }
        let cfs = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), self.cf_options(tablet)))
            .collect();
        (db, cfs)
    }

    fn cf_options(&self, tablet: bool) -> Options {
        let mut cf = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&self.cache);
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        cf.set_block_based_table_factory(&table);
        cf.set_write_buffer_manager(&self.wbm);
        cf.set_write_buffer_size(self.config.write_buffer_size.0 as usize);
        cf.set_max_write_buffer_number(if tablet { 2 } else { 5 });
        cf.set_arena_block_size(ARENA_BLOCK_SIZE);
        cf.set_compression_type(DBCompressionType::Lz4);
        cf.set_bottommost_compression_type(DBCompressionType::Zstd);
        cf.set_level_compaction_dynamic_level_bytes(true);
        cf
    }
}

/// The RocksDB statistics of every store engine in this process (one in a store process; a
/// few in an in-process test cluster).
static STATS_SOURCES: std::sync::LazyLock<
    parking_lot::Mutex<Vec<std::sync::Weak<SharedResources>>>,
> = std::sync::LazyLock::new(Default::default);

/// The longest a tablet's opening waits for the parker when too many are open (see
/// `SharedResources::wait_for_room`): a parker round or two. Past it the tablet opens anyway;
/// the descriptor reserve and `storage::fds`'s retries take the rest.
const ADMISSION_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Wakes the parker of every store engine in the process: someone ran out of descriptors.
pub fn wake_parkers() {
    for s in STATS_SOURCES.lock().iter().filter_map(|w| w.upgrade()) {
        s.park_signal.wake();
    }
}

/// Copies RocksDB's byte counters into the engine metrics (called at each scrape): what
/// flushes, compactions and the WAL wrote, summed over every instance of every store engine
/// in the process. With the Raft log's bytes, this is where a store's write amplification
/// comes from.
pub fn export_engine_stats() {
    use rocksdb::statistics::Ticker;
    let sources: Vec<_> = STATS_SOURCES
        .lock()
        .iter()
        .filter_map(|w| w.upgrade())
        .collect();
    for (kind, ticker) in [
        ("flush_write", Ticker::FlushWriteBytes),
        ("compaction_write", Ticker::CompactWriteBytes),
        ("compaction_read", Ticker::CompactReadBytes),
        ("wal_write", Ticker::WalFileBytes),
    ] {
        let sum: u64 = sources
            .iter()
            .map(|s| s.base.get_ticker_count(ticker))
            .sum();
        crate::metrics::ENGINE_BYTES
            .with_label_values(&[kind])
            .set(sum as i64);
    }
    let stalled: u64 = sources
        .iter()
        .map(|s| s.base.get_ticker_count(Ticker::StallMicros))
        .sum();
    crate::metrics::ENGINE_WRITE_STALL_MICROS.set(stalled as i64);
}

/// RocksDB's errors keep their one distinction that matters above: `Corruption` (a checksum
/// or size mismatch, a damaged MANIFEST) means the files are not what was written, and the
/// replica must not serve them; everything else is an I/O or usage error.
pub(crate) fn rocks_err(path: &Path, e: rocksdb::Error) -> Error {
    if e.kind() == rocksdb::ErrorKind::Corruption {
        let detail = e.into_string();
        super::corruption::report(path, &detail);
        return Error::Corruption {
            what: format!("RocksDB files in {}", path.display()),
            detail,
        };
    }
    Error::Rocks {
        path: path.to_path_buf(),
        message: e.into_string(),
    }
}

/// Column family handles live as long as their DB.
pub(crate) fn cf_of(db: &DB, cf: Cf) -> &rocksdb::ColumnFamily {
    db.cf_handle(cf.name())
        .expect("every column family is created at open")
}

fn int_property(db: &DB, cf: Cf, name: &str) -> u64 {
    db.property_int_value_cf(cf_of(db, cf), name)
        .ok()
        .flatten()
        .unwrap_or(0)
}

fn flush_db(db: &DB, path: &Path, wait: bool) -> Result<()> {
    let mut opts = FlushOptions::default();
    opts.set_wait(wait);
    let cfs: Vec<_> = Cf::ALL.iter().map(|cf| cf_of(db, *cf)).collect();
    db.flush_cfs_opt(&cfs, &opts)
        .map_err(|e| rocks_err(path, e))
}

/// The RocksDB of a handle, or, while it is parked, what is known of it.
#[derive(Default)]
struct Slot {
    db: Option<Arc<DB>>,
    parked: Option<Arc<ParkedInfo>>,
}

/// A RocksDB instance, open or parked (closed until its next use: [`super::park`]). Dropping
/// the last reference closes it and, if it was marked destroyed, removes its directory: a
/// destroyed tablet stays readable by snapshots and iterators still alive, and its files go
/// when they are done.
///
/// Users borrow the open DB as an `Arc<DB>` for the length of one operation (a snapshot keeps
/// its own); a tablet parks only when nobody holds one.
pub(crate) struct DbHandle {
    slot: parking_lot::RwLock<Slot>,
    shared: Arc<SharedResources>,
    tablet: bool,
    pub(crate) path: PathBuf,
    /// Nanoseconds since [`SharedResources::epoch`] of the last read or write of data: what
    /// "idle" means to the parker. Metadata queries (sizes, apply state) do not count.
    last_used: AtomicU64,
    destroy_on_drop: AtomicBool,
    /// Where the directory moves once the instance is closed (a damaged tablet, quarantined
    /// while readers still held it).
    move_on_drop: parking_lot::Mutex<Option<PathBuf>>,
    /// A tablet's range as its newest view has it (None for the shared DB). A trim holds this
    /// lock from reading the range to the end of its flush, and a view that changes the range
    /// (a merge widening the tablet) takes it too: a trim started through an older, narrower
    /// view must not delete the keys a merge copies in for the wider range.
    owner_range: parking_lot::Mutex<Option<KeyRange>>,
}

impl DbHandle {
    /// Opens the RocksDB in `path` (creating it if missing).
    pub(crate) fn open(
        shared: &Arc<SharedResources>,
        path: &Path,
        tablet: bool,
    ) -> Result<Arc<DbHandle>> {
        let handle = Self::new(shared, path, tablet, Slot::default());
        handle.db()?;
        Ok(handle)
    }

    /// A tablet that parked before the store stopped stays closed: its record stands in
    /// until the first use. Others open now.
    pub(crate) fn open_lazily(shared: &Arc<SharedResources>, path: &Path) -> Result<Arc<DbHandle>> {
        match park::read_record(path) {
            Some(info) => {
                shared.parked_tablets.fetch_add(1, Ordering::Relaxed);
                crate::metrics::TABLETS_PARKED.inc();
                Ok(Self::new(
                    shared,
                    path,
                    true,
                    Slot {
                        db: None,
                        parked: Some(Arc::new(info)),
                    },
                ))
            }
            None => Self::open(shared, path, true),
        }
    }

    fn new(shared: &Arc<SharedResources>, path: &Path, tablet: bool, slot: Slot) -> Arc<DbHandle> {
        Arc::new(DbHandle {
            slot: parking_lot::RwLock::new(slot),
            shared: shared.clone(),
            tablet,
            path: path.to_path_buf(),
            last_used: AtomicU64::new(shared.now_ns()),
            destroy_on_drop: AtomicBool::new(false),
            move_on_drop: parking_lot::Mutex::new(None),
            owner_range: parking_lot::Mutex::new(None),
        })
    }

    /// The open DB, for a read or write of data (opening it if parked).
    pub(crate) fn db(&self) -> Result<Arc<DB>> {
        self.last_used
            .store(self.shared.now_ns(), Ordering::Relaxed);
        self.db_quiet()
    }

    /// The open DB (opening it if parked), without counting as a use: for metadata that the
    /// parked record could not answer.
    pub(crate) fn db_quiet(&self) -> Result<Arc<DB>> {
        if let Some(db) = &self.slot.read().db {
            return Ok(db.clone());
        }
        let mut slot = self.slot.write();
        if let Some(db) = &slot.db {
            return Ok(db.clone());
        }
        // The record goes first, durably: it must never describe a tablet that changed.
        park::remove_record(&self.path)?;
        crate::crash_point!("park_unpark_after_record_removed");
        if self.tablet {
            self.shared.wait_for_room();
        }
        // Out of descriptors, this waits for the parker (back-pressure, `storage::fds`): the
        // open serves an apply, a read or a split, none of which may simply fail for it.
        let shared = self.shared.clone();
        let db = super::fds::retry_while_exhausted(
            "opening a tablet",
            &|| shared.park_signal.wake(),
            |e: &Error| e.is_fd_exhaustion(),
            || {
                let (opts, cfs) = self.shared.db_options(self.tablet);
                DB::open_cf_descriptors(&opts, &self.path, cfs)
                    .map_err(|e| rocks_err(&self.path, e))
            },
        )?;
        let db = Arc::new(db);
        if self.tablet {
            if slot.parked.take().is_some() {
                self.shared.parked_tablets.fetch_sub(1, Ordering::Relaxed);
                crate::metrics::TABLETS_PARKED.dec();
                crate::metrics::TABLET_UNPARKS.inc();
            }
            let open = self.shared.open_tablets.fetch_add(1, Ordering::Relaxed) + 1;
            crate::metrics::TABLETS_OPEN.inc();
            if open > self.shared.tablet_cap() {
                self.shared.park_signal.wake();
            }
        }
        slot.db = Some(db.clone());
        Ok(db)
    }

    /// The DB if it is open; never opens it.
    fn open_db(&self) -> Option<Arc<DB>> {
        self.slot.read().db.clone()
    }

    pub(crate) fn is_open(&self) -> bool {
        self.slot.read().db.is_some()
    }

    /// What the tablet's record says, while it is parked.
    pub(crate) fn parked_info(&self) -> Option<Arc<ParkedInfo>> {
        self.slot.read().parked.clone()
    }

    pub(crate) fn last_used_ns(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Closes the DB if nobody is using it and `describe` (given the open DB, under the
    /// handle's lock, so nothing reads or writes meanwhile) says it may go, with the record
    /// to keep. Returns whether it parked.
    pub(crate) fn try_park(
        &self,
        describe: impl FnOnce(&DB) -> Result<Option<ParkedInfo>>,
    ) -> Result<bool> {
        let mut slot = self.slot.write();
        let Some(db) = slot.db.take() else {
            return Ok(false);
        };
        // Only the slot holds it: no read, write or snapshot is in flight, and none can
        // start while we hold the lock.
        let db = match Arc::try_unwrap(db) {
            Ok(db) => db,
            Err(shared) => {
                slot.db = Some(shared);
                return Ok(false);
            }
        };
        let info = match describe(&db) {
            Ok(Some(info)) => info,
            other => {
                slot.db = Some(Arc::new(db));
                return other.map(|_| false);
            }
        };
        drop(db); // closes the RocksDB: its files no longer change
        self.shared.open_tablets.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::TABLETS_OPEN.dec();
        // Without the record the tablet is merely closed: its next use opens it the ordinary
        // way, and so does a restart.
        crate::crash_point!("park_before_record");
        park::write_record(&self.path, &info)?;
        slot.parked = Some(Arc::new(info));
        self.shared.parked_tablets.fetch_add(1, Ordering::Relaxed);
        crate::metrics::TABLETS_PARKED.inc();
        crate::metrics::TABLET_PARKS.inc();
        Ok(true)
    }

    pub(crate) fn mark_destroyed(&self) {
        self.destroy_on_drop.store(true, Ordering::SeqCst);
    }

    /// Moves the directory to `dest` when the last user drops the handle (after closing).
    pub(crate) fn move_when_closed(&self, dest: PathBuf) {
        *self.move_on_drop.lock() = Some(dest);
    }

    fn int_property(&self, cf: Cf, name: &str) -> u64 {
        self.open_db().map_or(0, |db| int_property(&db, cf, name))
    }

    /// Bytes of this instance's memtables, active and immutable (0 while parked).
    pub(crate) fn memtable_bytes(&self) -> u64 {
        Cf::ALL
            .iter()
            .map(|cf| self.int_property(*cf, "rocksdb.cur-size-all-mem-tables"))
            .sum()
    }

    /// Bytes of this instance's active (mutable) memtables (0 while parked).
    pub(crate) fn active_memtable_bytes(&self) -> u64 {
        Cf::ALL
            .iter()
            .map(|cf| self.int_property(*cf, "rocksdb.cur-size-active-mem-table"))
            .sum()
    }

    /// Entries not yet flushed, in active and immutable memtables (0 while parked).
    pub(crate) fn unflushed_entries(&self) -> u64 {
        Cf::ALL
            .iter()
            .map(|cf| {
                self.int_property(*cf, "rocksdb.num-entries-active-mem-table")
                    + self.int_property(*cf, "rocksdb.num-entries-imm-mem-tables")
            })
            .sum()
    }

    /// Flushes the memtables; a parked tablet has none.
    pub(crate) fn flush(&self, wait: bool) -> Result<()> {
        match self.open_db() {
            Some(db) => flush_db(&db, &self.path, wait),
            None => Ok(()),
        }
    }

    /// Writes a raw batch without WAL and flushes it: used for metadata that must be durable at
    /// once in a tablet (a split child's first apply state).
    pub(crate) fn write_durable(&self, wb: rocksdb::WriteBatch, tablet: bool) -> Result<()> {
        let db = self.db()?;
        let mut wo = WriteOptions::default();
        wo.disable_wal(tablet);
        db.write_opt(wb, &wo)
            .map_err(|e| rocks_err(&self.path, e))?;
        if tablet {
            flush_db(&db, &self.path, true)
        } else {
            self.sync_wal()
        }
    }

    /// Writes a consistent copy of the DB into `dir`, hard-linking its SST files.
    pub(crate) fn checkpoint(&self, dir: &Path) -> Result<()> {
        let db = self.db()?;
        let cp = Checkpoint::new(&db).map_err(|e| rocks_err(&self.path, e))?;
        cp.create_checkpoint(dir).map_err(|e| rocks_err(dir, e))
    }

    pub(crate) fn sync_wal(&self) -> Result<()> {
        self.db()?
            .flush_wal(true)
            .map_err(|e| rocks_err(&self.path, e))
    }
}

impl Drop for DbHandle {
    fn drop(&mut self) {
        // Close first: RocksDB must not have files open in a directory we remove.
        let slot = self.slot.get_mut();
        if let Some(db) = slot.db.take() {
            // Every borrower holds the handle too (a snapshot keeps both), so the slot's
            // reference is the last one. If not, RocksDB still has the files open: leave them.
            if Arc::try_unwrap(db).is_err() {
                tracing::error!(path = %self.path.display(), "RocksDB still in use when its handle dropped: its directory stays");
                return;
            }
            if self.tablet {
                self.shared.open_tablets.fetch_sub(1, Ordering::Relaxed);
                crate::metrics::TABLETS_OPEN.dec();
            }
        } else if slot.parked.take().is_some() {
            self.shared.parked_tablets.fetch_sub(1, Ordering::Relaxed);
            crate::metrics::TABLETS_PARKED.dec();
        }
        if self.destroy_on_drop.load(Ordering::SeqCst) {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "removing destroyed RocksDB failed");
            }
        } else if let Some(dest) = self.move_on_drop.lock().take() {
            if let Err(e) = std::fs::rename(&self.path, &dest) {
                tracing::warn!(path = %self.path.display(), dest = %dest.display(), error = %e, "moving a quarantined RocksDB failed");
            }
        }
    }
}

/// Which layout a [`RocksRegion`] lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The RocksDB holds this Region only; WAL off.
    Tablet,
    /// The RocksDB is shared by all Regions; WAL on.
    Shared,
}

/// One Region's view of a RocksDB instance.
pub(crate) struct RocksRegion {
    pub(crate) handle: Arc<DbHandle>,
    pub(crate) region_id: RegionId,
    pub(crate) range: KeyRange,
    pub(crate) tablet_index: Index,
    pub(crate) layout: Layout,
    /// Engine keys bounding the Region's data.
    data_start: Vec<u8>,
    data_end: Vec<u8>,
    /// The last applied index written, asserted monotonic at the durability boundary.
    last_applied: AtomicU64,
    /// Nanoseconds since [`SharedResources::epoch`] of the oldest write not yet flushed; 0 when
    /// clean (tablets only; read by the flush controller).
    pub(crate) oldest_unflushed_ns: AtomicU64,
    shared: Arc<SharedResources>,
    /// Called after every write so the flush controller can react to memory pressure.
    on_write: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl RocksRegion {
    pub(crate) fn new(
        handle: Arc<DbHandle>,
        region_id: RegionId,
        range: KeyRange,
        tablet_index: Index,
        layout: Layout,
        shared: Arc<SharedResources>,
        on_write: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Result<RocksRegion> {
        let data_start = keys::data_key(&range.start);
        let data_end = keys::data_end_key(&range.end);
        if layout == Layout::Tablet {
            // The newest view defines what the tablet owns (waits for a running trim).
            *handle.owner_range.lock() = Some(range.clone());
        }
        let region = RocksRegion {
            handle,
            region_id,
            range,
            tablet_index,
            layout,
            data_start,
            data_end,
            last_applied: AtomicU64::new(0),
            oldest_unflushed_ns: AtomicU64::new(0),
            shared,
            on_write,
        };
        let applied = region.apply_state()?.map_or(0, |s| s.applied_index);
        region.last_applied.store(applied, Ordering::SeqCst);
        Ok(region)
    }

    fn write_options(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        // Tablets write no WAL: the Raft log is the only log (see the recovery invariant in
        // `storage/mod.rs`). The shared DB keeps its WAL but does not sync it per write.
        wo.disable_wal(self.layout == Layout::Tablet);
        wo
    }

    /// Clips a user range to the Region and turns it into engine keys.
    fn bounds(&self, start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let lo = if start > self.range.start.as_slice() {
            keys::data_key(start)
        } else {
            self.data_start.clone()
        };
        let hi = if end.is_empty() {
            self.data_end.clone()
        } else {
            let e = keys::data_key(end);
            e.min(self.data_end.clone())
        };
        (lo, hi)
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if self.range.contains(key) {
            Ok(())
        } else {
            Err(Error::KeyNotInRange {
                region_id: self.region_id,
                key: key.to_vec(),
                range: self.range.clone(),
            })
        }
    }

    fn read_apply_state(&self, opts: ReadOptions) -> Result<Option<RaftApplyState>> {
        let db = self.handle.db_quiet()?;
        read_apply_state(&db, &self.handle.path, self.region_id, opts)
    }

    /// The parked record, if the tablet is parked and the record speaks of this view.
    fn parked(&self) -> Option<Arc<ParkedInfo>> {
        self.handle.parked_info().filter(|i| {
            i.region_id == self.region_id && i.start == self.range.start && i.end == self.range.end
        })
    }

    fn approximate_size_in(&self, db: &DB) -> u64 {
        Cf::ALL
            .iter()
            .map(|cf| {
                let range = rocksdb::Range::new(&self.data_start, &self.data_end);
                db.get_approximate_sizes_cf(cf_of(db, *cf), &[range])
                    .iter()
                    .sum::<u64>()
            })
            .sum()
    }

    /// Parks the tablet (see [`super::park`]) if it is open, unused and idle enough to be
    /// worth it: flushed first, then closed only when no compaction runs or waits (closing
    /// would abandon it) and no split garbage is left to trim. Returns whether it parked.
    pub(crate) fn try_park(&self) -> Result<bool> {
        if self.layout != Layout::Tablet {
            return Ok(false);
        }
        // Only the view that owns the tablet's range describes it.
        if self.handle.owner_range.lock().as_ref() != Some(&self.range) {
            return Ok(false);
        }
        self.handle.try_park(|db| {
            if Cf::ALL.iter().any(|cf| {
                int_property(db, *cf, "rocksdb.num-entries-active-mem-table")
                    + int_property(db, *cf, "rocksdb.num-entries-imm-mem-tables")
                    > 0
            }) {
                crate::metrics::TABLET_FLUSHES
                    .with_label_values(&["park"])
                    .inc();
                self.oldest_unflushed_ns.store(0, Ordering::SeqCst);
                flush_db(db, &self.handle.path, true)?;
            }
            // A tablet with a compaction pending waits to park, so that it does not reopen
            // to compact, unless descriptors run low: then it goes too (closing only waits for
            // running jobs), and compacts when it next opens.
            let short = super::fds::near_limit();
            let busy = Cf::ALL.iter().any(|cf| {
                [
                    "rocksdb.compaction-pending",
                    "rocksdb.num-running-compactions",
                    "rocksdb.num-running-flushes",
                    "rocksdb.mem-table-flush-pending",
                ]
                .iter()
                .filter(|p| !(short && **p == "rocksdb.compaction-pending"))
                .any(|p| int_property(db, *cf, p) > 0)
            });
            if busy {
                return Ok(None);
            }
            // A split child parks before its trim if it must: in a storm of splits the trims
            // queue up, and tablets held open until their turn would exhaust the descriptors.
            // The queued trim reopens it; until then the record says it needs one.
            let untrimmed = self.has_outside_data(db)?;
            let mut persisted = ReadOptions::default();
            persisted.set_read_tier(ReadTier::Persisted);
            let applied = read_apply_state(db, &self.handle.path, self.region_id, persisted)?;
            // Durability boundary: a parked tablet is trusted through its record's index, so
            // everything applied must be in the flushed files.
            let latest = read_apply_state(
                db,
                &self.handle.path,
                self.region_id,
                ReadOptions::default(),
            )?;
            assert_eq!(
                applied,
                latest,
                "Region {}: parking a tablet whose apply state is not flushed ({})",
                self.region_id,
                self.handle.path.display()
            );
            let estimate: u64 = Cf::ALL
                .iter()
                .map(|cf| int_property(db, *cf, "rocksdb.estimate-num-keys"))
                .sum();
            let keys = if estimate <= super::EXACT_KEY_COUNT_BELOW {
                self.count_keys_in(db, super::EXACT_KEY_COUNT_BELOW)?
            } else {
                estimate
            };
            Ok(Some(ParkedInfo {
                region_id: self.region_id,
                start: self.range.start.clone(),
                end: self.range.end.clone(),
                apply_state: applied,
                approximate_size: self.approximate_size_in(db),
                approximate_keys: keys,
                untrimmed,
            }))
        })
    }

    /// Keys in the Region's range over every column family, counting no further than `limit`
    /// (past it, `limit + 1`).
    fn count_keys_in(&self, db: &DB, limit: u64) -> Result<u64> {
        let mut n = 0u64;
        for cf in Cf::ALL {
            scan_db(
                db,
                &self.handle.path,
                None,
                cf,
                self.data_start.clone(),
                self.data_end.clone(),
                ScanDir::Forward,
                &mut |_, _| {
                    n += 1;
                    n <= limit
                },
            )?;
            if n > limit {
                break;
            }
        }
        Ok(n)
    }

    /// Whether the DB holds keys outside the range (a split child not yet trimmed).
    fn has_outside_data(&self, db: &DB) -> Result<bool> {
        for (lo, hi) in self.outside_ranges() {
            for cf in Cf::ALL {
                let mut found = false;
                scan_db(
                    db,
                    &self.handle.path,
                    None,
                    cf,
                    lo.clone(),
                    hi.clone(),
                    ScanDir::Forward,
                    &mut |_, _| {
                        found = true;
                        false
                    },
                )?;
                if found {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

fn read_apply_state(
    db: &DB,
    path: &Path,
    region_id: RegionId,
    opts: ReadOptions,
) -> Result<Option<RaftApplyState>> {
    let raw = db
        .get_cf_opt(
            cf_of(db, Cf::Default),
            keys::apply_state_key(region_id),
            &opts,
        )
        .map_err(|e| rocks_err(path, e))?;
    match raw {
        None => Ok(None),
        Some(bytes) => RaftApplyState::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| Error::Corruption {
                what: format!("apply state of Region {region_id} in {}", path.display()),
                detail: e.to_string(),
            }),
    }
}

impl RegionEngine for RocksRegion {
    fn region_id(&self) -> RegionId {
        self.region_id
    }

    fn range(&self) -> &KeyRange {
        &self.range
    }

    fn tablet_index(&self) -> Index {
        self.tablet_index
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_key(key)?;
        let db = self.handle.db()?;
        db.get_cf(cf_of(&db, cf), keys::data_key(key))
            .map_err(|e| rocks_err(&self.handle.path, e))
    }

    fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        dir: ScanDir,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let (lo, hi) = self.bounds(start, end);
        let db = self.handle.db()?;
        scan_db(&db, &self.handle.path, None, cf, lo, hi, dir, f)
    }

    fn write(&self, batch: &WriteBatch) -> Result<()> {
        let db = self.handle.db()?;
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                Op::Put(cf, k, v) => {
                    self.check_key(k)?;
                    wb.put_cf(cf_of(&db, *cf), keys::data_key(k), v);
                }
                Op::Delete(cf, k) => {
                    self.check_key(k)?;
                    wb.delete_cf(cf_of(&db, *cf), keys::data_key(k));
                }
                Op::DeleteRange(cf, s, e) => {
                    // An empty end means "to the Region's end".
                    let end_ok = e.is_empty() || self.range.end.is_empty() || e <= &self.range.end;
                    if s < &self.range.start || !end_ok {
                        return Err(Error::KeyNotInRange {
                            region_id: self.region_id,
                            key: s.clone(),
                            range: self.range.clone(),
                        });
                    }
                    let (lo, hi) = self.bounds(s, e);
                    if lo < hi {
                        wb.delete_range_cf(cf_of(&db, *cf), lo, hi);
                    }
                }
            }
        }
        if let Some(state) = &batch.apply_state {
            // Durability boundary: the applied index only moves forward. A regression means
            // two appliers or a replayed batch, and writing it would corrupt recovery.
            let prev = self.last_applied.load(Ordering::SeqCst);
            assert!(
                state.applied_index >= prev,
                "Region {} apply state goes backwards: {} -> {} in {}",
                self.region_id,
                prev,
                state.applied_index,
                self.handle.path.display()
            );
            wb.put_cf(
                cf_of(&db, Cf::Default),
                keys::apply_state_key(self.region_id),
                state.encode_to_vec(),
            );
        }
        if self.layout == Layout::Tablet && self.oldest_unflushed_ns.load(Ordering::Relaxed) == 0 {
            let now = self.shared.now_ns();
            let _ = self.oldest_unflushed_ns.compare_exchange(
                0,
                now,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        db.write_opt(wb, &self.write_options())
            .map_err(|e| rocks_err(&self.handle.path, e))?;
        if let Some(state) = &batch.apply_state {
            self.last_applied
                .fetch_max(state.applied_index, Ordering::SeqCst);
        }
        if let Some(cb) = &self.on_write {
            cb();
        }
        Ok(())
    }

    fn snapshot(&self) -> Box<dyn Snapshot> {
        match self.handle.db() {
            Ok(db) => Box::new(RocksSnapshot::new(
                db,
                self.handle.clone(),
                self.bounds(&[], &[]),
                self.range.clone(),
                self.region_id,
            )),
            // The tablet could not open: every read of the snapshot says why.
            Err(e) => Box::new(FailedSnapshot(
                e.to_string(),
                matches!(e, Error::Corruption { .. }),
            )),
        }
    }

    fn apply_state(&self) -> Result<Option<RaftApplyState>> {
        if let Some(info) = self
            .handle
            .parked_info()
            .filter(|i| i.region_id == self.region_id)
        {
            return Ok(info.apply_state);
        }
        self.read_apply_state(ReadOptions::default())
    }

    fn persisted_apply_state(&self) -> Result<Option<RaftApplyState>> {
        match self.layout {
            Layout::Tablet => {
                if self.handle.parked_info().is_some() {
                    // Parked flushed: the apply state is the durable one.
                    return self.apply_state();
                }
                // With the WAL off, the persisted tier is exactly the flushed SSTs.
                let mut opts = ReadOptions::default();
                opts.set_read_tier(ReadTier::Persisted);
                self.read_apply_state(opts)
            }
            Layout::Shared => {
                let state = self.apply_state()?;
                self.handle.sync_wal()?;
                Ok(state)
            }
        }
    }

    fn approximate_size(&self) -> Result<u64> {
        if let Some(info) = self.parked() {
            return Ok(info.approximate_size);
        }
        let db = self.handle.db_quiet()?;
        Ok(self.approximate_size_in(&db))
    }

    fn approximate_keys(&self) -> Result<u64> {
        if let Some(info) = self.parked() {
            return Ok(info.approximate_keys);
        }
        let db = self.handle.db_quiet()?;
        let total: u64 = Cf::ALL
            .iter()
            .map(|cf| int_property(&db, *cf, "rocksdb.estimate-num-keys"))
            .sum();
        match self.layout {
            Layout::Tablet => Ok(total),
            Layout::Shared => {
                // The shared DB only knows its total: scale it by this Region's share of the
                // bytes. Good enough for split checks, which re-scan before splitting.
                let whole_size: u64 = Cf::ALL
                    .iter()
                    .map(|cf| {
                        let whole = rocksdb::Range::new(&[keys::DATA_PREFIX], keys::DATA_END);
                        db.get_approximate_sizes_cf(cf_of(&db, *cf), &[whole])
                            .iter()
                            .sum::<u64>()
                    })
                    .sum();
                if whole_size == 0 {
                    return Ok(0);
                }
                let mine = self.approximate_size_in(&db);
                Ok(((total as u128 * mine as u128) / whole_size as u128) as u64)
            }
        }
    }

    fn is_parked(&self) -> bool {
        self.parked().is_some()
    }

    fn count_keys(&self, limit: u64) -> Result<u64> {
        if let Some(info) = self.parked() {
            if limit <= super::EXACT_KEY_COUNT_BELOW || info.approximate_keys <= limit {
                return Ok(info.approximate_keys.min(limit.saturating_add(1)));
            }
        }
        let db = self.handle.db_quiet()?;
        self.count_keys_in(&db, limit)
    }

    fn checkpoint(&self, dir: &Path) -> Result<()> {
        self.handle.checkpoint(dir)
    }

    fn flush(&self, wait: bool) -> Result<()> {
        // Reset before flushing: a write racing with the flush sets a new (later) stamp, which is
        // conservative, never too young.
        self.oldest_unflushed_ns.store(0, Ordering::SeqCst);
        self.handle.flush(wait)
    }

    fn memtable_bytes(&self) -> u64 {
        self.handle.memtable_bytes()
    }

    fn background_work_pending(&self) -> bool {
        Cf::ALL.iter().any(|cf| {
            [
                "rocksdb.compaction-pending",
                "rocksdb.num-running-compactions",
                "rocksdb.num-running-flushes",
                "rocksdb.mem-table-flush-pending",
            ]
            .iter()
            .any(|p| self.handle.int_property(*cf, p) > 0)
        })
    }

    fn needs_trim(&self) -> Result<bool> {
        if self.layout == Layout::Shared {
            return Ok(false);
        }
        if let Some(p) = self.parked() {
            // Nothing changes a parked tablet: as its record says.
            return Ok(p.untrimmed);
        }
        let db = self.handle.db_quiet()?;
        self.has_outside_data(&db)
    }

    fn trim(&self) -> Result<()> {
        if self.layout == Layout::Shared {
            return Ok(());
        }
        let owner = self.handle.owner_range.lock();
        if owner.as_ref() != Some(&self.range) {
            // A newer view (a merge widened the tablet) owns it now; trimming by this one would
            // delete keys the tablet now owns. The newer view trims when asked.
            tracing::info!(
                region_id = self.region_id,
                "trim skipped: the tablet's range changed since this view"
            );
            return Ok(());
        }
        let ranges = self.outside_ranges();
        if ranges.is_empty() {
            return Ok(());
        }
        let db = self.handle.db_quiet()?;
        let mut wb = rocksdb::WriteBatch::default();
        for (lo, hi) in &ranges {
            for cf in Cf::ALL {
                wb.delete_range_cf(cf_of(&db, cf), lo, hi);
            }
        }
        // No WAL, like every tablet write; the flush makes the range deletions durable (a crash
        // before it only means trimming again: `needs_trim` is recomputed from the data).
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        db.write_opt(wb, &wo)
            .map_err(|e| rocks_err(&self.handle.path, e))?;
        crate::metrics::TABLET_FLUSHES
            .with_label_values(&["trim"])
            .inc();
        flush_db(&db, &self.handle.path, true)?;
        // The garbage stays hidden under the range deletions until ordinary compaction meets
        // it; a split child shares its parent's files by hard link meanwhile, so this costs
        // no extra space at first. Compacting the outside ranges here, as a first version did,
        // rewrote every SST straddling the boundary, which after a split is nearly the child's
        // whole data.
        //
        // SSTs wholly above the range go at once, without a rewrite. Not those below it:
        // RocksDB's DeleteFilesInRange (all the C API offers) includes the range's end, so a
        // file whose last key is the Region's first key would go with that key. Above the
        // range the end is `DATA_END`, which no key reaches.
        //
        // Still under the owner lock: a merge that widens the tablet to the right copies the
        // source's keys in and flushes them, and in `lock` or `write` those can make SSTs lying
        // wholly above the old range's end, which the deletion below would drop. (It only
        // touches metadata, so the merge waits milliseconds.)
        fail::fail_point!("trim_before_dropping_files");
        if self.data_end.as_slice() < keys::DATA_END {
            for cf in Cf::ALL {
                db.delete_file_in_range_cf(
                    cf_of(&db, cf),
                    self.data_end.as_slice(),
                    keys::DATA_END,
                )
                .map_err(|e| rocks_err(&self.handle.path, e))?;
            }
        }
        drop(owner);
        Ok(())
    }
}

impl RocksRegion {
    /// The engine-key ranges of data outside this Region's range.
    fn outside_ranges(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut v = Vec::new();
        let data_min = keys::data_key(b"");
        if self.data_start > data_min {
            v.push((data_min, self.data_start.clone()));
        }
        if self.data_end.as_slice() < keys::DATA_END {
            v.push((self.data_end.clone(), keys::DATA_END.to_vec()));
        }
        v
    }
}

/// A RocksDB snapshot that owns its database.
struct RocksSnapshot {
    // Field order matters: `snap` borrows from `db` and must drop first.
    snap: rocksdb::SnapshotWithThreadMode<'static, DB>,
    db: Arc<DB>,
    /// Keeps the handle (and so the directory) alive; the DB cannot park while `db` is held.
    handle: Arc<DbHandle>,
    bounds: (Vec<u8>, Vec<u8>),
    range: KeyRange,
    region_id: RegionId,
}

impl RocksSnapshot {
    fn new(
        db: Arc<DB>,
        handle: Arc<DbHandle>,
        bounds: (Vec<u8>, Vec<u8>),
        range: KeyRange,
        region_id: RegionId,
    ) -> Self {
        let snap = db.snapshot();
        // SAFETY: the snapshot borrows the DB inside the `Arc` kept beside it, at a stable
        // address for as long as this struct exists; `snap` is declared first, so it is
        // dropped before `db`.
        let snap: rocksdb::SnapshotWithThreadMode<'static, DB> =
            unsafe { std::mem::transmute(snap) };
        RocksSnapshot {
            snap,
            db,
            handle,
            bounds,
            range,
            region_id,
        }
    }
}

impl Snapshot for RocksSnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if !self.range.contains(key) {
            return Err(Error::KeyNotInRange {
                region_id: self.region_id,
                key: key.to_vec(),
                range: self.range.clone(),
            });
        }
        self.snap
            .get_cf(cf_of(&self.db, cf), keys::data_key(key))
            .map_err(|e| rocks_err(&self.handle.path, e))
    }

    fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        dir: ScanDir,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let (rs, re) = &self.bounds;
        let lo = keys::data_key(start).max(rs.clone());
        let hi = if end.is_empty() {
            re.clone()
        } else {
            keys::data_key(end).min(re.clone())
        };
        scan_db(
            &self.db,
            &self.handle.path,
            Some(&self.snap),
            cf,
            lo,
            hi,
            dir,
            f,
        )
    }

    fn export_ssts(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let (lo, hi) = self.bounds.clone();
        for cf in Cf::ALL {
            let mut opts = ReadOptions::default();
            opts.set_iterate_lower_bound(lo.clone());
            opts.set_iterate_upper_bound(hi.clone());
            let mut it = self.snap.raw_iterator_cf_opt(cf_of(&self.db, cf), opts);
            it.seek_to_first();
            if !it.valid() {
                it.status().map_err(|e| rocks_err(&self.handle.path, e))?;
                continue; // RocksDB cannot write an empty SST
            }
            let path = dir.join(format!("{}.sst", cf.name()));
            let wopts = Options::default();
            let mut w = rocksdb::SstFileWriter::create(&wopts);
            w.open(&path).map_err(|e| rocks_err(&path, e))?;
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                w.put(k, v).map_err(|e| rocks_err(&path, e))?;
                it.next();
            }
            it.status().map_err(|e| rocks_err(&self.handle.path, e))?;
            w.finish().map_err(|e| rocks_err(&path, e))?;
        }
        Ok(())
    }
}

/// The snapshot of a tablet that failed to open: each read returns the failure.
struct FailedSnapshot(String, bool);

impl FailedSnapshot {
    fn err(&self) -> Error {
        if self.1 {
            Error::Corruption {
                what: "tablet".into(),
                detail: self.0.clone(),
            }
        } else {
            Error::Other(self.0.clone())
        }
    }
}

impl Snapshot for FailedSnapshot {
    fn get(&self, _cf: Cf, _key: &[u8]) -> Result<Option<Vec<u8>>> {
        Err(self.err())
    }

    fn scan(
        &self,
        _cf: Cf,
        _start: &[u8],
        _end: &[u8],
        _dir: ScanDir,
        _f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        Err(self.err())
    }

    fn export_ssts(&self, _dir: &Path) -> Result<()> {
        Err(self.err())
    }
}

/// Ingests the `<cf>.sst` files of a scan-based snapshot in `dir` into `db` after deleting the
/// engine-key range `[lo, hi)` in every column family; the ingested files sort above the
/// deletion, so the range ends up holding exactly the snapshot.
pub(crate) fn ingest_snapshot(
    handle: &DbHandle,
    lo: &[u8],
    hi: &[u8],
    dir: &Path,
    apply_key: &[u8],
    applied: &RaftApplyState,
) -> Result<()> {
    let db = handle.db()?;
    let mut wb = rocksdb::WriteBatch::default();
    for cf in Cf::ALL {
        wb.delete_range_cf(cf_of(&db, cf), lo, hi);
    }
    db.write(wb).map_err(|e| rocks_err(&handle.path, e))?;
    // RocksDB moves an ingested file (links it in, then unlinks the original). The received
    // files must outlive the install, though: until the apply state below is synced, a crash
    // makes the restart run this install again from them, and had they gone, it would clear
    // the range, ingest nothing and record the snapshot's index over an empty Region. So each
    // file is ingested through a hard link of its own in `dir/ingest/`; the originals stay.
    let staging = dir.join("ingest");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    for cf in Cf::ALL {
        let path = dir.join(format!("{}.sst", cf.name()));
        if !path.exists() {
            continue;
        }
        let link = staging.join(format!("{}.sst", cf.name()));
        std::fs::hard_link(&path, &link).map_err(|e| Error::io(&link, e))?;
        let mut opts = rocksdb::IngestExternalFileOptions::default();
        opts.set_move_files(true);
        db.ingest_external_file_cf_opts(cf_of(&db, cf), &opts, vec![&link])
            .map_err(|e| rocks_err(&link, e))?;
    }
    crate::crash_point!("snapshot_ingest_before_apply_state");
    let mut wb = rocksdb::WriteBatch::default();
    wb.put_cf(cf_of(&db, Cf::Default), apply_key, applied.encode_to_vec());
    db.write(wb).map_err(|e| rocks_err(&handle.path, e))?;
    handle.sync_wal()
}

#[allow(clippy::too_many_arguments)]
fn scan_db(
    db: &DB,
    path: &Path,
    snap: Option<&rocksdb::SnapshotWithThreadMode<'static, DB>>,
    cf: Cf,
    lo: Vec<u8>,
    hi: Vec<u8>,
    dir: ScanDir,
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) -> Result<()> {
    if lo >= hi {
        return Ok(());
    }
    let mut opts = ReadOptions::default();
    opts.set_iterate_lower_bound(lo);
    opts.set_iterate_upper_bound(hi);
    let mut it = match snap {
        Some(s) => s.raw_iterator_cf_opt(cf_of(db, cf), opts),
        None => db.raw_iterator_cf_opt(cf_of(db, cf), opts),
    };
    match dir {
        ScanDir::Forward => it.seek_to_first(),
        ScanDir::Reverse => it.seek_to_last(),
    }
    while it.valid() {
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            break;
        };
        if !f(keys::origin_key(k), v) {
            return Ok(());
        }
        match dir {
            ScanDir::Forward => it.next(),
            ScanDir::Reverse => it.prev(),
        }
    }
    it.status().map_err(|e| rocks_err(path, e))
}
