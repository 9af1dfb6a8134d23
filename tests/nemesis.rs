//! The nemesis: clients work on a 3-store cluster of real processes while faults hit it on a
//! seeded schedule, and checkers judge what the clients saw.
//!
//! Workloads, run together:
//! * **registers**: get / put / compare-and-swap on 16 keys; the history must be linearizable
//!   (`prkv::check::linearizability`);
//! * **set**: inserts of unique keys; every acknowledged insert must be readable at the end.
//!
//! Faults, one at a time, each undone before the next: SIGKILL and restart of a store; SIGSTOP
//! and SIGCONT of a store; a network partition isolating a store from the others (the stores'
//! `/fault/partition`, see `server::fault`); SIGKILL and restart of PD; a split, a merge, a
//! leader transfer and a replica removal (added back by PD's replica checker) asked of PD.
//!
//! The crash loop runs the same workloads with SIGKILLs only (of one store or of all at once)
//! and also fails if any store exits by itself.
//!
//! CI runs a short run per engine with fixed seeds. The long run is a command:
//! `PRKV_NEMESIS_RUNS=200 cargo test --release --test nemesis -- --ignored --nocapture`
//! prints "N runs, 0 violations, 0 lost writes" (or the seed of each failure).
//! `PRKV_NEMESIS_SEED` replays one seed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{self, http_json, ProcCluster};
use prkv::check::linearizability::{self, Input, Operation, Output};
use tikv_client::{Backoff, Config, RawClient};

const KEYS: u64 = 16;
const REGISTER_CLIENTS: u64 = 8;
const SET_CLIENTS: u64 = 2;

/// One cluster at a time: on 2 cores, two would measure each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillStore,
    /// SIGKILL of every store at once, then all restart.
    KillAll,
    PauseStore,
    IsolateStore,
    KillPd,
    Split,
    Merge,
    TransferLeader,
    /// A replica removed; PD's replica checker adds one back (a snapshot).
    RemovePeer,
}

const FAULTS: [Fault; 8] = [
    Fault::KillStore,
    Fault::PauseStore,
    Fault::IsolateStore,
    Fault::KillPd,
    Fault::Split,
    Fault::Merge,
    Fault::TransferLeader,
    Fault::RemovePeer,
];

/// What one run found.
struct Report {
    seed: u64,
    acknowledged: usize,
    faults: Vec<String>,
    violation: Option<String>,
    lost: Vec<Vec<u8>>,
}

/// One register operation by client `cl`; `None` when it is not worth recording (a failed
/// read changed nothing).
///
/// Writes go through `writer`, a client that never retries: tikv-client retries a write whose
/// answer was lost (its store was killed) and so may apply it twice, at-least-once semantics
/// that no register has (the crash loop found a put applied, swapped away by a CAS, then
/// applied again by the retry). Without retries a write either answers or is "unknown".
async fn register_op(
    client: &RawClient,
    writer: &RawClient,
    rng: &mut Rng,
    cl: u64,
    n: &mut u64,
    now: &(dyn Fn() -> u64 + Send + Sync),
) -> Option<Operation> {
    let key = format!("reg{}", rng.next() % KEYS).into_bytes();
    let call = now();
    let (input, output, ret) = match rng.next() % 3 {
        0 => match client.get(key.clone()).await {
            Ok(v) => (Input::Get, Output::Value(v), Some(now())),
            Err(_) => return None,
        },
        1 => {
            *n += 1;
            let v = format!("c{cl}-{n}").into_bytes();
            match writer.put(key.clone(), v.clone()).await {
                Ok(()) => (Input::Put(v), Output::Ok, Some(now())),
                Err(_) => (Input::Put(v), Output::Unknown, None),
            }
        }
        _ => {
            *n += 1;
            let new = format!("c{cl}-{n}").into_bytes();
            // Swap from what this client last saw of the key, or from absent.
            let old = client.get(key.clone()).await.ok().flatten();
            let call = now();
            let input = Input::Cas {
                old: old.clone(),
                new: new.clone(),
            };
            // No retries (see above): an answer, true or false, is certain.
            let (output, ret) = match writer.compare_and_swap(key.clone(), old, new).await {
                Ok((_, swapped)) => (Output::Swapped(swapped), Some(now())),
                Err(_) => (Output::Unknown, None),
            };
            return Some(Operation {
                client: cl,
                key,
                call,
                ret,
                input,
                output,
            });
        }
    };
    Some(Operation {
        client: cl,
        key,
        call,
        ret,
        input,
        output,
    })
}

