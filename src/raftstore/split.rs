//! Region split: where to cut (the split checker) and what a cut produces.
//!
//! ```text
//!   leader tick ── enough written since the last check? ──▶ region worker: scan a snapshot,
//!        ▲                                                   pick keys every
//!        │                                                   `region-split-keys` keys (or
//!   ProposeSplit ◀── PD AskBatchSplit (ids) ◀── SplitRegion   `region-split-size` bytes)
//!        │
//!        ▼ committed and applied on every replica (peer.rs, `apply_split`)
//!   parent keeps [start, k1); child i takes [k_i, k_i+1); version += number of children
//! ```
//!
//! The same `SplitRegion` message serves the split checker, PD's split operator and the
//! `tikvpb.Tikv/SplitRegion` RPC. Everything here is deterministic: every replica computes the
//! same Regions from the same Region and the same [`BatchSplit`].
//!
//! New Regions start their Raft log at [`RAFT_INIT_LOG_INDEX`] with term
//! [`RAFT_INIT_LOG_TERM`], as TiKV's do: the child's engine holds the parent's data as of the
//! split, which the child treats as applied through that index, so no entry before it exists or
//! is ever needed.

use prkv_proto::metapb::{Peer, PeerRole, Region};
use prkv_proto::serverpb::{BatchSplit, SplitPiece};

use super::error::{Error, Result};
use super::msg::SplitIds;
use crate::storage::engine::{Cf, ScanDir, Snapshot};

/// The log index (and term) a split-born Region starts at.
pub const RAFT_INIT_LOG_INDEX: u64 = 5;
pub const RAFT_INIT_LOG_TERM: u64 = 5;

/// One split cuts a Region into at most this many + 1 pieces. It bounds the size of the split
/// entry (keys up to `storage.max-key-size` each) and the work one apply does; a Region that
/// needs more pieces is cut again at the next check.
pub const MAX_SPLIT_KEYS: usize = 256;

/// Checks that `keys` can cut `region`: non-empty, strictly increasing, inside the Region and
/// none equal to its start key; and that the Region is not in the middle of a membership change
/// (its new Regions would inherit a joint configuration).
pub fn check_split_keys(region: &Region, keys: &[Vec<u8>]) -> Result<()> {
    if keys.is_empty() {
        return Err(Error::InvalidSplit("no split keys".into()));
    }
    if keys.len() > MAX_SPLIT_KEYS {
        return Err(Error::InvalidSplit(format!(
            "{} split keys, at most {MAX_SPLIT_KEYS} at once",
            keys.len()
        )));
    }
    for (i, k) in keys.iter().enumerate() {
        if k.is_empty() {
            return Err(Error::InvalidSplit("empty split key".into()));
        }
        if i > 0 && keys[i - 1] >= *k {
            return Err(Error::InvalidSplit(
                "split keys are not strictly increasing".into(),
            ));
        }
        let inside = k.as_slice() > region.start_key.as_slice()
            && (region.end_key.is_empty() || k.as_slice() < region.end_key.as_slice());
        if !inside {
            return Err(Error::KeyNotInRegion {
                key: k.clone(),
                region: Box::new(region.clone()),
            });
        }
    }
    if region
        .peers
        .iter()
        .any(|p| p.role != PeerRole::Voter as i32 && p.role != PeerRole::Learner as i32)
    {
        return Err(Error::ServerIsBusy {
            reason: format!("Region {} is changing membership; split later", region.id),
        });
    }
    Ok(())
}

/// The split command for `keys` with the ids PD allocated.
pub fn batch_split(region: &Region, keys: &[Vec<u8>], ids: &[SplitIds]) -> Result<BatchSplit> {
    if ids.len() != keys.len()
        || ids
            .iter()
            .any(|i| i.new_peer_ids.len() != region.peers.len())
    {
        return Err(Error::Pd(format!(
            "PD returned {} id sets for {} split keys of a Region with {} peers",
            ids.len(),
            keys.len(),
            region.peers.len()
        )));
    }
    Ok(BatchSplit {
        splits: keys
            .iter()
            .zip(ids)
            .map(|(k, i)| SplitPiece {
                split_key: k.clone(),
                new_region_id: i.new_region_id,
                new_peer_ids: i.new_peer_ids.clone(),
            })
            .collect(),
    })
}

