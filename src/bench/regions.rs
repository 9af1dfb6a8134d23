//! `prkv bench regions`: cuts a running cluster's key space into many Regions, and puts a few
//! keys into each, to measure what a store with many (mostly idle) Regions costs.
//!
//! Region `i` gets the range `[r{i:08}, r{i+1:08})`; with `--layout ycsb`, the `count`
//! Regions instead cut `prkv bench ycsb`'s key space (`user` + 8 hashed bytes) evenly: a
//! pre-split for a load, as TiKV users pre-split before a bulk load. The splits go through the gRPC API, as a
//! client's would (`SplitRegion` to the leader, up to 256 split keys per request, the
//! Raftstore's batch-split limit), routed by PD; stale routes (a Region PD has not heard split
//! yet) are retried. Then `--keys-per-region` keys go into each Region with one `RawBatchPut`,
//! `--concurrency` requests in flight. Progress shows on a bar.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prkv_proto::kvrpcpb;
use prkv_proto::metapb::{Peer, Region};
use prkv_proto::pdpb;
use prkv_proto::tikvpb::tikv_client::TikvClient;
use tonic::transport::Channel;

/// The Raftstore refuses more split keys in one request (`raftstore::split::MAX_SPLIT_KEYS`).
const SPLIT_BATCH: usize = crate::raftstore::split::MAX_SPLIT_KEYS;
/// How long one request may keep failing (a Region PD has not heard of yet, an election)
/// before the run gives up.
const STUCK_AFTER: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct RegionsBenchOptions {
    pub pd: SocketAddr,
    pub layout: Layout,
    pub count: u64,
    pub keys_per_region: u64,
    pub value_size: usize,
    pub concurrency: usize,
}

/// How the key space is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// `r00000000`, `r00000001`, ...: one Region per number.
    Numbered,
    /// `prkv bench ycsb`'s keys (`user` + a hash as 8 big-endian bytes), cut evenly.
    Ycsb,
}

/// The first key of Region `i` of `count` (`i` from 0; Region 0 starts at the empty key).
pub fn region_start(layout: Layout, i: u64, count: u64) -> Vec<u8> {
    match layout {
        Layout::Numbered => format!("r{i:08}").into_bytes(),
        Layout::Ycsb => {
            let at = ((i as u128) << 64) / count.max(1) as u128;
            let mut k = b"user".to_vec();
            k.extend_from_slice(&(at as u64).to_be_bytes());
            k
        }
    }
}

struct Router {
    pd: pdpb::pd_client::PdClient<Channel>,
    header: Option<pdpb::RequestHeader>,
    stores: HashMap<u64, TikvClient<Channel>>,
}

impl Router {
    async fn connect(pd: SocketAddr) -> Result<Router, String> {
        let mut c = pdpb::pd_client::PdClient::connect(format!("http://{pd}"))
            .await
            .map_err(|e| format!("PD {pd}: {e}"))?;
        let m = c
            .get_members(pdpb::GetMembersRequest { header: None })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        Ok(Router {
            pd: c,
            header: Some(pdpb::RequestHeader {
                cluster_id: m.header.map_or(0, |h| h.cluster_id),
                sender_id: 0,
            }),
            stores: HashMap::new(),
        })
    }

    /// The Region holding `key` and its leader, as PD sees them.
    async fn locate(&mut self, key: &[u8]) -> Result<(Region, Peer), String> {
        let r = self
            .pd
            .get_region(pdpb::GetRegionRequest {
                header: self.header.clone(),
                region_key: key.to_vec(),
                need_buckets: false,
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        match (r.region, r.leader) {
            (Some(region), Some(leader)) => Ok((region, leader)),
            _ => Err(format!("PD knows no leader for key {key:?} yet")),
        }
    }

    async fn store(&mut self, store_id: u64) -> Result<TikvClient<Channel>, String> {
        if let Some(c) = self.stores.get(&store_id) {
            return Ok(c.clone());
        }
        let s = self
            .pd
            .get_store(pdpb::GetStoreRequest {
                header: self.header.clone(),
                store_id,
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let addr = s.store.map(|s| s.address).unwrap_or_default();
        let c = TikvClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| format!("store {store_id} at {addr}: {e}"))?;
        self.stores.insert(store_id, c.clone());
        Ok(c)
    }
}

fn ctx(region: &Region, leader: Peer) -> Option<kvrpcpb::Context> {
    Some(kvrpcpb::Context {
        region_id: region.id,
        region_epoch: region.region_epoch,
        peer: Some(leader),
        ..Default::default()
    })
}

fn bar(len: u64, what: &str) -> Result<indicatif::ProgressBar, String> {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "  {what} {{bar:30}} {{pos}}/{{len}} {{per_sec}} {{eta}}"
        ))
        .map_err(|e| e.to_string())?,
    );
    Ok(bar)
}

