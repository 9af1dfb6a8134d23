//! An in-process cluster: N stores, each with its own data dir and engine, joined by a
//! [`SimNetwork`], with `must_*` helpers in the style of TiKV's test_raftstore.
//!
//! Regions are bootstrapped directly (a stand-in for PD): `bootstrap(n, stores)` cuts the key
//! space into `n` Regions `[r{i}, r{i+1})` with ids `1..=n`, and peer id `region * 100 + store`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prkv::config::{Config, EngineKind, ReadableDuration, ReadableSize};
use prkv::raftstore::{
    bootstrap_region, start_store, ChangePeer, Error, NoPd, PdReporter, RegionHeartbeat,
    RegionStatus, SimNetwork, SplitIdsCallback, StoreHandle, StoreId, StoreMsg, Transport,
};
use prkv::storage::{Cf, Engines, StoreEngine};
use prkv_proto::metapb::{Peer, PeerRole, Region, RegionEpoch};
use prkv_proto::serverpb::{mutation, Mutation};

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Cluster {
    pub kind: EngineKind,
    pub net: SimNetwork,
    pub stores: HashMap<StoreId, StoreHandle>,
    /// The engines of each running store, shared with it, for reading replicas directly.
    pub kv: HashMap<StoreId, Arc<dyn StoreEngine>>,
    pub regions: Vec<Region>,
    pub cfg: Config,
    /// What the stores reported to PD (a stand-in that only records).
    pub pd: Arc<RecordingPd>,
    /// Declared last so that it is dropped last: the stores stop before their data dirs go.
    pub dirs: HashMap<StoreId, tempfile::TempDir>,
}

#[allow(unused_imports)]
pub use prkv::raftstore::even_region_key as region_key;

