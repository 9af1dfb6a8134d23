//! Percolator on one Region: reading versions and locks from a snapshot, and the actions of
//! each transactional command, which turn into one batch of engine mutations.
//!
//! Every action reads from a linearizable snapshot of the Region taken *after* the command's
//! latches were acquired, and its mutations are proposed fenced on that snapshot's term: no
//! other command on the same keys can run between the read and the write (latches), and no
//! other leader's write can (the fence). That is what makes check-then-write safe here.
//!
//! The rules, as TiKV applies them:
//! * A key is locked by at most one transaction. A prewrite or pessimistic lock that finds
//!   another transaction's lock fails with `KeyIsLocked`; the client resolves it and retries.
//! * An optimistic prewrite fails with `WriteConflict` if a commit newer than its start exists.
//! * Rollbacks leave a record at the start timestamp, so a prewrite that arrives late (after
//!   its transaction was rolled back by someone resolving its lock) cannot resurrect it.
//! * Commit and rollback are idempotent; committing a rolled-back key, or rolling back a
//!   committed one, is an error.
//! * A pessimistic lock fails with `WriteConflict` if a commit newer than its `for_update_ts`
//!   exists (the statement retries with a newer one), and for good with
//!   `PessimisticLockRolledBack` if its own transaction was rolled back on the key, however
//!   many commits lie above that rollback.
//!
//! The unit tests (`mvcc/tests.rs`) run every rule on an in-memory snapshot.

use prkv_proto::kvrpcpb::{self, KeyError, Op};
use prkv_proto::serverpb::{mutation, Mutation};

use super::codec::SHORT_VALUE_MAX_LEN;
use super::codec::{append_ts, encode_key, split_ts, Lock, LockType, Write, WriteType};
use crate::storage::engine::Snapshot;
use crate::storage::{Cf, ScanDir};

/// An action's failure: a key error the client understands, or trouble reading the engine.
#[derive(Debug)]
pub enum TxnError {
    Key(Box<KeyError>),
    Storage(String),
}

