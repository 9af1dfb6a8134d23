//! How transactional data is laid out in a Region's engine (TiKV's encodings).
//!
//! A user key `k` (as the client sends it, with its keyspace prefix under API v2) is stored
//! memcomparable-encoded, `enc(k)`, the form Region boundaries use:
//!
//! | column family | key | value |
//! |---|---|---|
//! | `lock` | `enc(k)` | a [`Lock`]: the transaction holding `k` |
//! | `write` | `enc(k)` + `!commit_ts` | a [`Write`]: a commit (or rollback) record |
//! | `default` | `enc(k)` + `!start_ts` | a value too long to keep inline |
//!
//! Timestamps are appended bitwise-inverted, big-endian, so a key's newest version sorts first.
//! Values of at most [`SHORT_VALUE_MAX_LEN`] bytes live inside the lock and then inside the
//! write record; longer ones are written to `default` at prewrite.
//!
//! Lock and write values use TiKV's byte layouts: a type byte, then varint-encoded fields, then
//! optional fields each introduced by a one-byte tag. Decoding is strict: a malformed record is
//! an error (the data is corrupt), never a guess.

use crate::server::raw::{decode_bytes, encode_bytes};

/// Values up to this long are stored inline in locks and write records (TiKV's limit).
pub const SHORT_VALUE_MAX_LEN: usize = 255;

const TS_LEN: usize = 8;

/// `enc(key)`: the lock-CF key, and the prefix of every version of `key`.
pub fn encode_key(key: &[u8]) -> Vec<u8> {
    encode_bytes(key)
}

/// `enc(key)` + `!ts`.
pub fn append_ts(encoded: &[u8], ts: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(encoded.len() + TS_LEN);
    k.extend_from_slice(encoded);
    k.extend_from_slice(&(!ts).to_be_bytes());
    k
}

/// Splits a versioned key into `enc(key)` and its timestamp.
pub fn split_ts(versioned: &[u8]) -> Result<(&[u8], u64), String> {
    if versioned.len() < TS_LEN {
        return Err(format!(
            "versioned key of {} bytes has no timestamp",
            versioned.len()
        ));
    }
    let (k, ts) = versioned.split_at(versioned.len() - TS_LEN);
    Ok((k, !u64::from_be_bytes(ts.try_into().expect("8 bytes"))))
}

/// The user key of an encoded key.
pub fn decode_key(encoded: &[u8]) -> Result<Vec<u8>, String> {
    decode_bytes(encoded)
}

/// If `key` is a versioned transactional key (`enc(k)` + 8 bytes), `enc(k)`: where a Region
/// may be split without separating a key's versions.
pub fn truncate_ts_for_split(key: &[u8]) -> Option<&[u8]> {
    if key.len() <= TS_LEN || !(key.len() - TS_LEN).is_multiple_of(9) {
        return None;
    }
    let k = &key[..key.len() - TS_LEN];
    decode_bytes(k).ok().map(|_| k)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some((&byte, rest)) = b.split_first() else {
            return Err("truncated varint".into());
        };
        *b = rest;
        v |= u64::from(byte & 0x7F) << shift;
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn get_u64(b: &mut &[u8]) -> Result<u64, String> {
    if b.len() < 8 {
        return Err("truncated u64".into());
    }
    let (n, rest) = b.split_at(8);
    *b = rest;
    Ok(u64::from_be_bytes(n.try_into().expect("8 bytes")))
}

fn get_bytes<'a>(b: &mut &'a [u8], len: usize) -> Result<&'a [u8], String> {
    if b.len() < len {
        return Err("truncated bytes".into());
    }
    let (v, rest) = b.split_at(len);
    *b = rest;
    Ok(v)
}

/// What a lock is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockType {
    Put,
    Delete,
    /// Read-for-write: the key is locked, its value does not change.
    Lock,
    /// A pessimistic lock, taken before prewrite.
    Pessimistic,
}

impl LockType {
    fn byte(self) -> u8 {
        match self {
            LockType::Put => b'P',
            LockType::Delete => b'D',
            LockType::Lock => b'L',
            LockType::Pessimistic => b'S',
        }
    }

