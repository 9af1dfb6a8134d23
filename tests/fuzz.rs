//! Property-based fuzzing of everything that decodes bytes from the network or the disk: key
//! encodings, MVCC records, RawKV values and keys, inter-store Raft messages, snapshot names,
//! and config files. Each decoder must answer arbitrary input with a value or a typed error,
//! never a panic, and encoders must round-trip.
//!
//! `cargo fuzz` needs nightly; proptest runs on stable, so it runs in CI (a short run:
//! `PROPTEST_CASES` defaults to 20,000 per property here). The long run is a command:
//! `PROPTEST_CASES=1000000 cargo test --release --test fuzz`.

use proptest::prelude::*;

use prkv::server::raw::{decode_bytes, encode_bytes, RawConfig};
use prkv::txn::codec::{
    append_ts, decode_key, encode_key, split_ts, truncate_ts_for_split, Lock, LockType, Write,
    WriteType,
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

fn lock_type() -> impl Strategy<Value = LockType> {
    prop_oneof![
        Just(LockType::Put),
        Just(LockType::Delete),
        Just(LockType::Lock),
        Just(LockType::Pessimistic),
    ]
}

fn write_type() -> impl Strategy<Value = WriteType> {
    prop_oneof![
        Just(WriteType::Put),
        Just(WriteType::Delete),
        Just(WriteType::Lock),
        Just(WriteType::Rollback),
    ]
}

fn short_value() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=255))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Memcomparable keys: round trip, order kept, and arbitrary bytes never panic.
    #[test]
    fn memcomparable_round_trips_and_keeps_order(
        a in proptest::collection::vec(any::<u8>(), 0..64),
        b in proptest::collection::vec(any::<u8>(), 0..64),
        junk in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        prop_assert_eq!(decode_bytes(&encode_bytes(&a)).unwrap(), a.clone());
        prop_assert_eq!(a.cmp(&b), encode_bytes(&a).cmp(&encode_bytes(&b)));
        if let Ok(k) = decode_bytes(&junk) {
            // Whatever decodes is the one encoding of its key.
            prop_assert_eq!(encode_bytes(&k), junk.clone());
        }
        let _ = decode_key(&junk);
    }

    /// Versioned keys: the timestamp comes back, newer versions sort first, and splitting an
    /// arbitrary key never panics.
    #[test]
    fn versioned_keys(
        key in proptest::collection::vec(any::<u8>(), 0..40),
        ts in any::<u64>(),
        ts2 in any::<u64>(),
        junk in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let enc = encode_key(&key);
        let v = append_ts(&enc, ts);
        let (k, t) = split_ts(&v).unwrap();
        prop_assert_eq!(k, &enc[..]);
        prop_assert_eq!(t, ts);
        if ts > ts2 {
            prop_assert!(append_ts(&enc, ts) < append_ts(&enc, ts2));
        }
        prop_assert_eq!(truncate_ts_for_split(&v), Some(&enc[..]));
        let _ = split_ts(&junk);
        if let Some(k) = truncate_ts_for_split(&junk) {
            prop_assert!(decode_key(k).is_ok());
        }
    }

    /// Lock records (the lock column family) round-trip; arbitrary bytes decode or fail.
    #[test]
    fn lock_records(
        lock_type in lock_type(),
        primary in proptest::collection::vec(any::<u8>(), 0..64),
        start_ts in any::<u64>(),
        ttl in any::<u64>(),
        short_value in short_value(),
        for_update_ts in any::<u64>(),
        txn_size in any::<u64>(),
        min_commit_ts in any::<u64>(),
        junk in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let lock = Lock {
            lock_type,
            primary,
            start_ts,
            ttl,
            short_value,
            for_update_ts,
            txn_size,
            min_commit_ts,
        };
        prop_assert_eq!(Lock::decode(&lock.encode()).unwrap(), lock);
        let _ = Lock::decode(&junk);
    }

    /// Write records (the write column family) round-trip; arbitrary bytes decode or fail.
    #[test]
    fn write_records(
        write_type in write_type(),
        start_ts in any::<u64>(),
        short_value in short_value(),
        junk in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let w = Write { write_type, start_ts, short_value };
        prop_assert_eq!(Write::decode(&w.encode()).unwrap(), w);
        let _ = Write::decode(&junk);
    }

    /// RawKV: any key is accepted or refused with a message, any stored value decodes or
    /// fails, and a value with a TTL comes back.
    #[test]
    fn raw_keys_and_values(
        key in proptest::collection::vec(any::<u8>(), 0..40),
        value in proptest::collection::vec(any::<u8>(), 0..64),
        api_v2 in any::<bool>(),
        write in any::<bool>(),
        version in any::<i32>(),
    ) {
        let cfg = RawConfig::new(if api_v2 { 2 } else { 1 }, api_v2, 32);
        let _ = cfg.check_key(&key, write);
        let _ = cfg.check_api_version(version);
        let _ = cfg.decode_value(&value);
        let stored = cfg.encode_value(&value, 0).unwrap();
        let (v, expire) = cfg.decode_value(&stored).unwrap().unwrap();
        prop_assert_eq!(v, &value[..]);
        prop_assert_eq!(expire, 0);
    }

    /// Inter-store Raft messages: an arbitrary payload is a Raft message or an error.
    #[test]
    fn store_raft_messages(
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        region_id in any::<u64>(),
    ) {
        let m = prkv_proto::serverpb::StoreRaftMessage {
            region_id,
            message: payload,
            ..Default::default()
        };
        let _ = prkv::server::transport::decode(m);
    }

    /// Snapshot keys and file names from a peer name directories: nothing that could escape
    /// the snapshot directory is accepted.
    #[test]
    fn snapshot_names(name in ".{0,40}", key in "[0-9_./a]{0,30}") {
        if prkv::raftstore::snap::valid_file_name(&name) {
            prop_assert!(!name.contains('/') && name != ".." && name != ".");
        }
        if prkv::raftstore::snap::valid_key(&key) {
            prop_assert!(key.bytes().all(|b| b.is_ascii_digit() || b == b'_'));
        }
    }

    /// Config files: arbitrary text, and arbitrary values for real keys, give a config or an
    /// error; an error about a key names it.
    #[test]
    fn config_text(text in ".{0,200}") {
        let _ = prkv::config::Config::from_toml(&text);
    }

    #[test]
    fn config_values(
        key in prop_oneof![
            Just("rocksdb.write-buffer-limit"),
            Just("raftstore.raft-base-tick-interval"),
            Just("coprocessor.region-split-keys"),
            Just("storage.engine"),
            Just("storage.api-version"),
            Just("server.snap-io-max-bytes-per-sec"),
            Just("gc.poll-safe-point-interval"),
        ],
        value in prop_oneof![
            "\"[a-zA-Z0-9 .-]{0,12}\"",
            any::<i64>().prop_map(|v| v.to_string()),
            Just("true".to_string()),
            Just("[]".to_string()),
        ],
    ) {
        let (section, name) = key.split_once('.').unwrap();
        let text = format!("[{section}]\n{name} = {value}\n");
        if let Err(e) = prkv::config::Config::from_toml(&text) {
            let msg = e.to_string();
            prop_assert!(msg.contains(name), "error for {} = {} does not name it: {}", key, value, msg);
        }
    }
}
