//! `prkv bench add-replica`: how long a new replica of a big Region takes to catch up, the
//! scale-out cost, for each engine kind, next to copying the same bytes with `cp`.
//!
//! Real processes on this machine: a PD and two stores (`prkv pd`, `prkv store`, as users run
//! them) with one Region, loaded through the gRPC API (`RawBatchPut`) to `--size`. Then a third
//! store starts; PD's replica checker adds a learner there, the leader sends it a snapshot over
//! the snapshot stream (partitioned: the tablet's files; raft-kv: SSTs scanned from the shared
//! DB, ingested on arrival), and PD promotes it once it caught up. Measured: from PD seeing the
//! learner to PD seeing it promoted (what an operator waits for), and the time `cp -r` takes to
//! copy the leader's data directory for the Region (the floor for moving those bytes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use prkv_proto::kvrpcpb;
use prkv_proto::pdpb;
use serde::Serialize;

use crate::config::{EngineKind, ReadableSize};
use crate::playground::{spawn, terminate};

#[derive(Clone, Debug)]
pub struct AddReplicaBenchOptions {
    pub engines: Vec<EngineKind>,
    pub size: u64,
    pub value_size: usize,
    pub base_port: u16,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct AddReplicaBenchResult {
    pub engine: String,
    pub region_bytes: u64,
    /// Learner added -> promoted (caught up from its snapshot).
    pub add_replica_secs: f64,
    /// `cp -r` of the leader's copy of the Region's data.
    pub cp_secs: f64,
    /// The same, then `sync -f` so that the copy is durable, as an installed snapshot is.
    pub cp_sync_secs: f64,
    pub copied_bytes: u64,
}

const STORE_CONFIG: &str = r#"
[raftstore]
raft-base-tick-interval = "100ms"
raft-heartbeat-ticks = 2
raft-election-timeout-ticks = 10
raft-store-max-leader-lease = "800ms"
pd-heartbeat-tick-interval = "1s"
pd-store-heartbeat-tick-interval = "1s"

[server]
# The bench measures the transfer itself, not the default throttle (100MiB/s).
snap-io-max-bytes-per-sec = "8GiB"
"#;

struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (name, c) in self.0.iter_mut().rev() {
            terminate(name, c, Duration::from_secs(10));
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn start_store(
    exe: &Path,
    dir: &Path,
    engine: EngineKind,
    n: u16,
    base: u16,
) -> Result<(String, Child), String> {
    let data = dir.join(format!("store-{n}"));
    let cfg = format!(
        "{STORE_CONFIG}\n[storage]\nengine = \"{}\"\ndata-dir = {:?}\n[pd]\nendpoints = [\"{}\"]\n",
        engine.as_str(),
        data,
        addr(base)
    );
    // Sections must be unique: append the addresses to [server] by rewriting it.
    let cfg = cfg.replace(
        "[server]\n",
        &format!(
            "[server]\naddr = \"{}\"\nstatus-addr = \"{}\"\n",
            addr(base + 2 * n - 1),
            addr(base + 2 * n)
        ),
    );
    let path = dir.join(format!("store-{n}.toml"));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let child = spawn(
        exe,
        &[
            "store".into(),
            "--config".into(),
            path.display().to_string(),
        ],
        &dir.join(format!("store-{n}.log")),
    )?;
    Ok((format!("store {n}"), child))
}

async fn pd_client(
    pd: SocketAddr,
) -> Result<
    (
        pdpb::pd_client::PdClient<tonic::transport::Channel>,
        Option<pdpb::RequestHeader>,
    ),
    String,
> {
    let mut c = pdpb::pd_client::PdClient::connect(format!("http://{pd}"))
        .await
        .map_err(|e| e.to_string())?;
    let m = c
        .get_members(pdpb::GetMembersRequest { header: None })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let header = Some(pdpb::RequestHeader {
        cluster_id: m.header.map_or(0, |h| h.cluster_id),
        sender_id: 0,
    });
    Ok((c, header))
}

/// PD's view of the only Region: (Region, leader).
async fn region(
    pd: SocketAddr,
) -> Result<(prkv_proto::metapb::Region, Option<prkv_proto::metapb::Peer>), String> {
    let (mut c, header) = pd_client(pd).await?;
    let r = c
        .get_region(pdpb::GetRegionRequest {
            header,
            region_key: b"k".to_vec(),
            need_buckets: false,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok((r.region.unwrap_or_default(), r.leader))
}

async fn store_addr(pd: SocketAddr, store_id: u64) -> Result<String, String> {
    let (mut c, header) = pd_client(pd).await?;
    let r = c
        .get_store(pdpb::GetStoreRequest { header, store_id })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok(r.store.map(|s| s.address).unwrap_or_default())
}

/// Waits until the Region has `voters` voters and a leader; returns them.
async fn wait_voters(
    pd: SocketAddr,
    voters: usize,
    timeout: Duration,
) -> Result<(prkv_proto::metapb::Region, prkv_proto::metapb::Peer), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((r, Some(l))) = region(pd).await {
            let n = r
                .peers
                .iter()
                .filter(|p| p.role == prkv_proto::metapb::PeerRole::Voter as i32)
                .count();
            if n == voters && r.peers.len() == voters {
                return Ok((r, l));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the Region never had {voters} voters"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Loads `size` bytes through the leader, in 1 MiB `RawBatchPut`s.
async fn load(pd: SocketAddr, size: u64, value_size: usize) -> Result<(), String> {
    let per_batch = ((1 << 20) / value_size).max(1) as u64;
    let total_keys = size / value_size as u64;
    let bar = indicatif::ProgressBar::new(total_keys);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  loading {bar:30} {pos}/{len} keys {eta}")
            .map_err(|e| e.to_string())?,
    );
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut next = 0u64;
    let mut client = None;
    while next < total_keys {
        if client.is_none() {
            let (r, leader) = wait_voters(pd, 2, Duration::from_secs(60)).await?;
            let address = store_addr(pd, leader.store_id).await?;
            let kv =
                prkv_proto::tikvpb::tikv_client::TikvClient::connect(format!("http://{address}"))
                    .await
                    .map_err(|e| e.to_string())?
                    .max_encoding_message_size(16 << 20);
            client = Some((kv, r, leader));
        }
        let Some((kv, r, leader)) = client.as_mut() else {
            continue;
        };
        let pairs: Vec<kvrpcpb::KvPair> = (next..(next + per_batch).min(total_keys))
            .map(|i| kvrpcpb::KvPair {
                key: format!("k{i:012}").into_bytes(),
                value: rng.bytes(value_size),
                ..Default::default()
            })
            .collect();
        let n = pairs.len() as u64;
        let resp = kv
            .raw_batch_put(kvrpcpb::RawBatchPutRequest {
                context: Some(kvrpcpb::Context {
                    region_id: r.id,
                    region_epoch: r.region_epoch,
                    peer: Some(*leader),
                    ..Default::default()
                }),
                pairs,
                ..Default::default()
            })
            .await;
        match resp {
            Ok(resp)
                if resp.get_ref().region_error.is_none() && resp.get_ref().error.is_empty() =>
            {
                next += n;
                bar.inc(n);
            }
            _ => client = None, // re-route and retry
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// Incompressible values: RocksDB compresses repeated bytes to almost nothing, which would
/// make every copy look free.
pub(crate) struct XorShift(pub u64);

impl XorShift {
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            out.extend_from_slice(&self.0.to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The leader's copy of the Region's data: its tablet, or the shared DB.
fn region_data_dir(store_dir: &Path, engine: EngineKind, region_id: u64) -> Option<PathBuf> {
    match engine {
        EngineKind::RaftKv => Some(store_dir.join("db")),
        EngineKind::PartitionedRaftKv => std::fs::read_dir(store_dir.join("tablets"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{region_id}_")) && !n.contains('.'))
            })
            .max(),
    }
}

async fn run_one(
    exe: &Path,
    opts: &AddReplicaBenchOptions,
    engine: EngineKind,
) -> Result<AddReplicaBenchResult, String> {
    let dir = opts.data_dir.join(engine.as_str());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let base = opts.base_port;
    let pd = addr(base);
    let mut procs = Procs(Vec::new());
    procs.0.push((
        "PD".into(),
        spawn(
            exe,
            &[
                "pd".into(),
                "--addr".into(),
                pd.to_string(),
                "--data-dir".into(),
                dir.join("pd").display().to_string(),
            ],
            &dir.join("pd.log"),
        )?,
    ));
    for n in 1..=2 {
        procs.0.push(start_store(exe, &dir, engine, n, base)?);
    }
    eprintln!("{}: loading {}", engine.as_str(), ReadableSize(opts.size));
    load(pd, opts.size, opts.value_size).await?;
    let (r, leader) = wait_voters(pd, 2, Duration::from_secs(60)).await?;
    procs.0.push(start_store(exe, &dir, engine, 3, base)?);
    eprintln!(
        "{}: store 3 started; waiting for its replica",
        engine.as_str()
    );
    // Learner appears...
    let deadline = Instant::now() + Duration::from_secs(600);
    let added = loop {
        if let Ok((r, _)) = region(pd).await {
            if r.peers.len() == 3 {
                break Instant::now();
            }
        }
        if Instant::now() > deadline {
            return Err("PD never added the third replica".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // ... and is promoted once caught up.
    wait_voters(pd, 3, Duration::from_secs(600)).await?;
    let took = added.elapsed();
    // The floor: copying the leader's data for the Region.
    let leader_index = if leader.store_id == procs_store_id(pd, base, 1).await? {
        1
    } else {
        2
    };
    let src = region_data_dir(&dir.join(format!("store-{leader_index}")), engine, r.id)
        .ok_or("the leader's data directory was not found")?;
    let copied_bytes = dir_size(&src);
    let dst = dir.join("cp-copy");
    let started = Instant::now();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(&src)
        .arg(&dst)
        .status()
        .map_err(|e| format!("running cp: {e}"))?;
    let cp_secs = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("cp -r {} failed", src.display()));
    }
    let synced = std::process::Command::new("sync")
        .arg("-f")
        .arg(&dst)
        .status()
        .map_err(|e| format!("running sync: {e}"))?;
    let cp_sync_secs = started.elapsed().as_secs_f64();
    if !synced.success() {
        return Err("sync -f failed".into());
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(AddReplicaBenchResult {
        engine: engine.as_str().to_string(),
        region_bytes: opts.size,
        add_replica_secs: took.as_secs_f64(),
        cp_secs,
        cp_sync_secs,
        copied_bytes,
    })
}

/// The store id PD gave the store process `n`.
async fn procs_store_id(pd: SocketAddr, base: u16, n: u16) -> Result<u64, String> {
    let want = addr(base + 2 * n - 1).to_string();
    let (mut c, header) = pd_client(pd).await?;
    let stores = c
        .get_all_stores(pdpb::GetAllStoresRequest {
            header,
            exclude_tombstone_stores: true,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .stores;
    stores
        .iter()
        .find(|s| s.address == want)
        .map(|s| s.id)
        .ok_or_else(|| format!("no store at {want}"))
}

pub fn run(opts: &AddReplicaBenchOptions) -> Result<Vec<AddReplicaBenchResult>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for &engine in &opts.engines {
        out.push(rt.block_on(run_one(&exe, opts, engine))?);
    }
    Ok(out)
}

pub fn render_table(results: &[AddReplicaBenchResult]) -> String {
    let mut out = format!(
        "{:<22} {:>8} {:>13} {:>11} {:>8} {:>13} {:>8} {:>10}\n",
        "engine", "region", "add replica", "cp -r", "ratio", "cp -r + sync", "ratio", "copied"
    );
    for r in results {
        out.push_str(&format!(
            "{:<22} {:>8} {:>11.2} s {:>9.2} s {:>7.2}x {:>11.2} s {:>7.2}x {:>10}\n",
            r.engine,
            ReadableSize(r.region_bytes).to_string(),
            r.add_replica_secs,
            r.cp_secs,
            r.add_replica_secs / r.cp_secs.max(1e-9),
            r.cp_sync_secs,
            r.add_replica_secs / r.cp_sync_secs.max(1e-9),
            ReadableSize(r.copied_bytes).to_string()
        ));
    }
    if results.len() >= 2 {
        out.push_str(&format!(
            "{} adds a replica {:.2}x faster than {}\n",
            results[0].engine,
            results[1].add_replica_secs / results[0].add_replica_secs.max(1e-9),
            results[1].engine
        ));
    }
    out
}
