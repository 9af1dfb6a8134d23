//! RawKV rules that do not depend on gRPC: which keys a request may touch, and how values are
//! stored.
//!
//! **Keys.** With `storage.api-version = 1` keys are stored as clients send them. With API v2
//! every key carries its keyspace: RawKV keys start with `r` and a 3-byte keyspace id (the
//! "DEFAULT" keyspace is `r\0\0\0`), exactly as `tikv-client` sends them when a keyspace is
//! configured; a request of the other API version is refused, as TiKV does, because the two
//! encodings cannot share one key space safely.
//!
//! **Values.** When TTL is possible (`storage.enable-ttl`, or API v2), a stored value is the
//! user's value followed by its expiry, 8 bytes big-endian Unix seconds (0 = never). Expired
//! values are invisible to reads and scans from the second they expire; the bytes stay until
//! they are overwritten or deleted (a compaction filter that drops them is not built yet).

use std::time::{SystemTime, UNIX_EPOCH};

use prkv_proto::kvrpcpb::ApiVersion;

/// Length of the expiry suffix of a TTL-enabled value.
pub const EXPIRY_LEN: usize = 8;
/// The first byte of every RawKV key under API v2.
pub const RAW_KEY_PREFIX: u8 = b'r';
/// `r` + 3-byte keyspace id.
pub const KEYSPACE_PREFIX_LEN: usize = 4;
/// Largest `limit` a scan may ask for: the client's own ceiling (10,240). It bounds the memory
/// of one response together with the key and value size limits.
pub const MAX_SCAN_LIMIT: usize = 10_240;

/// How this store's RawKV is set up (from `storage.*`, fixed at bootstrap).
#[derive(Clone, Copy, Debug)]
pub struct RawConfig {
    pub api_version: u8,
    pub ttl: bool,
    pub max_key_size: u64,
}

impl RawConfig {
    pub fn new(api_version: u8, enable_ttl: bool, max_key_size: u64) -> Self {
        RawConfig {
            api_version,
            ttl: enable_ttl || api_version == 2,
            max_key_size,
        }
    }

    /// Refuses a request whose API version does not match the storage's.
    pub fn check_api_version(&self, req: i32) -> Result<(), String> {
        let ok = match ApiVersion::try_from(req) {
            Ok(ApiVersion::V1) | Ok(ApiVersion::V1ttl) => self.api_version == 1,
            Ok(ApiVersion::V2) => self.api_version == 2,
            Err(_) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "API version mismatch: this store runs storage.api-version = {}, the request \
                 uses {} (configure the client's keyspace to match)",
                self.api_version,
                ApiVersion::try_from(req)
                    .map_or_else(|_| format!("unknown ({req})"), |v| format!("{v:?}"))
            ))
        }
    }

    /// Checks a key a request reads or writes; `write` keys must not be empty.
    pub fn check_key(&self, key: &[u8], write: bool) -> Result<(), String> {
        if key.len() as u64 > self.max_key_size {
            return Err(format!(
                "key of {} bytes is over storage.max-key-size ({} bytes)",
                key.len(),
                self.max_key_size
            ));
        }
        if self.api_version == 2 {
            if key.len() < KEYSPACE_PREFIX_LEN || key[0] != RAW_KEY_PREFIX {
                return Err(format!(
                    "key {} is outside the RawKV key space (API v2 keys start with 'r' and a \
                     3-byte keyspace id)",
                    hex(key)
                ));
            }
            if write && key.len() == KEYSPACE_PREFIX_LEN {
                return Err("key cannot be empty".into());
            }
        } else if write && key.is_empty() {
            return Err("key cannot be empty".into());
        }
        Ok(())
    }

    /// The stored form of a value written with `ttl` seconds to live (0 = forever).
    pub fn encode_value(&self, value: &[u8], ttl: u64) -> Result<Vec<u8>, String> {
        if !self.ttl {
            if ttl != 0 {
                return Err("TTL is disabled on this store (storage.enable-ttl = false)".into());
            }
            return Ok(value.to_vec());
        }
        let expire = if ttl == 0 {
            0
        } else {
            now_secs().saturating_add(ttl)
        };
        let mut v = Vec::with_capacity(value.len() + EXPIRY_LEN);
        v.extend_from_slice(value);
        v.extend_from_slice(&expire.to_be_bytes());
        Ok(v)
    }

    /// The user's value and its expiry (0 = none), or `None` if it has expired.
    pub fn decode_value<'a>(&self, stored: &'a [u8]) -> Result<Option<(&'a [u8], u64)>, String> {
        if !self.ttl {
            return Ok(Some((stored, 0)));
        }
        if stored.len() < EXPIRY_LEN {
            return Err(format!(
                "stored value of {} bytes has no expiry suffix: data corrupt or written with \
                 another storage.enable-ttl",
                stored.len()
            ));
        }
        let (v, e) = stored.split_at(stored.len() - EXPIRY_LEN);
        let expire = u64::from_be_bytes(e.try_into().expect("split at EXPIRY_LEN"));
        if expire != 0 && expire <= now_secs() {
            return Ok(None);
        }
        Ok(Some((v, expire)))
    }
}

