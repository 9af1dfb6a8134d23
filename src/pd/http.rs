//! PD's JSON HTTP API, served on the gRPC port (as PD does: tools read
//! `http://<pd>/pd/api/v1/...` from the same address clients use for gRPC).
//!
//! tonic routes requests by their first path segment, `/<service>/...`; this service names
//! itself `pd`, so every `/pd/...` request (HTTP/1.1 or HTTP/2) lands here.
//!
//! | path | answer |
//! |---|---|
//! | `GET /pd/api/v1/health` | `[{"name", "member_id", "client_urls", "health": true}]` |
//! | `GET /pd/api/v1/stores` | `{"count", "stores": [{"store": {...}, "status": {...}}]}` |
//! | `GET /pd/api/v1/regions` | `{"count", "regions": [region]}` in key order |
//! | `GET /pd/api/v1/region/id/{id}` | one `region`, or 404 |
//! | `GET /pd/api/v1/store/{id}` | one store, or 404 |
//! | `POST /pd/api/v1/region/split/{id}` | splits the Region in half (an operator sent to its leader) |
//! | `POST /pd/api/v1/region/merge/{source}/{target}` | merges Region `source` into its neighbour `target` |
//! | `POST /pd/api/v1/region/transfer-leader/{id}/{store}` | moves the Region's leadership to its replica on `store` |
//! | `POST /pd/api/v1/region/remove-peer/{id}/{store}` | removes the Region's replica on `store` (the replica checker adds one back if it is short) |
//! | `DELETE /pd/api/v1/store/{id}` | scale in: the store goes Offline, its replicas move away, then it is Tombstone |
//!
//! A store's `state_name` is Up, Disconnected (no heartbeat for 20 s), Down (none for
//! `schedule.max-store-down-time`), Offline or Tombstone; its `region_count` and
//! `leader_count` are PD's Region table's.
//!
//! Keys are hex-encoded raw keys (uppercase). A `region` is
//! `{"id", "start_key", "end_key", "epoch": {"conf_ver", "version"}, "peers": [{"id",
//! "store_id", "role_name"}], "leader": peer|null, "pending_peers", "down_peers",
//! "approximate_size", "approximate_keys"}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use prkv_proto::metapb::{Peer, PeerRole};
use serde_json::{json, Value};
use tonic::codegen::{http, Body as _, BoxFuture, Service};

use super::cluster::{Cluster, ClusterError, RegionInfo, StoreInfo};
use super::service::PdState;

#[derive(Clone)]
pub struct PdHttp {
    pub state: Arc<PdState>,
}

impl tonic::server::NamedService for PdHttp {
    const NAME: &'static str = "pd";
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn peer_json(p: &Peer) -> Value {
    let role = if p.role == PeerRole::Learner as i32 {
        "Learner"
    } else {
        "Voter"
    };
    json!({"id": p.id, "store_id": p.store_id, "role_name": role})
}

/// `"<a>/<b>"` as two ids (the tail of the two-id POST endpoints).
fn two_ids(ids: &str) -> Option<(u64, u64)> {
    let (a, b) = ids.split_once('/')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

pub fn region_json(i: &RegionInfo) -> Value {
    let e = i.region.region_epoch.unwrap_or_default();
    json!({
        "id": i.region.id,
        "start_key": hex(&i.region.start_key),
        "end_key": hex(&i.region.end_key),
        "epoch": {"conf_ver": e.conf_ver, "version": e.version},
        "peers": i.region.peers.iter().map(peer_json).collect::<Vec<_>>(),
        "leader": i.leader.as_ref().map(peer_json),
        "pending_peers": i.pending_peers.iter().map(peer_json).collect::<Vec<_>>(),
        "down_peers": i.down_peers.iter().map(|d| json!({
            "peer": d.peer.as_ref().map(peer_json),
            "down_seconds": d.down_seconds,
        })).collect::<Vec<_>>(),
        "approximate_size": i.approximate_size,
        "approximate_keys": i.approximate_keys,
    })
}

fn store_json(c: &Cluster, s: &StoreInfo) -> Value {
    let state = c.store_state_name(s);
    let (regions, leaders) = c.store_counts(s.meta.id);
    let st = s.stats.clone().unwrap_or_default();
    json!({
        "store": {
            "id": s.meta.id,
            "address": s.meta.address,
            "status_address": s.meta.status_address,
            "version": s.meta.version,
            "state_name": state,
        },
        "status": {
            "alive": s.alive(),
            "capacity": st.capacity,
            "available": st.available,
            "used_size": st.used_size,
            "region_count": regions,
            "leader_count": leaders,
            "reported_region_count": st.region_count,
            "last_heartbeat": s.meta.last_heartbeat,
        },
    })
}

fn respond(status: http::StatusCode, body: Value) -> http::Response<tonic::body::BoxBody> {
    let text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| "null".into());
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            hyper::Body::from(text)
                .map_err(|e| tonic::Status::internal(e.to_string()))
                .boxed_unsync(),
        )
        .unwrap_or_else(|_| http::Response::new(tonic::body::empty_body()))
}

fn not_found(what: String) -> http::Response<tonic::body::BoxBody> {
    respond(http::StatusCode::NOT_FOUND, json!({ "error": what }))
}

