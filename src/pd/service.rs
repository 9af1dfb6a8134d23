//! PD's gRPC face: `pdpb.PD` and `keyspacepb.Keyspace`.
//!
//! Errors PD knows about (not bootstrapped, unknown store, ...) go back in the response
//! header's `error`, as PD reports them and the TiKV clients expect; transport-level problems
//! (a malformed request, a cluster-id mismatch) are gRPC statuses.

// Handlers answer with `tonic::Status`, as every gRPC handler does; its size is tonic's choice.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use prkv_proto::keyspacepb::{self, keyspace_server::Keyspace};
use prkv_proto::pdpb::{self, pd_server::Pd};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::cluster::{Cluster, ClusterError, RegionInfo};
use super::meta::MetaStore;
use super::tso::Tso;

/// Region heartbeat responses queued per store stream: operators are rare, and a store that
/// does not read its stream must not make PD buffer without bound.
const HEARTBEAT_RESPONSE_QUEUE: usize = 1024;

/// Everything PD's handlers share.
pub struct PdState {
    /// Fixed when PD first starts; kept outside the cluster lock so that building a response
    /// header never takes it (handlers build headers while holding it).
    cluster_id: u64,
    pub cluster: Mutex<Cluster>,
    pub tso: Mutex<Tso>,
    pub meta: Arc<MetaStore>,
    pub member: pdpb::Member,
    /// The response half of each store's Region heartbeat stream, by store id.
    heartbeat_streams:
        Mutex<HashMap<u64, mpsc::Sender<Result<pdpb::RegionHeartbeatResponse, Status>>>>,
}

impl PdState {
    pub fn new(cluster: Cluster, tso: Tso, meta: Arc<MetaStore>, member: pdpb::Member) -> Self {
        PdState {
            cluster_id: cluster.id,
            cluster: Mutex::new(cluster),
            tso: Mutex::new(tso),
            meta,
            member,
            heartbeat_streams: Mutex::new(HashMap::new()),
        }
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    fn header(&self) -> Option<pdpb::ResponseHeader> {
        Some(pdpb::ResponseHeader {
            cluster_id: self.cluster_id(),
            error: None,
        })
    }

    fn error_header(&self, e: &ClusterError) -> Option<pdpb::ResponseHeader> {
        let t = match e {
            ClusterError::NotBootstrapped => pdpb::ErrorType::NotBootstrapped,
            ClusterError::AlreadyBootstrapped => pdpb::ErrorType::AlreadyBootstrapped,
            ClusterError::StoreTombstone(_) => pdpb::ErrorType::StoreTombstone,
            ClusterError::RegionNotFound(_) => pdpb::ErrorType::RegionNotFound,
            ClusterError::StoreNotFound(_) => pdpb::ErrorType::Unknown,
            ClusterError::Invalid(_) => pdpb::ErrorType::InvalidValue,
            ClusterError::Meta(_) => pdpb::ErrorType::Unknown,
        };
        Some(pdpb::ResponseHeader {
            cluster_id: self.cluster_id(),
            error: Some(pdpb::Error {
                r#type: t as i32,
                message: e.to_string(),
            }),
        })
    }

    /// Rejects requests meant for another cluster (0 = the sender does not know yet).
    fn check_header(&self, h: &Option<pdpb::RequestHeader>) -> Result<(), Status> {
        let id = h.as_ref().map_or(0, |h| h.cluster_id);
        let mine = self.cluster_id();
        if id != 0 && id != mine {
            return Err(Status::failed_precondition(format!(
                "request for cluster {id}, this PD serves cluster {mine}"
            )));
        }
        Ok(())
    }
}

/// The gRPC handlers (one instance per server, cheap to clone).
#[derive(Clone)]
pub struct PdService {
    pub state: Arc<PdState>,
}

type GrpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn region_resp(state: &PdState, info: Option<&RegionInfo>) -> pdpb::GetRegionResponse {
    match info {
        None => pdpb::GetRegionResponse {
            header: state.header(),
            ..Default::default()
        },
        Some(i) => pdpb::GetRegionResponse {
            header: state.header(),
            region: Some(i.region.clone()),
            leader: i.leader,
            down_peers: i.down_peers.clone(),
            pending_peers: i.pending_peers.clone(),
            buckets: None,
        },
    }
}

#[tonic::async_trait]
impl Pd for PdService {
    async fn get_members(
        &self,
        _req: Request<pdpb::GetMembersRequest>,
    ) -> Result<Response<pdpb::GetMembersResponse>, Status> {
        let m = self.state.member.clone();
        Ok(Response::new(pdpb::GetMembersResponse {
            header: self.state.header(),
            members: vec![m.clone()],
            leader: Some(m.clone()),
            etcd_leader: Some(m),
            tso_allocator_leaders: HashMap::new(),
        }))
    }

