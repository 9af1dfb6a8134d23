//! Snapshot files between stores over gRPC (`serverpb.StoreTransport/Snapshot`), beside the
//! Raft message stream so that a large transfer never delays heartbeats.
//!
//! Sender ([`send`]): ask the receiver which files of this snapshot it already holds (a retry
//! after an interrupted transfer), then stream the rest in [`CHUNK`]-byte chunks, each file
//! ending with its CRC-32, paced by a store-wide [`RateLimiter`]
//! (`server.snap-io-max-bytes-per-sec`). The Raft `MsgSnapshot` rides in the first chunk.
//!
//! Receiver ([`Receiver::receive`]): names are checked before they touch the file system
//! (`snap::valid_key`, `valid_file_name`), sizes may not exceed what the snapshot announced,
//! every file is written to `<name>.tmp`, checked against its CRC, fsynced and renamed. Only
//! when all files are in place is the message handed to the store, which then installs the
//! snapshot. A broken stream leaves the verified files for the retry; the rest is removed at
//! restart.

// Handlers answer with `tonic::Status`, as every gRPC handler does; its size is tonic's choice.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prkv_proto::serverpb::store_transport_client::StoreTransportClient;
use prkv_proto::serverpb::{
    SnapshotChunk, SnapshotDone, SnapshotFile, SnapshotHaveRequest, SnapshotHaveResponse,
    SnapshotMeta,
};
use prost::Message as _;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Endpoint;
use tonic::{Status, Streaming};

use super::pd_client::PdClient;
use super::transport::{decode, encode};
use crate::raftstore::snap::{list_files, valid_file_name, valid_key, SnapDirs};
use crate::raftstore::{RaftMessage, StoreMsg, StoreRouter};

