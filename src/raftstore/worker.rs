//! The region worker: slow per-Region jobs that must not stall the store loop.
//!
//! * **Split check**: scan a Region snapshot for split keys ([`super::split`]); a hit becomes a
//!   `StoreMsg::SplitRegion` back to the store.
//! * **Trim**: delete (and compact away) the keys a split-born tablet holds outside its range.
//! * **Snapshot generation** in `raft-kv` mode: scan a Region snapshot into SST files.
//!
//! One thread per store: these jobs are background work whose latency does not matter, and one
//! thread bounds the I/O they add. The queue is bounded ([`WORKER_QUEUE`]); a job that does not
//! fit is dropped and comes back (a split check at the next tick with new writes, a trim at the
//! next split check of that Region, which trims first).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use prkv_proto::metapb::RegionEpoch;
use prkv_proto::serverpb::SnapshotMeta;
use prost::Message as _;

use super::msg::StoreMsg;
use super::snap::list_files;
use super::split::{find_middle_key, find_split_keys, SplitCheckConfig};
use crate::raftlog::SnapGen;
use crate::storage::engine::Snapshot;
use crate::storage::{RegionEngine, RegionId};

/// Jobs waiting for the worker. A check or trim per Region is at most a few hundred bytes, and
/// a store rarely has more than a few hundred Regions growing at once.
pub const WORKER_QUEUE: usize = 4096;

pub enum Job {
    /// The snapshot is taken when the job runs, not when it is queued: a snapshot holds its
    /// tablet open, and in a storm of splits the queue holds hundreds of checks (one per
    /// written Region) behind slow trims; snapshots taken at queue time pinned that many
    /// tablets open past the descriptor budget (`storage::fds`), and a store ran out. `epoch`
    /// is the Region's at queue time: a split found in a later state is refused as stale.
    SplitCheck {
        region_id: RegionId,
        epoch: RegionEpoch,
        engine: Arc<dyn RegionEngine>,
        cfg: SplitCheckConfig,
        /// Set while this job is queued or running; the store queues no second check of the
        /// Region meanwhile.
        queued: Arc<AtomicBool>,
    },
    Trim(Arc<dyn RegionEngine>),
    /// PD asked to split the Region in half: find the middle key, then split there.
    HalfSplit {
        region_id: RegionId,
        epoch: RegionEpoch,
        snap: Box<dyn Snapshot>,
    },
    /// A scan-based (`raft-kv`) snapshot: `snap` written as SSTs into `dir`, then published in
    /// `gen` for Raft to send.
    GenSnapshot {
        snap: Box<dyn Snapshot>,
        dir: PathBuf,
        meta: SnapshotMeta,
        md: raft::eraftpb::SnapshotMetadata,
        gen: Arc<parking_lot::Mutex<SnapGen>>,
    },
}

pub struct WorkerHandle {
    tx: Option<Sender<Job>>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Queues a job; false if the queue is full (the job is dropped, see the module docs).
    pub fn schedule(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.try_send(job).is_ok())
    }

    /// Stops the worker: queued jobs are dropped, a running one finishes, and every engine
    /// handle the worker held is released before this returns (a restarted store reopens
    /// those engines).
    pub fn shutdown(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the worker of store `store_id`; it sends split requests to `store`.
pub fn start(store_id: u64, store: Sender<StoreMsg>) -> WorkerHandle {
    let (tx, rx) = bounded(WORKER_QUEUE);
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = stopping.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("region-worker-{store_id}"))
        .spawn(move || run(rx, store, stop));
    let thread = match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            // Without the worker, Regions do not split or trim, but they serve: keep going.
            tracing::error!(store_id, error = %e, "region worker did not start");
            None
        }
    };
    WorkerHandle {
        tx: Some(tx),
        stopping,
        thread,
    }
}