    fn from_byte(b: u8) -> Result<Self, String> {
        Ok(match b {
            b'P' => LockType::Put,
            b'D' => LockType::Delete,
            b'L' => LockType::Lock,
            b'S' => LockType::Pessimistic,
            other => return Err(format!("unknown lock type {other:#x}")),
        })
    }

    /// The `kvrpcpb.Op` clients see in `LockInfo.lock_type`.
    pub fn op(self) -> prkv_proto::kvrpcpb::Op {
        use prkv_proto::kvrpcpb::Op;
        match self {
            LockType::Put => Op::Put,
            LockType::Delete => Op::Del,
            LockType::Lock => Op::Lock,
            LockType::Pessimistic => Op::PessimisticLock,
        }
    }
}

/// A transaction's lock on one key (the `lock` column family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    pub lock_type: LockType,
    pub primary: Vec<u8>,
    pub start_ts: u64,
    pub ttl: u64,
    pub short_value: Option<Vec<u8>>,
    pub for_update_ts: u64,
    pub txn_size: u64,
    pub min_commit_ts: u64,
}

const FLAG_SHORT_VALUE: u8 = b'v';
const FLAG_FOR_UPDATE_TS: u8 = b'f';
const FLAG_TXN_SIZE: u8 = b't';
const FLAG_MIN_COMMIT_TS: u8 = b'c';

impl Lock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.lock_type.byte()];
        put_varint(&mut b, self.primary.len() as u64);
        b.extend_from_slice(&self.primary);
        put_varint(&mut b, self.start_ts);
        put_varint(&mut b, self.ttl);
        if let Some(v) = &self.short_value {
            b.push(FLAG_SHORT_VALUE);
            b.push(v.len() as u8);
            b.extend_from_slice(v);
        }
        if self.for_update_ts > 0 {
            b.push(FLAG_FOR_UPDATE_TS);
            b.extend_from_slice(&self.for_update_ts.to_be_bytes());
        }
        if self.txn_size > 0 {
            b.push(FLAG_TXN_SIZE);
            b.extend_from_slice(&self.txn_size.to_be_bytes());
        }
        if self.min_commit_ts > 0 {
            b.push(FLAG_MIN_COMMIT_TS);
            b.extend_from_slice(&self.min_commit_ts.to_be_bytes());
        }
        b
    }

    pub fn decode(mut b: &[u8]) -> Result<Lock, String> {
        let (&t, rest) = b.split_first().ok_or("empty lock")?;
        b = rest;
        let lock_type = LockType::from_byte(t)?;
        let plen = get_varint(&mut b)? as usize;
        let primary = get_bytes(&mut b, plen)?.to_vec();
        let start_ts = get_varint(&mut b)?;
        let ttl = get_varint(&mut b)?;
        let mut lock = Lock {
            lock_type,
            primary,
            start_ts,
            ttl,
            short_value: None,
            for_update_ts: 0,
            txn_size: 0,
            min_commit_ts: 0,
        };
        while let Some((&flag, rest)) = b.split_first() {
            b = rest;
            match flag {
                FLAG_SHORT_VALUE => {
                    let (&len, rest) = b.split_first().ok_or("truncated short value")?;
                    b = rest;
                    lock.short_value = Some(get_bytes(&mut b, len as usize)?.to_vec());
                }
                FLAG_FOR_UPDATE_TS => lock.for_update_ts = get_u64(&mut b)?,
                FLAG_TXN_SIZE => lock.txn_size = get_u64(&mut b)?,
                FLAG_MIN_COMMIT_TS => lock.min_commit_ts = get_u64(&mut b)?,
                other => return Err(format!("unknown lock field {other:#x}")),
            }
        }
        Ok(lock)
    }

    /// The lock as clients see it in `KeyIsLocked`.
    pub fn info(&self, key: &[u8]) -> prkv_proto::kvrpcpb::LockInfo {
        prkv_proto::kvrpcpb::LockInfo {
            primary_lock: self.primary.clone(),
            lock_version: self.start_ts,
            key: key.to_vec(),
            lock_ttl: self.ttl,
            txn_size: self.txn_size,
            lock_type: self.lock_type.op() as i32,
            lock_for_update_ts: self.for_update_ts,
            min_commit_ts: self.min_commit_ts,
            ..Default::default()
        }
    }
}

