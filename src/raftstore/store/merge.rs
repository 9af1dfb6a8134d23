//! Merge: two adjacent Regions become one, driven by the source's leader.
//!
//! ```text
//!  source (S)                                   target (T)
//!  1. PrepareMerge{T as known here, min_index}
//!     applied: S frozen (state Merging, epoch
//!     bumped), writes/reads/splits refused
//!  2. the leader of S asks this store's T
//!     replica to lead (if it does not) ──────▶  3. CommitMerge{S, commit, S's entries
//!                                                  after min_index, T's epoch at step 1}
//!                                                  applied on each store: S's replica here
//!                                                  catches up to `commit` (from the carried
//!                                                  entries if it lags), T takes in S's data
//!                                                  and range, S's replica is destroyed
//!  or, once T's epoch moved past the one
//!  recorded at step 1 (T split, changed
//!  membership or merged) and that is
//!  proven (below): RollbackMerge
//! ```
//!
//! **Never both commit and rollback** (the trap of TiKV issues #15242 and #15682). A
//! CommitMerge applies only if T's epoch is exactly the one the PrepareMerge recorded, so once T
//! moved past that epoch, every CommitMerge ordered after the change fails on every replica.
//! One ordered *before* it may have applied, though: S may roll back only on proof that none
//! did. T's log is totally ordered, so a replica of T that moved past the epoch by applying its
//! own log, entry by entry, is a **witness**: had a CommitMerge come first, it would have applied
//! it too, and destroyed S's replica on its store in the same step. A replica of T that jumped
//! past the epoch by a snapshot is not: the snapshot may hide a CommitMerge it never applied
//! (when the snapshot covers S's whole range, `merge_sources_covered_by` destroys S's replica;
//! when T split S's range off again first, it does not). Nor is one recovered after a restart
//! with the epoch already past (`Peer::applied_past_by_log` counts from where this process
//! started). So S's leader rolls back when this store's T replica is a witness, or when another
//! replica of S answers that its T replica is one, or when every replica of S answers that its
//! T moved past the epoch (the store whose T replica applied a CommitMerge, if one did, has no
//! replica of S left to answer). Until then it asks again each `MERGE_RETRY`. When a
//! CommitMerge applies, S's replica must be exactly as its PrepareMerge left it (same epoch,
//! applied up to `commit`); anything else means the invariant broke, and the store stops
//! rather than merge wrong data.
//!
//! **Data.** Partitioned: S's keys (small by PD's merge rules) are written into T's tablet,
//! which is then flushed, all before the Region states change in raft-engine; a crash in
//! between replays the CommitMerge, which writes the same keys again. raft-kv: the keys are
//! already in the shared DB; T's range just grows.
//!
//! **Durability order** of a CommitMerge on one store: T's tablet holds S's data and an apply
//! state at the CommitMerge (flushed) → one synced raft-engine write with T's new Region
//! (`conf_index` = the CommitMerge) and S's tombstone → S's log and tablet are removed.
//! Replaying after a crash skips a CommitMerge at or below T's `conf_index`. PrepareMerge and
//! RollbackMerge likewise make the engine durable through their index before the Region state
//! changes: a replay never crosses a Region-state change, so no entry made against the old
//! state is ever replayed (and refused) under the new one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prkv_proto::metapb::{Region, RegionEpoch};
use prkv_proto::serverpb::{
    CommitMerge, PeerState, RaftApplyState, RaftCmdRequest, RegionLocalState, RollbackMerge,
};
use protobuf::Message as _;

use super::{range_of, Store};
use crate::config::EngineKind;
use crate::raftlog::LogWriteBatch;
use crate::raftstore::error::{Error, Result};
use crate::raftstore::msg::{MergeRollbackMsg, RaftMessage, WriteCallback};
use crate::raftstore::peer::PendingCommitMerge;
use crate::storage::{Cf, RegionEngine, RegionId, ScanDir, WriteBatch};

