//! Parked tablets (`storage::park`): idle tablets close, answer the Raftstore's questions from
//! their record, reopen on use with their data intact, and stay closed across a restart.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use prkv::config::{EngineKind, ReadableDuration, ReadableSize, RocksDbConfig};
use prkv::storage::park::RECORD;
use prkv::storage::tablet::TabletRegistry;
use prkv::storage::{Cf, KeyRange, RegionEngine, StoreEngine, WriteBatch};
use prkv_proto::serverpb::RaftApplyState;

fn config(idle: Duration, cap: usize) -> RocksDbConfig {
    RocksDbConfig {
        write_buffer_limit: ReadableSize::mib(64),
        write_buffer_size: ReadableSize::mib(4),
        block_cache_size: ReadableSize::mib(8),
        max_background_jobs: 2,
        tablet_idle_timeout: ReadableDuration(idle),
        max_open_tablets: cap,
        ..Default::default()
    }
}

/// Writes `n` keys `k000..` with values naming the Region, applied through `index`.
fn fill(t: &dyn RegionEngine, n: usize, index: u64) {
    let mut wb = WriteBatch::new();
    for i in 0..n {
        wb.put(
            Cf::Default,
            format!("k{i:03}").as_bytes(),
            format!("r{}v{i}", t.region_id()).as_bytes(),
        );
    }
    wb.set_apply_state(RaftApplyState {
        applied_index: index,
        applied_term: 5,
        ..Default::default()
    });
    t.write(&wb).unwrap();
}

fn check(t: &dyn RegionEngine, n: usize) {
    for i in 0..n {
        assert_eq!(
            t.get(Cf::Default, format!("k{i:03}").as_bytes()).unwrap(),
            Some(format!("r{}v{i}", t.region_id()).into_bytes()),
            "Region {} key {i}",
            t.region_id()
        );
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_record(registry: &TabletRegistry, region: u64) -> bool {
    registry.tablet_path(region, 0).join(RECORD).exists()
}

/// An idle tablet with unflushed writes is flushed and closed; size, keys and apply state come
/// from its record without opening it; a read opens it (and removes the record first).
#[test]
fn idle_tablet_parks_and_reopens_on_use() {
    let dir = tempfile::tempdir().unwrap();
    let registry = TabletRegistry::open(dir.path(), &config(Duration::from_millis(50), 0)).unwrap();
    let t = registry.open_region(1, KeyRange::all(), 0).unwrap();
    fill(t.as_ref(), 100, 7);
    assert_eq!(registry.tablet_counts(), (1, 0));
    // What a leader asks for its PD heartbeats, again and again, is not a use: it must not
    // keep the tablet open (a first version counted keys with a scan, which did).
    wait_until("the tablet parks", || {
        assert_eq!(t.count_keys(1024).unwrap(), 100);
        t.approximate_size().unwrap();
        t.approximate_keys().unwrap();
        t.persisted_apply_state().unwrap();
        t.is_parked()
    });
    assert_eq!(registry.tablet_counts(), (0, 1));
    assert_eq!(t.count_keys(1024).unwrap(), 100);
    assert_eq!(t.count_keys(10).unwrap(), 11, "more than the limit");
    assert!(has_record(&registry, 1));
    // Answered from the record: the tablet stays closed. Parked means flushed, so the durable
    // apply state is the latest.
    assert_eq!(t.apply_state().unwrap().unwrap().applied_index, 7);
    assert_eq!(t.persisted_apply_state().unwrap().unwrap().applied_index, 7);
    assert_eq!(
        t.approximate_keys().unwrap(),
        100,
        "counted exactly when small"
    );
    assert!(t.approximate_size().unwrap() > 0);
    assert!(!t.needs_trim().unwrap());
    assert_eq!(t.memtable_bytes(), 0);
    t.flush(true).unwrap();
    assert_eq!(registry.tablet_counts(), (0, 1), "metadata must not reopen");
    // A read reopens it, with its data.
    check(t.as_ref(), 100);
    assert!(!t.is_parked());
    assert!(
        !has_record(&registry, 1),
        "the record goes before the tablet opens"
    );
    assert_eq!(registry.tablet_counts(), (1, 0));
    // And a write after reopening is kept like any other.
    fill(t.as_ref(), 120, 8);
    wait_until("the tablet parks again", || t.is_parked());
    check(t.as_ref(), 120);
}

/// A parked tablet stays closed when the store restarts: its record stands in until first use.
#[test]
fn parked_tablet_stays_closed_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let registry =
            TabletRegistry::open(dir.path(), &config(Duration::from_millis(50), 0)).unwrap();
        for r in 1..=3 {
            let t = registry.open_region(r, KeyRange::all(), 0).unwrap();
            fill(t.as_ref(), 10, 10 + r);
        }
        wait_until("every tablet parks", || registry.tablet_counts() == (0, 3));
    }
    let registry = TabletRegistry::open(dir.path(), &config(Duration::from_secs(600), 0)).unwrap();
    let tablets: Vec<_> = (1..=3)
        .map(|r| registry.open_region(r, KeyRange::all(), 0).unwrap())
        .collect();
    assert_eq!(registry.tablet_counts(), (0, 3), "nothing opened at start");
    for t in &tablets {
        assert!(t.is_parked());
        assert_eq!(
            t.apply_state().unwrap().unwrap().applied_index,
            10 + t.region_id()
        );
    }
    check(tablets[1].as_ref(), 10);
    assert_eq!(
        registry.tablet_counts(),
        (1, 2),
        "only the tablet read opened"
    );
}

