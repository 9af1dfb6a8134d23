//! `prkv bench split`: how long a split of a big Region takes, from the proposal to both
//! halves serving, for each engine kind and Region size.
//!
//! Three stores in one process (the simulated network) replicate one Region. Its data is bulk
//! loaded straight into every replica's engine and flushed (a Region that has lived a while),
//! then the leader is asked to split it in the middle. Measured: from sending the split request
//! to a linearizable read answered by the leader of each half. The partitioned engine's split is
//! a flush plus a checkpoint (hard links) per child, so it should not grow with the Region;
//! `raft-kv`'s is metadata only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, EngineKind, ReadableDuration, ReadableSize};
use crate::raftstore::{
    bootstrap_region, even_regions, start_store, NoPd, SimNetwork, StoreHandle, StoreMsg, Transport,
};
use crate::storage::{Cf, Engines, StoreEngine, WriteBatch};

#[derive(Clone, Debug)]
pub struct SplitBenchOptions {
    pub engines: Vec<EngineKind>,
    pub sizes: Vec<u64>,
    pub value_size: usize,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct SplitBenchResult {
    pub engine: String,
    pub region_bytes: u64,
    pub keys: u64,
    /// Split request sent -> both halves answered a linearizable read.
    pub split_ms: f64,
    /// Of which: request sent -> the split applied on the leader.
    pub applied_ms: f64,
}

const TIMEOUT: Duration = Duration::from_secs(60);

pub fn key(i: u64) -> Vec<u8> {
    format!("k{i:012}").into_bytes()
}

struct Cluster {
    handles: HashMap<u64, StoreHandle>,
    kv: HashMap<u64, Arc<dyn StoreEngine>>,
}

fn start(engine: EngineKind, dir: &std::path::Path) -> Result<Cluster, String> {
    let mut cfg = Config::default();
    cfg.storage.engine = engine;
    cfg.rocksdb.write_buffer_limit = ReadableSize::mib(512);
    cfg.rocksdb.write_buffer_size = ReadableSize::mib(64);
    cfg.raftstore.raft_base_tick_interval = ReadableDuration::millis(100);
    cfg.raftstore.raft_store_max_leader_lease = ReadableDuration::millis(900);
    cfg.validate().map_err(|e| e.to_string())?;
    let stores = [1u64, 2, 3];
    let regions = even_regions(1, &stores);
    let net = SimNetwork::new();
    let mut c = Cluster {
        handles: HashMap::new(),
        kv: HashMap::new(),
    };
    for s in stores {
        let mut sc = cfg.clone();
        sc.storage.data_dir = dir.join(format!("store{s}"));
        let engines = Engines::open(&sc).map_err(|e| e.to_string())?;
        for r in &regions {
            bootstrap_region(&engines, r).map_err(|e| e.to_string())?;
        }
        c.kv.insert(s, engines.kv.clone());
        let trans: Arc<dyn Transport> = Arc::new(net.clone());
        let h = start_store(s, sc, engines, trans, Arc::new(NoPd)).map_err(|e| e.to_string())?;
        net.register(s, h.router.clone());
        c.handles.insert(s, h);
    }
    Ok(c)
}

impl Cluster {
    /// The store leading `region_id` and the Region's epoch there.
    fn leader(&self, region_id: u64) -> Option<(u64, prkv_proto::metapb::RegionEpoch)> {
        for (s, h) in &self.handles {
            let (tx, rx) = std::sync::mpsc::channel();
            let _ = h.router.try_send(StoreMsg::QueryRegion {
                region_id,
                cb: Box::new(move |st| drop(tx.send(st))),
            });
            if let Ok(Some(st)) = rx.recv_timeout(Duration::from_secs(1)) {
                if st.leader_id == st.peer.id && st.leader_id != 0 {
                    return Some((*s, st.region.region_epoch.unwrap_or_default()));
                }
            }
        }
        None
    }

