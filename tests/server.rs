//! The whole system as users run it: `prkv playground` / `prkv pd` + `prkv store` processes on
//! loopback ports, driven by the official TiKV client (`tikv-client` 0.4, unmodified).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::{self, http_json, Playground, ProcCluster, FAST_STORE_CONFIG};
use futures::StreamExt;
use prkv_proto::pdpb;
use tikv_client::{Config, RawClient};

fn key(i: usize) -> String {
    format!("key{i:05}")
}

/// Asks PD's TSO for one timestamp (composed `physical << 18 | logical`).
async fn tso(pd: std::net::SocketAddr) -> u64 {
    let mut c = pdpb::pd_client::PdClient::connect(format!("http://{pd}"))
        .await
        .unwrap();
    let members = c
        .get_members(pdpb::GetMembersRequest { header: None })
        .await
        .unwrap()
        .into_inner();
    let cluster_id = members.header.unwrap().cluster_id;
    let req = pdpb::TsoRequest {
        header: Some(pdpb::RequestHeader {
            cluster_id,
            sender_id: 0,
        }),
        count: 3,
        dc_location: String::new(),
    };
    let mut resp = c
        .tso(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let r = resp.next().await.unwrap().unwrap();
    assert_eq!(r.count, 3);
    let ts = r.timestamp.unwrap();
    assert!(ts.logical >= 2);
    ((ts.physical as u64) << 18) | ts.logical as u64
}

/// The RawKV API, end to end. `keyspace`: API v2 with the DEFAULT keyspace.
async fn exercise_raw_api(client: &RawClient, keyspace: bool) {
    // put / get / delete
    client.put("k1".to_owned(), "v1".to_owned()).await.unwrap();
    assert_eq!(
        client.get("k1".to_owned()).await.unwrap(),
        Some(b"v1".to_vec())
    );
    client.put("k1".to_owned(), "".to_owned()).await.unwrap();
    assert_eq!(client.get("k1".to_owned()).await.unwrap(), Some(vec![]));
    client.delete("k1".to_owned()).await.unwrap();
    assert_eq!(client.get("k1".to_owned()).await.unwrap(), None);

    // batch put / get / delete
    let pairs: Vec<(String, String)> = (0..20).map(|i| (key(i), format!("v{i}"))).collect();
    client.batch_put(pairs.clone()).await.unwrap();
    let got = client
        .batch_get(vec![key(1), key(5), "missing".to_owned()])
        .await
        .unwrap();
    let got: BTreeMap<Vec<u8>, Vec<u8>> = got
        .into_iter()
        .map(|kv| (kv.key().clone().into(), kv.value().clone()))
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[key(5).as_bytes()], b"v5");
    client.batch_delete(vec![key(18), key(19)]).await.unwrap();
    assert_eq!(client.get(key(18)).await.unwrap(), None);

    // scans with limits, forward and reverse. tikv-client 0.4 re-scans from the start of the
    // key space when a scan reaches the last Region without filling its limit (a client bug),
    // so without a keyspace the scans here ask for fewer pairs than exist.
    let fwd = client.scan(key(0)..key(18), 5).await.unwrap();
    let keys: Vec<Vec<u8>> = fwd.iter().map(|kv| kv.key().clone().into()).collect();
    let want: Vec<Vec<u8>> = (0..5).map(|i| key(i).into_bytes()).collect();
    assert_eq!(keys, want);
    let rev = client.scan_reverse(key(0)..key(18), 3).await.unwrap();
    let keys: Vec<Vec<u8>> = rev.iter().map(|kv| kv.key().clone().into()).collect();
    let want: Vec<Vec<u8>> = [17, 16, 15].iter().map(|i| key(*i).into_bytes()).collect();
    assert_eq!(keys, want);
    let only_keys = client.scan_keys(key(3)..key(10), 2).await.unwrap();
    assert_eq!(only_keys.len(), 2);
    if keyspace {
        // A keyspace's scans end at the keyspace's own Region boundary: unbounded scans work.
        let all = client.scan(.., 100).await.unwrap();
        assert_eq!(all.len(), 18, "{all:?}");
    }

    // delete_range
    client.delete_range(key(0)..key(10)).await.unwrap();
    assert_eq!(client.get(key(9)).await.unwrap(), None);
    assert_eq!(client.get(key(10)).await.unwrap(), Some(b"v10".to_vec()));

    // compare-and-swap
    let cas = client.with_atomic_for_cas();
    let (prev, ok) = cas
        .compare_and_swap("cas".to_owned(), None, "a".to_owned())
        .await
        .unwrap();
    assert!(ok && prev.is_none());
    let (prev, ok) = cas
        .compare_and_swap("cas".to_owned(), None, "b".to_owned())
        .await
        .unwrap();
    assert!(!ok);
    assert_eq!(prev, Some(b"a".to_vec()));
    let (prev, ok) = cas
        .compare_and_swap("cas".to_owned(), Some(b"a".to_vec()), "c".to_owned())
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(prev, Some(b"a".to_vec()));
    assert_eq!(
        client.get("cas".to_owned()).await.unwrap(),
        Some(b"c".to_vec())
    );

    // TTL
    client
        .put_with_ttl("ttl".to_owned(), "x".to_owned(), 2)
        .await
        .unwrap();
    client
        .put("no-ttl".to_owned(), "y".to_owned())
        .await
        .unwrap();
    let ttl = client.get_key_ttl_secs("ttl".to_owned()).await.unwrap();
    assert!(matches!(ttl, Some(1..=2)), "{ttl:?}");
    assert_eq!(
        client.get_key_ttl_secs("no-ttl".to_owned()).await.unwrap(),
        Some(0)
    );
    assert_eq!(
        client.get("ttl".to_owned()).await.unwrap(),
        Some(b"x".to_vec())
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(client.get("ttl".to_owned()).await.unwrap(), None);
    assert_eq!(
        client.get_key_ttl_secs("ttl".to_owned()).await.unwrap(),
        None
    );
    assert_eq!(
        client.get("no-ttl".to_owned()).await.unwrap(),
        Some(b"y".to_vec())
    );

    // Bad input: typed errors, nothing written.
    let e = client.put("".to_owned(), "v".to_owned()).await.unwrap_err();
    assert!(format!("{e:?}").contains("empty"), "{e:?}");
    let e = client
        .put(vec![b'k'; 9000], "v".to_owned())
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("max-key-size"), "{e:?}");
    let e = client
        .put("big".to_owned(), vec![0u8; 9 << 20])
        .await
        .unwrap_err();
    assert!(
        format!("{e:?}").to_lowercase().contains("too large"),
        "{e:?}"
    );
    assert_eq!(client.get("big".to_owned()).await.unwrap(), None);
}