/// A tablet some reader holds (a snapshot) never closes under it.
#[test]
fn snapshot_keeps_tablet_open() {
    let dir = tempfile::tempdir().unwrap();
    let registry = TabletRegistry::open(dir.path(), &config(Duration::from_millis(1), 0)).unwrap();
    let t = registry.open_region(1, KeyRange::all(), 0).unwrap();
    fill(t.as_ref(), 10, 3);
    let snap = t.snapshot();
    for _ in 0..3 {
        registry.parker().run_once();
    }
    std::thread::sleep(Duration::from_millis(1200)); // a background round too
    assert!(!t.is_parked(), "parked under a live snapshot");
    assert_eq!(
        snap.get(Cf::Default, b"k003").unwrap(),
        Some(b"r1v3".to_vec())
    );
    drop(snap);
    wait_until("the tablet parks", || t.is_parked());
}

/// With no idle timeout, the cap alone parks, least recently used first.
#[test]
fn cap_parks_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let registry = TabletRegistry::open(dir.path(), &config(Duration::ZERO, 2)).unwrap();
    let tablets: Vec<_> = (1..=5)
        .map(|r| {
            let t = registry.open_region(r, KeyRange::all(), 0).unwrap();
            fill(t.as_ref(), 5, 1);
            t
        })
        .collect();
    // Use 4 and 2 last: they stay open. A tablet busy at the parker's round (a flush still
    // finishing) is skipped for the next least recently used one, as it should be; then the
    // two are used again and the next round gets it right.
    let mut open = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(5));
        check(tablets[3].as_ref(), 5);
        check(tablets[1].as_ref(), 5);
        wait_until("the cap holds", || registry.tablet_counts() == (2, 3));
        open = tablets
            .iter()
            .filter(|t| !t.is_parked())
            .map(|t| t.region_id())
            .collect();
        if open == [2, 4] {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(open, vec![2, 4]);
    for t in &tablets {
        check(t.as_ref(), 5);
    }
}

