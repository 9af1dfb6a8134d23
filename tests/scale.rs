//! Split, snapshots and scheduling as users see them: `prkv pd` + `prkv store` processes driven
//! by the official TiKV client (`tikv-client` 0.4, unmodified), for both engine kinds.

mod common;

use std::time::{Duration, Instant};

use common::procs::{self, http_json, ProcCluster};
use tikv_client::{Config, RawClient};

/// These tests start 3 to 4 processes each and move whole Regions around: one at a time, so
/// that on a 2-core machine their timeouts measure the system, not the contention.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

fn key(i: usize) -> String {
    format!("key{i:05}")
}

/// Retries a client call for up to 30 s, as an application does while Regions split and move
/// (tikv-client 0.4 gives up after a few region errors in a row).
async fn retry<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = tikv_client::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                println!("retrying after: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still failing after 30 s: {e:?}"),
        }
    }
}

/// Writes `key(i)` = `v{i}` for `i < n`, `batch` pairs per `batch_put`, retrying as an
/// application would while Regions split and move.
async fn write_keys(client: &RawClient, n: usize, batch: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch) {
        let pairs: Vec<(String, String)> =
            chunk.iter().map(|i| (key(*i), format!("v{i}"))).collect();
        retry(|| client.batch_put(pairs.clone())).await;
    }
}

fn engine_config(kind: &str) -> String {
    format!("[storage]\nengine = \"{kind}\"\napi-version = 2\n")
}

/// With `region-max-keys = 10` and `region-split-keys = 7`, 2,000 keys written through the
/// client split the keyspace into at least 40 Regions; every key is readable, and scans across
/// Regions are complete and ordered in both directions.
async fn split_2000_keys(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[coprocessor]\nregion-max-keys = 10\nregion-split-keys = 7\n\
         [raftstore]\nsplit-region-check-tick-interval = \"100ms\"\nregion-split-check-diff = \"1B\"\n",
        engine_config(kind)
    );
    let c = ProcCluster::start(dir.path(), 3, &cfg);
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    const N: usize = 2000;
    write_keys(&client, N, 20).await;
    let started = Instant::now();
    let regions = loop {
        let n = http_json(c.pd_addr, "/pd/api/v1/regions")["count"]
            .as_u64()
            .unwrap();
        if n >= 40 || started.elapsed() > Duration::from_secs(60) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(regions >= 40, "only {regions} Regions after {N} keys");
    for i in 0..N {
        let v = retry(|| client.get(key(i))).await;
        assert_eq!(v, Some(format!("v{i}").into_bytes()), "key {i}");
    }
    let want: Vec<Vec<u8>> = (0..N).map(|i| key(i).into_bytes()).collect();
    let fwd = retry(|| client.scan(key(0)..=key(N - 1), N as u32)).await;
    let got: Vec<Vec<u8>> = fwd.iter().map(|kv| kv.key().clone().into()).collect();
    assert_eq!(got, want, "forward scan across Regions");
    // tikv-client 0.4's reverse scan visits Regions in ascending order (each Region's keys
    // descending), a client bug: check what it returns as a set, and the server's reverse
    // scans Region by Region, from the last, the way a correct client walks them.
    let rev = retry(|| client.scan_reverse(key(0)..=key(N - 1), N as u32)).await;
    let mut got: Vec<Vec<u8>> = rev.iter().map(|kv| kv.key().clone().into()).collect();
    got.sort();
    assert_eq!(got, want, "reverse scan through tikv-client (as a set)");
    let mut got = reverse_walk(c.pd_addr, b"key").await;
    got.reverse();
    assert_eq!(got, want, "reverse scans, last Region first");
    // A bounded scan in the middle starts and stops where asked.
    let mid = retry(|| client.scan(key(500)..key(1500), 1000)).await;
    assert_eq!(mid.len(), 1000);
    assert_eq!(Vec::<u8>::from(mid[0].key().clone()), key(500).into_bytes());
    // PD's view: adjacent Regions, each with a leader and three voters.
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
}