/// How often the source's leader re-sends its CommitMerge (or leadership request) while the
/// merge has not happened: often enough that a merge takes a few hundred milliseconds, rarely
/// enough that a duplicate CommitMerge (harmless: it fails its epoch check) stays rare.
const MERGE_RETRY: Duration = Duration::from_millis(500);

/// Source keys are copied into the target's tablet in write batches of about this size, so a
/// merge never holds the whole source in memory.
const MERGE_COPY_BATCH_BYTES: usize = 4 << 20;

fn same_epoch(a: Option<RegionEpoch>, b: Option<RegionEpoch>) -> bool {
    let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
    a.version == b.version && a.conf_ver == b.conf_ver
}

/// `a` has moved past `b` (a split, merge or membership change applied since `b`).
fn epoch_passed(a: Option<RegionEpoch>, b: Option<RegionEpoch>) -> bool {
    let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
    (a.version > b.version || a.conf_ver > b.conf_ver)
        && a.version >= b.version
        && a.conf_ver >= b.conf_ver
}

impl Store {
    /// `StoreMsg::PrepareMerge`: the source's leader proposes freezing it for a merge into the
    /// target as this store's replica of the target knows it.
    pub(super) fn on_prepare_merge(
        &mut self,
        source_id: RegionId,
        target_id: RegionId,
        cb: WriteCallback,
    ) {
        let target = match self.peers.get(&target_id) {
            None => {
                return cb(Err(Error::InvalidMerge(format!(
                    "no replica of target Region {target_id} on this store"
                ))))
            }
            Some(t) if t.merge_state.is_some() => {
                return cb(Err(Error::ProposalInMergingMode(target_id)))
            }
            Some(t) => t.region.clone(),
        };
        match self.peers.get_mut(&source_id) {
            None => cb(Err(Error::RegionNotFound(source_id))),
            Some(p) => p.propose_prepare_merge(&target, cb),
        }
    }

    /// Drives every merge whose source this store leads: ask for the target's leadership here,
    /// propose the CommitMerge on it, or roll back once the target can no longer commit.
    pub(super) fn on_merge_tick(&mut self) {
        let now = Instant::now();
        let sources: Vec<RegionId> = self
            .peers
            .values()
            .filter(|p| p.merge_state.is_some() && p.is_leader())
            .map(|p| p.region_id())
            .collect();
        self.merge_attempts.retain(|id, _| sources.contains(id));
        self.rollback_agreed.retain(|id, _| sources.contains(id));
        for source_id in sources {
            if self
                .merge_attempts
                .get(&source_id)
                .is_some_and(|at| now.duration_since(*at) < MERGE_RETRY)
            {
                continue;
            }
            self.merge_attempts.insert(source_id, now);
            if let Err(e) = self.drive_merge(source_id) {
                tracing::warn!(region_id = source_id, error = %e, "driving a merge failed");
            }
        }
    }

