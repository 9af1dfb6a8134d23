//! Region merge on the in-process cluster, for both engine kinds: merge on request (either
//! side), data on every replica, a lagging replica caught up from the CommitMerge, a rollback
//! when the target changes first, a leader change in the middle, and crashes afterwards.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use prkv::config::EngineKind;
use prkv::raftstore::{Error, StoreMsg, Verdict};
use prkv::storage::{Cf, ScanDir};

fn key(i: usize) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

/// What store `s`'s engine of `region_id` holds (clipped to the Region's range).
fn replica_keys(c: &Cluster, s: u64, region_id: u64) -> Vec<Vec<u8>> {
    let engine = c.kv[&s].region(region_id).expect("engine of the Region");
    let mut out = Vec::new();
    engine
        .scan(Cf::Default, &[], &[], ScanDir::Forward, &mut |k, _| {
            out.push(k.to_vec());
            true
        })
        .unwrap();
    out
}

/// Waits until store `s`'s replica of `region_id` holds exactly `want`.
fn must_hold(c: &Cluster, s: u64, region_id: u64, want: &[Vec<u8>]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = c.kv.get(&s).and_then(|kv| kv.region(region_id)).is_some();
        if have && replica_keys(c, s, region_id) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "store {s}'s replica of Region {region_id} never held the {} expected keys (has {})",
            want.len(),
            if have {
                replica_keys(c, s, region_id).len()
            } else {
                0
            }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drops every message of `region_id` to or from `store` (a filter named
/// `cut-<region>-on-<store>`).
fn cut_region_on_store(c: &Cluster, region_id: u64, store: u64) {
    c.net.add_filter(
        &format!("cut-{region_id}-on-{store}"),
        Arc::new(move |m| {
            if m.region_id == region_id && (m.to_store == store || m.from_store == store) {
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }),
    );
}

/// Three Regions [.., k30) [k30, k60) [k60, ..) with keys 0..90.
fn three_regions(kind: EngineKind) -> Cluster {
    three_regions_with(kind, |_| {})
}

fn three_regions_with(kind: EngineKind, tweak: impl FnOnce(&mut prkv::config::Config)) -> Cluster {
    let mut c = Cluster::new(3, kind);
    tweak(&mut c.cfg);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    for i in 0..90 {
        c.must_put(&key(i), b"v1");
    }
    let regions = c.must_split(1, &[&key(30), &key(60)]);
    assert_eq!(regions.len(), 3);
    c
}

/// A write through the leader of the Region holding `key`, with the epoch we know.
fn try_put(c: &Cluster, key: &[u8]) -> Result<(), Error> {
    let r = c.region_for_key(key).clone();
    let Some(s) = c.leader_store(r.id) else {
        return Err(Error::NotLeader {
            region_id: r.id,
            leader: None,
        });
    };
    c.put_on(s, key, b"v2")
}

/// Merge the middle Region into the left one (the source follows its target), then the result
/// into the right one (the source precedes it): every key stays, every replica of the merged
/// Region holds all of them, the sources are gone everywhere and stay gone after a crash of
/// every store.
fn merge_on_request(kind: EngineKind) {
    let mut c = three_regions(kind);
    let (left, mid, right) = (
        c.regions[0].clone(),
        c.regions[1].clone(),
        c.regions[2].clone(),
    );
    c.must_merge(mid.id, left.id);
    let merged = c.regions.iter().find(|r| r.id == left.id).unwrap().clone();
    assert_eq!(merged.end_key, key(60));
    let (lv, mv) = (
        left.region_epoch.unwrap().version,
        mid.region_epoch.unwrap().version,
    );
    assert!(merged.region_epoch.unwrap().version > lv.max(mv));
    let want: Vec<Vec<u8>> = (0..60).map(key).collect();
    for s in 1..=3 {
        must_hold(&c, s, left.id, &want);
        assert!(
            c.kv[&s].region(mid.id).is_none(),
            "store {s} kept the source's engine"
        );
    }
    // The merged Region takes writes over the source's old range.
    c.must_put(&key(45), b"v2");
    assert_eq!(c.must_get(&key(45)).as_deref(), Some(&b"v2"[..]));
    c.must_merge(left.id, right.id);
    assert_eq!(c.regions.len(), 1);
    let merged = c.regions[0].clone();
    assert_eq!(merged.id, right.id);
    assert!(merged.start_key.is_empty() && merged.end_key.is_empty());
    let want: Vec<Vec<u8>> = (0..90).map(key).collect();
    for s in 1..=3 {
        must_hold(&c, s, right.id, &want);
    }
    // A crash of every store: the merges are on disk, the sources do not come back.
    for s in 1..=3 {
        c.stop_store(s);
    }
    for s in 1..=3 {
        c.start_store(s);
    }
    for i in 0..90 {
        let v: &[u8] = if i == 45 { b"v2" } else { b"v1" };
        assert_eq!(c.must_get(&key(i)).as_deref(), Some(v), "key {i}");
    }
    for s in 1..=3 {
        assert!(c.status(s, mid.id).is_none() && c.status(s, left.id).is_none());
        must_hold(&c, s, right.id, &want);
    }
    c.must_put(&key(89), b"v3");
}

/// A replica of the source that missed the last writes (its store was down) catches up from
/// the entries the CommitMerge carries: the source's other replicas are gone by then.
fn lagging_replica_catches_up(kind: EngineKind) {
    // No log GC: store 3's replica must still be within the log when the merge is prepared
    // (otherwise it needs a snapshot first, and the merge is refused until it has one).
    let mut c = three_regions_with(kind, |cfg| cfg.raftstore.raft_log_gc_threshold = 100_000);
    let (left, mid) = (c.regions[0].clone(), c.regions[1].clone());
    // The source's leader (not on store 3, which goes down) must have heard from store 3's
    // replica in its term: a leader knows nothing of a replica it never heard from, and a
    // merge waits for it.
    c.must_transfer_leader(mid.id, 1);
    c.must_transfer_leader(left.id, 1);
    c.must_put(&key(30), b"v1");
    c.must_replicate(3, &key(30), b"v1");
    std::thread::sleep(Duration::from_millis(300));
    c.stop_store(3);
    for i in 30..40 {
        c.must_put(&key(i), b"v2");
    }
    c.must_prepare_merge(mid.id, left.id);
    c.must_merged(mid.id, left.id, 1);
    c.start_store(3);
    let want: Vec<Vec<u8>> = (0..60).map(key).collect();
    must_hold(&c, 3, left.id, &want);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status(3, mid.id).is_some() {
        assert!(Instant::now() < deadline, "store 3 kept the source");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Store 3's copy has the writes it missed: read it alone.
    let engine = c.kv[&3].region(left.id).unwrap();
    for i in 30..40 {
        assert_eq!(
            engine.get(Cf::Default, &key(i)).unwrap().as_deref(),
            Some(&b"v2"[..]),
            "key {i} on store 3"
        );
    }
}

/// Waits (up to 30 s) until the Region holding `key` takes a write again: a source rolled back.
fn must_take_a_write_again(c: &mut Cluster, key: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.refresh_regions(2);
        if try_put(c, key).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "the source never rolled back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The target splits after the source prepared its merge (its replica on the source leader's
/// store cut off meanwhile, so no CommitMerge gets in first): the source rolls back and takes
/// writes again; no replica of the target took the source in.
fn rollback_when_target_changes(kind: EngineKind) {
    let mut c = three_regions(kind);
    let (left, mid) = (c.regions[0].clone(), c.regions[1].clone());
    c.must_transfer_leader(mid.id, 1);
    c.must_transfer_leader(left.id, 2);
    // Store 1's replica of the target hears nothing: it can neither lead nor see the split.
    cut_region_on_store(&c, left.id, 1);
    c.must_prepare_merge(mid.id, left.id);
    // Writes to the frozen source are refused meanwhile.
    match try_put(&c, &key(35)) {
        Err(Error::ProposalInMergingMode(id)) => assert_eq!(id, mid.id),
        other => panic!("a merging Region took a write: {other:?}"),
    }
    c.must_split(left.id, &[&key(10)]);
    c.net.remove_filter(&format!("cut-{}-on-1", left.id));
    // The source rolls back: it takes writes again, with a new version.
    must_take_a_write_again(&mut c, &key(35));
    let now = c.regions.iter().find(|r| r.id == mid.id).unwrap();
    assert_eq!(
        now.region_epoch.unwrap().version,
        mid.region_epoch.unwrap().version + 2,
        "prepare and rollback each bump the version"
    );
    for s in 1..=3 {
        let want: Vec<Vec<u8>> = (30..60).map(key).collect();
        must_hold(&c, s, mid.id, &want);
        let want: Vec<Vec<u8>> = (0..10).map(key).collect();
        must_hold(&c, s, left.id, &want);
    }
    assert_eq!(c.must_get(&key(35)).as_deref(), Some(&b"v2"[..]));
}

/// The source's leader learns that the target moved on only from a snapshot (its replica of
/// the target was cut off while the target split and compacted its log). That proves nothing:
/// a snapshot can hide a CommitMerge its receiver never applied. So the source stays frozen
/// while no replica that applied the target's log can answer (the rollback queries are
/// dropped), and rolls back once one does. Before, it rolled back at once on the snapshot's
/// word.
fn rollback_waits_for_a_witness(kind: EngineKind) {
    let mut c = three_regions(kind);
    let (left, mid) = (c.regions[0].clone(), c.regions[1].clone());
    c.must_transfer_leader(mid.id, 1);
    c.must_transfer_leader(left.id, 2);
    cut_region_on_store(&c, left.id, 1);
    c.must_prepare_merge(mid.id, left.id);
    let frozen = c.status(1, mid.id).unwrap().region.region_epoch.unwrap();
    let behind = c.status(1, left.id).unwrap().applied_index;
    c.must_split(left.id, &[&key(10)]);
    // The target's log is compacted past store 1's replica: only a snapshot brings it back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tl = c.must_leader(left.id);
        if c.status(tl, left.id).unwrap().truncated_index > behind {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target's log was never compacted"
        );
        c.must_put(&key(1), b"again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let split = c.status(2, left.id).unwrap().region.region_epoch.unwrap();
    c.net.add_filter(
        "no-rollback-talk",
        Arc::new(|m| {
            if m.merge_rollback.is_some() {
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }),
    );
    c.net.remove_filter(&format!("cut-{}-on-1", left.id));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .status(1, left.id)
        .unwrap()
        .region
        .region_epoch
        .unwrap()
        .version
        < split.version
    {
        assert!(
            Instant::now() < deadline,
            "store 1's replica of the target never caught up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let hold = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hold {
        for s in 1..=3 {
            let now = c.status(s, mid.id).unwrap().region.region_epoch.unwrap();
            assert_eq!(
                now, frozen,
                "store {s}: the source changed (rolled back) on a snapshot's word"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.net.remove_filter("no-rollback-talk");
    must_take_a_write_again(&mut c, &key(35));
    for s in 1..=3 {
        let want: Vec<Vec<u8>> = (30..60).map(key).collect();
        must_hold(&c, s, mid.id, &want);
    }
}

/// The source's leader moves right after the PrepareMerge: the new leader finishes the merge;
/// then a store crashes right after and recovers the merged Region.
fn merge_survives_leader_change(kind: EngineKind) {
    let mut c = three_regions(kind);
    let (left, mid) = (c.regions[0].clone(), c.regions[1].clone());
    c.must_transfer_leader(mid.id, 1);
    c.must_transfer_leader(left.id, 1);
    // Store 1 cannot reach its target replica's peers: the merge cannot commit from there.
    cut_region_on_store(&c, left.id, 1);
    c.must_prepare_merge(mid.id, left.id);
    // The source's leadership moves to store 2, which drives the merge from there.
    let s2 = c.status(2, mid.id).unwrap().peer;
    let leader = c.must_leader(mid.id);
    c.stores[&leader]
        .router
        .try_send(StoreMsg::TransferLeader {
            region_id: mid.id,
            to: s2,
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.status(2, mid.id).is_some() {
        assert!(
            Instant::now() < deadline,
            "the merge never committed on store 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.net.remove_filter(&format!("cut-{}-on-1", left.id));
    c.must_merged(mid.id, left.id, 2);
    c.restart_store(2);
    let want: Vec<Vec<u8>> = (0..60).map(key).collect();
    for s in 1..=3 {
        must_hold(&c, s, left.id, &want);
    }
    for i in 0..60 {
        assert_eq!(c.must_get(&key(i)).as_deref(), Some(&b"v1"[..]), "key {i}");
    }
}

/// The store holding both leaders crashes right after the PrepareMerge, before it could make
/// the CommitMerge: the other stores elect new leaders and finish the merge. The crashed store
/// comes back with its memtables lost; its frozen source replica catches up and gives way to
/// the merged target, whose every replica holds exactly the keys.
fn merge_survives_target_store_crash(kind: EngineKind) {
    let mut c = three_regions(kind);
    let (left, mid) = (c.regions[0].clone(), c.regions[1].clone());
    c.must_transfer_leader(mid.id, 1);
    c.must_transfer_leader(left.id, 1);
    // Writes the crash takes out of store 1's memtables: it must replay them from its log.
    for i in 30..40 {
        c.must_put(&key(i), b"v2");
    }
    cut_region_on_store(&c, left.id, 1);
    c.must_prepare_merge(mid.id, left.id);
    c.stop_store(1);
    c.net.remove_filter(&format!("cut-{}-on-1", left.id));
    c.must_merged(mid.id, left.id, 2);
    c.start_store(1);
    let want: Vec<Vec<u8>> = (0..60).map(key).collect();
    for s in 1..=3 {
        must_hold(&c, s, left.id, &want);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status(1, mid.id).is_some() {
        assert!(Instant::now() < deadline, "store 1 kept the source");
        std::thread::sleep(Duration::from_millis(50));
    }
    let engine = c.kv[&1].region(left.id).unwrap();
    for i in 0..60 {
        let want = if (30..40).contains(&i) { "v2" } else { "v1" };
        assert_eq!(
            engine.get(Cf::Default, &key(i)).unwrap().as_deref(),
            Some(want.as_bytes()),
            "key {i} on store 1"
        );
    }
    c.must_put(&key(35), b"v3");
    assert_eq!(c.must_get(&key(35)).as_deref(), Some(&b"v3"[..]));
}

/// The target's leadership moves while a merge waits to commit (the source's leader cannot
/// reach the target's replicas yet): the merge completes once they can talk.
fn merge_survives_target_leader_change(kind: EngineKind) {
    let mut c = three_regions(kind);
    let (left, mid) = (c.regions[0].clone(), c.regions[1].clone());
    c.must_transfer_leader(mid.id, 1);
    c.must_transfer_leader(left.id, 2);
    cut_region_on_store(&c, left.id, 1);
    c.must_prepare_merge(mid.id, left.id);
    std::thread::sleep(Duration::from_millis(700));
    c.must_transfer_leader(left.id, 3);
    // Still not merged: the CommitMerge is made where the source leads, on store 1.
    assert!(c.status(1, mid.id).is_some());
    c.net.remove_filter(&format!("cut-{}-on-1", left.id));
    c.must_merged(mid.id, left.id, 3);
    let want: Vec<Vec<u8>> = (0..60).map(key).collect();
    for s in 1..=3 {
        must_hold(&c, s, left.id, &want);
    }
    c.must_put(&key(45), b"v3");
    assert_eq!(c.must_get(&key(45)).as_deref(), Some(&b"v3"[..]));
}

/// The last Region merges into the first of two: the merged Region is the whole key space.
/// (Both have an empty key at their outer end; the merge once took the source for the
/// target's left neighbour and made an empty Region, and every store stopped. Found by the
/// nemesis.)
fn last_merges_into_first(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    for i in 0..60 {
        c.must_put(&key(i), b"v1");
    }
    let regions = c.must_split(1, &[&key(30)]);
    let (first, last) = (regions[0].clone(), regions[1].clone());
    assert!(first.start_key.is_empty() && last.end_key.is_empty());
    c.must_merge(last.id, first.id);
    let merged = c.region_for_key(&key(45)).clone();
    assert_eq!(merged.id, first.id);
    assert!(merged.start_key.is_empty() && merged.end_key.is_empty());
    let want: Vec<Vec<u8>> = (0..60).map(key).collect();
    for s in 1..=3 {
        must_hold(&c, s, first.id, &want);
    }
    c.must_put(&key(75), b"v2");
    assert_eq!(c.must_get(&key(75)).as_deref(), Some(&b"v2"[..]));
}

/// Merges that cannot be made are refused with a typed error and change nothing.
fn bad_merges_are_refused(kind: EngineKind) {
    let c = three_regions(kind);
    let (left, right) = (c.regions[0].clone(), c.regions[2].clone());
    let s = c.must_leader(left.id);
    let (tx, rx) = std::sync::mpsc::channel();
    c.stores[&s]
        .router
        .try_send(StoreMsg::PrepareMerge {
            region_id: left.id,
            target_id: right.id,
            cb: Box::new(move |r| drop(tx.send(r))),
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Err(Error::InvalidMerge(_)) => {}
        other => panic!("a merge of non-adjacent Regions: {other:?}"),
    }
    c.must_put(&key(5), b"v2");
}

/// A replica of the source lags by more than one CommitMerge can carry (each of its missed
/// entries a large write): the PrepareMerge is refused, where before it was taken, froze the
/// source, and left a CommitMerge over `raftstore.raft-entry-max-size` that could never be
/// proposed: the merge waited for ever. Once the replica catches up, the merge goes through.
fn merge_too_large_to_carry_is_refused_until_the_replica_catches_up(kind: EngineKind) {
    use raft::eraftpb::MessageType;
    let mut c = three_regions_with(kind, |cfg| {
        cfg.raftstore.raft_entry_max_size = prkv::config::ReadableSize::kib(64);
        cfg.raftstore.raft_log_gc_threshold = 100_000;
    });
    let (left, mid) = (c.regions[0].clone(), c.regions[1].clone());
    c.must_transfer_leader(mid.id, 1);
    c.must_transfer_leader(left.id, 1);
    c.must_put(&key(30), b"v1");
    c.must_replicate(3, &key(30), b"v1");
    // Store 3's replica of the source stops acknowledging appends; heartbeats still flow, so
    // its leader keeps counting it (its `matched` stays behind).
    c.net.add_filter(
        "lag",
        Arc::new(move |m| {
            if m.region_id == mid.id
                && m.from_store == 3
                && m.message.msg_type == MessageType::MsgAppendResponse
            {
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }),
    );
    let big = vec![b'x'; 20 << 10];
    for i in 31..41 {
        c.must_put(&key(i), &big);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    c.stores[&1]
        .router
        .try_send(StoreMsg::PrepareMerge {
            region_id: mid.id,
            target_id: left.id,
            cb: Box::new(move |r| drop(tx.send(r))),
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Err(Error::InvalidMerge(why)) => assert!(why.contains("would not fit"), "{why}"),
        other => panic!("a merge whose CommitMerge could not be proposed: {other:?}"),
    }
    c.must_put(&key(31), b"v2"); // the source still takes writes
    c.net.remove_filter("lag");
    c.must_replicate(3, &key(31), b"v2");
    c.must_prepare_merge(mid.id, left.id);
    c.must_merged(mid.id, left.id, 1);
    for s in 1..=3 {
        c.must_replicate(s, &key(31), b"v2");
        c.must_replicate(s, &key(40), &big);
    }
}

macro_rules! both_kinds {
    ($($name:ident),*) => {
        mod partitioned {
            use prkv::config::EngineKind::PartitionedRaftKv as K;
            $(#[test] fn $name() { super::$name(K) })*
        }
        mod raft_kv {
            use prkv::config::EngineKind::RaftKv as K;
            $(#[test] fn $name() { super::$name(K) })*
        }
    };
}

both_kinds!(
    merge_on_request,
    lagging_replica_catches_up,
    rollback_when_target_changes,
    rollback_waits_for_a_witness,
    merge_survives_leader_change,
    merge_survives_target_store_crash,
    merge_survives_target_leader_change,
    last_merges_into_first,
    bad_merges_are_refused,
    merge_too_large_to_carry_is_refused_until_the_replica_catches_up
);