/// Every key under `prefix` of the DEFAULT keyspace (API v2), by raw `RawScan { reverse }`
/// requests sent Region by Region from the last Region down, each to the leader PD names:
/// what a correct client does for a reverse scan across Regions. A region error (a leader
/// PD has not heard of yet, a split still being reported) re-reads PD's routes and retries
/// from the Region that failed, keeping what the Regions above it returned.
async fn reverse_walk(pd: std::net::SocketAddr, prefix: &[u8]) -> Vec<Vec<u8>> {
    use prkv_proto::{kvrpcpb, pdpb, tikvpb};
    let ks = b"r\0\0\0".to_vec();
    let lower: Vec<u8> = [ks.as_slice(), prefix].concat();
    let mut upper = lower.clone();
    *upper.last_mut().unwrap() += 1;
    // Region bounds are stored keys (memcomparable under API v2): back to client keys.
    let dec = |k: &[u8]| {
        if k.is_empty() {
            Vec::new()
        } else {
            prkv::server::raw::decode_bytes(k).unwrap()
        }
    };
    let mut pdc = pdpb::pd_client::PdClient::connect(format!("http://{pd}"))
        .await
        .unwrap();
    let cluster_id = pdc
        .get_members(pdpb::GetMembersRequest { header: None })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .cluster_id;
    let header = Some(pdpb::RequestHeader {
        cluster_id,
        sender_id: 0,
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    // Keys at or above `hi` are already in `out`.
    let mut hi = upper.clone();
    loop {
        assert!(
            Instant::now() < deadline,
            "reverse walk stuck below {hi:?} after {} keys",
            out.len()
        );
        let stores: std::collections::HashMap<u64, String> = pdc
            .get_all_stores(pdpb::GetAllStoresRequest {
                header: header.clone(),
                exclude_tombstone_stores: true,
            })
            .await
            .unwrap()
            .into_inner()
            .stores
            .into_iter()
            .map(|s| (s.id, s.address))
            .collect();
        let regions = pdc
            .scan_regions(pdpb::ScanRegionsRequest {
                header: header.clone(),
                start_key: vec![],
                limit: 0,
                end_key: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        // The Region holding the keys just below `hi`.
        let found = regions
            .region_metas
            .iter()
            .zip(&regions.leaders)
            .map(|(r, l)| (r, l, dec(&r.start_key), dec(&r.end_key)))
            .find(|(_, _, rs, re)| *rs < hi && (re.is_empty() || *re >= hi));
        let Some((r, leader, rs, _)) = found else {
            println!("reverse walk: no Region below {hi:?} yet");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let lo = if rs < lower {
            lower.clone()
        } else {
            rs.clone()
        };
        let Some(addr) = stores.get(&leader.store_id) else {
            println!("reverse walk: Region {} has no known leader yet", r.id);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut kv = tikvpb::tikv_client::TikvClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let resp = kv
            .raw_scan(kvrpcpb::RawScanRequest {
                context: Some(kvrpcpb::Context {
                    region_id: r.id,
                    region_epoch: r.region_epoch,
                    peer: Some(*leader),
                    api_version: kvrpcpb::ApiVersion::V2 as i32,
                    ..Default::default()
                }),
                start_key: hi.clone(),
                end_key: lo.clone(),
                limit: 10240,
                reverse: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(e) = resp.region_error {
            println!("reverse walk: Region {}: {}", r.id, e.message);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        out.extend(resp.kvs.into_iter().map(|p| p.key[ks.len()..].to_vec()));
        if lo <= lower {
            return out;
        }
        hi = lo;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_2000_keys_partitioned() {
    let _serial = serial().await;
    split_2000_keys("partitioned-raft-kv").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_2000_keys_raft_kv() {
    let _serial = serial().await;
    split_2000_keys("raft-kv").await
}

/// Every key and value of the DEFAULT keyspace under `key`, through the client (forward scans
/// are correct across Regions in keyspace mode), as one checksum.
async fn data_checksum(client: &RawClient, n: usize) -> (usize, u32) {
    // 500 keys per scan keeps every response far below the 16 MiB gRPC message limit.
    let mut crc = crc32fast::Hasher::new();
    let mut count = 0;
    for from in (0..n).step_by(500) {
        let to = (from + 500).min(n);
        let part = retry(|| client.scan(key(from)..key(to), 500)).await;
        for kv in &part {
            let k: Vec<u8> = kv.key().clone().into();
            crc.update(&k);
            crc.update(kv.value());
        }
        count += part.len();
    }
    (count, crc.finalize())
}

/// PD's view of the stores: (id, state, Regions, leaders).
fn stores(pd: std::net::SocketAddr) -> Vec<(u64, String, u64, u64)> {
    let v = http_json(pd, "/pd/api/v1/stores");
    v["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["store"]["id"].as_u64().unwrap(),
                s["store"]["state_name"].as_str().unwrap().to_string(),
                s["status"]["region_count"].as_u64().unwrap(),
                s["status"]["leader_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Whether every count is within 20% of the even share.
fn within_20_percent(counts: &[u64]) -> bool {
    let total: u64 = counts.iter().sum();
    let even = total as f64 / counts.len() as f64;
    counts
        .iter()
        .all(|c| (*c as f64 - even).abs() <= (even * 0.2).max(1.0))
}

/// Every replica of every Region holds the same data (per-Region checksums read from each
/// store's own engine).
fn replicas_identical(c: &ProcCluster) {
    let regions = http_json(c.pd_addr, "/pd/api/v1/regions");
    let stores = http_json(c.pd_addr, "/pd/api/v1/stores");
    let status_of = |store_id: u64| -> std::net::SocketAddr {
        let s = stores["stores"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["store"]["id"].as_u64() == Some(store_id))
            .unwrap();
        let addr = s["store"]["address"].as_str().unwrap();
        let i = (1..=c.max_stores)
            .find(|i| c.store_addr(*i).to_string() == addr)
            .unwrap();
        c.status_addr(i)
    };
    for r in regions["regions"].as_array().unwrap() {
        let id = r["id"].as_u64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sums: Vec<serde_json::Value> = r["peers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    http_json(
                        status_of(p["store_id"].as_u64().unwrap()),
                        &format!("/region/{id}/checksum"),
                    )
                })
                .collect();
            // Writes have stopped: replicas converge on the same data (their recorded apply
            // indexes may differ by admin entries, which change no data).
            let same = sums
                .windows(2)
                .all(|w| w[0]["crc32"] == w[1]["crc32"] && w[0]["keys"] == w[1]["keys"]);
            if same {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Region {id} replicas differ: {sums:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Scale out 3 -> 4 stores: replicas and leaders rebalance to within 20% of even, new
/// replicas arriving as snapshots; every replica of every Region is identical. Scale in
/// 4 -> 3 with `prkv ctl store-delete`: the store drains and becomes Tombstone, every Region
/// has 3 replicas again, and no key is lost.
async fn scale_out_and_in(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = Box::leak(Box::new(dir));
    println!("data in {}", dir.path().display());
    let cfg = format!(
        "{}[coprocessor]\nregion-max-keys = 100\nregion-split-keys = 70\n\
         [raftstore]\nsplit-region-check-tick-interval = \"100ms\"\nregion-split-check-diff = \"1B\"\n\
         raft-log-gc-tick-interval = \"1s\"\nraft-log-gc-threshold = 50\n",
        engine_config(kind)
    );
    let pd_cfg = "[schedule]\nstore-limit = 8\n";
    let mut c = ProcCluster::start_with_pd(dir.path(), 3, &cfg, pd_cfg);
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    const N: usize = 2000;
    write_keys(&client, N, 50).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_json(c.pd_addr, "/pd/api/v1/regions")["count"]
        .as_u64()
        .unwrap()
        < 20
    {
        assert!(
            Instant::now() < deadline,
            "the data never split into 20 Regions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let before = data_checksum(&client, N).await;
    assert_eq!(before.0, N);

    // Scale out.
    c.start_store(4);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = stores(c.pd_addr);
        let up: Vec<_> = s.iter().filter(|x| x.1 == "Up").collect();
        let balanced = up.len() == 4
            && within_20_percent(&up.iter().map(|x| x.2).collect::<Vec<_>>())
            && within_20_percent(&up.iter().map(|x| x.3).collect::<Vec<_>>());
        if balanced {
            break;
        }
        assert!(Instant::now() < deadline, "never balanced: {s:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    procs::wait_cluster(c.pd_addr, 4, 3, Duration::from_secs(60));
    replicas_identical(&c);
    assert_eq!(data_checksum(&client, N).await, before);

    // Scale in, as an operator would.
    let out = std::process::Command::new(procs::prkv_bin())
        .args(["ctl", "--pd", &c.pd_addr.to_string(), "store-delete"])
        .arg(store_id_at(&c, 4).to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = stores(c.pd_addr);
        let gone = s
            .iter()
            .find(|x| x.0 == store_id_at(&c, 4))
            .is_some_and(|x| x.1 == "Tombstone" && x.2 == 0);
        if gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "store 4 never became Tombstone: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    assert_eq!(data_checksum(&client, N).await, before);
    replicas_identical(&c);
    // Deleting the last stores that hold 3 replicas is refused, with the reason.
    let out = std::process::Command::new(procs::prkv_bin())
        .args(["ctl", "--pd", &c.pd_addr.to_string(), "store-delete"])
        .arg(store_id_at(&c, 1).to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("would leave"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.kill_store(4);
}

/// The store id PD gave store process `i`.
fn store_id_at(c: &ProcCluster, i: usize) -> u64 {
    let addr = c.store_addr(i).to_string();
    let v = http_json(c.pd_addr, "/pd/api/v1/stores");
    v["stores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["store"]["address"].as_str() == Some(addr.as_str()))
        .and_then(|s| s["store"]["id"].as_u64())
        .unwrap_or_else(|| panic!("no store at {addr}: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_and_in_partitioned() {
    let _serial = serial().await;
    scale_out_and_in("partitioned-raft-kv").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_and_in_raft_kv() {
    let _serial = serial().await;
    scale_out_and_in("raft-kv").await
}

/// A snapshot transfer cut by a SIGKILL of the receiving store (the transfer is throttled so
/// that it is surely in flight) is cleaned up and retried once the store is back: the new
/// replica ends up identical to the others.
async fn interrupted_snapshot_is_retried(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[server]\nsnap-io-max-bytes-per-sec = \"2MiB\"\n",
        engine_config(kind)
    );
    // Two replicas, so that the third store's replica must come from a snapshot.
    let pd_cfg = "[replication]\nmax-replicas = 3\n";
    let mut c = ProcCluster::start_with_pd(dir.path(), 2, &cfg, pd_cfg);
    procs::wait_cluster(c.pd_addr, 2, 2, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    // About 24 MiB of incompressible values: 12 s at the throttle.
    let mut seed = 7u64;
    let mut value = || {
        (0..4096 / 8)
            .flat_map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()
            })
            .collect::<Vec<u8>>()
    };
    const N: usize = 6000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(200) {
        let pairs: Vec<(String, Vec<u8>)> = chunk.iter().map(|i| (key(*i), value())).collect();
        retry(|| client.batch_put(pairs.clone())).await;
    }
    let before = data_checksum(&client, N).await;
    c.start_store(3);
    // Wait until a file of the transfer to store 3 is half written, then kill store 3.
    let recv = dir.path().join("store-3").join("snap").join("recv");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let partial = std::fs::read_dir(&recv)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .any(|f| {
                f.file_name().to_string_lossy().ends_with(".tmp")
                    && f.metadata().is_ok_and(|m| m.len() > 0)
            });
        if partial {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot transfer to store 3 was seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.kill_store(3);
    c.start_store(3);
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(120));
    replicas_identical(&c);
    assert_eq!(data_checksum(&client, N).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_snapshot_is_retried_partitioned() {
    let _serial = serial().await;
    interrupted_snapshot_is_retried("partitioned-raft-kv").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_snapshot_is_retried_raft_kv() {
    let _serial = serial().await;
    interrupted_snapshot_is_retried("raft-kv").await
}

/// Delete most keys: the emptied Regions merge back (PD's merge checker), while a store is
/// SIGKILLed and restarted in the middle (merges it was part of, as source or target, and the
/// leaderships it held, are interrupted); every merge completes or rolls back cleanly: the keys
/// left are all there, the deleted ones stay deleted, every replica of every Region is
/// identical.
async fn merge_after_delete(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[coprocessor]\nregion-max-keys = 10\nregion-split-keys = 7\n\
         [raftstore]\nsplit-region-check-tick-interval = \"100ms\"\nregion-split-check-diff = \"1B\"\n",
        engine_config(kind)
    );
    // Regions are "small" with at most 2 keys (by the engines' estimates); a Region is left
    // alone for 2 s after it split or merged.
    let pd_cfg = "[schedule]\nmax-merge-region-keys = 2\nsplit-merge-interval = \"2s\"\n\
                  merge-schedule-limit = 32\n";
    let mut c = ProcCluster::start_with_pd(dir.path(), 3, &cfg, pd_cfg);
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    const N: usize = 1000;
    const KEEP: usize = 50;
    write_keys(&client, N, 20).await;
    let pd = c.pd_addr;
    let count = move || {
        http_json(pd, "/pd/api/v1/regions")["count"]
            .as_u64()
            .unwrap()
    };
    // Splitting settles (the count holds still for 3 s) with at least 40 Regions.
    let started = Instant::now();
    let mut last = (count(), Instant::now());
    loop {
        let n = count();
        if n != last.0 {
            last = (n, Instant::now());
        }
        if n >= 40 && last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "never split: {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = count();
    for chunk in (KEEP..N).collect::<Vec<_>>().chunks(50) {
        let keys: Vec<String> = chunk.iter().map(|i| key(*i)).collect();
        retry(|| client.batch_delete(keys.clone())).await;
    }
    // Merges start; a store dies and comes back in the middle of them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    c.kill_store(2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.start_store(2);
    // The emptied Regions merge until few are left, and then the count holds still.
    let started = Instant::now();
    let mut last = (count(), Instant::now());
    loop {
        let n = count();
        if n != last.0 {
            last = (n, Instant::now());
        }
        if n <= before / 4 && last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let regions = http_json(pd, "/pd/api/v1/regions");
            for r in regions["regions"].as_array().unwrap().iter().take(12) {
                println!(
                    "Region {} keys {} size {} leader {} pending {} version {}",
                    r["id"],
                    r["approximate_keys"],
                    r["approximate_size"],
                    r["leader"],
                    r["pending_peers"],
                    r["epoch"]["version"]
                );
            }
            panic!(
                "{n} Regions left of {before} after deleting {} of {N} keys",
                N - KEEP
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    // The server, Region by Region (last first), as PD routes now.
    let mut got = reverse_walk(c.pd_addr, b"key").await;
    got.reverse();
    let want: Vec<Vec<u8>> = (0..KEEP).map(|i| key(i).into_bytes()).collect();
    if got != want {
        let extra: Vec<String> = got
            .iter()
            .filter(|k| !want.contains(k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        println!("{}", http_json(pd, "/pd/api/v1/regions"));
        panic!(
            "{} keys left after the merges, not {KEEP}; extra: {extra:?}",
            got.len()
        );
    }
    // Through the client, key by key (tikv-client 0.4's scans return keys more than once
    // across emptied Regions; the server's answers, walked above, are exact).
    for i in 0..N {
        let v = retry(|| client.get(key(i))).await;
        let want = (i < KEEP).then(|| format!("v{i}").into_bytes());
        assert_eq!(v, want, "key {i}");
    }
    replicas_identical(&c);
    // The merged Regions take writes.
    write_keys(&client, N, 50).await;
    let fresh =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    assert_eq!(data_checksum(&fresh, N).await.0, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_after_delete_partitioned() {
    let _serial = serial().await;
    merge_after_delete("partitioned-raft-kv").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_after_delete_raft_kv() {
    let _serial = serial().await;
    merge_after_delete("raft-kv").await
}
