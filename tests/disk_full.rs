//! `storage.reserve-space`: when free disk space is below it, writes get a clear `DiskFull`
//! error and change nothing, reads (and deletes, which free space) keep working; when space
//! returns, writes are taken again and no data was damaged.
//!
//! The disk of this machine cannot be filled by a test; instead the stores restart with a
//! reserve larger than any disk (`1000TiB`), which puts them below it exactly as a full disk
//! would, and then with a reserve they meet ("space returns").

mod common;

use std::time::Duration;

use common::procs::{self, ProcCluster};
use tikv_client::{Config, RawClient};

fn key(i: usize) -> String {
    format!("key{i:04}")
}

fn restart_all(c: &mut ProcCluster) {
    for s in 1..=3 {
        c.kill_store(s);
    }
    for s in 1..=3 {
        c.start_store(s);
    }
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
}

async fn writes_refused_below_reserve(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let roomy =
        format!("[storage]\nengine = \"{kind}\"\napi-version = 2\nreserve-space = \"0B\"\n");
    let full = roomy.replace("\"0B\"", "\"1000TiB\"");
    let mut c = ProcCluster::start(dir.path(), 3, &roomy);
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    for i in 0..100 {
        client.put(key(i), format!("v{i}")).await.unwrap();
    }

    // The disk is "full".
    c.extra_config = full;
    restart_all(&mut c);
    let refused = tokio::time::timeout(Duration::from_secs(20), client.put(key(5), "new"))
        .await
        .expect("a refused write must answer, not hang");
    let err = refused.expect_err("a write below the reserve must fail");
    assert!(
        err.to_string().contains("disk full") && err.to_string().contains("reserve-space"),
        "the error must say why: {err}"
    );
    assert_eq!(
        client.get(key(5)).await.unwrap(),
        Some(b"v5".to_vec()),
        "a refused write changed nothing"
    );
    let all = client.scan(key(0)..key(100), 1000).await.unwrap();
    assert_eq!(all.len(), 100, "reads go on");
    // Deletes free space: they are taken.
    client.delete(key(99)).await.unwrap();
    assert_eq!(client.get(key(99)).await.unwrap(), None);
    let metrics = procs::http_get(c.status_addr(1), "/metrics").unwrap();
    assert!(
        metrics.contains("prkv_disk_full 1"),
        "the disk-full gauge is set"
    );

    // Space returns.
    c.extra_config = roomy;
    restart_all(&mut c);
    let mut wrote = false;
    for _ in 0..50 {
        if client.put(key(5), "new").await.is_ok() {
            wrote = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wrote, "writes are taken again once space returns");
    assert_eq!(client.get(key(5)).await.unwrap(), Some(b"new".to_vec()));
    let all = client.scan(key(0)..key(100), 1000).await.unwrap();
    assert_eq!(all.len(), 99);
    for kv in &all {
        let k: Vec<u8> = kv.key().clone().into();
        let k = String::from_utf8(k).unwrap();
        let i: usize = k.trim_start_matches("key").parse().unwrap();
        let want = if i == 5 {
            "new".to_string()
        } else {
            format!("v{i}")
        };
        assert_eq!(kv.value(), want.as_bytes(), "{k}");
    }
}

/// One cluster at a time: on 2 cores, two would measure each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_below_reserve_partitioned() {
    let _serial = SERIAL.lock().await;
    writes_refused_below_reserve("partitioned-raft-kv").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_below_reserve_raft_kv() {
    let _serial = SERIAL.lock().await;
    writes_refused_below_reserve("raft-kv").await
}
