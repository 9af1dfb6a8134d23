//! `prkv bench raftstore`: the Raftstore in one process, measuring how Ready batching turns
//! concurrent proposals into few fsyncs.
//!
//! Three stores joined by the in-process [`SimNetwork`] share nothing but the process: each has
//! its own data dir, raft-engine and engines. `--regions` Regions are replicated on all three.
//! For each concurrency level, that many proposals are kept in flight (a new one is sent as soon
//! as one is acknowledged, spread round-robin over the Regions) for `--secs` seconds. Reported:
//! acknowledged proposals per second, fsyncs per second (raft-engine writes with sync, all
//! stores), and proposals per fsync, which must grow with concurrency if batching works.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use prkv_proto::metapb::RegionEpoch;
use prkv_proto::serverpb::{mutation, Mutation};
use serde::Serialize;

use crate::config::{Config, EngineKind, ReadableDuration, ReadableSize};
use crate::raftstore::{
    bootstrap_region, even_region_key, even_regions, start_store, Error, NoPd, SimNetwork,
    StoreHandle, StoreMsg, Transport,
};
use crate::storage::Engines;

#[derive(Clone, Debug)]
pub struct RaftstoreBenchOptions {
    pub engine: EngineKind,
    pub regions: u64,
    pub concurrency: Vec<usize>,
    pub secs: u64,
    pub value_size: usize,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct RaftstoreBenchResult {
    pub engine: String,
    pub concurrency: usize,
    pub proposals: u64,
    pub proposals_per_sec: f64,
    pub fsyncs_per_sec: f64,
    pub proposals_per_fsync: f64,
    pub errors: u64,
}

pub fn run(opts: &RaftstoreBenchOptions) -> Result<Vec<RaftstoreBenchResult>, String> {
    if opts.data_dir.exists() {
        std::fs::remove_dir_all(&opts.data_dir).map_err(|e| e.to_string())?;
    }
    let mut cfg = Config::default();
    cfg.storage.engine = opts.engine;
    cfg.rocksdb.write_buffer_limit = ReadableSize::mib(256);
    cfg.rocksdb.write_buffer_size = ReadableSize::mib(16);
    cfg.rocksdb.block_cache_size = ReadableSize::mib(64);
    cfg.raftstore.raft_base_tick_interval = ReadableDuration::millis(100);
    cfg.raftstore.raft_store_max_leader_lease = ReadableDuration::millis(900);
    cfg.validate().map_err(|e| e.to_string())?;
    let stores: Vec<u64> = vec![1, 2, 3];
    let regions = even_regions(opts.regions, &stores);
    let net = SimNetwork::new();
    let mut handles: HashMap<u64, StoreHandle> = HashMap::new();
    for s in &stores {
        let mut c = cfg.clone();
        c.storage.data_dir = opts.data_dir.join(format!("store{s}"));
        let engines = Engines::open(&c).map_err(|e| e.to_string())?;
        for r in &regions {
            bootstrap_region(&engines, r).map_err(|e| e.to_string())?;
        }
        let trans: Arc<dyn Transport> = Arc::new(net.clone());
        let h = start_store(*s, c, engines, trans, Arc::new(NoPd)).map_err(|e| e.to_string())?;
        net.register(*s, h.router.clone());
        handles.insert(*s, h);
    }
    // Wait for every Region to have a leader, and remember where.
    let mut leaders: HashMap<u64, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while leaders.len() < regions.len() {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} Regions elected a leader",
                leaders.len(),
                regions.len()
            ));
        }
        for r in &regions {
            if leaders.contains_key(&r.id) {
                continue;
            }
            for (s, h) in &handles {
                let (tx, rx) = std::sync::mpsc::channel();
                let _ = h.router.try_send(StoreMsg::QueryRegion {
                    region_id: r.id,
                    cb: Box::new(move |st| drop(tx.send(st))),
                });
                if let Ok(Some(st)) = rx.recv_timeout(Duration::from_secs(1)) {
                    if st.leader_id == st.peer.id {
                        leaders.insert(r.id, *s);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let fsyncs = || -> u64 {
        handles
            .values()
            .map(|h| h.stats.fsyncs.load(Ordering::Relaxed))
            .sum()
    };
    let value = vec![0x5au8; opts.value_size];
    let mut results = Vec::new();
    let mut seq = 0u64;
    for &n in &opts.concurrency {
        let (done_tx, done_rx) = unbounded::<(u64, Result<(), Error>)>();
        let send = |region_id: u64, seq: u64, leaders: &HashMap<u64, u64>| {
            let mut key = even_region_key(region_id);
            key.extend_from_slice(&seq.to_be_bytes());
            let m = Mutation {
                op: mutation::Op::Put as i32,
                cf: "default".into(),
                key,
                value: value.clone(),
            };
            let tx = done_tx.clone();
            let store = leaders[&region_id];
            let sent = handles[&store].router.try_send(StoreMsg::Write {
                region_id,
                epoch: RegionEpoch {
                    conf_ver: 1,
                    version: 1,
                },
                mutations: vec![m],
                term_fence: 0,
                cb: Box::new(move |r| drop(tx.send((region_id, r)))),
            });
            if let Err(e) = sent {
                let _ = done_tx.send((region_id, Err(e)));
            }
        };
        let start = Instant::now();
        let f0 = fsyncs();
        for i in 0..n {
            seq += 1;
            send(1 + (i as u64 % opts.regions), seq, &leaders);
        }
        let (mut ok, mut errors) = (0u64, 0u64);
        let until = start + Duration::from_secs(opts.secs);
        while Instant::now() < until {
            let Ok((region_id, r)) = done_rx.recv_timeout(Duration::from_secs(5)) else {
                break;
            };
            match r {
                Ok(()) => ok += 1,
                Err(Error::NotLeader {
                    leader: Some(l), ..
                }) => {
                    errors += 1;
                    leaders.insert(region_id, l.store_id);
                }
                Err(_) => errors += 1,
            }
            seq += 1;
            send(1 + seq % opts.regions, seq, &leaders);
        }
        let elapsed = start.elapsed().as_secs_f64();
        let syncs = fsyncs() - f0;
        // Drain what is still in flight before the next level.
        let drain_deadline = Instant::now() + Duration::from_secs(10);
        let mut outstanding = n;
        while outstanding > 0 && Instant::now() < drain_deadline {
            if done_rx.recv_timeout(Duration::from_millis(500)).is_ok() {
                outstanding -= 1;
            }
        }
        let r = RaftstoreBenchResult {
            engine: opts.engine.to_string(),
            concurrency: n,
            proposals: ok,
            proposals_per_sec: ok as f64 / elapsed,
            fsyncs_per_sec: syncs as f64 / elapsed,
            proposals_per_fsync: ok as f64 / (syncs.max(1)) as f64,
            errors,
        };
        eprintln!(
            "{:>20} concurrency {:>4}: {:>8.0} proposals/s, {:>7.0} fsyncs/s, {:>6.1} proposals/fsync",
            r.engine, n, r.proposals_per_sec, r.fsyncs_per_sec, r.proposals_per_fsync
        );
        results.push(r);
    }
    for (_, h) in handles {
        h.stop();
    }
    let _ = std::fs::remove_dir_all(&opts.data_dir);
    Ok(results)
}

pub fn render_table(results: &[RaftstoreBenchResult]) -> String {
    let mut out = String::from(
        "| engine | concurrent proposers | proposals/s | fsyncs/s (3 stores) | proposals per fsync | errors |\n|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {} |\n",
            r.engine,
            r.concurrency,
            r.proposals_per_sec,
            r.fsyncs_per_sec,
            r.proposals_per_fsync,
            r.errors
        ));
    }
    out
}
