//! Raft messages between stores over gRPC: the production [`Transport`].
//!
//! Each destination store gets a bounded queue and one task. The task resolves the store's
//! address through PD, opens a long-lived client stream (`serverpb.StoreTransport/Raft`) and
//! sends whatever is queued in batches. If the stream breaks, it reconnects with backoff and
//! re-resolves the address. Raft tolerates loss, so the rules are simple:
//!
//! * **Backpressure**: when a peer store is slow, HTTP/2 flow control stalls the stream, the
//!   queue fills, and new messages are dropped (counted in `prkv_raft_messages_dropped_total`).
//!   The store loop never blocks on the network.
//! * **Disconnected**: queued messages are discarded before reconnecting: they are stale by
//!   then, and Raft resends what matters.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use prkv_proto::serverpb::store_transport_client::StoreTransportClient;
use prkv_proto::serverpb::store_transport_server::StoreTransport;
use prkv_proto::serverpb::{
    SnapshotChunk, SnapshotDone, SnapshotHaveRequest, SnapshotHaveResponse, StoreRaftBatch,
    StoreRaftDone, StoreRaftMessage,
};
use protobuf::Message as _;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};

use super::pd_client::PdClient;
use super::snap_transfer::{self, RateLimiter};
use crate::metrics::{RAFT_MESSAGES_DROPPED, RAFT_MESSAGES_SENT};
use crate::raftstore::transport::SnapshotDone as SnapshotDoneCb;
use crate::raftstore::{MergeRollbackMsg, RaftMessage, StoreId, StoreMsg, StoreRouter, Transport};

/// Messages queued per destination store. Raft messages are small except appends, which
/// raft-rs caps at 1 MiB (`max_size_per_msg`); a full queue means the peer is not keeping up,
/// and dropping is the right answer.
const QUEUE_PER_STORE: usize = 1024;
/// Messages per gRPC batch: amortises framing without delaying a heartbeat behind many appends.
const MAX_BATCH: usize = 128;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one batch may wait to enter its stream before the stream counts as stuck: far
/// beyond what a live peer needs (it drains batches as they come), within an election timeout
/// or two of a default cluster.
const STUCK_STREAM: Duration = Duration::from_secs(2);

pub fn encode(m: &RaftMessage) -> StoreRaftMessage {
    StoreRaftMessage {
        region_id: m.region_id,
        from_peer: Some(m.from_peer),
        to_peer: Some(m.to_peer),
        region_epoch: Some(m.region_epoch),
        message: m.message.write_to_bytes().unwrap_or_default(),
        region: m.region.clone(),
        region_conf_index: m.region_conf_index,
        hibernate: m.hibernate,
        from_store: m.from_store,
        to_store: m.to_store,
        tombstone: m.tombstone,
        wake_up: m.wake_up,
        merge_rollback_query: match m.merge_rollback {
            Some(MergeRollbackMsg::Query { commit }) => commit,
            _ => 0,
        },
        merge_rollback_agreed: match m.merge_rollback {
            Some(MergeRollbackMsg::Agree { commit, .. }) => commit,
            _ => 0,
        },
        merge_rollback_witness: matches!(
            m.merge_rollback,
            Some(MergeRollbackMsg::Agree { witness: true, .. })
        ),
    }
}

pub fn decode(m: StoreRaftMessage) -> Result<RaftMessage, String> {
    let message = raft::eraftpb::Message::parse_from_bytes(&m.message)
        .map_err(|e| format!("bad raft message: {e}"))?;
    Ok(RaftMessage {
        region_id: m.region_id,
        from_peer: m.from_peer.unwrap_or_default(),
        to_peer: m.to_peer.unwrap_or_default(),
        region_epoch: m.region_epoch.unwrap_or_default(),
        message,
        region: m.region,
        region_conf_index: m.region_conf_index,
        hibernate: m.hibernate,
        tombstone: m.tombstone,
        wake_up: m.wake_up,
        merge_rollback: if m.merge_rollback_query != 0 {
            Some(MergeRollbackMsg::Query {
                commit: m.merge_rollback_query,
            })
        } else if m.merge_rollback_agreed != 0 {
            Some(MergeRollbackMsg::Agree {
                commit: m.merge_rollback_agreed,
                witness: m.merge_rollback_witness,
            })
        } else {
            None
        },
        from_store: m.from_store,
        to_store: m.to_store,
    })
}

