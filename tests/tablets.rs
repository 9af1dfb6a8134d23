//! The tablet registry under pressure: many tablets within a file-descriptor limit, and shared
//! memtable memory held to `rocksdb.write-buffer-limit`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prkv::config::{ReadableSize, RocksDbConfig};
use prkv::storage::tablet::TabletRegistry;
use prkv::storage::{Cf, KeyRange, RegionEngine, StoreEngine, WriteBatch};
use prkv_proto::serverpb::RaftApplyState;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

const TABLETS: u64 = 1000;

/// Child: opens 1,000 tablets at once (under the parent's `ulimit -n 4096`), writes and reads
/// each while all stay open; closes them (each flushes into an SST) and does it again, now with
/// an SST open per tablet: 4 descriptors per tablet (LOCK, MANIFEST, WAL, SST).
#[test]
#[ignore = "child process of many_tablets_fit_in_fd_limit"]
fn many_tablets_child() {
    let dir = std::path::PathBuf::from(std::env::var("PRKV_TABLETS_DIR").unwrap());
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    println!("limit {}", limit.rlim_cur);
    let config = RocksDbConfig {
        write_buffer_limit: ReadableSize::mib(256),
        write_buffer_size: ReadableSize::mib(1),
        block_cache_size: ReadableSize::mib(16),
        ..Default::default()
    };
    for pass in 0..2 {
        let registry = TabletRegistry::open(&dir, &config).unwrap();
        let before = open_fds();
        println!("pass {pass}: {before} fds open before opening tablets");
        let tablets: Vec<Arc<dyn RegionEngine>> = (1..=TABLETS)
            .map(|r| registry.open_region(r, KeyRange::all(), 0).unwrap())
            .collect();
        for t in &tablets {
            let mut wb = WriteBatch::new();
            wb.put(Cf::Default, b"key", &t.region_id().to_be_bytes());
            wb.set_apply_state(RaftApplyState {
                applied_index: pass + 1,
                ..Default::default()
            });
            t.write(&wb).unwrap();
        }
        if pass == 1 {
            // The first pass's data was flushed into one SST per tablet when it closed: it is
            // read back from there, with that SST held open in the tablet's table cache.
            for t in &tablets {
                assert_eq!(t.apply_state().unwrap().unwrap().applied_index, 2);
            }
        }
        for t in &tablets {
            assert_eq!(
                t.get(Cf::Default, b"key").unwrap().unwrap(),
                t.region_id().to_be_bytes()
            );
            assert!(
                registry.region(t.region_id()).is_some(),
                "every tablet stays open"
            );
        }
        let used = open_fds() - before;
        println!(
            "pass {pass}: {TABLETS} tablets open, {used} fds, {:.1} per tablet",
            used as f64 / TABLETS as f64
        );
    }
    let registry = TabletRegistry::open(&dir, &config).unwrap();
    assert_eq!(registry.list_regions().unwrap().len(), TABLETS as usize);
    println!("done");
}

#[test]
fn many_tablets_fit_in_fd_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::spawn_child(
        "many_tablets_child",
        &[("PRKV_TABLETS_DIR", dir.path().display().to_string())],
        Some("ulimit -n 4096"),
    );
    let mut out = common::child_stdout(&mut child);
    assert_eq!(common::wait_for_line(&mut out, "limit"), "limit 4096");
    println!(
        "{}",
        common::wait_for_line(&mut out, "pass 0: 1000 tablets open")
    );
    println!(
        "{}",
        common::wait_for_line(&mut out, "pass 1: 1000 tablets open")
    );
    common::wait_for_line(&mut out, "done");
    assert!(
        child.wait().unwrap().success(),
        "child failed: see its output above"
    );
}

