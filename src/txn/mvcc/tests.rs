//! The Percolator rules of [`super`], step by step, on an in-memory snapshot.
//!
//! [`MemStore`] keeps the three column families in `BTreeMap`s and implements the engine's
//! [`Snapshot`]; each `must_<act>` step runs one action on it the way the server does (read,
//! decide, then apply the action's mutations only if it succeeded: a key error writes nothing)
//! and panics with the step if the outcome differs. A test is a script of such steps, in the
//! manner of TiKV's `must_prewrite_put(k, v, pk, ts)` tests.
//!
//! Covered: reads at timestamps, write conflicts and locked keys, rollback protection,
//! idempotent commit and rollback, pessimistic locks (conflicts, the transaction's own rollback
//! below newer commits, pessimistic prewrite and rollback), check_txn_status, resolving locks,
//! heartbeats and GC.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;

use prkv_proto::kvrpcpb::{self, write_conflict::Reason, Action, KeyError, Op};
use prkv_proto::serverpb::mutation;

use super::*;
use crate::storage::engine::Snapshot;
use crate::storage::{Cf, ScanDir};
use crate::txn::codec::{append_ts, encode_key, split_ts, Lock, LockType, Write, WriteType};

/// The TTL of every lock the steps take, in milliseconds.
const TTL: u64 = 3000;

/// A TSO timestamp at `ms` milliseconds (logical part 0), for steps where lock TTLs matter.
fn ts(ms: u64) -> u64 {
    ms << 18
}

/// A key's value, if it has one.
type Value = Option<Vec<u8>>;

/// One Region's column families in memory.
#[derive(Default)]
struct MemStore {
    default: BTreeMap<Vec<u8>, Vec<u8>>,
    lock: BTreeMap<Vec<u8>, Vec<u8>>,
    write: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Snapshot for MemStore {
    fn get(&self, cf: Cf, key: &[u8]) -> crate::storage::Result<Option<Vec<u8>>> {
        Ok(self.cf(cf).get(key).cloned())
    }

    fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        dir: ScanDir,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> crate::storage::Result<()> {
        if !end.is_empty() && start >= end {
            return Ok(());
        }
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        let range = (Bound::Included(start), upper);
        let mut pairs: Vec<_> = self.cf(cf).range::<[u8], _>(range).collect();
        if dir == ScanDir::Reverse {
            pairs.reverse();
        }
        for (k, v) in pairs {
            if !f(k.as_slice(), v.as_slice()) {
                break;
            }
        }
        Ok(())
    }

    fn export_ssts(&self, _dir: &Path) -> crate::storage::Result<()> {
        Err(crate::storage::Error::Other(
            "no SST files in memory".into(),
        ))
    }
}

impl MemStore {
    fn cf(&self, cf: Cf) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        match cf {
            Cf::Default => &self.default,
            Cf::Lock => &self.lock,
            Cf::Write => &self.write,
        }
    }

    fn cf_mut(&mut self, name: &str) -> &mut BTreeMap<Vec<u8>, Vec<u8>> {
        match name {
            "default" => &mut self.default,
            "lock" => &mut self.lock,
            "write" => &mut self.write,
            other => panic!("a mutation names the unknown column family {other:?}"),
        }
    }

    /// Applies an action's mutations, as the Raftstore applies its entry.
    fn apply(&mut self, txn: Txn) {
        for m in txn.mutations {
            let map = self.cf_mut(&m.cf);
            match mutation::Op::try_from(m.op) {
                Ok(mutation::Op::Put) => {
                    map.insert(m.key, m.value);
                }
                Ok(mutation::Op::Delete) => {
                    map.remove(&m.key);
                }
                Ok(mutation::Op::DeleteRange) => {
                    map.retain(|k, _| *k < m.key || (!m.value.is_empty() && *k >= m.value));
                }
                Err(_) => panic!("unknown mutation op {}", m.op),
            }
        }
    }

    /// Runs one action on a snapshot and applies its mutations if it succeeded.
    fn run<T>(&mut self, action: impl FnOnce(&Reader, &mut Txn) -> Result<T>) -> Result<T> {
        let mut txn = Txn::default();
        let out = action(&Reader::new(&*self), &mut txn);
        if out.is_ok() {
            self.apply(txn);
        }
        out
    }

    // ---- steps ----

    fn try_prewrite(&mut self, op: Op, k: &[u8], v: &[u8], props: &PrewriteProps) -> Result<()> {
        let m = kvrpcpb::Mutation {
            op: op as i32,
            key: k.to_vec(),
            value: v.to_vec(),
            ..Default::default()
        };
        let pessimistic = props.for_update_ts > 0;
        self.run(|r, t| prewrite(r, t, &m, props, pessimistic))
    }

