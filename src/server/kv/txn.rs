//! `tikvpb.Tikv`'s transactional commands (Percolator; see `crate::txn`).
//!
//! A write command runs as: latches on its keys (so that commands on the same keys run one at
//! a time, read to write) → a linearizable snapshot of the Region → the `txn::mvcc` action →
//! one Raft proposal with all its mutations, fenced on the snapshot's term. Key errors (locked,
//! conflict, ...) write nothing and go back in the response's `error`/`errors`, where the client
//! resolves locks or retries; Region errors go in `region_error`.
//!
//! Not served: async commit and one-phase commit (declined the way TiKV declines them when they
//! are off: the prewrite answers without `min_commit_ts`/`one_pc_commit_ts`, and the client
//! commits in two phases); deadlock detection (a pessimistic lock request waits for a
//! conflicting lock up to its `wait_timeout`, by polling; two transactions waiting on each other
//! both time out with `KeyIsLocked` instead of one getting `Deadlock`).

use prkv_proto::kvrpcpb::{self, Context, KeyError};
use prkv_proto::serverpb::{mutation, Mutation};
use tonic::{Request, Response, Status};

use super::{region_error, Fail, KvService};
use crate::raftstore::{Error, RegionSnapshot};
use crate::storage::{Cf, ScanDir};
use crate::txn::codec::{self, encode_key, Lock};
use crate::txn::mvcc::{self, Reader, Txn, TxnError};

/// The first byte of every transactional key under API v2.
pub const TXN_KEY_PREFIX: u8 = b'x';
/// Largest number of keys one command may touch: it bounds the Raft entry and the latches
/// held. The client batches far below this (16 KiB of keys per request).
const MAX_KEYS_PER_COMMAND: usize = 10_240;
/// Largest value a transaction may write (TiKV's `txn-entry-size-limit`): one value must fit
/// in one Raft entry together with its command.
const MAX_VALUE_SIZE: u64 = 8 << 20;
/// How long a pessimistic lock request waits for a conflicting lock by default (TiKV's
/// `pessimistic-txn.wait-for-lock-timeout`), the most it may ask for, and how often it looks.
const DEFAULT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const LOCK_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(10);
/// Mutations per Raft proposal when GC or a range delete rewrites a Region.
const GC_BATCH: usize = 4096;
/// How long `UnsafeDestroyRange` waits for a Region in its range to have a leader (an election
/// takes one election timeout, about 1 s by default) before it reports the Region not
/// destroyed; and how often it looks.
const DESTROY_LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
const DESTROY_LEADER_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a transactional command did not succeed.
enum TxnFail {
    Region(Box<prkv_proto::errorpb::Error>),
    Keys(Vec<KeyError>),
}

impl From<Fail> for TxnFail {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Region(e) => TxnFail::Region(e),
            Fail::Other(msg) => TxnFail::Keys(vec![KeyError {
                abort: msg,
                ..Default::default()
            }]),
        }
    }
}

impl From<Error> for TxnFail {
    fn from(e: Error) -> Self {
        region_error(e).into()
    }
}

impl From<TxnError> for TxnFail {
    fn from(e: TxnError) -> Self {
        match e {
            TxnError::Key(k) => TxnFail::Keys(vec![*k]),
            TxnError::Storage(msg) => TxnFail::Keys(vec![KeyError {
                abort: format!("storage error: {msg}"),
                ..Default::default()
            }]),
        }
    }
}

/// Splits a failure into a response's `region_error` and key errors.
fn parts(f: TxnFail) -> (Option<prkv_proto::errorpb::Error>, Vec<KeyError>) {
    match f {
        TxnFail::Region(e) => (Some(*e), Vec::new()),
        TxnFail::Keys(k) => (None, k),
    }
}

/// Like `parts`, for responses that carry one key error.
fn part(f: TxnFail) -> (Option<prkv_proto::errorpb::Error>, Option<KeyError>) {
    let (region, keys) = parts(f);
    (region, keys.into_iter().next())
}