impl PdHttp {
    fn handle(&self, method: &http::Method, path: &str) -> http::Response<tonic::body::BoxBody> {
        let path = path.trim_end_matches('/');
        if method == http::Method::DELETE {
            // Scale in: `DELETE /pd/api/v1/store/{id}` makes the store Offline.
            let Some(id) = path.strip_prefix("/pd/api/v1/store/") else {
                return not_found(format!("no such endpoint: {path}"));
            };
            let Ok(id) = id.parse::<u64>() else {
                return respond(
                    http::StatusCode::BAD_REQUEST,
                    json!({"error": format!("{id:?} is not a store id")}),
                );
            };
            return match self.state.cluster.lock().delete_store(id) {
                Ok(()) => respond(http::StatusCode::OK, json!({"deleted": id})),
                Err(ClusterError::StoreNotFound(_)) => not_found(format!("store {id} not found")),
                Err(e) => respond(
                    http::StatusCode::BAD_REQUEST,
                    json!({"error": e.to_string()}),
                ),
            };
        }
        if method == http::Method::POST {
            if let Some(ids) = path.strip_prefix("/pd/api/v1/region/merge/") {
                let Some((source, target)) = two_ids(ids) else {
                    return respond(
                        http::StatusCode::BAD_REQUEST,
                        json!({"error": format!("{ids:?} is not <source id>/<target id>")}),
                    );
                };
                return match self.state.cluster.lock().merge_region(source, target) {
                    Ok(()) => respond(
                        http::StatusCode::OK,
                        json!({"merge": source, "into": target}),
                    ),
                    Err(ClusterError::RegionNotFound(id)) => {
                        not_found(format!("Region {id} not found"))
                    }
                    Err(e) => respond(
                        http::StatusCode::BAD_REQUEST,
                        json!({"error": e.to_string()}),
                    ),
                };
            }
            // `POST /pd/api/v1/region/{transfer-leader,remove-peer}/{id}/{store}`.
            for (prefix, what) in [
                ("/pd/api/v1/region/transfer-leader/", "transfer-leader"),
                ("/pd/api/v1/region/remove-peer/", "remove-peer"),
            ] {
                let Some(ids) = path.strip_prefix(prefix) else {
                    continue;
                };
                let Some((region, store)) = two_ids(ids) else {
                    return respond(
                        http::StatusCode::BAD_REQUEST,
                        json!({"error": format!("{ids:?} is not <region id>/<store id>")}),
                    );
                };
                let mut c = self.state.cluster.lock();
                let res = if what == "transfer-leader" {
                    c.transfer_leader(region, store)
                } else {
                    c.remove_peer(region, store)
                };
                return match res {
                    Ok(()) => respond(
                        http::StatusCode::OK,
                        json!({ what: region, "store": store }),
                    ),
                    Err(ClusterError::RegionNotFound(id)) => {
                        not_found(format!("Region {id} not found"))
                    }
                    Err(e) => respond(
                        http::StatusCode::BAD_REQUEST,
                        json!({"error": e.to_string()}),
                    ),
                };
            }
            // `POST /pd/api/v1/region/split/{id}`: split the Region in half.
            let Some(id) = path.strip_prefix("/pd/api/v1/region/split/") else {
                return not_found(format!("no such endpoint: {path}"));
            };
            let Ok(id) = id.parse::<u64>() else {
                return respond(
                    http::StatusCode::BAD_REQUEST,
                    json!({"error": format!("{id:?} is not a Region id")}),
                );
            };
            return match self.state.cluster.lock().split_region(id, Vec::new()) {
                Ok(()) => respond(http::StatusCode::OK, json!({"split": id})),
                Err(ClusterError::RegionNotFound(_)) => not_found(format!("Region {id} not found")),
                Err(e) => respond(
                    http::StatusCode::BAD_REQUEST,
                    json!({"error": e.to_string()}),
                ),
            };
        }
        if method != http::Method::GET {
            return respond(
                http::StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "only GET, POST and DELETE are served"}),
            );
        }
        match path {
            "/pd/api/v1/health" => {
                let m = &self.state.member;
                respond(
                    http::StatusCode::OK,
                    json!([{
                        "name": m.name,
                        "member_id": m.member_id,
                        "client_urls": m.client_urls,
                        "health": true,
                    }]),
                )
            }
            "/pd/api/v1/stores" => {
                let c = self.state.cluster.lock();
                let stores: Vec<Value> = c.stores().map(|s| store_json(&c, s)).collect();
                respond(
                    http::StatusCode::OK,
                    json!({"count": stores.len(), "stores": stores}),
                )
            }
            "/pd/api/v1/regions" => {
                let c = self.state.cluster.lock();
                let regions: Vec<Value> = c.regions_in_order().map(region_json).collect();
                respond(
                    http::StatusCode::OK,
                    json!({"count": regions.len(), "regions": regions}),
                )
            }
            p if p.starts_with("/pd/api/v1/store/") => {
                let id = &p["/pd/api/v1/store/".len()..];
                let Ok(id) = id.parse::<u64>() else {
                    return respond(
                        http::StatusCode::BAD_REQUEST,
                        json!({"error": format!("{id:?} is not a store id")}),
                    );
                };
                let c = self.state.cluster.lock();
                match c.store(id) {
                    Ok(s) => respond(http::StatusCode::OK, store_json(&c, s)),
                    Err(_) => not_found(format!("store {id} not found")),
                }
            }
            p if p.starts_with("/pd/api/v1/region/id/") => {
                let id = &p["/pd/api/v1/region/id/".len()..];
                let Ok(id) = id.parse::<u64>() else {
                    return respond(
                        http::StatusCode::BAD_REQUEST,
                        json!({"error": format!("{id:?} is not a Region id")}),
                    );
                };
                let c = self.state.cluster.lock();
                match c.region_by_id(id) {
                    Some(r) => respond(http::StatusCode::OK, region_json(r)),
                    None => not_found(format!("Region {id} not found")),
                }
            }
            _ => not_found(format!("no such endpoint: {path}")),
        }
    }
}

impl<B: Send + 'static> Service<http::Request<B>> for PdHttp {
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let resp = self.handle(req.method(), req.uri().path());
        Box::pin(async move { Ok(resp) })
    }
}