impl Cluster {
    pub fn new(stores: u64, kind: EngineKind) -> Cluster {
        // `PRKV_LOG=info cargo test ...` shows the stores' logs with the test's output.
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("PRKV_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let mut cfg = Config::default();
        cfg.storage.engine = kind;
        cfg.rocksdb.write_buffer_limit = ReadableSize::mib(128);
        cfg.rocksdb.write_buffer_size = ReadableSize::mib(4);
        cfg.rocksdb.block_cache_size = ReadableSize::mib(8);
        cfg.rocksdb.max_background_jobs = 2;
        // Tablets write no WAL: stopping a store without a flush loses exactly what a crash
        // would, so every restart here exercises recovery by log replay.
        cfg.rocksdb.skip_flush_on_close = true;
        cfg.raft_engine.target_file_size = ReadableSize::mib(8);
        cfg.raftstore.raft_base_tick_interval = ReadableDuration::millis(20);
        cfg.raftstore.raft_heartbeat_ticks = 2;
        cfg.raftstore.raft_election_timeout_ticks = 10;
        cfg.raftstore.raft_store_max_leader_lease = ReadableDuration::millis(150);
        cfg.raftstore.raft_log_gc_tick_interval = ReadableDuration::millis(100);
        cfg.raftstore.raft_log_gc_threshold = 20;
        // Tablets flush for log GC once 50 entries are unflushed (the default waits for
        // memory pressure), so that tests see logs compacted, and snapshots needed, after a
        // few hundred writes.
        cfg.raftstore.raft_log_gc_count_limit = 50;
        cfg.validate().unwrap();
        let dirs = (1..=stores)
            .map(|s| (s, tempfile::tempdir().unwrap()))
            .collect();
        Cluster {
            kind,
            net: SimNetwork::new(),
            dirs,
            stores: HashMap::new(),
            kv: HashMap::new(),
            regions: Vec::new(),
            cfg,
            pd: Arc::new(RecordingPd::default()),
        }
    }

    fn store_config(&self, store: StoreId) -> Config {
        let mut c = self.cfg.clone();
        c.storage.data_dir = self.dirs[&store].path().to_path_buf();
        c
    }

    /// Creates `n` Regions covering the key space, replicated on `stores`.
    pub fn bootstrap(&mut self, n: u64, stores: &[StoreId]) {
        self.regions = prkv::raftstore::even_regions(n, stores);
        for s in self.dirs.keys().copied().collect::<Vec<_>>() {
            let engines = Engines::open(&self.store_config(s)).unwrap();
            for r in &self.regions {
                if r.peers.iter().any(|p| p.store_id == s) {
                    bootstrap_region(&engines, r).unwrap();
                }
            }
        }
    }

    pub fn start(&mut self) {
        for s in self.dirs.keys().copied().collect::<Vec<_>>() {
            self.start_store(s);
        }
    }

    pub fn start_store(&mut self, s: StoreId) {
        let engines = Engines::open(&self.store_config(s)).unwrap();
        self.kv.insert(s, engines.kv.clone());
        let trans: Arc<dyn Transport> = Arc::new(self.net.clone());
        let pd: Arc<dyn PdReporter> = self.pd.clone();
        let handle = start_store(s, self.store_config(s), engines, trans, pd).unwrap();
        self.net.register(s, handle.router.clone());
        self.stores.insert(s, handle);
    }

    /// Stops a store as a crash would: no flush, memtables lost.
    pub fn stop_store(&mut self, s: StoreId) {
        self.net.unregister(s);
        self.kv.remove(&s);
        if let Some(h) = self.stores.remove(&s) {
            h.stop();
        }
    }

    pub fn restart_store(&mut self, s: StoreId) {
        self.stop_store(s);
        self.start_store(s);
    }

    pub fn partition(&self, a: &[StoreId], b: &[StoreId]) {
        self.net.partition(a, b);
    }

    pub fn isolate(&self, s: StoreId) {
        self.net.isolate(s);
    }

    pub fn heal(&self) {
        self.net.clear_filters();
    }

    pub fn region_for_key(&self, key: &[u8]) -> &Region {
        self.regions
            .iter()
            .find(|r| {
                key >= r.start_key.as_slice()
                    && (r.end_key.is_empty() || key < r.end_key.as_slice())
            })
            .expect("bootstrapped Regions cover the key space")
    }

    pub fn status(&self, s: StoreId, region_id: u64) -> Option<RegionStatus> {
        let (tx, rx) = std::sync::mpsc::channel();
        let router = &self.stores.get(&s)?.router;
        router
            .try_send(StoreMsg::QueryRegion {
                region_id,
                cb: Box::new(move |st| drop(tx.send(st))),
            })
            .ok()?;
        rx.recv_timeout(TIMEOUT).ok().flatten()
    }

    /// The store whose replica of `region_id` is leader, if one says so.
    pub fn leader_store(&self, region_id: u64) -> Option<StoreId> {
        self.stores.keys().copied().find(|s| {
            self.status(*s, region_id)
                .is_some_and(|st| st.leader_id == st.peer.id && st.leader_id != 0)
        })
    }

    pub fn must_leader(&self, region_id: u64) -> StoreId {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.leader_store(region_id) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "Region {region_id} has no leader after {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn epoch(&self, region_id: u64) -> RegionEpoch {
        self.regions
            .iter()
            .find(|r| r.id == region_id)
            .and_then(|r| r.region_epoch)
            .unwrap_or_default()
    }

    /// Sends a write to store `s` and waits for its answer.
    pub fn put_on(&self, s: StoreId, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let region = self.region_for_key(key);
        let m = Mutation {
            op: mutation::Op::Put as i32,
            cf: "default".into(),
            key: key.to_vec(),
            value: value.to_vec(),
        };
        self.write_on(s, region.id, vec![m])
    }

    pub fn write_on(
        &self,
        s: StoreId,
        region_id: u64,
        mutations: Vec<Mutation>,
    ) -> Result<(), Error> {
        let rx = self.async_write(s, region_id, mutations)?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| Error::Timeout("write".into()))?
    }