    fn drive_merge(&mut self, source_id: RegionId) -> Result<()> {
        let s = &self.peers[&source_id];
        let ms = s.merge_state.clone().expect("listed as merging");
        let recorded = ms.target.clone().unwrap_or_default();
        let Some(t) = self.peers.get(&recorded.id) else {
            tracing::info!(
                region_id = source_id,
                target = recorded.id,
                "merge waits: no replica of the target on this store"
            );
            return Ok(());
        };
        if epoch_passed(t.region.region_epoch, recorded.region_epoch) {
            if !self.rollback_proven(source_id) {
                self.ask_for_rollback(source_id);
                return Ok(());
            }
            tracing::info!(
                region_id = source_id,
                target = recorded.id,
                "target changed since the merge was prepared: rolling back"
            );
            let cmd = RaftCmdRequest {
                rollback_merge: Some(RollbackMerge { commit: ms.commit }),
                ..Default::default()
            };
            let s = self.peers.get_mut(&source_id).expect("exists");
            s.propose_merge_admin(
                cmd,
                Box::new(move |res| {
                    if let Err(e) = res {
                        tracing::info!(region_id = source_id, error = %e, "rollback not applied");
                    }
                }),
            );
            return Ok(());
        }
        if !same_epoch(t.region.region_epoch, recorded.region_epoch) {
            return Ok(()); // this store's target replica lags: wait for it
        }
        if !t.is_leader() {
            // Ask the target's leader to hand over to this store, where the CommitMerge is made.
            let t = self.peers.get_mut(&recorded.id).expect("exists");
            t.wake();
            let me = t.meta.id;
            t.transfer_leader(me);
            return Ok(());
        }
        // The source's entries a lagging replica may miss, carried in the CommitMerge.
        let mut entries = Vec::new();
        for e in self
            .engines
            .raft
            .entries(source_id, ms.min_index + 1, ms.commit + 1, None)?
        {
            entries.push(
                e.write_to_bytes()
                    .map_err(|e| Error::Storage(format!("encoding a Raft entry: {e}")))?,
            );
        }
        if entries.len() as u64 != ms.commit - ms.min_index {
            return Err(Error::Storage(format!(
                "Region {source_id}: the log no longer holds ({}, {}]",
                ms.min_index, ms.commit
            )));
        }
        let s = &self.peers[&source_id];
        let cmd = RaftCmdRequest {
            commit_merge: Some(CommitMerge {
                source: Some(s.region.clone()),
                commit: ms.commit,
                entries,
                target_epoch: recorded.region_epoch,
            }),
            ..Default::default()
        };
        let t = self.peers.get_mut(&recorded.id).expect("exists");
        let target_id = recorded.id;
        t.propose_merge_admin(
            cmd,
            Box::new(move |res| match res {
                Ok(()) => tracing::info!(region_id = target_id, source = source_id, "merge committed"),
                Err(e) => tracing::info!(region_id = target_id, source = source_id, error = %e, "CommitMerge did not apply"),
            }),
        );
        Ok(())
    }

    /// Whether the merge of `source_id`, whose target here moved past the recorded epoch, can
    /// no longer commit anywhere (see "Rollback" in the module docs): a witness says so (this
    /// store's target replica, or another replica's that answered), or every replica of the
    /// source agreed.
    fn rollback_proven(&self, source_id: RegionId) -> bool {
        let s = &self.peers[&source_id];
        let Some(ms) = &s.merge_state else {
            return false;
        };
        let recorded = ms.target.clone().unwrap_or_default();
        if self
            .peers
            .get(&recorded.id)
            .is_some_and(|t| t.applied_past_by_log(recorded.region_epoch))
        {
            return true;
        }
        let Some((commit, agreed)) = self.rollback_agreed.get(&source_id) else {
            return false;
        };
        if *commit != ms.commit {
            return false;
        }
        agreed.values().any(|witness| *witness)
            || s.region
                .peers
                .iter()
                .filter(|p| p.id != s.meta.id)
                .all(|p| agreed.contains_key(&p.id))
    }

    /// Asks the source's other replicas (those that have not agreed yet) whether the merge may
    /// roll back.
    fn ask_for_rollback(&mut self, source_id: RegionId) {
        let s = &self.peers[&source_id];
        let Some(ms) = &s.merge_state else {
            return;
        };
        let commit = ms.commit;
        let agreed = self
            .rollback_agreed
            .get(&source_id)
            .filter(|(c, _)| *c == commit)
            .map(|(_, a)| a);
        tracing::info!(
            region_id = source_id,
            agreed = agreed.map_or(0, |a| a.len()),
            "target changed since the merge was prepared, but not by its log here: asking the \
             other replicas before rolling back"
        );
        for p in s.region.peers.iter().filter(|p| p.id != s.meta.id) {
            if agreed.is_some_and(|a| a.contains_key(&p.id)) {
                continue;
            }
            let mut m = RaftMessage::signal(
                source_id,
                s.meta,
                *p,
                s.region.region_epoch.unwrap_or_default(),
                self.id,
            );
            m.merge_rollback = Some(MergeRollbackMsg::Query { commit });
            self.trans.send(m);
        }
    }