fn registry(
    dir: &std::path::Path,
    limit_mib: u64,
    memtable_mib: u64,
    oldest_first: bool,
) -> TabletRegistry {
    let config = RocksDbConfig {
        write_buffer_limit: ReadableSize::mib(limit_mib),
        write_buffer_size: ReadableSize::mib(memtable_mib),
        write_buffer_flush_oldest_first: oldest_first,
        block_cache_size: ReadableSize::mib(16),
        max_background_jobs: 2,
        ..Default::default()
    };
    TabletRegistry::open(dir, &config).unwrap()
}

/// 200 tablets written concurrently under a 64MiB limit: the measured total never exceeds the
/// limit by more than one memtable.
#[test]
fn memtables_stay_within_write_buffer_limit() {
    const LIMIT: u64 = 64 << 20;
    const MEMTABLE: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let reg = Arc::new(registry(dir.path(), 64, 8, true));
    let tablets: Vec<Arc<dyn RegionEngine>> = (1..=200u64)
        .map(|r| reg.open_region(r, KeyRange::all(), 0).unwrap())
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (reg, done, max_seen) = (reg.clone(), done.clone(), max_seen.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !done.load(Ordering::Relaxed) {
                max_seen.fetch_max(reg.memtable_bytes(), Ordering::Relaxed);
                samples += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            samples
        })
    };
    // 8 writers, 25 tablets each, 512MiB in total: eight times the limit.
    let value = vec![0xabu8; 1024];
    std::thread::scope(|s| {
        for w in 0..8usize {
            let mine: Vec<_> = tablets.iter().skip(w).step_by(8).cloned().collect();
            let value = &value;
            s.spawn(move || {
                let mut wb = WriteBatch::new();
                for round in 0..80u64 {
                    for t in &mine {
                        wb.clear();
                        for i in 0..32u64 {
                            wb.put(Cf::Default, &(round * 32 + i).to_be_bytes(), value);
                        }
                        wb.set_apply_state(RaftApplyState {
                            applied_index: round + 1,
                            ..Default::default()
                        });
                        t.write(&wb).unwrap();
                    }
                }
            });
        }
    });
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let max = max_seen.load(Ordering::Relaxed);
    println!(
        "max memtable bytes {:.1}MiB over {samples} samples; limit 64MiB + one 8MiB memtable; {} controller flushes",
        max as f64 / (1 << 20) as f64,
        reg.flush_controller().flushes()
    );
    assert!(samples > 100);
    assert!(
        max > LIMIT / 2,
        "the load never approached the limit ({max}): the test proves nothing"
    );
    assert!(
        max <= LIMIT + MEMTABLE,
        "memtables reached {max} bytes, above {LIMIT} + {MEMTABLE}"
    );
    assert!(reg.flush_controller().flushes() > 0);
    // Every write is still readable.
    for t in &tablets {
        assert_eq!(t.apply_state().unwrap().unwrap().applied_index, 80);
        assert!(t
            .get(Cf::Default, &(80u64 * 32 - 1).to_be_bytes())
            .unwrap()
            .is_some());
    }
}

/// Writes `mib` MiB to one tablet.
fn fill(t: &dyn RegionEngine, mib: u64) {
    let value = vec![1u8; 4096];
    let mut wb = WriteBatch::new();
    for i in 0..mib * 256 {
        wb.put(Cf::Default, &i.to_be_bytes(), &value);
        if wb.len() == 64 {
            t.write(&wb).unwrap();
            wb.clear();
        }
    }
    if !wb.is_empty() {
        t.write(&wb).unwrap();
    }
}

