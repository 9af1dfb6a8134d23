//! Parking: idle tablets are closed, and reopened on their next use.
//!
//! A store may hold 20,000 Region replicas, most of them idle. An open RocksDB costs file
//! descriptors (its `MANIFEST`, WAL, `LOCK` and open SSTs: about 6 when idle, up to
//! `rocksdb.max-open-files + 4` when busy) and about 1 MiB of memory (table readers, empty
//! memtables, version metadata). 20,000 open tablets need about 120,000 descriptors and 20 GiB,
//! so they cannot all be open. A parked tablet costs neither: its RocksDB is closed, and its
//! [`DbHandle`](super::rocks::DbHandle) keeps only what the Raftstore asks of an idle Region
//! (its apply state, approximate size and keys), read at the moment it closed.
//!
//! ```text
//!             idle for rocksdb.tablet-idle-timeout, or least recently used
//!             while more than rocksdb.max-open-tablets are open
//!   open ───────────────────────────────────────────────────────────────▶ parked
//!     ▲      flush (wait) · no reader · no compaction · trimmed · close ·   │
//!     │      write the PARKED record                                        │
//!     └──────────────────────────────────────────────────────────────────────┘
//!            any read or write: remove the PARKED record (durably) · open
//! ```
//!
//! **The PARKED record** (`<tablet>/PARKED`) lets a restart skip opening parked tablets, which
//! is what makes a restart with 20,000 Regions fast. It is a cache, never the truth: it is
//! written after the RocksDB closed (so it describes files that no longer change), and it is
//! removed, and the removal synced, *before* the RocksDB opens again (so it never outlives the
//! state it describes, even across a crash). A record that fails its checksum or does not
//! parse is ignored and removed, and the tablet opens the ordinary way.
//!
//! Parking is safe under the recovery invariant because a tablet parks only fully flushed:
//! its durable apply state is its apply state, so Raft-log GC and a restart see the same
//! index whether it is open or not. A damaged parked tablet is found when it next opens:
//! RocksDB's `Corruption` there refuses the replica like one met while serving
//! (`storage::corruption`); the start-up check that opens every tablet does not open parked
//! ones.
//!
//! The [`Parker`] thread runs a round every [`ROUND`], and at once when a tablet opens (or
//! reopens) above the cap, so the cap is exceeded only while a round catches up. It parks at most [`PARKS_PER_ROUND`] tablets a round.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use prkv_proto::serverpb::RaftApplyState;
use serde::{Deserialize, Serialize};

use super::rocks::{RocksRegion, SharedResources};
use super::{Error, RegionId, Result};

/// The record's file name inside the tablet directory.
pub const RECORD: &str = "PARKED";
const RECORD_TMP: &str = "PARKED.tmp";

/// How often the parker looks for idle tablets: idle timeouts are minutes, so a second is
/// precise enough, and a round over 20,000 tablets reads one atomic per tablet.
const ROUND: Duration = Duration::from_secs(1);
/// Tablets parked per round at most. Parking one takes a flush (if anything is unflushed) and
/// a close, a few milliseconds: 64 keep a round well under a second, so the cap catches up
/// with a burst of new tablets (a batch split) within seconds without hogging a core.
const PARKS_PER_ROUND: usize = 64;

/// What the Raftstore needs of an idle Region, as of the moment its tablet closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParkedInfo {
    /// The Region and key range the figures below were computed for. A view with another
    /// range (a merge widened it) opens the tablet rather than trust them.
    pub region_id: RegionId,
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    /// The apply state in the tablet, durable (the tablet parked flushed); `None` if none.
    #[serde(with = "apply_state_bytes")]
    pub apply_state: Option<RaftApplyState>,
    pub approximate_size: u64,
    /// Exact below [`super::EXACT_KEY_COUNT_BELOW`] (counted when parking), else the estimate.
    pub approximate_keys: u64,
    /// The tablet still holds keys outside the range (a split child parked before its trim,
    /// which opens it again). Records written before this field existed were always trimmed.
    #[serde(default)]
    pub untrimmed: bool,
}

