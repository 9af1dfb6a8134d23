//! Every crash point, crashed at (see `prkv::crash`).
//!
//! The crash points are read from the source tree: every `crash_point!("name")` mark. For each
//! one, a cluster of real processes (PD and 3 stores, built with the `failpoints` feature) runs
//! the nemesis' register and set workloads; the point is armed on every store through its
//! status port, and what reaches it is asked for (a split, a merge, a replica removed and added
//! back as a snapshot, ...). The first store to pass the point exits there at once. It is
//! restarted, and must come back and stay up; the next point follows, on the same cluster.
//! At the end: the register history must be linearizable, every acknowledged insert present,
//! and every Region's replicas equal (same keys, same checksum, at the same applied index).
//!
//! Points passed only when a cluster is first bootstrapped (a store's or PD's) are armed
//! through the environment of a fresh cluster instead, which must then bootstrap once its
//! crashed process restarts.
//!
//! What reaches a point is chosen by the start of its name (`TRIGGERS`). A new mark whose name
//! no rule covers fails `every_crash_point_has_a_trigger`; a mark the workload never reaches
//! fails the run of its engine.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::procs::{self, ProcCluster};
use common::workload::{self, Options, Rng, Workload};

/// One cluster at a time: on 2 cores, two would measure each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONED: &str = "partitioned-raft-kv";
const RAFT_KV: &str = "raft-kv";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Trigger {
    /// PD splits a Region.
    Split,
    /// PD merges two adjacent Regions.
    Merge,
    /// A replica is removed and PD adds it back: the leader sends the new one a snapshot.
    Snapshot,
    /// Tablets park when idle (the cluster runs with at most 2 open and a 500 ms timeout).
    Park,
    /// A store bootstraps a new cluster (armed in a fresh cluster's environment).
    StoreBootstrap,
    /// PD records the bootstrap (likewise).
    PdBootstrap,
}

/// Which workload reaches a crash point, by the start of its name, and on which engines.
const TRIGGERS: &[(&str, Trigger, &[&str])] = &[
    ("split_", Trigger::Split, &[PARTITIONED, RAFT_KV]),
    ("merge_", Trigger::Merge, &[PARTITIONED, RAFT_KV]),
    ("commit_merge_", Trigger::Merge, &[PARTITIONED, RAFT_KV]),
    ("snapshot_ingest_", Trigger::Snapshot, &[RAFT_KV]),
    (
        "snapshot_install_after_rename",
        Trigger::Snapshot,
        &[PARTITIONED],
    ),
    ("snapshot_", Trigger::Snapshot, &[PARTITIONED, RAFT_KV]),
    ("destroy_", Trigger::Snapshot, &[PARTITIONED, RAFT_KV]),
    ("park_", Trigger::Park, &[PARTITIONED]),
    ("bootstrap_", Trigger::StoreBootstrap, &[PARTITIONED]),
    ("pd_bootstrap_", Trigger::PdBootstrap, &[PARTITIONED]),
];

/// How long one point may take to be reached: several rounds of its trigger, each of which
/// waits for PD's operators (a replica added back takes a few heartbeats).
const REACH_TIMEOUT: Duration = Duration::from_secs(45);
/// How often the trigger is asked for again while the point is not reached.
const TRIGGER_EVERY: Duration = Duration::from_millis(1500);

fn rule(point: &str) -> Option<(Trigger, &'static [&'static str])> {
    TRIGGERS
        .iter()
        .find(|(prefix, _, _)| point.starts_with(prefix))
        .map(|(_, t, kinds)| (*t, *kinds))
}

/// The crash points `kind` must reach, with their triggers, in source order. To look at a
/// few: `PRKV_CRASH_POINTS=<name>,<name>`.
fn points_for(kind: &str) -> Vec<(String, Trigger)> {
    let only: Option<Vec<String>> = std::env::var("PRKV_CRASH_POINTS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    workload::crash_points_in_source()
        .into_iter()
        .filter_map(|(name, _)| {
            let (t, kinds) = rule(&name)?;
            kinds.contains(&kind).then_some((name, t))
        })
        .filter(|(name, _)| only.as_ref().is_none_or(|o| o.contains(name)))
        .collect()
}

/// A test's directory, kept (and named) if `PRKV_TEST_KEEP` is set.
fn test_dir() -> tempfile::TempDir {
    let keep = std::env::var("PRKV_TEST_KEEP").is_ok();
    let dir = tempfile::Builder::new()
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        println!("data and logs in {}", dir.path().display());
    }
    dir
}

