//! The workloads the fault tests run against a cluster of real processes, and the checkers that
//! judge what their clients saw (`tests/nemesis.rs`, `tests/crash_points.rs`):
//!
//! * **registers**: get / put / compare-and-swap on 16 keys; the history must be linearizable
//!   (`prkv::check::linearizability`). Some clients have short deadlines (50-200 ms): they
//!   abandon requests mid-flight, as real applications do, and their writes count as unknown.
//! * **set**: inserts of unique keys; every acknowledged insert must be readable at the end.
//! * **bank** (optional): transfers in transactions (`common::bank`); every snapshot read and
//!   the final read must see the same total.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prkv::check::linearizability::{self, Input, Operation, Output};
use tikv_client::{Backoff, Config, RawClient, TransactionClient};

use super::bank::{self, Bank};
use super::procs::{self, http_json, ProcCluster};

pub const KEYS: u64 = 16;
pub const REGISTER_CLIENTS: u64 = 8;
/// Of the register clients, how many send with a short deadline.
pub const SHORT_DEADLINE_CLIENTS: u64 = 3;
pub const SET_CLIENTS: u64 = 2;
pub const BANK_CLIENTS: u64 = 4;

/// A xorshift generator: seeded runs replay.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
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
                Ok((_, true)) => (Output::Swapped(true), Some(now())),
                // What it found is observed: it may be a write whose client gave up on it.
                Ok((found, false)) => (Output::CasFailed(found), Some(now())),
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

/// What a workload runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Transfers in transactions beside the raw workloads.
    pub bank: bool,
}

/// Workloads running against a cluster.
pub struct Workload {
    seed: u64,
    pub client: RawClient,
    started: Instant,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    history: Arc<Mutex<Vec<Operation>>>,
    inserted: Arc<Mutex<Vec<Vec<u8>>>>,
    bank: Option<Bank>,
    /// Snapshot reads of the bank that saw the right total, and what any other saw.
    bank_checks: u64,
    bank_violation: Option<String>,
}

/// What the checkers found.
pub struct Verdict {
    pub operations: usize,
    pub acknowledged: usize,
    pub inserts: usize,
    pub violation: Option<String>,
    pub lost: Vec<Vec<u8>>,
    pub transfers: u64,
}