/// A split child keeps its parent's keys outside its range until trimmed. It parks all the
/// same (in a storm of splits, children held open until their trims would exhaust the file
/// descriptors), its record saying that it needs a trim, with the figures of its own range;
/// the trim reopens it, and it parks again trimmed.
#[test]
fn untrimmed_split_child_parks_and_remembers_its_trim() {
    let dir = tempfile::tempdir().unwrap();
    let registry = TabletRegistry::open(dir.path(), &config(Duration::from_millis(1), 0)).unwrap();
    let parent = registry.open_region(1, KeyRange::all(), 0).unwrap();
    fill(parent.as_ref(), 20, 4);
    let init = RaftApplyState {
        applied_index: 5,
        applied_term: 5,
        ..Default::default()
    };
    let children = registry
        .split_region(1, &[(2, KeyRange::new(b"k010".to_vec(), vec![]))], &init)
        .unwrap();
    let child = &children[0];
    wait_until("the untrimmed child parks", || child.is_parked());
    assert!(
        child.needs_trim().unwrap(),
        "its record says it needs a trim"
    );
    assert!(child.is_parked(), "asking did not reopen it");
    assert_eq!(
        child.approximate_keys().unwrap(),
        10,
        "the keys in its range"
    );
    child.trim().unwrap();
    assert!(!child.needs_trim().unwrap());
    wait_until("the trimmed child parks again", || child.is_parked());
    assert!(!child.needs_trim().unwrap());
    assert_eq!(
        child.approximate_keys().unwrap(),
        10,
        "the keys in its range"
    );
    assert_eq!(
        child.get(Cf::Default, b"k015").unwrap(),
        Some(b"r1v15".to_vec())
    );
}

/// Whole Regions: every replica of idle Regions parks; Raft ticks, log GC and heartbeats do not
/// reopen them; reads and writes do, with every acknowledged write intact, also after a crash
/// of a store whose tablets were parked.
#[test]
fn idle_regions_park_and_serve() {
    let mut c = Cluster::new(3, EngineKind::PartitionedRaftKv);
    c.cfg.rocksdb.tablet_idle_timeout = ReadableDuration::millis(300);
    c.bootstrap(4, &[1, 2, 3]);
    c.start();
    let key = |r: u64, i: u64| {
        let mut k = common::cluster::region_key(r);
        k.extend_from_slice(format!("/{i:03}").as_bytes());
        k
    };
    for r in 1..=4 {
        for i in 0..50 {
            c.must_put(&key(r, i), format!("{r}-{i}").as_bytes());
        }
    }
    let all_parked = |c: &Cluster| {
        (1..=3).all(|s| (1..=4).all(|r| c.kv[&s].region(r).is_some_and(|e| e.is_parked())))
    };
    wait_until("every replica parks", || all_parked(&c));
    // Idle Regions stay parked: nothing the store does on its own opens them.
    std::thread::sleep(Duration::from_secs(2));
    assert!(all_parked(&c), "an idle replica reopened");
    for s in 1..=3 {
        let records = count_records(&c.data_dir(s).join("tablets"));
        assert_eq!(records, 4, "store {s}: one PARKED record per tablet");
    }
    for r in 1..=4 {
        for i in (0..50).step_by(7) {
            assert_eq!(
                c.must_get(&key(r, i)),
                Some(format!("{r}-{i}").into_bytes())
            );
        }
    }
    // Writes reach every replica, reopening them.
    c.must_put(&key(2, 100), b"after");
    for s in 1..=3 {
        c.must_replicate(s, &key(2, 100), b"after");
    }
    // A crash of a store with parked tablets: they come back closed, and serve.
    wait_until("every replica parks again", || all_parked(&c));
    c.stop_store(1);
    c.start_store(1);
    for r in 1..=4 {
        for i in 0..50 {
            assert_eq!(
                c.local_get(1, &key(r, i)),
                Some(format!("{r}-{i}").into_bytes()),
                "store 1 lost Region {r} key {i}"
            );
        }
    }
    c.must_put(&key(3, 101), b"after restart");
    c.must_replicate(1, &key(3, 101), b"after restart");
}

fn count_records(tablets: &Path) -> usize {
    std::fs::read_dir(tablets)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join(RECORD).exists())
        .count()
}