    type TsoStream = GrpcStream<pdpb::TsoResponse>;

    async fn tso(
        &self,
        req: Request<Streaming<pdpb::TsoRequest>>,
    ) -> Result<Response<Self::TsoStream>, Status> {
        let mut input = req.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(r) = input.next().await {
                let resp = match r {
                    Err(_) => break,
                    Ok(r) => {
                        if let Err(s) = state.check_header(&r.header) {
                            Err(s)
                        } else if r.count == 0 {
                            Err(Status::invalid_argument("tso count must be at least 1"))
                        } else {
                            let out = state.tso.lock().allocate(r.count, &state.meta);
                            match out {
                                Ok((physical, logical)) => {
                                    crate::metrics::PD_TSO_REQUESTS.inc();
                                    Ok(pdpb::TsoResponse {
                                        header: state.header(),
                                        count: r.count,
                                        timestamp: Some(pdpb::Timestamp {
                                            physical: physical as i64,
                                            logical: logical as i64,
                                            suffix_bits: 0,
                                        }),
                                    })
                                }
                                Err(e) => Err(Status::unavailable(e.to_string())),
                            }
                        }
                    }
                };
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn bootstrap(
        &self,
        req: Request<pdpb::BootstrapRequest>,
    ) -> Result<Response<pdpb::BootstrapResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let (Some(store), Some(region)) = (r.store, r.region) else {
            return Err(Status::invalid_argument(
                "bootstrap needs a store and a Region",
            ));
        };
        let res = self.state.cluster.lock().bootstrap(store, region);
        let header = match res {
            Ok(()) => {
                tracing::info!("cluster bootstrapped");
                self.state.header()
            }
            Err(e) => self.state.error_header(&e),
        };
        Ok(Response::new(pdpb::BootstrapResponse {
            header,
            ..Default::default()
        }))
    }

    async fn is_bootstrapped(
        &self,
        req: Request<pdpb::IsBootstrappedRequest>,
    ) -> Result<Response<pdpb::IsBootstrappedResponse>, Status> {
        self.state.check_header(&req.get_ref().header)?;
        Ok(Response::new(pdpb::IsBootstrappedResponse {
            header: self.state.header(),
            bootstrapped: self.state.cluster.lock().is_bootstrapped(),
        }))
    }

    async fn alloc_id(
        &self,
        req: Request<pdpb::AllocIdRequest>,
    ) -> Result<Response<pdpb::AllocIdResponse>, Status> {
        self.state.check_header(&req.get_ref().header)?;
        let id = self.state.cluster.lock().alloc_id();
        match id {
            Ok(id) => Ok(Response::new(pdpb::AllocIdResponse {
                header: self.state.header(),
                id,
            })),
            Err(e) => Ok(Response::new(pdpb::AllocIdResponse {
                header: self.state.error_header(&e),
                id: 0,
            })),
        }
    }

    async fn get_store(
        &self,
        req: Request<pdpb::GetStoreRequest>,
    ) -> Result<Response<pdpb::GetStoreResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let c = self.state.cluster.lock();
        Ok(Response::new(match c.store(r.store_id) {
            Ok(s) => pdpb::GetStoreResponse {
                header: self.state.header(),
                store: Some(s.meta.clone()),
                stats: s.stats.clone(),
            },
            Err(e) => pdpb::GetStoreResponse {
                header: self.state.error_header(&e),
                ..Default::default()
            },
        }))
    }

    async fn put_store(
        &self,
        req: Request<pdpb::PutStoreRequest>,
    ) -> Result<Response<pdpb::PutStoreResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let Some(store) = r.store else {
            return Err(Status::invalid_argument("PutStore needs a store"));
        };
        let res = self.state.cluster.lock().put_store(store);
        Ok(Response::new(pdpb::PutStoreResponse {
            header: match res {
                Ok(()) => self.state.header(),
                Err(e) => self.state.error_header(&e),
            },
            ..Default::default()
        }))
    }