    fn must_prewrite(&mut self, op: Op, k: &[u8], v: &[u8], props: &PrewriteProps) {
        let ts = props.start_ts;
        let res = self.try_prewrite(op, k, v, props);
        res.unwrap_or_else(|e| panic!("prewrite {op:?} {k:?}@{ts}: {e:?}"));
    }

    fn must_prewrite_err(&mut self, op: Op, k: &[u8], v: &[u8], props: &PrewriteProps) -> KeyError {
        let step = format!("prewrite {op:?} {k:?}@{}", props.start_ts);
        must_key_error(self.try_prewrite(op, k, v, props), &step)
    }

    fn must_prewrite_put(&mut self, k: &[u8], v: &[u8], pk: &[u8], start_ts: u64) {
        self.must_prewrite(Op::Put, k, v, &props(pk, start_ts));
    }

    fn must_prewrite_put_err(&mut self, k: &[u8], v: &[u8], pk: &[u8], start_ts: u64) -> KeyError {
        self.must_prewrite_err(Op::Put, k, v, &props(pk, start_ts))
    }

    fn must_prewrite_delete(&mut self, k: &[u8], pk: &[u8], start_ts: u64) {
        self.must_prewrite(Op::Del, k, b"", &props(pk, start_ts));
    }

    fn must_prewrite_lock(&mut self, k: &[u8], pk: &[u8], start_ts: u64) {
        self.must_prewrite(Op::Lock, k, b"", &props(pk, start_ts));
    }

    fn must_pessimistic_prewrite_put(&mut self, k: &[u8], v: &[u8], pk: &[u8], ts: u64, fut: u64) {
        self.must_prewrite(Op::Put, k, v, &pessimistic_props(pk, ts, fut));
    }

    /// A pessimistic prewrite of `k` as its own primary that must fail.
    fn must_pessimistic_prewrite_err(&mut self, k: &[u8], ts: u64, fut: u64) -> KeyError {
        self.must_prewrite_err(Op::Put, k, b"v", &pessimistic_props(k, ts, fut))
    }

    fn must_commit(&mut self, k: &[u8], start_ts: u64, commit_ts: u64) {
        let res = self.run(|r, t| commit(r, t, k, start_ts, commit_ts));
        res.unwrap_or_else(|e| panic!("commit {k:?} {start_ts}->{commit_ts}: {e:?}"));
    }

    fn must_commit_err(&mut self, k: &[u8], start_ts: u64, commit_ts: u64) -> KeyError {
        let res = self.run(|r, t| commit(r, t, k, start_ts, commit_ts));
        must_key_error(res, &format!("commit {k:?} {start_ts}->{commit_ts}"))
    }

    fn must_rollback(&mut self, k: &[u8], start_ts: u64) {
        match self.run(|r, t| rollback(r, t, k, start_ts)) {
            Ok(None) => {}
            other => panic!("rollback {k:?}@{start_ts}: {other:?}"),
        }
    }

    /// A rollback of a committed key: refused, with the commit timestamp.
    fn must_rollback_committed(&mut self, k: &[u8], start_ts: u64) -> u64 {
        match self.run(|r, t| rollback(r, t, k, start_ts)) {
            Ok(Some(commit_ts)) => commit_ts,
            other => panic!("rollback {k:?}@{start_ts}: expected committed, got {other:?}"),
        }
    }

    fn try_get(&mut self, k: &[u8], read_ts: u64) -> Result<Option<Vec<u8>>> {
        self.run(|r, _| get(r, k, read_ts, &[]))
    }

    fn must_get(&mut self, k: &[u8], read_ts: u64, want: &[u8]) {
        let got = self.try_get(k, read_ts).unwrap();
        assert_eq!(got.as_deref(), Some(want), "{k:?}@{read_ts}");
    }

    fn must_get_none(&mut self, k: &[u8], read_ts: u64) {
        let got = self.try_get(k, read_ts).unwrap();
        assert_eq!(got, None, "{k:?}@{read_ts}");
    }

    /// A read that runs into a lock: returns the lock's start_ts.
    fn must_get_locked(&mut self, k: &[u8], read_ts: u64) -> u64 {
        let e = must_key_error(self.try_get(k, read_ts), &format!("get {k:?}@{read_ts}"));
        e.locked
            .map(|l| l.lock_version)
            .expect("a KeyIsLocked error")
    }

