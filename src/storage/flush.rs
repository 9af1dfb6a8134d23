//! Keeps the memtables of all tablets within `rocksdb.write-buffer-limit`.
//!
//! All tablets charge their memtables to one RocksDB `WriteBufferManager`. RocksDB alone would
//! enforce the limit crudely: when it is near, the tablet that happens to receive the next write
//! flushes, however little it holds, and writers stall at the limit. With thousands of tablets
//! that produces many tiny SSTs while the tablets that hold the memory keep it.
//!
//! The controller picks the victim instead. A thread wakes when a write finds the *active*
//! (mutable) memtable memory above [`TRIGGER_NUM`]/[`TRIGGER_DEN`] of the limit, below RocksDB's
//! own trigger (7/8), and flushes one tablet at a time:
//!
//! * `rocksdb.write-buffer-flush-oldest-first = true`: the tablet holding the oldest unflushed
//!   write. This is the one that holds Raft-log GC back the longest (its flushed apply index is
//!   the oldest), so flushing it also shortens restart replay.
//! * `false`: the tablet with the largest active memtables, which frees the most memory.
//!
//! RocksDB's stall (`allow_stall`) stays as the backstop: writers wait at the limit until a
//! flush frees memory, so the total stays within the limit plus what in-flight writes and one
//! memtable's arena blocks add.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use super::rocks::{RocksRegion, SharedResources};
use super::signal::Signal;
use super::RegionId;

/// Flush when active memtables exceed 3/4 of the limit: early enough that RocksDB's own
/// trigger at 7/8 rarely fires, late enough that memtables are worth an SST.
const TRIGGER_NUM: u64 = 3;
const TRIGGER_DEN: u64 = 4;
/// How long a round waits for a scheduled flush to take effect before choosing again. A flush
/// of one memtable takes milliseconds; waiting longer would let writers hit the stall.
const FLUSH_SETTLE: Duration = Duration::from_millis(20);
/// Idle wake-up, so a missed notification costs at most this much.
const IDLE_WAKE: Duration = Duration::from_millis(200);

/// One flush decision, kept for metrics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushDecision {
    pub region_id: RegionId,
    pub tablet_index: u64,
    /// The victim's oldest-unflushed stamp (ns since the store's epoch); 0 if unknown.
    pub oldest_unflushed_ns: u64,
    pub active_bytes: u64,
}

pub struct FlushController {
    shared: Arc<SharedResources>,
    tablets: Weak<Mutex<HashMap<RegionId, Arc<RocksRegion>>>>,
    /// Woken by writers above the trigger, and by shutdown.
    wake: Signal,
    stop: Mutex<bool>,
    flushes: AtomicU64,
    decisions: Mutex<Vec<FlushDecision>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Decisions kept for inspection: enough to see a pattern, bounded so it never grows.
const DECISIONS_KEPT: usize = 1024;

impl FlushController {
    pub(crate) fn start(
        shared: Arc<SharedResources>,
        tablets: Arc<Mutex<HashMap<RegionId, Arc<RocksRegion>>>>,
    ) -> Arc<FlushController> {
        let ctl = Arc::new(FlushController {
            shared,
            tablets: Arc::downgrade(&tablets),
            wake: Signal::default(),
            stop: Mutex::new(false),
            flushes: AtomicU64::new(0),
            decisions: Mutex::new(Vec::new()),
            thread: Mutex::new(None),
        });
        let weak = Arc::downgrade(&ctl);
        let handle = std::thread::Builder::new()
            .name("flush-ctl".into())
            .spawn(move || run(weak))
            .expect("spawning the flush controller thread");
        *ctl.thread.lock() = Some(handle);
        ctl
    }

    /// Stops the controller thread and waits for it, so that it holds no tablet afterwards:
    /// a registry that is dropped must have closed every tablet when the drop returns.
    pub(crate) fn shutdown(&self) {
        *self.stop.lock() = true;
        self.wake.wake();
        if let Some(h) = self.thread.lock().take() {
            if h.join().is_err() {
                tracing::error!("flush controller thread panicked");
            }
        }
    }

