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
use prkv_proto::metapb::{Peer as PeerMeta, Region};
use prkv_proto::serverpb::{PeerState, RegionLocalState};

use super::error::{Error, Result};
use super::msg::{PdReporter, RaftMessage, RegionStatus, StoreId, StoreMsg};
use super::peer::{Peer, PeerConfig};
use super::transport::Transport;
use crate::config::Config;
use crate::raftlog::LogWriteBatch;
use crate::storage::{Engines, KeyRange, RegionId};

/// Messages handled per loop round before the Readies are processed: large enough to batch
/// many proposals into one fsync, small enough that ticks and Readies are not starved.
pub const MAX_MSGS_PER_ROUND: usize = 4096;
/// Capacity of a store's inbox. When it is full, writes get `ServerIsBusy` and Raft messages
/// are dropped (Raft retransmits): memory stays bounded however fast clients push.
pub const STORE_INBOX_CAPACITY: usize = 16 * 1024;

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
}

/// A handle for sending messages to a store's loop.
#[derive(Clone)]
pub struct StoreRouter {
    pub store_id: StoreId,
    tx: Sender<StoreMsg>,
}

impl StoreRouter {
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

/// Writes the initial state of a Region replica: its Region in raft-engine and an empty log.
/// Used to bootstrap a cluster's first Regions (PD does this in the full system).
pub fn bootstrap_region(engines: &Engines, region: &Region) -> Result<()> {
    init_replica(engines, region, 0)
}

/// Writes the initial state of a replica whose Region reflects membership changes through
/// `conf_index`.
fn init_replica(engines: &Engines, region: &Region, conf_index: u64) -> Result<()> {
    let state = RegionLocalState {
        state: PeerState::Normal as i32,
        region: Some(region.clone()),
        tablet_index: 0,
        conf_index,
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
    }
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
}

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
    let mut store = Store {
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
    };
    store.recover()?;
    let thread = std::thread::Builder::new()
        .name(format!("store-{id}"))
        .spawn(move || store.run())
        .map_err(|e| Error::Storage(format!("spawning store thread: {e}")))?;
    Ok(StoreHandle {
        router: StoreRouter { store_id: id, tx },
        stats,
        thread: Some(thread),
    })
}