fn run(rx: Receiver<Job>, store: Sender<StoreMsg>, stopping: Arc<AtomicBool>) {
    while let Ok(job) = rx.recv() {
        if stopping.load(Ordering::SeqCst) {
            continue; // drain without running: the store is stopping
        }
        // Tests hold the worker here to let its queue fill.
        fail::fail_point!("region_worker_before_job");
        match job {
            Job::Trim(engine) => trim(&*engine),
            Job::HalfSplit {
                region_id,
                epoch,
                snap,
            } => {
                let mid = match find_middle_key(&*snap) {
                    Ok(Some(k)) => k,
                    Ok(None) => {
                        tracing::info!(region_id, "half split: fewer than two keys, nothing to do");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(region_id, error = %e, "half split: scan failed");
                        continue;
                    }
                };
                drop(snap);
                let msg = StoreMsg::SplitRegion {
                    region_id,
                    epoch,
                    split_keys: vec![mid],
                    cb: Box::new(move |res| {
                        if let Err(e) = res {
                            tracing::info!(region_id, error = %e, "split asked by PD did not happen");
                        }
                    }),
                };
                if store.send_timeout(msg, Duration::from_secs(1)).is_err() {
                    tracing::debug!(region_id, "half split dropped: store busy or stopped");
                }
            }
            Job::GenSnapshot {
                snap,
                dir,
                mut meta,
                md,
                gen,
            } => {
                let started = std::time::Instant::now();
                let region_id = meta.region.as_ref().map_or(0, |r| r.id);
                let res = snap
                    .export_ssts(&dir)
                    .map_err(|e| e.to_string())
                    .and_then(|()| list_files(&dir).map_err(|e| e.to_string()));
                drop(snap);
                let mut g = gen.lock();
                g.generating = false;
                match res {
                    Ok(files) => {
                        meta.files = files;
                        let mut s = raft::eraftpb::Snapshot {
                            data: meta.encode_to_vec().into(),
                            ..Default::default()
                        };
                        s.set_metadata(md);
                        g.ready = Some(s);
                        crate::metrics::SNAPSHOTS
                            .with_label_values(&["generated"])
                            .inc();
                        tracing::info!(region_id, took = ?started.elapsed(), files = meta.files.len(), "snapshot generated (scan)");
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        tracing::warn!(region_id, error = %e, "generating a snapshot failed");
                    }
                }
            }
            Job::SplitCheck {
                region_id,
                epoch,
                engine,
                cfg,
                queued,
            } => {
                // Cleared however the check ends, so the next tick may queue another.
                let _queued = ClearOnDrop(queued);
                // An untrimmed tablet is trimmed before it is split again: a checkpoint of it
                // would copy its garbage into every child.
                trim(&*engine);
                let snap = engine.snapshot();
                let keys = match find_split_keys(&*snap, &cfg) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(region_id, error = %e, "split check failed");
                        continue;
                    }
                };
                drop(snap);
                drop(engine);
                if keys.is_empty() {
                    continue;
                }
                tracing::info!(region_id, pieces = keys.len() + 1, "split check: splitting");
                let msg = StoreMsg::SplitRegion {
                    region_id,
                    epoch,
                    split_keys: keys,
                    cb: Box::new(move |res| {
                        if let Err(e) = res {
                            tracing::info!(region_id, error = %e, "split from the checker did not happen");
                        }
                    }),
                };
                // The store may be briefly busy; a lost request is redone by the next check.
                if store.send_timeout(msg, Duration::from_secs(1)).is_err() {
                    tracing::debug!(region_id, "split request dropped: store busy or stopped");
                }
            }
        }
    }
}

/// Clears a flag when dropped.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn trim(engine: &dyn RegionEngine) {
    match engine.needs_trim() {
        Ok(false) => {}
        Ok(true) => {
            let started = std::time::Instant::now();
            match engine.trim() {
                Ok(()) => tracing::info!(
                    region_id = engine.region_id(),
                    took = ?started.elapsed(),
                    "tablet trimmed"
                ),
                Err(e) => {
                    tracing::warn!(region_id = engine.region_id(), error = %e, "trimming a tablet failed")
                }
            }
        }
        Err(e) => {
            tracing::warn!(region_id = engine.region_id(), error = %e, "checking a tablet for trim failed")
        }
    }
}
