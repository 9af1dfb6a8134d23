//! Crashes at crash points on the in-process cluster, where a scenario needs more control than
//! the process-level `crash_points.rs` gives (a follower that lags far enough to need a
//! snapshot, a trim paused at its worst moment).
//!
//! `fail` points are process-wide, so the tests of this file run one at a time, and a crash is
//! a panic in one named store thread only (`crash_in`): the thread unwinds, its engines close
//! without flushing (the harness turns flush-on-close off, so a crash loses what it would), and
//! the test restarts the store from its data directory.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use prkv::config::EngineKind;

static SERIAL: Mutex<()> = Mutex::new(());

fn key(i: usize) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

/// Arms `point` to panic the thread named `thread` (a store's loop is `store-<id>`) the first
/// time that thread passes it.
fn crash_in(point: &'static str, thread: &'static str) {
    let fired = std::sync::atomic::AtomicBool::new(false);
    fail::cfg_callback(point, move || {
        if std::thread::current().name() == Some(thread)
            && !fired.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("crash point {point} reached in {thread}");
        }
    })
    .unwrap();
}

/// A follower cut off long enough that the leader's log no longer holds what it lacks gets a
/// snapshot, and crashes just after the install's first raft-engine write. It must restart and
/// catch up, keeping its Raft state. (When the install wrote twice, cleaning the old log, then
/// the new state, a crash between the two left neither a Region state nor a HardState: the
/// replica came back empty, and the leader's next heartbeat named a commit index far past its
/// empty log, which raft-rs refuses with a panic, at every restart.)
/// A follower (store 3) cut off until the leader's log no longer holds what it lacks, then
/// crashed just after its snapshot install's first raft-engine write. Returns with store 3's
/// thread gone and the crash point disarmed.
fn follower_crashed_installing_a_snapshot(kind: EngineKind) -> Cluster {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(&key(0), b"v");
    c.must_transfer_leader(1, 1);
    c.must_replicate(3, &key(0), b"v");
    c.isolate(3);
    for i in 1..300 {
        c.must_put(&key(i), b"v");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status(1, 1).map_or(0, |s| s.truncated_index) < 100 {
        assert!(
            Instant::now() < deadline,
            "the leader's log was never compacted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    crash_in("snapshot_install_after_applying_state", "store-3");
    c.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The store thread is gone once its inbox has no receiver.
    let alive = |c: &Cluster| {
        !matches!(
            c.stores[&3]
                .router
                .try_send(prkv::raftstore::StoreMsg::QueryRegion {
                    region_id: 1,
                    cb: Box::new(|_| ()),
                }),
            Err(prkv::raftstore::Error::StoreStopped)
        )
    };
    while alive(&c) {
        assert!(
            Instant::now() < deadline,
            "store 3 never installed the snapshot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fail::remove("snapshot_install_after_applying_state");
    c
}

fn lagging_follower_crashes_installing_a_snapshot(kind: EngineKind) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = follower_crashed_installing_a_snapshot(kind);
    c.restart_store(3);
    for i in 0..300 {
        c.must_replicate(3, &key(i), b"v");
    }
    c.must_put(b"after", b"crash");
    c.must_replicate(3, b"after", b"crash");
}

/// The same crash, and then the received files are gone (removed by hand, lost with a disk):
/// the restart must not record the snapshot's index over data it does not have. It used to
/// (the replica then served its old data, or nothing, as if it were the snapshot's); now the
/// replica is refused as damaged, for PD to rebuild, and the others go on.
fn interrupted_install_without_its_files_is_refused(kind: EngineKind) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = follower_crashed_installing_a_snapshot(kind);
    c.stop_store(3);
    let recv = c.data_dir(3).join("snap").join("recv");
    let removed = std::fs::read_dir(&recv).map_or(0, |d| d.count());
    assert!(removed > 0, "no received snapshot in {}", recv.display());
    std::fs::remove_dir_all(&recv).unwrap();
    c.start_store(3);
    std::thread::sleep(Duration::from_millis(500));
    let held = (0..300)
        .filter(|i| c.local_get(3, &key(*i)).is_some())
        .count();
    assert!(
        c.status(3, 1).is_none() || held == 300,
        "store 3 serves Region 1 with {held} of its 300 keys"
    );
    c.must_put(b"after", b"crash");
}

mod partitioned {
    #[test]
    fn lagging_follower_crashes_installing_a_snapshot() {
        super::lagging_follower_crashes_installing_a_snapshot(super::EngineKind::PartitionedRaftKv)
    }

    #[test]
    fn interrupted_install_without_its_files_is_refused() {
        super::interrupted_install_without_its_files_is_refused(
            super::EngineKind::PartitionedRaftKv,
        )
    }
}

mod raft_kv {
    #[test]
    fn lagging_follower_crashes_installing_a_snapshot() {
        super::lagging_follower_crashes_installing_a_snapshot(super::EngineKind::RaftKv)
    }

    #[test]
    fn interrupted_install_without_its_files_is_refused() {
        super::interrupted_install_without_its_files_is_refused(super::EngineKind::RaftKv)
    }
}

/// Split checks queued behind a busy region worker must not hold their tablets open. In a
/// storm of splits the worker falls behind (each trim takes tens of milliseconds) while every
/// written Region queues a check; a check used to carry a snapshot taken when it was queued,
/// and each snapshot pinned its tablet open: on a store under `ulimit -n 1024`, 110 tablets
/// were open against a cap of 35 and the store ran out of descriptors (`tests/fd_budget.rs`).
/// Here the worker is held while 40 written Regions are checked: the parker must bring the
/// open tablets back to the cap.
#[test]
fn queued_split_checks_do_not_pin_tablets_open() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const REGIONS: u64 = 40;
    const CAP: usize = 8;
    let mut c = Cluster::new(1, EngineKind::PartitionedRaftKv);
    c.cfg.rocksdb.max_open_tablets = CAP;
    c.cfg.raftstore.split_region_check_tick_interval = prkv::config::ReadableDuration::millis(50);
    c.cfg.raftstore.region_split_check_diff = prkv::config::ReadableSize(1);
    // Checks run, but never find a split.
    c.cfg.coprocessor.region_split_keys = 1_000_000;
    c.cfg.coprocessor.region_max_keys = 1_500_000;
    c.bootstrap(REGIONS, &[1]);
    c.start();
    fail::cfg("region_worker_before_job", "pause").unwrap();
    for r in 1..=REGIONS {
        let mut k = common::cluster::region_key(r);
        k.extend_from_slice(b"/x");
        c.must_put(&k, b"v");
    }
    let open = |c: &Cluster| {
        (1..=REGIONS)
            .filter(|r| c.kv[&1].region(*r).is_some_and(|e| !e.is_parked()))
            .count()
    };
    // Let every Region's check be queued, then give the parker a few rounds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now_open = open(&c);
    while now_open > CAP + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now_open = open(&c);
    }
    fail::remove("region_worker_before_job");
    assert!(
        now_open <= CAP + 1,
        "{now_open} tablets open with the worker held, cap {CAP}"
    );
    // The held checks run, and the store still serves.
    let mut k = common::cluster::region_key(3);
    k.extend_from_slice(b"/after");
    c.must_put(&k, b"v");
    assert_eq!(c.must_get(&k), Some(b"v".to_vec()));
}