impl From<KeyError> for TxnError {
    fn from(e: KeyError) -> Self {
        TxnError::Key(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, TxnError>;

fn storage<E: std::fmt::Display>(e: E) -> TxnError {
    TxnError::Storage(e.to_string())
}

pub fn locked(lock: &Lock, key: &[u8]) -> TxnError {
    KeyError {
        locked: Some(lock.info(key)),
        ..Default::default()
    }
    .into()
}

fn abort(msg: String) -> TxnError {
    KeyError {
        abort: msg,
        ..Default::default()
    }
    .into()
}

fn retryable(msg: String) -> TxnError {
    KeyError {
        retryable: msg,
        ..Default::default()
    }
    .into()
}

fn pessimistic_lock_not_found(key: &[u8], start_ts: u64) -> TxnError {
    retryable(format!(
        "PessimisticLockNotFound: key {key:?}, start_ts {start_ts}"
    ))
}

pub fn txn_not_found(start_ts: u64, primary: &[u8]) -> TxnError {
    KeyError {
        txn_not_found: Some(kvrpcpb::TxnNotFound {
            start_ts,
            primary_key: primary.to_vec(),
        }),
        ..Default::default()
    }
    .into()
}

/// The physical part (milliseconds) of a TSO timestamp.
pub fn physical(ts: u64) -> u64 {
    ts >> 18
}

/// Whether `lock` outlived its TTL as of `current_ts`.
pub fn expired(lock: &Lock, current_ts: u64) -> bool {
    physical(current_ts) >= physical(lock.start_ts).saturating_add(lock.ttl)
}

/// What became of a transaction on one key, from its write records.
#[derive(Debug, PartialEq, Eq)]
pub enum CommitRecord {
    Committed(u64),
    RolledBack,
    None,
}

/// Reads locks, write records and values from a Region snapshot.
pub struct Reader<'a> {
    pub snap: &'a dyn Snapshot,
}

impl<'a> Reader<'a> {
    pub fn new(snap: &'a dyn Snapshot) -> Self {
        Reader { snap }
    }

    pub fn load_lock(&self, ek: &[u8]) -> Result<Option<Lock>> {
        match self.snap.get(Cf::Lock, ek).map_err(storage)? {
            None => Ok(None),
            Some(v) => Lock::decode(&v).map(Some).map_err(storage),
        }
    }

    /// Write records of `ek` with commit_ts <= `ts`, newest first, while `f` returns true.
    fn walk_writes(&self, ek: &[u8], ts: u64, f: &mut dyn FnMut(u64, Write) -> bool) -> Result<()> {
        let start = append_ts(ek, ts);
        let mut end = append_ts(ek, 0);
        end.push(0);
        let mut failure = None;
        self.snap
            .scan(Cf::Write, &start, &end, ScanDir::Forward, &mut |k, v| {
                let parsed = split_ts(k).and_then(|(_, ts)| Ok((ts, Write::decode(v)?)));
                match parsed {
                    Ok((commit_ts, w)) => f(commit_ts, w),
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                }
            })
            .map_err(storage)?;
        match failure {
            Some(e) => Err(TxnError::Storage(e)),
            None => Ok(()),
        }
    }

    /// The newest write record of `ek` at or below `ts`.
    pub fn seek_write(&self, ek: &[u8], ts: u64) -> Result<Option<(u64, Write)>> {
        let mut found = None;
        self.walk_writes(ek, ts, &mut |commit_ts, w| {
            found = Some((commit_ts, w));
            false
        })?;
        Ok(found)
    }

    /// Whether the transaction `start_ts` committed or rolled back `ek`.
    pub fn commit_record(&self, ek: &[u8], start_ts: u64) -> Result<CommitRecord> {
        let mut rec = CommitRecord::None;
        self.walk_writes(ek, u64::MAX, &mut |commit_ts, w| {
            if commit_ts < start_ts {
                return false; // older than the transaction: none of its records below
            }
            if w.start_ts == start_ts {
                rec = if w.write_type == WriteType::Rollback {
                    CommitRecord::RolledBack
                } else {
                    CommitRecord::Committed(commit_ts)
                };
                return false;
            }
            true
        })?;
        Ok(rec)
    }

    /// The value of `ek` as of `ts` (ignoring locks), and the commit that wrote it.
    pub fn get_value(&self, ek: &[u8], ts: u64) -> Result<Option<Vec<u8>>> {
        let mut found: Option<Write> = None;
        self.walk_writes(ek, ts, &mut |_, w| match w.write_type {
            WriteType::Put | WriteType::Delete => {
                found = Some(w);
                false
            }
            WriteType::Lock | WriteType::Rollback => true,
        })?;
        match found {
            Some(w) if w.write_type == WriteType::Put => match w.short_value {
                Some(v) => Ok(Some(v)),
                None => {
                    let v = self
                        .snap
                        .get(Cf::Default, &append_ts(ek, w.start_ts))
                        .map_err(storage)?;
                    v.map(Some).ok_or_else(|| {
                        TxnError::Storage(format!(
                            "write record at start_ts {} has no value: data corrupt",
                            w.start_ts
                        ))
                    })
                }
            },
            _ => Ok(None),
        }
    }

    /// Whether `ek` has a value as of now (the newest data record is a Put).
    fn exists(&self, ek: &[u8]) -> Result<bool> {
        Ok(self.get_value(ek, u64::MAX)?.is_some())
    }
}

/// A snapshot read at `read_ts` must not see past a lock that may commit below it.
/// `bypass` lists transactions the reader already resolved (committed above `read_ts`).
pub fn check_read_lock(lock: &Lock, key: &[u8], read_ts: u64, bypass: &[u64]) -> Result<()> {
    if lock.start_ts > read_ts
        || matches!(lock.lock_type, LockType::Lock | LockType::Pessimistic)
        || lock.min_commit_ts > read_ts
        || bypass.contains(&lock.start_ts)
    {
        return Ok(());
    }
    Err(locked(lock, key))
}

/// A snapshot read of one key: the lock check, then the newest visible value.
pub fn get(reader: &Reader, key: &[u8], read_ts: u64, bypass: &[u64]) -> Result<Option<Vec<u8>>> {
    let ek = encode_key(key);
    if let Some(lock) = reader.load_lock(&ek)? {
        check_read_lock(&lock, key, read_ts, bypass)?;
    }
    reader.get_value(&ek, read_ts)
}

/// The mutations one command makes, in order.
#[derive(Default)]
pub struct Txn {
    pub mutations: Vec<Mutation>,
}

impl Txn {
    fn put(&mut self, cf: &str, key: Vec<u8>, value: Vec<u8>) {
        self.mutations.push(Mutation {
            op: mutation::Op::Put as i32,
            cf: cf.into(),
            key,
            value,
        });
    }

    fn delete(&mut self, cf: &str, key: Vec<u8>) {
        self.mutations.push(Mutation {
            op: mutation::Op::Delete as i32,
            cf: cf.into(),
            key,
            value: Vec::new(),
        });
    }

    pub fn put_lock(&mut self, ek: &[u8], lock: &Lock) {
        self.put("lock", ek.to_vec(), lock.encode());
    }

    pub fn unlock(&mut self, ek: &[u8]) {
        self.delete("lock", ek.to_vec());
    }

    pub fn put_write(&mut self, ek: &[u8], commit_ts: u64, w: &Write) {
        self.put("write", append_ts(ek, commit_ts), w.encode());
    }

    pub fn delete_write(&mut self, ek: &[u8], commit_ts: u64) {
        self.delete("write", append_ts(ek, commit_ts));
    }

    pub fn put_value(&mut self, ek: &[u8], start_ts: u64, value: Vec<u8>) {
        self.put("default", append_ts(ek, start_ts), value);
    }

    pub fn delete_value(&mut self, ek: &[u8], start_ts: u64) {
        self.delete("default", append_ts(ek, start_ts));
    }
}

/// What a prewrite needs besides the mutation.
pub struct PrewriteProps<'a> {
    pub start_ts: u64,
    pub primary: &'a [u8],
    pub lock_ttl: u64,
    pub txn_size: u64,
    pub min_commit_ts: u64,
    /// 0 for an optimistic transaction.
    pub for_update_ts: u64,
}

/// Prewrite of one key. `pessimistic`: the key must hold this transaction's pessimistic lock.
pub fn prewrite(
    reader: &Reader,
    txn: &mut Txn,
    m: &kvrpcpb::Mutation,
    props: &PrewriteProps,
    pessimistic: bool,
) -> Result<()> {
    let op = Op::try_from(m.op).map_err(|_| abort(format!("unknown mutation op {}", m.op)))?;
    let ek = encode_key(&m.key);
    let start_ts = props.start_ts;
    let mut lock_ttl = props.lock_ttl;
    match reader.load_lock(&ek)? {
        Some(lock) if lock.start_ts != start_ts => {
            // Locks are exclusive: a key that should hold our pessimistic lock but holds
            // another transaction's has lost ours, and resolving that lock and retrying could
            // only end in `PessimisticLockNotFound`; say it now (TiKV's rule).
            return Err(if pessimistic {
                pessimistic_lock_not_found(&m.key, start_ts)
            } else {
                locked(&lock, &m.key)
            });
        }
        Some(lock) if lock.lock_type != LockType::Pessimistic => return Ok(()), // done already
        Some(_) if !pessimistic => {
            return Err(abort(format!(
                "key {:?} holds a pessimistic lock of this transaction, prewritten optimistically",
                m.key
            )))
        }
        // The prewrite lock replaces our pessimistic one. A heartbeat may have extended the
        // pessimistic lock's TTL past the request's; keeping the longer one stops the prewrite
        // from making a live primary look expired to resolvers (TiKV keeps the larger too).
        Some(lock) => lock_ttl = lock_ttl.max(lock.ttl),
        None if pessimistic => {
            // The pessimistic lock is gone: rolled back by someone resolving it (its rollback
            // record is found below newer commits too), or already committed (a retried
            // prewrite).
            return match reader.commit_record(&ek, start_ts)? {
                CommitRecord::Committed(_) => Ok(()),
                _ => Err(pessimistic_lock_not_found(&m.key, start_ts)),
            };
        }
        None => {
            // Optimistic: any commit at or after our start (or our own rollback) conflicts.
            let mut conflict = None;
            reader.walk_writes(&ek, u64::MAX, &mut |commit_ts, w| {
                if commit_ts < start_ts {
                    return false;
                }
                let ours_rolled_back =
                    w.write_type == WriteType::Rollback && w.start_ts == start_ts;
                if w.write_type != WriteType::Rollback || ours_rolled_back {
                    conflict = Some((commit_ts, w, ours_rolled_back));
                    return false;
                }
                true
            })?;
            if let Some((commit_ts, w, self_rolled_back)) = conflict {
                return Err(KeyError {
                    conflict: Some(kvrpcpb::WriteConflict {
                        start_ts,
                        conflict_ts: w.start_ts,
                        conflict_commit_ts: commit_ts,
                        key: m.key.clone(),
                        primary: props.primary.to_vec(),
                        reason: if self_rolled_back {
                            kvrpcpb::write_conflict::Reason::SelfRolledBack
                        } else {
                            kvrpcpb::write_conflict::Reason::Optimistic
                        } as i32,
                    }),
                    ..Default::default()
                }
                .into());
            }
        }
    }
    if matches!(op, Op::Insert | Op::CheckNotExists) && reader.exists(&ek)? {
        return Err(KeyError {
            already_exist: Some(kvrpcpb::AlreadyExist { key: m.key.clone() }),
            ..Default::default()
        }
        .into());
    }
    let lock_type = match op {
        Op::CheckNotExists => return Ok(()),
        Op::Put | Op::Insert => LockType::Put,
        Op::Del => LockType::Delete,
        Op::Lock => LockType::Lock,
        Op::Rollback | Op::PessimisticLock => {
            return Err(abort(format!("{op:?} is not a prewrite mutation")))
        }
    };
    let mut short_value = None;
    if lock_type == LockType::Put {
        if m.value.len() <= SHORT_VALUE_MAX_LEN {
            short_value = Some(m.value.clone());
        } else {
            txn.put_value(&ek, start_ts, m.value.clone());
        }
    }
    txn.put_lock(
        &ek,
        &Lock {
            lock_type,
            primary: props.primary.to_vec(),
            start_ts,
            ttl: lock_ttl,
            short_value,
            for_update_ts: props.for_update_ts,
            txn_size: props.txn_size,
            min_commit_ts: props.min_commit_ts,
        },
    );
    Ok(())
}

/// Commit of one key at `commit_ts`.
pub fn commit(
    reader: &Reader,
    txn: &mut Txn,
    key: &[u8],
    start_ts: u64,
    commit_ts: u64,
) -> Result<()> {
    let ek = encode_key(key);
    match reader.load_lock(&ek)? {
        Some(lock) if lock.start_ts == start_ts => {
            // A pessimistic lock that was never prewritten is left behind when its transaction
            // lost the pessimistic rollback (or the reply to the lock request) and committed
            // without the key. Resolvers that find the transaction committed commit its locks;
            // refusing this one would leave the key locked for good. It changes no data, so it
            // commits as a `Lock` record (TiKV's rule).
            let write_type = WriteType::from_lock(lock.lock_type).unwrap_or(WriteType::Lock);
            if commit_ts < lock.min_commit_ts {
                return Err(KeyError {
                    commit_ts_expired: Some(kvrpcpb::CommitTsExpired {
                        start_ts,
                        attempted_commit_ts: commit_ts,
                        key: key.to_vec(),
                        min_commit_ts: lock.min_commit_ts,
                    }),
                    ..Default::default()
                }
                .into());
            }
            txn.put_write(
                &ek,
                commit_ts,
                &Write {
                    write_type,
                    start_ts,
                    short_value: lock.short_value.clone(),
                },
            );
            txn.unlock(&ek);
            Ok(())
        }
        _ => match reader.commit_record(&ek, start_ts)? {
            CommitRecord::Committed(_) => Ok(()), // a retried commit
            _ => Err(retryable(format!(
                "TxnLockNotFound: no lock of {start_ts} on key {key:?} (rolled back?)"
            ))),
        },
    }
}

/// Rolls back one key of transaction `start_ts` (protected: a rollback record stays).
/// Returns the commit timestamp instead if the key was committed.
pub fn rollback(reader: &Reader, txn: &mut Txn, key: &[u8], start_ts: u64) -> Result<Option<u64>> {
    let ek = encode_key(key);
    if let Some(lock) = reader.load_lock(&ek)? {
        if lock.start_ts == start_ts {
            if lock.lock_type == LockType::Put && lock.short_value.is_none() {
                txn.delete_value(&ek, start_ts);
            }
            txn.unlock(&ek);
            write_rollback(txn, &ek, start_ts);
            return Ok(None);
        }
    }
    match reader.commit_record(&ek, start_ts)? {
        CommitRecord::Committed(ts) => Ok(Some(ts)),
        CommitRecord::RolledBack => Ok(None),
        CommitRecord::None => {
            write_rollback(txn, &ek, start_ts);
            Ok(None)
        }
    }
}

fn write_rollback(txn: &mut Txn, ek: &[u8], start_ts: u64) {
    txn.put_write(
        ek,
        start_ts,
        &Write {
            write_type: WriteType::Rollback,
            start_ts,
            short_value: None,
        },
    );
}

/// The outcome of `check_txn_status` on a primary key.
pub struct TxnStatus {
    pub lock_ttl: u64,
    pub commit_version: u64,
    pub action: kvrpcpb::Action,
    pub lock_info: Option<kvrpcpb::LockInfo>,
}

/// Decides what became of transaction `lock_ts` from its primary key: committed, rolled back,
/// alive (pushing its min_commit_ts past the caller's reads), or expired (rolled back now).
pub fn check_txn_status(
    reader: &Reader,
    txn: &mut Txn,
    primary: &[u8],
    lock_ts: u64,
    caller_start_ts: u64,
    current_ts: u64,
    rollback_if_not_exist: bool,
) -> Result<TxnStatus> {
    let ek = encode_key(primary);
    if let Some(mut lock) = reader.load_lock(&ek)? {
        if lock.start_ts == lock_ts {
            if expired(&lock, current_ts) {
                let pessimistic = lock.lock_type == LockType::Pessimistic;
                rollback(reader, txn, primary, lock_ts)?;
                return Ok(TxnStatus {
                    lock_ttl: 0,
                    commit_version: 0,
                    action: if pessimistic {
                        kvrpcpb::Action::TtlExpirePessimisticRollback
                    } else {
                        kvrpcpb::Action::TtlExpireRollback
                    },
                    lock_info: None,
                });
            }
            let mut action = kvrpcpb::Action::NoAction;
            if lock.min_commit_ts > 0
                && caller_start_ts != u64::MAX
                && caller_start_ts >= lock.min_commit_ts
            {
                lock.min_commit_ts = caller_start_ts + 1;
                txn.put_lock(&ek, &lock);
                action = kvrpcpb::Action::MinCommitTsPushed;
            }
            return Ok(TxnStatus {
                lock_ttl: lock.ttl,
                commit_version: 0,
                action,
                lock_info: Some(lock.info(primary)),
            });
        }
    }
    match reader.commit_record(&ek, lock_ts)? {
        CommitRecord::Committed(ts) => Ok(TxnStatus {
            lock_ttl: 0,
            commit_version: ts,
            action: kvrpcpb::Action::NoAction,
            lock_info: None,
        }),
        CommitRecord::RolledBack => Ok(TxnStatus {
            lock_ttl: 0,
            commit_version: 0,
            action: kvrpcpb::Action::NoAction,
            lock_info: None,
        }),
        CommitRecord::None if rollback_if_not_exist => {
            write_rollback(txn, &ek, lock_ts);
            Ok(TxnStatus {
                lock_ttl: 0,
                commit_version: 0,
                action: kvrpcpb::Action::LockNotExistRollback,
                lock_info: None,
            })
        }
        CommitRecord::None => Err(txn_not_found(lock_ts, primary)),
    }
}

/// What a pessimistic lock needs besides the key.
pub struct PessimisticLockProps<'a> {
    pub start_ts: u64,
    pub for_update_ts: u64,
    pub primary: &'a [u8],
    pub lock_ttl: u64,
    pub need_value: bool,
    pub lock_only_if_exists: bool,
}