    fn try_pessimistic_lock(&mut self, k: &[u8], pk: &[u8], ts: u64, fut: u64) -> Result<Value> {
        let props = PessimisticLockProps {
            start_ts: ts,
            for_update_ts: fut,
            primary: pk,
            lock_ttl: TTL,
            need_value: true,
            lock_only_if_exists: false,
        };
        self.run(|r, t| pessimistic_lock(r, t, k, &props))
    }

    /// Takes a pessimistic lock; returns the key's value.
    fn must_pessimistic_lock(&mut self, k: &[u8], pk: &[u8], ts: u64, fut: u64) -> Value {
        let res = self.try_pessimistic_lock(k, pk, ts, fut);
        res.unwrap_or_else(|e| panic!("pessimistic lock {k:?}@{ts},{fut}: {e:?}"))
    }

    fn must_pessimistic_lock_err(&mut self, k: &[u8], pk: &[u8], ts: u64, fut: u64) -> KeyError {
        let res = self.try_pessimistic_lock(k, pk, ts, fut);
        let e = must_key_error(res, &format!("pessimistic lock {k:?}@{ts},{fut}"));
        let held = self.lock_of(k).map(|l| l.start_ts);
        assert_ne!(held, Some(ts), "{k:?} locked by {ts}");
        e
    }

    fn must_pessimistic_rollback(&mut self, k: &[u8], start_ts: u64, for_update_ts: u64) {
        let res = self.run(|r, t| pessimistic_rollback(r, t, k, start_ts, for_update_ts));
        res.unwrap_or_else(|e| panic!("pessimistic rollback {k:?}@{start_ts}: {e:?}"));
    }

    /// check_txn_status of transaction `lock` by a caller reading at `caller`, at time `now`
    /// (leaving no rollback if the transaction left no trace).
    fn must_check_txn_status(&mut self, pk: &[u8], lock: u64, caller: u64, now: u64) -> TxnStatus {
        let res = self.run(|r, t| check_txn_status(r, t, pk, lock, caller, now, false));
        res.unwrap_or_else(|e| panic!("check_txn_status {pk:?}@{lock}: {e:?}"))
    }

    fn try_heartbeat(&mut self, pk: &[u8], start_ts: u64, advise_ttl: u64) -> Result<u64> {
        self.run(|r, t| heartbeat(r, t, pk, start_ts, advise_ttl))
    }

    fn must_gc(&mut self, k: &[u8], safe_point: u64) -> usize {
        let res = self.run(|r, t| gc_key(r, t, &encode_key(k), safe_point));
        res.unwrap_or_else(|e| panic!("gc {k:?}@{safe_point}: {e:?}"))
    }

    // ---- what the store holds ----

    fn lock_of(&self, k: &[u8]) -> Option<Lock> {
        let v = self.lock.get(&encode_key(k))?;
        Some(Lock::decode(v).unwrap())
    }

    fn must_locked(&self, k: &[u8], start_ts: u64) -> Lock {
        let lock = self
            .lock_of(k)
            .unwrap_or_else(|| panic!("{k:?} is not locked"));
        assert_eq!(lock.start_ts, start_ts, "the lock on {k:?}");
        lock
    }

    fn must_unlocked(&self, k: &[u8]) {
        assert_eq!(self.lock_of(k), None, "the lock on {k:?}");
    }

    fn write_at(&self, k: &[u8], commit_ts: u64) -> Option<Write> {
        let v = self.write.get(&append_ts(&encode_key(k), commit_ts));
        v.map(|v| Write::decode(v).unwrap())
    }

    fn must_written(&self, k: &[u8], start_ts: u64, commit_ts: u64, write_type: WriteType) {
        let w = self.write_at(k, commit_ts);
        let w = w.unwrap_or_else(|| panic!("{k:?} has no write record at {commit_ts}"));
        let got = (w.start_ts, w.write_type);
        assert_eq!(got, (start_ts, write_type), "{k:?}@{commit_ts}");
    }

    /// The commit timestamps of `k`'s write records, newest first.
    fn versions(&self, k: &[u8]) -> Vec<u64> {
        let ek = encode_key(k);
        let versioned = |key: &&Vec<u8>| key.len() == ek.len() + 8 && key.starts_with(&ek);
        let keys = self.write.keys().filter(versioned);
        keys.map(|key| split_ts(key).unwrap().1).collect()
    }

    fn value_at(&self, k: &[u8], start_ts: u64) -> Option<&Vec<u8>> {
        self.default.get(&append_ts(&encode_key(k), start_ts))
    }
}

fn props(primary: &[u8], start_ts: u64) -> PrewriteProps<'_> {
    PrewriteProps {
        start_ts,
        primary,
        lock_ttl: TTL,
        txn_size: 1,
        min_commit_ts: 0,
        for_update_ts: 0,
    }
}