    /// A rollback query from the source's leader (answered yes if this replica's target moved
    /// past the recorded epoch, and whether it is a witness), or an answer to this store's.
    pub(super) fn on_merge_rollback_msg(&mut self, m: &RaftMessage, q: MergeRollbackMsg) {
        let Some(p) = self.peers.get(&m.region_id) else {
            return;
        };
        if m.to_peer.id != p.meta.id {
            return;
        }
        match q {
            MergeRollbackMsg::Query { commit } => {
                let Some(ms) = p.merge_state.as_ref().filter(|ms| ms.commit == commit) else {
                    return;
                };
                let recorded = ms.target.clone().unwrap_or_default();
                let Some(t) = self.peers.get(&recorded.id) else {
                    return;
                };
                if !epoch_passed(t.region.region_epoch, recorded.region_epoch) {
                    return;
                }
                let witness = t.applied_past_by_log(recorded.region_epoch);
                let mut answer = RaftMessage::signal(
                    m.region_id,
                    p.meta,
                    m.from_peer,
                    p.region.region_epoch.unwrap_or_default(),
                    self.id,
                );
                answer.merge_rollback = Some(MergeRollbackMsg::Agree { commit, witness });
                self.trans.send(answer);
            }
            MergeRollbackMsg::Agree { commit, witness } => {
                if !p.is_leader() || p.merge_state.as_ref().map(|ms| ms.commit) != Some(commit) {
                    return;
                }
                let entry = self
                    .rollback_agreed
                    .entry(m.region_id)
                    .or_insert_with(|| (commit, HashMap::new()));
                if entry.0 != commit {
                    *entry = (commit, HashMap::new());
                }
                entry.1.insert(m.from_peer.id, witness);
            }
        }
    }