/// The Regions a split of `region` produces, in key order: the shrunk original first. All get
/// the version `region.version + number of new Regions`; membership is unchanged.
pub fn split_regions(region: &Region, split: &BatchSplit) -> Result<Vec<Region>> {
    let keys: Vec<Vec<u8>> = split.splits.iter().map(|s| s.split_key.clone()).collect();
    check_split_keys(region, &keys)?;
    let mut epoch = region.region_epoch.unwrap_or_default();
    epoch.version += split.splits.len() as u64;
    let mut out = Vec::with_capacity(keys.len() + 1);
    let mut parent = region.clone();
    parent.end_key = keys[0].clone();
    parent.region_epoch = Some(epoch);
    out.push(parent);
    for (i, piece) in split.splits.iter().enumerate() {
        if piece.new_peer_ids.len() != region.peers.len() || piece.new_region_id == 0 {
            return Err(Error::InvalidSplit(format!(
                "piece {i} has {} peer ids for {} peers",
                piece.new_peer_ids.len(),
                region.peers.len()
            )));
        }
        let end = keys
            .get(i + 1)
            .cloned()
            .unwrap_or_else(|| region.end_key.clone());
        out.push(Region {
            id: piece.new_region_id,
            start_key: piece.split_key.clone(),
            end_key: end,
            region_epoch: Some(epoch),
            peers: region
                .peers
                .iter()
                .zip(&piece.new_peer_ids)
                .map(|(p, id)| Peer {
                    id: *id,
                    store_id: p.store_id,
                    role: p.role,
                    is_witness: false,
                })
                .collect(),
        });
    }
    Ok(out)
}

/// The split checker's thresholds, from `[coprocessor]`.
#[derive(Clone, Copy, Debug)]
pub struct SplitCheckConfig {
    pub split_size: u64,
    pub max_size: u64,
    pub split_keys: u64,
    pub max_keys: u64,
    /// At most this many keys per check (`coprocessor.batch-split-limit`, at most
    /// [`MAX_SPLIT_KEYS`]).
    pub batch_limit: usize,
}

/// Scans a Region's snapshot and returns where to cut it, or nothing if it is within
/// `max_keys` and `max_size`. A Region over `max_keys` is cut every `split_keys` keys, else
/// one over `max_size` every `split_size` bytes (keys plus values). Each column family with data
/// is counted on its own and the busiest decides (raw KV lives in `default`, transactional
/// commit records in `write`).
pub fn find_split_keys(snap: &dyn Snapshot, cfg: &SplitCheckConfig) -> Result<Vec<Vec<u8>>> {
    let mut best: Option<(u64, Vec<Vec<u8>>)> = None;
    for cf in [Cf::Default, Cf::Write] {
        let mut n = 0u64;
        let mut total = 0u64;
        let mut since_cut = 0u64;
        let mut by_keys = Vec::new();
        let mut by_size = Vec::new();
        let mut first: Option<Vec<u8>> = None;
        snap.scan(cf, &[], &[], ScanDir::Forward, &mut |k, v| {
            let at = split_point(cf, k);
            let first = first.get_or_insert_with(|| at.to_vec());
            // A cut must fall between two keys, never between two versions of one key.
            let new_cut = |cuts: &Vec<Vec<u8>>| {
                at != first.as_slice() && cuts.last().is_none_or(|l: &Vec<u8>| l.as_slice() < at)
            };
            if n > 0
                && n.is_multiple_of(cfg.split_keys.max(1))
                && by_keys.len() < cfg.batch_limit.min(MAX_SPLIT_KEYS)
                && new_cut(&by_keys)
            {
                by_keys.push(at.to_vec());
            }
            if n > 0
                && since_cut >= cfg.split_size
                && by_size.len() < cfg.batch_limit.min(MAX_SPLIT_KEYS)
                && new_cut(&by_size)
            {
                by_size.push(at.to_vec());
                since_cut = 0;
            }
            let sz = (k.len() + v.len()) as u64;
            n += 1;
            total += sz;
            since_cut += sz;
            true
        })
        .map_err(|e| Error::Storage(e.to_string()))?;
        let keys = if n > cfg.max_keys {
            by_keys
        } else if total > cfg.max_size {
            by_size
        } else {
            Vec::new()
        };
        if best.as_ref().is_none_or(|(bn, _)| n > *bn) {
            best = Some((n, keys));
        }
    }
    Ok(best.map(|(_, k)| k).unwrap_or_default())
}