/// Splits until Regions start at every `region_start(1..count)`.
async fn split(router: &mut Router, layout: Layout, count: u64) -> Result<(), String> {
    let bar = bar(count.saturating_sub(1), "splitting")?;
    let mut next = 1u64; // the first split point not yet known to be a Region boundary
    let mut stuck_since: Option<Instant> = None;
    while next < count {
        let at = region_start(layout, next, count);
        let attempt = async {
            let (region, leader) = router.locate(&at).await?;
            if region.start_key == at {
                return Ok(1); // already a boundary
            }
            let end = &region.end_key;
            let keys: Vec<Vec<u8>> = (next..count)
                .map(|i| region_start(layout, i, count))
                .take_while(|k| end.is_empty() || k < end)
                .take(SPLIT_BATCH)
                .collect();
            let n = keys.len() as u64;
            let mut kv = router.store(leader.store_id).await?;
            let resp = kv
                .split_region(kvrpcpb::SplitRegionRequest {
                    context: ctx(&region, leader),
                    split_keys: keys,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            match resp.region_error {
                Some(e) => Err(format!("Region {}: {}", region.id, e.message)),
                None => Ok(n),
            }
        };
        match attempt.await {
            Ok(n) => {
                next += n;
                bar.inc(n);
                stuck_since = None;
            }
            Err(e) => {
                let since = *stuck_since.get_or_insert_with(Instant::now);
                if since.elapsed() > STUCK_AFTER {
                    return Err(format!("splitting at {at:?}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    bar.finish();
    Ok(())
}

/// Puts `keys_per_region` keys into every Region, `concurrency` requests at a time.
async fn fill(opts: &RegionsBenchOptions) -> Result<(), String> {
    if opts.keys_per_region == 0 {
        return Ok(());
    }
    let bar = Arc::new(bar(opts.count, "filling")?);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency.max(1) {
        let (opts, bar, next) = (opts.clone(), bar.clone(), next.clone());
        let mut r = Router::connect(opts.pd).await?;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= opts.count {
                    return Ok::<(), String>(());
                }
                let start = region_start(opts.layout, i, opts.count);
                let pairs: Vec<kvrpcpb::KvPair> = (0..opts.keys_per_region)
                    .map(|j| {
                        let mut key = start.clone();
                        key.extend_from_slice(format!("/{j:04}").as_bytes());
                        kvrpcpb::KvPair {
                            key,
                            value: vec![b'v'; opts.value_size],
                            ..Default::default()
                        }
                    })
                    .collect();
                let began = Instant::now();
                loop {
                    let attempt = async {
                        let (region, leader) = r.locate(&start).await?;
                        let mut kv = r.store(leader.store_id).await?;
                        let resp = kv
                            .raw_batch_put(kvrpcpb::RawBatchPutRequest {
                                context: ctx(&region, leader),
                                pairs: pairs.clone(),
                                ..Default::default()
                            })
                            .await
                            .map_err(|e| e.to_string())?
                            .into_inner();
                        match (resp.region_error, resp.error.is_empty()) {
                            (None, true) => Ok(()),
                            (Some(e), _) => Err(e.message),
                            (None, false) => Err(resp.error),
                        }
                    };
                    match attempt.await {
                        Ok(()) => break,
                        Err(e) if began.elapsed() > STUCK_AFTER => {
                            return Err(format!("filling Region {i}: {e}"))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                bar.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    bar.finish();
    Ok(())
}

/// Runs the splits, then the fill; returns (split seconds, fill seconds).
pub fn run(opts: &RegionsBenchOptions) -> Result<(f64, f64), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let started = Instant::now();
        let mut router = Router::connect(opts.pd).await?;
        split(&mut router, opts.layout, opts.count).await?;
        let split_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        fill(opts).await?;
        Ok((split_secs, started.elapsed().as_secs_f64()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ycsb_layout_cuts_the_hashed_key_space_evenly() {
        let starts: Vec<_> = (0..4).map(|i| region_start(Layout::Ycsb, i, 4)).collect();
        assert_eq!(starts[0], b"user\0\0\0\0\0\0\0\0");
        assert_eq!(starts[2], b"user\x80\0\0\0\0\0\0\0");
        assert!(starts.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(region_start(Layout::Numbered, 7, 100), b"r00000007");
    }
}