impl KvService {
    /// API version and key checks for a transactional command.
    fn check_txn(&self, ctx: &Context, keys: &[&[u8]]) -> Result<(), TxnFail> {
        let raw = &self.inner.raw;
        raw.check_api_version(ctx.api_version)
            .map_err(Fail::Other)?;
        if keys.len() > MAX_KEYS_PER_COMMAND {
            return Err(Fail::Other(format!(
                "{} keys in one request; at most {MAX_KEYS_PER_COMMAND}",
                keys.len()
            ))
            .into());
        }
        for k in keys {
            if k.len() as u64 > raw.max_key_size {
                return Err(Fail::Other(format!(
                    "key of {} bytes is over storage.max-key-size ({} bytes)",
                    k.len(),
                    raw.max_key_size
                ))
                .into());
            }
            let empty = if raw.api_version == 2 {
                if k.len() < 4 || k[0] != TXN_KEY_PREFIX {
                    return Err(Fail::Other(
                        "key is outside the transactional key space (API v2 keys start with \
                         'x' and a 3-byte keyspace id)"
                            .into(),
                    )
                    .into());
                }
                k.len() == 4
            } else {
                k.is_empty()
            };
            if empty {
                return Err(Fail::Other("key cannot be empty".into()).into());
            }
        }
        Ok(())
    }

    fn check_in_region(snap: &RegionSnapshot, keys: &[&[u8]]) -> Result<(), TxnFail> {
        let r = &snap.region;
        for k in keys {
            let ek = encode_key(k);
            let inside = ek >= r.start_key && (r.end_key.is_empty() || ek < r.end_key);
            if !inside {
                return Err(region_error(Error::KeyNotInRegion {
                    key: k.to_vec(),
                    region: Box::new(r.clone()),
                })
                .into());
            }
        }
        Ok(())
    }

    /// Runs a write command: latches, snapshot, `action`, one fenced proposal. A key error
    /// from the action writes nothing.
    async fn txn_write<T>(
        &self,
        ctx: &Context,
        keys: &[&[u8]],
        action: impl FnOnce(&Reader, &mut Txn) -> Result<T, TxnError>,
    ) -> Result<T, TxnFail> {
        self.check_txn(ctx, keys)?;
        let encoded: Vec<Vec<u8>> = keys.iter().map(|k| encode_key(k)).collect();
        let latch = self
            .inner
            .latches
            .acquire(encoded.iter().map(|k| k.as_slice()))
            .await;
        let snap = self.read(ctx).await?;
        Self::check_in_region(&snap, keys)?;
        let reader = Reader::new(snap.snap.as_ref());
        let mut txn = Txn::default();
        let out = action(&reader, &mut txn)?;
        // The latch goes with the proposal (see `KvService::write`).
        self.write(ctx, txn.mutations, snap.term, latch).await?;
        Ok(out)
    }

