//! The store's status port: `GET /metrics` (Prometheus text), `GET /status` (JSON), and
//! `GET /region/{id}/checksum`: a checksum of this store's replica of a Region (every column
//! family, read from the local engine, not through Raft) with its applied index, so that
//! replicas can be compared (`{"region_id", "applied_index", "keys", "crc32"}`).
//! `/fault/partition` injects network partitions for fault tests (see `server::fault`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, StatusCode};
use serde_json::json;

use crate::raftstore::StoreStats;

/// What `/status` reports.
pub struct StatusInfo {
    pub store_id: u64,
    pub cluster_id: u64,
    pub address: String,
    pub engine: &'static str,
    pub api_version: u8,
    pub started: Instant,
    pub stats: Arc<StoreStats>,
    pub kv: Arc<dyn crate::storage::StoreEngine>,
}

/// CRC-32 over every (column family, key, value) of the local replica, in key order.
fn region_checksum(info: &StatusInfo, region_id: u64) -> Option<serde_json::Value> {
    use crate::storage::{Cf, ScanDir};
    let engine = info.kv.region(region_id)?;
    let snap = engine.snapshot();
    let applied = engine
        .apply_state()
        .ok()
        .flatten()
        .map_or(0, |s| s.applied_index);
    let mut crc = crc32fast::Hasher::new();
    let mut keys = 0u64;
    for cf in Cf::ALL {
        crc.update(cf.name().as_bytes());
        snap.scan(cf, &[], &[], ScanDir::Forward, &mut |k, v| {
            keys += 1;
            crc.update(&(k.len() as u64).to_be_bytes());
            crc.update(k);
            crc.update(&(v.len() as u64).to_be_bytes());
            crc.update(v);
            true
        })
        .ok()?;
    }
    Some(json!({
        "region_id": region_id,
        "applied_index": applied,
        "keys": keys,
        "crc32": crc.finalize(),
    }))
}

fn handle(req: &Request<Body>, info: &StatusInfo) -> Response<Body> {
    if req.uri().path() == "/fault/partition" {
        return fault_partition(req);
    }
    if req.uri().path() == "/fault/crash" {
        return fault_crash(req);
    }
    if req.uri().path() == "/fault/delay" {
        return fault_delay(req);
    }
    if req.method() != Method::GET {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .body(Body::from("only GET is served\n"))
            .unwrap_or_default();
    }
    match req.uri().path() {
        "/metrics" => {
            crate::metrics::STORE_REGIONS.set(info.stats.regions.load(Ordering::Relaxed) as i64);
            crate::metrics::STORE_LEADERS.set(info.stats.leaders.load(Ordering::Relaxed) as i64);
            Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Body::from(crate::metrics::render()))
                .unwrap_or_default()
        }
        "/status" => {
            let body = json!({
                "store_id": info.store_id,
                "cluster_id": info.cluster_id,
                "address": info.address,
                "engine": info.engine,
                "api_version": info.api_version,
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_secs": info.started.elapsed().as_secs(),
                "regions": info.stats.regions.load(Ordering::Relaxed),
                "leaders": info.stats.leaders.load(Ordering::Relaxed),
                "proposals": info.stats.proposals.load(Ordering::Relaxed),
                "applied_entries": info.stats.applied_entries.load(Ordering::Relaxed),
                "fsyncs": info.stats.fsyncs.load(Ordering::Relaxed),
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap_or_default()
        }
        p if p.starts_with("/region/") && p.ends_with("/checksum") => {
            let id = p["/region/".len()..p.len() - "/checksum".len()].parse::<u64>();
            let body = id
                .ok()
                .and_then(|id| tokio::task::block_in_place(|| region_checksum(info, id)));
            match body {
                Some(b) => Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(b.to_string()))
                    .unwrap_or_default(),
                None => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Body::from("no such Region on this store\n"))
                    .unwrap_or_default(),
            }
        }
        other => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from(format!("no such endpoint: {other}\n")))
            .unwrap_or_default(),
    }
}

/// `/fault/partition` (see `server::fault`): 403 unless faults are on.
fn fault_partition(req: &Request<Body>) -> Response<Body> {
    let json_response = |status: StatusCode, body: serde_json::Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap_or_default()
    };
    if !super::fault::enabled() {
        return json_response(
            StatusCode::FORBIDDEN,
            json!({"error": "faults are off (start the store with PRKV_FAULTS=1)"}),
        );
    }
    match *req.method() {
        Method::GET => json_response(StatusCode::OK, json!({"cut": super::fault::cut_stores()})),
        Method::POST => match super::fault::set_partition(req.uri().query().unwrap_or("")) {
            Ok(cut) => json_response(StatusCode::OK, json!({ "cut": cut })),
            Err(e) => json_response(StatusCode::BAD_REQUEST, json!({ "error": e })),
        },
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "GET or POST"}),
        ),
    }
}

/// `POST /fault/delay?stores=..&ms=..` (see `server::fault`): 403 unless faults are on.
fn fault_delay(req: &Request<Body>) -> Response<Body> {
    let json_response = |status: StatusCode, body: serde_json::Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap_or_default()
    };
    if req.method() != Method::POST {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "POST"}));
    }
    match super::fault::set_delay(req.uri().query().unwrap_or("")) {
        Ok((stores, ms)) => json_response(StatusCode::OK, json!({"delayed": stores, "ms": ms})),
        Err(e) if !super::fault::enabled() => {
            json_response(StatusCode::FORBIDDEN, json!({ "error": e }))
        }
        Err(e) => json_response(StatusCode::BAD_REQUEST, json!({ "error": e })),
    }
}

/// `POST /fault/crash?point=<name>[&nth=<n>]` arms a crash point (`crate::crash`);
/// `?point=` disarms them all. 403 unless faults are on.
pub fn fault_crash(req: &Request<Body>) -> Response<Body> {
    let json_response = |status: StatusCode, body: serde_json::Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap_or_default()
    };
    if !super::fault::enabled() {
        return json_response(
            StatusCode::FORBIDDEN,
            json!({"error": "faults are off (start the process with PRKV_FAULTS=1)"}),
        );
    }
    if req.method() != Method::POST {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "POST"}));
    }
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let Some(point) = param("point") else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "expected ?point=<name>[&nth=<n>] (empty name: disarm all)"}),
        );
    };
    if point.is_empty() {
        crate::crash::disarm_all();
        return json_response(StatusCode::OK, json!({"armed": null}));
    }
    let nth = match param("nth").map(str::parse::<u64>) {
        None => 1,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("nth: {e}")}),
            )
        }
    };
    match crate::crash::arm(point, nth) {
        Ok(()) => json_response(StatusCode::OK, json!({"armed": point, "nth": nth})),
        Err(e) => json_response(StatusCode::BAD_REQUEST, json!({"error": e})),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: std::net::TcpListener,
    info: Arc<StatusInfo>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let make = make_service_fn(move |_| {
        let info = info.clone();
        async move {
            Ok::<_, Infallible>(service_fn(move |req| {
                let resp = handle(&req, &info);
                async move { Ok::<_, Infallible>(resp) }
            }))
        }
    });
    hyper::Server::from_tcp(listener)
        .map_err(|e| format!("status server: {e}"))?
        .serve(make)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("status server: {e}"))
}