    /// Sends a write without waiting; the answer arrives on the returned channel.
    pub fn async_write(
        &self,
        s: StoreId,
        region_id: u64,
        mutations: Vec<Mutation>,
    ) -> Result<std::sync::mpsc::Receiver<Result<(), Error>>, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        let router = &self.stores.get(&s).ok_or(Error::StoreStopped)?.router;
        router.try_send(StoreMsg::Write {
            region_id,
            epoch: self.epoch(region_id),
            mutations,
            term_fence: 0,
            cb: Box::new(move |r| drop(tx.send(r))),
        })?;
        Ok(rx)
    }

    /// Puts through whichever store leads, retrying retryable errors until acknowledged.
    pub fn must_put(&self, key: &[u8], value: &[u8]) {
        let region_id = self.region_for_key(key).id;
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.leader_store(region_id) {
                match self.put_on(s, key, value) {
                    Ok(()) => return,
                    Err(e) => last = Some(e),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("put {key:?} never acknowledged; last error {last:?}");
    }

    /// A linearizable read through store `s`, as the gRPC service makes it: from the leader's
    /// lease on this thread if it may, else through the store loop.
    pub fn get_on(&self, s: StoreId, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let region_id = self.region_for_key(key).id;
        let router = &self.stores.get(&s).ok_or(Error::StoreStopped)?.router;
        if let Some(snap) = router.local_read(region_id, &self.epoch(region_id)) {
            return snap
                .snap
                .get(Cf::Default, key)
                .map_err(|e| Error::Storage(e.to_string()));
        }
        self.get_on_loop(s, key)
    }

    /// A linearizable read through store `s`'s loop (never a local read).
    pub fn get_on_loop(&self, s: StoreId, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let region_id = self.region_for_key(key).id;
        let (tx, rx) = std::sync::mpsc::channel();
        let router = &self.stores.get(&s).ok_or(Error::StoreStopped)?.router;
        let key2 = key.to_vec();
        router.try_send(StoreMsg::Read {
            region_id,
            epoch: self.epoch(region_id),
            cb: Box::new(move |r| {
                let v = r.and_then(|snap| {
                    snap.snap
                        .get(Cf::Default, &key2)
                        .map_err(|e| Error::Storage(e.to_string()))
                });
                let _ = tx.send(v);
            }),
        })?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| Error::Timeout("read".into()))?
    }

    pub fn must_get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let region_id = self.region_for_key(key).id;
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.leader_store(region_id) {
                match self.get_on(s, key) {
                    Ok(v) => return v,
                    Err(e) => last = Some(e),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("get {key:?} never answered; last error {last:?}");
    }

    /// Reads a replica's engine directly, bypassing Raft (to check what a replica holds).
    pub fn local_get(&self, s: StoreId, key: &[u8]) -> Option<Vec<u8>> {
        let region_id = self.region_for_key(key).id;
        let engine = self.kv.get(&s)?.region(region_id)?;
        engine.get(Cf::Default, key).unwrap()
    }

    /// Waits until store `s`'s replica holds `value` under `key`.
    pub fn must_replicate(&self, s: StoreId, key: &[u8], value: &[u8]) {
        let deadline = Instant::now() + TIMEOUT;
        while self.local_get(s, key).as_deref() != Some(value) {
            assert!(Instant::now() < deadline, "store {s} never got {key:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn must_transfer_leader(&self, region_id: u64, to_store: StoreId) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let leader = self.must_leader(region_id);
            if leader == to_store {
                return;
            }
            let st = self
                .status(to_store, region_id)
                .expect("target has a replica");
            let _ = self.stores[&leader]
                .router
                .try_send(StoreMsg::TransferLeader {
                    region_id,
                    to: st.peer,
                });
            assert!(
                Instant::now() < deadline,
                "leader of {region_id} never moved to store {to_store}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn change_peers(&self, region_id: u64, changes: Vec<ChangePeer>) {
        self.must_change(region_id, changes);
    }

    fn must_change(&self, region_id: u64, changes: Vec<ChangePeer>) {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            let leader = self.must_leader(region_id);
            let (tx, rx) = std::sync::mpsc::channel();
            let sent = self.stores[&leader].router.try_send(StoreMsg::ChangePeers {
                region_id,
                changes: changes.clone(),
                cb: Box::new(move |r| drop(tx.send(r))),
            });
            if sent.is_ok() {
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(Error::Timeout("conf change".into())),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("conf change {changes:?} on Region {region_id} failed: {last:?}");
    }

    pub fn add_peer(&self, region_id: u64, peer: Peer) {
        self.must_change(region_id, vec![ChangePeer::AddVoter(peer)]);
    }

    pub fn add_learner(&self, region_id: u64, peer: Peer) {
        self.must_change(region_id, vec![ChangePeer::AddLearner(peer)]);
    }

    pub fn remove_peer(&self, region_id: u64, peer: Peer) {
        self.must_change(region_id, vec![ChangePeer::Remove(peer)]);
    }

    /// Every Region replica store `s` holds, as it sees them.
    pub fn statuses(&self, s: StoreId) -> Vec<RegionStatus> {
        let (tx, rx) = std::sync::mpsc::channel();
        let Some(h) = self.stores.get(&s) else {
            return Vec::new();
        };
        if h.router
            .try_send(StoreMsg::QueryRegions {
                cb: Box::new(move |v| drop(tx.send(v))),
            })
            .is_err()
        {
            return Vec::new();
        }
        rx.recv_timeout(TIMEOUT).unwrap_or_default()
    }

    /// Takes the routing table (what PD would know) from store `s`'s Regions.
    pub fn refresh_regions(&mut self, s: StoreId) {
        let mut regions: Vec<Region> = self.statuses(s).into_iter().map(|st| st.region).collect();
        regions.sort_by(|a, b| a.start_key.cmp(&b.start_key));
        self.regions = regions;
    }

    /// Splits a Region at `keys` through its leader (retrying while leadership moves) and
    /// updates the routing table with the result.
    pub fn must_split(&mut self, region_id: u64, keys: &[&[u8]]) -> Vec<Region> {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            let s = self.must_leader(region_id);
            let (tx, rx) = std::sync::mpsc::channel();
            let sent = self.stores[&s].router.try_send(StoreMsg::SplitRegion {
                region_id,
                epoch: self.epoch(region_id),
                split_keys: keys.iter().map(|k| k.to_vec()).collect(),
                cb: Box::new(move |r| drop(tx.send(r))),
            });
            if sent.is_ok() {
                match rx.recv_timeout(TIMEOUT) {
                    Ok(Ok(regions)) => {
                        self.regions.retain(|r| r.id != region_id);
                        self.regions.extend(regions.iter().cloned());
                        self.regions.sort_by(|a, b| a.start_key.cmp(&b.start_key));
                        return regions;
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("split of Region {region_id} never succeeded; last error {last:?}");
    }

    /// Asks the leader of `source` to prepare a merge into `target` (retrying while leadership
    /// moves); returns once the PrepareMerge applied.
    pub fn must_prepare_merge(&self, source: u64, target: u64) {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            let s = self.must_leader(source);
            let (tx, rx) = std::sync::mpsc::channel();
            let sent = self.stores[&s].router.try_send(StoreMsg::PrepareMerge {
                region_id: source,
                target_id: target,
                cb: Box::new(move |r| drop(tx.send(r))),
            });
            if sent.is_ok() {
                match rx.recv_timeout(TIMEOUT) {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("merge of Region {source} into {target} never prepared; last error {last:?}");
    }

    /// Waits until no running store holds a replica of `source` and every replica of `target`
    /// covers its range, then takes the routing table from store `from`.
    pub fn must_merged(&mut self, source: u64, target: u64, from: StoreId) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stores: Vec<StoreId> = self.stores.keys().copied().collect();
        for s in stores {
            loop {
                if self.status(s, source).is_none() && self.status(s, target).is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "store {s} still holds Region {source} (or lacks {target})"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.refresh_regions(from);
    }

    /// Merges `source` into its neighbour `target` and waits for it everywhere.
    pub fn must_merge(&mut self, source: u64, target: u64) {
        self.must_prepare_merge(source, target);
        let from = *self.stores.keys().next().expect("a running store");
        self.must_merged(source, target, from);
    }

    pub fn data_dir(&self, s: StoreId) -> &std::path::Path {
        self.dirs[&s].path()
    }
}

/// A PD that records the Region heartbeats it is sent, as (Region, leader peer, when), and
/// allocates split ids as [`NoPd`] does.
#[derive(Default)]
pub struct RecordingPd {
    pub heartbeats: std::sync::Mutex<Vec<(u64, Peer, Instant)>>,
}

impl RecordingPd {
    /// Whether a heartbeat since `since` named `leader` the leader of `region_id`.
    pub fn reported_leader(&self, region_id: u64, leader: u64, since: Instant) -> bool {
        self.heartbeats
            .lock()
            .unwrap()
            .iter()
            .any(|(r, l, at)| *r == region_id && l.id == leader && *at >= since)
    }
}

impl PdReporter for RecordingPd {
    fn region_heartbeat(&self, hb: RegionHeartbeat) {
        self.heartbeats
            .lock()
            .unwrap()
            .push((hb.region.id, hb.leader, Instant::now()));
    }

    fn ask_batch_split(&self, region: Region, count: usize, cb: SplitIdsCallback) {
        NoPd.ask_batch_split(region, count, cb)
    }

    fn report_batch_split(&self, _regions: Vec<Region>) {}
}

pub fn peer(id: u64, store_id: StoreId, role: PeerRole) -> Peer {
    Peer {
        id,
        store_id,
        role: role as i32,
        is_witness: false,
    }
}