    fn trigger_bytes(&self) -> u64 {
        self.shared.config.write_buffer_limit.0 / TRIGGER_DEN * TRIGGER_NUM
    }

    /// Called after each tablet write: wakes the controller when memory looks high. Reading the
    /// manager's usage is one atomic load, cheap enough for every write.
    pub(crate) fn on_write(&self) {
        if self.shared.wbm.get_usage() as u64 >= self.trigger_bytes() {
            self.wake.wake();
        }
    }

    /// Number of flushes the controller has scheduled.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// The most recent decisions, oldest first.
    pub fn decisions(&self) -> Vec<FlushDecision> {
        self.decisions.lock().clone()
    }

    /// Runs one round: if active memtables are above the trigger, flushes one victim.
    /// Returns the decision taken.
    pub fn run_once(&self) -> Option<FlushDecision> {
        // Total usage bounds active usage from above: below the trigger there is nothing to do,
        // and an idle store pays one atomic load per wake-up, not a walk over its tablets.
        let usage = self.shared.wbm.get_usage() as u64;
        crate::metrics::MEMTABLE_BYTES.set(usage as i64);
        if usage < self.trigger_bytes() {
            return None;
        }
        let tablets = self.tablets.upgrade()?;
        let list: Vec<Arc<RocksRegion>> = tablets.lock().values().cloned().collect();
        let mut active_total = 0;
        let mut stats = Vec::with_capacity(list.len());
        for t in &list {
            let active = t.handle.active_memtable_bytes();
            let mut stamp = t.oldest_unflushed_ns.load(Ordering::SeqCst);
            // RocksDB may have flushed a tablet on its own (a full memtable); its stamp is then
            // stale. Entries left in memtables tell.
            if stamp != 0 && t.handle.unflushed_entries() == 0 {
                let _ = t.oldest_unflushed_ns.compare_exchange(
                    stamp,
                    0,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                stamp = 0;
            }
            active_total += active;
            stats.push((t, active, stamp));
        }
        if active_total < self.trigger_bytes() {
            return None;
        }
        let oldest_first = self.shared.config.write_buffer_flush_oldest_first;
        let victim = stats
            .iter()
            .filter(|(_, active, _)| *active > 0)
            .min_by_key(|(_, active, stamp)| {
                if oldest_first {
                    // Unstamped tablets (unknown age) go last.
                    (
                        if *stamp == 0 { u64::MAX } else { *stamp },
                        u64::MAX - active,
                    )
                } else {
                    (u64::MAX - active, 0)
                }
            })?;
        let (t, active, stamp) = (victim.0, victim.1, victim.2);
        let decision = FlushDecision {
            region_id: t.region_id,
            tablet_index: t.tablet_index,
            oldest_unflushed_ns: stamp,
            active_bytes: active,
        };
        tracing::debug!(
            region_id = t.region_id,
            active_bytes = active,
            oldest_first,
            "flushing tablet for memory"
        );
        if let Err(e) = crate::storage::RegionEngine::flush(t.as_ref(), false) {
            tracing::warn!(region_id = t.region_id, error = %e, "memory flush failed");
            return None;
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        crate::metrics::MEMORY_FLUSHES.inc();
        let mut d = self.decisions.lock();
        if d.len() == DECISIONS_KEPT {
            d.remove(0);
        }
        d.push(decision.clone());
        Some(decision)
    }
}

fn run(ctl: Weak<FlushController>) {
    loop {
        let Some(c) = ctl.upgrade() else { return };
        if *c.stop.lock() {
            return;
        }
        c.wake.wait(IDLE_WAKE);
        while !*c.stop.lock() && c.run_once().is_some() {
            std::thread::sleep(FLUSH_SETTLE);
        }
        drop(c);
    }
}