    fn must_leader(
        &self,
        region_id: u64,
    ) -> Result<(u64, prkv_proto::metapb::RegionEpoch), String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(l) = self.leader(region_id) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(format!("Region {region_id} has no leader"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A linearizable read of `k` through the Region's leader succeeded.
    fn read_ok(&self, region_id: u64, k: &[u8]) -> bool {
        let Some((s, epoch)) = self.leader(region_id) else {
            return false;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let k = k.to_vec();
        let sent = self.handles[&s].router.try_send(StoreMsg::Read {
            region_id,
            epoch,
            cb: Box::new(move |r| {
                let ok =
                    r.is_ok_and(|snap| snap.snap.get(Cf::Default, &k).is_ok_and(|v| v.is_some()));
                let _ = tx.send(ok);
            }),
        });
        sent.is_ok() && rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
    }
}

/// Writes `keys` keys with `value_size`-byte values into every replica's engine, then flushes.
fn bulk_load(c: &Cluster, keys: u64, value_size: usize) -> Result<(), String> {
    let mut rng = super::add_replica::XorShift(0x2545_f491_4f6c_dd1d);
    let bar = indicatif::ProgressBar::new(keys * c.kv.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  loading {bar:30} {pos}/{len} keys {eta}")
            .map_err(|e| e.to_string())?,
    );
    for kv in c.kv.values() {
        let engine = kv.region(1).ok_or("Region 1 has no engine")?;
        let mut wb = WriteBatch::new();
        for i in 0..keys {
            wb.put(Cf::Default, &key(i), &rng.bytes(value_size));
            // 4 MiB batches: large enough to load fast, small enough to stay far below the
            // memtable limit.
            if wb.data_bytes() >= 4 << 20 {
                engine.write(&wb).map_err(|e| e.to_string())?;
                bar.inc(wb.len() as u64);
                wb.clear();
            }
        }
        if !wb.is_empty() {
            engine.write(&wb).map_err(|e| e.to_string())?;
            bar.inc(wb.len() as u64);
        }
        engine.flush(true).map_err(|e| e.to_string())?;
    }
    bar.finish_and_clear();
    Ok(())
}

pub fn run(opts: &SplitBenchOptions) -> Result<Vec<SplitBenchResult>, String> {
    let mut results = Vec::new();
    for &engine in &opts.engines {
        for &size in &opts.sizes {
            let dir = opts.data_dir.join(format!("{}-{size}", engine.as_str()));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
            }
            let keys = (size / (opts.value_size as u64 + 13)).max(2);
            eprintln!(
                "{}: Region of {} ({keys} keys)",
                engine.as_str(),
                ReadableSize(size)
            );
            let c = start(engine, &dir)?;
            c.must_leader(1)?;
            bulk_load(&c, keys, opts.value_size)?;
            let (leader, epoch) = c.must_leader(1)?;
            let mid = key(keys / 2);
            let (tx, rx) = std::sync::mpsc::channel();
            let started = Instant::now();
            c.handles[&leader]
                .router
                .try_send(StoreMsg::SplitRegion {
                    region_id: 1,
                    epoch,
                    split_keys: vec![mid.clone()],
                    cb: Box::new(move |r| drop(tx.send(r))),
                })
                .map_err(|e| e.to_string())?;
            let regions = rx
                .recv_timeout(TIMEOUT)
                .map_err(|_| "the split never answered".to_string())?
                .map_err(|e| format!("split failed: {e}"))?;
            let applied = started.elapsed();
            let (left, right) = (regions[0].id, regions[1].id);
            let deadline = Instant::now() + TIMEOUT;
            let (mut left_ok, mut right_ok) = (false, false);
            while !(left_ok && right_ok) {
                left_ok = left_ok || c.read_ok(left, &key(0));
                right_ok = right_ok || c.read_ok(right, &mid);
                if Instant::now() > deadline {
                    return Err("the halves never served reads".into());
                }
            }
            let total = started.elapsed();
            results.push(SplitBenchResult {
                engine: engine.as_str().to_string(),
                region_bytes: size,
                keys,
                split_ms: total.as_secs_f64() * 1e3,
                applied_ms: applied.as_secs_f64() * 1e3,
            });
            drop(c);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(results)
}

pub fn render_table(results: &[SplitBenchResult]) -> String {
    let mut out = format!(
        "{:<22} {:>10} {:>12} {:>14} {:>12}\n",
        "engine", "region", "keys", "split->serve", "applied"
    );
    for r in results {
        out.push_str(&format!(
            "{:<22} {:>10} {:>12} {:>11.1} ms {:>9.1} ms\n",
            r.engine,
            ReadableSize(r.region_bytes).to_string(),
            r.keys,
            r.split_ms,
            r.applied_ms
        ));
    }
    out
}
