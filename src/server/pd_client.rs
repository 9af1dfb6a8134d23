//! A store's link to PD: registration, ids, store and Region heartbeats, and the operators PD
//! sends back on the Region heartbeat stream.
//!
//! PD being away must not stop a store: every call here retries with capped exponential backoff,
//! Region heartbeats queue (bounded) and are dropped when PD cannot take them, and the store
//! keeps serving the Regions it leads meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prkv_proto::eraftpb::ConfChangeType;
use prkv_proto::metapb::{Peer, PeerRole, Region, Store};
use prkv_proto::pdpb::{self, pd_client::PdClient as GrpcPdClient};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::raftstore::msg::SplitIdsCallback;
use crate::raftstore::{ChangePeer, PdReporter, RegionHeartbeat, SplitIds, StoreMsg, StoreRouter};

/// Deadline of one PD call.
const PD_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// Region heartbeats waiting for the stream. A leader reports at most once per tick (and
/// periodically), so this covers thousands of Regions' reports; beyond it, reports are
/// dropped: the next one carries the same, newer information.
const REGION_HEARTBEAT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PdClientError {
    #[error("PD endpoint {0:?} is not a valid address")]
    BadEndpoint(String),
    #[error("PD call {call} failed: {status}")]
    Rpc { call: &'static str, status: String },
    #[error("PD refused {call}: {message}")]
    Refused {
        call: &'static str,
        kind: i32,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, PdClientError>;

#[derive(Clone)]
pub struct PdClient {
    grpc: GrpcPdClient<Channel>,
    cluster_id: Arc<AtomicU64>,
}

fn rpc_err(call: &'static str) -> impl Fn(tonic::Status) -> PdClientError {
    move |s| PdClientError::Rpc {
        call,
        status: format!("{}: {}", s.code(), s.message()),
    }
}

fn check(call: &'static str, h: Option<pdpb::ResponseHeader>) -> Result<()> {
    match h.and_then(|h| h.error) {
        Some(e) if e.r#type != pdpb::ErrorType::Ok as i32 => Err(PdClientError::Refused {
            call,
            kind: e.r#type,
            message: e.message,
        }),
        _ => Ok(()),
    }
}

/// Retries `f` until it succeeds, with capped exponential backoff, logging each failure.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "{what} failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

impl PdClient {
    /// A client for the first endpoint (prkv runs one PD). Connects lazily: calls fail, and
    /// are retried by their callers, until PD answers.
    pub fn new(endpoints: &[String], max_msg: usize) -> Result<PdClient> {
        let ep = endpoints.first().cloned().unwrap_or_default();
        let url = if ep.starts_with("http://") {
            ep.clone()
        } else {
            format!("http://{ep}")
        };
        let channel = Endpoint::from_shared(url)
            .map_err(|_| PdClientError::BadEndpoint(ep.clone()))?
            .connect_timeout(PD_TIMEOUT)
            .timeout(PD_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        let grpc = GrpcPdClient::new(channel)
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(max_msg);
        Ok(PdClient {
            grpc,
            cluster_id: Arc::new(AtomicU64::new(0)),
        })
    }

    fn header(&self) -> Option<pdpb::RequestHeader> {
        Some(pdpb::RequestHeader {
            cluster_id: self.cluster_id.load(Ordering::Relaxed),
            sender_id: 0,
        })
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id.load(Ordering::Relaxed)
    }

    /// Learns the cluster id (GetMembers).
    pub async fn connect(&self) -> Result<u64> {
        let resp = self
            .grpc
            .clone()
            .get_members(pdpb::GetMembersRequest { header: None })
            .await
            .map_err(rpc_err("GetMembers"))?
            .into_inner();
        let id = resp.header.map_or(0, |h| h.cluster_id);
        self.cluster_id.store(id, Ordering::Relaxed);
        Ok(id)
    }

    pub async fn alloc_id(&self) -> Result<u64> {
        let r = self
            .grpc
            .clone()
            .alloc_id(pdpb::AllocIdRequest {
                header: self.header(),
            })
            .await
            .map_err(rpc_err("AllocID"))?
            .into_inner();
        check("AllocID", r.header)?;
        Ok(r.id)
    }

    pub async fn is_bootstrapped(&self) -> Result<bool> {
        let r = self
            .grpc
            .clone()
            .is_bootstrapped(pdpb::IsBootstrappedRequest {
                header: self.header(),
            })
            .await
            .map_err(rpc_err("IsBootstrapped"))?
            .into_inner();
        check("IsBootstrapped", r.header)?;
        Ok(r.bootstrapped)
    }

    /// Bootstraps the cluster with `region`; `Ok(false)` if another store already did.
    pub async fn bootstrap(&self, store: Store, region: Region) -> Result<bool> {
        let r = self
            .grpc
            .clone()
            .bootstrap(pdpb::BootstrapRequest {
                header: self.header(),
                store: Some(store),
                region: Some(region),
            })
            .await
            .map_err(rpc_err("Bootstrap"))?
            .into_inner();
        match check("Bootstrap", r.header) {
            Ok(()) => Ok(true),
            Err(PdClientError::Refused { kind, .. })
                if kind == pdpb::ErrorType::AlreadyBootstrapped as i32 =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn put_store(&self, store: Store) -> Result<()> {
        let r = self
            .grpc
            .clone()
            .put_store(pdpb::PutStoreRequest {
                header: self.header(),
                store: Some(store),
            })
            .await
            .map_err(rpc_err("PutStore"))?
            .into_inner();
        check("PutStore", r.header)
    }

    /// The Region holding `key` and its leader, if PD knows one.
    pub async fn get_region(&self, key: &[u8]) -> Result<(Region, Option<Peer>)> {
        let r = self
            .grpc
            .clone()
            .get_region(pdpb::GetRegionRequest {
                header: self.header(),
                region_key: key.to_vec(),
                need_buckets: false,
            })
            .await
            .map_err(rpc_err("GetRegion"))?
            .into_inner();
        check("GetRegion", r.header)?;
        let region = r.region.ok_or(PdClientError::Refused {
            call: "GetRegion",
            kind: 0,
            message: "no Region holds the key".into(),
        })?;
        Ok((region, r.leader))
    }

    pub async fn get_store(&self, id: u64) -> Result<Store> {
        let r = self
            .grpc
            .clone()
            .get_store(pdpb::GetStoreRequest {
                header: self.header(),
                store_id: id,
            })
            .await
            .map_err(rpc_err("GetStore"))?
            .into_inner();
        check("GetStore", r.header)?;
        r.store.ok_or(PdClientError::Refused {
            call: "GetStore",
            kind: 0,
            message: format!("store {id} unknown"),
        })
    }

    /// Whether PD knows store `id` (registered it, or took it in at bootstrap). An error only
    /// when PD could not be asked.
    pub async fn store_known(&self, id: u64) -> Result<bool> {
        match self.get_store(id).await {
            Ok(_) => Ok(true),
            Err(PdClientError::Refused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// PD's GC safe point: versions below it that a newer one hides may be removed.
    pub async fn gc_safe_point(&self) -> Result<u64> {
        let r = self
            .grpc
            .clone()
            .get_gc_safe_point(pdpb::GetGcSafePointRequest {
                header: self.header(),
            })
            .await
            .map_err(rpc_err("GetGCSafePoint"))?
            .into_inner();
        check("GetGCSafePoint", r.header)?;
        Ok(r.safe_point)
    }

    pub async fn store_heartbeat(&self, stats: pdpb::StoreStats) -> Result<()> {
        let r = self
            .grpc
            .clone()
            .store_heartbeat(pdpb::StoreHeartbeatRequest {
                header: self.header(),
                stats: Some(stats),
                ..Default::default()
            })
            .await
            .map_err(rpc_err("StoreHeartbeat"))?
            .into_inner();
        check("StoreHeartbeat", r.header)
    }

    pub async fn ask_batch_split(&self, region: Region, count: usize) -> Result<Vec<SplitIds>> {
        let r = self
            .grpc
            .clone()
            .ask_batch_split(pdpb::AskBatchSplitRequest {
                header: self.header(),
                region: Some(region),
                split_count: count as u32,
            })
            .await
            .map_err(rpc_err("AskBatchSplit"))?
            .into_inner();
        check("AskBatchSplit", r.header)?;
        Ok(r.ids
            .into_iter()
            .map(|i| SplitIds {
                new_region_id: i.new_region_id,
                new_peer_ids: i.new_peer_ids,
            })
            .collect())
    }

    pub async fn report_batch_split(&self, regions: Vec<Region>) -> Result<()> {
        let r = self
            .grpc
            .clone()
            .report_batch_split(pdpb::ReportBatchSplitRequest {
                header: self.header(),
                regions,
            })
            .await
            .map_err(rpc_err("ReportBatchSplit"))?
            .into_inner();
        check("ReportBatchSplit", r.header)
    }

    /// The Region heartbeat path: the reporter the store loop pushes into, and the task (to
    /// start once the store runs) that keeps the stream open, reconnecting with backoff, and
    /// hands PD's operators to the store.
    pub fn region_heartbeats(&self) -> (Arc<PdHeartbeats>, RegionHeartbeatTask) {
        let (tx, rx) = mpsc::channel(REGION_HEARTBEAT_QUEUE);
        (
            Arc::new(PdHeartbeats {
                tx,
                client: self.clone(),
                rt: tokio::runtime::Handle::current(),
            }),
            RegionHeartbeatTask {
                client: self.clone(),
                rx,
            },
        )
    }

    async fn region_heartbeat_loop(
        self,
        mut rx: mpsc::Receiver<RegionHeartbeat>,
        router: StoreRouter,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let (stream_tx, stream_rx) = mpsc::channel::<pdpb::RegionHeartbeatRequest>(256);
            let mut grpc = self.grpc.clone();
            // No deadline on the stream itself: it lives as long as the store.
            let open =
                grpc.region_heartbeat(tokio_stream::wrappers::ReceiverStream::new(stream_rx));
            let mut responses = match tokio::time::timeout(PD_TIMEOUT, open).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "opening the Region heartbeat stream failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                Err(_) => {
                    tracing::warn!(retry_in = ?backoff, "opening the Region heartbeat stream timed out");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            tracing::info!("Region heartbeat stream open");
            loop {
                tokio::select! {
                    hb = rx.recv() => {
                        let Some(hb) = hb else { return };
                        let req = pdpb::RegionHeartbeatRequest {
                            header: self.header(),
                            region: Some(hb.region),
                            leader: Some(hb.leader),
                            pending_peers: hb.pending_peers,
                            approximate_size: hb.approximate_size,
                            approximate_keys: hb.approximate_keys,
                            term: hb.term,
                            ..Default::default()
                        };
                        if stream_tx.send(req).await.is_err() {
                            break;
                        }
                    }
                    resp = responses.next() => {
                        match resp {
                            Some(Ok(r)) => on_operator(&router, r),
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "Region heartbeat stream broke");
                                break;
                            }
                            None => break,
                        }
                    }
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }
}

pub struct RegionHeartbeatTask {
    client: PdClient,
    rx: mpsc::Receiver<RegionHeartbeat>,
}

impl RegionHeartbeatTask {
    pub fn start(self, router: StoreRouter) {
        tokio::spawn(self.client.region_heartbeat_loop(self.rx, router));
    }
}

/// Hands an operator from PD to the Region's leader.
fn on_operator(router: &StoreRouter, r: pdpb::RegionHeartbeatResponse) {
    let region_id = r.region_id;
    if let Some(cp) = r.change_peer {
        let Some(mut peer) = cp.peer else { return };
        let change = match ConfChangeType::try_from(cp.change_type) {
            Ok(ConfChangeType::AddNode) => {
                peer.role = PeerRole::Voter as i32;
                ChangePeer::AddVoter(peer)
            }
            Ok(ConfChangeType::AddLearnerNode) => {
                peer.role = PeerRole::Learner as i32;
                ChangePeer::AddLearner(peer)
            }
            Ok(ConfChangeType::RemoveNode) => ChangePeer::Remove(peer),
            Err(_) => return,
        };
        tracing::info!(region_id, ?change, "operator from PD");
        let _ = router.try_send(StoreMsg::ChangePeers {
            region_id,
            changes: vec![change],
            cb: Box::new(move |res| {
                if let Err(e) = res {
                    tracing::info!(region_id, error = %e, "PD operator did not apply");
                }
            }),
        });
    }
    if let Some(sr) = r.split_region {
        let epoch = r.region_epoch.unwrap_or_default();
        tracing::info!(region_id, keys = sr.keys.len(), "split from PD");
        let msg = if sr.keys.is_empty() {
            StoreMsg::HalfSplit { region_id, epoch }
        } else {
            let mut keys = sr.keys;
            keys.sort();
            keys.dedup();
            StoreMsg::SplitRegion {
                region_id,
                epoch,
                split_keys: keys,
                cb: Box::new(move |res| {
                    if let Err(e) = res {
                        tracing::info!(region_id, error = %e, "split from PD did not happen");
                    }
                }),
            }
        };
        let _ = router.try_send(msg);
    }
    if let Some(m) = r.merge {
        let Some(target) = m.target else { return };
        tracing::info!(region_id, target = target.id, "merge from PD");
        let _ = router.try_send(StoreMsg::PrepareMerge {
            region_id,
            target_id: target.id,
            cb: Box::new(move |res| {
                if let Err(e) = res {
                    tracing::info!(region_id, error = %e, "merge from PD not prepared");
                }
            }),
        });
    }
    if let Some(tl) = r.transfer_leader {
        if let Some(to) = tl.peer {
            let _ = router.try_send(StoreMsg::TransferLeader { region_id, to });
        }
    }
}

/// The store loop's side of PD: the Region heartbeat stream, and split ids asked on the
/// runtime so that the loop never waits for PD.
pub struct PdHeartbeats {
    tx: mpsc::Sender<RegionHeartbeat>,
    client: PdClient,
    rt: tokio::runtime::Handle,
}

impl PdReporter for PdHeartbeats {
    fn region_heartbeat(&self, hb: RegionHeartbeat) {
        // Never block the store loop; a dropped report is superseded by the next one.
        let _ = self.tx.try_send(hb);
    }

    fn ask_batch_split(&self, region: Region, count: usize, cb: SplitIdsCallback) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            let res = tokio::time::timeout(PD_TIMEOUT, client.ask_batch_split(region, count)).await;
            cb(match res {
                Ok(Ok(ids)) => Ok(ids),
                Ok(Err(e)) => Err(crate::raftstore::Error::Pd(e.to_string())),
                Err(_) => Err(crate::raftstore::Error::Pd(
                    "AskBatchSplit timed out".into(),
                )),
            });
        });
    }

    fn report_batch_split(&self, regions: Vec<Region>) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            // Best effort: the new Regions' heartbeats tell PD the same a moment later.
            match tokio::time::timeout(PD_TIMEOUT, client.report_batch_split(regions)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::info!(error = %e, "ReportBatchSplit failed"),
                Err(_) => tracing::info!("ReportBatchSplit timed out"),
            }
        });
    }
}