    /// Applies a CommitMerge on the target `target_id` (see the module docs for the order).
    pub(super) fn commit_merge(
        &mut self,
        target_id: RegionId,
        pending: PendingCommitMerge,
    ) -> Result<()> {
        let PendingCommitMerge {
            index, term, cmd, ..
        } = pending;
        let t = self.peers.get(&target_id).expect("applying peer exists");
        let source = cmd.source.clone().unwrap_or_default();
        let refuse = if !same_epoch(t.region.region_epoch, cmd.target_epoch) {
            Some(Error::EpochNotMatch {
                current_regions: vec![t.region.clone()],
            })
        } else if t.merge_state.is_some() {
            Some(Error::ProposalInMergingMode(target_id))
        } else {
            None
        };
        if let Some(e) = refuse {
            let t = self.peers.get_mut(&target_id).expect("exists");
            let (region, engine) = (t.region.clone(), t.engine.clone());
            t.finish_commit_merge(region, engine, index, term, Err(e));
            return Ok(());
        }
        self.catch_up_source(&cmd)?;
        let s = self.peers.get(&source.id).unwrap_or_else(|| {
            panic!(
                "store {}: CommitMerge of Region {} into {target_id} at {index}, but the source has no replica here",
                self.id, source.id
            )
        });
        // The invariant of the module docs: the source is exactly as its PrepareMerge left it.
        assert!(
            s.applied_index >= cmd.commit
                && same_epoch(s.region.region_epoch, source.region_epoch)
                && s.merge_state.as_ref().is_some_and(|m| m.commit == cmd.commit),
            "store {}: Region {} is not frozen at {} (applied {}, epoch {:?}, merge {:?}) when {target_id} commits its merge: commit and rollback both happened",
            self.id,
            source.id,
            cmd.commit,
            s.applied_index,
            s.region.region_epoch,
            s.merge_state,
        );
        let t = &self.peers[&target_id];
        let mut merged = t.region.clone();
        // The source precedes the target iff its end is the target's start; an empty end is
        // +inf, never anyone's start (the last Region merging into the first of two must not
        // take this branch: their empty keys compare equal).
        if !source.end_key.is_empty() && source.end_key == merged.start_key {
            merged.start_key = source.start_key.clone();
        } else {
            merged.end_key = source.end_key.clone();
        }
        let (tv, sv) = (
            merged.region_epoch.unwrap_or_default(),
            source.region_epoch.unwrap_or_default(),
        );
        merged.region_epoch = Some(RegionEpoch {
            version: tv.version.max(sv.version) + 1,
            conf_ver: tv.conf_ver,
        });
        // A split-born tablet still holds its parent's keys outside its range until trimmed;
        // widened over the source's range, those stale keys would come back. Trim first.
        if t.engine.needs_trim()? {
            t.engine.trim()?;
        }
        let engine =
            self.engines
                .kv
                .open_region(target_id, range_of(&merged), t.engine.tablet_index())?;
        let partitioned = self.engines.kv.kind() == EngineKind::PartitionedRaftKv;
        if partitioned {
            copy_region_data(s.engine.as_ref(), engine.as_ref(), &source)?;
        }
        // The target's engine durable before its new Region state is (see
        // `Peer::make_durable_through`): the copied keys and the target's own writes before the
        // CommitMerge, with an apply state of the entry *before* it. A crash before the
        // raft-engine write below then replays the CommitMerge, which copies the same frozen
        // keys again; after it, the Region state's `conf_index` says the entry is done. (An apply
        // state of the CommitMerge itself, as written before, skipped that replay: the source
        // stayed frozen here, merged everywhere else.) Tablets have no WAL: flush; raft-kv: sync
        // the WAL.
        assert_eq!(
            t.applied_index,
            index - 1,
            "Region {target_id}: CommitMerge at {index} applied out of order"
        );
        let mut wb = WriteBatch::new();
        wb.set_apply_state(RaftApplyState {
            applied_index: index - 1,
            applied_term: t.applied_term,
            ..Default::default()
        });
        engine.write(&wb)?;
        if partitioned {
            engine.flush(true)?;
        }
        let durable = engine
            .persisted_apply_state()?
            .map_or(0, |s| s.applied_index);
        assert!(
            durable >= index - 1,
            "Region {target_id}: engine durable through {durable}, not {}, at its CommitMerge",
            index - 1
        );
        crate::crash_point!("commit_merge_before_region_state");
        let mut lb = LogWriteBatch::new();
        lb.put_region_state(
            target_id,
            &t.region_state(&merged, PeerState::Normal, None, index),
        )?;
        // The source's log goes in the same write as its tombstone (as `write_tombstone` does),
        // not left in raft-engine for good.
        lb.clean(source.id);
        lb.put_region_state(
            source.id,
            &RegionLocalState {
                state: PeerState::Tombstone as i32,
                region: Some(s.region.clone()),
                tablet_index: 0,
                destroyed_peer_id: s.meta.id,
                conf_index: 0,
                merge_state: None,
            },
        )?;
        // Durability boundary: from here on the target covers the source's range.
        self.engines.raft.write(&mut lb, true)?;
        // Now the CommitMerge itself counts as applied (unflushed, like any apply).
        let mut wb = WriteBatch::new();
        wb.set_apply_state(RaftApplyState {
            applied_index: index,
            applied_term: term,
            ..Default::default()
        });
        engine.write(&wb)?;
        let t = self.peers.get_mut(&target_id).expect("exists");
        t.finish_commit_merge(merged.clone(), engine, index, term, Ok(()));
        tracing::info!(
            store_id = self.id,
            region_id = target_id,
            source = source.id,
            index,
            "merge applied"
        );
        crate::metrics::MERGES.inc();
        self.destroy_peer(source.id)?;
        self.neighbours_stale = true;
        Ok(())
    }

    /// Local replicas of Regions prepared to merge into `target_id` whose whole range a
    /// snapshot of `target_id` covers: the snapshot was taken after the merge committed.
    pub(super) fn merge_sources_covered_by(
        &self,
        target_id: RegionId,
        snapshot: &raft::eraftpb::Snapshot,
    ) -> Vec<RegionId> {
        use prost::Message as _;
        let Ok(meta) = prkv_proto::serverpb::SnapshotMeta::decode(snapshot.data.as_ref()) else {
            return Vec::new();
        };
        let Some(region) = meta.region else {
            return Vec::new();
        };
        let covers = |r: &Region| {
            r.start_key >= region.start_key
                && (region.end_key.is_empty()
                    || (!r.end_key.is_empty() && r.end_key <= region.end_key))
        };
        self.peers
            .values()
            .filter(|p| {
                p.region_id() != target_id
                    && p.merge_state
                        .as_ref()
                        .and_then(|m| m.target.as_ref())
                        .is_some_and(|t| t.id == target_id)
                    && covers(&p.region)
            })
            .map(|p| p.region_id())
            .collect()
    }

