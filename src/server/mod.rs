//! A store process (`prkv store`): the Raftstore behind TiKV's gRPC API.
//!
//! Start-up, in order (each step retries while PD is unreachable):
//!
//! 1. Open the engines (the data dir's engine kind is checked first).
//! 2. Ask PD for the cluster id; a data dir that belongs to another cluster is refused.
//! 3. A new store gets its id from PD and writes it to `store.toml` with the RawKV settings
//!    (`storage.api-version`, `storage.enable-ttl`), which are fixed from then on.
//! 4. If the cluster is not bootstrapped, write the first Regions locally, then bootstrap PD
//!    with them (if another store won the race, drop ours). API v2 clusters start with the
//!    key space cut at the DEFAULT keyspace's bounds, as PD does for keyspaces.
//! 5. Register the store (PutStore), start the Raftstore with the gRPC transport, the Region
//!    heartbeat stream, store heartbeats, the gRPC server ([`kv`], [`transport`]) and the
//!    status server ([`status`]).
//!
//! Read [`kv`] for how requests become Raft proposals and reads.

pub mod fault;
pub mod kv;
pub mod pd_client;
pub mod raw;
pub mod snap_transfer;
pub mod status;
pub mod transport;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prkv_proto::metapb::{Peer, PeerRole, Region, RegionEpoch, Store, StoreState};
use prkv_proto::pdpb;
use prkv_proto::serverpb::store_transport_server::StoreTransportServer;
use prkv_proto::serverpb::PeerState;
use prkv_proto::tikvpb::tikv_server::TikvServer;
use tokio::sync::watch;

use self::pd_client::{retry, PdClient};
use self::raw::RawConfig;
use crate::config::Config;
use crate::raftstore;
use crate::storage::{ident, Engines};

/// How long requests in flight may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The connections a gRPC server accepts, with Nagle's algorithm off.
///
/// tonic applies `Server::tcp_nodelay` only to listeners it binds itself, never to an incoming
/// stream handed to `serve_with_incoming*`. Without it, a response written in more than one
/// segment waits for the client's delayed ACK (40 ms on Linux) before its last part leaves:
/// reads through a playground showed a p99 of 51 ms at a p50 of 5 ms, and a third of the CPU
/// idle under 256 clients.
pub fn accept_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).then(|conn| async move {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                if crate::storage::fds::is_exhaustion(&e) {
                    // The connection stays in the backlog and the next accept fails again at
                    // once: without a pause this loop would spin a core. The parker frees
                    // descriptors meanwhile (`storage::fds`).
                    crate::storage::fds::EXHAUSTED
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    crate::storage::wake_parkers();
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                return Err(e);
            }
        };
        if let Err(e) = conn.set_nodelay(true) {
            // The connection still works, only slower; it may also be closing already.
            tracing::debug!(error = %e, "setting TCP_NODELAY on an accepted connection");
        }
        Ok(conn)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{key}: {reason}")]
    Config { key: &'static str, reason: String },
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error(transparent)]
    Raftstore(#[from] crate::raftstore::Error),
    #[error(transparent)]
    Pd(#[from] pd_client::PdClientError),
    #[error("data dir {data_dir} belongs to cluster {found}, but PD serves cluster {pd}")]
    ClusterMismatch {
        data_dir: String,
        found: u64,
        pd: u64,
    },
    #[error("gRPC server on {addr}: {detail}")]
    Serve { addr: SocketAddr, detail: String },
    #[error("{key}: cannot listen on {addr}: {detail}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        detail: String,
    },
}

/// Binds `addr` (the value of config key `key`) for one of the store's servers.
fn bind(key: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| ServerError::Bind {
        key,
        addr,
        detail: e.to_string(),
    })?;
    // tokio and hyper take the socket over only if it does not block.
    l.set_nonblocking(true).map_err(|e| ServerError::Bind {
        key,
        addr,
        detail: e.to_string(),
    })?;
    Ok(l)
}