/// What a pessimistic lock request found in the key's write records.
enum Found {
    /// A data or lock record committed after `for_update_ts`.
    Newer(u64, Write),
    /// The requesting transaction's own rollback.
    RolledBack,
    /// The requesting transaction's own commit, at or below `for_update_ts`.
    Committed(u64),
}

/// Takes a pessimistic lock on one key; returns the key's newest value when `need_value`.
pub fn pessimistic_lock(
    reader: &Reader,
    txn: &mut Txn,
    key: &[u8],
    props: &PessimisticLockProps,
) -> Result<Option<Vec<u8>>> {
    let ek = encode_key(key);
    let start_ts = props.start_ts;
    if let Some(mut lock) = reader.load_lock(&ek)? {
        if lock.start_ts != start_ts {
            return Err(locked(&lock, key));
        }
        // Already ours: a retried request, or a lock taken again with a newer for_update_ts.
        if lock.lock_type == LockType::Pessimistic && lock.for_update_ts < props.for_update_ts {
            lock.for_update_ts = props.for_update_ts;
            txn.put_lock(&ek, &lock);
        }
        return if props.need_value {
            reader.get_value(&ek, u64::MAX)
        } else {
            Ok(None)
        };
    }
    // The write records decide, newest first. A data or lock record above `for_update_ts`
    // means the caller read a stale version: it retries with a newer `for_update_ts` (another
    // transaction's rollback up there changes no data and is passed over).
    //
    // Our own rollback must be found even below newer commits. It means someone resolving our
    // locks found the transaction dead and may have rolled back its other keys as well; a lock
    // taken again here would let it prewrite and commit this key anyway, a partial commit (on
    // the primary, a commit of a transaction declared rolled back). Looking only at the newest
    // record misses the rollback as soon as another transaction commits the key after it.
    let for_update_ts = props.for_update_ts;
    let mut found = None;
    reader.walk_writes(&ek, u64::MAX, &mut |commit_ts, w| {
        let ours = w.start_ts == start_ts;
        if ours && w.write_type == WriteType::Rollback {
            found = Some(Found::RolledBack);
            return false;
        }
        if commit_ts > for_update_ts {
            if w.write_type != WriteType::Rollback {
                found = Some(Found::Newer(commit_ts, w));
                return false;
            }
            return true;
        }
        if commit_ts < start_ts {
            return false; // older than the transaction: none of its records below
        }
        if ours {
            found = Some(Found::Committed(commit_ts));
            return false;
        }
        true
    })?;
    match found {
        None => {}
        Some(Found::RolledBack) => {
            // TiKV's `PessimisticLockRolledBack`, which it reports as an abort.
            return Err(abort(format!(
                "PessimisticLockRolledBack: transaction {start_ts} was rolled back on key {key:?}"
            )));
        }
        Some(Found::Committed(commit_ts)) => {
            // At or below `for_update_ts`, which a client never asks for after its commit
            // (TiKV would take the lock). A lock over a finished transaction's own commit can
            // only be a stale or confused request; refuse it.
            return Err(abort(format!(
                "transaction {start_ts} already committed key {key:?} at {commit_ts}"
            )));
        }
        Some(Found::Newer(commit_ts, w)) => {
            return Err(KeyError {
                conflict: Some(kvrpcpb::WriteConflict {
                    start_ts,
                    conflict_ts: w.start_ts,
                    conflict_commit_ts: commit_ts,
                    key: key.to_vec(),
                    primary: props.primary.to_vec(),
                    reason: kvrpcpb::write_conflict::Reason::PessimisticRetry as i32,
                }),
                ..Default::default()
            }
            .into());
        }
    }
    let value = if props.need_value || props.lock_only_if_exists {
        reader.get_value(&ek, u64::MAX)?
    } else {
        None
    };
    if props.lock_only_if_exists && value.is_none() {
        return Ok(None);
    }
    txn.put_lock(
        &ek,
        &Lock {
            lock_type: LockType::Pessimistic,
            primary: props.primary.to_vec(),
            start_ts,
            ttl: props.lock_ttl,
            short_value: None,
            for_update_ts: props.for_update_ts,
            txn_size: 0,
            min_commit_ts: 0,
        },
    );
    Ok(value)
}