fn pessimistic_props(primary: &[u8], start_ts: u64, for_update_ts: u64) -> PrewriteProps<'_> {
    PrewriteProps {
        for_update_ts,
        ..props(primary, start_ts)
    }
}

/// A lock that may not commit below `min_commit_ts` (one a reader can push).
fn min_commit_props(primary: &[u8], start_ts: u64, min_commit_ts: u64) -> PrewriteProps<'_> {
    PrewriteProps {
        min_commit_ts,
        ..props(primary, start_ts)
    }
}

fn must_key_error<T>(res: Result<T>, step: &str) -> KeyError {
    match res {
        Err(TxnError::Key(e)) => *e,
        Err(TxnError::Storage(e)) => panic!("{step}: storage error {e}, expected a key error"),
        Ok(_) => panic!("{step}: succeeded, expected a key error"),
    }
}

fn must_conflict(e: &KeyError, reason: Reason) -> &kvrpcpb::WriteConflict {
    let c = e.conflict.as_ref();
    let c = c.unwrap_or_else(|| panic!("expected a write conflict, got {e:?}"));
    assert_eq!(c.reason, reason as i32, "the reason of {c:?}");
    c
}

/// 300 bytes: too long to ride in the lock, so it goes to the default column family.
fn long_value() -> Vec<u8> {
    vec![b'x'; 300]
}

#[test]
fn prewrite_commit_and_read_at_timestamps() {
    let mut s = MemStore::default();
    s.must_get_none(b"k", 1);
    s.must_prewrite_put(b"k", b"v1", b"k", 5);
    s.must_get_none(b"k", 3); // the lock starts after the read
    assert_eq!(s.must_get_locked(b"k", 7), 5); // it may commit below 7
    s.must_commit(b"k", 5, 10);
    s.must_written(b"k", 5, 10, WriteType::Put);
    s.must_unlocked(b"k");
    s.must_get_none(b"k", 7);
    s.must_get(b"k", 10, b"v1");

    s.must_prewrite_delete(b"k", b"k", 15);
    s.must_commit(b"k", 15, 20);
    s.must_get(b"k", 17, b"v1");
    s.must_get_none(b"k", 20);

    // A long value lives in the default column family, at start_ts.
    s.must_prewrite_put(b"long", &long_value(), b"long", 25);
    assert_eq!(s.value_at(b"long", 25), Some(&long_value()));
    s.must_commit(b"long", 25, 30);
    s.must_get(b"long", 30, &long_value());

    // A Lock record changes no value: reads look through it.
    s.must_prewrite_put(b"k", b"v3", b"k", 35);
    s.must_commit(b"k", 35, 40);
    s.must_prewrite_lock(b"k", b"k", 45);
    s.must_get(b"k", 47, b"v3"); // a Lock-type lock blocks no read
    s.must_commit(b"k", 45, 50);
    s.must_written(b"k", 45, 50, WriteType::Lock);
    s.must_get(b"k", 55, b"v3");
}

#[test]
fn reads_pass_locks_that_cannot_hide_a_commit() {
    let mut s = MemStore::default();
    s.must_pessimistic_lock(b"p", b"p", 10, 10);
    s.must_get_none(b"p", 20); // a pessimistic lock is no write yet

    // A lock whose min_commit_ts is above the read cannot commit below it.
    s.must_prewrite(Op::Put, b"m", b"v", &min_commit_props(b"m", 10, 30));
    s.must_get_none(b"m", 20);
    assert_eq!(s.must_get_locked(b"m", 30), 10);

    // A reader that resolved the lock (committed above its read) passes it.
    s.must_prewrite_put(b"b", b"v", b"b", 10);
    assert_eq!(s.run(|r, _| get(r, b"b", 20, &[10])).unwrap(), None);
}