    /// Brings this store's replica of the merge's source up to the PrepareMerge if it lags:
    /// entries up to the merge's `min_index` from its own log (every replica had matched them
    /// when the merge was prepared, so they are committed and this log holds them: it is never
    /// truncated above the tablet's durable apply index), the rest from the CommitMerge (the
    /// other replicas, and the source's leader, may be gone already).
    fn catch_up_source(&mut self, cmd: &CommitMerge) -> Result<()> {
        let source_id = cmd.source.as_ref().map_or(0, |r| r.id);
        let Some(s) = self.peers.get(&source_id) else {
            return Ok(());
        };
        let applied = s.applied_index;
        if applied >= cmd.commit {
            return Ok(());
        }
        let mut carried = Vec::new();
        for bytes in &cmd.entries {
            let mut e = raft::eraftpb::Entry::default();
            e.merge_from_bytes(bytes)
                .map_err(|e| Error::Storage(format!("CommitMerge entry: {e}")))?;
            if e.index > applied && e.index <= cmd.commit {
                carried.push(e);
            }
        }
        // The first index the CommitMerge carries: min_index + 1.
        let first_carried = cmd.commit + 1 - cmd.entries.len() as u64;
        let local = if applied + 1 < first_carried {
            let local = self
                .engines
                .raft
                .entries(source_id, applied + 1, first_carried, None)?;
            assert!(
                local.len() as u64 == first_carried - applied - 1,
                "store {}: Region {source_id} applied {applied}, its log lacks entries up to the merge's {}",
                self.id,
                first_carried - 1
            );
            local
        } else {
            Vec::new()
        };
        let mut entries = local;
        let from_log = entries.len();
        entries.extend(carried.iter().cloned());
        assert!(
            entries.first().is_some_and(|e| e.index == applied + 1)
                && entries.last().is_some_and(|e| e.index == cmd.commit)
                && entries.windows(2).all(|w| w[1].index == w[0].index + 1),
            "store {}: Region {source_id} applied {applied}, no gapless entries from there to the merge's {}",
            self.id,
            cmd.commit
        );
        tracing::info!(
            region_id = source_id,
            from = applied + 1,
            to = cmd.commit,
            from_log,
            "catching up the merge source"
        );
        // The log first, so that a restart finds every applied entry in it.
        if !carried.is_empty() {
            let mut lb = LogWriteBatch::new();
            lb.append(source_id, &carried)?;
            self.engines.raft.write(&mut lb, true)?;
        }
        self.apply(source_id, entries)?;
        Ok(())
    }
}

/// Copies every key of `source`'s range from its engine into `target`'s (partitioned mode).
fn copy_region_data(from: &dyn RegionEngine, to: &dyn RegionEngine, source: &Region) -> Result<()> {
    let snap = from.snapshot();
    let mut copied = 0u64;
    for cf in Cf::ALL {
        let mut wb = WriteBatch::new();
        let mut failed = None;
        snap.scan(
            cf,
            &source.start_key,
            &source.end_key,
            ScanDir::Forward,
            &mut |k, v| {
                wb.put(cf, k, v);
                copied += 1;
                if wb.data_bytes() >= MERGE_COPY_BATCH_BYTES {
                    if let Err(e) = to.write(&wb) {
                        failed = Some(e);
                        return false;
                    }
                    wb.clear();
                }
                true
            },
        )?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        if !wb.is_empty() {
            to.write(&wb)?;
        }
    }
    // The caller flushes: the copied keys must be on disk before the Region states say the
    // target holds them (the tablet has no WAL).
    tracing::debug!(
        source = source.id,
        keys = copied,
        "merge copied the source's keys"
    );
    Ok(())
}