/// Bytes per chunk: large enough that framing is noise, small enough to pace smoothly and to
/// stay far below `server.max-grpc-msg-len`.
pub const CHUNK: usize = 4 << 20;
/// HTTP/2 flow-control windows for snapshot streams (and the store's server): 8 MiB per stream
/// keeps a transfer going through a few milliseconds of latency at gigabytes per second; the
/// connection window lets a snapshot and Raft traffic share a connection.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Snapshots a store receives at once; more wait for a later retry (`RESOURCE_EXHAUSTED`).
/// Each holds one open file and one chunk in memory.
pub const MAX_CONCURRENT_RECEIVES: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A whole transfer must finish within this; a stalled receiver must not pin a snapshot forever.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A token bucket shared by all of a store's outgoing transfers.
pub struct RateLimiter {
    bytes_per_sec: u64,
    next_free: parking_lot::Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: parking_lot::Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` more may go out.
    pub async fn consume(&self, bytes: usize) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let until = {
            let mut next = self.next_free.lock();
            // Idle time is not banked: no burst above the configured rate.
            let start = (*next).max(Instant::now());
            *next = start + cost;
            *next
        };
        tokio::time::sleep_until(until.into()).await;
    }
}

/// Streams the snapshot of `msg` (a `MsgSnapshot` whose meta names the local files) to its
/// store. Returns the bytes sent.
pub async fn send(
    pd: PdClient,
    msg: RaftMessage,
    limiter: Arc<RateLimiter>,
    max_msg: usize,
) -> Result<u64, String> {
    let meta = SnapshotMeta::decode(msg.message.get_snapshot().data.as_ref())
        .map_err(|e| format!("snapshot meta: {e}"))?;
    let address = pd
        .get_store(msg.to_store)
        .await
        .map_err(|e| e.to_string())?
        .address;
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("store address {address:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .connect()
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let mut client = StoreTransportClient::new(channel)
        .max_encoding_message_size(max_msg)
        .max_decoding_message_size(max_msg);
    let have: HashMap<String, u64> = client
        .snapshot_have(SnapshotHaveRequest {
            key: meta.key.clone(),
        })
        .await
        .map_err(|e| format!("SnapshotHave: {e}"))?
        .into_inner()
        .files
        .into_iter()
        .map(|f| (f.name, f.size))
        .collect();
    let dir = PathBuf::from(&meta.dir);
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let first = SnapshotChunk {
        message: Some(encode(&msg)),
        ..Default::default()
    };
    let producer = async move {
        tx.send(first)
            .await
            .map_err(|_| "stream closed".to_string())?;
        let mut sent = 0u64;
        for f in &meta.files {
            if have.get(&f.name) == Some(&f.size) {
                continue;
            }
            sent += send_file(&dir.join(&f.name), f, &tx, &limiter).await?;
        }
        Ok::<u64, String>(sent)
    };
    let call = client.snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
    let work = async {
        let (sent, res) = tokio::join!(producer, call);
        res.map_err(|e| format!("Snapshot stream: {e}"))?;
        sent
    };
    tokio::time::timeout(TRANSFER_TIMEOUT, work)
        .await
        .map_err(|_| "snapshot transfer timed out".to_string())?
}

async fn send_file(
    path: &Path,
    f: &SnapshotFile,
    tx: &mpsc::Sender<SnapshotChunk>,
    limiter: &RateLimiter,
) -> Result<u64, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut crc = crc32fast::Hasher::new();
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = tokio::task::block_in_place(|| file.read(&mut buf))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        buf.truncate(n);
        crc.update(&buf);
        let done = n == 0 || offset + n as u64 >= f.size;
        if offset + n as u64 > f.size {
            return Err(format!("{} grew while being sent", path.display()));
        }
        limiter.consume(n).await;
        let chunk = SnapshotChunk {
            message: None,
            file: f.name.clone(),
            offset,
            data: buf,
            file_done: done,
            crc32: if done { crc.clone().finalize() } else { 0 },
        };
        tx.send(chunk)
            .await
            .map_err(|_| "stream closed".to_string())?;
        offset += n as u64;
        crate::metrics::SNAPSHOT_BYTES_SENT.inc_by(n as u64);
        if done {
            if offset != f.size {
                return Err(format!("{} shrank while being sent", path.display()));
            }
            return Ok(offset);
        }
    }
}

/// The receiving side, shared by every incoming transfer of a store.
#[derive(Clone)]
pub struct Receiver {
    pub router: StoreRouter,
    pub dirs: SnapDirs,
    pub slots: Arc<Semaphore>,
    /// Keys of the snapshots being received now: one stream per key at a time.
    receiving: Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
}

/// A snapshot key claimed by one receiving stream, released when the stream ends.
struct Receiving {
    key: String,
    set: Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
}

impl Receiving {
    /// Claims `key`, or says who has it. Two streams of one key would write the same
    /// `<file>.tmp`: the second's create truncates what the first wrote, the first goes on at
    /// its own offset, leaving zeros, and renames a file whose chunks each passed their checks
    /// (a sender's retry while its first stream still runs does exactly this).
    fn claim(
        set: &Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
        key: &str,
    ) -> Option<Receiving> {
        set.lock().insert(key.to_string()).then(|| Receiving {
            key: key.to_string(),
            set: set.clone(),
        })
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

impl Receiver {
    pub fn new(router: StoreRouter, data_dir: &Path) -> Self {
        Receiver {
            router,
            dirs: SnapDirs::new(data_dir),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_RECEIVES)),
            receiving: Arc::default(),
        }
    }

    pub fn have(&self, req: SnapshotHaveRequest) -> Result<SnapshotHaveResponse, Status> {
        if !valid_key(&req.key) {
            return Err(Status::invalid_argument("bad snapshot key"));
        }
        let dir = self.dirs.recv_dir(&req.key);
        let files = list_files(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|f| !f.name.ends_with(".tmp"))
            .collect();
        Ok(SnapshotHaveResponse { files })
    }

    pub async fn receive(
        &self,
        mut input: Streaming<SnapshotChunk>,
    ) -> Result<SnapshotDone, Status> {
        let _slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many snapshots being received"))?;
        let first = input
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let raw = first
            .message
            .ok_or_else(|| Status::invalid_argument("first chunk carries no message"))?;
        if raw.to_store != self.router.store_id {
            return Err(Status::invalid_argument("snapshot for another store"));
        }
        let mut msg = decode(raw).map_err(Status::invalid_argument)?;
        let mut meta = SnapshotMeta::decode(msg.message.get_snapshot().data.as_ref())
            .map_err(|e| Status::invalid_argument(format!("snapshot meta: {e}")))?;
        if !valid_key(&meta.key) || meta.files.iter().any(|f| !valid_file_name(&f.name)) {
            return Err(Status::invalid_argument("bad snapshot key or file name"));
        }
        let Some(_claim) = Receiving::claim(&self.receiving, &meta.key) else {
            crate::metrics::SNAPSHOTS
                .with_label_values(&["refused_concurrent"])
                .inc();
            return Err(Status::unavailable(format!(
                "snapshot {} is already being received",
                meta.key
            )));
        };
        let sizes: HashMap<String, u64> = meta
            .files
            .iter()
            .map(|f| (f.name.clone(), f.size))
            .collect();
        let dir = self.dirs.recv_dir(&meta.key);
        std::fs::create_dir_all(&dir).map_err(|e| Status::internal(e.to_string()))?;
        let mut current: Option<(String, std::fs::File, u64, crc32fast::Hasher)> = None;
        while let Some(chunk) = input.next().await {
            let chunk = chunk?;
            let Some(&size) = sizes.get(&chunk.file) else {
                return Err(Status::invalid_argument(format!(
                    "file {:?} is not in the snapshot",
                    chunk.file
                )));
            };
            if chunk.offset == 0 && current.as_ref().is_none_or(|c| c.0 != chunk.file) {
                let tmp = dir.join(format!("{}.tmp", chunk.file));
                let f = std::fs::File::create(&tmp)
                    .map_err(|e| Status::internal(format!("{}: {e}", tmp.display())))?;
                current = Some((chunk.file.clone(), f, 0, crc32fast::Hasher::new()));
            }
            let Some((name, file, written, crc)) = current.as_mut() else {
                return Err(Status::invalid_argument(
                    "chunk of a file that was not started",
                ));
            };
            if *name != chunk.file || *written != chunk.offset {
                return Err(Status::invalid_argument("snapshot chunks out of order"));
            }
            if *written + chunk.data.len() as u64 > size {
                return Err(Status::invalid_argument(format!(
                    "file {name} is larger than announced"
                )));
            }
            tokio::task::block_in_place(|| file.write_all(&chunk.data))
                .map_err(|e| Status::internal(e.to_string()))?;
            crc.update(&chunk.data);
            *written += chunk.data.len() as u64;
            if chunk.file_done {
                if *written != size || crc.clone().finalize() != chunk.crc32 {
                    return Err(Status::data_loss(format!(
                        "file {name}: size or checksum mismatch"
                    )));
                }
                // Durable before the store may install (and then trust) it.
                tokio::task::block_in_place(|| file.sync_all())
                    .map_err(|e| Status::internal(e.to_string()))?;
                let tmp = dir.join(format!("{name}.tmp"));
                crate::crash_point!("snapshot_recv_before_rename");
                std::fs::rename(&tmp, dir.join(name.as_str()))
                    .map_err(|e| Status::internal(e.to_string()))?;
                current = None;
            }
        }
        for f in &meta.files {
            let have = std::fs::metadata(dir.join(&f.name)).map(|m| m.len()).ok();
            if have != Some(f.size) {
                return Err(Status::data_loss(format!(
                    "snapshot {}: file {} missing after the stream ended",
                    meta.key, f.name
                )));
            }
        }
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        meta.dir = dir.to_string_lossy().into_owned();
        msg.message.mut_snapshot().data = meta.encode_to_vec().into();
        self.router
            .try_send(StoreMsg::Raft(Box::new(msg)))
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(SnapshotDone {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stream per snapshot key: a second claim of a key in use is refused until the first
    /// stream ends.
    #[test]
    fn one_stream_per_snapshot_key() {
        let set = Arc::default();
        let first = Receiving::claim(&set, "7_5_100").expect("free");
        assert!(
            Receiving::claim(&set, "7_5_100").is_none(),
            "a second stream of one key"
        );
        let other = Receiving::claim(&set, "8_5_100").expect("another key is free");
        drop(first);
        assert!(
            Receiving::claim(&set, "7_5_100").is_some(),
            "free again once the first ends"
        );
        drop(other);
    }
}
