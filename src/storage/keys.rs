//! How keys are laid out inside an engine.
//!
//! ```text
//!   0x01 0x02 <region_id: u64 BE> 0x03   apply state of a Region (in `default`)
//!   'z' <user key>                       user data (in `default`, `lock`, `write`)
//! ```
//!
//! Local keys sort before every data key, so a data scan never meets metadata. The same layout
//! serves both engine kinds: in a tablet only one Region's keys exist, in the shared `raft-kv`
//! DB all Regions' data keys interleave by user key (which is what makes a `raft-kv` split a
//! metadata-only change) while their apply states stay apart by Region id.

use super::RegionId;

pub const DATA_PREFIX: u8 = b'z';
/// The first key after every data key.
pub const DATA_END: &[u8] = &[DATA_PREFIX + 1];
const LOCAL_PREFIX: u8 = 0x01;
const REGION_META_PREFIX: u8 = 0x02;
const APPLY_STATE_SUFFIX: u8 = 0x03;

/// The engine key of a user key.
pub fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA_PREFIX);
    k.extend_from_slice(key);
    k
}

/// The engine key bounding a range end; an empty user end means the end of the data space.
pub fn data_end_key(end: &[u8]) -> Vec<u8> {
    if end.is_empty() {
        DATA_END.to_vec()
    } else {
        data_key(end)
    }
}

/// The user key of an engine data key.
pub fn origin_key(data_key: &[u8]) -> &[u8] {
    assert!(
        data_key.first() == Some(&DATA_PREFIX),
        "{data_key:?} is not a data key"
    );
    &data_key[1..]
}

pub fn apply_state_key(region_id: RegionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(11);
    k.push(LOCAL_PREFIX);
    k.push(REGION_META_PREFIX);
    k.extend_from_slice(&region_id.to_be_bytes());
    k.push(APPLY_STATE_SUFFIX);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_keys_sort_before_data() {
        assert!(apply_state_key(u64::MAX) < data_key(b""));
        assert!(data_key(b"\xff\xff") < DATA_END.to_vec());
        assert!(apply_state_key(1) < apply_state_key(2));
        assert_eq!(origin_key(&data_key(b"abc")), b"abc");
        assert_eq!(data_end_key(b""), DATA_END.to_vec());
    }
}