/// The Regions PD knows, in key order: `(id, start_key, end_key)` (keys in hex).
fn regions(c: &ProcCluster) -> Vec<(u64, String, String)> {
    let Ok(body) = procs::http_get(c.pd_addr, "/pd/api/v1/regions") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out: Vec<(u64, String, String)> = v["regions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["id"].as_u64().unwrap_or(0),
                        r["start_key"].as_str().unwrap_or("").to_string(),
                        r["end_key"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

fn pd_post(c: &ProcCluster, path: &str) -> String {
    match prkv::playground::http_request(c.pd_addr, "POST", path) {
        Ok((status, _, body)) => {
            let body = serde_json::from_str::<serde_json::Value>(&body)
                .map_or_else(|_| body.trim().to_string(), |v| v.to_string());
            format!("{status} {body}")
        }
        Err(e) => e,
    }
}

/// What a run does: which faults, how often, how long each is held, for how long.
#[derive(Clone, Copy, Debug)]
struct Plan {
    faults: &'static [Fault],
    /// Milliseconds between faults: `gap.0` plus up to `gap.1`.
    gap: (u64, u64),
    /// Milliseconds a fault is held: `hold.0` plus up to `hold.1`.
    hold: (u64, u64),
    until: Until,
}

#[derive(Clone, Copy, Debug)]
enum Until {
    Secs(u64),
    Rounds(u64),
}

/// The nemesis proper: every fault, one every 1-3 s, held 1-2.5 s.
fn nemesis_plan(secs: u64) -> Plan {
    Plan {
        faults: &FAULTS,
        gap: (1000, 2000),
        hold: (1000, 1500),
        until: Until::Secs(secs),
    }
}

/// The crash loop: `rounds` SIGKILLs of a random store (one in four: of every store), one
/// every 0.5-1.5 s, each store back 0.3-1 s later.
fn crash_plan(rounds: u64) -> Plan {
    const CRASHES: [Fault; 4] = [
        Fault::KillStore,
        Fault::KillStore,
        Fault::KillStore,
        Fault::KillAll,
    ];
    Plan {
        faults: &CRASHES,
        gap: (500, 1000),
        hold: (300, 700),
        until: Until::Rounds(rounds),
    }
}

/// Applies `fault`, holds it for a while, undoes it; returns what was done.
async fn inflict(c: &mut ProcCluster, rng: &mut Rng, fault: Fault, plan: &Plan) -> String {
    let victim = 1 + (rng.next() % 3) as usize;
    let hold = Duration::from_millis(plan.hold.0 + rng.next() % plan.hold.1.max(1));
    match fault {
        Fault::KillAll => {
            for s in 1..=3 {
                c.kill_store(s);
            }
            tokio::time::sleep(hold).await;
            for s in 1..=3 {
                c.start_store(s);
            }
            format!("kill every store for {hold:?}")
        }
        Fault::KillStore => {
            c.kill_store(victim);
            tokio::time::sleep(hold).await;
            c.start_store(victim);
            format!("kill store {victim} for {hold:?}")
        }
        Fault::PauseStore => {
            c.pause_store(victim, true);
            tokio::time::sleep(hold).await;
            c.pause_store(victim, false);
            format!("pause store {victim} for {hold:?}")
        }
        Fault::IsolateStore => {
            c.isolate_store(victim);
            tokio::time::sleep(hold).await;
            c.heal();
            format!("isolate store {victim} for {hold:?}")
        }
        Fault::KillPd => {
            c.kill_pd();
            tokio::time::sleep(hold).await;
            c.start_pd();
            format!("kill PD for {hold:?}")
        }
        Fault::Split => {
            let rs = regions(c);
            if rs.is_empty() {
                return "split: no Regions known".into();
            }
            let (id, _, _) = &rs[(rng.next() % rs.len() as u64) as usize];
            let res = pd_post(c, &format!("/pd/api/v1/region/split/{id}"));
            format!("split Region {id}: {res}")
        }
        Fault::TransferLeader | Fault::RemovePeer => {
            let rs = regions(c);
            if rs.is_empty() {
                return format!("{fault:?}: no Regions known");
            }
            let (id, _, _) = &rs[(rng.next() % rs.len() as u64) as usize];
            // Store ids are PD's, not the process numbers: take one the Region has.
            let stores: Vec<u64> =
                procs::http_get(c.pd_addr, &format!("/pd/api/v1/region/id/{id}"))
                    .ok()
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| {
                        v["peers"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|p| p["store_id"].as_u64()).collect())
                    })
                    .unwrap_or_default();
            if stores.is_empty() {
                return format!("{fault:?}: Region {id} has no known replicas");
            }
            let store = stores[(rng.next() % stores.len() as u64) as usize];
            let what = if matches!(fault, Fault::TransferLeader) {
                "transfer-leader"
            } else {
                "remove-peer"
            };
            let res = pd_post(c, &format!("/pd/api/v1/region/{what}/{id}/{store}"));
            format!("{what} Region {id} store {store}: {res}")
        }
        Fault::Merge => {
            let rs = regions(c);
            let pairs: Vec<(u64, u64)> = rs
                .windows(2)
                .filter(|w| w[0].2 == w[1].1)
                .map(|w| (w[0].0, w[1].0))
                .collect();
            if pairs.is_empty() {
                return "merge: no adjacent Regions".into();
            }
            let (a, b) = pairs[(rng.next() % pairs.len() as u64) as usize];
            // Either side may be the source.
            let (s, t) = if rng.next().is_multiple_of(2) {
                (a, b)
            } else {
                (b, a)
            };
            let res = pd_post(c, &format!("/pd/api/v1/region/merge/{s}/{t}"));
            format!("merge Region {s} into {t}: {res}")
        }
    }
}

async fn run(kind: &str, seed: u64, plan: Plan) -> Report {
    let _serial = SERIAL.lock().await;
    println!("nemesis seed {seed} ({kind})");
    let dir = tempfile::tempdir().unwrap();
    if std::env::var("PRKV_TEST_KEEP").is_ok() {
        // Logs and data stay for a post-mortem.
        println!("data and logs in {}", dir.path().display());
    }
    let dir = scopeguard_keep(dir);
    let mut cfg = format!("[storage]\nengine = \"{kind}\"\napi-version = 2\n");
    if kind == "partitioned-raft-kv" {
        // Tablets park and reopen all the time under the faults: at most 2 stay open, and any
        // unused for half a second parks (`storage::park`).
        cfg.push_str("[rocksdb]\nmax-open-tablets = 2\ntablet-idle-timeout = \"500ms\"\n");
    }
    let mut c = ProcCluster::start(dir.path(), 3, &cfg);
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap()
            .with_atomic_for_cas();
    let started = Instant::now();
    let now: Arc<dyn Fn() -> u64 + Send + Sync> =
        Arc::new(move || started.elapsed().as_micros() as u64);
    let history = Arc::new(Mutex::new(Vec::<Operation>::new()));
    let inserted = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let writer = client.with_backoff(Backoff::no_backoff());
    for cl in 0..REGISTER_CLIENTS {
        let (client, writer, history, stop, now) = (
            client.clone(),
            writer.clone(),
            history.clone(),
            stop.clone(),
            now.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (cl + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match register_op(&client, &writer, &mut rng, cl, &mut n, &*now).await {
                    Some(op) => {
                        let failed = op.ret.is_none();
                        history.lock().unwrap().push(op);
                        if failed {
                            // The cluster is in trouble: do not spin on instant errors.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }
    for cl in 0..SET_CLIENTS {
        let (client, inserted, stop) = (client.clone(), inserted.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("set/{cl}/{n:08}").into_bytes();
                if client.put(key.clone(), b"x".to_vec()).await.is_ok() {
                    inserted.lock().unwrap().push(key);
                }
            }
        }));
    }
    let mut rng = Rng(seed);
    let t0 = Instant::now();
    let mut faults = Vec::new();
    loop {
        let more = match plan.until {
            Until::Secs(secs) => t0.elapsed() < Duration::from_secs(secs),
            Until::Rounds(n) => (faults.len() as u64) < n,
        };
        if !more {
            break;
        }
        tokio::time::sleep(Duration::from_millis(
            plan.gap.0 + rng.next() % plan.gap.1.max(1),
        ))
        .await;
        let fault = plan.faults[(rng.next() % plan.faults.len() as u64) as usize];
        let what = inflict(&mut c, &mut rng, fault, &plan).await;
        println!("  {:>6.1}s {what}", started.elapsed().as_secs_f64());
        // Every restart must succeed: a store that died by itself is a failure.
        for s in 1..=3 {
            assert!(
                c.store_running(s),
                "seed {seed}: store {s} exited by itself after: {what} (see its log)"
            );
        }
        faults.push(what);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    // Every fault is undone; the cluster settles before the set is read back.
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let history = history.lock().unwrap().clone();
    let acknowledged = history.iter().filter(|o| o.ret.is_some()).count();
    let inserted = inserted.lock().unwrap().clone();
    let mut lost = Vec::new();
    for key in &inserted {
        let mut got = Err(String::new());
        for _ in 0..50 {
            match client.get(key.clone()).await {
                Ok(v) => {
                    got = Ok(v);
                    break;
                }
                Err(e) => {
                    got = Err(e.to_string());
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        }
        match got {
            Ok(Some(_)) => {}
            Ok(None) => lost.push(key.clone()),
            Err(e) => panic!(
                "seed {seed}: reading {} back kept failing: {e}; PD: {}",
                String::from_utf8_lossy(key),
                http_json(c.pd_addr, "/pd/api/v1/regions")
            ),
        }
    }
    println!(
        "seed {seed}: {} register operations ({acknowledged} acknowledged), {} inserts, {} faults",
        history.len(),
        inserted.len(),
        faults.len()
    );
    assert!(
        acknowledged > 50 && inserted.len() > 50,
        "seed {seed}: too little got done ({acknowledged} register operations, {} inserts): {:?}",
        inserted.len(),
        http_json(c.pd_addr, "/pd/api/v1/regions")["count"]
    );
    let violation = linearizability::check(&history)
        .err()
        .map(|v| v.to_string());
    Report {
        seed,
        acknowledged,
        faults,
        violation,
        lost,
    }
}

/// The directory, kept after the run if `PRKV_TEST_KEEP` is set.
fn scopeguard_keep(dir: tempfile::TempDir) -> KeptDir {
    KeptDir(Some(dir))
}

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

fn seed() -> u64 {
    std::env::var("PRKV_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261125)
}

fn must_pass(r: Report) {
    assert!(
        r.violation.is_none() && r.lost.is_empty(),
        "seed {}: violation {:?}; {} acknowledged inserts lost (first: {:?}); faults {:?}",
        r.seed,
        r.violation,
        r.lost.len(),
        r.lost
            .first()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        r.faults
    );
    assert!(r.acknowledged > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_partitioned() {
    must_pass(run("partitioned-raft-kv", seed(), nemesis_plan(30)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_raft_kv() {
    must_pass(run("raft-kv", seed() + 1, nemesis_plan(30)).await)
}

fn crash_rounds() -> u64 {
    std::env::var("PRKV_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25)
}

/// The crash loop (25 rounds in CI; `PRKV_CRASH_ROUNDS=100` for the full one): every
/// acknowledged write survives, every restart succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_loop_partitioned() {
    must_pass(
        run(
            "partitioned-raft-kv",
            seed() + 2,
            crash_plan(crash_rounds()),
        )
        .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_loop_raft_kv() {
    must_pass(run("raft-kv", seed() + 3, crash_plan(crash_rounds())).await)
}

/// The long run: `PRKV_NEMESIS_RUNS` runs (default 200), engines alternating, seeds from
/// `PRKV_NEMESIS_SEED` on. Prints "N runs, V violations, L lost writes" and fails if either is
/// not zero.
#[ignore]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_long() {
    let runs: u64 = std::env::var("PRKV_NEMESIS_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let secs: u64 = std::env::var("PRKV_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let (mut violations, mut lost, mut failed) = (0, 0, Vec::new());
    let mut harness_errors = Vec::new();
    for i in 0..runs {
        let kind = if i % 2 == 0 {
            "partitioned-raft-kv"
        } else {
            "raft-kv"
        };
        // A run that panics (a cluster that never came up, a store that did not restart) is a
        // failed run, reported by seed; the next run still goes.
        let r = match tokio::spawn(run(kind, seed() + i, nemesis_plan(secs))).await {
            Ok(r) => r,
            Err(e) => {
                println!("seed {} ({kind}): RUN FAILED: {e}", seed() + i);
                harness_errors.push(seed() + i);
                continue;
            }
        };
        if let Some(v) = &r.violation {
            println!("seed {} ({kind}): VIOLATION {v}", r.seed);
            violations += 1;
        }
        if !r.lost.is_empty() {
            println!("seed {} ({kind}): {} lost writes", r.seed, r.lost.len());
            lost += r.lost.len();
        }
        if r.violation.is_some() || !r.lost.is_empty() {
            failed.push(r.seed);
        }
        println!("run {}/{runs} done", i + 1);
    }
    println!("{runs} runs, {violations} violations, {lost} lost writes");
    if !harness_errors.is_empty() {
        println!(
            "{} runs failed without a verdict (seeds {harness_errors:?})",
            harness_errors.len()
        );
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
    assert!(harness_errors.is_empty(), "failed runs: {harness_errors:?}");
}
