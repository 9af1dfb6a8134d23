//! A short nemesis run (issue 8's beginning): clients do get / put / compare-and-swap on a few
//! keys of a 3-store cluster of real processes while stores are SIGKILLed and restarted on a
//! seeded schedule; the recorded history must be linearizable (`prkv::check`). The seed is
//! printed, so a failure reproduces.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{self, ProcCluster};
use prkv::check::linearizability::{self, Input, Operation, Output};
use tikv_client::{Config, RawClient};

const KEYS: u64 = 16;

/// One cluster at a time: on 2 cores, two would measure each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CLIENTS: u64 = 8;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn registers_under_kills(kind: &str, seed: u64, secs: u64) {
    let _serial = SERIAL.lock().await;
    println!("nemesis seed {seed} ({kind})");
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!("[storage]\nengine = \"{kind}\"\napi-version = 2\n");
    let mut c = ProcCluster::start(dir.path(), 3, &cfg);
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap()
            .with_atomic_for_cas();
    let started = Instant::now();
    let now = move || started.elapsed().as_micros() as u64;
    let history = Arc::new(Mutex::new(Vec::<Operation>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for cl in 0..CLIENTS {
        let (client, history, stop) = (client.clone(), history.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (cl + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("reg{}", rng.next() % KEYS).into_bytes();
                let call = now();
                let (input, output, ret) = match rng.next() % 3 {
                    0 => match client.get(key.clone()).await {
                        Ok(v) => (Input::Get, Output::Value(v), Some(now())),
                        Err(_) => continue, // a failed read changed nothing
                    },
                    1 => {
                        n += 1;
                        let v = format!("c{cl}-{n}").into_bytes();
                        match client.put(key.clone(), v.clone()).await {
                            Ok(()) => (Input::Put(v), Output::Ok, Some(now())),
                            Err(_) => (Input::Put(v), Output::Unknown, None),
                        }
                    }
                    _ => {
                        n += 1;
                        let new = format!("c{cl}-{n}").into_bytes();
                        // Swap from what this client last saw of the key, or from absent.
                        let old = client.get(key.clone()).await.ok().flatten();
                        let call = now();
                        let input = Input::Cas {
                            old: old.clone(),
                            new: new.clone(),
                        };
                        let out = client.compare_and_swap(key.clone(), old, new).await;
                        let rec = match out {
                            // tikv-client retries a CAS whose answer was lost (its store
                            // was killed): if the first try applied, the retry reports false.
                            // So "false" is recorded as an unknown outcome (it may have
                            // swapped); "true" is certain.
                            Ok((_, swapped)) => Operation {
                                client: cl,
                                key,
                                call,
                                ret: Some(now()),
                                input,
                                output: if swapped {
                                    Output::Swapped(true)
                                } else {
                                    Output::Unknown
                                },
                            },
                            Err(_) => Operation {
                                client: cl,
                                key,
                                call,
                                ret: None,
                                input,
                                output: Output::Unknown,
                            },
                        };
                        history.lock().unwrap().push(rec);
                        continue;
                    }
                };
                history.lock().unwrap().push(Operation {
                    client: cl,
                    key,
                    call,
                    ret,
                    input,
                    output,
                });
            }
        }));
    }
    // The nemesis: every 3-5 s, SIGKILL a random store, and restart it 1-2 s later.
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut kills = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(3000 + rng.next() % 2000)).await;
        let victim = 1 + (rng.next() % 3) as usize;
        c.kill_store(victim);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(1000 + rng.next() % 1000)).await;
        c.start_store(victim);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let done = history.iter().filter(|o| o.ret.is_some()).count();
    println!(
        "seed {seed}: {} operations ({done} acknowledged), {kills} kills",
        history.len()
    );
    assert!(done > 100, "only {done} operations completed");
    if let Err(v) = linearizability::check(&history) {
        panic!("seed {seed}: {v}");
    }
}

fn seed() -> u64 {
    std::env::var("PRKV_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261125)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registers_under_kills_partitioned() {
    registers_under_kills("partitioned-raft-kv", seed(), 20).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registers_under_kills_raft_kv() {
    registers_under_kills("raft-kv", seed() + 1, 20).await
}
