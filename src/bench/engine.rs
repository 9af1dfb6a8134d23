//! `prkv bench engine`: the storage layer alone, both engine kinds side by side.
//!
//! Writes `--total` bytes of values spread evenly over `--regions` Regions, the way the
//! Raftstore's apply path does: each write batch holds a run of one Region's keys plus its
//! apply state. Measures throughput and write amplification, the bytes the process caused to be
//! written to disk (`write_bytes` of `/proc/self/io`: WAL, flushes and compactions) per byte of
//! keys and values written. Compactions are waited for before the final reading so that both
//! kinds pay for their LSM maintenance.
//!
//! The Raft log is not written here: both kinds write it identically in a full store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use prkv_proto::serverpb::RaftApplyState;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::config::{Config, EngineKind, ReadableSize};
use crate::storage::{Cf, Engines, KeyRange, RegionEngine, WriteBatch};

#[derive(Clone, Debug)]
pub struct EngineBenchOptions {
    pub kinds: Vec<EngineKind>,
    pub total_bytes: u64,
    pub regions: u64,
    pub value_size: usize,
    pub key_size: usize,
    pub batch_keys: usize,
    pub threads: usize,
    pub write_buffer_limit: ReadableSize,
    pub data_dir: PathBuf,
    pub seed: u64,
    /// Longest wait for background compactions after the load.
    pub settle_timeout: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineBenchResult {
    pub engine: String,
    pub user_bytes: u64,
    pub keys: u64,
    pub load_secs: f64,
    pub total_secs: f64,
    pub mb_per_sec: f64,
    pub keys_per_sec: f64,
    pub disk_write_bytes: u64,
    pub write_amplification: f64,
    pub compactions_settled: bool,
}

/// Bytes this process has caused to be written to storage so far.
pub fn process_write_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/io") else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The key of sequence number `seq` in Region `region`: a 4-byte Region prefix, then the
/// sequence number, padded to `key_size`.
fn bench_key(region: u64, seq: u64, key_size: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(key_size.max(12));
    k.extend_from_slice(&(region as u32).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k.resize(key_size.max(12), b'k');
    k
}

fn region_range(region: u64, regions: u64) -> KeyRange {
    let start = (region as u32).to_be_bytes().to_vec();
    let end = if region + 1 == regions {
        Vec::new()
    } else {
        ((region + 1) as u32).to_be_bytes().to_vec()
    };
    KeyRange::new(start, end)
}

pub fn run(opts: &EngineBenchOptions) -> Result<Vec<EngineBenchResult>, String> {
    let mut results = Vec::new();
    for kind in &opts.kinds {
        results.push(run_one(opts, *kind)?);
    }
    Ok(results)
}

fn run_one(opts: &EngineBenchOptions, kind: EngineKind) -> Result<EngineBenchResult, String> {
    let dir = opts.data_dir.join(kind.as_str());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
    }
    let mut config = Config::default();
    config.storage.data_dir = dir.clone();
    config.storage.engine = kind;
    config.rocksdb.write_buffer_limit = opts.write_buffer_limit;
    config.rocksdb.write_buffer_size =
        ReadableSize(opts.write_buffer_limit.0.min(ReadableSize::mib(64).0) / 2);
    config.validate().map_err(|e| e.to_string())?;
    let engines = Engines::open(&config).map_err(|e| e.to_string())?;
    let regions: Vec<Arc<dyn RegionEngine>> = (0..opts.regions)
        .map(|r| {
            engines
                .kv
                .open_region(r + 1, region_range(r, opts.regions), 0)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;

    let pair = (opts.key_size.max(12) + opts.value_size) as u64;
    let keys_total = opts.total_bytes / pair;
    let per_region = keys_total / opts.regions;
    let user_bytes = per_region * opts.regions * pair;
    let bar = ProgressBar::new(user_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>20} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .map_err(|e| e.to_string())?,
    );
    bar.set_prefix(kind.as_str());

    let written = Arc::new(AtomicU64::new(0));
    let io_before = process_write_bytes();
    let start = Instant::now();
    // Each thread owns a disjoint set of Regions, like apply workers do: a Region's batches are
    // applied in order by one thread.
    std::thread::scope(|s| -> Result<(), String> {
        let mut handles = Vec::new();
        for t in 0..opts.threads {
            let mine: Vec<Arc<dyn RegionEngine>> = regions
                .iter()
                .enumerate()
                .filter(|(i, _)| i % opts.threads == t)
                .map(|(_, r)| r.clone())
                .collect();
            let bar = bar.clone();
            let written = written.clone();
            let opts = opts.clone();
            handles.push(s.spawn(move || -> Result<(), String> {
                let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed ^ t as u64);
                // Random values: compression must not hide the bytes we claim to write.
                let mut pool = vec![0u8; 1 << 20];
                rng.fill_bytes(&mut pool);
                let mut next = vec![0u64; mine.len()];
                let mut applied = vec![0u64; mine.len()];
                let mut wb = WriteBatch::new();
                loop {
                    let mut progressed = false;
                    for (i, region) in mine.iter().enumerate() {
                        if next[i] >= per_region {
                            continue;
                        }
                        progressed = true;
                        wb.clear();
                        let n = (opts.batch_keys as u64).min(per_region - next[i]);
                        for _ in 0..n {
                            let key = bench_key(region.region_id() - 1, next[i], opts.key_size);
                            let off = rng.gen_range(0..pool.len() - opts.value_size);
                            wb.put(Cf::Default, &key, &pool[off..off + opts.value_size]);
                            next[i] += 1;
                        }
                        applied[i] += 1;
                        wb.set_apply_state(RaftApplyState {
                            applied_index: applied[i],
                            ..Default::default()
                        });
                        region.write(&wb).map_err(|e| e.to_string())?;
                        let bytes = n * pair;
                        written.fetch_add(bytes, Ordering::Relaxed);
                        bar.inc(bytes);
                    }
                    if !progressed {
                        return Ok(());
                    }
                }
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| "writer thread panicked".to_string())??;
        }
        Ok(())
    })?;
    let load_secs = start.elapsed().as_secs_f64();
    bar.finish();
    engines.kv.flush_all().map_err(|e| e.to_string())?;
    let settle_deadline = Instant::now() + opts.settle_timeout;
    let mut settled = false;
    while Instant::now() < settle_deadline {
        if !regions.iter().any(|r| r.background_work_pending()) {
            settled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let total_secs = start.elapsed().as_secs_f64();
    let disk = process_write_bytes().saturating_sub(io_before);
    let keys = written.load(Ordering::Relaxed) / pair;
    drop(regions);
    drop(engines);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(EngineBenchResult {
        engine: kind.as_str().to_string(),
        user_bytes,
        keys,
        load_secs,
        total_secs,
        mb_per_sec: user_bytes as f64 / (1 << 20) as f64 / load_secs,
        keys_per_sec: keys as f64 / load_secs,
        disk_write_bytes: disk,
        write_amplification: disk as f64 / user_bytes.max(1) as f64,
        compactions_settled: settled,
    })
}

fn gib(bytes: u64) -> String {
    format!("{:.2}GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Renders results as a Markdown table with ratios to the first row.
pub fn render_table(results: &[EngineBenchResult]) -> String {
    let mut out = String::from(
        "| engine | user data | load time | throughput | keys/s | disk writes | write amp. | vs first: throughput | vs first: write amp. |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let base = results.first();
    for r in results {
        let (tr, wr) = base.map_or((1.0, 1.0), |b| {
            (
                r.mb_per_sec / b.mb_per_sec,
                r.write_amplification / b.write_amplification.max(1e-9),
            )
        });
        out.push_str(&format!(
            "| {} | {} | {:.1}s | {:.1} MiB/s | {:.0} | {} | {:.2}{} | {:.2}x | {:.2}x |\n",
            r.engine,
            gib(r.user_bytes),
            r.load_secs,
            r.mb_per_sec,
            r.keys_per_sec,
            gib(r.disk_write_bytes),
            r.write_amplification,
            if r.compactions_settled {
                ""
            } else {
                " (compactions still running)"
            },
            tr,
            wr,
        ));
    }
    out
}

/// A scratch directory for one benchmark run.
pub fn default_bench_dir() -> PathBuf {
    Path::new("./prkv-data").join("bench-engine")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_in_their_region() {
        let r = region_range(3, 8);
        assert!(r.contains(&bench_key(3, 0, 16)));
        assert!(r.contains(&bench_key(3, u64::MAX, 16)));
        assert!(!r.contains(&bench_key(4, 0, 16)));
        assert!(region_range(7, 8).contains(&bench_key(7, 9, 16)));
        assert_eq!(bench_key(1, 2, 16).len(), 16);
    }

    #[test]
    fn small_run_completes_for_both_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let opts = EngineBenchOptions {
            kinds: vec![EngineKind::PartitionedRaftKv, EngineKind::RaftKv],
            total_bytes: 4 << 20,
            regions: 4,
            value_size: 256,
            key_size: 16,
            batch_keys: 32,
            threads: 2,
            write_buffer_limit: ReadableSize::mib(16),
            data_dir: dir.path().to_path_buf(),
            seed: 1,
            settle_timeout: Duration::from_secs(5),
        };
        let results = run(&opts).unwrap();
        assert_eq!(results.len(), 2);
        for r in &results {
            assert_eq!(r.keys * 272, r.user_bytes, "{r:?}");
        }
        assert!(render_table(&results).contains("raft-kv"));
    }
}
