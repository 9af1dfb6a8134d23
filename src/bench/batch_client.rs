//! A raw-KV client that sends through `BatchCommands`, for `prkv bench --mode raw-batch`.
//!
//! tikv-client 0.4 (what `--mode raw` uses) makes one unary gRPC call per request. TiKV's Go
//! client instead keeps one `BatchCommands` stream per store and packs whatever requests are
//! waiting into each message. This client does the same, so the benchmark can show what that
//! protocol costs a store, next to the unary one:
//!
//! * one stream per store: a sender task takes every request waiting (up to `MAX_BATCH`) into
//!   one message, tagging each with an id; a receiver task hands answers back by id;
//! * Regions come from PD (`GetRegion`) and are cached by start key; a Region error drops the
//!   cached Region (or, for `NotLeader` with a hint, moves its leader) and the call retries,
//!   backing off when nothing was learnt, as tikv-client does;
//! * a broken stream fails its requests in flight, and the next call opens a new one.
//!
//! API v1 keys (no keyspace), as `--mode raw` uses.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prkv_proto::errorpb;
use prkv_proto::kvrpcpb::{self, Context};
use prkv_proto::metapb::{Peer, Region};
use prkv_proto::tikvpb::batch_commands_request::{request::Cmd as Ask, Request as Asked};
use prkv_proto::tikvpb::batch_commands_response::response::Cmd as Answer;
use prkv_proto::tikvpb::tikv_client::TikvClient;
use prkv_proto::tikvpb::BatchCommandsRequest;
use tokio::sync::{mpsc, oneshot};

use crate::server::pd_client::PdClient;

/// Requests per message: the Go client's default batch limit.
const MAX_BATCH: usize = 128;
/// Requests waiting for a store's sender: enough for every benchmark client at once.
const QUEUE: usize = 4096;
/// Attempts per call before its error is returned (tikv-client gives up after about as many).
const ATTEMPTS: u32 = 10;
/// gRPC message limit, as the stores' default.
const MAX_MSG: usize = 64 << 20;

type Reply = oneshot::Sender<Result<Answer, String>>;

/// One store's stream.
struct StoreConn {
    tx: mpsc::Sender<(Asked, Reply)>,
    broken: Arc<AtomicBool>,
}