impl Workload {
    /// Starts the workloads against the cluster whose PD is `endpoints` (API v2, the DEFAULT
    /// keyspace).
    pub async fn start(endpoints: Vec<String>, seed: u64, opts: Options) -> Workload {
        let client = RawClient::new_with_config(
            endpoints.clone(),
            Config::default().with_default_keyspace(),
        )
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
            let mut rng = Rng(seed ^ (cl + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // Short deadlines: the gRPC deadline the client sends, so the server drops the
            // handler of a request still in Raft (what `tests/abandoned.rs` checks in small).
            let (client, writer) = if cl < SHORT_DEADLINE_CLIENTS {
                let deadline = Duration::from_millis(50 + rng.next() % 150);
                let cfg = Config::default()
                    .with_default_keyspace()
                    .with_timeout(deadline);
                let c = RawClient::new_with_config(endpoints.clone(), cfg)
                    .await
                    .unwrap()
                    .with_atomic_for_cas();
                let w = c.with_backoff(Backoff::no_backoff());
                (c, w)
            } else {
                (client.clone(), writer.clone())
            };
            let (history, stop, now) = (history.clone(), stop.clone(), now.clone());
            workers.push(tokio::spawn(async move {
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
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        let bank = if opts.bank {
            let txns = TransactionClient::new_with_config(
                endpoints,
                Config::default().with_default_keyspace(),
            )
            .await
            .unwrap();
            let mut bank = Bank::open(Arc::new(txns), Duration::from_secs(60)).await;
            bank.start(BANK_CLIENTS, seed);
            Some(bank)
        } else {
            None
        };
        Workload {
            seed,
            client,
            started,
            stop,
            workers,
            history,
            inserted,
            bank,
            bank_checks: 0,
            bank_violation: None,
        }
    }

    /// Seconds since the workloads started.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// One snapshot read of the bank, if there is one (a fault test calls this between
    /// faults). A wrong total is remembered as a violation.
    pub async fn check_bank(&mut self) {
        let Some(bank) = &self.bank else {
            return;
        };
        let read = tokio::time::timeout(Duration::from_secs(5), bank.snapshot_total()).await;
        match read {
            Ok(Ok(Some(sum))) if sum == bank::TOTAL => self.bank_checks += 1,
            Ok(Ok(Some(sum))) => {
                self.bank_violation.get_or_insert(format!(
                    "a snapshot of the bank totals {sum}, not {}",
                    bank::TOTAL
                ));
            }
            Ok(Err(e)) => {
                self.bank_violation.get_or_insert(e);
            }
            // Locks of cut-off transactions, a Region in transit: try again later.
            Ok(Ok(None)) | Err(_) => {}
        }
    }

    /// Stops the workloads, lets the cluster settle, and judges: the register history, every
    /// acknowledged insert, the bank's total.
    pub async fn finish(mut self, c: &ProcCluster, stores: usize) -> Verdict {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            w.await.unwrap();
        }
        if let Some(bank) = &mut self.bank {
            bank.stop().await;
        }
        // Every fault is undone; the cluster settles before anything is read back.
        procs::wait_cluster(c.pd_addr, stores, 3, Duration::from_secs(60));
        let seed = self.seed;
        let history = self.history.lock().unwrap().clone();
        let acknowledged = history.iter().filter(|o| o.ret.is_some()).count();
        let inserted = self.inserted.lock().unwrap().clone();
        let mut lost = Vec::new();
        for key in &inserted {
            let mut got = Err(String::new());
            for _ in 0..50 {
                match self.client.get(key.clone()).await {
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
        let mut violation = linearizability::check(&history)
            .err()
            .map(|v| v.to_string());
        if violation.is_some() {
            // The whole register history beside the cluster's logs, for the post-mortem
            // (`PRKV_TEST_KEEP` keeps them): one line per operation, in call order, times in
            // microseconds since the workload started.
            let mut ops = history.clone();
            ops.sort_by_key(|o| o.call);
            let text: String = ops
                .iter()
                .map(|o| format!("{} {o}\n", String::from_utf8_lossy(&o.key)))
                .collect();
            let path = c.dir.join("history.txt");
            let _ = std::fs::write(&path, text);
            println!("seed {seed}: the register history is in {}", path.display());
        }
        let mut transfers = 0;
        if let Some(bank) = &self.bank {
            transfers = bank.transfers.load(Ordering::Relaxed);
            let total = bank.final_total(c.pd_addr).await;
            if total != bank::TOTAL {
                self.bank_violation.get_or_insert(format!(
                    "the bank's final total is {total}, not {}",
                    bank::TOTAL
                ));
            }
            if let Some(v) = self.bank_violation.take() {
                violation = Some(match violation {
                    Some(reg) => format!("{reg}; bank: {v}"),
                    None => format!("bank: {v}"),
                });
            }
            println!(
                "seed {seed}: {transfers} transfers, {} consistent bank snapshots",
                self.bank_checks
            );
        }
        println!(
            "seed {seed}: {} register operations ({acknowledged} acknowledged), {} inserts",
            history.len(),
            inserted.len(),
        );
        Verdict {
            operations: history.len(),
            acknowledged,
            inserts: inserted.len(),
            violation,
            lost,
            transfers,
        }
    }
}

/// The Regions PD knows, in key order: `(id, start_key, end_key)` (keys in hex).
pub fn regions(c: &ProcCluster) -> Vec<(u64, String, String)> {
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

/// The store ids (PD's) holding a replica of Region `id`.
pub fn region_stores(c: &ProcCluster, id: u64) -> Vec<u64> {
    procs::http_get(c.pd_addr, &format!("/pd/api/v1/region/id/{id}"))
        .ok()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["peers"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p["store_id"].as_u64()).collect())
        })
        .unwrap_or_default()
}

/// `POST` to PD's HTTP API; the answer as one line.
pub fn pd_post(c: &ProcCluster, path: &str) -> String {
    match prkv::playground::http_request(c.pd_addr, "POST", path) {
        Ok((status, _, body)) => {
            let body = serde_json::from_str::<serde_json::Value>(&body)
                .map_or_else(|_| body.trim().to_string(), |v| v.to_string());
            format!("{status} {body}")
        }
        Err(e) => e,
    }
}

/// Splits a random Region in half (an operator PD sends its leader).
pub fn split_random(c: &ProcCluster, rng: &mut Rng) -> String {
    let rs = regions(c);
    if rs.is_empty() {
        return "split: no Regions known".into();
    }
    let (id, _, _) = &rs[(rng.next() % rs.len() as u64) as usize];
    let res = pd_post(c, &format!("/pd/api/v1/region/split/{id}"));
    format!("split Region {id}: {res}")
}

/// The Regions PD knows, the ones with the most keys (as PD last heard) first.
pub fn regions_by_keys(c: &ProcCluster) -> Vec<u64> {
    let Ok(body) = procs::http_get(c.pd_addr, "/pd/api/v1/regions") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut rs: Vec<(u64, u64)> = v["regions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    Some((
                        r["approximate_keys"].as_u64().unwrap_or(0),
                        r["id"].as_u64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    rs.sort_unstable_by(|a, b| b.cmp(a));
    rs.into_iter().map(|(_, id)| id).collect()
}

/// Splits the Region with the most keys (as PD last heard): a Region with fewer than two keys
/// has no middle key, and PD's split operator would wait on it until it times out.
pub fn split_largest(c: &ProcCluster) -> String {
    let Some(id) = regions_by_keys(c).first().copied() else {
        return "split: no Regions known".into();
    };
    let res = pd_post(c, &format!("/pd/api/v1/region/split/{id}"));
    format!("split Region {id}: {res}")
}

/// Merges a random pair of adjacent Regions, either side the source.
pub fn merge_random(c: &ProcCluster, rng: &mut Rng) -> String {
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
    let (s, t) = if rng.next().is_multiple_of(2) {
        (a, b)
    } else {
        (b, a)
    };
    let res = pd_post(c, &format!("/pd/api/v1/region/merge/{s}/{t}"));
    format!("merge Region {s} into {t}: {res}")
}

/// Asks PD to move a random Region's leadership (`"transfer-leader"`) or to remove one of its
/// replicas (`"remove-peer"`; the replica checker adds one back: a snapshot), on a random store
/// of that Region, or on `store` if given.
pub fn region_op_random(c: &ProcCluster, rng: &mut Rng, what: &str, store: Option<u64>) -> String {
    let rs = regions(c);
    if rs.is_empty() {
        return format!("{what}: no Regions known");
    }
    let (id, _, _) = &rs[(rng.next() % rs.len() as u64) as usize];
    // Store ids are PD's, not the process numbers: take one the Region has.
    let stores = region_stores(c, *id);
    if stores.is_empty() {
        return format!("{what}: Region {id} has no known replicas");
    }
    let store = store.unwrap_or(stores[(rng.next() % stores.len() as u64) as usize]);
    let res = pd_post(c, &format!("/pd/api/v1/region/{what}/{id}/{store}"));
    format!("{what} Region {id} store {store}: {res}")
}

/// The process number (1-based) of the store PD knows as `store_id`, asked of each store's
/// status port.
pub fn store_index(c: &ProcCluster, store_id: u64) -> Option<usize> {
    (1..=c.stores.len()).find(|i| {
        c.stores[i - 1].is_some()
            && procs::http_get(c.status_addr(*i), "/status")
                .ok()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["store_id"].as_u64() == Some(store_id))
    })
}

/// The store id (PD's) of the leader of a random Region, if PD knows one.
pub fn random_leader_store(c: &ProcCluster, rng: &mut Rng) -> Option<u64> {
    let rs = regions(c);
    if rs.is_empty() {
        return None;
    }
    let (id, _, _) = &rs[(rng.next() % rs.len() as u64) as usize];
    procs::http_get(c.pd_addr, &format!("/pd/api/v1/region/id/{id}"))
        .ok()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["leader"]["store_id"].as_u64())
        .filter(|s| *s != 0)
}

/// Every crash point marked in the source tree (`prkv::crash`), with the file that marks it,
/// in file order. Read from the code, so that a new mark is found without anyone listing it.
pub fn crash_points_in_source() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    let mut points: Vec<(String, String)> = Vec::new();
    const MARK: &str = "crash_point!(\"";
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            let mut rest = code;
            while let Some(at) = rest.find(MARK) {
                let tail = &rest[at + MARK.len()..];
                let Some(end) = tail.find('"') else { break };
                let name = tail[..end].to_string();
                let file = f.strip_prefix(root).unwrap().display().to_string();
                assert!(
                    !points.iter().any(|(n, _)| *n == name),
                    "crash point {name} is marked twice (again in {file}): names must be unique"
                );
                points.push((name, file));
                rest = &tail[end..];
            }
        }
    }
    points
}