/// Releases this transaction's pessimistic lock on `key` (taken at or before `for_update_ts`).
pub fn pessimistic_rollback(
    reader: &Reader,
    txn: &mut Txn,
    key: &[u8],
    start_ts: u64,
    for_update_ts: u64,
) -> Result<()> {
    let ek = encode_key(key);
    if let Some(lock) = reader.load_lock(&ek)? {
        if lock.start_ts == start_ts
            && lock.lock_type == LockType::Pessimistic
            && lock.for_update_ts <= for_update_ts
        {
            txn.unlock(&ek);
        }
    }
    Ok(())
}

/// Extends the TTL of the transaction's primary lock; returns the TTL now in force.
pub fn heartbeat(
    reader: &Reader,
    txn: &mut Txn,
    primary: &[u8],
    start_ts: u64,
    advise_ttl: u64,
) -> Result<u64> {
    let ek = encode_key(primary);
    match reader.load_lock(&ek)? {
        Some(mut lock) if lock.start_ts == start_ts => {
            if advise_ttl > lock.ttl {
                lock.ttl = advise_ttl;
                txn.put_lock(&ek, &lock);
            }
            Ok(lock.ttl)
        }
        _ => Err(txn_not_found(start_ts, primary)),
    }
}

/// GC of one key's versions: below `safe_point` only the newest committed value survives (and
/// not even that if it is a delete); rollback and lock records below it go.
pub fn gc_key(reader: &Reader, txn: &mut Txn, ek: &[u8], safe_point: u64) -> Result<usize> {
    let mut kept_newest = false;
    let mut removed = 0;
    let mut ops: Vec<(u64, Write)> = Vec::new();
    reader.walk_writes(ek, safe_point, &mut |commit_ts, w| {
        ops.push((commit_ts, w));
        true
    })?;
    for (commit_ts, w) in ops {
        let keep = !kept_newest && w.write_type == WriteType::Put;
        if matches!(w.write_type, WriteType::Put | WriteType::Delete) {
            kept_newest = true;
        }
        if keep {
            continue;
        }
        txn.delete_write(ek, commit_ts);
        if w.write_type == WriteType::Put && w.short_value.is_none() {
            txn.delete_value(ek, w.start_ts);
        }
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