impl StoreConn {
    async fn open(addr: &str) -> Result<StoreConn, String> {
        let mut client = TikvClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| format!("connecting to store {addr}: {e}"))?
            .max_decoding_message_size(MAX_MSG)
            .max_encoding_message_size(MAX_MSG);
        let (out_tx, out_rx) = mpsc::channel::<BatchCommandsRequest>(16);
        let mut answers = client
            .batch_commands(tokio_stream::wrappers::ReceiverStream::new(out_rx))
            .await
            .map_err(|e| format!("BatchCommands to {addr}: {e}"))?
            .into_inner();
        let pending: Arc<Mutex<HashMap<u64, Reply>>> = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<(Asked, Reply)>(QUEUE);
        {
            let pending = pending.clone();
            tokio::spawn(async move {
                let mut next_id = 0u64;
                while let Some(first) = rx.recv().await {
                    let mut msg = BatchCommandsRequest::default();
                    let mut next = Some(first);
                    while let Some((ask, reply)) = next.take() {
                        next_id += 1;
                        pending.lock().insert(next_id, reply);
                        msg.requests.push(ask);
                        msg.request_ids.push(next_id);
                        if msg.requests.len() < MAX_BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    if out_tx.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
        {
            let broken = broken.clone();
            tokio::spawn(async move {
                let why = loop {
                    match answers.message().await {
                        Ok(Some(m)) => {
                            let mut pending = pending.lock();
                            for (id, r) in m.request_ids.into_iter().zip(m.responses) {
                                if let Some(reply) = pending.remove(&id) {
                                    let _ = reply.send(r.cmd.ok_or_else(|| "empty answer".into()));
                                }
                            }
                        }
                        Ok(None) => break "the store ended the stream".to_string(),
                        Err(s) => break format!("stream: {s}"),
                    }
                };
                broken.store(true, Ordering::Relaxed);
                for (_, reply) in pending.lock().drain() {
                    let _ = reply.send(Err(why.clone()));
                }
            });
        }
        Ok(StoreConn { tx, broken })
    }

    async fn ask(&self, ask: Ask) -> Result<Answer, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((Asked { cmd: Some(ask) }, reply))
            .await
            .map_err(|_| "stream closed".to_string())?;
        answer.await.map_err(|_| "stream closed".to_string())?
    }
}

/// A cached Region and where its leader is.
#[derive(Clone)]
struct Route {
    region: Region,
    leader: Peer,
}

pub struct BatchClient {
    pd: PdClient,
    /// By start key.
    regions: Mutex<BTreeMap<Vec<u8>, Route>>,
    stores: tokio::sync::Mutex<HashMap<u64, Arc<StoreConn>>>,
    store_addrs: Mutex<HashMap<u64, String>>,
    retries: AtomicU64,
}

fn contains(r: &Region, key: &[u8]) -> bool {
    r.start_key.as_slice() <= key && (r.end_key.is_empty() || key < r.end_key.as_slice())
}

impl BatchClient {
    pub async fn connect(pd_endpoints: &[String]) -> Result<BatchClient, String> {
        let pd = PdClient::new(pd_endpoints, MAX_MSG).map_err(|e| e.to_string())?;
        pd.connect().await.map_err(|e| e.to_string())?;
        Ok(BatchClient {
            pd,
            regions: Mutex::default(),
            stores: tokio::sync::Mutex::default(),
            store_addrs: Mutex::default(),
            retries: AtomicU64::new(0),
        })
    }

    async fn locate(&self, key: &[u8]) -> Result<Route, String> {
        {
            let regions = self.regions.lock();
            if let Some((_, r)) = regions.range(..=key.to_vec()).next_back() {
                if contains(&r.region, key) {
                    return Ok(r.clone());
                }
            }
        }
        let (region, leader) = self.pd.get_region(key).await.map_err(|e| e.to_string())?;
        let leader = leader.ok_or_else(|| format!("Region {} has no leader yet", region.id))?;
        let route = Route { region, leader };
        let mut regions = self.regions.lock();
        // Drop cached Regions the new one overlaps (it split or merged since).
        regions.retain(|_, r| {
            let (a, b) = (&r.region, &route.region);
            let before = !a.end_key.is_empty() && a.end_key <= b.start_key;
            let after = !b.end_key.is_empty() && b.end_key <= a.start_key;
            before || after
        });
        regions.insert(route.region.start_key.clone(), route.clone());
        Ok(route)
    }

    fn forget(&self, region: &Region) {
        self.regions.lock().remove(&region.start_key);
    }

    fn move_leader(&self, region: &Region, leader: Peer) {
        if let Some(r) = self.regions.lock().get_mut(&region.start_key) {
            if r.region.id == region.id {
                r.leader = leader;
            }
        }
    }

    async fn conn(&self, store_id: u64) -> Result<Arc<StoreConn>, String> {
        let mut stores = self.stores.lock().await;
        if let Some(c) = stores.get(&store_id) {
            if !c.broken.load(Ordering::Relaxed) {
                return Ok(c.clone());
            }
        }
        let known = self.store_addrs.lock().get(&store_id).cloned();
        let addr = match known {
            Some(a) => a,
            None => {
                let s = self
                    .pd
                    .get_store(store_id)
                    .await
                    .map_err(|e| e.to_string())?;
                self.store_addrs.lock().insert(store_id, s.address.clone());
                s.address
            }
        };
        let c = Arc::new(StoreConn::open(&addr).await?);
        stores.insert(store_id, c.clone());
        Ok(c)
    }

    /// Sends the request `make` builds for the Region holding `key`, retrying Region errors.
    async fn call(&self, key: &[u8], make: impl Fn(Context) -> Ask) -> Result<Answer, String> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            let backoff = Duration::from_millis((10u64 << attempt.min(6)).min(500));
            let route = match self.locate(key).await {
                Ok(r) => r,
                Err(e) => {
                    last = e;
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let ctx = Context {
                region_id: route.region.id,
                region_epoch: route.region.region_epoch,
                peer: Some(route.leader),
                ..Default::default()
            };
            let conn = match self.conn(route.leader.store_id).await {
                Ok(c) => c,
                Err(e) => {
                    self.forget(&route.region);
                    last = e;
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let answer = match conn.ask(make(ctx)).await {
                Ok(a) => a,
                Err(e) => {
                    self.forget(&route.region);
                    last = e;
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let Some(e) = region_error(&answer) else {
                return Ok(answer);
            };
            last = format!("Region error: {}", e.message);
            match e.not_leader.as_ref().and_then(|n| n.leader) {
                // A hint: go there at once.
                Some(leader) => self.move_leader(&route.region, leader),
                None => {
                    self.forget(&route.region);
                    tokio::time::sleep(backoff).await;
                }
            }
        }
        Err(format!("gave up after {ATTEMPTS} attempts: {last}"))
    }

    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        let answer = self
            .call(&key, |ctx| {
                Ask::RawPut(kvrpcpb::RawPutRequest {
                    context: Some(ctx),
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                })
            })
            .await?;
        match answer {
            Answer::RawPut(r) if r.error.is_empty() => Ok(()),
            Answer::RawPut(r) => Err(r.error),
            other => Err(format!("a put answered {other:?}")),
        }
    }

    pub async fn get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        let answer = self
            .call(&key, |ctx| {
                Ask::RawGet(kvrpcpb::RawGetRequest {
                    context: Some(ctx),
                    key: key.clone(),
                    ..Default::default()
                })
            })
            .await?;
        match answer {
            Answer::RawGet(r) if !r.error.is_empty() => Err(r.error),
            Answer::RawGet(r) if r.not_found => Ok(None),
            Answer::RawGet(r) => Ok(Some(r.value)),
            other => Err(format!("a get answered {other:?}")),
        }
    }

    /// Calls retried after a Region error or a broken stream.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

fn region_error(a: &Answer) -> Option<&errorpb::Error> {
    match a {
        Answer::RawPut(r) => r.region_error.as_ref(),
        Answer::RawGet(r) => r.region_error.as_ref(),
        _ => None,
    }
}