#[test]
fn write_conflict_key_is_locked_and_already_exist() {
    let mut s = MemStore::default();
    s.must_prewrite_put(b"k", b"v1", b"k", 5);
    s.must_commit(b"k", 5, 10);

    // Transaction 8 started before that commit: it must not overwrite it.
    let e = s.must_prewrite_put_err(b"k", b"v2", b"k", 8);
    let c = must_conflict(&e, Reason::Optimistic);
    assert_eq!((c.conflict_ts, c.conflict_commit_ts), (5, 10));
    s.must_unlocked(b"k");

    s.must_prewrite_put(b"k", b"v2", b"k", 12);
    let e = s.must_prewrite_put_err(b"k", b"v3", b"k", 13);
    assert_eq!(e.locked.map(|l| l.lock_version), Some(12));
    s.must_prewrite_put(b"k", b"v2", b"k", 12); // a retried prewrite: done already
    s.must_commit(b"k", 12, 14);

    let e = s.must_prewrite_err(Op::Insert, b"k", b"v", &props(b"k", 16));
    assert!(e.already_exist.is_some(), "{e:?}");
    let e = s.must_prewrite_err(Op::CheckNotExists, b"k", b"", &props(b"k", 16));
    assert!(e.already_exist.is_some(), "{e:?}");
    s.must_prewrite(Op::CheckNotExists, b"new", b"", &props(b"new", 16));
    s.must_unlocked(b"new"); // a check writes nothing
    s.must_prewrite(Op::Insert, b"new", b"v", &props(b"new", 16));
    s.must_locked(b"new", 16);
}

#[test]
fn rollback_protection() {
    let mut s = MemStore::default();
    s.must_prewrite_put(b"k", &long_value(), b"k", 5);
    s.must_rollback(b"k", 5);
    s.must_unlocked(b"k");
    assert_eq!(s.value_at(b"k", 5), None); // the rolled-back value goes
    s.must_written(b"k", 5, 5, WriteType::Rollback);
    let e = s.must_prewrite_put_err(b"k", b"v", b"k", 5); // a late prewrite
    must_conflict(&e, Reason::SelfRolledBack);

    // A rollback before any prewrite protects too (a resolver got there first), and is found
    // below other transactions' rollbacks.
    s.must_rollback(b"k", 7);
    s.must_rollback(b"k", 9);
    let e = s.must_prewrite_put_err(b"k", b"v", b"k", 7);
    must_conflict(&e, Reason::SelfRolledBack);

    // Below a newer commit the prewrite still fails (that commit conflicts first).
    s.must_prewrite_put(b"k", b"v11", b"k", 11);
    s.must_commit(b"k", 11, 12);
    let e = s.must_prewrite_put_err(b"k", b"v", b"k", 7);
    assert!(e.conflict.is_some(), "{e:?}");
    s.must_get(b"k", 13, b"v11");
    assert_eq!(s.versions(b"k"), vec![12, 9, 7, 5]);
}

#[test]
fn commit_and_rollback_are_idempotent_and_exclusive() {
    let mut s = MemStore::default();
    let e = s.must_commit_err(b"k", 5, 10); // never prewritten
    assert!(e.retryable.contains("TxnLockNotFound"), "{e:?}");

    s.must_prewrite_put(b"k", b"v", b"k", 5);
    s.must_commit(b"k", 5, 10);
    s.must_commit(b"k", 5, 10); // a retried commit
    assert_eq!(s.must_rollback_committed(b"k", 5), 10);
    assert_eq!(s.write_at(b"k", 5), None);

    s.must_prewrite_put(b"k", b"v", b"k", 15);
    s.must_rollback(b"k", 15);
    s.must_rollback(b"k", 15); // a retried rollback
    let e = s.must_commit_err(b"k", 15, 20);
    assert!(e.retryable.contains("TxnLockNotFound"), "{e:?}");
    assert_eq!(s.write_at(b"k", 20), None);

    // Another transaction's lock is not ours to commit.
    s.must_prewrite_put(b"k", b"v", b"k", 25);
    s.must_commit_err(b"k", 24, 26);
    s.must_locked(b"k", 25);

    // A commit below the lock's min_commit_ts would break a reader that pushed it.
    s.must_prewrite(Op::Put, b"m", b"v", &min_commit_props(b"m", 25, 30));
    let e = s.must_commit_err(b"m", 25, 28);
    assert_eq!(e.commit_ts_expired.map(|c| c.min_commit_ts), Some(30));
    s.must_commit(b"m", 25, 30);
}

#[test]
fn pessimistic_lock_prewrite_commit() {
    let mut s = MemStore::default();
    s.must_prewrite_put(b"k", b"v0", b"k", 1);
    s.must_commit(b"k", 1, 2);

    let v = s.must_pessimistic_lock(b"k", b"k", 10, 10);
    assert_eq!(v.as_deref(), Some(&b"v0"[..]));
    assert_eq!(s.must_locked(b"k", 10).lock_type, LockType::Pessimistic);
    let e = s.must_prewrite_put_err(b"k", b"v", b"k", 11);
    assert!(e.locked.is_some(), "{e:?}");
    let e = s.must_pessimistic_lock_err(b"k", b"k", 11, 11);
    assert!(e.locked.is_some(), "{e:?}");

    // Locked again by a later statement of the same transaction.
    s.must_pessimistic_lock(b"k", b"k", 10, 12);
    assert_eq!(s.must_locked(b"k", 10).for_update_ts, 12);

    s.must_pessimistic_prewrite_put(b"k", b"v1", b"k", 10, 12);
    assert_eq!(s.must_locked(b"k", 10).lock_type, LockType::Put);
    s.must_commit(b"k", 10, 15);
    s.must_get(b"k", 15, b"v1");
    s.must_pessimistic_prewrite_put(b"k", b"v1", b"k", 10, 12); // retried after the commit
    s.must_unlocked(b"k");
}

