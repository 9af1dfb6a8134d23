//! The bank: clients move money among accounts in transactions (half optimistic, half
//! pessimistic) through the official client, and snapshot reads check that the total never
//! changes. Used by `tests/txn.rs` and, under faults, by `tests/nemesis.rs`.
//!
//! Also the tools a test needs when `tikv-client` 0.4 cannot settle a lock by itself (see
//! `resolve_orphan`): raw calls to a Region's leader and a look at the accounts' locks.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prkv_proto::{kvrpcpb, pdpb, tikvpb};
use tikv_client::{CheckLevel, TimestampExt, TransactionClient, TransactionOptions};

pub const ACCOUNTS: usize = 100;
pub const START_BALANCE: u64 = 1000;
pub const TOTAL: u64 = START_BALANCE * ACCOUNTS as u64;

pub fn key(i: usize) -> String {
    format!("acct{i:04}")
}

pub fn balance(v: Option<Vec<u8>>) -> u64 {
    String::from_utf8(v.expect("account exists"))
        .unwrap()
        .parse()
        .unwrap()
}

/// Running transfer clients.
pub struct Bank {
    pub client: Arc<TransactionClient>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// Transfers committed (acknowledged) so far.
    pub transfers: Arc<AtomicU64>,
}

impl Bank {
    /// Opens every account with `START_BALANCE`, retrying for up to `within`.
    pub async fn open(client: Arc<TransactionClient>, within: Duration) -> Bank {
        let deadline = Instant::now() + within;
        loop {
            let opts = TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn);
            let res: tikv_client::Result<()> = async {
                let mut txn = client.begin_with_options(opts).await?;
                let res: tikv_client::Result<()> = async {
                    for i in 0..ACCOUNTS {
                        txn.put(key(i), START_BALANCE.to_string()).await?;
                    }
                    txn.commit().await?;
                    Ok(())
                }
                .await;
                if res.is_err() {
                    let _ = txn.rollback().await;
                }
                res
            }
            .await;
            match res {
                Ok(()) => break,
                Err(e) => assert!(Instant::now() < deadline, "opening the accounts: {e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Bank {
            client,
            stop: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
            transfers: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts `clients` transfer clients (even ones optimistic, odd ones pessimistic).
    pub fn start(&mut self, clients: u64, seed: u64) {
        for w in 0..clients {
            let (client, stop, transfers) = (
                self.client.clone(),
                self.stop.clone(),
                self.transfers.clone(),
            );
            self.workers.push(tokio::spawn(async move {
                let mut seed = (seed ^ (w + 1)).wrapping_mul(7919) | 1;
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                while !stop.load(Ordering::Relaxed) {
                    let from = (next() % ACCOUNTS as u64) as usize;
                    let to = (next() % ACCOUNTS as u64) as usize;
                    if from == to {
                        continue;
                    }
                    let amount = next() % 50;
                    let opts = if w % 2 == 0 {
                        TransactionOptions::new_optimistic()
                    } else {
                        TransactionOptions::new_pessimistic()
                    };
                    // A rollback can fail when its store was just killed: the transaction is
                    // left to its locks' TTL, which readers resolve; no panic on drop.
                    let opts = opts.drop_check(CheckLevel::Warn);
                    let Ok(mut txn) = client.begin_with_options(opts).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let res: tikv_client::Result<()> = async {
                        let a = balance(txn.get_for_update(key(from)).await?);
                        let b = balance(txn.get_for_update(key(to)).await?);
                        if a >= amount {
                            txn.put(key(from), (a - amount).to_string()).await?;
                            txn.put(key(to), (b + amount).to_string()).await?;
                        }
                        txn.commit().await?;
                        Ok(())
                    }
                    .await;
                    match res {
                        Ok(()) => {
                            transfers.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            let _ = txn.rollback().await;
                            // The cluster may be in trouble: do not spin on instant errors.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
    }

    /// The total of a snapshot read at a fresh timestamp; `Ok(None)` if the read failed (it
    /// may meet locks of transactions cut off by a fault, or a Region in transit).
    pub async fn snapshot_total(&self) -> Result<Option<u64>, String> {
        let Ok(ts) = self.client.current_timestamp().await else {
            return Ok(None);
        };
        let mut snap = self
            .client
            .snapshot(ts, TransactionOptions::new_optimistic().read_only());
        match snap.scan(key(0)..key(ACCOUNTS), ACCOUNTS as u32).await {
            Ok(pairs) => {
                let pairs: Vec<_> = pairs.collect();
                if pairs.len() != ACCOUNTS {
                    return Err(format!(
                        "a snapshot saw {} accounts, not {ACCOUNTS}",
                        pairs.len()
                    ));
                }
                Ok(Some(pairs.into_iter().map(|kv| balance(Some(kv.1))).sum()))
            }
            Err(_) => Ok(None),
        }
    }

    /// Stops the transfer clients and waits for them.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            w.await.unwrap();
        }
    }

    /// The total read in one transaction once the faults are over. Locks of transactions cut
    /// off by a fault may still stand: reading resolves them (after their TTL), and orphaned
    /// ones are settled as client-go would (`resolve_orphan`); retried for up to 60 s.
    pub async fn final_total(&self, pd: std::net::SocketAddr) -> u64 {
        let client = &self.client;
        let started = Instant::now();
        let mut diagnosed = false;
        loop {
            let attempt: tikv_client::Result<u64> = async {
                let opts = TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn);
                let mut t = client.begin_with_options(opts).await?;
                let mut sum = 0;
                for i in 0..ACCOUNTS {
                    sum += balance(t.get(key(i)).await?);
                }
                t.rollback().await?;
                Ok(sum)
            }
            .await;
            match attempt {
                Ok(sum) => return sum,
                Err(e) => {
                    if let Some((start_ts, primary)) = txn_not_found(&e) {
                        resolve_orphan(client, pd, start_ts, primary).await;
                    }
                    if !diagnosed && started.elapsed() > Duration::from_secs(20) {
                        diagnosed = true;
                        println!("the final read keeps failing ({e:?}); the locks standing:");
                        print_locks(client, pd).await;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "the final read kept failing: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// A raw gRPC connection to the leader of the Region holding `key`, as the client would
/// address it (encoded key lookup in PD).
pub async fn leader_of(
    pd: std::net::SocketAddr,
    key: &[u8],
) -> (
    tikvpb::tikv_client::TikvClient<tonic::transport::Channel>,
    kvrpcpb::Context,
) {
    let mut pdc = pdpb::pd_client::PdClient::connect(format!("http://{pd}"))
        .await
        .unwrap();
    let cluster_id = pdc
        .get_members(pdpb::GetMembersRequest { header: None })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .cluster_id;
    let header = Some(pdpb::RequestHeader {
        cluster_id,
        sender_id: 0,
    });
    let enc = prkv::txn::codec::encode_key(key);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = pdc
            .get_region(pdpb::GetRegionRequest {
                header: header.clone(),
                region_key: enc.clone(),
                need_buckets: false,
            })
            .await
            .unwrap()
            .into_inner();
        if let (Some(region), Some(leader)) = (r.region, r.leader) {
            let store = pdc
                .get_store(pdpb::GetStoreRequest {
                    header: header.clone(),
                    store_id: leader.store_id,
                })
                .await
                .unwrap()
                .into_inner()
                .store
                .unwrap();
            let kv = tikvpb::tikv_client::TikvClient::connect(format!("http://{}", store.address))
                .await
                .unwrap();
            let ctx = kvrpcpb::Context {
                region_id: region.id,
                region_epoch: region.region_epoch,
                peer: Some(leader),
                api_version: kvrpcpb::ApiVersion::V2 as i32,
                ..Default::default()
            };
            return (kv, ctx);
        }
        assert!(Instant::now() < deadline, "no leader for {key:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn ks(k: &str) -> Vec<u8> {
    [b"x\0\0\0".as_slice(), k.as_bytes()].concat()
}

/// Sends one raw request to the leader of the Region holding `key`, again while the answer is
/// a region error (PD's view of leaders lags a little).
#[macro_export]
macro_rules! on_leader {
    ($pd:expr, $key:expr, |$kv:ident, $ctx:ident| $call:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (mut $kv, $ctx) = $crate::common::bank::leader_of($pd, $key).await;
            let resp = $call.await.unwrap().into_inner();
            if resp.region_error.is_none() {
                break resp;
            }
            assert!(Instant::now() < deadline, "{:?}", resp.region_error);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }};
}

/// Every lock on the bank's accounts, each read from its Region's leader.
pub async fn account_locks(pd: std::net::SocketAddr) -> Vec<kvrpcpb::LockInfo> {
    let mut locks = Vec::new();
    for i in 0..ACCOUNTS {
        let k = ks(&key(i));
        let mut end = k.clone();
        end.push(0);
        let resp = on_leader!(pd, &k, |kv, ctx| kv.kv_scan_lock(
            kvrpcpb::ScanLockRequest {
                context: Some(ctx),
                max_version: u64::MAX,
                start_key: k.clone(),
                end_key: end.clone(),
                limit: 10,
            }
        ));
        locks.extend(resp.locks);
    }
    locks
}

/// Milliseconds until `l` expires at timestamp `now` (negative: expired), as clients judge it.
pub fn expires_in_ms(l: &kvrpcpb::LockInfo, now: u64) -> i64 {
    (l.lock_version >> 18) as i64 + l.lock_ttl as i64 - (now >> 18) as i64
}

/// The transaction and primary of a `TxnNotFound` a read failed with.
pub fn txn_not_found(e: &tikv_client::Error) -> Option<(u64, Vec<u8>)> {
    use tikv_client::Error;
    let errs = match e {
        Error::MultipleKeyErrors(v) | Error::ExtractedErrors(v) => v.iter().collect::<Vec<_>>(),
        other => vec![other],
    };
    errs.into_iter().find_map(|e| match e {
        Error::KeyError(k) => k
            .txn_not_found
            .as_ref()
            .map(|t| (t.start_ts, t.primary_key.clone())),
        Error::TxnNotFound(t) => Some((t.start_ts, t.primary_key.clone())),
        _ => None,
    })
}

/// What client-go does, and `tikv-client` 0.4 cannot: a lock whose primary has neither a lock
/// nor a commit record (the transaction died between prewriting a secondary and its primary)
/// is settled by CheckTxnStatus with `rollback_if_not_exist` once the lock's TTL has passed.
/// `tikv-client` 0.4 means to (`get_txn_status_from_lock`), but the `TxnNotFound` reaches it
/// wrapped in `MultipleKeyErrors` and is never recognised, so its reader fails forever. The
/// server's part is checked here: told to, it rolls the primary back, and the reader's next
/// attempt resolves the secondary as rolled back.
pub async fn resolve_orphan(
    client: &TransactionClient,
    pd: std::net::SocketAddr,
    start_ts: u64,
    primary: Vec<u8>,
) {
    let now = client.current_timestamp().await.unwrap().version();
    // Every lock of that transaction must have expired (as client-go checks the one it met).
    let live = account_locks(pd)
        .await
        .iter()
        .any(|l| l.lock_version == start_ts && expires_in_ms(l, now) > 0);
    if live {
        return;
    }
    let status = on_leader!(pd, &primary, |kv, ctx| kv.kv_check_txn_status(
        kvrpcpb::CheckTxnStatusRequest {
            context: Some(ctx),
            primary_key: primary.clone(),
            lock_ts: start_ts,
            caller_start_ts: now,
            current_ts: now,
            rollback_if_not_exist: true,
            ..Default::default()
        }
    ));
    println!(
        "transaction {start_ts} had no primary record: CheckTxnStatus with \
         rollback_if_not_exist answered action {:?}, commit {}, error {:?}",
        status.action, status.commit_version, status.error
    );
}

/// Prints every lock on the bank's accounts, when it expires by the current TSO, and what
/// CheckTxnStatus says of its primary: what a reader stuck on a lock would need to know.
pub async fn print_locks(client: &TransactionClient, pd: std::net::SocketAddr) {
    let now = client.current_timestamp().await.unwrap().version();
    for l in account_locks(pd).await {
        let expires_in_ms = expires_in_ms(&l, now);
        let primary = l.primary_lock.clone();
        let status = on_leader!(pd, &primary, |kv, ctx| kv.kv_check_txn_status(
            kvrpcpb::CheckTxnStatusRequest {
                context: Some(ctx),
                primary_key: primary.clone(),
                lock_ts: l.lock_version,
                caller_start_ts: now,
                current_ts: now,
                rollback_if_not_exist: false,
                ..Default::default()
            }
        ));
        println!(
            "  lock on {:?}: start_ts {} type {} ttl {} ms (expires in {expires_in_ms} ms), \
             for_update_ts {}, primary {:?}: status ttl {} commit {} action {:?} error {:?}",
            String::from_utf8_lossy(&l.key),
            l.lock_version,
            l.lock_type,
            l.lock_ttl,
            l.lock_for_update_ts,
            String::from_utf8_lossy(&primary),
            status.lock_ttl,
            status.commit_version,
            status.action,
            status.error
        );
    }
}