/// Memcomparable encoding of a key (groups of 8 bytes, each followed by `0xFF - padding`):
/// order-preserving and prefix-free. Under API v2 Region boundaries, and so the keys stored in
/// the engine, are in this form, as PD and the client expect.
pub fn encode_bytes(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((key.len() / 8 + 1) * 9);
    for chunk in key.chunks(8).chain(if key.len().is_multiple_of(8) {
        Some(&[][..])
    } else {
        None
    }) {
        let pad = 8 - chunk.len();
        out.extend_from_slice(chunk);
        out.extend(std::iter::repeat_n(0u8, pad));
        out.push(0xFF - pad as u8);
    }
    out
}

/// The inverse of [`encode_bytes`]; an error if `enc` is not a valid encoding.
pub fn decode_bytes(enc: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(enc.len());
    let mut groups = enc.chunks_exact(9);
    for g in groups.by_ref() {
        let pad = (0xFF - g[8]) as usize;
        if pad > 8 {
            return Err(format!("bad memcomparable marker {:#x}", g[8]));
        }
        out.extend_from_slice(&g[..8 - pad]);
        if pad > 0 {
            if g[8 - pad..8].iter().any(|b| *b != 0) {
                return Err("bad memcomparable padding".into());
            }
            return if groups.remainder().is_empty() && groups.next().is_none() {
                Ok(out)
            } else {
                Err("bytes after the end of a memcomparable key".into())
            };
        }
    }
    Err("truncated memcomparable key".into())
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_values_round_trip_and_expire() {
        let c = RawConfig::new(1, true, 8192);
        let v = c.encode_value(b"hello", 0).unwrap();
        assert_eq!(c.decode_value(&v).unwrap(), Some((&b"hello"[..], 0)));
        let v = c.encode_value(b"x", 100).unwrap();
        let (got, exp) = c.decode_value(&v).unwrap().unwrap();
        assert_eq!(got, b"x");
        assert!(exp >= now_secs() + 99);
        let mut expired = b"x".to_vec();
        expired.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(c.decode_value(&expired).unwrap(), None);
        assert!(c.decode_value(b"abc").is_err());
    }

    #[test]
    fn memcomparable_round_trips_and_keeps_order() {
        let keys: Vec<Vec<u8>> = vec![
            vec![],
            b"a".to_vec(),
            b"abcdefgh".to_vec(),
            b"abcdefgh\0".to_vec(),
            b"abcdefghi".to_vec(),
            vec![0xff; 17],
            b"r\0\0\0".to_vec(),
            b"r\0\0\x01".to_vec(),
        ];
        for k in &keys {
            assert_eq!(&decode_bytes(&encode_bytes(k)).unwrap(), k);
        }
        let mut sorted = keys.clone();
        sorted.sort();
        let mut by_enc = keys.clone();
        by_enc.sort_by_key(|k| encode_bytes(k));
        assert_eq!(sorted, by_enc);
        assert!(decode_bytes(b"abc").is_err());
        assert!(decode_bytes(&[0, 0, 0, 0, 0, 0, 0, 1, 0xf8]).is_err());
    }

    #[test]
    fn ttl_refused_when_disabled() {
        let c = RawConfig::new(1, false, 8192);
        assert!(c.encode_value(b"x", 5).is_err());
        assert_eq!(c.encode_value(b"x", 0).unwrap(), b"x");
    }

    #[test]
    fn keys_are_checked_per_api_version() {
        let v1 = RawConfig::new(1, false, 16);
        assert!(v1.check_key(b"", true).is_err());
        assert!(v1.check_key(b"", false).is_ok());
        assert!(v1.check_key(&[0u8; 17], false).is_err());
        assert!(v1.check_api_version(ApiVersion::V2 as i32).is_err());
        let v2 = RawConfig::new(2, false, 16);
        assert!(v2.ttl);
        assert!(v2.check_key(b"r\0\0\0k", true).is_ok());
        assert!(v2.check_key(b"r\0\0\0", true).is_err());
        assert!(v2.check_key(b"x\0\0\0k", false).is_err());
        assert!(v2.check_api_version(ApiVersion::V1 as i32).is_err());
        assert!(v2.check_api_version(ApiVersion::V2 as i32).is_ok());
    }
}