/// With oldest-first, the first tablet flushed is the one written first, although it is the
/// smallest; with largest-first it is the largest.
#[test]
fn flush_victim_follows_policy() {
    for oldest_first in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        // Memtables of 64MiB never fill on their own: only the controller flushes.
        let reg = registry(dir.path(), 64, 64, oldest_first);
        let tablets: Vec<Arc<dyn RegionEngine>> = (1..=12u64)
            .map(|r| reg.open_region(r, KeyRange::all(), 0).unwrap())
            .collect();
        fill(tablets[0].as_ref(), 1); // oldest, smallest
        std::thread::sleep(Duration::from_millis(5));
        fill(tablets[1].as_ref(), 12); // largest
        for t in &tablets[2..] {
            fill(t.as_ref(), 4);
        }
        // 1 + 12 + 40 = 53MiB > 3/4 of 64MiB: the controller must have acted, or acts now.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reg.flush_controller().decisions().is_empty() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let first = reg
            .flush_controller()
            .decisions()
            .first()
            .cloned()
            .expect("no flush decision was taken");
        let want = if oldest_first { 1 } else { 2 };
        assert_eq!(
            first.region_id, want,
            "oldest_first={oldest_first}: {first:?}"
        );
    }
}

/// A new tablet generation replaces the old one (as after a snapshot or split): the registry
/// swaps to it, removes the old directory once nobody uses it, and on restart keeps only the
/// newest generation of each Region.
#[test]
fn swap_to_new_generation_and_clean_up() {
    let dir = tempfile::tempdir().unwrap();
    {
        let reg = registry(dir.path(), 64, 8, true);
        let old = reg.open_region(7, KeyRange::all(), 0).unwrap();
        let mut wb = WriteBatch::new();
        wb.put(Cf::Default, b"k", b"old");
        wb.set_apply_state(RaftApplyState {
            applied_index: 10,
            ..Default::default()
        });
        old.write(&wb).unwrap();
        // Build generation 10 from a checkpoint, then change it.
        old.checkpoint(&reg.tablet_path(7, 10)).unwrap();
        let new = reg.open_region(7, KeyRange::all(), 10).unwrap();
        assert_eq!(new.tablet_index(), 10);
        assert_eq!(new.apply_state().unwrap().unwrap().applied_index, 10);
        let mut wb = WriteBatch::new();
        wb.put(Cf::Default, b"k", b"new");
        new.write(&wb).unwrap();
        // The old handle still reads its own generation until dropped.
        assert_eq!(
            old.get(Cf::Default, b"k").unwrap().as_deref(),
            Some(&b"old"[..])
        );
        assert!(reg.tablet_path(7, 0).exists());
        drop(old);
        assert!(
            !reg.tablet_path(7, 0).exists(),
            "old generation removed once unused"
        );
        assert_eq!(reg.region(7).unwrap().tablet_index(), 10);
        // Opening an older generation than the open one is refused.
        assert!(reg.open_region(7, KeyRange::all(), 5).is_err());
        // A stale generation left behind by a crash mid-swap.
        std::fs::create_dir_all(reg.tablet_path(7, 3)).unwrap();
        std::fs::create_dir_all(dir.path().join("7_1.tomb")).unwrap();
    }
    let reg = registry(dir.path(), 64, 8, true);
    assert_eq!(reg.list_regions().unwrap(), vec![(7, 10)]);
    assert!(!reg.tablet_path(7, 3).exists() && !dir.path().join("7_1.tomb").exists());
    let t = reg.open_region(7, KeyRange::all(), 10).unwrap();
    assert_eq!(
        t.get(Cf::Default, b"k").unwrap().as_deref(),
        Some(&b"new"[..])
    );
}

