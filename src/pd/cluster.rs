//! PD's view of the cluster: stores, the Region routing table, id allocation and the replica
//! checker that turns heartbeats into operators.
//!
//! Regions are indexed by start key in a `BTreeMap`, so "which Region holds key k" is one
//! range lookup. A heartbeat replaces PD's copy of a Region only if its epoch is not older,
//! and removes the Regions it now overlaps (their older halves after a split): the routing
//! table never holds two Regions for one key.
//!
//! Operators (add a learner, promote it) are answered on the Region heartbeat stream of the
//! Region's leader. One operator per Region is in flight at a time; it is re-sent if the
//! heartbeats do not show it done after [`OPERATOR_RESEND`], and dropped after
//! [`OPERATOR_TIMEOUT`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prkv_proto::metapb::{Peer, Region, RegionEpoch, Store, StoreState};
use prkv_proto::pdpb;

use super::meta::{MetaError, MetaStore};
use super::schedule::{count_region, Operator, ScheduleConfig};

/// Ids are persisted in windows of this many: one sync write per 1,000 ids, and a restart skips
/// at most that many.
const ID_WINDOW: u64 = 1_000;
/// A store whose last heartbeat is older than this does not receive new replicas.
pub const STORE_ALIVE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cluster is not bootstrapped")]
    NotBootstrapped,
    #[error("cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("store {0} is a tombstone")]
    StoreTombstone(u64),
    #[error("store {0} not found")]
    StoreNotFound(u64),
    #[error("Region {0} not found")]
    RegionNotFound(u64),
    #[error("invalid request: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ClusterError>;

/// PD's copy of a Region, as its leader last reported it.
#[derive(Clone, Debug, Default)]
pub struct RegionInfo {
    pub region: Region,
    pub leader: Option<Peer>,
    pub down_peers: Vec<pdpb::PeerStats>,
    pub pending_peers: Vec<Peer>,
    pub approximate_size: u64,
    pub approximate_keys: u64,
    pub term: u64,
}

#[derive(Clone, Debug)]
pub struct StoreInfo {
    pub meta: Store,
    pub stats: Option<pdpb::StoreStats>,
    pub last_heartbeat: Option<Instant>,
}

impl StoreInfo {
    pub fn alive(&self) -> bool {
        self.last_heartbeat
            .is_some_and(|t| t.elapsed() < STORE_ALIVE)
    }
}

pub struct Cluster {
    meta: Arc<MetaStore>,
    pub id: u64,
    bootstrapped: bool,
    next_id: u64,
    id_saved_until: u64,
    pub(super) stores: BTreeMap<u64, StoreInfo>,
    pub(super) regions: HashMap<u64, RegionInfo>,
    /// Start key -> Region id.
    tree: BTreeMap<Vec<u8>, u64>,
    /// The operator in flight per Region (see `schedule.rs`).
    pub(super) ops: HashMap<u64, Operator>,
    gc_safe_point: u64,
    pub(super) max_replicas: usize,
    pub(super) schedule_cfg: ScheduleConfig,
    /// Replicas and leaders per store, as the Region table says (kept up to date by
    /// `update_region`, so the schedulers never walk every Region).
    pub(super) store_regions: HashMap<u64, usize>,
    pub(super) store_leaders: HashMap<u64, usize>,
    /// When each Region's version last changed as PD saw it (split or merge): the merge
    /// checker leaves Regions alone for `schedule.split-merge-interval` after that.
    pub(super) version_changed: HashMap<u64, Instant>,
    /// When this PD started: a store not heard from since counts as silent from then.
    started: Instant,
}