#[test]
fn pessimistic_lock_conflicts_with_newer_commits_only() {
    let mut s = MemStore::default();
    s.must_prewrite_put(b"k", b"v", b"k", 5);
    s.must_commit(b"k", 5, 10);

    // The statement read as of 8 and missed the commit at 10: it retries with a newer one.
    let e = s.must_pessimistic_lock_err(b"k", b"k", 3, 8);
    let c = must_conflict(&e, Reason::PessimisticRetry);
    assert_eq!((c.conflict_ts, c.conflict_commit_ts), (5, 10));
    s.must_pessimistic_lock(b"k", b"k", 3, 11);
    s.must_pessimistic_rollback(b"k", 3, 11);

    // Another transaction's rollback above for_update_ts changes no data.
    s.must_rollback(b"k", 20);
    s.must_pessimistic_lock(b"k", b"k", 15, 15);

    // A Lock record above it does conflict (its transaction read the key).
    s.must_prewrite_lock(b"l", b"l", 30);
    s.must_commit(b"l", 30, 32);
    let e = s.must_pessimistic_lock_err(b"l", b"l", 25, 28);
    must_conflict(&e, Reason::PessimisticRetry);
}

/// The transaction's own rollback ends it on this key, even below newer commits: taking the
/// lock again would let a transaction that a resolver declared dead commit this key.
#[test]
fn pessimistic_lock_after_own_rollback() {
    let mut s = MemStore::default();
    s.must_pessimistic_lock(b"k", b"k", 10, 10);
    s.must_rollback(b"k", 10); // someone resolving the lock rolled the transaction back
    let e = s.must_pessimistic_lock_err(b"k", b"k", 10, 10);
    assert!(e.abort.contains("PessimisticLockRolledBack"), "{e:?}");

    s.must_prewrite_put(b"k", b"v20", b"k", 20);
    s.must_commit(b"k", 20, 25);
    // Not yet past the newer commit: that conflict comes first.
    let e = s.must_pessimistic_lock_err(b"k", b"k", 10, 22);
    must_conflict(&e, Reason::PessimisticRetry);
    // Past it: the rollback below must still be found.
    let e = s.must_pessimistic_lock_err(b"k", b"k", 10, 30);
    assert!(e.abort.contains("PessimisticLockRolledBack"), "{e:?}");

    // Nor may the transaction prewrite the key, pessimistically or not.
    let e = s.must_pessimistic_prewrite_err(b"k", 10, 30);
    assert!(e.retryable.contains("PessimisticLockNotFound"), "{e:?}");
    let e = s.must_prewrite_put_err(b"k", b"v", b"k", 10);
    assert!(e.conflict.is_some(), "{e:?}");
    s.must_unlocked(b"k");
    s.must_get(b"k", 40, b"v20");

    // Its own commit: a stale lock request below it conflicts like any newer commit; one
    // above it is refused.
    s.must_pessimistic_lock(b"k", b"k", 40, 40);
    s.must_pessimistic_prewrite_put(b"k", b"v40", b"k", 40, 40);
    s.must_commit(b"k", 40, 45);
    let e = s.must_pessimistic_lock_err(b"k", b"k", 40, 41);
    must_conflict(&e, Reason::PessimisticRetry);
    let e = s.must_pessimistic_lock_err(b"k", b"k", 40, 50);
    assert!(e.abort.contains("already committed"), "{e:?}");
}