/// A trim through an older, narrower view of a tablet (a queued background trim) after a merge
/// widened the tablet must not delete the keys the merge copied in: the widened range owns
/// them now.
#[test]
fn trim_through_stale_view_keeps_widened_keys() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path(), 64, 8, true);
    let range = |s: &[u8], e: &[u8]| KeyRange {
        start: s.to_vec(),
        end: e.to_vec(),
    };
    let narrow = reg.open_region(9, range(b"m", b""), 0).unwrap();
    // A key outside the narrow range, as a split parent leaves behind: garbage for `narrow`.
    let all = reg.open_region(9, KeyRange::all(), 0).unwrap();
    let mut wb = WriteBatch::new();
    wb.put(Cf::Default, b"a-garbage", b"x");
    all.write(&wb).unwrap();
    let narrow = {
        drop(narrow);
        reg.open_region(9, range(b"m", b""), 0).unwrap()
    };
    assert!(narrow.needs_trim().unwrap());
    // The merge: the tablet widens to [f, ∞) and takes the source's key.
    let wide = reg.open_region(9, range(b"f", b""), 0).unwrap();
    let mut wb = WriteBatch::new();
    wb.put(Cf::Default, b"g-merged", b"v");
    wide.write(&wb).unwrap();
    // The trim queued through the narrow view runs now.
    narrow.trim().unwrap();
    assert_eq!(
        wide.get(Cf::Default, b"g-merged").unwrap().as_deref(),
        Some(&b"v"[..]),
        "a stale view's trim deleted a merged key"
    );
    // The current view still trims what it does not own.
    assert!(wide.needs_trim().unwrap());
    wide.trim().unwrap();
    assert!(!wide.needs_trim().unwrap());
    assert_eq!(
        wide.get(Cf::Default, b"g-merged").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

/// The same race with the trim already running: it has deleted the narrow view's outside
/// ranges and is about to drop the SSTs lying wholly above the old range's end, when a merge
/// widens the tablet to the right and flushes the source's keys into it (an SST wholly above
/// the old end). The widening must wait for the trim (the owner lock): had it gone ahead, the
/// trim's file deletion would have dropped the merged keys with the garbage.
#[test]
fn merge_widening_waits_for_a_running_trim() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Arc::new(registry(dir.path(), 64, 8, true));
    let range = |s: &[u8], e: &[u8]| KeyRange {
        start: s.to_vec(),
        end: e.to_vec(),
    };
    // A split child [a, m) whose tablet still holds the parent's keys above m.
    let all = reg.open_region(11, KeyRange::all(), 0).unwrap();
    let mut wb = WriteBatch::new();
    wb.put(Cf::Default, b"b-own", b"v");
    wb.put(Cf::Default, b"x-garbage", b"x");
    all.write(&wb).unwrap();
    all.flush(true).unwrap();
    drop(all);
    let narrow = reg.open_region(11, range(b"a", b"m"), 0).unwrap();
    assert!(narrow.needs_trim().unwrap());
    // Hold the trim, on its own thread only, at its last step.
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let reached_tx = std::sync::Mutex::new(reached_tx);
    let go_rx = std::sync::Mutex::new(go_rx);
    fail::cfg_callback("trim_before_dropping_files", move || {
        if std::thread::current().name() == Some("trim-race") {
            let _ = reached_tx.lock().unwrap().send(());
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(30));
        }
    })
    .unwrap();
    let trimming = {
        let narrow = narrow.clone();
        std::thread::Builder::new()
            .name("trim-race".into())
            .spawn(move || narrow.trim())
            .unwrap()
    };
    reached_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the trim reaches its last step");
    // The merge: widen to [a, ∞), write the source's key above m, flush it into its own SST.
    let widened = Arc::new(AtomicBool::new(false));
    let merging = {
        let widened = widened.clone();
        let reg = reg.clone();
        std::thread::spawn(move || {
            let wide = reg.open_region(11, range(b"a", b""), 0).unwrap();
            widened.store(true, Ordering::SeqCst);
            let mut wb = WriteBatch::new();
            wb.put(Cf::Default, b"p-merged", b"v");
            wide.write(&wb).unwrap();
            wide.flush(true).unwrap();
            wide
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let widened_during_trim = widened.load(Ordering::SeqCst);
    go_tx.send(()).unwrap();
    trimming.join().unwrap().unwrap();
    let wide = merging.join().unwrap();
    fail::remove("trim_before_dropping_files");
    assert!(
        !widened_during_trim,
        "the tablet widened while a trim through its old range was running"
    );
    assert_eq!(
        wide.get(Cf::Default, b"p-merged").unwrap().as_deref(),
        Some(&b"v"[..]),
        "the trim dropped the merged key"
    );
    assert_eq!(
        wide.get(Cf::Default, b"b-own").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}
