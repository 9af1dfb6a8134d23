//! The store loop: every Region replica of a store, driven by one thread.
//!
//! Each round of the loop:
//!
//! 1. **Receive** up to [`MAX_MSGS_PER_ROUND`] messages (Raft messages from other stores,
//!    writes, reads, admin commands) and hand each to its peer.
//! 2. **Tick** the peers that are awake, once per `raftstore.raft-base-tick-interval`.
//!    Hibernated peers cost nothing here.
//! 3. **Ready**: for every peer with work, take its `Ready`; send the messages a leader may
//!    send before persisting; gather every peer's new entries and hard state into **one**
//!    raft-engine write with **one** fsync (group commit across Regions).
//! 4. **Advance**: after the fsync, send the messages that had to wait for persistence, apply
//!    committed entries to each Region's engine (one write batch per Region, carrying the
//!    apply state), run callbacks, and advance the `RawNode`s.
//!
//! This is raft-rs's Ready/advance discipline: nothing a `Ready` asks to persist is acted upon
//! (sent as a vote or an append acknowledgement) before the fsync that persists it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use prkv_proto::metapb::{Peer as PeerMeta, Region, RegionEpoch};
use prkv_proto::serverpb::{Mutation, PeerState, RaftApplyState, RegionLocalState, SnapshotMeta};
use prost::Message as _;

use super::error::{Error, Result};
use super::local_read::LocalReaders;
use super::msg::{
    PdReporter, RaftMessage, RegionSnapshot, RegionStatus, SplitCallback, StoreId, StoreMsg,
    WriteCallback,
};
use super::peer::{Peer, PeerConfig};
use super::snap::{self, SnapDirs};
use super::split::{SplitCheckConfig, RAFT_INIT_LOG_INDEX, RAFT_INIT_LOG_TERM};
use super::transport::Transport;
use super::worker::{self, Job, WorkerHandle};
use crate::config::{Config, EngineKind};
use crate::raftlog::LogWriteBatch;
use crate::storage::disk::DiskMonitor;
use crate::storage::{Engines, KeyRange, RegionId};

mod damage;
mod merge;

/// Messages handled per loop round before the Readies are processed: large enough to batch
/// many proposals into one fsync, small enough that ticks and Readies are not starved.
pub const MAX_MSGS_PER_ROUND: usize = 4096;
/// A round's plain writes to one Region become one Raft entry (`Store::batch_write`), up to
/// this many bytes of mutations: the entry is replicated and applied whole, and 1 MiB keeps it
/// small next to `raftstore.raft-entry-max-size` (8 MiB by default) and to one apply round.
const MAX_BATCHED_BYTES: usize = 1 << 20;
/// ... and up to this many writes, so that one entry's callbacks stay a short loop.
const MAX_BATCHED_WRITES: usize = 256;
/// Capacity of a store's inbox. When it is full, writes get `ServerIsBusy` and Raft messages
/// are dropped (Raft retransmits): memory stays bounded however fast clients push.
pub const STORE_INBOX_CAPACITY: usize = 16 * 1024;
/// Raft messages kept for Regions this store is about to create by applying a split (the new
/// Region's leader, on a store that applied the split first, is already campaigning). Enough for
/// a vote and an append per Region of a large batch split; older ones are dropped (Raft
/// retransmits).
const MAX_PENDING_SPLIT_MSGS: usize = 1024;
const PENDING_SPLIT_MSG_TTL: Duration = Duration::from_secs(10);
/// Below this estimated size a split check scans the Region rather than trusting estimates:
/// reading 32 MiB takes milliseconds on the region worker.
const CHEAP_SPLIT_SCAN_BYTES: u64 = 32 << 20;

/// Counters of one store, for tests, benchmarks and metrics.
#[derive(Default, Debug)]
pub struct StoreStats {
    pub fsyncs: AtomicU64,
    pub ready_rounds: AtomicU64,
    pub proposals: AtomicU64,
    /// Peer ticks performed; hibernated peers add nothing.
    pub peer_ticks: AtomicU64,
    pub applied_entries: AtomicU64,
    /// Replicas on this store, and how many of them lead (refreshed every tick).
    pub regions: AtomicU64,
    pub leaders: AtomicU64,
    /// Regions whose replica here was refused as damaged and that PD should rebuild (reported
    /// as `damaged_regions_id` in store heartbeats; see `store/damage.rs`).
    pub damaged: parking_lot::Mutex<Vec<RegionId>>,
}

/// A handle for sending messages to a store's loop.
#[derive(Clone)]
pub struct StoreRouter {
    pub store_id: StoreId,
    tx: Sender<StoreMsg>,
    readers: Arc<LocalReaders>,
}

impl StoreRouter {
    /// A linearizable read served from the leader's lease on the caller's thread, if this
    /// store leads the Region and may; `None`: send `StoreMsg::Read` instead (see
    /// [`super::local_read`]).
    pub fn local_read(&self, region_id: RegionId, epoch: &RegionEpoch) -> Option<RegionSnapshot> {
        self.readers.read(region_id, epoch)
    }

    /// Sends without waiting; a full inbox is `ServerIsBusy`, a stopped store `StoreStopped`.
    pub fn try_send(&self, msg: StoreMsg) -> Result<()> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::ServerIsBusy {
                reason: format!("store {} inbox is full", self.store_id),
            }),
            Err(TrySendError::Disconnected(_)) => Err(Error::StoreStopped),
        }
    }
}