    /// Like `txn_write` for commands over many keys: every key is tried; the first key error
    /// of each key is collected, and if any, nothing is written.
    async fn txn_write_each(
        &self,
        ctx: &Context,
        keys: &[&[u8]],
        mut per_key: impl FnMut(&Reader, &mut Txn, usize) -> Result<(), TxnError>,
    ) -> Result<(), TxnFail> {
        let errors = self
            .txn_write(ctx, keys, |reader, txn| {
                let mut errors = Vec::new();
                for i in 0..keys.len() {
                    match per_key(reader, txn, i) {
                        Ok(()) => {}
                        Err(TxnError::Key(k)) => errors.push(*k),
                        Err(e) => return Err(e),
                    }
                }
                if !errors.is_empty() {
                    txn.mutations.clear();
                }
                Ok(errors)
            })
            .await?;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TxnFail::Keys(errors))
        }
    }

    pub(super) async fn txn_get(
        &self,
        req: Request<kvrpcpb::GetRequest>,
    ) -> Result<Response<kvrpcpb::GetResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let res: Result<Option<Vec<u8>>, TxnFail> = async {
            self.check_txn(ctx, &[&r.key])?;
            let snap = self.read(ctx).await?;
            Self::check_in_region(&snap, &[&r.key])?;
            let reader = Reader::new(snap.snap.as_ref());
            Ok(mvcc::get(&reader, &r.key, r.version, &ctx.resolved_locks)?)
        }
        .await;
        let mut resp = kvrpcpb::GetResponse::default();
        match res {
            Ok(Some(v)) => resp.value = v,
            Ok(None) => resp.not_found = true,
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_batch_get(
        &self,
        req: Request<kvrpcpb::BatchGetRequest>,
    ) -> Result<Response<kvrpcpb::BatchGetResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let keys: Vec<&[u8]> = r.keys.iter().map(|k| k.as_slice()).collect();
        let res: Result<Vec<kvrpcpb::KvPair>, TxnFail> = async {
            self.check_txn(ctx, &keys)?;
            let snap = self.read(ctx).await?;
            Self::check_in_region(&snap, &keys)?;
            let reader = Reader::new(snap.snap.as_ref());
            let mut pairs = Vec::new();
            for k in &keys {
                match mvcc::get(&reader, k, r.version, &ctx.resolved_locks) {
                    Ok(Some(value)) => pairs.push(kvrpcpb::KvPair {
                        error: None,
                        key: k.to_vec(),
                        value,
                    }),
                    Ok(None) => {}
                    Err(TxnError::Key(e)) => pairs.push(kvrpcpb::KvPair {
                        error: Some(*e),
                        key: k.to_vec(),
                        value: Vec::new(),
                    }),
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(pairs)
        }
        .await;
        let mut resp = kvrpcpb::BatchGetResponse::default();
        match res {
            Ok(pairs) => resp.pairs = pairs,
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_scan(
        &self,
        req: Request<kvrpcpb::ScanRequest>,
    ) -> Result<Response<kvrpcpb::ScanResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let res: Result<Vec<kvrpcpb::KvPair>, TxnFail> = async {
            self.check_txn(ctx, &[])?;
            let limit = (r.limit as usize).min(super::MAX_SCAN_LIMIT);
            // Reverse scans name their upper bound first (TiKV's convention).
            let (lower, upper) = if r.reverse {
                (&r.end_key, &r.start_key)
            } else {
                (&r.start_key, &r.end_key)
            };
            let snap = self.read(ctx).await?;
            let reg = &snap.region;
            let mut lower = if lower.is_empty() {
                Vec::new()
            } else {
                encode_key(lower)
            };
            if lower < reg.start_key {
                lower = reg.start_key.clone();
            }
            let mut upper = if upper.is_empty() {
                Vec::new()
            } else {
                encode_key(upper)
            };
            if upper.is_empty() || (!reg.end_key.is_empty() && upper > reg.end_key) {
                upper = reg.end_key.clone();
            }
            if limit == 0 || (!upper.is_empty() && lower >= upper) {
                return Ok(Vec::new());
            }
            scan_versions(
                &snap,
                &lower,
                &upper,
                r.reverse,
                limit,
                r.version,
                r.key_only,
                &ctx.resolved_locks,
            )
        }
        .await;
        let mut resp = kvrpcpb::ScanResponse::default();
        match res {
            Ok(pairs) => resp.pairs = pairs,
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_prewrite(
        &self,
        req: Request<kvrpcpb::PrewriteRequest>,
    ) -> Result<Response<kvrpcpb::PrewriteResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let keys: Vec<&[u8]> = r.mutations.iter().map(|m| m.key.as_slice()).collect();
        let props = mvcc::PrewriteProps {
            start_ts: r.start_version,
            primary: &r.primary_lock,
            lock_ttl: r.lock_ttl,
            txn_size: r.txn_size,
            min_commit_ts: r.min_commit_ts,
            for_update_ts: r.for_update_ts,
        };
        let res = self
            .txn_write_each(ctx, &keys, |reader, txn, i| {
                let pessimistic = r.pessimistic_actions.get(i).copied()
                    == Some(
                        kvrpcpb::prewrite_request::PessimisticAction::DoPessimisticCheck as i32,
                    );
                let value_len = r.mutations[i].value.len() as u64;
                if value_len > MAX_VALUE_SIZE {
                    return Err(TxnError::Key(Box::new(KeyError {
                        abort: format!("value of {value_len} bytes is too large"),
                        ..Default::default()
                    })));
                }
                mvcc::prewrite(reader, txn, &r.mutations[i], &props, pessimistic)
            })
            .await;
        let mut resp = kvrpcpb::PrewriteResponse::default();
        if let Err(f) = res {
            (resp.region_error, resp.errors) = parts(f);
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_commit(
        &self,
        req: Request<kvrpcpb::CommitRequest>,
    ) -> Result<Response<kvrpcpb::CommitResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let keys: Vec<&[u8]> = r.keys.iter().map(|k| k.as_slice()).collect();
        let res = if r.commit_version <= r.start_version {
            Err(TxnFail::Keys(vec![KeyError {
                abort: format!(
                    "commit_ts {} is not above start_ts {}",
                    r.commit_version, r.start_version
                ),
                ..Default::default()
            }]))
        } else {
            self.txn_write_each(ctx, &keys, |reader, txn, i| {
                mvcc::commit(reader, txn, keys[i], r.start_version, r.commit_version)
            })
            .await
        };
        let mut resp = kvrpcpb::CommitResponse::default();
        match res {
            Ok(()) => resp.commit_version = r.commit_version,
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_cleanup(
        &self,
        req: Request<kvrpcpb::CleanupRequest>,
    ) -> Result<Response<kvrpcpb::CleanupResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let res = self
            .txn_write(ctx, &[&r.key], |reader, txn| {
                let ek = encode_key(&r.key);
                if let Some(lock) = reader.load_lock(&ek)? {
                    if lock.start_ts == r.start_version
                        && r.current_ts != 0
                        && !mvcc::expired(&lock, r.current_ts)
                    {
                        return Err(mvcc::locked(&lock, &r.key));
                    }
                }
                mvcc::rollback(reader, txn, &r.key, r.start_version)
            })
            .await;
        let mut resp = kvrpcpb::CleanupResponse::default();
        match res {
            Ok(Some(commit_ts)) => {
                resp.commit_version = commit_ts;
                resp.error = Some(KeyError {
                    abort: format!("transaction {} is committed", r.start_version),
                    ..Default::default()
                });
            }
            Ok(None) => {}
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_batch_rollback(
        &self,
        req: Request<kvrpcpb::BatchRollbackRequest>,
    ) -> Result<Response<kvrpcpb::BatchRollbackResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let keys: Vec<&[u8]> = r.keys.iter().map(|k| k.as_slice()).collect();
        let res = self
            .txn_write_each(ctx, &keys, |reader, txn, i| {
                match mvcc::rollback(reader, txn, keys[i], r.start_version)? {
                    None => Ok(()),
                    Some(_) => Err(TxnError::Key(Box::new(KeyError {
                        abort: format!("transaction {} is committed", r.start_version),
                        ..Default::default()
                    }))),
                }
            })
            .await;
        let mut resp = kvrpcpb::BatchRollbackResponse::default();
        if let Err(f) = res {
            (resp.region_error, resp.error) = part(f);
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_check_txn_status(
        &self,
        req: Request<kvrpcpb::CheckTxnStatusRequest>,
    ) -> Result<Response<kvrpcpb::CheckTxnStatusResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let res = self
            .txn_write(ctx, &[&r.primary_key], |reader, txn| {
                mvcc::check_txn_status(
                    reader,
                    txn,
                    &r.primary_key,
                    r.lock_ts,
                    r.caller_start_ts,
                    r.current_ts,
                    r.rollback_if_not_exist,
                )
            })
            .await;
        let mut resp = kvrpcpb::CheckTxnStatusResponse::default();
        match res {
            Ok(st) => {
                resp.lock_ttl = st.lock_ttl;
                resp.commit_version = st.commit_version;
                resp.action = st.action as i32;
                resp.lock_info = st.lock_info;
            }
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_heart_beat(
        &self,
        req: Request<kvrpcpb::TxnHeartBeatRequest>,
    ) -> Result<Response<kvrpcpb::TxnHeartBeatResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let res = self
            .txn_write(ctx, &[&r.primary_lock], |reader, txn| {
                mvcc::heartbeat(
                    reader,
                    txn,
                    &r.primary_lock,
                    r.start_version,
                    r.advise_lock_ttl,
                )
            })
            .await;
        let mut resp = kvrpcpb::TxnHeartBeatResponse::default();
        match res {
            Ok(ttl) => resp.lock_ttl = ttl,
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_pessimistic_lock(
        &self,
        req: Request<kvrpcpb::PessimisticLockRequest>,
    ) -> Result<Response<kvrpcpb::PessimisticLockResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let keys: Vec<&[u8]> = r.mutations.iter().map(|m| m.key.as_slice()).collect();
        let props = mvcc::PessimisticLockProps {
            start_ts: r.start_version,
            for_update_ts: r.for_update_ts,
            primary: &r.primary_lock,
            lock_ttl: r.lock_ttl,
            need_value: r.return_values || r.check_existence,
            lock_only_if_exists: r.lock_only_if_exists,
        };
        // Waiting for locks (TiKV's semantics of `wait_timeout`: < 0 no wait, 0 the default).
        // The wait polls: a lock held by another transaction is retried every few milliseconds
        // until it is gone or the wait is over; then `KeyIsLocked` goes back as without waiting.
        // Two transactions waiting on each other both time out (no deadlock detection).
        let wait = match r.wait_timeout {
            t if t < 0 => std::time::Duration::ZERO,
            0 => DEFAULT_LOCK_WAIT,
            t => std::time::Duration::from_millis(t as u64).min(MAX_LOCK_WAIT),
        };
        let deadline = std::time::Instant::now() + wait;
        let mut values = Vec::new();
        let res = loop {
            values.clear();
            let res = self
                .txn_write_each(ctx, &keys, |reader, txn, i| {
                    let v = mvcc::pessimistic_lock(reader, txn, keys[i], &props)?;
                    values.push(v);
                    Ok(())
                })
                .await;
            let only_locked = matches!(&res, Err(TxnFail::Keys(errs))
                if errs.iter().all(|e| e.locked.is_some()));
            if !only_locked || std::time::Instant::now() >= deadline {
                break res;
            }
            tokio::time::sleep(LOCK_WAIT_POLL).await;
        };
        let mut resp = kvrpcpb::PessimisticLockResponse::default();
        match res {
            Ok(()) => {
                if r.return_values || r.check_existence {
                    resp.not_founds = values.iter().map(|v| v.is_none()).collect();
                    resp.values = values.into_iter().map(|v| v.unwrap_or_default()).collect();
                }
            }
            Err(f) => (resp.region_error, resp.errors) = parts(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_pessimistic_rollback(
        &self,
        req: Request<kvrpcpb::PessimisticRollbackRequest>,
    ) -> Result<Response<kvrpcpb::PessimisticRollbackResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let keys: Vec<&[u8]> = r.keys.iter().map(|k| k.as_slice()).collect();
        let res = self
            .txn_write_each(ctx, &keys, |reader, txn, i| {
                mvcc::pessimistic_rollback(reader, txn, keys[i], r.start_version, r.for_update_ts)
            })
            .await;
        let mut resp = kvrpcpb::PessimisticRollbackResponse::default();
        if let Err(f) = res {
            (resp.region_error, resp.errors) = parts(f);
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_resolve_lock(
        &self,
        req: Request<kvrpcpb::ResolveLockRequest>,
    ) -> Result<Response<kvrpcpb::ResolveLockResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        // Which transactions to settle, and how: start_ts -> commit_ts (0 = roll back).
        let mut txns: Vec<(u64, u64)> = r.txn_infos.iter().map(|t| (t.txn, t.status)).collect();
        if r.start_version != 0 {
            txns.push((r.start_version, r.commit_version));
        }
        let res: Result<(), TxnFail> = async {
            let keys: Vec<Vec<u8>> = if !r.keys.is_empty() {
                r.keys.clone()
            } else {
                // Every lock of those transactions in the Region.
                self.check_txn(ctx, &[])?;
                let snap = self.read(ctx).await?;
                let mut keys = Vec::new();
                scan_locks(&snap, &[], &[], usize::MAX, &mut |k, lock| {
                    if txns.iter().any(|(ts, _)| *ts == lock.start_ts) {
                        keys.push(k);
                    }
                    keys.len() < MAX_KEYS_PER_COMMAND
                })?;
                keys
            };
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
            self.txn_write_each(ctx, &refs, |reader, txn, i| {
                let ek = encode_key(refs[i]);
                let Some(lock) = reader.load_lock(&ek)? else {
                    return Ok(());
                };
                let Some((_, commit_ts)) = txns.iter().find(|(ts, _)| *ts == lock.start_ts) else {
                    return Ok(());
                };
                if *commit_ts > 0 {
                    mvcc::commit(reader, txn, refs[i], lock.start_ts, *commit_ts)
                } else {
                    mvcc::rollback(reader, txn, refs[i], lock.start_ts).map(|_| ())
                }
            })
            .await
        }
        .await;
        let mut resp = kvrpcpb::ResolveLockResponse::default();
        if let Err(f) = res {
            (resp.region_error, resp.error) = part(f);
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_scan_lock(
        &self,
        req: Request<kvrpcpb::ScanLockRequest>,
    ) -> Result<Response<kvrpcpb::ScanLockResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let res: Result<Vec<kvrpcpb::LockInfo>, TxnFail> = async {
            self.check_txn(ctx, &[])?;
            let snap = self.read(ctx).await?;
            let limit = if r.limit == 0 {
                super::MAX_SCAN_LIMIT
            } else {
                (r.limit as usize).min(super::MAX_SCAN_LIMIT)
            };
            let (lo, hi) = (bound(&r.start_key), bound(&r.end_key));
            let mut locks = Vec::new();
            scan_locks(&snap, &lo, &hi, usize::MAX, &mut |k, lock| {
                if lock.start_ts <= r.max_version {
                    locks.push(lock.info(&k));
                }
                locks.len() < limit
            })?;
            Ok(locks)
        }
        .await;
        let mut resp = kvrpcpb::ScanLockResponse::default();
        match res {
            Ok(locks) => resp.locks = locks,
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_check_secondary_locks(
        &self,
        req: Request<kvrpcpb::CheckSecondaryLocksRequest>,
    ) -> Result<Response<kvrpcpb::CheckSecondaryLocksResponse>, Status> {
        // Only async-commit transactions have secondaries to check, and prkv declines async
        // commit; still, answer truthfully for the keys asked: their locks of `start_version`,
        // or the commit that replaced them, rolling back keys that have neither.
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let keys: Vec<&[u8]> = r.keys.iter().map(|k| k.as_slice()).collect();
        let res = self
            .txn_write(ctx, &keys, |reader, txn| {
                let mut locks = Vec::new();
                let mut commit_ts = 0;
                for k in &keys {
                    let ek = encode_key(k);
                    match reader.load_lock(&ek)? {
                        Some(lock) if lock.start_ts == r.start_version => locks.push(lock.info(k)),
                        _ => {
                            if let Some(ts) = mvcc::rollback(reader, txn, k, r.start_version)? {
                                commit_ts = ts;
                            }
                        }
                    }
                }
                Ok((locks, commit_ts))
            })
            .await;
        let mut resp = kvrpcpb::CheckSecondaryLocksResponse::default();
        match res {
            Ok((locks, commit_ts)) => {
                resp.locks = locks;
                resp.commit_ts = commit_ts;
            }
            Err(f) => (resp.region_error, resp.error) = part(f),
        }
        Ok(Response::new(resp))
    }

    /// One bounded GC batch of the Region in `ctx` up to `safe_point`: the number of versions
    /// removed (0 when nothing is left to do).
    async fn gc_batch(&self, ctx: &Context, safe_point: u64) -> Result<usize, TxnFail> {
        self.check_txn(ctx, &[])?;
        let snap = self.read(ctx).await?;
        let reader = Reader::new(snap.snap.as_ref());
        let mut txn = Txn::default();
        let mut removed = 0;
        let mut last: Option<Vec<u8>> = None;
        let mut failure = None;
        let r = &snap.region;
        snap.snap
            .scan(
                Cf::Write,
                &r.start_key,
                &r.end_key,
                ScanDir::Forward,
                &mut |k, _| {
                    let Ok((ek, _)) = codec::split_ts(k) else {
                        return true;
                    };
                    if last.as_deref() == Some(ek) {
                        return true;
                    }
                    last = Some(ek.to_vec());
                    match mvcc::gc_key(&reader, &mut txn, ek, safe_point) {
                        Ok(n) => removed += n,
                        Err(e) => {
                            failure = Some(e);
                            return false;
                        }
                    }
                    txn.mutations.len() < GC_BATCH
                },
            )
            .map_err(|e| TxnFail::from(TxnError::Storage(e.to_string())))?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        self.write(ctx, txn.mutations, snap.term, Vec::new())
            .await?;
        Ok(removed)
    }

    pub(super) async fn txn_gc(
        &self,
        req: Request<kvrpcpb::GcRequest>,
    ) -> Result<Response<kvrpcpb::GcResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let mut resp = kvrpcpb::GcResponse::default();
        loop {
            match self.gc_batch(ctx, r.safe_point).await {
                Ok(0) => break,
                Ok(_) => continue,
                Err(f) => {
                    (resp.region_error, resp.error) = part(f);
                    break;
                }
            }
        }
        Ok(Response::new(resp))
    }

    pub(super) async fn txn_delete_range(
        &self,
        req: Request<kvrpcpb::DeleteRangeRequest>,
    ) -> Result<Response<kvrpcpb::DeleteRangeResponse>, Status> {
        let r = req.into_inner();
        let ctx = self.check_ctx(&r.context)?;
        let res: Result<(), TxnFail> = async {
            self.check_txn(ctx, &[])?;
            if r.notify_only {
                return Ok(());
            }
            let (lo, hi) = (bound(&r.start_key), bound(&r.end_key));
            if !hi.is_empty() && hi <= lo {
                return Ok(());
            }
            // Versioned keys of the range sort between enc(start) and enc(end).
            let ms: Vec<Mutation> = ["default", "lock", "write"]
                .iter()
                .map(|cf| Mutation {
                    op: mutation::Op::DeleteRange as i32,
                    cf: cf.to_string(),
                    key: lo.clone(),
                    value: hi.clone(),
                })
                .collect();
            let latch = self
                .inner
                .latches
                .acquire([lo.as_slice()].into_iter())
                .await;
            self.write(ctx, ms, 0, latch).await?;
            Ok(())
        }
        .await;
        let mut resp = kvrpcpb::DeleteRangeResponse::default();
        if let Err(f) = res {
            let (region, keys) = parts(f);
            resp.region_error = region;
            resp.error = keys.first().map(|k| k.abort.clone()).unwrap_or_default();
        }
        Ok(Response::new(resp))
    }
}

impl KvService {
    /// `UnsafeDestroyRange`, which the client sends to every store: each store deletes the
    /// range's data (every column family, through Raft) in the Regions it leads. A Region whose
    /// leadership moves between two stores' turns can be missed; the caller may send it again.
    pub(super) async fn txn_unsafe_destroy_range(
        &self,
        req: Request<kvrpcpb::UnsafeDestroyRangeRequest>,
    ) -> Result<Response<kvrpcpb::UnsafeDestroyRangeResponse>, Status> {
        let r = req.into_inner();
        let (lo, hi) = (bound(&r.start_key), bound(&r.end_key));
        let mut resp = kvrpcpb::UnsafeDestroyRangeResponse::default();
        if !hi.is_empty() && hi <= lo {
            return Ok(Response::new(resp));
        }
        // Every store gets the request and destroys the Regions it leads. A Region with no
        // leader known here (an election, e.g. just after a split) might be skipped by every
        // store: wait for its leader a little, then report it rather than answer success.
        let deadline = std::time::Instant::now() + DESTROY_LEADER_WAIT;
        let mut done = std::collections::HashSet::new();
        let mut failed = Vec::new();
        loop {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = self
                .inner
                .router
                .try_send(crate::raftstore::StoreMsg::QueryRegions {
                    cb: Box::new(move |st| drop(tx.send(st))),
                });
            let statuses = match sent {
                Ok(()) => rx.await.unwrap_or_default(),
                Err(e) => {
                    resp.error = e.to_string();
                    return Ok(Response::new(resp));
                }
            };
            let mut leaderless = Vec::new();
            for st in statuses {
                let reg = &st.region;
                let start = lo.clone().max(reg.start_key.clone());
                let end = match (hi.is_empty(), reg.end_key.is_empty()) {
                    (true, _) => reg.end_key.clone(),
                    (false, true) => hi.clone(),
                    (false, false) => hi.clone().min(reg.end_key.clone()),
                };
                if (!end.is_empty() && start >= end) || done.contains(&reg.id) {
                    continue; // outside the range, or destroyed already
                }
                if st.leader_id == 0 {
                    leaderless.push(reg.id);
                    continue;
                }
                if st.leader_id != st.peer.id {
                    continue; // its leader's store destroys it
                }
                done.insert(reg.id);
                let ms: Vec<Mutation> = ["default", "lock", "write"]
                    .iter()
                    .map(|cf| Mutation {
                        op: mutation::Op::DeleteRange as i32,
                        cf: cf.to_string(),
                        key: start.clone(),
                        value: end.clone(),
                    })
                    .collect();
                let ctx = Context {
                    region_id: reg.id,
                    region_epoch: reg.region_epoch,
                    peer: Some(st.peer),
                    ..Default::default()
                };
                if let Err(f) = self.write(&ctx, ms, 0, Vec::new()).await {
                    failed.push((reg.id, parts(f.into())));
                }
            }
            if leaderless.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                for id in leaderless {
                    failed.push((id, (None, Vec::new())));
                }
                break;
            }
            tokio::time::sleep(DESTROY_LEADER_POLL).await;
        }
        if !failed.is_empty() {
            resp.error = format!(
                "{} Regions not destroyed (retry): {:?}",
                failed.len(),
                failed.iter().map(|(id, _)| id).collect::<Vec<_>>()
            );
        }
        Ok(Response::new(resp))
    }
}

/// One GC round on this store: every Region it leads, up to `safe_point`. Returns how many
/// versions went; an error if some Region could not be collected (the next round retries).
pub async fn gc_leaders(
    kv: &KvService,
    router: &crate::raftstore::StoreRouter,
    api_version: u8,
    safe_point: u64,
) -> Result<usize, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    router
        .try_send(crate::raftstore::StoreMsg::QueryRegions {
            cb: Box::new(move |st| drop(tx.send(st))),
        })
        .map_err(|e| e.to_string())?;
    let statuses = rx.await.map_err(|e| e.to_string())?;
    let mut removed = 0;
    let mut failed = 0;
    for st in statuses.into_iter().filter(|s| s.leader_id == s.peer.id) {
        let ctx = Context {
            region_id: st.region.id,
            region_epoch: st.region.region_epoch,
            peer: Some(st.peer),
            api_version: if api_version == 2 {
                kvrpcpb::ApiVersion::V2
            } else {
                kvrpcpb::ApiVersion::V1
            } as i32,
            ..Default::default()
        };
        loop {
            match kv.gc_batch(&ctx, safe_point).await {
                Ok(0) => break,
                Ok(n) => removed += n,
                Err(_) => {
                    failed += 1;
                    break;
                }
            }
        }
    }
    crate::metrics::GC_VERSIONS.inc_by(removed as u64);
    if failed > 0 {
        return Err(format!("{failed} Regions could not be collected"));
    }
    Ok(removed)
}

fn bound(key: &[u8]) -> Vec<u8> {
    if key.is_empty() {
        Vec::new()
    } else {
        encode_key(key)
    }
}

/// Locks in `[lo, hi)` (encoded bounds, empty = the Region's own) with their user keys.
fn scan_locks(
    snap: &RegionSnapshot,
    lo: &[u8],
    hi: &[u8],
    max: usize,
    f: &mut dyn FnMut(Vec<u8>, Lock) -> bool,
) -> Result<(), TxnFail> {
    let mut failure = None;
    let mut n = 0;
    snap.snap
        .scan(Cf::Lock, lo, hi, ScanDir::Forward, &mut |k, v| {
            let parsed = codec::decode_key(k).and_then(|uk| Ok((uk, Lock::decode(v)?)));
            match parsed {
                Ok((uk, lock)) => {
                    n += 1;
                    f(uk, lock) && n < max
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })
        .map_err(|e| TxnFail::from(TxnError::Storage(e.to_string())))?;
    match failure {
        Some(e) => Err(TxnError::Storage(e).into()),
        None => Ok(()),
    }
}

/// A snapshot scan at `read_ts` over `[lower, upper)` (encoded, clipped to the Region): the
/// newest visible value of each key, up to `limit` pairs; a lock that blocks the read on a key
/// the scan covered comes back as that pair's error.
#[allow(clippy::too_many_arguments)]
fn scan_versions(
    snap: &RegionSnapshot,
    lower: &[u8],
    upper: &[u8],
    reverse: bool,
    limit: usize,
    read_ts: u64,
    key_only: bool,
    bypass: &[u64],
) -> Result<Vec<kvrpcpb::KvPair>, TxnFail> {
    let reader = Reader::new(snap.snap.as_ref());
    let mut pairs = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    let mut failure: Option<TxnError> = None;
    let mut full = false;
    let dir = if reverse {
        ScanDir::Reverse
    } else {
        ScanDir::Forward
    };
    snap.snap
        .scan(Cf::Write, lower, upper, dir, &mut |k, _| {
            let Ok((ek, _)) = codec::split_ts(k) else {
                return true;
            };
            if last.as_deref() == Some(ek) {
                return true;
            }
            last = Some(ek.to_vec());
            let value = match reader.get_value(ek, read_ts) {
                Ok(v) => v,
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            };
            if let Some(v) = value {
                match codec::decode_key(ek) {
                    Ok(key) => pairs.push(kvrpcpb::KvPair {
                        error: None,
                        key,
                        value: if key_only { Vec::new() } else { v },
                    }),
                    Err(e) => {
                        failure = Some(TxnError::Storage(e));
                        return false;
                    }
                }
            }
            if pairs.len() >= limit {
                full = true;
                return false;
            }
            true
        })
        .map_err(|e| TxnFail::from(TxnError::Storage(e.to_string())))?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    // Locks on the keys the scan covered (up to where it stopped) block it.
    let (lo, hi) = match (&last, full, reverse) {
        (Some(stop), true, false) => {
            let mut end = stop.clone();
            end.push(0);
            (lower.to_vec(), end)
        }
        (Some(stop), true, true) => (stop.clone(), upper.to_vec()),
        _ => (lower.to_vec(), upper.to_vec()),
    };
    let mut blocked = Vec::new();
    scan_locks(snap, &lo, &hi, usize::MAX, &mut |k, lock| {
        if let Err(TxnError::Key(e)) = mvcc::check_read_lock(&lock, &k, read_ts, bypass) {
            blocked.push(kvrpcpb::KvPair {
                error: Some(*e),
                key: k,
                value: Vec::new(),
            });
        }
        blocked.len() < 64
    })?;
    if !blocked.is_empty() {
        return Ok(blocked);
    }
    Ok(pairs)
}