pub struct GrpcTransport {
    pd: PdClient,
    queues: Mutex<HashMap<StoreId, mpsc::Sender<RaftMessage>>>,
    rt: tokio::runtime::Handle,
    max_msg: usize,
    snap_limiter: std::sync::Arc<RateLimiter>,
}

impl GrpcTransport {
    pub fn new(
        pd: PdClient,
        rt: tokio::runtime::Handle,
        max_msg: usize,
        snap_bytes_per_sec: u64,
    ) -> Self {
        GrpcTransport {
            pd,
            queues: Mutex::new(HashMap::new()),
            rt,
            max_msg,
            snap_limiter: std::sync::Arc::new(RateLimiter::new(snap_bytes_per_sec)),
        }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msg: RaftMessage) {
        let to = msg.to_store;
        if super::fault::is_cut(to) {
            RAFT_MESSAGES_DROPPED.with_label_values(&["fault"]).inc();
            return;
        }
        let tx = {
            let mut q = self.queues.lock();
            q.entry(to)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(QUEUE_PER_STORE);
                    self.rt
                        .spawn(connection(to, self.pd.clone(), rx, self.max_msg));
                    tx
                })
                .clone()
        };
        match tx.try_send(msg) {
            Ok(()) => RAFT_MESSAGES_SENT.inc(),
            Err(mpsc::error::TrySendError::Full(_)) => RAFT_MESSAGES_DROPPED
                .with_label_values(&["queue_full"])
                .inc(),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                RAFT_MESSAGES_DROPPED.with_label_values(&["closed"]).inc();
                self.queues.lock().remove(&to);
            }
        }
    }

    /// Snapshots go on their own stream (see `snap_transfer.rs`), one task per transfer.
    fn send_snapshot(&self, msg: RaftMessage, done: SnapshotDoneCb) {
        if super::fault::is_cut(msg.to_store) {
            RAFT_MESSAGES_DROPPED.with_label_values(&["fault"]).inc();
            return done(false);
        }
        let (pd, limiter, max_msg) = (self.pd.clone(), self.snap_limiter.clone(), self.max_msg);
        self.rt.spawn(async move {
            let (region_id, to_store) = (msg.region_id, msg.to_store);
            let started = std::time::Instant::now();
            match snap_transfer::send(pd, msg, limiter, max_msg).await {
                Ok(bytes) => {
                    tracing::info!(region_id, to_store, bytes, took = ?started.elapsed(), "snapshot sent");
                    done(true);
                }
                Err(e) => {
                    tracing::warn!(region_id, to_store, error = %e, "sending a snapshot failed");
                    done(false);
                }
            }
        });
    }
}

fn drain(rx: &mut mpsc::Receiver<RaftMessage>) {
    while rx.try_recv().is_ok() {
        RAFT_MESSAGES_DROPPED
            .with_label_values(&["disconnected"])
            .inc();
    }
}