#[test]
fn pessimistic_rollback_releases_only_its_lock() {
    let mut s = MemStore::default();
    s.must_pessimistic_lock(b"k", b"k", 10, 12);
    s.must_pessimistic_rollback(b"k", 10, 11); // a lock taken after 11 stays
    s.must_locked(b"k", 10);
    s.must_pessimistic_rollback(b"k", 10, 12);
    s.must_unlocked(b"k");
    assert_eq!(s.versions(b"k"), Vec::<u64>::new()); // and leaves no record
    let e = s.must_pessimistic_prewrite_err(b"k", 10, 12);
    assert!(e.retryable.contains("PessimisticLockNotFound"), "{e:?}");

    // Prewrite locks and other transactions' locks are not its to release.
    s.must_prewrite_put(b"k", b"v", b"k", 20);
    s.must_pessimistic_rollback(b"k", 20, 100);
    s.must_pessimistic_rollback(b"k", 30, 100);
    s.must_locked(b"k", 20);
    // A pessimistic prewrite that finds another transaction's lock has lost its own.
    let e = s.must_pessimistic_prewrite_err(b"k", 30, 30);
    assert!(e.retryable.contains("PessimisticLockNotFound"), "{e:?}");
}

#[test]
fn check_txn_status_decides_the_primary() {
    let mut s = MemStore::default();
    // Alive, and a reader at 150 pushes the lock's min_commit_ts past its read.
    let large = min_commit_props(b"p", ts(100), ts(100) + 1);
    s.must_prewrite(Op::Put, b"p", b"v", &large);
    let st = s.must_check_txn_status(b"p", ts(100), ts(150), ts(150));
    assert_eq!((st.action, st.lock_ttl), (Action::MinCommitTsPushed, TTL));
    assert_eq!(st.lock_info.map(|l| l.lock_version), Some(ts(100)));
    assert_eq!(s.must_locked(b"p", ts(100)).min_commit_ts, ts(150) + 1);
    for caller in [ts(120), u64::MAX] {
        let st = s.must_check_txn_status(b"p", ts(100), caller, ts(160));
        assert_eq!(st.action, Action::NoAction, "caller {caller}");
    }
    let e = s.must_commit_err(b"p", ts(100), ts(140));
    assert!(e.commit_ts_expired.is_some(), "{e:?}");

    // Expired: rolled back now, and reported rolled back from then on.
    let st = s.must_check_txn_status(b"p", ts(100), 0, ts(4000));
    assert_eq!((st.action, st.lock_ttl), (Action::TtlExpireRollback, 0));
    s.must_unlocked(b"p");
    s.must_written(b"p", ts(100), ts(100), WriteType::Rollback);
    let st = s.must_check_txn_status(b"p", ts(100), 0, ts(4000));
    assert_eq!((st.action, st.commit_version), (Action::NoAction, 0));

    // An ordinary lock (no min_commit_ts) is never pushed.
    s.must_prewrite_put(b"q", b"v", b"q", ts(500));
    let st = s.must_check_txn_status(b"q", ts(500), ts(600), ts(600));
    assert_eq!(st.action, Action::NoAction);
    assert_eq!(s.must_locked(b"q", ts(500)).min_commit_ts, 0);

    // Committed: its commit timestamp.
    s.must_commit(b"q", ts(500), ts(510));
    let st = s.must_check_txn_status(b"q", ts(500), ts(600), ts(600));
    assert_eq!((st.action, st.commit_version), (Action::NoAction, ts(510)));

    // Neither lock nor record: not found, or rolled back on request so it can never commit.
    let (lock_ts, now) = (ts(300), ts(350));
    let res = s.run(|r, t| check_txn_status(r, t, b"r", lock_ts, now, now, false));
    let e = must_key_error(res, "check_txn_status of an unknown transaction");
    assert_eq!(e.txn_not_found.map(|t| t.start_ts), Some(lock_ts));
    assert_eq!(s.versions(b"r"), Vec::<u64>::new());
    let res = s.run(|r, t| check_txn_status(r, t, b"r", lock_ts, now, now, true));
    assert_eq!(res.unwrap().action, Action::LockNotExistRollback);
    let e = s.must_prewrite_put_err(b"r", b"v", b"r", ts(300));
    must_conflict(&e, Reason::SelfRolledBack);

    // An expired pessimistic primary.
    s.must_pessimistic_lock(b"s", b"s", ts(400), ts(400));
    let st = s.must_check_txn_status(b"s", ts(400), 0, ts(9000));
    assert_eq!(st.action, Action::TtlExpirePessimisticRollback);
    s.must_written(b"s", ts(400), ts(400), WriteType::Rollback);
}

