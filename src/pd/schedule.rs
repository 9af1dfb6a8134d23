//! PD's scheduling: operators, and the checkers and schedulers that create them.
//!
//! An **operator** is a short plan for one Region, a list of [`Step`]s (add a learner, promote
//! it, transfer the leader, remove a peer). PD sends the current step to the Region's leader on
//! its heartbeat stream, sees in later heartbeats whether it took effect, then moves to the
//! next; a step not seen done is re-sent every [`OPERATOR_RESEND`], and an operator not finished
//! within [`OPERATOR_TIMEOUT`] is dropped (the checkers will plan again from what is true then).
//! One operator per Region at a time.
//!
//! On each Region heartbeat, in order:
//!
//! 1. **Replica checker** (`replication.max-replicas`): promote caught-up learners; replace
//!    peers on stores that are Down (silent for `schedule.max-store-down-time`) or Offline
//!    (being deleted); add missing replicas; remove extra ones.
//! 2. **Balance region**: move a replica from the store holding the most Regions (among this
//!    Region's stores) to the one holding the fewest, when they differ by more than one.
//! 3. **Balance leader**: hand leadership to the follower whose store leads the fewest Regions,
//!    when the leader's store leads at least two more.
//!
//! Limits bound what moves at once: `schedule.region-schedule-limit` replica-moving operators
//! in the cluster, `schedule.leader-schedule-limit` leader transfers (0: no leader balancing), and
//! `schedule.store-limit` replica moves touching any one store (each is a snapshot to send or
//! receive). Region counts include the effect of operators in flight, so that several
//! operators do not all pick the same emptiest store.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prkv_proto::eraftpb::ConfChangeType;
use prkv_proto::metapb::{Peer, PeerRole, StoreState};
use prkv_proto::pdpb;
use serde::{Deserialize, Serialize};

use super::cluster::{Cluster, RegionInfo, Result};