/// Where a Region may be cut at key `k` of `cf`: transactional keys carry their version
/// (`enc(key)` + timestamp) in `write` and `default`, and every version of a key must stay in
/// one Region, so the cut is at `enc(key)`.
fn split_point(cf: Cf, k: &[u8]) -> &[u8] {
    match cf {
        Cf::Write | Cf::Default => crate::txn::codec::truncate_ts_for_split(k).unwrap_or(k),
        Cf::Lock => k,
    }
}

/// The key in the middle of a Region (by key count, in the column family holding the most
/// keys): where PD's "split this Region in half" cuts. `None` if the Region has fewer than two
/// keys.
pub fn find_middle_key(snap: &dyn Snapshot) -> Result<Option<Vec<u8>>> {
    let count = |cf| -> Result<u64> {
        let mut n = 0u64;
        snap.scan(cf, &[], &[], ScanDir::Forward, &mut |_, _| {
            n += 1;
            true
        })
        .map_err(|e| Error::Storage(e.to_string()))?;
        Ok(n)
    };
    let (d, w) = (count(Cf::Default)?, count(Cf::Write)?);
    let (cf, n) = if w > d {
        (Cf::Write, w)
    } else {
        (Cf::Default, d)
    };
    if n < 2 {
        return Ok(None);
    }
    let mut i = 0u64;
    let mut mid = None;
    let mut first: Option<Vec<u8>> = None;
    snap.scan(cf, &[], &[], ScanDir::Forward, &mut |k, _| {
        let at = split_point(cf, k);
        let first = first.get_or_insert_with(|| at.to_vec());
        if i >= n / 2 && at != first.as_slice() {
            mid = Some(at.to_vec());
            return false;
        }
        i += 1;
        true
    })
    .map_err(|e| Error::Storage(e.to_string()))?;
    Ok(mid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prkv_proto::metapb::RegionEpoch;

    fn region(start: &[u8], end: &[u8]) -> Region {
        Region {
            id: 1,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            region_epoch: Some(RegionEpoch {
                conf_ver: 3,
                version: 7,
            }),
            peers: (1..=3)
                .map(|s| Peer {
                    id: 10 + s,
                    store_id: s,
                    role: PeerRole::Voter as i32,
                    is_witness: false,
                })
                .collect(),
        }
    }

    fn ids(n: u64) -> Vec<SplitIds> {
        (0..n)
            .map(|i| SplitIds {
                new_region_id: 100 + i,
                new_peer_ids: vec![200 + i * 3, 201 + i * 3, 202 + i * 3],
            })
            .collect()
    }

    #[test]
    fn split_keys_must_cut_inside_in_order() {
        let r = region(b"b", b"m");
        assert!(check_split_keys(&r, &[b"c".to_vec(), b"d".to_vec()]).is_ok());
        for bad in [
            vec![],
            vec![b"b".to_vec()],
            vec![b"m".to_vec()],
            vec![b"a".to_vec()],
            vec![b"d".to_vec(), b"c".to_vec()],
            vec![b"c".to_vec(), b"c".to_vec()],
            vec![vec![]],
        ] {
            assert!(check_split_keys(&r, &bad).is_err(), "{bad:?} accepted");
        }
        // An unbounded Region takes any key above its start.
        assert!(check_split_keys(&region(b"", b""), &[b"\xff".to_vec()]).is_ok());
        let mut joint = r.clone();
        joint.peers[0].role = PeerRole::IncomingVoter as i32;
        assert!(check_split_keys(&joint, &[b"c".to_vec()]).is_err());
    }

    #[test]
    fn split_produces_adjacent_regions_with_bumped_version() {
        let r = region(b"b", b"m");
        let keys = vec![b"d".to_vec(), b"h".to_vec()];
        let split = batch_split(&r, &keys, &ids(2)).unwrap();
        let out = split_regions(&r, &split).unwrap();
        assert_eq!(out.len(), 3);
        let ranges: Vec<(&[u8], &[u8])> = out
            .iter()
            .map(|x| (x.start_key.as_slice(), x.end_key.as_slice()))
            .collect();
        assert_eq!(
            ranges,
            vec![
                (&b"b"[..], &b"d"[..]),
                (&b"d"[..], &b"h"[..]),
                (&b"h"[..], &b"m"[..])
            ]
        );
        assert_eq!(out[0].id, 1);
        assert_eq!(out[1].id, 100);
        assert_eq!(out[2].peers[1].id, 204);
        assert_eq!(out[2].peers[1].store_id, 2);
        for x in &out {
            assert_eq!(x.region_epoch.unwrap().version, 9);
            assert_eq!(x.region_epoch.unwrap().conf_ver, 3);
        }
        // PD's answer must match the request.
        assert!(batch_split(&r, &keys, &ids(1)).is_err());
    }

    struct VecSnap(Vec<(Vec<u8>, Vec<u8>)>);

    impl Snapshot for VecSnap {
        fn get(&self, _: Cf, _: &[u8]) -> crate::storage::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn scan(
            &self,
            cf: Cf,
            _: &[u8],
            _: &[u8],
            _: ScanDir,
            f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        ) -> crate::storage::Result<()> {
            if cf == Cf::Default {
                for (k, v) in &self.0 {
                    if !f(k, v) {
                        break;
                    }
                }
            }
            Ok(())
        }
        fn export_ssts(&self, _: &std::path::Path) -> crate::storage::Result<()> {
            unimplemented!("not used by the split checker")
        }
    }

    #[test]
    fn checker_cuts_every_split_keys_once_over_max() {
        let cfg = SplitCheckConfig {
            split_size: 1 << 30,
            max_size: 1 << 31,
            split_keys: 7,
            max_keys: 10,
            batch_limit: 10,
        };
        let snap = |n: usize| {
            VecSnap(
                (0..n)
                    .map(|i| (format!("k{i:03}").into_bytes(), vec![0; 10]))
                    .collect(),
            )
        };
        assert!(find_split_keys(&snap(10), &cfg).unwrap().is_empty());
        assert_eq!(
            find_split_keys(&snap(11), &cfg).unwrap(),
            vec![b"k007".to_vec()]
        );
        assert_eq!(
            find_split_keys(&snap(30), &cfg).unwrap(),
            vec![
                b"k007".to_vec(),
                b"k014".to_vec(),
                b"k021".to_vec(),
                b"k028".to_vec()
            ]
        );
        // A Region far past its limits is cut at most `batch_limit` times per check.
        let limited = SplitCheckConfig {
            batch_limit: 3,
            ..cfg
        };
        assert_eq!(
            find_split_keys(&snap(100), &limited).unwrap(),
            vec![b"k007".to_vec(), b"k014".to_vec(), b"k021".to_vec()]
        );
        // By size: 20 keys of 14 bytes = 280 bytes over a max of 200, cut every 100 bytes.
        let cfg = SplitCheckConfig {
            split_size: 100,
            max_size: 200,
            split_keys: 1000,
            max_keys: 2000,
            batch_limit: 10,
        };
        assert_eq!(
            find_split_keys(&snap(20), &cfg).unwrap(),
            vec![b"k008".to_vec(), b"k016".to_vec()]
        );
        assert_eq!(find_middle_key(&snap(20)).unwrap(), Some(b"k010".to_vec()));
        assert_eq!(find_middle_key(&snap(1)).unwrap(), None);
    }
}