/// A running store: its loop thread and how to reach it.
pub struct StoreHandle {
    pub router: StoreRouter,
    pub stats: Arc<StoreStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreHandle {
    /// Stops the loop and waits for it. Pending commands fail with `StoreStopped`.
    pub fn stop(mut self) {
        let _ = self.router.tx.send(StoreMsg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.router.tx.send(StoreMsg::Stop);
            let _ = t.join();
        }
    }
}

/// `n` Regions cutting the key space at `r000002`, `r000003`, ..., with ids `1..=n`, replicated
/// on `stores` with peer id `region * 100 + store`: the stand-in for PD's bootstrap and
/// splits that the in-process cluster and `prkv bench raftstore` start from.
pub fn even_regions(n: u64, stores: &[StoreId]) -> Vec<Region> {
    (1..=n)
        .map(|i| Region {
            id: i,
            start_key: if i == 1 { vec![] } else { even_region_key(i) },
            end_key: if i == n {
                vec![]
            } else {
                even_region_key(i + 1)
            },
            region_epoch: Some(prkv_proto::metapb::RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: stores
                .iter()
                .map(|s| PeerMeta {
                    id: i * 100 + s,
                    store_id: *s,
                    role: prkv_proto::metapb::PeerRole::Voter as i32,
                    is_witness: false,
                })
                .collect(),
        })
        .collect()
}

/// The first key of Region `i` of [`even_regions`].
pub fn even_region_key(i: u64) -> Vec<u8> {
    format!("r{i:06}").into_bytes()
}

/// Writes the initial state of a Region replica of a new cluster: its Region, and a log that
/// starts after [`RAFT_INIT_LOG_INDEX`] with everything up to it applied (the data is empty).
/// Used to bootstrap a cluster's first Regions (PD does this in the full system).
///
/// Like split-born Regions, bootstrapped ones have no log entry at or below that index, so a
/// replica added later can only be initialized by a snapshot: it never replays a log prefix
/// under a Region (range, membership) that later entries changed.
pub fn bootstrap_region(engines: &Engines, region: &Region) -> Result<()> {
    let state = RegionLocalState {
        state: PeerState::Normal as i32,
        region: Some(region.clone()),
        tablet_index: RAFT_INIT_LOG_INDEX,
        conf_index: RAFT_INIT_LOG_INDEX,
        ..Default::default()
    };
    let engine = engines
        .kv
        .open_region(region.id, range_of(region), RAFT_INIT_LOG_INDEX)?;
    let mut wb = crate::storage::WriteBatch::new();
    wb.set_apply_state(RaftApplyState {
        applied_index: RAFT_INIT_LOG_INDEX,
        applied_term: RAFT_INIT_LOG_TERM,
        ..Default::default()
    });
    engine.write(&wb)?;
    engine.flush(true)?;
    crate::crash_point!("bootstrap_region_before_raft_state");
    let mut lb = LogWriteBatch::new();
    lb.put_region_state(region.id, &state)?;
    lb.put_hard_state(
        region.id,
        &raft::eraftpb::HardState {
            term: RAFT_INIT_LOG_TERM,
            commit: RAFT_INIT_LOG_INDEX,
            ..Default::default()
        },
    )?;
    lb.compact_to(region.id, RAFT_INIT_LOG_INDEX, RAFT_INIT_LOG_TERM)?;
    engines.raft.write(&mut lb, true)?;
    Ok(())
}

/// Writes the state of a replica a leader is adding to this store: the leader's Region, an
/// empty log and an empty engine. It waits, uninitialized, for the snapshot the leader sends.
fn init_replica(engines: &Engines, region: &Region) -> Result<()> {
    let state = RegionLocalState {
        state: PeerState::Normal as i32,
        region: Some(region.clone()),
        tablet_index: 0,
        conf_index: 0,
        ..Default::default()
    };
    let mut wb = LogWriteBatch::new();
    wb.put_region_state(region.id, &state)?;
    engines.raft.write(&mut wb, true)?;
    engines.kv.open_region(region.id, range_of(region), 0)?;
    Ok(())
}

fn range_of(region: &Region) -> KeyRange {
    KeyRange::new(region.start_key.clone(), region.end_key.clone())
}

pub fn peer_config(cfg: &Config) -> PeerConfig {
    PeerConfig {
        election_tick: cfg.raftstore.raft_election_timeout_ticks,
        heartbeat_tick: cfg.raftstore.raft_heartbeat_ticks,
        raft_entry_max_size: cfg.raftstore.raft_entry_max_size.0,
        lease: cfg.raftstore.raft_store_max_leader_lease.0,
        hibernate: cfg.raftstore.hibernate_regions,
        log_gc_count_limit: cfg.raftstore.raft_log_gc_count_limit,
        log_gc_size_limit: cfg.raftstore.raft_log_gc_size_limit.0,
    }
}

/// Plain writes of this round to one Region, to be proposed as one entry.
struct BatchedWrites {
    epoch: RegionEpoch,
    mutations: Vec<Mutation>,
    bytes: usize,
    cbs: Vec<WriteCallback>,
}

/// What applying a Ready's committed entries did to the replica.
enum Applied {
    /// It stays.
    Kept,
    /// It left its Region (a conf change removed it): it is destroyed after the round.
    Removed,
    /// Its tablet turned out damaged: it was refused, and is gone already.
    Refused,
}

struct Store {
    id: StoreId,
    cfg: Config,
    engines: Engines,
    peers: HashMap<RegionId, Peer>,
    rx: Receiver<StoreMsg>,
    trans: Arc<dyn Transport>,
    pd: Arc<dyn PdReporter>,
    stats: Arc<StoreStats>,
    tick_interval: Duration,
    next_pd_heartbeat: Instant,
    next_tick: Instant,
    /// When each other store was last heard from (any message).
    last_heard: HashMap<StoreId, Instant>,
    /// Hibernated followers, by the store of their leader: woken when that store falls silent.
    sleeping_by_leader_store: HashMap<StoreId, HashSet<RegionId>>,
    ticks: u64,
    next_gc: Instant,
    /// The other stores holding replicas of our Regions: the targets of store heartbeats.
    /// Recomputed only when membership changes, so an idle tick does not walk every Region.
    neighbours: HashSet<StoreId>,
    neighbours_stale: bool,
    /// This store's own inbox, for answers that arrive from other threads (PD's split ids).
    self_tx: Sender<StoreMsg>,
    worker: WorkerHandle,
    next_split_check: Instant,
    /// Messages to Regions whose range a local, not yet split Region still covers.
    pending_split_msgs: Vec<(Instant, RaftMessage)>,
    snap_dirs: SnapDirs,
    /// Regions whose Raft asked for a snapshot to send; generated after the round.
    snap_requests: Vec<RegionId>,
    /// This round's plain writes, by Region; proposed when the round's messages are handled.
    batched: HashMap<RegionId, BatchedWrites>,
    /// Merges this store leads the source of: when each was last driven (see `merge.rs`).
    merge_attempts: HashMap<RegionId, Instant>,
    /// For each merge this store's source leader wants to roll back: the merge's commit index
    /// and the replicas that agreed, each with whether it is a witness (see `store/merge.rs`).
    rollback_agreed: HashMap<RegionId, (u64, HashMap<u64, bool>)>,
    /// Free space against `storage.reserve-space` (see `storage::disk`).
    disk: DiskMonitor,
    /// The replicas' delegates for lease reads on gRPC threads, shared with the router.
    readers: Arc<LocalReaders>,
    /// Until when this store grants no votes in the Regions it recovered at its start (see
    /// `refuses_votes_after_start`).
    votes_refused_until: Instant,
    /// The Regions whose replicas were recovered from disk at the start: only they may have
    /// promised a leader not to vote. A replica created since (by a split, or for a Region new
    /// to this store) made no promise before the restart, and refusing its votes would leave a
    /// split's new Regions leaderless for an election timeout (10 s by default) whenever a
    /// store splits soon after it starts. Emptied once `votes_refused_until` passes.
    recovered_at_start: HashSet<RegionId>,
    /// When snapshot directories nobody needs are next removed (`sweep_snapshots`).
    next_snap_sweep: Instant,
}

/// How often snapshot directories are swept: leaks cost disk, not correctness; a minute keeps
/// the directory walks rare.
const SNAP_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// A generated snapshot no Region holds is kept this long: long enough for a generation in
/// progress (not yet recorded as ready) to finish and be picked up.
const SNAP_GEN_MIN_AGE: Duration = Duration::from_secs(120);

/// Opens every Region replica found in the engines and starts the store loop.
pub fn start_store(
    id: StoreId,
    cfg: Config,
    engines: Engines,
    trans: Arc<dyn Transport>,
    pd: Arc<dyn PdReporter>,
) -> Result<StoreHandle> {
    let (tx, rx) = bounded(STORE_INBOX_CAPACITY);
    let stats = Arc::new(StoreStats::default());
    let worker = worker::start(id, tx.clone());
    let readers = Arc::new(LocalReaders::default());
    let cfg_data_dir = cfg.storage.data_dir.clone();
    let reserve_space = cfg.storage.reserve_space.0;
    // A restarted replica has forgotten when it last heard from its leader: for one election
    // timeout it grants no vote (see `refuses_votes_after_start`).
    let election_timeout =
        cfg.raftstore.raft_base_tick_interval.0 * cfg.raftstore.raft_election_timeout_ticks as u32;
    let mut store = Store {
        votes_refused_until: Instant::now() + election_timeout,
        recovered_at_start: HashSet::new(),
        next_snap_sweep: Instant::now() + SNAP_SWEEP_INTERVAL,
        id,
        tick_interval: cfg.raftstore.raft_base_tick_interval.0,
        next_tick: Instant::now(),
        cfg,
        engines,
        peers: HashMap::new(),
        rx,
        trans,
        pd,
        next_pd_heartbeat: Instant::now(),
        stats: stats.clone(),
        last_heard: HashMap::new(),
        sleeping_by_leader_store: HashMap::new(),
        ticks: 0,
        next_gc: Instant::now(),
        neighbours: HashSet::new(),
        neighbours_stale: true,
        self_tx: tx.clone(),
        worker,
        next_split_check: Instant::now(),
        pending_split_msgs: Vec::new(),
        snap_dirs: SnapDirs::new(&cfg_data_dir),
        snap_requests: Vec::new(),
        batched: HashMap::new(),
        merge_attempts: HashMap::new(),
        rollback_agreed: HashMap::new(),
        disk: DiskMonitor::new(&cfg_data_dir, reserve_space),
        readers: readers.clone(),
    };
    store.recover()?;
    // Corruption met while running (a read, an apply, a flush) refuses the replica too.
    let damaged_tx = tx.clone();
    store
        .engines
        .kv
        .watch_corruption(Arc::new(move |region_id, tablet_index, reason| {
            let _ = damaged_tx.try_send(StoreMsg::ReplicaDamaged {
                region_id,
                tablet_index,
                reason,
            });
        }));
    let thread = std::thread::Builder::new()
        .name(format!("store-{id}"))
        .spawn(move || store.run())
        .map_err(|e| Error::Storage(format!("spawning store thread: {e}")))?;
    Ok(StoreHandle {
        router: StoreRouter {
            store_id: id,
            tx,
            readers,
        },
        stats,
        thread: Some(thread),
    })
}

impl Store {
    /// Rebuilds every peer: Raft state from raft-engine, applied state from the engines.
    fn recover(&mut self) -> Result<()> {
        let mut destroyed = Vec::new();
        for region_id in self.engines.raft.regions() {
            let Some(mut state) = self.engines.raft.region_state(region_id)? else {
                continue;
            };
            if state.state == PeerState::Applying as i32 {
                state = self.finish_interrupted_install(region_id, state)?;
            }
            if state.state == PeerState::Tombstone as i32 {
                if let Some(r) = &state.region {
                    destroyed.push((region_id, range_of(r)));
                }
                continue;
            }
            let Some(region) = state.region.clone() else {
                continue;
            };
            let Some(meta) = region.peers.iter().find(|p| p.store_id == self.id).cloned() else {
                continue;
            };
            let engine = match self.open_checked(&region, &state)? {
                Ok(engine) => engine,
                Err(reason) => {
                    self.quarantine(region, meta, &reason)?;
                    continue;
                }
            };
            let single = region.peers.len() == 1 && region.peers[0].id == meta.id;
            let merging = state.state == PeerState::Merging as i32;
            // A tablet born from a split may not have been trimmed before the restart.
            self.worker.schedule(Job::Trim(engine.clone()));
            let mut peer = Peer::new(
                region,
                meta,
                self.engines.raft.clone(),
                engine,
                self.engines.kv.clone(),
                peer_config(&self.cfg),
                state.conf_index,
            )?;
            if merging {
                peer.merge_state = state.merge_state.clone();
            }
            if single {
                // The only voter (a freshly bootstrapped Region): no one else can win an
                // election, so do not wait an election timeout to hold one.
                let _ = peer.raw.campaign();
            }
            self.recovered_at_start.insert(region_id);
            self.add_peer(peer);
        }
        // A crash between a replica's tombstone and the removal of its data (`destroy_peer`)
        // leaves the data: gone now, before anything could mistake it for a new replica's.
        let purged = self.engines.kv.purge_destroyed(&destroyed)?;
        if purged > 0 {
            tracing::info!(
                store_id = self.id,
                purged,
                "removed data of replicas destroyed before a crash"
            );
        }
        self.reload_damaged()?;
        // Generated snapshots are regenerated on demand; of received ones, half-written files
        // go and verified ones stay for the sender's retry (see `SnapDirs::clean`).
        self.snap_dirs
            .clean(&[])
            .map_err(|e| Error::Storage(format!("cleaning snapshot directories: {e}")))?;
        tracing::info!(
            store_id = self.id,
            regions = self.peers.len(),
            "store recovered"
        );
        Ok(())
    }

    /// A crash interrupted a snapshot install (Region state `Applying`): finish it from the
    /// staged files, or, if the tablet was already renamed into place, make sure it records the
    /// snapshot's apply state. Returns the Region's state, now `Normal`.
    fn finish_interrupted_install(
        &mut self,
        region_id: RegionId,
        mut state: RegionLocalState,
    ) -> Result<RegionLocalState> {
        let region = state.region.clone().ok_or_else(|| {
            Error::Storage(format!("Region {region_id}: Applying without a Region"))
        })?;
        let t = self
            .engines
            .raft
            .truncated_state(region_id)?
            .unwrap_or_default();
        let applied = RaftApplyState {
            applied_index: t.index,
            applied_term: t.term,
            ..Default::default()
        };
        let dir = self
            .snap_dirs
            .recv_dir(&snap::snapshot_key(region_id, t.term, t.index));
        if dir.exists() {
            self.engines
                .kv
                .install_snapshot(region_id, range_of(&region), &applied, &dir)?;
        } else if self.cfg.storage.engine == EngineKind::PartitionedRaftKv
            && self.engines.kv.has_region_data(region_id, t.index)
        {
            // The received directory became the tablet (a rename): its data is the snapshot's,
            // only the apply state may not have been written yet.
            let engine = self
                .engines
                .kv
                .open_region(region_id, range_of(&region), t.index)?;
            if engine.apply_state()?.map_or(0, |s| s.applied_index) < t.index {
                let mut wb = crate::storage::WriteBatch::new();
                wb.set_apply_state(applied);
                engine.write(&wb)?;
                engine.flush(true)?;
            }
        } else {
            // The received files are gone and nothing holds the snapshot's data (`raft-kv`
            // keeps its received files until the install is recorded; a partitioned tablet
            // generation would exist): recording the snapshot's index would claim data this
            // replica does not have. Left as it is, the start-up check (`open_checked`) finds
            // its apply state behind the truncated log and refuses the replica; PD rebuilds it.
            tracing::error!(
                region_id,
                index = t.index,
                dir = %dir.display(),
                "an interrupted snapshot install lost its received files"
            );
        }
        state.state = PeerState::Normal as i32;
        let mut lb = LogWriteBatch::new();
        lb.put_region_state(region_id, &state)?;
        self.engines.raft.write(&mut lb, true)?;
        remove_installed_snapshot(&dir);
        tracing::info!(
            region_id,
            index = t.index,
            "finished a snapshot install interrupted by a crash"
        );
        Ok(state)
    }

    /// Generates the snapshot Raft asked for, at the leader's applied index: a tablet
    /// checkpoint here (a flush and hard links), or SSTs scanned on the region worker
    /// (`raft-kv`). Raft picks it up at its next attempt to reach the follower.
    fn gen_snapshot(&mut self, region_id: RegionId) {
        let Some(p) = self.peers.get(&region_id) else {
            return;
        };
        // A Region frozen for a merge sends no snapshot: a replica installed from one would not
        // know of the merge. Its lagging replicas catch up from the CommitMerge instead.
        if !p.is_leader() || p.merge_state.is_some() {
            return;
        }
        let (index, term) = (p.applied_index, p.applied_term);
        let key = snap::snapshot_key(region_id, term, index);
        let dir = self.snap_dirs.gen_dir(&key);
        let gen = p.raw.store().snap_gen();
        // Never rewrite a snapshot's files in place. Two requests of one Region in one loop
        // round each started a generation (raft-kv: two jobs writing one directory), and the
        // second truncated and rewrote files a transfer of the first was reading: a receiver
        // got an SST spliced from the two (right size, the sender's checksum, corrupt blocks)
        // and its store stopped at the ingest (nemesis seed 20261248). So: none while one is
        // being generated (Raft asks again once it is ready), and none over a ready snapshot
        // of the same key (same index, same data: Raft has what it would get).
        {
            let g = gen.lock();
            if g.generating {
                return;
            }
            let same = g
                .ready
                .as_ref()
                .is_some_and(|s| SnapshotMeta::decode(s.data.as_ref()).is_ok_and(|m| m.key == key));
            if same {
                return;
            }
        }
        let mut md = raft::eraftpb::SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        md.set_conf_state(crate::raftlog::conf_state_from_region(&p.region));
        let mut meta = SnapshotMeta {
            region: Some(p.region.clone()),
            key: key.clone(),
            files: Vec::new(),
            format: snap::FORMAT_TABLET,
            dir: dir.to_string_lossy().into_owned(),
        };
        // One generated snapshot per Region: the previous one goes.
        if let Some(old) = gen.lock().ready.take() {
            if let Ok(m) = SnapshotMeta::decode(old.data.as_ref()) {
                if m.key != key {
                    let _ = std::fs::remove_dir_all(self.snap_dirs.gen_dir(&m.key));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        match self.engines.kv.kind() {
            EngineKind::PartitionedRaftKv => {
                match p.engine.needs_trim() {
                    Ok(false) => {}
                    _ => {
                        // Never ship a split's garbage: trim first, Raft asks again.
                        self.worker.schedule(Job::Trim(p.engine.clone()));
                        return;
                    }
                }
                let started = Instant::now();
                if let Err(e) = p.engine.checkpoint(&dir) {
                    tracing::warn!(region_id, error = %e, "snapshot checkpoint failed");
                    return;
                }
                match snap::list_files(&dir) {
                    Ok(files) => meta.files = files,
                    Err(e) => {
                        tracing::warn!(region_id, error = %e, "listing snapshot files failed");
                        return;
                    }
                }
                let mut s = raft::eraftpb::Snapshot {
                    data: meta.encode_to_vec().into(),
                    ..Default::default()
                };
                s.set_metadata(md);
                gen.lock().ready = Some(s);
                crate::metrics::SNAPSHOTS
                    .with_label_values(&["generated"])
                    .inc();
                tracing::info!(region_id, index, took = ?started.elapsed(), files = meta.files.len(), "snapshot generated (checkpoint)");
            }
            EngineKind::RaftKv => {
                meta.format = snap::FORMAT_SST;
                gen.lock().generating = true;
                let job = Job::GenSnapshot {
                    snap: p.engine.snapshot(),
                    dir,
                    meta,
                    md,
                    gen: gen.clone(),
                };
                if !self.worker.schedule(job) {
                    gen.lock().generating = false;
                }
            }
        }
    }

    /// Installs the snapshot a follower's Raft accepted (see `snap.rs` for the three steps).
    fn install_snapshot(
        engines: &Engines,
        p: &mut Peer,
        snapshot: &raft::eraftpb::Snapshot,
    ) -> Result<()> {
        let id = p.region_id();
        let md = snapshot.get_metadata();
        let (index, term) = (md.index, md.term);
        // Checked when the message arrived (`stage`), so a failure here is local corruption.
        let meta = SnapshotMeta::decode(snapshot.data.as_ref())
            .map_err(|e| Error::Storage(format!("Region {id}: snapshot meta: {e}")))?;
        let region = meta
            .region
            .clone()
            .ok_or_else(|| Error::Storage(format!("Region {id}: snapshot without a Region")))?;
        let started = Instant::now();
        // One synced write: the old log gone and the new state in. As two writes, a crash
        // between them left a replica with neither a Region state nor a HardState: recreated
        // empty, it forgot its vote, and raft-rs panicked on its leader's commit index at
        // every restart.
        let mut lb = LogWriteBatch::new();
        lb.clean(id);
        let mut state = RegionLocalState {
            state: PeerState::Applying as i32,
            region: Some(region.clone()),
            tablet_index: index,
            destroyed_peer_id: 0,
            conf_index: index,
            merge_state: None,
        };
        lb.put_region_state(id, &state)?;
        lb.compact_to(id, index, term)?;
        lb.put_hard_state(id, &p.raw.raft.hard_state())?;
        engines.raft.write(&mut lb, true)?;
        crate::crash_point!("snapshot_install_after_applying_state");
        let applied = RaftApplyState {
            applied_index: index,
            applied_term: term,
            ..Default::default()
        };
        let engine = engines.kv.install_snapshot(
            id,
            range_of(&region),
            &applied,
            std::path::Path::new(&meta.dir),
        )?;
        crate::crash_point!("snapshot_install_before_normal_state");
        state.state = PeerState::Normal as i32;
        lb.put_region_state(id, &state)?;
        engines.raft.write(&mut lb, true)?;
        // Only now may the received files go (raft-kv ingested links to them; a partitioned
        // install renamed the directory away).
        remove_installed_snapshot(std::path::Path::new(&meta.dir));
        p.on_snapshot_installed(region, engine, index, term);
        crate::metrics::SNAPSHOTS
            .with_label_values(&["installed"])
            .inc();
        tracing::info!(region_id = id, index, term, took = ?started.elapsed(), "snapshot installed");
        Ok(())
    }

    fn run(mut self) {
        loop {
            let timeout = self.next_tick.saturating_duration_since(Instant::now());
            let first = match self.rx.recv_timeout(timeout) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            if let Some(m) = first {
                stop |= self.handle(m);
                for _ in 1..MAX_MSGS_PER_ROUND {
                    match self.rx.try_recv() {
                        Ok(m) => stop |= self.handle(m),
                        Err(_) => break,
                    }
                }
                self.propose_batched();
            }
            if stop {
                break;
            }
            if Instant::now() >= self.next_tick {
                self.on_tick();
                self.next_tick = Instant::now() + self.tick_interval;
            }
            if let Err(e) = self.handle_readies() {
                // A failed raft-engine write or engine write leaves this store's state unknown:
                // stop rather than diverge (the replica is rebuilt from its log on restart).
                panic!("store {}: persisting Raft state failed: {e}", self.id);
            }
            let mut requests = std::mem::take(&mut self.snap_requests);
            requests.sort_unstable();
            requests.dedup();
            for region_id in requests {
                self.gen_snapshot(region_id);
            }
        }
        for p in self.peers.values_mut() {
            p.fail_all(Error::StoreStopped);
        }
        self.worker.shutdown();
    }

    /// Takes a plain write into this round's entry for its Region. Each write is checked
    /// alone first, so a bad one (stale epoch, key outside the Region) fails alone; the entry
    /// is proposed when the round's messages are handled (`propose_batched`), or earlier when
    /// it is full or the epoch changes. Fewer, larger entries: Raft, raft-engine and the apply
    /// pay per entry on every replica, and under load a round holds many writes to one Region.
    fn batch_write(
        &mut self,
        region_id: RegionId,
        epoch: RegionEpoch,
        mutations: Vec<Mutation>,
        cb: WriteCallback,
    ) {
        let Some(p) = self.peers.get(&region_id) else {
            return cb(Err(Error::RegionNotFound(region_id)));
        };
        if let Err(e) = p.check_write(&epoch, &mutations) {
            return cb(Err(e));
        }
        let bytes: usize = mutations
            .iter()
            .map(|m| m.key.len() + m.value.len() + m.cf.len())
            .sum();
        if let Some(b) = self.batched.get(&region_id) {
            if b.epoch != epoch
                || b.bytes + bytes > MAX_BATCHED_BYTES
                || b.cbs.len() >= MAX_BATCHED_WRITES
            {
                self.propose_batched_for(region_id);
            }
        }
        let b = self
            .batched
            .entry(region_id)
            .or_insert_with(|| BatchedWrites {
                epoch,
                mutations: Vec::new(),
                bytes: 0,
                cbs: Vec::new(),
            });
        b.mutations.extend(mutations);
        b.bytes += bytes;
        b.cbs.push(cb);
    }

    /// Proposes the round's plain writes, one entry per Region.
    fn propose_batched(&mut self) {
        // Taken out and put back, so the map keeps its capacity from round to round.
        let mut batched = std::mem::take(&mut self.batched);
        for (region_id, b) in batched.drain() {
            self.propose_batch(region_id, b);
        }
        self.batched = batched;
    }

    fn propose_batched_for(&mut self, region_id: RegionId) {
        if let Some(b) = self.batched.remove(&region_id) {
            self.propose_batch(region_id, b);
        }
    }

    fn propose_batch(&mut self, region_id: RegionId, b: BatchedWrites) {
        let writes = b.cbs.len();
        let mut cbs = b.cbs;
        let cb: WriteCallback = if writes == 1 {
            cbs.pop().expect("one write")
        } else {
            Box::new(move |res: Result<()>| {
                for cb in cbs {
                    cb(res.clone());
                }
            })
        };
        match self.peers.get_mut(&region_id) {
            None => cb(Err(Error::RegionNotFound(region_id))),
            Some(p) => {
                if let Err((e, cb)) = p.propose_writes(&b.epoch, b.mutations, 0, writes, cb) {
                    cb(Err(e));
                }
            }
        }
    }

    /// Returns true on `Stop`.
    fn handle(&mut self, msg: StoreMsg) -> bool {
        match msg {
            StoreMsg::Raft(m) => self.on_raft_message(*m),
            StoreMsg::Write {
                region_id,
                epoch,
                mutations,
                term_fence,
                cb,
            } => {
                self.stats.proposals.fetch_add(1, Ordering::Relaxed);
                // Below the reserve, only writes that free space (deletes) are taken.
                let adds_data = mutations
                    .iter()
                    .any(|m| m.op == prkv_proto::serverpb::mutation::Op::Put as i32);
                if self.disk.is_full() && adds_data {
                    cb(Err(Error::DiskFull {
                        store_id: self.id,
                        available: self.disk.available(),
                        reserve: self.disk.reserve(),
                    }));
                    return false;
                }
                if term_fence == 0 {
                    self.batch_write(region_id, epoch, mutations, cb);
                    return false;
                }
                // A fenced write (compare-and-swap, transactions) is an entry of its own: its
                // term check is its own. This round's plain writes to the Region go first.
                self.propose_batched_for(region_id);
                match self.peers.get_mut(&region_id) {
                    None => cb(Err(Error::RegionNotFound(region_id))),
                    Some(p) => {
                        if let Err((e, cb)) = p.propose_write(&epoch, mutations, term_fence, cb) {
                            cb(Err(e));
                        }
                    }
                }
            }
            StoreMsg::Read {
                region_id,
                epoch,
                cb,
            } => match self.peers.get_mut(&region_id) {
                None => cb(Err(Error::RegionNotFound(region_id))),
                Some(p) => p.read(&epoch, cb),
            },
            StoreMsg::ChangePeers {
                region_id,
                changes,
                cb,
            } => match self.peers.get_mut(&region_id) {
                None => cb(Err(Error::RegionNotFound(region_id))),
                Some(p) => {
                    if let Err((e, cb)) = p.propose_conf_change(&changes, cb) {
                        cb(Err(e));
                    }
                }
            },
            StoreMsg::SplitRegion {
                region_id,
                epoch,
                split_keys,
                cb,
            } => self.on_split_region(region_id, epoch, split_keys, cb),
            StoreMsg::HalfSplit { region_id, epoch } => match self.peers.get(&region_id) {
                Some(p) if p.is_leader() && p.region.region_epoch == Some(epoch) => {
                    let job = Job::HalfSplit {
                        region_id,
                        epoch,
                        snap: p.engine.snapshot(),
                    };
                    self.worker.schedule(job);
                }
                p => tracing::info!(
                    region_id,
                    asked = ?epoch,
                    have = ?p.map(|p| (p.is_leader(), p.region.region_epoch)),
                    "half split from PD ignored: not the leader, or the Region changed"
                ),
            },
            StoreMsg::ProposeSplit {
                region_id,
                epoch,
                split_keys,
                ids,
                cb,
            } => match self.peers.get_mut(&region_id) {
                None => cb(Err(Error::RegionNotFound(region_id))),
                Some(p) => p.propose_split(&epoch, &split_keys, &ids, cb),
            },
            StoreMsg::PrepareMerge {
                region_id,
                target_id,
                cb,
            } => self.on_prepare_merge(region_id, target_id, cb),
            StoreMsg::TransferLeader { region_id, to } => {
                if let Some(p) = self.peers.get_mut(&region_id) {
                    p.wake();
                    p.transfer_leader(to.id);
                }
            }
            StoreMsg::ReplicaDamaged {
                region_id,
                tablet_index,
                reason,
            } => {
                if let Err(e) = self.on_replica_damaged(region_id, tablet_index, &reason) {
                    tracing::error!(region_id, error = %e, "refusing a damaged replica failed");
                }
            }
            StoreMsg::SnapshotStatus {
                region_id,
                to_peer_id,
                ok,
            } => {
                if let Some(p) = self.peers.get_mut(&region_id) {
                    let status = if ok {
                        raft::SnapshotStatus::Finish
                    } else {
                        raft::SnapshotStatus::Failure
                    };
                    p.raw.report_snapshot(to_peer_id, status);
                    crate::metrics::SNAPSHOTS
                        .with_label_values(&[if ok { "sent" } else { "send_failed" }])
                        .inc();
                }
            }
            StoreMsg::QueryRegion { region_id, cb } => {
                cb(self.peers.get(&region_id).map(status_of));
            }
            StoreMsg::QueryRegions { cb } => cb(self.peers.values().map(status_of).collect()),
            StoreMsg::Stop => return true,
        }
        false
    }

    fn on_raft_message(&mut self, mut m: RaftMessage) {
        self.last_heard.insert(m.from_store, Instant::now());
        if m.is_store_heartbeat() {
            return;
        }
        if let Some(q) = m.merge_rollback {
            self.on_merge_rollback_msg(&m, q);
            return;
        }
        if self.handle_stale_peers(&m) {
            return;
        }
        if !self.peers.contains_key(&m.region_id) && !self.maybe_create_peer(&m) {
            return;
        }
        let Some(p) = self.peers.get_mut(&m.region_id) else {
            return;
        };
        if m.to_peer.id != p.meta.id {
            return; // addressed to an older incarnation of this replica
        }
        if m.wake_up {
            if p.hibernated {
                tracing::info!(
                    region_id = m.region_id,
                    gone_peer = m.from_peer.id,
                    "a replica of this Region was refused: waking up"
                );
                p.wake();
            }
            return;
        }
        if m.hibernate {
            if !p.is_leader() && p.leader_id() == m.from_peer.id {
                p.hibernated = true;
                self.sleeping_by_leader_store
                    .entry(m.from_store)
                    .or_default()
                    .insert(m.region_id);
            }
            return;
        }
        // Heartbeat acknowledgements still in flight when a leader hibernated must not wake it:
        // it would tick, heartbeat, wake its followers and never settle.
        let quiet_ack = p.is_leader()
            && m.message.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeatResponse;
        if p.hibernated && !quiet_ack {
            p.wake();
        }
        if self.votes_refused_until > Instant::now()
            && self.recovered_at_start.contains(&m.region_id)
            && refuses_votes_after_start(p, &m)
        {
            crate::metrics::RAFT_MESSAGES_DROPPED
                .with_label_values(&["vote_after_start"])
                .inc();
            return;
        }
        if m.message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            // The files must be this store's before Raft may accept the snapshot: once accepted
            // it has to be installed.
            let staged = SnapshotMeta::decode(m.message.get_snapshot().data.as_ref())
                .map_err(|e| e.to_string())
                .and_then(|mut meta| {
                    if meta.region.as_ref().map(|r| r.id) != Some(m.region_id) {
                        return Err("snapshot of another Region".to_string());
                    }
                    snap::stage(&self.snap_dirs, &mut meta)?;
                    Ok(meta)
                });
            match staged {
                Ok(meta) => m.message.mut_snapshot().data = meta.encode_to_vec().into(),
                Err(e) => {
                    tracing::warn!(region_id = m.region_id, error = %e, "dropping a snapshot");
                    return;
                }
            }
        }
        if let Err(e) = p.raw.step(m.message) {
            tracing::debug!(region_id = m.region_id, error = %e, "raft step failed");
        }
        // A follower may have forwarded a leadership transfer.
        p.note_transfer();
        if p.raw.store().take_snap_request() {
            self.snap_requests.push(m.region_id);
        }
    }

    /// Removed replicas do not always hear of their removal (the leader stops talking to them
    /// once it applied it). Three cases are settled here; returns true if `m` was consumed.
    ///
    /// * `m` tells our replica it was removed (`tombstone`, from a newer membership): destroy.
    /// * `m` is for a newer replica of a Region whose replica here is older (lower peer id,
    ///   and the sender's membership no longer has it): destroy ours, then `m` creates the new.
    /// * `m` comes from a replica our newer membership no longer has: tell it to go.
    fn handle_stale_peers(&mut self, m: &RaftMessage) -> bool {
        let conf_ver = |e: &prkv_proto::metapb::RegionEpoch| e.conf_ver;
        let Some(p) = self.peers.get(&m.region_id) else {
            return m.tombstone;
        };
        let ours = p.region.region_epoch.unwrap_or_default();
        if m.tombstone {
            if m.to_peer.id == p.meta.id && conf_ver(&m.region_epoch) > conf_ver(&ours) {
                tracing::info!(
                    region_id = m.region_id,
                    peer_id = p.meta.id,
                    "told this replica was removed: destroying it"
                );
                if let Err(e) = self.destroy_peer(m.region_id) {
                    tracing::warn!(region_id = m.region_id, error = %e, "destroying a stale replica failed");
                }
            }
            return true;
        }
        if m.to_peer.id > p.meta.id
            && conf_ver(&m.region_epoch) > conf_ver(&ours)
            && m.region
                .as_ref()
                .is_some_and(|r| !r.peers.iter().any(|x| x.id == p.meta.id))
        {
            tracing::info!(
                region_id = m.region_id,
                old = p.meta.id,
                new = m.to_peer.id,
                "a newer replica replaces a stale one"
            );
            if let Err(e) = self.destroy_peer(m.region_id) {
                tracing::warn!(region_id = m.region_id, error = %e, "destroying a stale replica failed");
                return true;
            }
            return false; // `m` now creates the new replica
        }
        if m.to_peer.id == p.meta.id
            && conf_ver(&m.region_epoch) < conf_ver(&ours)
            && !p.region.peers.iter().any(|x| x.id == m.from_peer.id)
        {
            let mut gone = RaftMessage::signal(m.region_id, p.meta, m.from_peer, ours, self.id);
            gone.tombstone = true;
            gone.to_store = m.from_store;
            self.trans.send(gone);
            return true;
        }
        false
    }

    /// Creates a replica that a leader is adding to this store. Only a message from a leader
    /// (append or heartbeat) may create one, and only if the sender's Region names it.
    fn maybe_create_peer(&mut self, m: &RaftMessage) -> bool {
        use raft::eraftpb::MessageType;
        let Some(region) = m.region.clone() else {
            return false;
        };
        if !region
            .peers
            .iter()
            .any(|p| p.id == m.to_peer.id && p.store_id == self.id)
        {
            return false;
        }
        // A local Region still covering part of this range has not applied the split that
        // creates this one (or this one is stale): the split will create it, with its data.
        // Keep the message for then: it is likely the new leader's vote.
        let version = |r: &Region| r.region_epoch.map_or(0, |e| e.version);
        let overlapping = self.peers.values().find(|p| {
            let r = &p.region;
            (region.end_key.is_empty() || r.start_key < region.end_key)
                && (r.end_key.is_empty() || region.start_key < r.end_key)
        });
        if let Some(p) = overlapping {
            if version(&p.region) < version(&region)
                && self.pending_split_msgs.len() < MAX_PENDING_SPLIT_MSGS
            {
                self.pending_split_msgs.push((Instant::now(), m.clone()));
            }
            return false;
        }
        let t = m.message.get_msg_type();
        if !matches!(
            t,
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        ) {
            return false;
        }
        // After a replica was destroyed, only a newer replica (higher peer id, newer membership)
        // may be created: late messages to the old one must not resurrect it.
        if let Ok(Some(state)) = self.engines.raft.region_state(region.id) {
            let old = state
                .region
                .and_then(|r| r.region_epoch)
                .map_or(0, |e| e.conf_ver);
            let new = region.region_epoch.as_ref().map_or(0, |e| e.conf_ver);
            if state.state == PeerState::Tombstone as i32
                && (old > new || m.to_peer.id <= state.destroyed_peer_id)
            {
                return false;
            }
        }
        let created = init_replica(&self.engines, &region).and_then(|_| {
            let engine = self
                .engines
                .kv
                .open_region(region.id, range_of(&region), 0)?;
            Peer::new(
                region.clone(),
                m.to_peer,
                self.engines.raft.clone(),
                engine,
                self.engines.kv.clone(),
                peer_config(&self.cfg),
                0,
            )
        });
        match created {
            Ok(p) => {
                tracing::info!(
                    store_id = self.id,
                    region_id = region.id,
                    peer_id = m.to_peer.id,
                    "replica created"
                );
                self.add_peer(p);
                self.neighbours_stale = true;
                self.report_damaged(region.id, false); // a refused replica's replacement
                true
            }
            Err(e) => {
                tracing::warn!(region_id = region.id, error = %e, "creating replica failed");
                false
            }
        }
    }

    /// First half of a split: checks it on the leader and asks PD for ids; PD's answer comes
    /// back as `ProposeSplit`.
    fn on_split_region(
        &mut self,
        region_id: RegionId,
        epoch: prkv_proto::metapb::RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        cb: SplitCallback,
    ) {
        let Some(p) = self.peers.get(&region_id) else {
            return cb(Err(Error::RegionNotFound(region_id)));
        };
        if let Err(e) = p.check_split(&epoch, &split_keys) {
            return cb(Err(e));
        }
        let tx = self.self_tx.clone();
        let count = split_keys.len();
        self.pd.ask_batch_split(
            p.region.clone(),
            count,
            Box::new(move |res| match res {
                Err(e) => cb(Err(e)),
                Ok(ids) => {
                    let msg = StoreMsg::ProposeSplit {
                        region_id,
                        epoch,
                        split_keys,
                        ids,
                        cb,
                    };
                    if let Err(e) = tx.try_send(msg) {
                        let err = match &e {
                            TrySendError::Full(_) => Error::ServerIsBusy {
                                reason: "store inbox is full".into(),
                            },
                            TrySendError::Disconnected(_) => Error::StoreStopped,
                        };
                        if let StoreMsg::ProposeSplit { cb, .. } = e.into_inner() {
                            cb(Err(err));
                        }
                    }
                }
            }),
        );
    }

    /// Creates the peers of Regions that a split of `parent` just produced on this store.
    fn create_split_peers(
        &mut self,
        parent: RegionId,
        children: Vec<(Region, Arc<dyn crate::storage::RegionEngine>)>,
    ) -> Result<()> {
        let Some(p) = self.peers.get(&parent) else {
            return Ok(());
        };
        let was_leader = p.is_leader();
        let mut regions = vec![p.region.clone()];
        self.worker.schedule(Job::Trim(p.engine.clone()));
        for (region, engine) in children {
            regions.push(region.clone());
            let Some(meta) = region.peers.iter().find(|x| x.store_id == self.id).copied() else {
                continue;
            };
            self.worker.schedule(Job::Trim(engine.clone()));
            let mut peer = Peer::new(
                region.clone(),
                meta,
                self.engines.raft.clone(),
                engine,
                self.engines.kv.clone(),
                peer_config(&self.cfg),
                RAFT_INIT_LOG_INDEX,
            )?;
            if was_leader && region.peers.len() > 1 {
                // The parent's leader was elected by these same stores a moment ago: campaign
                // at once instead of waiting an election timeout.
                let _ = peer.raw.campaign();
            } else if region.peers.len() == 1 {
                let _ = peer.raw.campaign();
            }
            self.add_peer(peer);
        }
        if was_leader {
            self.pd.report_batch_split(regions);
        }
        // Messages that arrived for the new Regions before this store applied the split.
        let pending = std::mem::take(&mut self.pending_split_msgs);
        let now = Instant::now();
        for (at, m) in pending {
            if now.duration_since(at) > PENDING_SPLIT_MSG_TTL {
                continue;
            }
            if self.peers.contains_key(&m.region_id) {
                self.on_raft_message(m);
            } else {
                self.pending_split_msgs.push((at, m));
            }
        }
        Ok(())
    }

    /// Starts split checks on leaders that were written enough since their last check and
    /// look big enough (cheap estimates; the worker then counts exactly).
    fn on_split_check_tick(&mut self) {
        let cp = &self.cfg.coprocessor;
        let check = SplitCheckConfig {
            split_size: cp.region_split_size.0,
            max_size: cp.region_max_size.0,
            split_keys: cp.region_split_keys,
            max_keys: cp.region_max_keys,
            batch_limit: cp.batch_split_limit as usize,
        };
        let diff_bytes = self.cfg.raftstore.region_split_check_diff.0;
        // Keys have no configured diff: like the byte diff (1/16 of a Region by default), check
        // after a sixteenth of `region-split-keys` new writes.
        let diff_keys = (check.split_keys / 16).max(1);
        for p in self.peers.values_mut() {
            if !p.is_leader()
                || (p.split_check_bytes < diff_bytes && p.split_check_keys < diff_keys)
            {
                continue;
            }
            // Estimates are cheap but coarse (the shared raft-kv DB only knows its totals, and
            // nothing of unflushed data per Region): trust them to skip the scan of a big
            // Region only; a small one is cheaper to count than to guess.
            let size = p.engine.approximate_size().unwrap_or(0);
            let keys = p.engine.approximate_keys().unwrap_or(0);
            if size >= CHEAP_SPLIT_SCAN_BYTES && size < check.max_size && keys < check.max_keys {
                // Not big enough yet; keep counting from here.
                p.split_check_bytes = 0;
                p.split_check_keys = 0;
                continue;
            }
            // One check per Region in the queue at a time: the writes since it was queued are
            // counted on, and checked by the next one.
            if p.split_check_queued
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                continue;
            }
            let job = Job::SplitCheck {
                region_id: p.region.id,
                epoch: p.region.region_epoch.unwrap_or_default(),
                engine: p.engine.clone(),
                cfg: check,
                queued: p.split_check_queued.clone(),
            };
            if self.worker.schedule(job) {
                p.split_check_bytes = 0;
                p.split_check_keys = 0;
            } else {
                p.split_check_queued
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let now = Instant::now();
        self.pending_split_msgs
            .retain(|(at, _)| now.duration_since(*at) <= PENDING_SPLIT_MSG_TTL);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.disk.refresh();
        let election_timeout =
            self.tick_interval * self.cfg.raftstore.raft_election_timeout_ticks as u32;
        // Store heartbeats: one message per other store, however many Regions we share.
        if self.neighbours_stale {
            self.refresh_neighbours();
        }
        self.ticks += 1;
        if now >= self.votes_refused_until && !self.recovered_at_start.is_empty() {
            self.recovered_at_start = HashSet::new();
        }
        if self
            .ticks
            .is_multiple_of(self.cfg.raftstore.raft_heartbeat_ticks as u64)
        {
            for s in &self.neighbours {
                self.trans.send(RaftMessage::store_heartbeat(self.id, *s));
            }
        }
        // Wake hibernated followers whose leader's store has gone silent.
        let silent: Vec<StoreId> = self
            .sleeping_by_leader_store
            .keys()
            .filter(|s| {
                self.last_heard
                    .get(s)
                    .is_none_or(|t| now.duration_since(*t) > election_timeout)
            })
            .copied()
            .collect();
        for s in silent {
            for region_id in self.sleeping_by_leader_store.remove(&s).unwrap_or_default() {
                if let Some(p) = self.peers.get_mut(&region_id) {
                    tracing::info!(
                        region_id,
                        leader_store = s,
                        "leader's store is silent: waking up"
                    );
                    p.wake();
                }
            }
        }
        if now >= self.next_gc {
            self.next_gc = now + self.cfg.raftstore.raft_log_gc_tick_interval.0;
            self.on_raft_log_gc_tick();
        }
        if now >= self.next_snap_sweep {
            self.next_snap_sweep = now + SNAP_SWEEP_INTERVAL;
            self.sweep_snapshots();
        }
        if now >= self.next_split_check {
            self.next_split_check = now + self.cfg.raftstore.split_region_check_tick_interval.0;
            self.on_split_check_tick();
        }
        self.report_to_pd(now);
        self.on_merge_tick();
        let mut ticked = 0;
        let mut hibernating = Vec::new();
        for p in self.peers.values_mut() {
            if p.hibernated {
                continue;
            }
            p.tick();
            ticked += 1;
            if p.raw.store().take_snap_request() {
                self.snap_requests.push(p.region_id());
            }
            // Not while a Ready is pending: its heartbeats, sent after the hibernate message,
            // would wake the followers right away.
            if p.wants_hibernate() && !p.raw.has_ready() {
                hibernating.push(p.region_id());
            }
        }
        self.stats.peer_ticks.fetch_add(ticked, Ordering::Relaxed);
        crate::metrics::HIBERNATED_REGIONS
            .set((self.peers.len() as u64 - ticked) as i64 + hibernating.len() as i64);
        for region_id in hibernating {
            let Some(p) = self.peers.get_mut(&region_id) else {
                continue;
            };
            p.hibernated = true;
            for to in p.region.peers.clone() {
                if to.id == p.meta.id {
                    continue;
                }
                let msg = raft::eraftpb::Message {
                    term: p.term(),
                    ..Default::default()
                };
                self.trans.send(RaftMessage {
                    region_id,
                    from_peer: p.meta,
                    to_peer: to,
                    region_epoch: p.region.region_epoch.unwrap_or_default(),
                    message: msg,
                    region: None,
                    region_conf_index: 0,
                    hibernate: true,
                    tombstone: false,
                    wake_up: false,
                    merge_rollback: None,
                    from_store: self.id,
                    to_store: to.store_id,
                });
            }
        }
    }

    /// Region heartbeats to PD: every leader each `raftstore.pd-heartbeat-tick-interval`, and
    /// on every tick the leaders whose replicas are still catching up (learners PD waits to
    /// promote). Also refreshes the store's Region and leader counts.
    fn report_to_pd(&mut self, now: Instant) {
        let all = now >= self.next_pd_heartbeat;
        if all {
            self.next_pd_heartbeat = now + self.cfg.raftstore.pd_heartbeat_tick_interval.0;
        }
        let mut leaders = 0;
        for p in self.peers.values_mut() {
            if !p.is_leader() {
                continue;
            }
            leaders += 1;
            let catching_up = p
                .region
                .peers
                .iter()
                .any(|x| x.role == prkv_proto::metapb::PeerRole::Learner as i32);
            if all || catching_up || p.pd_dirty {
                if let Some(hb) = p.heartbeat() {
                    p.pd_dirty = false;
                    self.pd.region_heartbeat(hb);
                }
            }
        }
        self.stats
            .regions
            .store(self.peers.len() as u64, Ordering::Relaxed);
        self.stats.leaders.store(leaders, Ordering::Relaxed);
    }

    /// Leaders that just took over or changed membership report at once, not at the next tick.
    fn report_dirty_to_pd(&mut self) {
        for p in self.peers.values_mut() {
            if p.pd_dirty {
                if let Some(hb) = p.heartbeat() {
                    self.pd.region_heartbeat(hb);
                }
                p.pd_dirty = false;
            }
        }
    }

    fn refresh_neighbours(&mut self) {
        self.neighbours = self
            .peers
            .values()
            .flat_map(|p| p.region.peers.iter().map(|peer| peer.store_id))
            .filter(|s| *s != self.id)
            .collect();
        self.neighbours_stale = false;
    }

    /// Raft-log GC: leaders propose compaction; then log files no Region needs are purged,
    /// and the tablets of Regions that still pin old files are flushed so that their next
    /// compaction can pass the old entries.
    fn on_raft_log_gc_tick(&mut self) {
        let threshold = self.cfg.raftstore.raft_log_gc_threshold;
        for p in self.peers.values_mut() {
            p.maybe_propose_compact(threshold);
        }
        match self.engines.raft.purge() {
            Ok(holders) => {
                for id in holders {
                    if let Some(p) = self.peers.get(&id) {
                        crate::metrics::TABLET_FLUSHES
                            .with_label_values(&["purge"])
                            .inc();
                        if let Err(e) = p.engine.flush(false) {
                            tracing::warn!(region_id = id, error = %e, "flushing a tablet that holds raft-engine files failed");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "purging raft-engine failed"),
        }
    }

    fn send_raft_messages(&self, region_id: RegionId, msgs: Vec<raft::eraftpb::Message>) {
        let Some(p) = self.peers.get(&region_id) else {
            return;
        };
        for msg in msgs {
            let Some(to) = p.peer_by_id(msg.to) else {
                continue;
            };
            let is_snapshot = msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
            let m = RaftMessage {
                region_id,
                from_peer: p.meta,
                to_peer: to,
                region_epoch: p.region.region_epoch.unwrap_or_default(),
                message: msg,
                region: Some(p.region.clone()),
                region_conf_index: p.applied_index,
                hibernate: false,
                tombstone: false,
                wake_up: false,
                merge_rollback: None,
                from_store: self.id,
                to_store: to.store_id,
            };
            if is_snapshot {
                let tx = self.self_tx.clone();
                let to_peer_id = to.id;
                self.trans.send_snapshot(
                    m,
                    Box::new(move |ok| {
                        let _ = tx.try_send(StoreMsg::SnapshotStatus {
                            region_id,
                            to_peer_id,
                            ok,
                        });
                    }),
                );
            } else {
                self.trans.send(m);
            }
        }
    }

    fn handle_readies(&mut self) -> Result<()> {
        let mut wb = LogWriteBatch::new();
        let mut pending = Vec::new();
        let ids: Vec<RegionId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.raw.has_ready())
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.stats.ready_rounds.fetch_add(1, Ordering::Relaxed);
        let mut need_sync = false;
        for id in ids {
            let p = self.peers.get_mut(&id).expect("listed above");
            // Before any of this round's messages leave: a transfer's MsgTimeoutNow must not
            // reach its target while local readers still see our lease (`local_read`).
            p.publish_reads();
            let mut rd = p.raw.ready();
            let msgs = rd.take_messages();
            if !rd.snapshot().is_empty() {
                let snapshot = rd.snapshot().clone();
                // Replicas here of Regions merged into this one, still waiting for a
                // CommitMerge the snapshot already contains: the snapshot replaces them.
                for source in self.merge_sources_covered_by(id, &snapshot) {
                    tracing::info!(
                        region_id = id,
                        source,
                        "snapshot of a merged Region replaces its source's replica"
                    );
                    self.destroy_peer(source)?;
                }
                let p = self.peers.get_mut(&id).expect("listed above");
                Self::install_snapshot(&self.engines, p, &snapshot)?;
                self.neighbours_stale = true;
                p.pd_dirty = true;
            }
            let p = self.peers.get_mut(&id).expect("listed above");
            p.on_read_states(rd.take_read_states());
            let committed = rd.take_committed_entries();
            let entries = rd.take_entries();
            if !entries.is_empty() {
                wb.append(id, &entries)?;
                need_sync = true;
            }
            if let Some(hs) = rd.hs() {
                // Term and vote must be durable before anyone hears of them (a vote given twice
                // in one term breaks election safety). A commit index alone need not be: after
                // a crash it is recovered from the quorum, and from the apply index (see
                // `Peer::new`).
                let old = p.raw.store().hard_state();
                if hs.term != old.term || hs.vote != old.vote {
                    need_sync = true;
                }
                wb.put_hard_state(id, hs)?;
                p.raw.store().set_hard_state(hs.clone());
            }
            let persisted = rd.take_persisted_messages();
            self.send_raft_messages(id, msgs);
            pending.push((id, rd, committed, persisted, entries));
        }
        if need_sync {
            // Durability boundary: one write, one fsync, for every Region of this round.
            self.engines.raft.write(&mut wb, true)?;
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        } else if !wb.is_empty() {
            self.engines.raft.write(&mut wb, false)?;
        }
        let mut removed = Vec::new();
        for (id, rd, committed, persisted, entries) in pending {
            let Some(p) = self.peers.get(&id) else {
                continue; // merged away by a Region applied earlier in this round
            };
            // Persisted now: Raft reads them back from memory to apply them (`region_log`).
            p.raw.store().cache_persisted(entries);
            self.send_raft_messages(id, persisted);
            if !self.apply_in_round(id, committed, &mut removed)? {
                continue;
            }
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            let mut light = p.raw.advance(rd);
            let msgs = light.take_messages();
            let committed = light.take_committed_entries();
            self.send_raft_messages(id, msgs);
            if !self.apply_in_round(id, committed, &mut removed)? {
                continue;
            }
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            let applied = p.applied_index;
            p.raw.advance_apply_to(applied);
            // The applied entry itself stays: the next append names it as the previous
            // entry (its term is checked on both ends of the append).
            p.raw.store().evict_cache_to(applied.saturating_sub(1));
            p.on_role_maybe_changed();
        }
        for id in removed {
            self.destroy_peer(id)?;
        }
        self.report_dirty_to_pd();
        Ok(())
    }

    /// `apply_or_refuse` within a Ready round: a replica that left its Region is noted in
    /// `removed`, to be destroyed after the round. Returns whether the replica is still here.
    fn apply_in_round(
        &mut self,
        id: RegionId,
        entries: Vec<raft::eraftpb::Entry>,
        removed: &mut Vec<RegionId>,
    ) -> Result<bool> {
        Ok(match self.apply_or_refuse(id, entries)? {
            Applied::Kept => true,
            Applied::Removed => {
                removed.push(id);
                false
            }
            Applied::Refused => false,
        })
    }

    /// `apply`, except that a tablet found damaged while applying refuses this replica (its
    /// peer goes; PD rebuilds it from the others) instead of stopping the whole store. The
    /// shared DB of `raft-kv` holds every Region: its corruption still stops the store.
    fn apply_or_refuse(
        &mut self,
        id: RegionId,
        entries: Vec<raft::eraftpb::Entry>,
    ) -> Result<Applied> {
        match self.apply(id, entries) {
            Ok(true) => Ok(Applied::Removed),
            Ok(false) => Ok(Applied::Kept),
            Err(Error::Corruption(reason))
                if self.engines.kv.kind() == EngineKind::PartitionedRaftKv =>
            {
                let Some(index) = self.peers.get(&id).map(|p| p.engine.tablet_index()) else {
                    return Err(Error::Corruption(reason));
                };
                tracing::error!(region_id = id, %reason, "applying to a damaged tablet");
                self.on_replica_damaged(id, index, &reason)?;
                Ok(Applied::Refused)
            }
            Err(e) => Err(e),
        }
    }

    /// Applies entries to one peer; returns whether the peer was removed from its Region.
    fn apply(&mut self, id: RegionId, entries: Vec<raft::eraftpb::Entry>) -> Result<bool> {
        if entries.is_empty() {
            return Ok(false);
        }
        self.stats
            .applied_entries
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        let mut entries = entries;
        loop {
            let Some(p) = self.peers.get_mut(&id) else {
                return Ok(false); // merged away (see `merge.rs`)
            };
            let mut outcome = p.apply(entries)?;
            if outcome.region_changed {
                self.neighbours_stale = true;
            }
            if outcome.removed {
                return Ok(true);
            }
            if let Some(index) = outcome.compact_to {
                p.compact_log(index)?;
            }
            if !outcome.split.is_empty() {
                self.create_split_peers(id, outcome.split)?;
            }
            match outcome.commit_merge.take() {
                Some(mut pending) => {
                    entries = std::mem::take(&mut pending.rest);
                    self.commit_merge(id, pending)?;
                    if entries.is_empty() {
                        return Ok(false);
                    }
                }
                None => return Ok(false),
            }
        }
    }

    /// Removes a replica that left its Region: its data and its log go; a tombstone stays so
    /// that late messages cannot recreate it.
    fn destroy_peer(&mut self, id: RegionId) -> Result<()> {
        let Some((region, meta)) = self.take_peer(id) else {
            return Ok(());
        };
        self.write_tombstone(id, region, meta.id)?;
        crate::crash_point!("destroy_after_tombstone");
        self.engines.kv.destroy_region(id)?;
        tracing::info!(store_id = self.id, region_id = id, "replica destroyed");
        Ok(())
    }

    /// Puts a replica under this store's loop, with its delegate for local reads.
    fn add_peer(&mut self, mut peer: Peer) {
        let id = peer.region_id();
        peer.set_read_delegate(self.readers.register(id));
        self.peers.insert(id, peer);
    }

    /// Stops a replica's peer (its pending commands fail); returns its Region and itself.
    fn take_peer(&mut self, id: RegionId) -> Option<(Region, PeerMeta)> {
        self.neighbours_stale = true;
        // First, so that no local read starts from a replica that is going away.
        self.readers.unregister(id);
        let mut p = self.peers.remove(&id)?;
        p.fail_all(Error::RegionNotFound(id));
        Some((p.region.clone(), p.meta))
    }

    /// Drops a replica's log and leaves a tombstone of `destroyed_peer_id`: late messages to it
    /// cannot recreate it, and only a newer replica may take its place.
    /// One synced write (see `install_snapshot` for why not two).
    fn write_tombstone(&self, id: RegionId, region: Region, destroyed_peer_id: u64) -> Result<()> {
        let mut wb = LogWriteBatch::new();
        wb.clean(id);
        let tomb = RegionLocalState {
            state: PeerState::Tombstone as i32,
            region: Some(region),
            destroyed_peer_id,
            ..Default::default()
        };
        wb.put_region_state(id, &tomb)?;
        self.engines.raft.write(&mut wb, true)?;
        Ok(())
    }
}

/// Whether a replica that started less than an election timeout ago must ignore `m`: a vote
/// or pre-vote request that is not a leadership transfer's, in a Region with other voters.
///
/// The leader's lease rests on its followers refusing votes for an election timeout after
/// hearing from it (`check_quorum`). A follower that restarts forgets when it last heard, and
/// would vote at once for a candidate that has been timing out all along: with it, that
/// candidate wins and commits while the old leader still serves reads from its lease (TiKV hit
/// this, tikv#15035). Refusing votes for one election timeout after the start restores the
/// promise: the old lease, shorter than an election timeout, has run out before any vote
/// counts. A leadership transfer's votes are let through, as Raft lets them through a lease.
/// Only replicas recovered at the start are concerned (`Store::recovered_at_start`): one made
/// since never promised anything.
fn refuses_votes_after_start(p: &Peer, m: &RaftMessage) -> bool {
    use raft::eraftpb::MessageType;
    let vote = matches!(
        m.message.get_msg_type(),
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
    );
    let transfer = m.message.context.as_ref() == raft::CAMPAIGN_TRANSFER;
    let voters = p
        .region
        .peers
        .iter()
        .filter(|x| x.role != prkv_proto::metapb::PeerRole::Learner as i32)
        .count();
    vote && !transfer && voters > 1
}

/// Removes a snapshot's received files once its install is recorded.
fn remove_installed_snapshot(dir: &std::path::Path) {
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "removing an installed snapshot failed");
        }
    }
}

impl Store {
    /// Removes snapshot directories nobody needs (`SnapDirs::sweep`): generated ones that no
    /// Region holds ready (superseded, or of a Region gone or no longer led here) and received
    /// ones that Raft never took or whose transfer was abandoned.
    fn sweep_snapshots(&mut self) {
        let mut live = HashSet::new();
        for (id, p) in &self.peers {
            let gen = p.raw.store().snap_gen();
            let g = gen.lock();
            if g.generating {
                return; // its directory is not recorded yet: sweep next time
            }
            if let Some(s) = &g.ready {
                let md = s.get_metadata();
                live.insert(snap::snapshot_key(*id, md.term, md.index));
            }
        }
        let removed = self
            .snap_dirs
            .sweep(&live, SNAP_GEN_MIN_AGE, snap::STALE_RECEIVED);
        if removed > 0 {
            tracing::info!(
                store_id = self.id,
                removed,
                "removed snapshot directories nobody needs"
            );
        }
    }
}

fn status_of(p: &Peer) -> RegionStatus {
    RegionStatus {
        region: p.region.clone(),
        peer: p.meta,
        leader_id: p.leader_id(),
        term: p.term(),
        applied_index: p.applied_index,
        truncated_index: p.raw.store().truncated().0,
        hibernated: p.hibernated,
    }
}

/// Removes a Region replica written by [`bootstrap_region`] that never became part of a
/// cluster (another store bootstrapped first).
pub fn discard_bootstrap_region(engines: &Engines, region_id: RegionId) -> Result<()> {
    // The engine's data is found by the Region's range (raft-kv), through an open view.
    if let Some(region) = engines.raft.region_state(region_id)?.and_then(|s| s.region) {
        engines
            .kv
            .open_region(region_id, range_of(&region), RAFT_INIT_LOG_INDEX)?;
    }
    let mut wb = LogWriteBatch::new();
    wb.clean(region_id);
    engines.raft.write(&mut wb, true)?;
    match engines.kv.destroy_region(region_id) {
        Err(crate::storage::Error::RegionNotFound(_)) | Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
