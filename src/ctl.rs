//! `prkv ctl`: an operator's view of a running cluster, through PD's HTTP API.
//!
//! ```text
//! prkv ctl --pd 127.0.0.1:2379 stores          every store: state, address, Regions, leaders
//! prkv ctl --pd 127.0.0.1:2379 regions         every Region: range, epoch, peers, leader
//! prkv ctl --pd 127.0.0.1:2379 store-delete 4  scale in: store 4 goes Offline, then Tombstone
//! prkv ctl --pd 127.0.0.1:2379 split-region 2  split Region 2 in half
//! ```

use std::net::SocketAddr;

use serde_json::Value;

use crate::playground::{http_get, http_request};

fn get_json(pd: SocketAddr, path: &str) -> Result<Value, String> {
    let body = http_get(pd, path).map_err(|e| format!("GET {path} from PD {pd}: {e}"))?;
    serde_json::from_str(&body).map_err(|e| format!("PD answered {path} with bad JSON: {e}"))
}

/// One line per store.
pub fn stores(pd: SocketAddr) -> Result<String, String> {
    let v = get_json(pd, "/pd/api/v1/stores")?;
    let mut out = format!(
        "{:>6}  {:<12}  {:<22}  {:>8}  {:>8}\n",
        "id", "state", "address", "regions", "leaders"
    );
    for s in v["stores"].as_array().cloned().unwrap_or_default() {
        // serde_json's numbers ignore width: print them as integers.
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        out.push_str(&format!(
            "{:>6}  {:<12}  {:<22}  {:>8}  {:>8}\n",
            n(&s["store"]["id"]),
            s["store"]["state_name"].as_str().unwrap_or("?"),
            s["store"]["address"].as_str().unwrap_or("?"),
            n(&s["status"]["region_count"]),
            n(&s["status"]["leader_count"]),
        ));
    }
    Ok(out)
}

/// One line per Region, in key order.
pub fn regions(pd: SocketAddr) -> Result<String, String> {
    let v = get_json(pd, "/pd/api/v1/regions")?;
    let mut out = String::new();
    for r in v["regions"].as_array().cloned().unwrap_or_default() {
        let peers: Vec<String> = r["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                format!(
                    "{}@{}:{}",
                    p["id"],
                    p["store_id"],
                    p["role_name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        out.push_str(&format!(
            "region {} [{}, {}) ver {} conf_ver {} leader {} peers {}\n",
            r["id"],
            r["start_key"].as_str().unwrap_or(""),
            r["end_key"].as_str().unwrap_or(""),
            r["epoch"]["version"],
            r["epoch"]["conf_ver"],
            r["leader"]["id"],
            peers.join(" "),
        ));
    }
    out.push_str(&format!("{} Regions\n", v["count"]));
    Ok(out)
}

/// Asks PD to split a Region in half.
pub fn split_region(pd: SocketAddr, id: u64) -> Result<String, String> {
    let (status, line, body) = http_request(pd, "POST", &format!("/pd/api/v1/region/split/{id}"))?;
    if status == 200 {
        Ok(format!(
            "PD asked Region {id}'s leader to split it in half (watch with `prkv ctl regions`)\n"
        ))
    } else {
        let reason = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(line);
        Err(format!("PD refused to split Region {id}: {reason}"))
    }
}

/// Asks PD to merge Region `source` into its neighbour `target`.
pub fn merge_region(pd: SocketAddr, source: u64, target: u64) -> Result<String, String> {
    let path = format!("/pd/api/v1/region/merge/{source}/{target}");
    let (status, line, body) = http_request(pd, "POST", &path)?;
    if status == 200 {
        Ok(format!(
            "PD asked Region {source}'s leader to merge it into {target} (watch with `prkv ctl regions`)\n"
        ))
    } else {
        let reason = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(line);
        Err(format!(
            "PD refused to merge Region {source} into {target}: {reason}"
        ))
    }
}

/// Asks PD to delete (scale in) a store.
pub fn delete_store(pd: SocketAddr, id: u64) -> Result<String, String> {
    let (status, line, body) = http_request(pd, "DELETE", &format!("/pd/api/v1/store/{id}"))?;
    if status == 200 {
        Ok(format!(
            "store {id} is Offline: its replicas move to other stores, then it becomes Tombstone \
             (watch with `prkv ctl stores`)\n"
        ))
    } else {
        let reason = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(line);
        Err(format!("PD refused to delete store {id}: {reason}"))
    }
}

/// The Raft state a stopped store keeps for a Region (read from its raft-engine directly):
/// Region state, hard state, truncated state and the log's index range.
pub fn raft_state(data_dir: &std::path::Path, region_id: u64) -> Result<String, String> {
    let mut cfg = crate::config::Config::default();
    cfg.storage.data_dir = data_dir.to_path_buf();
    let dir = cfg.raft_engine_dir();
    if !dir.exists() {
        return Err(format!(
            "{} has no raft-engine directory",
            data_dir.display()
        ));
    }
    let log = crate::raftlog::RaftLogStore::open(&dir, &cfg.raft_engine)
        .map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let state = log.region_state(region_id).map_err(|e| e.to_string())?;
    let hs = log.hard_state(region_id).map_err(|e| e.to_string())?;
    let t = log.truncated_state(region_id).map_err(|e| e.to_string())?;
    Ok(format!(
        "region state: {state:?}\nhard state: {hs:?}\ntruncated: {t:?}\nlog: first {:?} last {:?}\n",
        log.first_index(region_id),
        log.last_index(region_id)
    ))
}
