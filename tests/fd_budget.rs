//! File descriptors as a budget (`prkv::storage::fds`): stores under a low `ulimit -n` go
//! through a storm of splits with writes, stay up and lose nothing.
//!
//! The incident this reproduces: a client test workload with tiny Regions (API v2, TTL,
//! `region-max-keys = 10`, `region-split-keys = 7`) grew thousands of Regions in minutes; one
//! store ran out of descriptors with `rocksdb.max-open-tablets` at its default, could not even
//! park (closing a tablet needs descriptors too), panicked persisting Raft state, and exited
//! with thousands of leaders. Here every store has 1,024 descriptors.

mod common;

use std::time::{Duration, Instant};

use common::procs::{self, ProcCluster};
use tikv_client::{Config, RawClient};

/// The `ulimit -n` of every store.
const NOFILE: u64 = 1024;
/// Keys written: with a split every 7 keys, about this / 7 Regions.
const KEYS: usize = 14_000;
/// Keys per batch put.
const BATCH: usize = 50;
/// Regions the storm must reach (with a cut every 7 keys, ~2,000 when it is over).
const STORM: u64 = 1500;
/// How long the storm may take on the shared 2 cores (passing runs take 1-3 minutes).
const STORM_TIME: Duration = Duration::from_secs(360);

fn metric(c: &ProcCluster, i: usize, name: &str) -> Option<f64> {
    let text = procs::http_get(c.status_addr(i), "/metrics").ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_storm_under_a_low_fd_limit() {
    let dir = tempfile::tempdir().unwrap();
    if std::env::var("PRKV_TEST_KEEP").is_ok() {
        println!("data and logs in {}", dir.path().display());
    }
    let dir = KeptDir(Some(dir));
    let cfg = "[storage]\nengine = \"partitioned-raft-kv\"\napi-version = 2\nenable-ttl = true\n\
               [coprocessor]\nregion-max-keys = 10\nregion-split-keys = 7\n\
               [raftstore]\nsplit-region-check-tick-interval = \"100ms\"\n\
               region-split-check-diff = \"1B\"\n";
    let mut c =
        ProcCluster::start_with_env(dir.path(), 3, cfg, "", Vec::new(), Vec::new(), Some(NOFILE));
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    let started = Instant::now();
    let mut max_fds = [0f64; 3];
    let mut written = 0;
    let mut batches = 0usize;
    // Writes first fill the key space (Regions split behind them, `batch-split-limit` cuts
    // per check), then rewrite it while the storm plays out, until it has grown the Regions.
    loop {
        let regions = procs::http_json(c.pd_addr, "/pd/api/v1/regions")["count"]
            .as_u64()
            .unwrap_or(0);
        if written >= KEYS && regions >= STORM {
            break;
        }
        assert!(
            started.elapsed() < STORM_TIME,
            "{regions} Regions after {STORM_TIME:?}: the storm stalled"
        );
        let from = if written < KEYS {
            written
        } else {
            (batches * BATCH) % KEYS
        };
        let pairs: Vec<(String, String)> = (from..from + BATCH)
            .map(|i| (format!("k{i:07}"), format!("v{i}")))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match client
                .batch_put_with_ttl(pairs.clone(), vec![3600; pairs.len()])
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "writes keep failing: {e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if written < KEYS {
            written += BATCH;
        }
        batches += 1;
        if batches.is_multiple_of(20) {
            for s in 1..=3 {
                assert!(
                    c.store_running(s),
                    "store {s} exited under the split storm (see its log)"
                );
                if let Some(n) = metric(&c, s, "prkv_process_open_fds") {
                    max_fds[s - 1] = max_fds[s - 1].max(n);
                }
            }
            println!(
                "{:>6.1}s: {} batches written, {regions} Regions, open fds {max_fds:?}",
                started.elapsed().as_secs_f64(),
                batches
            );
        }
        if written >= KEYS {
            // Rewrites pace themselves: the storm, not the client, is under test now.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every Region has a leader again, then every key must be there with its value.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = procs::http_json(c.pd_addr, "/pd/api/v1/regions");
        let led = r["regions"]
            .as_array()
            .is_some_and(|rs| !rs.is_empty() && rs.iter().all(|x| !x["leader"].is_null()));
        if led {
            break;
        }
        assert!(Instant::now() < deadline, "Regions without a leader: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let regions = procs::http_json(c.pd_addr, "/pd/api/v1/regions")["count"]
        .as_u64()
        .unwrap_or(0);
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("k{i:07}")).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let got = loop {
            match client.batch_get(keys.clone()).await {
                Ok(got) => break got,
                Err(e) => {
                    assert!(Instant::now() < deadline, "reads keep failing: {e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(got.len(), keys.len(), "keys lost in {}..", keys[0]);
        for kv in got {
            let k: Vec<u8> = kv.0.into();
            let k = String::from_utf8_lossy(&k).to_string();
            let i: usize = k[1..].parse().expect("a key of this test");
            assert_eq!(kv.1, format!("v{i}").into_bytes(), "value of {k}");
        }
    }
    for s in 1..=3 {
        assert!(c.store_running(s), "store {s} exited (see its log)");
        let cap = metric(&c, s, "prkv_engine_tablet_cap").unwrap_or(0.0);
        let limit = metric(&c, s, "prkv_fd_limit").unwrap_or(0.0);
        assert_eq!(limit as u64, NOFILE, "store {s} sees its limit");
        assert!(
            cap > 0.0 && cap < 100.0,
            "store {s}: tablet cap {cap} from {NOFILE} descriptors"
        );
        println!(
            "store {s}: cap {cap} open tablets, at most {} descriptors open of {NOFILE}, {} \
             waits for descriptors, {} tablet openings waited for parking",
            max_fds[s - 1],
            metric(&c, s, "prkv_fd_exhausted_total").unwrap_or(0.0),
            metric(&c, s, "prkv_engine_tablet_admission_waits_total").unwrap_or(0.0),
        );
    }
    let pending = procs::http_json(c.pd_addr, "/pd/api/v1/regions")["regions"]
        .as_array()
        .map_or(0, |rs| {
            rs.iter()
                .filter(|x| x["pending_peers"].as_array().is_some_and(|p| !p.is_empty()))
                .count()
        });
    println!(
        "{KEYS} keys in {regions} Regions in {:.0}s, all read back; {pending} Regions with a \
         replica still catching up",
        started.elapsed().as_secs_f64()
    );
    assert!(
        regions >= STORM,
        "only {regions} Regions: the storm was not one"
    );
}

/// The directory, kept after the run if `PRKV_TEST_KEEP` is set.
struct KeptDir(Option<tempfile::TempDir>);

impl KeptDir {
    fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("set until drop").path()
    }
}

impl Drop for KeptDir {
    fn drop(&mut self) {
        if std::env::var("PRKV_TEST_KEEP").is_ok() {
            if let Some(d) = self.0.take() {
                let _ = d.keep();
            }
        }
    }
}