    async fn get_all_stores(
        &self,
        req: Request<pdpb::GetAllStoresRequest>,
    ) -> Result<Response<pdpb::GetAllStoresResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let c = self.state.cluster.lock();
        let stores = c
            .stores()
            .filter(|s| {
                !(r.exclude_tombstone_stores
                    && s.meta.state == prkv_proto::metapb::StoreState::Tombstone as i32)
            })
            .map(|s| s.meta.clone())
            .collect();
        Ok(Response::new(pdpb::GetAllStoresResponse {
            header: self.state.header(),
            stores,
        }))
    }

    async fn store_heartbeat(
        &self,
        req: Request<pdpb::StoreHeartbeatRequest>,
    ) -> Result<Response<pdpb::StoreHeartbeatResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let Some(stats) = r.stats else {
            return Err(Status::invalid_argument("StoreHeartbeat needs stats"));
        };
        let res = {
            let mut c = self.state.cluster.lock();
            let res = c.store_heartbeat(stats);
            // Offline stores that were emptied become Tombstone.
            if let Err(e) = c.bury_empty_stores() {
                tracing::warn!(error = %e, "marking emptied stores Tombstone failed");
            }
            res
        };
        Ok(Response::new(pdpb::StoreHeartbeatResponse {
            header: match res {
                Ok(()) => self.state.header(),
                Err(e) => self.state.error_header(&e),
            },
            ..Default::default()
        }))
    }

    type RegionHeartbeatStream = GrpcStream<pdpb::RegionHeartbeatResponse>;

    async fn region_heartbeat(
        &self,
        req: Request<Streaming<pdpb::RegionHeartbeatRequest>>,
    ) -> Result<Response<Self::RegionHeartbeatStream>, Status> {
        let mut input = req.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(HEARTBEAT_RESPONSE_QUEUE);
        tokio::spawn(async move {
            let mut registered = 0;
            while let Some(Ok(r)) = input.next().await {
                if state.check_header(&r.header).is_err() {
                    break;
                }
                let (Some(region), Some(leader)) = (r.region, r.leader) else {
                    continue;
                };
                if registered != leader.store_id {
                    registered = leader.store_id;
                    state
                        .heartbeat_streams
                        .lock()
                        .insert(leader.store_id, tx.clone());
                }
                crate::metrics::PD_REGION_HEARTBEATS.inc();
                let region_id = region.id;
                let info = RegionInfo {
                    region,
                    leader: Some(leader),
                    down_peers: r.down_peers,
                    pending_peers: r.pending_peers,
                    approximate_size: r.approximate_size,
                    approximate_keys: r.approximate_keys,
                    term: r.term,
                };
                let op = {
                    let mut c = state.cluster.lock();
                    match c.update_region(info) {
                        Ok(true) => c.schedule(region_id),
                        Ok(false) => Ok(None),
                        Err(e) => Err(e),
                    }
                };
                match op {
                    Ok(Some(mut resp)) => {
                        resp.header = state.header();
                        let target = resp.target_peer.map_or(0, |p| p.store_id);
                        let sender = state.heartbeat_streams.lock().get(&target).cloned();
                        if let Some(s) = sender {
                            // Full queue: the operator is re-sent after the next heartbeat.
                            let _ = s.try_send(Ok(resp));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(region_id, error = %e, "Region heartbeat failed"),
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_region(
        &self,
        req: Request<pdpb::GetRegionRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let c = self.state.cluster.lock();
        Ok(Response::new(region_resp(
            &self.state,
            c.region_by_key(&r.region_key),
        )))
    }

    async fn get_prev_region(
        &self,
        req: Request<pdpb::GetRegionRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let c = self.state.cluster.lock();
        Ok(Response::new(region_resp(
            &self.state,
            c.prev_region(&r.region_key),
        )))
    }

    async fn get_region_by_id(
        &self,
        req: Request<pdpb::GetRegionByIdRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let c = self.state.cluster.lock();
        Ok(Response::new(region_resp(
            &self.state,
            c.region_by_id(r.region_id),
        )))
    }

    async fn scan_regions(
        &self,
        req: Request<pdpb::ScanRegionsRequest>,
    ) -> Result<Response<pdpb::ScanRegionsResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let c = self.state.cluster.lock();
        let limit = usize::try_from(r.limit.max(0)).unwrap_or(0);
        let found = c.scan_regions(&r.start_key, &r.end_key, limit);
        let mut resp = pdpb::ScanRegionsResponse {
            header: self.state.header(),
            ..Default::default()
        };
        for i in found {
            resp.region_metas.push(i.region.clone());
            resp.leaders.push(i.leader.unwrap_or_default());
            resp.regions.push(pdpb::Region {
                region: Some(i.region.clone()),
                leader: i.leader,
                down_peers: i.down_peers.clone(),
                pending_peers: i.pending_peers.clone(),
            });
        }
        Ok(Response::new(resp))
    }

    async fn ask_batch_split(
        &self,
        req: Request<pdpb::AskBatchSplitRequest>,
    ) -> Result<Response<pdpb::AskBatchSplitResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let Some(region) = r.region else {
            return Err(Status::invalid_argument("AskBatchSplit needs the Region"));
        };
        // Bounded: a split into more than this many pieces is a bug or an attack.
        if r.split_count == 0 || r.split_count > 1024 {
            return Err(Status::invalid_argument(format!(
                "split_count {} is outside 1..=1024",
                r.split_count
            )));
        }
        let mut c = self.state.cluster.lock();
        let mut ids = Vec::new();
        for _ in 0..r.split_count {
            let alloc = (|| -> Result<pdpb::SplitId, ClusterError> {
                let new_region_id = c.alloc_id()?;
                let mut new_peer_ids = Vec::new();
                for _ in &region.peers {
                    new_peer_ids.push(c.alloc_id()?);
                }
                Ok(pdpb::SplitId {
                    new_region_id,
                    new_peer_ids,
                })
            })();
            match alloc {
                Ok(id) => ids.push(id),
                Err(e) => {
                    return Ok(Response::new(pdpb::AskBatchSplitResponse {
                        header: self.state.error_header(&e),
                        ids: vec![],
                    }))
                }
            }
        }
        Ok(Response::new(pdpb::AskBatchSplitResponse {
            header: self.state.header(),
            ids,
        }))
    }

    async fn report_batch_split(
        &self,
        req: Request<pdpb::ReportBatchSplitRequest>,
    ) -> Result<Response<pdpb::ReportBatchSplitResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        // The new Regions enter the routing table at once (no gap opens between the shrunk
        // parent and children that have not reported yet). Their leaders have not reported
        // either, so PD names the likely one: the replica on the parent leader's store, which
        // campaigns right after the split. A wrong guess costs the client one NotLeader with
        // the right hint; no leader at all would leave tikv-client 0.4's scans stuck on a
        // cached leaderless Region.
        let mut c = self.state.cluster.lock();
        let leader_store = r
            .regions
            .first()
            .and_then(|p| c.region_by_id(p.id))
            .and_then(|i| i.leader)
            .map(|l| l.store_id);
        for region in r.regions {
            // A heartbeat may have beaten this report here: keep what it said.
            let known = c
                .region_by_id(region.id)
                .filter(|k| k.region == region && k.leader.is_some())
                .cloned();
            let info = match known {
                Some(k) => k,
                None => RegionInfo {
                    leader: leader_store
                        .and_then(|s| region.peers.iter().find(|p| p.store_id == s).copied()),
                    region,
                    ..Default::default()
                },
            };
            if let Err(e) = c.update_region(info) {
                return Ok(Response::new(pdpb::ReportBatchSplitResponse {
                    header: self.state.error_header(&e),
                }));
            }
        }
        Ok(Response::new(pdpb::ReportBatchSplitResponse {
            header: self.state.header(),
        }))
    }

    async fn get_gc_safe_point(
        &self,
        req: Request<pdpb::GetGcSafePointRequest>,
    ) -> Result<Response<pdpb::GetGcSafePointResponse>, Status> {
        self.state.check_header(&req.get_ref().header)?;
        Ok(Response::new(pdpb::GetGcSafePointResponse {
            header: self.state.header(),
            safe_point: self.state.cluster.lock().gc_safe_point(),
        }))
    }

    async fn update_gc_safe_point(
        &self,
        req: Request<pdpb::UpdateGcSafePointRequest>,
    ) -> Result<Response<pdpb::UpdateGcSafePointResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        let res = self.state.cluster.lock().update_gc_safe_point(r.safe_point);
        Ok(Response::new(match res {
            Ok(sp) => pdpb::UpdateGcSafePointResponse {
                header: self.state.header(),
                new_safe_point: sp,
            },
            Err(e) => pdpb::UpdateGcSafePointResponse {
                header: self.state.error_header(&e),
                new_safe_point: 0,
            },
        }))
    }
}

/// The one keyspace prkv has: "DEFAULT", id 0 (API v2 keys start `r\0\0\0`).
pub fn default_keyspace() -> keyspacepb::KeyspaceMeta {
    keyspacepb::KeyspaceMeta {
        id: 0,
        name: "DEFAULT".into(),
        state: keyspacepb::KeyspaceState::Enabled as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Keyspace for PdService {
    async fn load_keyspace(
        &self,
        req: Request<keyspacepb::LoadKeyspaceRequest>,
    ) -> Result<Response<keyspacepb::LoadKeyspaceResponse>, Status> {
        let r = req.into_inner();
        self.state.check_header(&r.header)?;
        if r.name != "DEFAULT" {
            let e = ClusterError::Invalid(format!("keyspace {:?} does not exist", r.name));
            let mut header = self.state.error_header(&e);
            if let Some(h) = header.as_mut().and_then(|h| h.error.as_mut()) {
                h.r#type = pdpb::ErrorType::EntryNotFound as i32;
            }
            return Ok(Response::new(keyspacepb::LoadKeyspaceResponse {
                header,
                keyspace: None,
            }));
        }
        Ok(Response::new(keyspacepb::LoadKeyspaceResponse {
            header: self.state.header(),
            keyspace: Some(default_keyspace()),
        }))
    }
}
