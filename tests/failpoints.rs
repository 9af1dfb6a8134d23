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
fn lagging_follower_crashes_installing_a_snapshot(kind: EngineKind) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
    c.restart_store(3);
    for i in 0..300 {
        c.must_replicate(3, &key(i), b"v");
    }
    c.must_put(b"after", b"crash");
    c.must_replicate(3, b"after", b"crash");
}

mod partitioned {
    #[test]
    fn lagging_follower_crashes_installing_a_snapshot() {
        super::lagging_follower_crashes_installing_a_snapshot(super::EngineKind::PartitionedRaftKv)
    }
}

mod raft_kv {
    #[test]
    fn lagging_follower_crashes_installing_a_snapshot() {
        super::lagging_follower_crashes_installing_a_snapshot(super::EngineKind::RaftKv)
    }
}