/// A resolver settles a secondary lock the way the primary went (`resolve_lock` commits or
/// rolls back each lock of the transaction).
#[test]
fn resolve_locks_after_the_primary() {
    let mut s = MemStore::default();
    s.must_prewrite_put(b"p", b"pv", b"p", 10);
    s.must_prewrite_put(b"s", b"sv", b"p", 10);
    s.must_commit(b"p", 10, 15);
    assert_eq!(s.must_get_locked(b"s", 20), 10);
    assert_eq!(s.must_check_txn_status(b"p", 10, 20, 20).commit_version, 15);
    s.must_commit(b"s", 10, 15);
    s.must_get(b"s", 20, b"sv");

    s.must_prewrite_put(b"p", b"pv2", b"p", 30);
    s.must_prewrite_put(b"s", b"sv2", b"p", 30);
    s.must_rollback(b"p", 30);
    assert_eq!(s.must_check_txn_status(b"p", 30, 40, 40).commit_version, 0);
    s.must_rollback(b"s", 30);
    s.must_get(b"s", 40, b"sv");
    s.must_commit_err(b"s", 30, 35); // the client, late

    // A pessimistic lock its transaction never prewrote (it lost the pessimistic rollback)
    // must still be resolvable once the transaction committed: it commits as a Lock record.
    s.must_pessimistic_lock(b"p", b"p", 50, 50);
    s.must_pessimistic_lock(b"s", b"p", 50, 50);
    s.must_pessimistic_prewrite_put(b"p", b"pv3", b"p", 50, 50);
    s.must_commit(b"p", 50, 55);
    assert_eq!(s.must_check_txn_status(b"p", 50, 60, 60).commit_version, 55);
    s.must_commit(b"s", 50, 55);
    s.must_unlocked(b"s");
    s.must_written(b"s", 50, 55, WriteType::Lock);
    s.must_get(b"s", 60, b"sv");
}

#[test]
fn heartbeat_only_extends_a_live_lock() {
    let mut s = MemStore::default();
    s.must_prewrite_put(b"p", b"v", b"p", 10);
    assert_eq!(s.try_heartbeat(b"p", 10, 5000).unwrap(), 5000);
    assert_eq!(s.try_heartbeat(b"p", 10, 100).unwrap(), 5000); // a TTL never shrinks
    assert_eq!(s.must_locked(b"p", 10).ttl, 5000);
    let e = must_key_error(s.try_heartbeat(b"p", 9, 6000), "heartbeat of another txn");
    assert!(e.txn_not_found.is_some(), "{e:?}");
    s.must_commit(b"p", 10, 12);
    let e = must_key_error(s.try_heartbeat(b"p", 10, 6000), "heartbeat after commit");
    assert!(e.txn_not_found.is_some(), "{e:?}");

    // The prewrite replacing a pessimistic primary keeps the TTL the heartbeat gave it.
    s.must_pessimistic_lock(b"q", b"q", 20, 20);
    assert_eq!(s.try_heartbeat(b"q", 20, 9000).unwrap(), 9000);
    s.must_pessimistic_prewrite_put(b"q", b"v", b"q", 20, 20);
    assert_eq!(s.must_locked(b"q", 20).ttl, 9000);
}

#[test]
fn gc_keeps_the_newest_version_below_the_safe_point() {
    let mut s = MemStore::default();
    s.must_prewrite_put(b"k", &long_value(), b"k", 5);
    s.must_commit(b"k", 5, 10);
    s.must_prewrite_put(b"k", b"v2", b"k", 15);
    s.must_commit(b"k", 15, 20);
    s.must_rollback(b"k", 22);
    s.must_prewrite_lock(b"k", b"k", 25);
    s.must_commit(b"k", 25, 30);
    s.must_prewrite_put(b"k", b"v3", b"k", 35);
    s.must_commit(b"k", 35, 40);
    s.must_prewrite_put(b"k", b"v4", b"k", 45); // a lock: GC leaves it alone

    // Nothing below the first commit. Below 32, the Put at 20 is what a read at 32 sees; the
    // Lock and Rollback records above it and everything older (with its long value) go.
    assert_eq!(s.must_gc(b"k", 5), 0);
    assert_eq!(s.must_gc(b"k", 32), 3);
    assert_eq!(s.versions(b"k"), vec![40, 20]);
    assert_eq!(s.value_at(b"k", 5), None);
    s.must_get(b"k", 32, b"v2");
    s.must_get(b"k", 40, b"v3");
    s.must_locked(b"k", 45);
    assert_eq!(s.must_gc(b"k", 32), 0); // idempotent

    // A delete as the newest version below the safe point goes with everything older.
    s.must_prewrite_put(b"d", &long_value(), b"d", 5);
    s.must_commit(b"d", 5, 10);
    s.must_prewrite_delete(b"d", b"d", 15);
    s.must_commit(b"d", 15, 20);
    assert_eq!(s.must_gc(b"d", 25), 2);
    assert_eq!(s.versions(b"d"), Vec::<u64>::new());
    assert_eq!(s.value_at(b"d", 5), None);
    s.must_get_none(b"d", 25);
}