fn write_store_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("store-config.toml");
    std::fs::write(&path, format!("{FAST_STORE_CONFIG}\n{extra}")).unwrap();
    path
}

/// API v1 (with TTL enabled) through the playground; then the whole playground restarts and
/// keeps its data, Region metadata and TSO order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_raw_api_v1_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_store_config(dir.path(), "[storage]\nenable-ttl = true\n");
    let ports = procs::free_ports(7);
    let data = dir.path().join("data");
    let mut pg = Playground::start(&data, ports, &cfg, 3);
    procs::wait_cluster(pg.pd_addr, 3, 3, Duration::from_secs(60));

    let client = RawClient::new(vec![pg.pd_addr.to_string()]).await.unwrap();
    exercise_raw_api(&client, false).await;

    // Keyspace clients are refused by an API v1 store with a clear error, not a panic.
    let v2 = RawClient::new_with_config(
        vec![pg.pd_addr.to_string()],
        Config::default().with_default_keyspace(),
    )
    .await
    .unwrap();
    let e = v2.put("k".to_owned(), "v".to_owned()).await.unwrap_err();
    assert!(format!("{e:?}").contains("API version"), "{e:?}");

    // PD's HTTP API, on the gRPC port.
    let health = http_json(pg.pd_addr, "/pd/api/v1/health");
    assert_eq!(health[0]["health"], true);
    let stores = http_json(pg.pd_addr, "/pd/api/v1/stores");
    assert_eq!(stores["count"], 3);
    for s in stores["stores"].as_array().unwrap() {
        assert_eq!(s["store"]["state_name"], "Up", "{s}");
        assert!(s["store"]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"));
        assert_eq!(s["status"]["alive"], true);
        assert!(s["status"]["capacity"].as_u64().unwrap() > 0, "{s}");
    }
    let regions = http_json(pg.pd_addr, "/pd/api/v1/regions");
    assert_eq!(regions["count"], 1);
    let id = regions["regions"][0]["id"].as_u64().unwrap();
    let one = http_json(pg.pd_addr, &format!("/pd/api/v1/region/id/{id}"));
    assert_eq!(one["id"], id);
    assert_eq!(one["peers"].as_array().unwrap().len(), 3);
    assert_eq!(one["start_key"], "");
    assert_eq!(one["end_key"], "");
    assert!(one["epoch"]["conf_ver"].as_u64().unwrap() >= 1);
    assert!(one["epoch"]["version"].as_u64().unwrap() >= 1);
    assert!(one["leader"]["store_id"].as_u64().is_some(), "{one}");
    assert!(one["peers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["role_name"] == "Voter"));
    assert!(procs::http_get(pg.pd_addr, "/pd/api/v1/region/id/999999").is_err());
    // The stores' status ports.
    let status = http_json(procs::addr(pg.status_port), "/status");
    assert_eq!(status["regions"], 1);
    let metrics: String = (0..3)
        .map(|i| procs::http_get(procs::addr(pg.status_port + i), "/metrics").unwrap())
        .collect();
    assert!(metrics.contains("prkv_store_regions 1"), "{metrics}");
    // The leader's store counted the client's requests.
    assert!(
        metrics.contains("prkv_grpc_requests_total{method=\"raw_put\"}"),
        "{metrics}"
    );

    let before = tso(pg.pd_addr).await;
    drop(client);
    drop(v2);
    assert!(
        pg.proc.sigterm(Duration::from_secs(60)),
        "playground did not stop cleanly"
    );

    // Same data dir: the same cluster comes back.
    let pg = Playground::start(&data, ports, &cfg, 3);
    procs::wait_cluster(pg.pd_addr, 3, 3, Duration::from_secs(60));
    let after = tso(pg.pd_addr).await;
    assert!(after > before, "TSO went back: {after} <= {before}");
    let regions2 = http_json(pg.pd_addr, "/pd/api/v1/regions");
    assert_eq!(regions2["regions"][0]["id"], id);
    assert_eq!(
        regions2["regions"][0]["epoch"],
        regions["regions"][0]["epoch"]
    );
    let client = RawClient::new(vec![pg.pd_addr.to_string()]).await.unwrap();
    assert_eq!(client.get(key(10)).await.unwrap(), Some(b"v10".to_vec()));
    assert_eq!(
        client.get("cas".to_owned()).await.unwrap(),
        Some(b"c".to_vec())
    );
    assert_eq!(client.get(key(5)).await.unwrap(), None);
    drop(client);
    // A playground killed outright takes its PD and stores with it (no orphans on the ports).
    let mut pg = pg;
    pg.proc.sigkill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(pg.pd_addr).is_ok() {
        assert!(Instant::now() < deadline, "PD outlived its playground");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// API v2: the client with the DEFAULT keyspace, against stores with `storage.api-version = 2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_api_v2_with_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    let c = ProcCluster::start(dir.path(), 3, "[storage]\napi-version = 2\n");
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client =
        RawClient::new_with_config(c.endpoints(), Config::default().with_default_keyspace())
            .await
            .unwrap();
    exercise_raw_api(&client, true).await;
    // Raw gRPC, below the client: malformed requests and wrong Regions get typed answers.
    let mut raw =
        prkv_proto::tikvpb::tikv_client::TikvClient::connect(format!("http://{}", c.store_addr(1)))
            .await
            .unwrap();
    let st = raw
        .raw_get(prkv_proto::kvrpcpb::RawGetRequest {
            context: None,
            key: b"r\0\0\0k".to_vec(),
            cf: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    let resp = raw
        .raw_put(prkv_proto::kvrpcpb::RawPutRequest {
            context: Some(prkv_proto::kvrpcpb::Context {
                region_id: 987_654,
                api_version: prkv_proto::kvrpcpb::ApiVersion::V2 as i32,
                ..Default::default()
            }),
            key: b"r\0\0\0k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let re = resp.region_error.expect("a region error");
    assert_eq!(re.region_not_found.unwrap().region_id, 987_654);
    let resp = raw
        .raw_put(prkv_proto::kvrpcpb::RawPutRequest {
            context: Some(prkv_proto::kvrpcpb::Context {
                region_id: 1,
                api_version: prkv_proto::kvrpcpb::ApiVersion::V2 as i32,
                ..Default::default()
            }),
            key: b"no-keyspace-prefix".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.error.contains("RawKV key space"), "{resp:?}");

    // Plain API v1 clients are refused by an API v2 store.
    let v1 = RawClient::new(c.endpoints()).await.unwrap();
    let e = v1.get("k".to_owned()).await.unwrap_err();
    assert!(format!("{e:?}").contains("API version"), "{e:?}");
}

/// SIGKILL a store in the middle of a write loop: writes go on after re-election, the store
/// restarts and rejoins, and every acknowledged write is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_store_during_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::start(dir.path(), 3, "");
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let client = Arc::new(RawClient::new(c.endpoints()).await.unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let client = client.clone();
        let stop = stop.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("w{i:06}");
                match client.put(k.clone(), format!("value-{i}")).await {
                    Ok(()) => {
                        acked.push(i);
                        progress.store(acked.len(), Ordering::Relaxed);
                    }
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (acked, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Kill the leader's store: writes must wait for a new election.
    let victim = leader_store(&c);
    c.kill_store(victim);
    let killed_at = Instant::now();
    let acked_at_kill = progress.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(6)).await;
    c.start_store(victim);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.await.unwrap();
    println!(
        "acknowledged {} writes, {failed} failed, {:?} since the kill",
        acked.len(),
        killed_at.elapsed()
    );
    assert!(acked_at_kill > 0, "no write succeeded before the kill");
    assert!(
        acked.len() > acked_at_kill + 10,
        "writes did not continue after the kill: {acked_at_kill} before, {} in all",
        acked.len()
    );
    for i in &acked {
        let v = client.get(format!("w{i:06}")).await.unwrap();
        assert_eq!(
            v,
            Some(format!("value-{i}").into_bytes()),
            "acknowledged write {i} lost"
        );
    }
    // The restarted store is a working replica again: with another store gone, the Region
    // still has a quorum (the restarted store and the third one) and serves every write.
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let other = (1..=3).find(|i| *i != victim).unwrap();
    c.kill_store(other);
    for i in acked.iter().rev().take(50) {
        let v = retry(|| client.get(format!("w{i:06}"))).await;
        assert_eq!(v, Some(format!("value-{i}").into_bytes()));
    }
    retry(|| client.put("after".to_owned(), "ok".to_owned())).await;

    // Without PD, the stores keep serving the Regions they lead to clients that know them.
    if let Some(mut pd) = c.pd.take() {
        pd.sigkill();
    }
    client
        .put("no-pd".to_owned(), "still".to_owned())
        .await
        .unwrap();
    assert_eq!(
        client.get("no-pd".to_owned()).await.unwrap(),
        Some(b"still".to_vec())
    );
}

/// The index (1-based) of the store process that leads the (first) Region, per PD.
fn leader_store(c: &ProcCluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let regions = http_json(c.pd_addr, "/pd/api/v1/regions");
        let stores = http_json(c.pd_addr, "/pd/api/v1/stores");
        if let Some(id) = regions["regions"][0]["leader"]["store_id"].as_u64() {
            let addr = stores["stores"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["store"]["id"].as_u64() == Some(id))
                .and_then(|s| s["store"]["address"].as_str().map(str::to_owned));
            if let Some(i) =
                (1..=c.stores.len()).find(|i| Some(c.store_addr(*i).to_string()) == addr)
            {
                return i;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no leader known to PD");
}

/// Retries a client call for up to 20 s, as an application does while a Region fails over:
/// tikv-client 0.4 gives up on a dead leader's store after a short backoff, before PD has
/// heard of the new leader.
async fn retry<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = tikv_client::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                println!("retrying after: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("still failing after 20 s: {e:?}"),
        }
    }
}

/// Waits up to 30 s for store `i` to exit; returns its exit status and log.
fn store_exit(c: &mut ProcCluster, i: usize) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let p = c.stores[i - 1].as_mut().expect("store started");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            let log = std::fs::read_to_string(c.dir.join(format!("store-{i}.log"))).unwrap();
            return (status, log);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("store {i} still runs 30 s after its port was found in use");
}

/// A store whose gRPC or status port is in use exits with an error naming the config key,
/// before it registers with PD: PD must never place replicas on a store that cannot serve.
#[test]
fn store_with_a_port_in_use_exits_before_registering() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::start(dir.path(), 0, "");
    for (i, key) in [(1, "server.addr"), (2, "server.status-addr")] {
        let taken = if i == 1 {
            c.store_addr(i)
        } else {
            c.status_addr(i)
        };
        let _squatter = std::net::TcpListener::bind(taken).unwrap();
        c.start_store(i);
        let (status, log) = store_exit(&mut c, i);
        let stores = http_json(c.pd_addr, "/pd/api/v1/stores");
        assert_eq!(
            stores["count"], 0,
            "PD registered a store that cannot serve: {stores}"
        );
        assert!(!status.success(), "store {i} exited with {status}: {log}");
        assert!(
            log.contains(key) && log.contains(&taken.to_string()),
            "the error names neither {key} nor {taken}: {log}"
        );
    }
    // With its port free, the same data dir starts and serves.
    c.start_store(1);
    procs::wait_cluster(c.pd_addr, 1, 1, Duration::from_secs(60));
}

/// `BatchCommands`, the stream TiKV's Go client sends its requests through: answers carry their
/// requests' ids and say what the unary calls say, errors included; a request the store does
/// not serve, or ids that do not pair with requests, end the stream with a status naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_commands_answer_like_unary_calls() {
    use prkv_proto::tikvpb::batch_commands_request::{request::Cmd as Ask, Request as Asked};
    use prkv_proto::tikvpb::batch_commands_response::response::Cmd as Answer;
    use prkv_proto::tikvpb::tikv_client::TikvClient;
    use prkv_proto::tikvpb::{BatchCommandsEmptyRequest, BatchCommandsRequest};
    use prkv_proto::{kvrpcpb, metapb};

    let dir = tempfile::tempdir().unwrap();
    let c = ProcCluster::start_with_pd(
        dir.path(),
        1,
        "[storage]\napi-version = 1\n",
        "[replication]\nmax-replicas = 1\n",
    );
    procs::wait_cluster(c.pd_addr, 1, 1, Duration::from_secs(60));
    let regions = http_json(c.pd_addr, "/pd/api/v1/regions");
    let r = &regions["regions"][0];
    let ctx = kvrpcpb::Context {
        region_id: r["id"].as_u64().unwrap(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: r["epoch"]["conf_ver"].as_u64().unwrap(),
            version: r["epoch"]["version"].as_u64().unwrap(),
        }),
        peer: Some(metapb::Peer {
            id: r["leader"]["id"].as_u64().unwrap(),
            store_id: r["leader"]["store_id"].as_u64().unwrap(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stale = ctx.clone();
    stale.region_epoch.as_mut().unwrap().version += 1;
    let put = |ctx: &kvrpcpb::Context, i: u64| Asked {
        cmd: Some(Ask::RawPut(kvrpcpb::RawPutRequest {
            context: Some(ctx.clone()),
            key: format!("b{i:03}").into_bytes(),
            value: format!("v{i}").into_bytes(),
            ..Default::default()
        })),
    };
    let get = |i: u64| Asked {
        cmd: Some(Ask::RawGet(kvrpcpb::RawGetRequest {
            context: Some(ctx.clone()),
            key: format!("b{i:03}").into_bytes(),
            ..Default::default()
        })),
    };
    let mut client = TikvClient::connect(format!("http://{}", c.store_addr(1)))
        .await
        .unwrap();

    // 200 puts in two messages (ids 0..200), then one message with their 200 gets (ids
    // 1000..1200), a put with a stale epoch (id 5000) and a probe (id 6000).
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut answers = client
        .batch_commands(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for half in [0..100u64, 100..200] {
        tx.send(BatchCommandsRequest {
            requests: half.clone().map(|i| put(&ctx, i)).collect(),
            request_ids: half.collect(),
        })
        .await
        .unwrap();
    }
    let mut got = BTreeMap::new();
    while got.len() < 200 {
        let m = answers.message().await.unwrap().expect("stream open");
        assert_eq!(m.request_ids.len(), m.responses.len());
        for (id, a) in m.request_ids.into_iter().zip(m.responses) {
            assert!(got.insert(id, a).is_none(), "request {id} answered twice");
        }
    }
    for (id, a) in &got {
        match &a.cmd {
            Some(Answer::RawPut(p)) => {
                assert!(
                    p.region_error.is_none() && p.error.is_empty(),
                    "{id}: {p:?}"
                )
            }
            other => panic!("put {id} answered {other:?}"),
        }
    }
    let mut requests: Vec<Asked> = (0..200).map(get).collect();
    let mut request_ids: Vec<u64> = (1000..1200).collect();
    requests.push(put(&stale, 999));
    request_ids.push(5000);
    requests.push(Asked {
        cmd: Some(Ask::Empty(BatchCommandsEmptyRequest {
            test_id: 7,
            delay_time: 0,
        })),
    });
    request_ids.push(6000);
    tx.send(BatchCommandsRequest {
        requests,
        request_ids,
    })
    .await
    .unwrap();
    let mut got = BTreeMap::new();
    let mut messages = 0;
    while got.len() < 202 {
        let m = answers.message().await.unwrap().expect("stream open");
        messages += 1;
        for (id, a) in m.request_ids.into_iter().zip(m.responses) {
            assert!(got.insert(id, a).is_none(), "request {id} answered twice");
        }
    }
    println!("202 answers in {messages} messages");
    for i in 0..200u64 {
        match &got[&(1000 + i)].cmd {
            Some(Answer::RawGet(g)) => {
                assert_eq!(g.value, format!("v{i}").into_bytes(), "get {i}: {g:?}")
            }
            other => panic!("get {i} answered {other:?}"),
        }
    }
    match &got[&5000].cmd {
        Some(Answer::RawPut(p)) => assert!(
            p.region_error
                .as_ref()
                .is_some_and(|e| e.epoch_not_match.is_some()),
            "a stale epoch in a batch: {p:?}"
        ),
        other => panic!("the stale put answered {other:?}"),
    }
    match &got[&6000].cmd {
        Some(Answer::Empty(e)) => assert_eq!(e.test_id, 7),
        other => panic!("the probe answered {other:?}"),
    }

    // Ids that do not pair with requests end the stream, saying so.
    tx.send(BatchCommandsRequest {
        requests: vec![get(0)],
        request_ids: vec![1, 2],
    })
    .await
    .unwrap();
    let status = loop {
        match answers.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A command the store does not serve (none at all, here) ends a new stream: Unimplemented,
    // naming the request.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .batch_commands(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(BatchCommandsRequest {
        requests: vec![Asked { cmd: None }],
        request_ids: vec![42],
    })
    .await
    .unwrap();
    let status = answers.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("42"), "{status:?}");
    // The store still serves.
    let unary = client
        .raw_get(kvrpcpb::RawGetRequest {
            context: Some(ctx.clone()),
            key: b"b007".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unary.value, b"v7");
}

/// `UnsafeDestroyRange` on a store whose replica of a Region in the range has no leader (its
/// leader's store and the third one are gone) reports that Region not destroyed, after waiting
/// a little for an election, instead of answering success for data it never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_range_reports_a_region_without_leader() {
    use prkv_proto::kvrpcpb;
    use prkv_proto::tikvpb::tikv_client::TikvClient;

    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::start(dir.path(), 3, "[storage]\napi-version = 1\n");
    procs::wait_cluster(c.pd_addr, 3, 3, Duration::from_secs(60));
    let leader = leader_store(&c);
    let keep = (1..=3).find(|i| *i != leader).expect("3 stores");
    for i in (1..=3).filter(|i| *i != keep) {
        c.kill_store(i);
    }
    let mut client = TikvClient::connect(format!("http://{}", c.store_addr(keep)))
        .await
        .unwrap();
    // The follower left alone campaigns once its election timeout passes, and stays leaderless.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let started = Instant::now();
        let resp = client
            .unsafe_destroy_range(kvrpcpb::UnsafeDestroyRangeRequest {
                start_key: Vec::new(),
                end_key: Vec::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if resp.error.contains("not destroyed") {
            println!("reported after {:?}: {}", started.elapsed(), resp.error);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a range over a leaderless Region was answered {resp:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