fn parse_addr(key: &'static str, s: &str) -> Result<SocketAddr, ServerError> {
    s.parse().map_err(|_| ServerError::Config {
        key,
        reason: format!("{s:?} is not an ip:port address"),
    })
}

/// The first Regions of a new cluster, all with one peer on this store.
async fn initial_regions(pd: &PdClient, store_id: u64, api_version: u8) -> Vec<Region> {
    let bounds: Vec<Vec<u8>> = if api_version == 2 {
        vec![
            raw::encode_bytes(b"r\0\0\0"),
            raw::encode_bytes(b"r\0\0\x01"),
        ]
    } else {
        vec![]
    };
    let mut edges = vec![Vec::new()];
    edges.extend(bounds);
    edges.push(Vec::new());
    let mut regions = Vec::new();
    for w in edges.windows(2) {
        let id = retry("allocating a Region id", || pd.alloc_id()).await;
        let peer_id = retry("allocating a peer id", || pd.alloc_id()).await;
        regions.push(Region {
            id,
            start_key: w[0].clone(),
            end_key: w[1].clone(),
            region_epoch: Some(RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: vec![Peer {
                id: peer_id,
                store_id,
                role: PeerRole::Voter as i32,
                is_witness: false,
            }],
        });
    }
    regions
}

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Disk capacity and free bytes of the file system holding `dir`.
fn disk_space(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return (0, 0);
        }
        let frsize = s.f_frsize as u64;
        (s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize)
    }
}

