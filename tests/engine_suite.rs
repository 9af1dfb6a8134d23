//! One engine test suite, run against both engine kinds.
//!
//! Every behaviour the Raftstore relies on is checked here through the traits only, so a
//! difference between `partitioned-raft-kv` and `raft-kv` shows up as a failure in one of the
//! two instantiations at the bottom.

use std::sync::Arc;

use prkv::config::{Config, EngineKind, ReadableSize};
use prkv::storage::engine::Snapshot;
use prkv::storage::{Cf, Engines, KeyRange, RegionEngine, ScanDir, WriteBatch};
use prkv_proto::serverpb::RaftApplyState;

fn config(dir: &std::path::Path, kind: EngineKind) -> Config {
    let mut c = Config::default();
    c.storage.data_dir = dir.to_path_buf();
    c.storage.engine = kind;
    c.rocksdb.write_buffer_limit = ReadableSize::mib(64);
    c.rocksdb.write_buffer_size = ReadableSize::mib(8);
    c.rocksdb.block_cache_size = ReadableSize::mib(16);
    c
}

fn apply(index: u64) -> RaftApplyState {
    RaftApplyState {
        applied_index: index,
        ..Default::default()
    }
}

fn collect(
    e: &dyn RegionEngine,
    cf: Cf,
    start: &[u8],
    end: &[u8],
    dir: ScanDir,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    e.scan(cf, start, end, dir, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        true
    })
    .unwrap();
    out
}

fn snap_collect(s: &dyn Snapshot, cf: Cf) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    s.scan(cf, b"", b"", ScanDir::Forward, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        true
    })
    .unwrap();
    out
}

fn put_all(e: &dyn RegionEngine, pairs: &[(&[u8], &[u8])], index: u64) {
    let mut wb = WriteBatch::new();
    for (k, v) in pairs {
        wb.put(Cf::Default, k, v);
    }
    wb.set_apply_state(apply(index));
    e.write(&wb).unwrap();
}