/// What a write record says happened at its commit timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteType {
    Put,
    Delete,
    Lock,
    /// The transaction that started at this timestamp was rolled back: its prewrite must never
    /// succeed later (a "protected" rollback).
    Rollback,
}

impl WriteType {
    fn byte(self) -> u8 {
        match self {
            WriteType::Put => b'P',
            WriteType::Delete => b'D',
            WriteType::Lock => b'L',
            WriteType::Rollback => b'R',
        }
    }

    fn from_byte(b: u8) -> Result<Self, String> {
        Ok(match b {
            b'P' => WriteType::Put,
            b'D' => WriteType::Delete,
            b'L' => WriteType::Lock,
            b'R' => WriteType::Rollback,
            other => return Err(format!("unknown write type {other:#x}")),
        })
    }

    pub fn from_lock(t: LockType) -> Option<WriteType> {
        match t {
            LockType::Put => Some(WriteType::Put),
            LockType::Delete => Some(WriteType::Delete),
            LockType::Lock => Some(WriteType::Lock),
            LockType::Pessimistic => None,
        }
    }
}

/// A commit or rollback record (the `write` column family), keyed by its commit timestamp
/// (a rollback's "commit" timestamp is the transaction's start timestamp).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub write_type: WriteType,
    pub start_ts: u64,
    pub short_value: Option<Vec<u8>>,
}

impl Write {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.write_type.byte()];
        put_varint(&mut b, self.start_ts);
        if let Some(v) = &self.short_value {
            b.push(FLAG_SHORT_VALUE);
            b.push(v.len() as u8);
            b.extend_from_slice(v);
        }
        b
    }

    pub fn decode(mut b: &[u8]) -> Result<Write, String> {
        let (&t, rest) = b.split_first().ok_or("empty write record")?;
        b = rest;
        let write_type = WriteType::from_byte(t)?;
        let start_ts = get_varint(&mut b)?;
        let mut w = Write {
            write_type,
            start_ts,
            short_value: None,
        };
        while let Some((&flag, rest)) = b.split_first() {
            b = rest;
            match flag {
                FLAG_SHORT_VALUE => {
                    let (&len, rest) = b.split_first().ok_or("truncated short value")?;
                    b = rest;
                    w.short_value = Some(get_bytes(&mut b, len as usize)?.to_vec());
                }
                other => return Err(format!("unknown write field {other:#x}")),
            }
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_newest_first_and_round_trip() {
        let k = encode_key(b"key");
        let (a, b) = (append_ts(&k, 10), append_ts(&k, 20));
        assert!(b < a, "the newer version sorts first");
        assert_eq!(split_ts(&a).unwrap(), (k.as_slice(), 10));
        assert_eq!(truncate_ts_for_split(&a), Some(k.as_slice()));
        assert_eq!(truncate_ts_for_split(b"raw key"), None);
        assert_eq!(decode_key(&k).unwrap(), b"key");
    }

    #[test]
    fn locks_and_writes_round_trip_and_reject_garbage() {
        let lock = Lock {
            lock_type: LockType::Pessimistic,
            primary: b"pk".to_vec(),
            start_ts: 1 << 40,
            ttl: 3000,
            short_value: Some(b"v".to_vec()),
            for_update_ts: 7,
            txn_size: 3,
            min_commit_ts: 9,
        };
        assert_eq!(Lock::decode(&lock.encode()).unwrap(), lock);
        let w = Write {
            write_type: WriteType::Put,
            start_ts: 5,
            short_value: Some(vec![0; 255]),
        };
        assert_eq!(Write::decode(&w.encode()).unwrap(), w);
        assert!(Lock::decode(b"").is_err());
        assert!(Lock::decode(b"Z").is_err());
        assert!(Write::decode(b"P\x05v\x09ab").is_err());
        assert!(Write::decode(b"P\x05?").is_err());
    }
}