#[test]
fn every_crash_point_has_a_trigger() {
    let points = workload::crash_points_in_source();
    let orphans: Vec<String> = points
        .iter()
        .filter(|(name, _)| rule(name).is_none())
        .map(|(name, file)| format!("{name} ({file})"))
        .collect();
    assert!(
        orphans.is_empty(),
        "crash points no workload reaches: {orphans:?}; add a rule to TRIGGERS in \
         tests/crash_points.rs"
    );
    assert!(
        points.len() >= 10,
        "only {} crash points found",
        points.len()
    );
    println!("{} crash points:", points.len());
    for (name, file) in &points {
        println!("  {name:<45} {file}");
    }
}

fn config(kind: &str) -> String {
    let mut cfg = format!("[storage]\nengine = \"{kind}\"\napi-version = 2\n");
    if kind == PARTITIONED {
        cfg.push_str("[rocksdb]\nmax-open-tablets = 2\ntablet-idle-timeout = \"500ms\"\n");
    }
    cfg
}

/// Asks for what reaches a point of `trigger` (running-cluster triggers only).
/// `store`: PD's id of the one store armed, if only one is (a replica removed must be there).
fn pull(c: &ProcCluster, rng: &mut Rng, trigger: Trigger, store: Option<u64>) -> String {
    match trigger {
        Trigger::Split => workload::split_largest(c),
        Trigger::Merge => {
            if workload::regions(c).len() < 3 {
                return workload::split_largest(c);
            }
            // Pairs busy with another operator refuse: try others until one merges.
            let mut tried = Vec::new();
            for _ in 0..8 {
                let what = workload::merge_random(c, rng);
                let moved = what.contains(": 200 ");
                tried.push(what);
                if moved {
                    break;
                }
            }
            tried.join("; ")
        }
        Trigger::Snapshot => {
            // The Regions holding the most data first (an empty Region's snapshot would prove
            // little); one busy with another operator refuses: then the next.
            let mut tried = Vec::new();
            for id in workload::regions_by_keys(c) {
                let stores = workload::region_stores(c, id);
                let Some(on) = store.or_else(|| {
                    (!stores.is_empty())
                        .then(|| stores[(rng.next() % stores.len() as u64) as usize])
                }) else {
                    continue;
                };
                let what = format!(
                    "remove-peer Region {id} store {on}: {}",
                    workload::pd_post(c, &format!("/pd/api/v1/region/remove-peer/{id}/{on}"))
                );
                let moved = what.contains(": 200 ");
                tried.push(what);
                if moved {
                    break;
                }
            }
            tried.join("; ")
        }
        Trigger::Park => {
            // Tablets park only when a store holds more Regions than its cap (2) or some sit
            // idle; merges in earlier rounds may have left too few for either.
            if workload::regions(c).len() < 4 {
                return workload::split_largest(c);
            }
            String::new()
        }
        Trigger::StoreBootstrap | Trigger::PdBootstrap => String::new(),
    }
}