fn kv(pairs: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

fn get_put_delete_and_column_families(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r = engines.kv.open_region(1, KeyRange::all(), 0).unwrap();
    let mut wb = WriteBatch::new();
    wb.put(Cf::Default, b"a", b"1");
    wb.put(Cf::Lock, b"a", b"lock");
    wb.put(Cf::Write, b"a", b"write");
    wb.put(Cf::Default, b"b", b"2");
    r.write(&wb).unwrap();
    assert_eq!(
        r.get(Cf::Default, b"a").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        r.get(Cf::Lock, b"a").unwrap().as_deref(),
        Some(&b"lock"[..])
    );
    assert_eq!(
        r.get(Cf::Write, b"a").unwrap().as_deref(),
        Some(&b"write"[..])
    );
    assert_eq!(r.get(Cf::Lock, b"b").unwrap(), None);
    let mut wb = WriteBatch::new();
    wb.delete(Cf::Default, b"a");
    r.write(&wb).unwrap();
    assert_eq!(r.get(Cf::Default, b"a").unwrap(), None);
    assert_eq!(
        r.get(Cf::Lock, b"a").unwrap().as_deref(),
        Some(&b"lock"[..]),
        "deletes stay in their cf"
    );
    // The empty key and binary keys are ordinary keys.
    put_all(r.as_ref(), &[(b"", b"empty"), (b"\x00\xff", b"bin")], 1);
    assert_eq!(
        r.get(Cf::Default, b"").unwrap().as_deref(),
        Some(&b"empty"[..])
    );
    assert_eq!(
        r.get(Cf::Default, b"\x00\xff").unwrap().as_deref(),
        Some(&b"bin"[..])
    );
}

fn scans_both_directions_with_bounds(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r = engines.kv.open_region(1, KeyRange::all(), 0).unwrap();
    put_all(
        r.as_ref(),
        &[(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"d", b"4")],
        1,
    );
    let all = kv(&[(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"d", b"4")]);
    assert_eq!(
        collect(r.as_ref(), Cf::Default, b"", b"", ScanDir::Forward),
        all
    );
    let mut rev = all.clone();
    rev.reverse();
    assert_eq!(
        collect(r.as_ref(), Cf::Default, b"", b"", ScanDir::Reverse),
        rev
    );
    assert_eq!(
        collect(r.as_ref(), Cf::Default, b"b", b"d", ScanDir::Forward),
        kv(&[(b"b", b"2"), (b"c", b"3")])
    );
    assert_eq!(
        collect(r.as_ref(), Cf::Default, b"b", b"d", ScanDir::Reverse),
        kv(&[(b"c", b"3"), (b"b", b"2")])
    );
    // Early stop.
    let mut n = 0;
    r.scan(Cf::Default, b"", b"", ScanDir::Forward, &mut |_, _| {
        n += 1;
        n < 2
    })
    .unwrap();
    assert_eq!(n, 2);
    // The apply state never shows up in a data scan.
    assert!(collect(r.as_ref(), Cf::Default, b"", b"", ScanDir::Forward)
        .iter()
        .all(|(k, _)| k.len() == 1));
}

fn region_ranges_are_enforced(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    // [b, d) and [d, +inf)
    let r1 = engines
        .kv
        .open_region(1, KeyRange::new(*b"b", *b"d"), 0)
        .unwrap();
    let r2 = engines
        .kv
        .open_region(2, KeyRange::new(*b"d", *b""), 0)
        .unwrap();
    put_all(r1.as_ref(), &[(b"b", b"1"), (b"c", b"2")], 1);
    put_all(r2.as_ref(), &[(b"d", b"3"), (b"z", b"4")], 1);
    let mut wb = WriteBatch::new();
    wb.put(Cf::Default, b"c", b"ok");
    wb.put(Cf::Default, b"d", b"outside");
    assert!(
        r1.write(&wb).is_err(),
        "a key outside the Region must be refused"
    );
    assert_eq!(
        r1.get(Cf::Default, b"c").unwrap().as_deref(),
        Some(&b"2"[..]),
        "a refused batch changes nothing"
    );
    assert!(r1.get(Cf::Default, b"a").is_err());
    assert_eq!(
        collect(r1.as_ref(), Cf::Default, b"", b"", ScanDir::Forward),
        kv(&[(b"b", b"1"), (b"c", b"2")])
    );
    assert_eq!(
        collect(r2.as_ref(), Cf::Default, b"", b"", ScanDir::Reverse),
        kv(&[(b"z", b"4"), (b"d", b"3")])
    );
    // Scans are clipped to the Region even when asked for more.
    assert_eq!(
        collect(r1.as_ref(), Cf::Default, b"a", b"zz", ScanDir::Forward).len(),
        2
    );
    assert_eq!(r1.apply_state().unwrap().unwrap().applied_index, 1);
    assert_eq!(r2.apply_state().unwrap().unwrap().applied_index, 1);
}

fn delete_range_stays_inside(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r1 = engines
        .kv
        .open_region(1, KeyRange::new(*b"", *b"m"), 0)
        .unwrap();
    let r2 = engines
        .kv
        .open_region(2, KeyRange::new(*b"m", *b""), 0)
        .unwrap();
    put_all(r1.as_ref(), &[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")], 1);
    put_all(r2.as_ref(), &[(b"m", b"4"), (b"n", b"5")], 1);
    let mut wb = WriteBatch::new();
    wb.delete_range(Cf::Default, b"b", b"");
    r1.write(&wb).unwrap();
    assert_eq!(
        collect(r1.as_ref(), Cf::Default, b"", b"", ScanDir::Forward),
        kv(&[(b"a", b"1")])
    );
    assert_eq!(
        collect(r2.as_ref(), Cf::Default, b"", b"", ScanDir::Forward).len(),
        2,
        "neighbour untouched"
    );
}

fn snapshots_are_stable(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r = engines.kv.open_region(1, KeyRange::all(), 0).unwrap();
    put_all(r.as_ref(), &[(b"a", b"1"), (b"b", b"2")], 1);
    let snap = r.snapshot();
    put_all(r.as_ref(), &[(b"a", b"changed"), (b"c", b"3")], 2);
    assert_eq!(
        snap.get(Cf::Default, b"a").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(snap.get(Cf::Default, b"c").unwrap(), None);
    assert_eq!(
        snap_collect(snap.as_ref(), Cf::Default),
        kv(&[(b"a", b"1"), (b"b", b"2")])
    );
    assert_eq!(
        r.get(Cf::Default, b"a").unwrap().as_deref(),
        Some(&b"changed"[..])
    );
    // A snapshot outlives the Region's handle.
    drop(r);
    assert_eq!(
        snap.get(Cf::Default, b"b").unwrap().as_deref(),
        Some(&b"2"[..])
    );
}

fn apply_state_round_trips_and_survives_reopen(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), kind);
    {
        let engines = Engines::open(&cfg).unwrap();
        let r = engines.kv.open_region(5, KeyRange::all(), 0).unwrap();
        assert_eq!(r.apply_state().unwrap(), None);
        put_all(r.as_ref(), &[(b"k", b"v")], 7);
        assert_eq!(r.apply_state().unwrap().unwrap().applied_index, 7);
        r.flush(true).unwrap();
        assert_eq!(r.persisted_apply_state().unwrap().unwrap().applied_index, 7);
        // Clean close.
    }
    let engines = Engines::open(&cfg).unwrap();
    assert_eq!(engines.kv.list_regions().unwrap(), vec![(5, 0)]);
    let r = engines.kv.open_region(5, KeyRange::all(), 0).unwrap();
    assert_eq!(r.apply_state().unwrap().unwrap().applied_index, 7);
    assert_eq!(
        r.get(Cf::Default, b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

fn apply_state_never_regresses(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r = engines.kv.open_region(1, KeyRange::all(), 0).unwrap();
    put_all(r.as_ref(), &[(b"a", b"1")], 10);
    put_all(r.as_ref(), &[(b"a", b"2")], 9);
}

fn approximate_size_and_keys(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r = engines
        .kv
        .open_region(1, KeyRange::new(*b"", *b"m"), 0)
        .unwrap();
    let other = engines
        .kv
        .open_region(2, KeyRange::new(*b"m", *b""), 0)
        .unwrap();
    // Incompressible values: the estimates measure bytes on disk.
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut value = vec![0u8; 1000];
    for batch in 0..10u64 {
        let mut wb = WriteBatch::new();
        for i in 0..100u64 {
            for b in value.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            wb.put(
                Cf::Default,
                format!("a{:06}", batch * 100 + i).as_bytes(),
                &value,
            );
        }
        wb.set_apply_state(apply(batch + 1));
        r.write(&wb).unwrap();
    }
    put_all(other.as_ref(), &[(b"n", b"small")], 1);
    r.flush(true).unwrap();
    other.flush(true).unwrap();
    let size = r.approximate_size().unwrap();
    let keys = r.approximate_keys().unwrap();
    // 1,000 keys of ~1KB: the estimates must be in the right order of magnitude.
    assert!(
        size > 100 << 10 && size < 4 << 20,
        "approximate size {size}"
    );
    assert!((500..=2000).contains(&keys), "approximate keys {keys}");
    assert!(other.approximate_size().unwrap() < size / 10);
}

fn checkpoint_is_openable(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r = engines
        .kv
        .open_region(1, KeyRange::new(*b"a", *b"x"), 0)
        .unwrap();
    put_all(r.as_ref(), &[(b"b", b"1"), (b"c", b"2")], 3);
    let cp = dir.path().join("checkpoint");
    r.checkpoint(&cp).unwrap();
    put_all(r.as_ref(), &[(b"d", b"after")], 4);
    // Open the checkpoint as a tablet of another store and read the Region back.
    let other = tempfile::tempdir().unwrap();
    let engines2 = Engines::open(&config(other.path(), EngineKind::PartitionedRaftKv)).unwrap();
    let target = other.path().join("tablets").join("1_3");
    std::fs::rename(&cp, &target).unwrap();
    let copy = engines2
        .kv
        .open_region(1, KeyRange::new(*b"a", *b"x"), 3)
        .unwrap();
    assert_eq!(
        collect(copy.as_ref(), Cf::Default, b"", b"", ScanDir::Forward),
        kv(&[(b"b", b"1"), (b"c", b"2")])
    );
    assert_eq!(copy.apply_state().unwrap().unwrap().applied_index, 3);
}

fn destroy_removes_region(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r1 = engines
        .kv
        .open_region(1, KeyRange::new(*b"", *b"m"), 0)
        .unwrap();
    let r2 = engines
        .kv
        .open_region(2, KeyRange::new(*b"m", *b""), 0)
        .unwrap();
    put_all(r1.as_ref(), &[(b"a", b"1")], 1);
    put_all(r2.as_ref(), &[(b"n", b"2")], 1);
    r1.flush(true).unwrap();
    let snap = r1.snapshot();
    drop(r1);
    engines.kv.destroy_region(1).unwrap();
    assert!(engines.kv.region(1).is_none());
    // A snapshot taken before keeps working until dropped.
    assert_eq!(
        snap.get(Cf::Default, b"a").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    drop(snap);
    let ids: Vec<_> = engines
        .kv
        .list_regions()
        .unwrap()
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_eq!(ids, vec![2]);
    if kind == EngineKind::PartitionedRaftKv {
        assert!(
            !dir.path().join("tablets/1_0").exists(),
            "tablet directory removed"
        );
    }
    let r1 = engines
        .kv
        .open_region(1, KeyRange::new(*b"", *b"m"), 0)
        .unwrap();
    assert_eq!(r1.get(Cf::Default, b"a").unwrap(), None);
    assert_eq!(r1.apply_state().unwrap(), None);
    assert_eq!(
        r2.get(Cf::Default, b"n").unwrap().as_deref(),
        Some(&b"2"[..])
    );
}

fn memtable_accounting(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let r = engines.kv.open_region(1, KeyRange::all(), 0).unwrap();
    let before = engines.kv.memtable_bytes();
    let value = vec![1u8; 4096];
    for i in 0..256u64 {
        let mut wb = WriteBatch::new();
        wb.put(Cf::Default, &i.to_be_bytes(), &value);
        r.write(&wb).unwrap();
    }
    assert!(
        r.memtable_bytes() >= 1 << 20,
        "one region's memtables: {}",
        r.memtable_bytes()
    );
    assert!(engines.kv.memtable_bytes() >= before + (1 << 20));
    assert_eq!(engines.kv.memtable_limit(), 64 << 20);
    r.flush(true).unwrap();
    assert!(
        r.memtable_bytes() < 1 << 20,
        "flushed: {}",
        r.memtable_bytes()
    );
}

fn concurrent_writers_on_many_regions(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::open(&config(dir.path(), kind)).unwrap();
    let regions: Vec<Arc<dyn RegionEngine>> = (0..16u8)
        .map(|i| {
            let end = if i == 15 { vec![] } else { vec![i + 1] };
            engines
                .kv
                .open_region(i as u64 + 1, KeyRange::new(vec![i], end), 0)
                .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for r in &regions {
            s.spawn(move || {
                let p = (r.region_id() - 1) as u8;
                for i in 0..200u64 {
                    let mut wb = WriteBatch::new();
                    let mut k = vec![p];
                    k.extend_from_slice(&i.to_be_bytes());
                    wb.put(Cf::Write, &k, &i.to_le_bytes());
                    wb.set_apply_state(apply(i + 1));
                    r.write(&wb).unwrap();
                }
            });
        }
    });
    for r in &regions {
        assert_eq!(
            collect(r.as_ref(), Cf::Write, b"", b"", ScanDir::Forward).len(),
            200
        );
        assert_eq!(r.apply_state().unwrap().unwrap().applied_index, 200);
    }
}

/// Instantiates every scenario above once per engine kind.
macro_rules! suite {
    ($module:ident, $kind:expr, [$($name:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $(#[test] fn $name() { super::$name($kind) })*
        }
    };
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        suite!(partitioned, EngineKind::PartitionedRaftKv, [$($name),*]);
        suite!(raft_kv, EngineKind::RaftKv, [$($name),*]);
    };
}

both!(
    get_put_delete_and_column_families,
    scans_both_directions_with_bounds,
    region_ranges_are_enforced,
    delete_range_stays_inside,
    snapshots_are_stable,
    apply_state_round_trips_and_survives_reopen,
    approximate_size_and_keys,
    checkpoint_is_openable,
    destroy_removes_region,
    memtable_accounting,
    concurrent_writers_on_many_regions
);

mod regressions {
    use super::*;
    #[test]
    #[should_panic(expected = "apply state goes backwards")]
    fn apply_state_never_regresses_partitioned() {
        super::apply_state_never_regresses(EngineKind::PartitionedRaftKv)
    }
    #[test]
    #[should_panic(expected = "apply state goes backwards")]
    fn apply_state_never_regresses_raft_kv() {
        super::apply_state_never_regresses(EngineKind::RaftKv)
    }
}