impl Store {
    /// Rebuilds every peer: Raft state from raft-engine, applied state from the engines.
    fn recover(&mut self) -> Result<()> {
        for region_id in self.engines.raft.regions() {
            let Some(state) = self.engines.raft.region_state(region_id)? else {
                continue;
            };
            if state.state == PeerState::Tombstone as i32 {
                continue;
            }
            let Some(region) = state.region else { continue };
            let Some(meta) = region.peers.iter().find(|p| p.store_id == self.id).cloned() else {
                continue;
            };
            let engine =
                self.engines
                    .kv
                    .open_region(region.id, range_of(&region), state.tablet_index)?;
            let single = region.peers.len() == 1 && region.peers[0].id == meta.id;
            let mut peer = Peer::new(
                region,
                meta,
                self.engines.raft.clone(),
                engine,
                peer_config(&self.cfg),
                state.conf_index,
            )?;
            if single {
                // The only voter (a freshly bootstrapped Region): no one else can win an
                // election, so do not wait an election timeout to hold one.
                let _ = peer.raw.campaign();
            }
            self.peers.insert(region_id, peer);
        }
        tracing::info!(
            store_id = self.id,
            regions = self.peers.len(),
            "store recovered"
        );
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
        }
        for p in self.peers.values_mut() {
            p.fail_all(Error::StoreStopped);
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
            StoreMsg::TransferLeader { region_id, to } => {
                if let Some(p) = self.peers.get_mut(&region_id) {
                    p.wake();
                    p.raw.transfer_leader(to.id);
                }
            }
            StoreMsg::QueryRegion { region_id, cb } => {
                cb(self.peers.get(&region_id).map(|p| RegionStatus {
                    region: p.region.clone(),
                    peer: p.meta,
                    leader_id: p.leader_id(),
                    term: p.term(),
                    applied_index: p.applied_index,
                    truncated_index: p.raw.store().truncated().0,
                    hibernated: p.hibernated,
                }));
            }
            StoreMsg::Stop => return true,
        }
        false
    }

    fn on_raft_message(&mut self, m: RaftMessage) {
        self.last_heard.insert(m.from_store, Instant::now());
        if m.is_store_heartbeat() {
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
        if let Err(e) = p.raw.step(m.message) {
            tracing::debug!(region_id = m.region_id, error = %e, "raft step failed");
        }
    }

    /// Creates a replica that a leader is adding to this store. Only a message from a leader
    /// (append or heartbeat) may create one, and only if the sender's Region names it.
    fn maybe_create_peer(&mut self, m: &RaftMessage) -> bool {
        use raft::eraftpb::MessageType;
        let t = m.message.get_msg_type();
        if !matches!(
            t,
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        ) {
            return false;
        }
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
        let created = init_replica(&self.engines, &region, m.region_conf_index).and_then(|_| {
            let engine = self
                .engines
                .kv
                .open_region(region.id, range_of(&region), 0)?;
            Peer::new(
                region.clone(),
                m.to_peer,
                self.engines.raft.clone(),
                engine,
                peer_config(&self.cfg),
                m.region_conf_index,
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
                self.peers.insert(region.id, p);
                self.neighbours_stale = true;
                true
            }
            Err(e) => {
                tracing::warn!(region_id = region.id, error = %e, "creating replica failed");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let election_timeout =
            self.tick_interval * self.cfg.raftstore.raft_election_timeout_ticks as u32;
        // Store heartbeats: one message per other store, however many Regions we share.
        if self.neighbours_stale {
            self.refresh_neighbours();
        }
        self.ticks += 1;
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
        self.report_to_pd(now);
        let mut ticked = 0;
        let mut hibernating = Vec::new();
        for p in self.peers.values_mut() {
            if p.hibernated {
                continue;
            }
            p.tick();
            ticked += 1;
            // Not while a Ready is pending: its heartbeats, sent after the hibernate message,
            // would wake the followers right away.
            if p.wants_hibernate() && !p.raw.has_ready() {
                hibernating.push(p.region_id());
            }
        }
        self.stats.peer_ticks.fetch_add(ticked, Ordering::Relaxed);
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
            self.trans.send(RaftMessage {
                region_id,
                from_peer: p.meta,
                to_peer: to,
                region_epoch: p.region.region_epoch.unwrap_or_default(),
                message: msg,
                region: Some(p.region.clone()),
                region_conf_index: p.applied_index,
                hibernate: false,
                from_store: self.id,
                to_store: to.store_id,
            });
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
            let mut rd = p.raw.ready();
            let msgs = rd.take_messages();
            if !rd.snapshot().is_empty() {
                tracing::error!(
                    region_id = id,
                    "snapshots are not supported yet; ignoring one"
                );
            }
            p.on_read_states(rd.take_read_states());
            let committed = rd.take_committed_entries();
            if !rd.entries().is_empty() {
                wb.append(id, rd.entries())?;
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
            pending.push((id, rd, committed, persisted));
        }
        if need_sync {
            // Durability boundary: one write, one fsync, for every Region of this round.
            self.engines.raft.write(&mut wb, true)?;
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        } else if !wb.is_empty() {
            self.engines.raft.write(&mut wb, false)?;
        }
        let mut removed = Vec::new();
        for (id, rd, committed, persisted) in pending {
            self.send_raft_messages(id, persisted);
            if self.apply(id, committed)? {
                removed.push(id);
                continue;
            }
            let p = self.peers.get_mut(&id).expect("peer exists");
            let mut light = p.raw.advance(rd);
            let msgs = light.take_messages();
            let committed = light.take_committed_entries();
            self.send_raft_messages(id, msgs);
            if self.apply(id, committed)? {
                removed.push(id);
                continue;
            }
            let p = self.peers.get_mut(&id).expect("peer exists");
            let applied = p.applied_index;
            p.raw.advance_apply_to(applied);
            p.on_role_maybe_changed();
        }
        for id in removed {
            self.destroy_peer(id)?;
        }
        self.report_dirty_to_pd();
        Ok(())
    }

    /// Applies entries to one peer; returns whether the peer was removed from its Region.
    fn apply(&mut self, id: RegionId, entries: Vec<raft::eraftpb::Entry>) -> Result<bool> {
        if entries.is_empty() {
            return Ok(false);
        }
        self.stats
            .applied_entries
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        let p = self.peers.get_mut(&id).expect("peer exists");
        let outcome = p.apply(entries)?;
        if outcome.region_changed {
            self.neighbours_stale = true;
        }
        if outcome.removed {
            return Ok(true);
        }
        if let Some(index) = outcome.compact_to {
            p.compact_log(index)?;
        }
        Ok(false)
    }

    /// Removes a replica that left its Region: its data and its log go; a tombstone stays so
    /// that late messages cannot recreate it.
    fn destroy_peer(&mut self, id: RegionId) -> Result<()> {
        self.neighbours_stale = true;
        let Some(mut p) = self.peers.remove(&id) else {
            return Ok(());
        };
        p.fail_all(Error::RegionNotFound(id));
        let region = p.region.clone();
        let destroyed_peer_id = p.meta.id;
        drop(p);
        let mut wb = LogWriteBatch::new();
        wb.clean(id);
        self.engines.raft.write(&mut wb, true)?;
        let tomb = RegionLocalState {
            state: PeerState::Tombstone as i32,
            region: Some(region),
            tablet_index: 0,
            destroyed_peer_id,
            conf_index: 0,
        };
        wb.put_region_state(id, &tomb)?;
        self.engines.raft.write(&mut wb, true)?;
        self.engines.kv.destroy_region(id)?;
        tracing::info!(store_id = self.id, region_id = id, "replica destroyed");
        Ok(())
    }
}

/// Removes a Region replica written by [`bootstrap_region`] that never became part of a
/// cluster (another store bootstrapped first).
pub fn discard_bootstrap_region(engines: &Engines, region_id: RegionId) -> Result<()> {
    let mut wb = LogWriteBatch::new();
    wb.clean(region_id);
    engines.raft.write(&mut wb, true)?;
    engines.kv.destroy_region(region_id)?;
    Ok(())
}