/// The stores that have exited, after giving the others that pass the same point (every
/// replica applies a merge) a moment to do so.
async fn exited(c: &mut ProcCluster) -> Vec<usize> {
    let any = (1..=3).any(|s| c.store_exit(s).is_some());
    if !any {
        return Vec::new();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    (1..=3).filter(|s| c.store_exit(*s).is_some()).collect()
}

/// Every Region's replicas hold the same data: the checksum of each store's replica, once
/// all have applied the same index (they converge once the workload stops).
fn replicas_equal(c: &ProcCluster) -> Result<usize, String> {
    let regions = workload::regions(c);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (id, _, _) in &regions {
        loop {
            let sums: Vec<(usize, u64, u64, u64)> = (1..=3)
                .filter_map(|s| {
                    let body = procs::http_get(c.status_addr(s), &format!("/region/{id}/checksum"))
                        .ok()?;
                    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                    Some((
                        s,
                        v["applied_index"].as_u64()?,
                        v["keys"].as_u64()?,
                        v["crc32"].as_u64()?,
                    ))
                })
                .collect();
            let same_index = sums.len() == 3 && sums.iter().all(|x| x.1 == sums[0].1);
            if same_index {
                if sums.iter().any(|x| (x.2, x.3) != (sums[0].2, sums[0].3)) {
                    return Err(format!(
                        "Region {id}: replicas differ at applied index {}: {sums:?} \
                         (store, applied, keys, crc32)",
                        sums[0].1
                    ));
                }
                break;
            }
            if Instant::now() > deadline {
                // An idle Region's followers may not hear the last commit index before it
                // hibernates: they then hold entries applied by the leader only, which carry no
                // data if the data is the same.
                if sums.len() == 3 && sums.iter().all(|x| (x.2, x.3) == (sums[0].2, sums[0].3)) {
                    println!(
                        "Region {id}: same data at different applied indexes: {sums:?} \
                         (store, applied, keys, crc32)"
                    );
                    break;
                }
                return Err(format!(
                    "Region {id}: replicas never reached one applied index: {sums:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(regions.len())
}

/// Crashes a running cluster of `kind` at each of its running-cluster points in turn.
async fn running_cluster(kind: &str, seed: u64) {
    let points: Vec<(String, Trigger)> = points_for(kind)
        .into_iter()
        .filter(|(_, t)| !matches!(t, Trigger::StoreBootstrap | Trigger::PdBootstrap))
        .collect();
    let dir = test_dir();
    let mut c = ProcCluster::start(dir.path(), 3, &config(kind));
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let w = Workload::start(c.endpoints(), seed, Options { bank: false }).await;
    let mut rng = Rng(seed);
    // A few Regions to merge and move.
    for _ in 0..3 {
        println!("  {}", workload::split_largest(&c));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut reached: BTreeMap<String, String> = BTreeMap::new();
    let mut missed = Vec::new();
    // Each point twice: armed on every store (every replica crashes in the same window), then
    // on one store only (one replica crashes there while the others go on without it, the case
    // where replicas can diverge).
    let rounds: Vec<(String, Trigger, Option<usize>)> = points
        .iter()
        .enumerate()
        .flat_map(|(n, (p, t))| [(p.clone(), *t, None), (p.clone(), *t, Some(1 + n % 3))])
        .collect();
    for (point, trigger, only) in &rounds {
        let armed: Vec<usize> = only.map_or(vec![1, 2, 3], |s| vec![s]);
        for s in &armed {
            assert!(
                c.arm_crash(*s, point),
                "{kind}: store {s} refused to arm {point}"
            );
        }
        let only_store = only.and_then(|s| {
            procs::http_get(c.status_addr(s), "/status")
                .ok()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["store_id"].as_u64())
        });
        let started = Instant::now();
        let mut next_pull = Instant::now();
        let mut crashed = Vec::new();
        let mut asked = Vec::new();
        while started.elapsed() < REACH_TIMEOUT {
            crashed = exited(&mut c).await;
            if !crashed.is_empty() {
                break;
            }
            if Instant::now() >= next_pull {
                let what = pull(&c, &mut rng, *trigger, only_store);
                if !what.is_empty() {
                    asked.push(what);
                }
                next_pull = Instant::now() + TRIGGER_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for s in &armed {
            if !crashed.contains(s) {
                let _ = c.arm_crash(*s, "");
            }
        }
        let mode = only.map_or("every store armed".to_string(), |s| {
            format!("store {s} armed")
        });
        if crashed.is_empty() {
            println!("  {point} ({mode}): NOT reached in {REACH_TIMEOUT:?} (asked: {asked:?})");
            missed.push(format!("{point} ({mode})"));
            continue;
        }
        for s in &crashed {
            let code = c.store_exit(*s).flatten();
            assert_eq!(
                code,
                Some(prkv::crash::CRASH_EXIT_CODE),
                "{kind}: store {s} exited with {code:?} while {point} was armed, not at it \
                 (see its log)"
            );
            c.kill_store(*s);
            c.start_store(*s);
        }
        // The restarted stores recover and stay up: every Region has its replicas again.
        procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
        for s in &crashed {
            assert!(
                c.store_running(*s),
                "{kind}: store {s} did not stay up after its crash at {point} (see its log)"
            );
        }
        let took = started.elapsed();
        println!(
            "  {point} ({mode}): store(s) {crashed:?} crashed after {:.1}s, recovered",
            took.as_secs_f64()
        );
        reached.insert(point.clone(), format!("{crashed:?}"));
    }
    let v = w.finish(&c, 3).await;
    let regions = replicas_equal(&c).unwrap_or_else(|e| panic!("{kind}: {e}"));
    println!(
        "{kind}: {} of {} crash points reached and recovered; {regions} Regions' replicas equal",
        reached.len(),
        points.len()
    );
    assert!(
        v.violation.is_none() && v.lost.is_empty(),
        "{kind}: violation {:?}; {} acknowledged inserts lost",
        v.violation,
        v.lost.len()
    );
    assert!(v.acknowledged > 50, "{kind}: too little got done");
    assert!(
        missed.is_empty(),
        "{kind}: crash points never reached: {missed:?}"
    );
}

/// Crashes a fresh cluster's bootstrap at each bootstrap point: the process stopped there
/// restarts, and the cluster must come up and take writes.
async fn bootstrap_points(kind: &str) {
    let points: Vec<(String, Trigger)> = points_for(kind)
        .into_iter()
        .filter(|(_, t)| matches!(t, Trigger::StoreBootstrap | Trigger::PdBootstrap))
        .collect();
    for (point, trigger) in points {
        let dir = test_dir();
        let env = vec![("PRKV_CRASH_AT".to_string(), point.clone())];
        let (pd_env, store_env) = match trigger {
            Trigger::PdBootstrap => (env, Vec::new()),
            _ => (Vec::new(), env),
        };
        let mut c =
            ProcCluster::start_with_env(dir.path(), 3, &config(kind), "", pd_env, store_env, None);
        let started = Instant::now();
        let mut crashed = Vec::new();
        let mut pd_crashed = false;
        while started.elapsed() < REACH_TIMEOUT && crashed.is_empty() && !pd_crashed {
            tokio::time::sleep(Duration::from_millis(100)).await;
            crashed = exited(&mut c).await;
            pd_crashed = c.pd_exit().is_some();
        }
        c.pd_env.clear();
        c.store_env.clear();
        assert!(
            !crashed.is_empty() || pd_crashed,
            "{kind}: bootstrap crash point {point} never reached"
        );
        if pd_crashed {
            let code = c.pd_exit().flatten();
            assert_eq!(
                code,
                Some(prkv::crash::CRASH_EXIT_CODE),
                "PD exited with {code:?}"
            );
            c.kill_pd();
            c.start_pd();
        }
        for s in &crashed {
            let code = c.store_exit(*s).flatten();
            assert_eq!(
                code,
                Some(prkv::crash::CRASH_EXIT_CODE),
                "store {s} exited with {code:?}, not at {point}"
            );
            c.kill_store(*s);
            c.start_store(*s);
        }
        procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
        let client = tikv_client::RawClient::new_with_config(
            c.endpoints(),
            tikv_client::Config::default().with_default_keyspace(),
        )
        .await
        .unwrap();
        for i in 0..50u32 {
            let k = format!("boot{i:03}");
            client.put(k.clone(), k.clone()).await.unwrap();
        }
        for i in 0..50u32 {
            let k = format!("boot{i:03}");
            assert_eq!(client.get(k.clone()).await.unwrap(), Some(k.into_bytes()));
        }
        println!(
            "  {point}: {} crashed, the cluster bootstrapped on restart",
            if pd_crashed {
                "PD".to_string()
            } else {
                format!("store(s) {crashed:?}")
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_points_partitioned() {
    let _serial = SERIAL.lock().await;
    bootstrap_points(PARTITIONED).await;
    running_cluster(PARTITIONED, 71).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_points_raft_kv() {
    let _serial = SERIAL.lock().await;
    running_cluster(RAFT_KV, 72).await;
}