/// The apply state as its protobuf encoding (the form it has in the tablet).
mod apply_state_bytes {
    use prkv_proto::serverpb::RaftApplyState;
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<RaftApplyState>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(|a| a.encode_to_vec()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<RaftApplyState>, D::Error> {
        Option::<Vec<u8>>::deserialize(d)?
            .map(|b| RaftApplyState::decode(b.as_slice()).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Writes the record of a closed tablet: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_record(dir: &Path, info: &ParkedInfo) -> Result<()> {
    let body = serde_json::to_string(info)
        .map_err(|e| Error::Other(format!("encoding a PARKED record: {e}")))?;
    let text = format!("{body}\n{:08x}\n", crc32fast::hash(body.as_bytes()));
    let tmp = dir.join(RECORD_TMP);
    let path = dir.join(RECORD);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)
}

/// Reads a tablet's record. `None` when there is none, or when it is damaged (then it is
/// removed, with a warning): the tablet opens the ordinary way.
pub(crate) fn read_record(dir: &Path) -> Option<ParkedInfo> {
    let path = dir.join(RECORD);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable PARKED record ignored");
            return None;
        }
    };
    let parsed = text.split_once('\n').and_then(|(body, crc)| {
        let crc = u32::from_str_radix(crc.trim_end(), 16).ok()?;
        if crc != crc32fast::hash(body.as_bytes()) {
            return None;
        }
        serde_json::from_str::<ParkedInfo>(body).ok()
    });
    if parsed.is_none() {
        tracing::warn!(path = %path.display(), "damaged PARKED record ignored: opening the tablet");
        if let Err(e) = remove_record(dir) {
            tracing::warn!(path = %path.display(), error = %e, "removing a damaged PARKED record failed");
        }
    }
    parsed
}

/// Removes a tablet's record, durably, if it has one: called before every open.
pub(crate) fn remove_record(dir: &Path) -> Result<()> {
    let path = dir.join(RECORD);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The thread that parks idle tablets and keeps open ones under `rocksdb.max-open-tablets`.
pub struct Parker {
    shared: Arc<SharedResources>,
    tablets: Weak<Mutex<HashMap<RegionId, Arc<RocksRegion>>>>,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Parker {
    pub(crate) fn start(
        shared: Arc<SharedResources>,
        tablets: &Arc<Mutex<HashMap<RegionId, Arc<RocksRegion>>>>,
    ) -> Arc<Parker> {
        let parker = Arc::new(Parker {
            shared,
            tablets: Arc::downgrade(tablets),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let weak = Arc::downgrade(&parker);
        let handle = std::thread::Builder::new()
            .name("tablet-park".into())
            .spawn(move || run(weak))
            .expect("spawning the tablet parker thread");
        *parker.thread.lock() = Some(handle);
        parker
    }

    /// Stops the thread and waits for it, so it holds no tablet afterwards.
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shared.park_signal.wake();
        if let Some(h) = self.thread.lock().take() {
            if h.join().is_err() {
                tracing::error!("tablet parker thread panicked");
            }
        }
    }

    /// One round: parks the tablets idle for longer than the timeout, and the least recently
    /// used ones beyond the cap. Returns how many it parked.
    pub fn run_once(&self) -> usize {
        let Some(tablets) = self.tablets.upgrade() else {
            return 0;
        };
        let views: Vec<Arc<RocksRegion>> = tablets.lock().values().cloned().collect();
        drop(tablets);
        let now = self.shared.now_ns();
        let idle_ns = self.shared.config.tablet_idle_timeout.0.as_nanos() as u64;
        // The cap is what `rocksdb.max-open-tablets` and the descriptor budget allow
        // (`storage::fds`); beyond it, descriptors actually open past the budget count too,
        // and someone waiting for descriptors means a full batch now.
        let cap = self.shared.tablet_cap();
        let fds = super::fds::open_fds();
        let budget = self.shared.fd_budget;
        super::fds::set_near_limit(fds.is_some_and(|n| n + budget.reserve > budget.limit));
        let by_fds = fds.map(|n| budget.tablets_over(n)).unwrap_or(0);
        let by_pressure = if super::fds::under_pressure() {
            PARKS_PER_ROUND
        } else {
            0
        };
        let mut open: Vec<(u64, &Arc<RocksRegion>)> = views
            .iter()
            .filter(|v| v.handle.is_open())
            .map(|v| (v.handle.last_used_ns(), v))
            .collect();
        // Views of one Region share a handle only transiently (a swap); the registry holds
        // one view per Region, so this list has each open tablet once.
        open.sort_unstable_by_key(|(used, _)| *used);
        let over = open.len().saturating_sub(cap).max(by_fds).max(by_pressure);
        let mut parked = 0;
        for (used, view) in &open {
            if parked == PARKS_PER_ROUND || self.stop.load(Ordering::Relaxed) {
                break;
            }
            let idle = idle_ns > 0 && now.saturating_sub(*used) >= idle_ns;
            // Sorted oldest first: once the excess is parked, only idle ones still go. A
            // tablet that cannot park now (in use, compacting) does not count against the
            // excess: the next one is tried.
            if !idle && parked >= over {
                break;
            }
            match view.try_park() {
                Ok(true) => parked += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(region_id = view.region_id, error = %e, "parking a tablet failed")
                }
            }
        }
        parked
    }
}

fn run(parker: Weak<Parker>) {
    loop {
        let Some(p) = parker.upgrade() else { return };
        if p.stop.load(Ordering::SeqCst) {
            return;
        }
        p.shared.park_signal.wait(ROUND);
        // Rounds back to back while each parks a full batch: a burst of new tablets.
        let mut parked = 0;
        loop {
            let n = p.run_once();
            parked += n;
            if p.stop.load(Ordering::SeqCst) || n < PARKS_PER_ROUND {
                break;
            }
        }
        if parked > 0 {
            // A closed tablet frees its memory to the allocator, which keeps it: glibc returns
            // little on its own, and a store that had 1,000 tablets open, then parked them,
            // measured 480 MiB RSS, 205 MiB after a trim. Trimming after a round that parked
            // something costs milliseconds, and an idle store has few such rounds.
            // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        drop(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ParkedInfo {
        ParkedInfo {
            region_id: 7,
            start: b"a".to_vec(),
            end: vec![],
            apply_state: Some(RaftApplyState {
                applied_index: 42,
                applied_term: 6,
                ..Default::default()
            }),
            approximate_size: 1 << 20,
            approximate_keys: 1000,
            untrimmed: false,
        }
    }

    #[test]
    fn record_round_trip_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_record(dir.path()), None);
        write_record(dir.path(), &info()).unwrap();
        assert_eq!(read_record(dir.path()), Some(info()));
        remove_record(dir.path()).unwrap();
        assert_eq!(read_record(dir.path()), None);
        remove_record(dir.path()).unwrap(); // idempotent
    }

    #[test]
    fn damaged_record_is_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        write_record(dir.path(), &info()).unwrap();
        let path = dir.path().join(RECORD);
        let text = std::fs::read_to_string(&path).unwrap();
        // One digit of the applied index changes: still valid JSON, but the checksum fails.
        std::fs::write(&path, text.replacen("42", "43", 1)).unwrap();
        assert_eq!(read_record(dir.path()), None);
        assert!(!path.exists(), "a damaged record must not stay");
        std::fs::write(&path, "not a record").unwrap();
        assert_eq!(read_record(dir.path()), None);
    }
}