fn epoch(r: &Region) -> RegionEpoch {
    r.region_epoch.unwrap_or_default()
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Cluster {
    /// Loads (or creates) the cluster from PD's metadata.
    pub fn open(
        meta: Arc<MetaStore>,
        max_replicas: usize,
        schedule_cfg: ScheduleConfig,
    ) -> Result<Cluster> {
        let id = match meta.cluster_id()? {
            Some(id) => id,
            None => {
                // Like PD: time in the high bits, randomness in the low ones.
                let id = (unix_secs() << 32) | u64::from(rand::random::<u32>());
                meta.set_cluster_id(id)?;
                id
            }
        };
        let next_id = meta.id_high_water()?;
        let mut c = Cluster {
            id,
            bootstrapped: meta.bootstrapped()?,
            next_id,
            id_saved_until: next_id,
            stores: BTreeMap::new(),
            regions: HashMap::new(),
            tree: BTreeMap::new(),
            ops: HashMap::new(),
            gc_safe_point: meta.gc_safe_point()?,
            max_replicas,
            schedule_cfg,
            store_regions: HashMap::new(),
            store_leaders: HashMap::new(),
            version_changed: HashMap::new(),
            started: Instant::now(),
            meta,
        };
        for s in c.meta.load_stores()? {
            c.stores.insert(
                s.id,
                StoreInfo {
                    meta: s,
                    stats: None,
                    last_heartbeat: None,
                },
            );
        }
        for r in c.meta.load_regions()? {
            c.tree.insert(r.start_key.clone(), r.id);
            let info = RegionInfo {
                region: r,
                ..Default::default()
            };
            count_region(&mut c.store_regions, &mut c.store_leaders, &info, 1);
            c.regions.insert(info.region.id, info);
        }
        tracing::info!(
            cluster_id = c.id,
            stores = c.stores.len(),
            regions = c.regions.len(),
            "PD metadata loaded"
        );
        Ok(c)
    }

    pub fn meta(&self) -> &MetaStore {
        &self.meta
    }

    pub fn is_bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    fn check_bootstrapped(&self) -> Result<()> {
        if self.bootstrapped {
            Ok(())
        } else {
            Err(ClusterError::NotBootstrapped)
        }
    }

    /// A fresh id, unique across PD restarts.
    pub fn alloc_id(&mut self) -> Result<u64> {
        if self.next_id + 1 > self.id_saved_until {
            let until = self.next_id + ID_WINDOW;
            self.meta.set_id_high_water(until)?;
            self.id_saved_until = until;
        }
        self.next_id += 1;
        Ok(self.next_id)
    }

    pub fn bootstrap(&mut self, store: Store, region: Region) -> Result<()> {
        if self.bootstrapped {
            return Err(ClusterError::AlreadyBootstrapped);
        }
        if store.id == 0 || region.id == 0 || region.peers.is_empty() {
            return Err(ClusterError::Invalid(
                "bootstrap needs a store and a Region with ids and a peer".into(),
            ));
        }
        self.put_store(store)?;
        self.meta.put_region(&region)?;
        crate::crash_point!("pd_bootstrap_before_flag");
        self.tree.insert(region.start_key.clone(), region.id);
        let info = RegionInfo {
            region,
            ..Default::default()
        };
        count_region(&mut self.store_regions, &mut self.store_leaders, &info, 1);
        self.regions.insert(info.region.id, info);
        // Last: a crash before this point leaves the cluster unbootstrapped, and the store
        // retries with the same Region.
        self.meta.set_bootstrapped()?;
        self.bootstrapped = true;
        Ok(())
    }

    pub fn put_store(&mut self, mut store: Store) -> Result<()> {
        if store.id == 0 || store.address.is_empty() {
            return Err(ClusterError::Invalid(
                "a store needs an id and an address".into(),
            ));
        }
        if let Some(old) = self.stores.get(&store.id) {
            if old.meta.state == StoreState::Tombstone as i32 {
                return Err(ClusterError::StoreTombstone(store.id));
            }
        }
        if let Some(other) = self.stores.values().find(|s| {
            s.meta.id != store.id
                && s.meta.address == store.address
                && s.meta.state != StoreState::Tombstone as i32
        }) {
            return Err(ClusterError::Invalid(format!(
                "address {} is already used by store {}",
                store.address, other.meta.id
            )));
        }
        // A store being deleted stays Offline when it restarts and registers again.
        store.state = match self.stores.get(&store.id) {
            Some(old) if old.meta.state == StoreState::Offline as i32 => StoreState::Offline as i32,
            _ => StoreState::Up as i32,
        };
        self.meta.put_store(&store)?;
        let entry = self.stores.entry(store.id).or_insert(StoreInfo {
            meta: store.clone(),
            stats: None,
            last_heartbeat: None,
        });
        entry.meta = store;
        entry.last_heartbeat = Some(Instant::now());
        Ok(())
    }

    pub fn store(&self, id: u64) -> Result<&StoreInfo> {
        self.stores.get(&id).ok_or(ClusterError::StoreNotFound(id))
    }

    pub fn stores(&self) -> impl Iterator<Item = &StoreInfo> {
        self.stores.values()
    }

    pub fn store_heartbeat(&mut self, stats: pdpb::StoreStats) -> Result<()> {
        self.check_bootstrapped()?;
        let s = self
            .stores
            .get_mut(&stats.store_id)
            .ok_or(ClusterError::StoreNotFound(stats.store_id))?;
        if s.meta.state == StoreState::Tombstone as i32 {
            return Err(ClusterError::StoreTombstone(stats.store_id));
        }
        s.last_heartbeat = Some(Instant::now());
        s.meta.last_heartbeat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        s.stats = Some(stats);
        Ok(())
    }

    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Regions in key order.
    pub fn regions_in_order(&self) -> impl Iterator<Item = &RegionInfo> {
        self.tree.values().filter_map(|id| self.regions.get(id))
    }

    pub fn region_by_id(&self, id: u64) -> Option<&RegionInfo> {
        self.regions.get(&id)
    }

    /// The Region holding `key`.
    pub fn region_by_key(&self, key: &[u8]) -> Option<&RegionInfo> {
        let (_, id) = self.tree.range(..=key.to_vec()).next_back()?;
        let info = self.regions.get(id)?;
        let end = &info.region.end_key;
        (end.is_empty() || key < end.as_slice()).then_some(info)
    }

    /// The Region just before the one holding `key`.
    pub fn prev_region(&self, key: &[u8]) -> Option<&RegionInfo> {
        let cur = self.region_by_key(key)?;
        if cur.region.start_key.is_empty() {
            return None;
        }
        let (_, id) = self
            .tree
            .range(..cur.region.start_key.clone())
            .next_back()?;
        self.regions.get(id)
    }

    /// Regions from the one holding `start` up to `end` (exclusive, empty = no bound), at most
    /// `limit` (0 = no limit).
    pub fn scan_regions(&self, start: &[u8], end: &[u8], limit: usize) -> Vec<&RegionInfo> {
        let mut out = Vec::new();
        let first = self
            .region_by_key(start)
            .map(|r| r.region.start_key.clone())
            .unwrap_or_else(|| start.to_vec());
        for (k, id) in self.tree.range(first..) {
            if !end.is_empty() && k.as_slice() >= end {
                break;
            }
            if let Some(r) = self.regions.get(id) {
                out.push(r);
            }
            if limit > 0 && out.len() >= limit {
                break;
            }
        }
        out
    }

    /// Ids of the Regions whose range intersects `[start, end)`.
    fn overlaps(&self, start: &[u8], end: &[u8]) -> Vec<u64> {
        self.scan_regions(start, end, 0)
            .into_iter()
            .map(|r| r.region.id)
            .filter(|id| {
                let r = &self.regions[id].region;
                r.end_key.is_empty() || r.end_key.as_slice() > start
            })
            .collect()
    }

    /// Takes in a Region's current state. Returns false if it is older than what PD knows
    /// (a stale heartbeat), in which case nothing changes.
    ///
    /// Older means an older epoch, or the same epoch from an older Raft term: heartbeat streams
    /// of different stores are independent, and one queued while its stream was down (or
    /// sent by a leader cut off from its peers) can land after the new leader's. Taken, it
    /// would name the old leader, route clients to it and send it operators it cannot run,
    /// until the new leader's next heartbeat. A term of 0 is unknown (split reports).
    pub fn update_region(&mut self, mut info: RegionInfo) -> Result<bool> {
        let new = epoch(&info.region);
        let id = info.region.id;
        let mut changed = true;
        let mut version_changed = true;
        if let Some(old) = self.regions.get(&id) {
            let old_epoch = epoch(&old.region);
            if new.version < old_epoch.version || new.conf_ver < old_epoch.conf_ver {
                return Ok(false);
            }
            if info.term > 0 && info.term < old.term {
                return Ok(false);
            }
            if info.term == 0 {
                info.term = old.term;
            }
            changed = old.region != info.region;
            version_changed = new.version != old_epoch.version;
        }
        if version_changed {
            self.version_changed.insert(id, Instant::now());
        }
        if changed {
            let overlaps: Vec<u64> = self
                .overlaps(&info.region.start_key, &info.region.end_key)
                .into_iter()
                .filter(|o| *o != id)
                .collect();
            for o in &overlaps {
                if epoch(&self.regions[o].region).version > new.version {
                    // A newer Region covers part of this range: this report is stale.
                    return Ok(false);
                }
            }
            for o in overlaps {
                if let Some(r) = self.regions.remove(&o) {
                    self.tree.remove(&r.region.start_key);
                    self.ops.remove(&o);
                    self.version_changed.remove(&o);
                    self.meta.delete_region(o)?;
                    count_region(&mut self.store_regions, &mut self.store_leaders, &r, -1);
                }
            }
            if let Some(old) = self.regions.get(&id) {
                let old_start = old.region.start_key.clone();
                if self.tree.get(&old_start) == Some(&id) {
                    self.tree.remove(&old_start);
                }
            }
            self.meta.put_region(&info.region)?;
            self.tree.insert(info.region.start_key.clone(), id);
        }
        if let Some(old) = self.regions.get(&id) {
            count_region(&mut self.store_regions, &mut self.store_leaders, old, -1);
        }
        count_region(&mut self.store_regions, &mut self.store_leaders, &info, 1);
        self.regions.insert(id, info);
        Ok(true)
    }

    pub fn gc_safe_point(&self) -> u64 {
        self.gc_safe_point
    }

    /// A store silent for `schedule.max-store-down-time` (counting from PD's start if it has
    /// not been heard from since).
    pub fn store_down(&self, s: &StoreInfo) -> bool {
        let since = s.last_heartbeat.unwrap_or(self.started);
        since.elapsed() > self.schedule_cfg.max_store_down_time
    }

    /// The state users see: Up / Disconnected (silent a while) / Down / Offline / Tombstone.
    pub fn store_state_name(&self, s: &StoreInfo) -> &'static str {
        match StoreState::try_from(s.meta.state).unwrap_or(StoreState::Up) {
            StoreState::Up if self.store_down(s) => "Down",
            StoreState::Up if !s.alive() => "Disconnected",
            StoreState::Up => "Up",
            StoreState::Offline => "Offline",
            StoreState::Tombstone => "Tombstone",
        }
    }

    /// Starts removing a store (scale in): it becomes Offline, the replica checker moves its
    /// replicas away, and once it holds none it becomes Tombstone. Refused if the remaining
    /// stores could not hold `max-replicas` replicas of every Region.
    pub fn delete_store(&mut self, id: u64) -> Result<()> {
        let s = self
            .stores
            .get(&id)
            .ok_or(ClusterError::StoreNotFound(id))?;
        match StoreState::try_from(s.meta.state).unwrap_or(StoreState::Up) {
            StoreState::Tombstone => return Err(ClusterError::StoreTombstone(id)),
            StoreState::Offline => return Ok(()),
            StoreState::Up => {}
        }
        let remaining = self
            .stores
            .values()
            .filter(|x| x.meta.id != id && x.meta.state == StoreState::Up as i32)
            .count();
        if remaining < self.max_replicas {
            return Err(ClusterError::Invalid(format!(
                "deleting store {id} would leave {remaining} stores for {} replicas per Region",
                self.max_replicas
            )));
        }
        let s = self
            .stores
            .get_mut(&id)
            .ok_or(ClusterError::StoreNotFound(id))?;
        s.meta.state = StoreState::Offline as i32;
        let meta = s.meta.clone();
        self.meta.put_store(&meta)?;
        tracing::info!(store_id = id, "store is Offline: moving its replicas away");
        Ok(())
    }

    /// Moves the GC safe point forward (never back); returns the new one.
    pub fn update_gc_safe_point(&mut self, sp: u64) -> Result<u64> {
        if sp > self.gc_safe_point {
            self.meta.set_gc_safe_point(sp)?;
            self.gc_safe_point = sp;
        }
        Ok(self.gc_safe_point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prkv_proto::eraftpb::ConfChangeType;
    use prkv_proto::metapb::PeerRole;

    fn region(id: u64, start: &[u8], end: &[u8], version: u64, stores: &[u64]) -> Region {
        Region {
            id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            region_epoch: Some(RegionEpoch {
                conf_ver: 1,
                version,
            }),
            peers: stores
                .iter()
                .map(|s| Peer {
                    id: id * 10 + s,
                    store_id: *s,
                    role: PeerRole::Voter as i32,
                    is_witness: false,
                })
                .collect(),
        }
    }

    fn store(id: u64) -> Store {
        Store {
            id,
            address: format!("127.0.0.1:{}", 20000 + id),
            ..Default::default()
        }
    }

    fn open(dir: &std::path::Path) -> Cluster {
        Cluster::open(
            Arc::new(MetaStore::open(dir).unwrap()),
            3,
            ScheduleConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn routing_follows_splits_and_ignores_stale_reports() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        c.bootstrap(store(1), region(1, b"", b"", 1, &[1])).unwrap();
        assert!(matches!(
            c.bootstrap(store(1), region(1, b"", b"", 1, &[1])),
            Err(ClusterError::AlreadyBootstrapped)
        ));
        // A split: Region 1 keeps [, m), Region 2 takes [m, ).
        let info = |r| RegionInfo {
            region: r,
            ..Default::default()
        };
        assert!(c
            .update_region(info(region(2, b"m", b"", 2, &[1])))
            .unwrap());
        // Region 2's report removed the overlapping old Region 1 ([, ) at version 1).
        assert_eq!(c.region_by_key(b"z").unwrap().region.id, 2);
        assert!(c.region_by_key(b"a").is_none());
        assert!(c
            .update_region(info(region(1, b"", b"m", 2, &[1])))
            .unwrap());
        assert_eq!(c.region_by_key(b"a").unwrap().region.id, 1);
        assert_eq!(c.prev_region(b"z").unwrap().region.id, 1);
        // A late report of the pre-split Region is stale: nothing changes.
        assert!(!c.update_region(info(region(1, b"", b"", 1, &[1]))).unwrap());
        assert_eq!(c.region_by_key(b"z").unwrap().region.id, 2);
        let scanned: Vec<u64> = c
            .scan_regions(b"", b"", 0)
            .iter()
            .map(|r| r.region.id)
            .collect();
        assert_eq!(scanned, vec![1, 2]);
        assert_eq!(c.scan_regions(b"n", b"", 1)[0].region.id, 2);
        // All of it survives a restart, and ids never repeat.
        let id = c.alloc_id().unwrap();
        drop(c);
        let mut c = open(dir.path());
        assert!(c.is_bootstrapped());
        assert_eq!(c.region_by_key(b"a").unwrap().region.id, 1);
        assert_eq!(c.region_by_key(b"z").unwrap().region.id, 2);
        assert!(c.alloc_id().unwrap() > id);
        assert_eq!(c.store(1).unwrap().meta.address, "127.0.0.1:20001");
    }

    /// A heartbeat of an older term arrives after the new leader's (another store's stream):
    /// PD keeps the new leader.
    #[test]
    fn a_late_heartbeat_of_an_older_term_does_not_take_the_leader_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let r = region(1, b"", b"", 1, &[1, 2, 3]);
        c.bootstrap(store(1), r.clone()).unwrap();
        let report = |c: &mut Cluster, leader: usize, term: u64| {
            c.update_region(RegionInfo {
                region: r.clone(),
                leader: Some(r.peers[leader]),
                term,
                ..Default::default()
            })
            .unwrap()
        };
        assert!(report(&mut c, 0, 5));
        assert!(report(&mut c, 1, 6), "a new leader in a newer term");
        assert!(!report(&mut c, 0, 5), "the old leader's late report");
        let leader = |c: &Cluster| c.region_by_key(b"a").unwrap().leader.unwrap().store_id;
        assert_eq!(leader(&c), 2);
        assert!(report(&mut c, 0, 7), "store 1 leads again, in a newer term");
        assert_eq!(leader(&c), 1);
        // A report that knows no term (a split's) takes the known one, never lowers it.
        assert!(report(&mut c, 0, 0));
        assert!(!report(&mut c, 1, 6));
        assert_eq!(leader(&c), 1);
    }

    #[test]
    fn replica_checker_adds_learners_then_promotes_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        c.bootstrap(store(1), region(1, b"", b"", 1, &[1])).unwrap();
        for s in 2..=3 {
            c.put_store(store(s)).unwrap();
        }
        let leader = region(1, b"", b"", 1, &[1]).peers[0];
        let mut r = region(1, b"", b"", 1, &[1]);
        let report = |c: &mut Cluster, r: &Region, pending: Vec<Peer>| {
            c.update_region(RegionInfo {
                region: r.clone(),
                leader: Some(leader),
                pending_peers: pending,
                ..Default::default()
            })
            .unwrap();
            c.schedule(1).unwrap()
        };
        let op = report(&mut c, &r, vec![]).expect("add a learner");
        let cp = op.change_peer.unwrap();
        assert_eq!(cp.change_type, ConfChangeType::AddLearnerNode as i32);
        let mut learner = cp.peer.unwrap();
        assert_ne!(learner.store_id, 1);
        // Not repeated while in flight.
        assert!(report(&mut c, &r, vec![]).is_none());
        // Applied; the learner is still catching up: nothing to do.
        r.peers.push(learner);
        r.region_epoch.as_mut().unwrap().conf_ver += 1;
        assert!(report(&mut c, &r, vec![learner]).is_none());
        // Caught up: promote.
        let op = report(&mut c, &r, vec![]).expect("promote");
        let cp = op.change_peer.unwrap();
        assert_eq!(cp.change_type, ConfChangeType::AddNode as i32);
        assert_eq!(cp.peer.unwrap().id, learner.id);
        learner.role = PeerRole::Voter as i32;
        r.peers[1] = learner;
        r.region_epoch.as_mut().unwrap().conf_ver += 1;
        // Next: a learner on the third store.
        let op = report(&mut c, &r, vec![]).expect("second learner");
        let p = op.change_peer.unwrap().peer.unwrap();
        assert!(p.store_id != 1 && p.store_id != learner.store_id);
    }
}