/// One destination store: resolve, connect, stream batches; on failure back off and redo.
async fn connection(
    to: StoreId,
    pd: PdClient,
    mut rx: mpsc::Receiver<RaftMessage>,
    max_msg: usize,
) {
    let mut backoff = BACKOFF_MIN;
    // The last address PD gave: used while PD is unreachable, so that stores keep talking.
    let mut known: Option<String> = None;
    loop {
        let attempt: Result<(), String> = async {
            let asked = tokio::time::timeout(CONNECT_TIMEOUT, pd.get_store(to)).await;
            let address = match asked {
                Ok(Ok(store)) => {
                    known = Some(store.address.clone());
                    store.address
                }
                Ok(Err(e)) => match &known {
                    Some(a) => a.clone(),
                    None => return Err(e.to_string()),
                },
                Err(_) => match &known {
                    Some(a) => a.clone(),
                    None => return Err(format!("PD did not answer for store {to}'s address")),
                },
            };
            let channel = Endpoint::from_shared(format!("http://{address}"))
                .map_err(|e| format!("store {to} address {address:?}: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("connecting to store {to} at {address}: {e}"))?;
            let mut client = StoreTransportClient::new(channel)
                .max_encoding_message_size(max_msg)
                .max_decoding_message_size(max_msg);
            let (btx, brx) = mpsc::channel::<StoreRaftBatch>(4);
            let call = client.raft(tokio_stream::wrappers::ReceiverStream::new(brx));
            tokio::pin!(call);
            tracing::info!(to_store = to, %address, "raft stream connected");
            backoff = BACKOFF_MIN;
            loop {
                tokio::select! {
                    m = rx.recv() => {
                        let Some(m) = m else { return Ok(()) };
                        let mut msgs = vec![encode(&m)];
                        while msgs.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(m) => msgs.push(encode(&m)),
                                Err(_) => break,
                            }
                        }
                        // A stream that takes no batch for this long is stuck (its connection is
                        // gone without an error reaching us): Raft messages must not wait on it
                        // for ever, so it is dropped and made again.
                        match tokio::time::timeout(STUCK_STREAM, btx.send(StoreRaftBatch { msgs })).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return Err(format!("stream to store {to} closed")),
                            Err(_) => return Err(format!("stream to store {to} stuck")),
                        }
                    }
                    r = &mut call => {
                        return Err(format!("stream to store {to} ended: {:?}", r.err()));
                    }
                }
            }
        }
        .await;
        match attempt {
            Ok(()) => return, // the store is shutting down
            Err(e) => {
                tracing::debug!(to_store = to, error = %e, retry_in = ?backoff, "raft connection failed");
                drain(&mut rx);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if rx.is_closed() {
                    return;
                }
            }
        }
    }
}

/// Hands `m` to the store after a random delay of up to `max_ms` (the delay fault of
/// `server::fault`): messages arrive late and out of order.
fn delay_message(router: &StoreRouter, m: RaftMessage, max_ms: u64) {
    use std::sync::atomic::Ordering;
    let held = &super::fault::DELAYED;
    if held.fetch_add(1, Ordering::Relaxed) >= super::fault::MAX_DELAYED {
        held.fetch_sub(1, Ordering::Relaxed);
        RAFT_MESSAGES_DROPPED.with_label_values(&["fault"]).inc();
        return;
    }
    let router = router.clone();
    let wait = std::time::Duration::from_millis(rand::random::<u64>() % max_ms.max(1));
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        held.fetch_sub(1, Ordering::Relaxed);
        if router.try_send(StoreMsg::Raft(Box::new(m))).is_err() {
            RAFT_MESSAGES_DROPPED
                .with_label_values(&["inbox_full"])
                .inc();
        }
    });
}

/// The receiving side: hands every message to the store loop (dropping it if the loop's inbox
/// is full: Raft retransmits).
#[derive(Clone)]
pub struct RaftService {
    pub router: StoreRouter,
    pub snap: snap_transfer::Receiver,
}

#[tonic::async_trait]
impl StoreTransport for RaftService {
    async fn raft(
        &self,
        req: Request<Streaming<StoreRaftBatch>>,
    ) -> Result<Response<StoreRaftDone>, Status> {
        let mut input = req.into_inner();
        while let Some(batch) = input.next().await {
            let batch = batch?;
            for m in batch.msgs {
                if super::fault::is_cut(m.from_store) {
                    RAFT_MESSAGES_DROPPED.with_label_values(&["fault"]).inc();
                    continue;
                }
                if m.to_store != self.router.store_id {
                    RAFT_MESSAGES_DROPPED
                        .with_label_values(&["wrong_store"])
                        .inc();
                    continue;
                }
                let delay = super::fault::delay_from(m.from_store);
                match decode(m) {
                    Ok(m) if delay.is_some() => delay_message(&self.router, m, delay.unwrap_or(0)),
                    Ok(m) => {
                        if self.router.try_send(StoreMsg::Raft(Box::new(m))).is_err() {
                            RAFT_MESSAGES_DROPPED
                                .with_label_values(&["inbox_full"])
                                .inc();
                        }
                    }
                    Err(e) => {
                        return Err(Status::invalid_argument(e));
                    }
                }
            }
        }
        Ok(Response::new(StoreRaftDone {}))
    }

    async fn snapshot_have(
        &self,
        req: Request<SnapshotHaveRequest>,
    ) -> Result<Response<SnapshotHaveResponse>, Status> {
        Ok(Response::new(self.snap.have(req.into_inner())?))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotDone>, Status> {
        Ok(Response::new(self.snap.receive(req.into_inner()).await?))
    }
}