pub const OPERATOR_RESEND: Duration = Duration::from_secs(5);
pub const OPERATOR_TIMEOUT: Duration = Duration::from_secs(120);
/// A split is one admin command its leader proposes within a heartbeat and applies in
/// milliseconds: one not done in this long will not be (the Region had no key to split at, or
/// the request met a changed Region), and waiting the full operator timeout would keep every
/// other operator, a replica repair among them, off the Region for two minutes.
pub const SPLIT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[replication]` and `[schedule]` of PD's config (PD's key names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScheduleConfig {
    /// A store silent this long is Down: its replicas are rebuilt elsewhere.
    #[serde(with = "humantime_secs")]
    pub max_store_down_time: Duration,
    /// Leader transfers in flight for balance; 0 turns leader balancing off (leadership stays
    /// where elections and operators by hand put it).
    pub leader_schedule_limit: usize,
    pub region_schedule_limit: usize,
    /// Replica moves in flight that add to or remove from one store.
    pub store_limit: usize,
    /// A Region at most this large (MiB) and with at most `max-merge-region-keys` keys is
    /// merged into a neighbour that is small too; 0 turns merging off.
    pub max_merge_region_size: u64,
    pub max_merge_region_keys: u64,
    /// Merges in flight in the cluster.
    pub merge_schedule_limit: usize,
    /// A Region whose version changed (it split or merged) this recently is not merged: a
    /// Region just split is not small for long, and merging it back would undo the split.
    #[serde(with = "humantime_secs")]
    pub split_merge_interval: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            // PD's default: long enough that a restart or a short network cut moves nothing.
            max_store_down_time: Duration::from_secs(30 * 60),
            leader_schedule_limit: 4,
            region_schedule_limit: 64,
            // Each move is a snapshot; four at once per store keeps foreground traffic first.
            store_limit: 4,
            // PD's defaults: well below the split size (96 MiB, 960k keys), so that a merged
            // Region does not split again at once.
            max_merge_region_size: 20,
            max_merge_region_keys: 200_000,
            merge_schedule_limit: 8,
            split_merge_interval: Duration::from_secs(3600),
        }
    }
}

/// Durations as TiKV-style strings ("30m", "10s", "500ms").
mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::config::ReadableDuration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::config::ReadableDuration::parse(&text)
            .map(|r| r.0)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    AddLearner(Peer),
    Promote(Peer),
    TransferLeader(Peer),
    RemovePeer(Peer),
    /// Split at `keys` (in half when empty); done once the Region's version passes `version`.
    Split {
        keys: Vec<Vec<u8>>,
        version: u64,
    },
    /// Merge the Region into its neighbour `target`. Done when the Region is gone (the target's
    /// report covers it; PD then drops the Region and this operator) or rolled back (its
    /// version passed `version + 1`: PrepareMerge and RollbackMerge each bump it).
    Merge {
        target: prkv_proto::metapb::Region,
        version: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Operator {
    pub kind: &'static str,
    pub steps: Vec<Step>,
    pub current: usize,
    pub created: Instant,
    /// When the current step was last sent (`None`: not yet).
    pub last_sent: Option<Instant>,
}

impl Operator {
    fn new(kind: &'static str, steps: Vec<Step>) -> Operator {
        Operator {
            kind,
            steps,
            current: 0,
            created: Instant::now(),
            last_sent: None,
        }
    }

    /// How long the operator may run before PD drops it.
    fn timeout(&self) -> Duration {
        if self.steps.iter().any(|s| matches!(s, Step::Split { .. })) {
            SPLIT_TIMEOUT
        } else {
            OPERATOR_TIMEOUT
        }
    }

    /// Whether the operator moves replicas (as opposed to only leadership).
    fn moves_replicas(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s, Step::AddLearner(_) | Step::RemovePeer(_)))
    }

    /// Stores gaining or losing a replica through this operator.
    fn touched_stores(&self) -> impl Iterator<Item = u64> + '_ {
        self.steps.iter().filter_map(|s| match s {
            Step::AddLearner(p) | Step::RemovePeer(p) => Some(p.store_id),
            _ => None,
        })
    }

    /// Net replicas this operator will add to `store` once done (+1, -1 or 0), counting only
    /// steps not yet taken.
    fn pending_delta(&self, store: u64) -> i64 {
        self.steps[self.current..]
            .iter()
            .map(|s| match s {
                Step::AddLearner(p) if p.store_id == store => 1,
                Step::RemovePeer(p) if p.store_id == store => -1,
                _ => 0,
            })
            .sum()
    }
}

/// The stores holding a Region's replicas, sorted: a merge needs the same on both sides.
fn placement(r: &prkv_proto::metapb::Region) -> Vec<u64> {
    let mut v: Vec<u64> = r.peers.iter().map(|p| p.store_id).collect();
    v.sort_unstable();
    v
}

fn step_done(step: &Step, info: &RegionInfo) -> bool {
    let r = &info.region;
    match step {
        Step::AddLearner(p) => r.peers.iter().any(|x| x.id == p.id),
        Step::Promote(p) => r
            .peers
            .iter()
            .any(|x| x.id == p.id && x.role == PeerRole::Voter as i32),
        Step::TransferLeader(p) => info.leader.is_some_and(|l| l.id == p.id),
        Step::RemovePeer(p) => !r.peers.iter().any(|x| x.id == p.id),
        Step::Split { version, .. } => r.region_epoch.is_some_and(|e| e.version > *version),
        Step::Merge { version, .. } => r.region_epoch.is_some_and(|e| e.version > *version + 1),
    }
}

fn step_response(info: &RegionInfo, leader: &Peer, step: &Step) -> pdpb::RegionHeartbeatResponse {
    let mut resp = pdpb::RegionHeartbeatResponse {
        region_id: info.region.id,
        region_epoch: info.region.region_epoch,
        target_peer: Some(*leader),
        ..Default::default()
    };
    let change = |p: Peer, t: ConfChangeType| pdpb::ChangePeer {
        peer: Some(p),
        change_type: t as i32,
    };
    match step {
        Step::AddLearner(p) => resp.change_peer = Some(change(*p, ConfChangeType::AddLearnerNode)),
        Step::Promote(p) => resp.change_peer = Some(change(*p, ConfChangeType::AddNode)),
        Step::RemovePeer(p) => resp.change_peer = Some(change(*p, ConfChangeType::RemoveNode)),
        Step::TransferLeader(p) => {
            resp.transfer_leader = Some(pdpb::TransferLeader {
                peer: Some(*p),
                peers: vec![],
            })
        }
        Step::Split { keys, .. } => {
            resp.split_region = Some(pdpb::SplitRegion {
                policy: if keys.is_empty() {
                    pdpb::CheckPolicy::Scan
                } else {
                    pdpb::CheckPolicy::Usekey
                } as i32,
                keys: keys.clone(),
            })
        }
        Step::Merge { target, .. } => {
            resp.merge = Some(pdpb::Merge {
                target: Some(target.clone()),
            })
        }
    }
    resp
}

/// Why a store cannot keep its replicas.
fn store_must_drain(c: &Cluster, store: u64) -> bool {
    match c.stores.get(&store) {
        None => true,
        Some(s) => s.meta.state != StoreState::Up as i32 || c.store_down(s),
    }
}

impl Cluster {
    /// What the leader of `region_id` should do next, if anything (see the module docs).
    pub fn schedule(&mut self, region_id: u64) -> Result<Option<pdpb::RegionHeartbeatResponse>> {
        let Some(info) = self.regions.get(&region_id).cloned() else {
            return Ok(None);
        };
        let Some(leader) = info.leader else {
            return Ok(None);
        };
        // An operator waiting on a replica its store refused as damaged (a leader transfer to
        // it, its promotion) would wait for the operator timeout: drop it, so the replica
        // checker can replace the replica now.
        if let Some(bad) = self.damaged_replica(&info, &leader) {
            let waits_on_bad = self.ops.get(&region_id).is_some_and(|op| {
                op.steps.get(op.current).is_some_and(|step| {
                    matches!(step, Step::TransferLeader(p) | Step::Promote(p) if p.id == bad.id)
                })
            });
            if waits_on_bad {
                tracing::warn!(
                    region_id,
                    peer_id = bad.id,
                    "operator dropped: its replica is damaged"
                );
                self.end_operator(region_id, "cancelled");
            }
        }
        if self.ops.contains_key(&region_id) {
            let step = self.advance_operator(&info, &leader);
            if self.ops.contains_key(&region_id) {
                return Ok(step);
            }
            // Finished (or timed out): plan the next thing at once.
        }
        if self.merge_target_of_op(region_id) {
            // A merge into this Region is in flight: any change here would roll it back.
            return Ok(None);
        }
        let op = match self.check_replicas(&info, &leader)? {
            Some(op) => Some(op),
            None => match self.balance_region(&info, &leader)? {
                Some(op) => Some(op),
                None => match self.balance_leader(&info, &leader) {
                    Some(op) => Some(op),
                    None => self.check_merge(&info),
                },
            },
        };
        let Some(op) = op else { return Ok(None) };
        tracing::info!(region_id, kind = op.kind, steps = ?op.steps, "new operator");
        self.ops.insert(region_id, op);
        Ok(self.advance_operator(&info, &leader))
    }

    /// Moves the Region's operator past the steps its heartbeat shows done, and returns the
    /// current step to (re)send, if due.
    fn advance_operator(
        &mut self,
        info: &RegionInfo,
        leader: &Peer,
    ) -> Option<pdpb::RegionHeartbeatResponse> {
        let region_id = info.region.id;
        let op = self.ops.get_mut(&region_id)?;
        while op.current < op.steps.len() && step_done(&op.steps[op.current], info) {
            op.current += 1;
            op.last_sent = None;
        }
        if op.current == op.steps.len() {
            tracing::info!(region_id, kind = op.kind, took = ?op.created.elapsed(), "operator finished");
            self.end_operator(region_id, "finished");
            return None;
        }
        if op.created.elapsed() > op.timeout() {
            tracing::warn!(
                region_id,
                kind = op.kind,
                step = op.current,
                "operator timed out"
            );
            self.end_operator(region_id, "timeout");
            return None;
        }
        let step = op.steps[op.current].clone();
        // A merge needs the target's replicas on the source's stores: once they moved (a
        // replica removed by hand, a store drained), the leader refuses the merge for ever and
        // the operator would only keep the target's replica checker away until it timed out.
        if let Step::Merge { target, .. } = &step {
            let lined_up = self
                .regions
                .get(&target.id)
                .is_some_and(|t| placement(&t.region) == placement(&info.region));
            if !lined_up {
                tracing::warn!(
                    region_id,
                    target = target.id,
                    "merge operator dropped: the target's replicas are no longer on the source's stores"
                );
                self.end_operator(region_id, "cancelled");
                return None;
            }
        }
        // A learner is promoted only once it caught up (its snapshot is in).
        if let Step::Promote(p) = &step {
            if info.pending_peers.iter().any(|x| x.id == p.id) {
                return None;
            }
        }
        if op.last_sent.is_some_and(|t| t.elapsed() < OPERATOR_RESEND) {
            return None;
        }
        op.last_sent = Some(Instant::now());
        Some(step_response(info, leader, &step))
    }

    /// Drops the Region's operator, counted by how it ended (`finished`, `timeout`,
    /// `cancelled`).
    fn end_operator(&mut self, region_id: u64, outcome: &str) {
        self.ops.remove(&region_id);
        crate::metrics::PD_OPERATORS
            .with_label_values(&[outcome])
            .inc();
    }

    /// Whether an operator in flight merges another Region into `region_id`.
    fn merge_target_of_op(&self, region_id: u64) -> bool {
        self.ops.values().any(|o| {
            o.steps
                .iter()
                .any(|s| matches!(s, Step::Merge { target, .. } if target.id == region_id))
        })
    }

    fn merges_in_flight(&self) -> usize {
        self.ops
            .values()
            .filter(|o| o.kind == "merge-region")
            .count()
    }

    /// A Region that may take part in a merge: small, settled (voters only, all caught up,
    /// none down or damaged, as many as configured), with a known leader, not recently split or merged,
    /// and with no operator of its own.
    fn mergeable(&self, info: &RegionInfo) -> bool {
        let cfg = &self.schedule_cfg;
        let small = info.approximate_size <= cfg.max_merge_region_size * 1024 * 1024
            && info.approximate_keys <= cfg.max_merge_region_keys;
        let settled = info.leader.is_some()
                && info.pending_peers.is_empty()
                && info.down_peers.is_empty()
                && info.region.peers.len() == self.max_replicas
                && info.region.peers.iter().all(|p| {
                    p.role == PeerRole::Voter as i32 && !store_must_drain(self, p.store_id)
                })
                // A damaged replica would never catch up for the merge: replace it first.
                && info
                    .leader
                    .is_some_and(|l| self.damaged_replica(info, &l).is_none());
        let recent = self
            .version_changed
            .get(&info.region.id)
            .is_some_and(|t| t.elapsed() < cfg.split_merge_interval);
        small && settled && !recent && !self.ops.contains_key(&info.region.id)
    }

    /// Merge checker: a small Region merges into the smaller of its small neighbours whose
    /// replicas are on the same stores (moving replicas to line them up first is not done yet).
    fn check_merge(&self, info: &RegionInfo) -> Option<Operator> {
        let cfg = &self.schedule_cfg;
        if cfg.max_merge_region_size == 0 || self.merges_in_flight() >= cfg.merge_schedule_limit {
            return None;
        }
        if !self.mergeable(info) {
            return None;
        }
        let r = &info.region;
        let next = (!r.end_key.is_empty())
            .then(|| self.region_by_key(&r.end_key))
            .flatten();
        let prev = (!r.start_key.is_empty())
            .then(|| self.prev_region(&r.start_key))
            .flatten();
        let target = [prev, next]
            .into_iter()
            .flatten()
            .filter(|t| {
                t.region.id != r.id
                    && self.mergeable(t)
                    && !self.merge_target_of_op(t.region.id)
                    && placement(&t.region) == placement(r)
            })
            .min_by_key(|t| (t.approximate_size, t.approximate_keys))?;
        let version = r.region_epoch.map_or(0, |e| e.version);
        Some(Operator::new(
            "merge-region",
            vec![Step::Merge {
                target: target.region.clone(),
                version,
            }],
        ))
    }

    /// Asks the leader of `source` to merge it into its neighbour `target`, on its next
    /// heartbeat (the merge checker's rules on size and timing do not apply; the Raftstore's
    /// do: adjacent, replicas on the same stores).
    pub fn merge_region(&mut self, source: u64, target: u64) -> Result<()> {
        use super::cluster::ClusterError;
        let s = self
            .regions
            .get(&source)
            .ok_or(ClusterError::RegionNotFound(source))?;
        let t = self
            .regions
            .get(&target)
            .ok_or(ClusterError::RegionNotFound(target))?;
        let adjacent = (!s.region.end_key.is_empty() && s.region.end_key == t.region.start_key)
            || (!t.region.end_key.is_empty() && t.region.end_key == s.region.start_key);
        if !adjacent {
            return Err(ClusterError::Invalid(format!(
                "Regions {source} and {target} are not adjacent"
            )));
        }
        if self.ops.contains_key(&source)
            || self.ops.contains_key(&target)
            || self.merge_target_of_op(source)
            || self.merge_target_of_op(target)
        {
            return Err(ClusterError::Invalid(format!(
                "Region {source} or {target} has an operator in flight"
            )));
        }
        let version = s.region.region_epoch.map_or(0, |e| e.version);
        let op = Operator::new(
            "merge-region",
            vec![Step::Merge {
                target: t.region.clone(),
                version,
            }],
        );
        tracing::info!(source, target, "merge requested through PD");
        self.ops.insert(source, op);
        Ok(())
    }

    fn replica_ops_in_flight(&self) -> usize {
        self.ops.values().filter(|o| o.moves_replicas()).count()
    }

    fn store_busy(&self, store: u64) -> bool {
        let n = self
            .ops
            .values()
            .filter(|o| o.touched_stores().any(|s| s == store))
            .count();
        n >= self.schedule_cfg.store_limit
    }

    /// Replicas on `store`, counting operators in flight as done.
    fn planned_regions(&self, store: u64) -> i64 {
        let now = self.store_regions.get(&store).copied().unwrap_or(0) as i64;
        now + self
            .ops
            .values()
            .map(|o| o.pending_delta(store))
            .sum::<i64>()
    }

    /// Leaders on `store`, counting leader transfers in flight as done.
    fn planned_leaders(&self, store: u64) -> i64 {
        let mut n = self.store_leaders.get(&store).copied().unwrap_or(0) as i64;
        for (region_id, op) in &self.ops {
            let from = self
                .regions
                .get(region_id)
                .and_then(|r| r.leader)
                .map_or(0, |l| l.store_id);
            for step in &op.steps[op.current..] {
                if let Step::TransferLeader(to) = step {
                    n += i64::from(to.store_id == store) - i64::from(from == store);
                }
            }
        }
        n
    }

    /// The best store for a new replica of `info`: Up, alive, not holding the Region, not at
    /// its limit, fewest planned replicas.
    fn pick_target(&self, info: &RegionInfo) -> Option<u64> {
        let used: Vec<u64> = info.region.peers.iter().map(|p| p.store_id).collect();
        self.stores
            .values()
            .filter(|s| {
                s.meta.state == StoreState::Up as i32
                    && s.alive()
                    && !used.contains(&s.meta.id)
                    && !self.store_busy(s.meta.id)
            })
            .min_by_key(|s| (self.planned_regions(s.meta.id), s.meta.id))
            .map(|s| s.meta.id)
    }

    fn new_learner(&mut self, store_id: u64) -> Result<Peer> {
        Ok(Peer {
            id: self.alloc_id()?,
            store_id,
            role: PeerRole::Learner as i32,
            is_witness: false,
        })
    }

    /// Steps that replace `old` by a new replica on `target`: add, promote, move leadership
    /// away from `old` if it leads, remove `old`.
    fn replace_steps(
        &mut self,
        info: &RegionInfo,
        leader: &Peer,
        old: &Peer,
        target: u64,
    ) -> Result<Vec<Step>> {
        let new = self.new_learner(target)?;
        let mut steps = vec![Step::AddLearner(new)];
        let mut voter = new;
        voter.role = PeerRole::Voter as i32;
        if old.role == PeerRole::Voter as i32 {
            steps.push(Step::Promote(voter));
        }
        if leader.id == old.id {
            steps.push(Step::TransferLeader(voter));
        }
        steps.push(Step::RemovePeer(*old));
        let _ = info;
        Ok(steps)
    }

    fn check_replicas(&mut self, info: &RegionInfo, leader: &Peer) -> Result<Option<Operator>> {
        let region = &info.region;
        // A replica its store refused as damaged holds nothing and never answers: remove it
        // first (with every store already holding a replica, there may be nowhere else to
        // build one), and the checks below add a replica back, from a snapshot. The report is
        // forgotten once acted on, so that a heartbeat sent before the replacement existed
        // cannot condemn the replacement.
        if let Some(bad) = self.damaged_replica(info, leader) {
            if let Some(stats) = self
                .stores
                .get_mut(&bad.store_id)
                .and_then(|s| s.stats.as_mut())
            {
                stats.damaged_regions_id.retain(|r| *r != region.id);
            }
            tracing::warn!(
                region_id = region.id,
                store_id = bad.store_id,
                peer_id = bad.id,
                "removing a replica its store reported damaged"
            );
            return Ok(Some(Operator::new(
                "replica-remove-damaged",
                vec![Step::RemovePeer(bad)],
            )));
        }
        let pending = |p: &Peer| info.pending_peers.iter().any(|x| x.id == p.id);
        // A caught-up learner PD did not plan (or whose operator timed out): promote it if the
        // Region needs voters, else it is an extra replica.
        let voters = region
            .peers
            .iter()
            .filter(|p| p.role == PeerRole::Voter as i32)
            .count();
        if let Some(l) = region
            .peers
            .iter()
            .find(|p| p.role == PeerRole::Learner as i32 && !pending(p))
        {
            if voters < self.max_replicas && !store_must_drain(self, l.store_id) {
                let mut v = *l;
                v.role = PeerRole::Voter as i32;
                return Ok(Some(Operator::new(
                    "replica-promote",
                    vec![Step::Promote(v)],
                )));
            }
            return Ok(Some(Operator::new(
                "replica-remove-learner",
                vec![Step::RemovePeer(*l)],
            )));
        }
        if region.peers.iter().any(pending) {
            return Ok(None); // let it catch up before changing more
        }
        // Replicas on Down or Offline stores are rebuilt elsewhere.
        if let Some(bad) = region
            .peers
            .iter()
            .find(|p| store_must_drain(self, p.store_id))
            .copied()
        {
            if region.peers.len() > self.max_replicas {
                return Ok(self.removal(info, leader, &bad, "replica-remove-extra"));
            }
            if self.replica_ops_in_flight() >= self.schedule_cfg.region_schedule_limit {
                return Ok(None);
            }
            let Some(target) = self.pick_target(info) else {
                return Ok(None);
            };
            let steps = self.replace_steps(info, leader, &bad, target)?;
            return Ok(Some(Operator::new("replica-replace", steps)));
        }
        if region.peers.len() < self.max_replicas {
            let Some(target) = self.pick_target(info) else {
                return Ok(None);
            };
            let new = self.new_learner(target)?;
            let mut v = new;
            v.role = PeerRole::Voter as i32;
            return Ok(Some(Operator::new(
                "replica-add",
                vec![Step::AddLearner(new), Step::Promote(v)],
            )));
        }
        if region.peers.len() > self.max_replicas {
            // The replica on the fullest store goes.
            let victim = region
                .peers
                .iter()
                .max_by_key(|p| (self.planned_regions(p.store_id), p.id == leader.id))
                .copied();
            if let Some(v) = victim {
                return Ok(self.removal(info, leader, &v, "replica-remove-extra"));
            }
        }
        Ok(None)
    }

    /// A replica (not the leader, which is alive by definition) on a store that reports the
    /// Region in its latest `damaged_regions_id`.
    fn damaged_replica(&self, info: &RegionInfo, leader: &Peer) -> Option<Peer> {
        info.region
            .peers
            .iter()
            .filter(|p| p.id != leader.id)
            .find(|p| {
                self.stores
                    .get(&p.store_id)
                    .and_then(|s| s.stats.as_ref())
                    .is_some_and(|st| st.damaged_regions_id.contains(&info.region.id))
            })
            .copied()
    }

    /// Removes `victim`; a leader hands over first, to the follower on the store leading the
    /// fewest Regions.
    fn removal(
        &self,
        info: &RegionInfo,
        leader: &Peer,
        victim: &Peer,
        kind: &'static str,
    ) -> Option<Operator> {
        let mut steps = Vec::new();
        if victim.id == leader.id {
            let to = info
                .region
                .peers
                .iter()
                .filter(|p| p.id != victim.id && p.role == PeerRole::Voter as i32)
                .min_by_key(|p| self.planned_leaders(p.store_id))?;
            steps.push(Step::TransferLeader(*to));
        }
        steps.push(Step::RemovePeer(*victim));
        Some(Operator::new(kind, steps))
    }

    fn balance_region(&mut self, info: &RegionInfo, leader: &Peer) -> Result<Option<Operator>> {
        if self.replica_ops_in_flight() >= self.schedule_cfg.region_schedule_limit {
            return Ok(None);
        }
        let region = &info.region;
        if region
            .peers
            .iter()
            .any(|p| p.role != PeerRole::Voter as i32)
        {
            return Ok(None);
        }
        let Some(source) = region
            .peers
            .iter()
            .filter(|p| !self.store_busy(p.store_id))
            .max_by_key(|p| (self.planned_regions(p.store_id), p.id != leader.id))
            .copied()
        else {
            return Ok(None);
        };
        let Some(target) = self.pick_target(info) else {
            return Ok(None);
        };
        if self.planned_regions(source.store_id) - self.planned_regions(target) <= 1 {
            return Ok(None);
        }
        let steps = self.replace_steps(info, leader, &source, target)?;
        Ok(Some(Operator::new("balance-region", steps)))
    }

    fn balance_leader(&self, info: &RegionInfo, leader: &Peer) -> Option<Operator> {
        let transfers = self
            .ops
            .values()
            .filter(|o| {
                o.steps.iter().any(|s| matches!(s, Step::TransferLeader(_))) && !o.moves_replicas()
            })
            .count();
        if transfers >= self.schedule_cfg.leader_schedule_limit {
            return None;
        }
        let leaders = |s: u64| self.planned_leaders(s);
        let to = info
            .region
            .peers
            .iter()
            .filter(|p| {
                p.id != leader.id
                    && p.role == PeerRole::Voter as i32
                    && self
                        .stores
                        .get(&p.store_id)
                        .is_some_and(|s| s.alive() && s.meta.state == StoreState::Up as i32)
            })
            .min_by_key(|p| (leaders(p.store_id), p.store_id))?;
        if leaders(leader.store_id) - leaders(to.store_id) <= 1 {
            return None;
        }
        Some(Operator::new(
            "balance-leader",
            vec![Step::TransferLeader(*to)],
        ))
    }

    /// Asks the Region's leader to split it at `keys` (in half when empty), on its next
    /// heartbeat. Refused while another operator runs on the Region.
    /// Moves the leadership of `region_id` to its replica on `store_id`, by hand.
    pub fn transfer_leader(&mut self, region_id: u64, store_id: u64) -> Result<()> {
        let info = self.hand_op_target(region_id)?;
        let to = info
            .region
            .peers
            .iter()
            .find(|p| p.store_id == store_id && p.role == PeerRole::Voter as i32)
            .copied()
            .ok_or_else(|| {
                super::cluster::ClusterError::Invalid(format!(
                    "Region {region_id} has no voter on store {store_id}"
                ))
            })?;
        if info.leader.is_some_and(|l| l.id == to.id) {
            return Ok(()); // already there
        }
        let op = Operator::new("transfer-leader", vec![Step::TransferLeader(to)]);
        tracing::info!(region_id, store_id, "leader transfer requested through PD");
        self.ops.insert(region_id, op);
        Ok(())
    }

    /// Removes the replica of `region_id` on `store_id`, by hand (its leadership moves first if
    /// it leads). The replica checker adds a replica back if the Region is then short of
    /// `replication.max-replicas`.
    pub fn remove_peer(&mut self, region_id: u64, store_id: u64) -> Result<()> {
        let info = self.hand_op_target(region_id)?;
        let victim = info
            .region
            .peers
            .iter()
            .find(|p| p.store_id == store_id)
            .copied()
            .ok_or_else(|| {
                super::cluster::ClusterError::Invalid(format!(
                    "Region {region_id} has no replica on store {store_id}"
                ))
            })?;
        if info.region.peers.len() < 2 {
            return Err(super::cluster::ClusterError::Invalid(format!(
                "Region {region_id} has a single replica: removing it would lose the Region"
            )));
        }
        let mut steps = Vec::new();
        if info.leader.is_some_and(|l| l.id == victim.id) {
            let other = info
                .region
                .peers
                .iter()
                .find(|p| p.id != victim.id && p.role == PeerRole::Voter as i32)
                .copied()
                .ok_or_else(|| {
                    super::cluster::ClusterError::Invalid(format!(
                        "Region {region_id} has no other voter to lead"
                    ))
                })?;
            steps.push(Step::TransferLeader(other));
        }
        steps.push(Step::RemovePeer(victim));
        tracing::info!(region_id, store_id, "replica removal requested through PD");
        self.ops
            .insert(region_id, Operator::new("remove-peer", steps));
        Ok(())
    }

    /// The Region a hand-made operator is for: known, with no operator in flight, and not the
    /// target of a merge in flight (a change there would wreck the merge).
    fn hand_op_target(&self, region_id: u64) -> Result<&RegionInfo> {
        let info = self
            .regions
            .get(&region_id)
            .ok_or(super::cluster::ClusterError::RegionNotFound(region_id))?;
        if self.ops.contains_key(&region_id) {
            return Err(super::cluster::ClusterError::Invalid(format!(
                "Region {region_id} has an operator in flight"
            )));
        }
        if self.merge_target_of_op(region_id) {
            return Err(super::cluster::ClusterError::Invalid(format!(
                "Region {region_id} is the target of a merge in flight"
            )));
        }
        Ok(info)
    }

    pub fn split_region(&mut self, region_id: u64, keys: Vec<Vec<u8>>) -> Result<()> {
        let info = self.hand_op_target(region_id)?;
        let version = info.region.region_epoch.map_or(0, |e| e.version);
        let op = Operator::new("split-region", vec![Step::Split { keys, version }]);
        tracing::info!(region_id, "split requested through PD");
        self.ops.insert(region_id, op);
        Ok(())
    }

    /// Offline stores that hold no replica any more become Tombstone. Returns the ids changed.
    pub fn bury_empty_stores(&mut self) -> Result<Vec<u64>> {
        let empty: Vec<u64> = self
            .stores
            .values()
            .filter(|s| {
                s.meta.state == StoreState::Offline as i32
                    && self.store_regions.get(&s.meta.id).copied().unwrap_or(0) == 0
            })
            .map(|s| s.meta.id)
            .collect();
        for id in &empty {
            if let Some(s) = self.stores.get_mut(id) {
                s.meta.state = StoreState::Tombstone as i32;
                let meta = s.meta.clone();
                self.meta().put_store(&meta)?;
                tracing::info!(store_id = id, "store is empty: Tombstone");
            }
        }
        Ok(empty)
    }

    /// Region and leader counts per store, for the HTTP API and tests.
    pub fn store_counts(&self, store: u64) -> (usize, usize) {
        (
            self.store_regions.get(&store).copied().unwrap_or(0),
            self.store_leaders.get(&store).copied().unwrap_or(0),
        )
    }
}

/// Counts changes of a Region's placement (`sign` = 1 when it comes in, -1 when it goes).
pub(super) fn count_region(
    regions: &mut HashMap<u64, usize>,
    leaders: &mut HashMap<u64, usize>,
    info: &RegionInfo,
    sign: i64,
) {
    let apply = |m: &mut HashMap<u64, usize>, store: u64| {
        let e = m.entry(store).or_default();
        *e = (*e as i64 + sign).max(0) as usize;
    };
    for p in &info.region.peers {
        apply(regions, p.store_id);
    }
    if let Some(l) = info.leader {
        apply(leaders, l.store_id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prkv_proto::metapb::{Region, RegionEpoch, Store};

    use super::*;
    use crate::pd::meta::MetaStore;

    fn store(id: u64) -> Store {
        Store {
            id,
            address: format!("127.0.0.1:{}", 30000 + id),
            ..Default::default()
        }
    }

    /// Applies an operator step to the simulated Region, as its leader would.
    fn apply(r: &mut Region, leader: &mut Peer, resp: &pdpb::RegionHeartbeatResponse) {
        let epoch = r.region_epoch.as_mut().unwrap();
        if let Some(cp) = &resp.change_peer {
            let p = cp.peer.unwrap();
            match ConfChangeType::try_from(cp.change_type).unwrap() {
                ConfChangeType::AddLearnerNode => r.peers.push(Peer {
                    role: PeerRole::Learner as i32,
                    ..p
                }),
                ConfChangeType::AddNode => {
                    for x in r.peers.iter_mut().filter(|x| x.id == p.id) {
                        x.role = PeerRole::Voter as i32;
                    }
                }
                ConfChangeType::RemoveNode => {
                    assert_ne!(p.id, leader.id, "PD asked to remove the leader");
                    r.peers.retain(|x| x.id != p.id)
                }
            }
            epoch.conf_ver += 1;
        }
        if let Some(tl) = &resp.transfer_leader {
            *leader = tl.peer.unwrap();
        }
    }

    /// Heartbeats Region `r` (id 1) up to 20 times, applying what PD answers, until no
    /// operator is left; returns the kind of the operator behind each answer.
    fn drive(c: &mut Cluster, r: &mut Region, leader: &mut Peer) -> Vec<Option<&'static str>> {
        let mut kinds = Vec::new();
        for _ in 0..20 {
            c.update_region(RegionInfo {
                region: r.clone(),
                leader: Some(*leader),
                ..Default::default()
            })
            .unwrap();
            let Some(resp) = c.schedule(1).unwrap() else {
                if c.ops.is_empty() {
                    break;
                }
                continue;
            };
            kinds.push(c.ops.get(&1).map(|o| o.kind));
            apply(r, leader, &resp);
        }
        kinds
    }

    /// Heartbeats every Region, applying what PD answers, until PD has nothing more to do.
    fn settle(c: &mut Cluster, regions: &mut [(Region, Peer)]) {
        for _ in 0..500 {
            let mut busy = false;
            for (r, leader) in regions.iter_mut() {
                c.update_region(RegionInfo {
                    region: r.clone(),
                    leader: Some(*leader),
                    ..Default::default()
                })
                .unwrap();
                if let Some(resp) = c.schedule(r.id).unwrap() {
                    apply(r, leader, &resp);
                    busy = true;
                }
                busy |= c.ops.contains_key(&r.id);
            }
            if !busy {
                return;
            }
        }
        panic!(
            "scheduling never settled: ops {:?}, counts {:?} {:?}",
            c.ops, c.store_regions, c.store_leaders
        );
    }

    #[test]
    fn scale_out_balances_and_scale_in_drains_to_tombstone() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let mut c = Cluster::open(meta, 3, ScheduleConfig::default()).unwrap();
        let voter = |id, store_id| Peer {
            id,
            store_id,
            role: PeerRole::Voter as i32,
            is_witness: false,
        };
        let mut regions: Vec<(Region, Peer)> = (1..=12u64)
            .map(|i| {
                let r = Region {
                    id: i,
                    start_key: if i == 1 { vec![] } else { vec![i as u8] },
                    end_key: if i == 12 { vec![] } else { vec![i as u8 + 1] },
                    region_epoch: Some(RegionEpoch {
                        conf_ver: 1,
                        version: 1,
                    }),
                    peers: (1..=3).map(|s| voter(i * 10 + s, s)).collect(),
                };
                let leader = r.peers[0];
                (r, leader)
            })
            .collect();
        c.bootstrap(store(1), regions[0].0.clone()).unwrap();
        for s in 2..=4 {
            c.put_store(store(s)).unwrap();
        }
        settle(&mut c, &mut regions);
        // 36 replicas over 4 stores: 9 each; 12 leaders: 3 each (one off at most).
        for s in 1..=4 {
            let (n, l) = c.store_counts(s);
            assert!((8..=10).contains(&n), "store {s} holds {n} replicas");
            assert!((2..=4).contains(&l), "store {s} leads {l} Regions");
        }
        for (r, _) in &regions {
            assert_eq!(r.peers.len(), 3);
            let stores: std::collections::HashSet<u64> =
                r.peers.iter().map(|p| p.store_id).collect();
            assert_eq!(stores.len(), 3, "two replicas on one store: {r:?}");
        }
        // Scale in: store 2 drains, then is buried.
        c.delete_store(2).unwrap();
        assert!(
            c.delete_store(3).is_err(),
            "only 3 stores would remain... then 2"
        );
        settle(&mut c, &mut regions);
        assert_eq!(c.store_counts(2).0, 0);
        assert_eq!(c.bury_empty_stores().unwrap(), vec![2]);
        assert_eq!(c.store_state_name(c.store(2).unwrap()), "Tombstone");
        for (r, _) in &regions {
            assert_eq!(r.peers.len(), 3);
            assert!(r.peers.iter().all(|p| p.store_id != 2));
            assert!(r.peers.iter().all(|p| p.role == PeerRole::Voter as i32));
        }
    }

    /// Small neighbours merge (the merge checker), big ones stay, and a Region that just split
    /// is left alone for `split-merge-interval`.
    #[test]
    fn small_neighbours_merge_until_none_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let cfg = ScheduleConfig {
            max_merge_region_keys: 10,
            max_merge_region_size: 1,
            split_merge_interval: Duration::ZERO,
            ..Default::default()
        };
        let mut c = Cluster::open(meta, 3, cfg).unwrap();
        let voter = |id, store_id| Peer {
            id,
            store_id,
            role: PeerRole::Voter as i32,
            is_witness: false,
        };
        // Regions 1..=4 are empty, 5..=8 hold 1000 keys each.
        let mut regions: Vec<Region> = (1..=8u64)
            .map(|i| Region {
                id: i,
                start_key: if i == 1 { vec![] } else { vec![i as u8] },
                end_key: if i == 8 { vec![] } else { vec![i as u8 + 1] },
                region_epoch: Some(RegionEpoch {
                    conf_ver: 1,
                    version: 1,
                }),
                peers: (1..=3).map(|s| voter(i * 10 + s, s)).collect(),
            })
            .collect();
        c.bootstrap(store(1), regions[0].clone()).unwrap();
        for s in 2..=3 {
            c.put_store(store(s)).unwrap();
        }
        let keys = |id: u64| if id <= 4 { 0 } else { 1000 };
        let mut leaders: HashMap<u64, Peer> = regions
            .iter()
            .map(|r| (r.id, r.peers[(r.id % 3) as usize]))
            .collect();
        for _ in 0..100 {
            let mut merged = None;
            for r in &regions {
                c.update_region(RegionInfo {
                    region: r.clone(),
                    leader: Some(leaders[&r.id]),
                    approximate_keys: keys(r.id),
                    ..Default::default()
                })
                .unwrap();
                let Some(resp) = c.schedule(r.id).unwrap() else {
                    continue;
                };
                if let Some(tl) = resp.transfer_leader {
                    leaders.insert(r.id, tl.peer.unwrap());
                }
                if let Some(m) = resp.merge {
                    merged = Some((r.id, m.target.unwrap().id));
                    break;
                }
            }
            let Some((source, target)) = merged else {
                if c.ops.is_empty() {
                    break;
                }
                continue; // leader transfers in flight: their next heartbeats finish them
            };
            // What the Raftstore does: the target takes the range, its version passes both.
            let s = regions.iter().find(|r| r.id == source).unwrap().clone();
            assert!(
                source <= 4 && target <= 4,
                "a big Region took part in a merge"
            );
            let t = regions.iter_mut().find(|r| r.id == target).unwrap();
            if !s.end_key.is_empty() && s.end_key == t.start_key {
                t.start_key = s.start_key.clone();
            } else {
                assert_eq!(t.end_key, s.start_key, "merged Regions are adjacent");
                t.end_key = s.end_key.clone();
            }
            let e = t.region_epoch.as_mut().unwrap();
            e.version = e.version.max(s.region_epoch.unwrap().version + 1) + 1;
            regions.retain(|r| r.id != source);
        }
        assert_eq!(
            regions.len(),
            5,
            "the four empty Regions became one: {regions:?}"
        );
        assert!(regions[0].start_key.is_empty() && regions[0].end_key == vec![5]);
        // With the default interval, Regions PD just saw change version are not merged.
        c.schedule_cfg.split_merge_interval = Duration::from_secs(3600);
        let mut r = regions[0].clone();
        r.region_epoch.as_mut().unwrap().version += 1;
        c.update_region(RegionInfo {
            region: r.clone(),
            leader: Some(r.peers[0]),
            ..Default::default()
        })
        .unwrap();
        assert!(c.check_merge(&c.regions[&r.id].clone()).is_none());
    }

    /// A store silent for `max-store-down-time` is Down: each Region's replica there is
    /// replaced on a live store (add, promote, remove), leadership first moving away if needed.
    #[test]
    fn replicas_on_a_down_store_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let cfg = ScheduleConfig {
            max_store_down_time: Duration::from_secs(60),
            ..Default::default()
        };
        let mut c = Cluster::open(meta, 3, cfg).unwrap();
        let voter = |id, store_id| Peer {
            id,
            store_id,
            role: PeerRole::Voter as i32,
            is_witness: false,
        };
        let mut r = Region {
            id: 1,
            start_key: vec![],
            end_key: vec![],
            region_epoch: Some(RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: (1..=3).map(|s| voter(10 + s, s)).collect(),
        };
        let store = |id: u64| Store {
            id,
            address: format!("127.0.0.1:{}", 31000 + id),
            ..Default::default()
        };
        c.bootstrap(store(1), r.clone()).unwrap();
        for s in 2..=4 {
            c.put_store(store(s)).unwrap();
        }
        // Store 3 went silent long ago; the leader is on it.
        c.stores.get_mut(&3).unwrap().last_heartbeat =
            Some(Instant::now() - Duration::from_secs(120));
        assert_eq!(c.store_state_name(c.store(3).unwrap()), "Down");
        let mut leader = r.peers[2];
        let kinds = drive(&mut c, &mut r, &mut leader);
        assert!(kinds.contains(&Some("replica-replace")), "{kinds:?}");
        let stores: Vec<u64> = r.peers.iter().map(|p| p.store_id).collect();
        assert_eq!(r.peers.len(), 3, "{r:?}");
        assert!(!stores.contains(&3), "{stores:?}");
        assert!(stores.contains(&4), "{stores:?}");
        assert_ne!(leader.store_id, 3);
    }

    /// A replica its store reported damaged is removed, then rebuilt on that same store (the
    /// only one without a replica) under a new peer id; a report that arrives again after the
    /// replacement exists, without the store re-sending it, does not condemn the replacement.
    #[test]
    fn damaged_replica_is_removed_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let mut c = Cluster::open(meta, 3, ScheduleConfig::default()).unwrap();
        let voter = |id, store_id| Peer {
            id,
            store_id,
            role: PeerRole::Voter as i32,
            is_witness: false,
        };
        let mut r = Region {
            id: 1,
            start_key: vec![],
            end_key: vec![],
            region_epoch: Some(RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: (1..=3).map(|s| voter(10 + s, s)).collect(),
        };
        c.bootstrap(store(1), r.clone()).unwrap();
        for s in 1..=3 {
            c.put_store(store(s)).unwrap();
            c.store_heartbeat(pdpb::StoreStats {
                store_id: s,
                damaged_regions_id: if s == 3 { vec![1] } else { vec![] },
                ..Default::default()
            })
            .unwrap();
        }
        let mut leader = r.peers[0];
        // A leader transfer to the damaged replica, asked for by hand, must not hold it up.
        c.update_region(RegionInfo {
            region: r.clone(),
            leader: Some(leader),
            ..Default::default()
        })
        .unwrap();
        c.ops.insert(
            1,
            Operator::new("transfer-leader", vec![Step::TransferLeader(r.peers[2])]),
        );
        let kinds = drive(&mut c, &mut r, &mut leader);
        assert_eq!(
            kinds.first(),
            Some(&Some("replica-remove-damaged")),
            "{kinds:?}"
        );
        assert!(kinds.contains(&Some("replica-add")), "{kinds:?}");
        let on3: Vec<Peer> = r
            .peers
            .iter()
            .filter(|p| p.store_id == 3)
            .copied()
            .collect();
        assert_eq!(on3.len(), 1, "{r:?}");
        assert_ne!(on3[0].id, 13, "the replacement is a new replica");
        assert_eq!(on3[0].role, PeerRole::Voter as i32);
        assert_eq!(r.peers.len(), 3);
        // Nothing more to do: the report was consumed.
        c.update_region(RegionInfo {
            region: r.clone(),
            leader: Some(leader),
            ..Default::default()
        })
        .unwrap();
        assert!(c.schedule(1).unwrap().is_none());
    }

    /// A merge's target is off limits to hand-made operators while the merge is in flight; if
    /// its replicas move anyway (a store drained), PD drops the merge rather than keep the
    /// target's replica checker away until the operator timeout (the crash-point test once left
    /// a Region on one replica for that long). A split that does not happen is dropped after
    /// [`SPLIT_TIMEOUT`], not [`OPERATOR_TIMEOUT`].
    #[test]
    fn stuck_merge_and_split_operators_give_way() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let mut c = Cluster::open(meta, 3, ScheduleConfig::default()).unwrap();
        let voter = |id, store_id| Peer {
            id,
            store_id,
            role: PeerRole::Voter as i32,
            is_witness: false,
        };
        let region = |id: u64, start: Vec<u8>, end: Vec<u8>, stores: [u64; 3]| Region {
            id,
            start_key: start,
            end_key: end,
            region_epoch: Some(RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: stores.iter().map(|&s| voter(id * 10 + s, s)).collect(),
        };
        let (r1, mut r2) = (
            region(1, vec![], vec![5], [1, 2, 3]),
            region(2, vec![5], vec![], [1, 2, 3]),
        );
        c.bootstrap(store(1), r1.clone()).unwrap();
        for s in 2..=4 {
            c.put_store(store(s)).unwrap();
        }
        let beat = |c: &mut Cluster, r: &Region| {
            c.update_region(RegionInfo {
                region: r.clone(),
                leader: Some(r.peers[0]),
                ..Default::default()
            })
            .unwrap()
        };
        beat(&mut c, &r1);
        beat(&mut c, &r2);
        c.merge_region(1, 2).unwrap();
        let err = c.remove_peer(2, 3).unwrap_err().to_string();
        assert!(err.contains("target of a merge"), "{err}");
        assert!(c.split_region(2, vec![]).is_err());
        assert!(c.schedule(1).unwrap().is_some_and(|r| r.merge.is_some()));
        // The target's replica on store 3 moves to store 4 (as a drain would move it).
        r2.peers[2] = voter(24, 4);
        r2.region_epoch.as_mut().unwrap().conf_ver += 2;
        beat(&mut c, &r2);
        beat(&mut c, &r1);
        assert!(c.schedule(1).unwrap().is_none_or(|r| r.merge.is_none()));
        assert!(
            c.ops.get(&1).is_none_or(|o| o.kind != "merge-region"),
            "the merge operator was dropped"
        );
        assert!(c.remove_peer(2, 4).is_ok(), "the target is free again");
        c.ops.clear();
        // A split the leader never carries out gives way after SPLIT_TIMEOUT.
        c.split_region(2, vec![]).unwrap();
        assert!(c
            .schedule(2)
            .unwrap()
            .is_some_and(|r| r.split_region.is_some()));
        let op = c.ops.get_mut(&2).unwrap();
        op.created -= SPLIT_TIMEOUT - Duration::from_secs(1);
        op.last_sent = None;
        assert!(c
            .schedule(2)
            .unwrap()
            .is_some_and(|r| r.split_region.is_some()));
        c.ops.get_mut(&2).unwrap().created -= Duration::from_secs(2);
        let _ = c.schedule(2).unwrap();
        assert!(
            c.ops.get(&2).is_none_or(|o| o.kind != "split-region"),
            "the split operator timed out"
        );
    }
}