/// Runs a store until `shutdown` resolves, then stops it cleanly.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let started = Instant::now();
    let addr = parse_addr("server.addr", &cfg.server.addr)?;
    let status_addr = parse_addr("server.status-addr", &cfg.server.status_addr)?;
    // Both ports are taken before anything else. A store that registered with PD and then
    // found its port in use would leave PD placing replicas on a store that never answers.
    let grpc_listener = bind("server.addr", addr)?;
    let status_listener = bind("server.status-addr", status_addr)?;
    let advertise = if cfg.server.advertise_addr.is_empty() {
        cfg.server.addr.clone()
    } else {
        cfg.server.advertise_addr.clone()
    };
    let max_msg = cfg.server.max_grpc_msg_len.0 as usize;
    let data_dir = cfg.storage.data_dir.clone();

    let open_cfg = cfg.clone();
    let engines = tokio::task::spawn_blocking(move || Engines::open(&open_cfg))
        .await
        .map_err(|e| crate::storage::Error::Other(format!("opening engines: {e}")))??;

    let pd = PdClient::new(&cfg.pd.endpoints, max_msg)?;
    let cluster_id = retry("connecting to PD", || pd.connect()).await;
    let mut id = ident::load(&data_dir)?.ok_or_else(|| {
        crate::storage::Error::Other(format!("{} has no store.toml", data_dir.display()))
    })?;
    if id.cluster_id != 0 && id.cluster_id != cluster_id {
        return Err(ServerError::ClusterMismatch {
            data_dir: data_dir.display().to_string(),
            found: id.cluster_id,
            pd: cluster_id,
        });
    }
    for (key, was, now) in [
        (
            "storage.api-version",
            id.api_version.map(|v| v.to_string()),
            cfg.storage.api_version.to_string(),
        ),
        (
            "storage.enable-ttl",
            id.enable_ttl.map(|v| v.to_string()),
            cfg.storage.enable_ttl.to_string(),
        ),
    ] {
        if let Some(was) = was {
            if was != now {
                return Err(ServerError::Config {
                    key,
                    reason: format!(
                        "is {now}, but the data in {} was written with {was}; it cannot change",
                        data_dir.display()
                    ),
                });
            }
        }
    }
    if id.store_id == 0 {
        id.store_id = retry("allocating a store id", || pd.alloc_id()).await;
        id.cluster_id = cluster_id;
        id.api_version = Some(cfg.storage.api_version);
        id.enable_ttl = Some(cfg.storage.enable_ttl);
        ident::store(&data_dir, &id)?;
        tracing::info!(
            store_id = id.store_id,
            cluster_id,
            "store joined the cluster"
        );
    }
    let store_id = id.store_id;
    let store_meta = Store {
        id: store_id,
        address: advertise.clone(),
        state: StoreState::Up as i32,
        version: env!("CARGO_PKG_VERSION").into(),
        status_address: cfg.server.status_addr.clone(),
        start_timestamp: unix_secs(),
        deploy_path: data_dir.display().to_string(),
        ..Default::default()
    };

    if !retry("asking PD whether the cluster is bootstrapped", || {
        pd.is_bootstrapped()
    })
    .await
    {
        // Regions written by an earlier attempt that crashed before PD heard of them are
        // reused, so PD never learns of a Region no store has.
        let mut regions = Vec::new();
        for rid in engines.raft.regions() {
            if let Some(st) = engines.raft.region_state(rid)? {
                if let Some(r) = st.region {
                    regions.push(r);
                }
            }
        }
        if regions.is_empty() {
            regions = initial_regions(&pd, store_id, cfg.storage.api_version).await;
            for r in &regions {
                raftstore::bootstrap_region(&engines, r)?;
            }
        }
        regions.sort_by(|a, b| a.start_key.cmp(&b.start_key));
        crate::crash_point!("bootstrap_before_pd");
        let first = regions[0].clone();
        let won = retry("bootstrapping the cluster", || {
            pd.bootstrap(store_meta.clone(), first.clone())
        })
        .await;
        if won {
            retry("reporting the first Regions", || {
                pd.report_batch_split(regions.clone())
            })
            .await;
            tracing::info!(store_id, regions = regions.len(), "cluster bootstrapped");
        } else {
            for r in &regions {
                raftstore::discard_bootstrap_region(&engines, r.id)?;
            }
        }
    } else if !retry("asking PD whether it knows this store", || {
        pd.store_known(store_id)
    })
    .await
    {
        // PD is bootstrapped but has never heard of this store: whatever Regions it holds were
        // written for a bootstrap that another store won while this one was down (it crashed
        // between writing them and asking PD). A store holds no other Regions before PD knows
        // it (PD places replicas on registered stores only), and these would overlap the real
        // ones: replicas of those arriving here would wait for them for ever. So they go.
        for rid in engines.raft.regions() {
            if let Some(st) = engines.raft.region_state(rid)? {
                if st.state != PeerState::Tombstone as i32 {
                    tracing::info!(
                        store_id,
                        region_id = rid,
                        "discarding a Region of a bootstrap another store won"
                    );
                    raftstore::discard_bootstrap_region(&engines, rid)?;
                }
            }
        }
    }
    retry("registering the store", || pd.put_store(store_meta.clone())).await;

    let (reporter, hb_task) = pd.region_heartbeats();
    let trans = Arc::new(transport::GrpcTransport::new(
        pd.clone(),
        tokio::runtime::Handle::current(),
        max_msg,
        cfg.server.snap_io_max_bytes_per_sec.0,
    ));
    let kind = engines.kv.kind();
    let kv_engine = engines.kv.clone();
    let store_cfg = cfg.clone();
    let handle = tokio::task::spawn_blocking(move || {
        raftstore::start_store(store_id, store_cfg, engines, trans, reporter)
    })
    .await
    .map_err(|e| crate::storage::Error::Other(format!("starting the store: {e}")))??;
    let router = handle.router.clone();
    hb_task.start(router.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    // Store heartbeats.
    {
        let pd = pd.clone();
        let stats = handle.stats.clone();
        let interval = cfg.raftstore.pd_store_heartbeat_tick_interval.0;
        let dir = data_dir.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let (capacity, available) = disk_space(&dir);
                let s = pdpb::StoreStats {
                    store_id,
                    capacity,
                    available,
                    region_count: stats.regions.load(Ordering::Relaxed) as u32,
                    start_time: (unix_secs() - started.elapsed().as_secs() as i64) as u32,
                    damaged_regions_id: stats.damaged.lock().clone(),
                    ..Default::default()
                };
                if let Err(e) = pd.store_heartbeat(s).await {
                    tracing::warn!(error = %e, "store heartbeat failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|v| *v) => return,
                }
            }
        });
    }

    let info = Arc::new(status::StatusInfo {
        store_id,
        cluster_id,
        address: advertise.clone(),
        engine: kind.as_str(),
        api_version: cfg.storage.api_version,
        started,
        stats: handle.stats.clone(),
        kv: kv_engine,
    });
    let status_task = tokio::spawn(status::serve(
        status_listener,
        info,
        stopped(stop_rx.clone()),
    ));

    let raw_cfg = RawConfig::new(
        cfg.storage.api_version,
        cfg.storage.enable_ttl,
        cfg.storage.max_key_size.0,
    );
    let kv = kv::KvService::new(router.clone(), raw_cfg);
    // GC: when PD's safe point moves, collect every Region this store leads up to it.
    {
        let (pd, kv, router) = (pd.clone(), kv.clone(), router.clone());
        let interval = cfg.gc.poll_safe_point_interval.0;
        let api_version = cfg.storage.api_version;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|v| *v) => return,
                }
                let sp = match pd.gc_safe_point().await {
                    Ok(sp) => sp,
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the GC safe point failed");
                        continue;
                    }
                };
                if sp <= done {
                    continue;
                }
                match kv::gc_leaders(&kv, &router, api_version, sp).await {
                    Ok(removed) => {
                        tracing::info!(safe_point = sp, removed, "GC round done");
                        done = sp;
                    }
                    Err(e) => {
                        tracing::info!(safe_point = sp, error = %e, "GC round incomplete; retrying")
                    }
                }
            }
        });
    }
    let raft = transport::RaftService {
        router: router.clone(),
        snap: snap_transfer::Receiver::new(router.clone(), &cfg.storage.data_dir),
    };
    let listener =
        tokio::net::TcpListener::from_std(grpc_listener).map_err(|e| ServerError::Serve {
            addr,
            detail: e.to_string(),
        })?;
    tracing::info!(store_id, %addr, %status_addr, "store serving");
    // On shutdown the server stops accepting and gets a short grace for requests in flight;
    // then it is dropped. Waiting for every connection would wait for other stores' Raft
    // streams, which end only when those stores stop.
    let (sig_tx, sig_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = sig_tx.send(true);
    });
    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // HTTP/2's default 64 KiB windows cap a stream at one window per round trip: a
        // snapshot stream would crawl. These let one stream fill a fast link; memory stays
        // bounded by the windows (per connection) and by the services' message limits.
        .initial_stream_window_size(snap_transfer::STREAM_WINDOW)
        .initial_connection_window_size(snap_transfer::CONNECTION_WINDOW)
        .add_service(
            TikvServer::new(kv)
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
        )
        .add_service(
            StoreTransportServer::new(raft)
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
        )
        .serve_with_incoming_shutdown(accept_nodelay(listener), stopped(sig_rx.clone()));
    tokio::pin!(grpc);
    let served = tokio::select! {
        r = &mut grpc => r,
        _ = async {
            stopped(sig_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    };
    let _ = stop_tx.send(true);
    if let Ok(Err(e)) = status_task.await {
        tracing::warn!(error = %e, "status server");
    }
    tokio::task::spawn_blocking(move || handle.stop())
        .await
        .map_err(|e| crate::storage::Error::Other(format!("stopping the store: {e}")))?;
    tracing::info!(store_id, "store stopped");
    served.map_err(|e| ServerError::Serve {
        addr,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(super::accept_nodelay(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
