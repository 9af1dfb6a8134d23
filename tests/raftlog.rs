//! The shared Raft log store: appends, states, truncation, compaction, purge, the
//! `raft::Storage` view, and durability across SIGKILL.

mod common;

use std::io::BufRead;
use std::time::Duration;

use prkv::config::{RaftEngineConfig, ReadableSize};
use prkv::raftlog::{LogWriteBatch, RaftLogStore, RegionLog};
use prkv_proto::metapb::{Peer, PeerRole, Region};
use prkv_proto::serverpb::{PeerState, RegionLocalState};
use raft::eraftpb::{Entry, HardState};
use raft::{GetEntriesContext, Storage, StorageError};
use rand::{Rng, SeedableRng};

fn config() -> RaftEngineConfig {
    RaftEngineConfig {
        dir: String::new(),
        target_file_size: ReadableSize::kib(64),
        purge_threshold: ReadableSize::kib(256),
    }
}

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

fn entries(low: u64, high: u64, term: u64) -> Vec<Entry> {
    (low..high)
        .map(|i| entry(i, term, format!("entry {i}").as_bytes()))
        .collect()
}

fn region(id: u64, peers: &[(u64, PeerRole)]) -> Region {
    Region {
        id,
        peers: peers
            .iter()
            .map(|(p, role)| Peer {
                id: *p,
                store_id: *p,
                role: *role as i32,
                is_witness: false,
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn append_states_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RaftLogStore::open(dir.path(), &config()).unwrap();
        let mut wb = LogWriteBatch::new();
        // Two Regions in one batch: one write, one fsync.
        wb.append(1, &entries(1, 11, 1)).unwrap();
        wb.append(2, &entries(1, 4, 3)).unwrap();
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 2,
            ..Default::default()
        };
        wb.put_hard_state(2, &hs).unwrap();
        let rs = RegionLocalState {
            state: PeerState::Normal as i32,
            region: Some(region(2, &[(1, PeerRole::Voter)])),
            tablet_index: 0,
            destroyed_peer_id: 0,
            conf_index: 0,
            merge_state: None,
        };
        wb.put_region_state(2, &rs).unwrap();
        store.write(&mut wb, true).unwrap();
        assert!(wb.is_empty());
        assert_eq!(store.regions(), vec![1, 2]);
        assert_eq!(
            (store.first_index(1), store.last_index(1)),
            (Some(1), Some(10))
        );
    }
    let store = RaftLogStore::open(dir.path(), &config()).unwrap();
    assert_eq!(store.last_index(1), Some(10));
    assert_eq!(store.entries(1, 3, 6, None).unwrap(), entries(3, 6, 1));
    assert_eq!(store.hard_state(2).unwrap().unwrap().vote, 2);
    assert_eq!(
        store.region_state(2).unwrap().unwrap().region.unwrap().id,
        2
    );
    assert_eq!(store.hard_state(1).unwrap(), None);
}

#[test]
fn conflicting_append_replaces_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftLogStore::open(dir.path(), &config()).unwrap();
    let mut wb = LogWriteBatch::new();
    wb.append(1, &entries(1, 11, 1)).unwrap();
    store.write(&mut wb, true).unwrap();
    // A new leader (term 2) overwrites from index 6.
    wb.append(1, &entries(6, 8, 2)).unwrap();
    store.write(&mut wb, true).unwrap();
    assert_eq!(store.last_index(1), Some(7));
    assert_eq!(store.entry(1, 6).unwrap().unwrap().term, 2);
    assert_eq!(store.entry(1, 5).unwrap().unwrap().term, 1);
    assert_eq!(store.entry(1, 8).unwrap(), None);
}

#[test]
fn compaction_truncated_state_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftLogStore::open(dir.path(), &config()).unwrap();
    // Incompressible payloads, so that the log really occupies many files.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut wb = LogWriteBatch::new();
    for chunk in 0..40u64 {
        let es: Vec<_> = (chunk * 10 + 1..chunk * 10 + 11)
            .map(|i| {
                let mut big = vec![0u8; 4096];
                rng.fill(&mut big[..]);
                entry(i, 1, &big)
            })
            .collect();
        wb.append(1, &es).unwrap();
        wb.append(2, &es).unwrap();
        store.write(&mut wb, false).unwrap();
    }
    let used_before = store.used_bytes();
    // Purge may name Regions whose old entries hold files back (or rewrite them itself).
    wb.compact_to(1, 390, 1).unwrap();
    store.write(&mut wb, true).unwrap();
    let holders = store.purge().unwrap();
    assert!(!holders.contains(&1), "Region 1 was compacted: {holders:?}");
    wb.compact_to(2, 395, 1).unwrap();
    store.write(&mut wb, true).unwrap();
    store.purge().unwrap();
    assert!(
        store.used_bytes() < used_before,
        "purge freed nothing: {} -> {}",
        used_before,
        store.used_bytes()
    );
    assert_eq!(store.first_index(1), Some(391));
    assert_eq!(store.truncated_state(2).unwrap().unwrap().index, 395);
    // Clean removes a Region entirely.
    wb.clean(1);
    store.write(&mut wb, true).unwrap();
    assert_eq!(store.first_index(1), None);
    assert_eq!(store.regions(), vec![2]);
}

#[test]
fn region_log_implements_raft_storage() {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftLogStore::open(dir.path(), &config()).unwrap();
    let r = region(
        1,
        &[
            (1, PeerRole::Voter),
            (2, PeerRole::Voter),
            (3, PeerRole::Learner),
        ],
    );
    let mut wb = LogWriteBatch::new();
    wb.append(1, &entries(1, 21, 2)).unwrap();
    let hs = HardState {
        term: 2,
        commit: 15,
        ..Default::default()
    };
    wb.put_hard_state(1, &hs).unwrap();
    wb.compact_to(1, 5, 2).unwrap();
    store.write(&mut wb, true).unwrap();

    let log = RegionLog::load(store.clone(), 1, &r).unwrap();
    let init = log.initial_state().unwrap();
    assert_eq!(init.hard_state.commit, 15);
    assert_eq!(init.conf_state.voters, vec![1, 2]);
    assert_eq!(init.conf_state.learners, vec![3]);
    assert_eq!(log.first_index().unwrap(), 6);
    assert_eq!(log.last_index().unwrap(), 20);
    assert_eq!(
        log.term(5).unwrap(),
        2,
        "term of the truncated index is kept"
    );
    assert_eq!(log.term(20).unwrap(), 2);
    assert!(matches!(
        log.term(4),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        log.term(21),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    let ctx = || GetEntriesContext::empty(false);
    assert_eq!(log.entries(6, 10, None, ctx()).unwrap(), entries(6, 10, 2));
    assert!(matches!(
        log.entries(5, 10, None, ctx()),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        log.entries(6, 22, None, ctx()),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    // A size limit still returns at least one entry.
    assert_eq!(log.entries(6, 10, Some(1), ctx()).unwrap().len(), 1);
    // Joint consensus roles.
    let joint = region(
        1,
        &[
            (1, PeerRole::Voter),
            (2, PeerRole::IncomingVoter),
            (3, PeerRole::DemotingVoter),
        ],
    );
    let cs = prkv::raftlog::conf_state_from_region(&joint);
    assert_eq!(cs.voters, vec![1, 2]);
    assert_eq!(cs.voters_outgoing, vec![1, 3]);
    assert_eq!(cs.learners_next, vec![3]);
}

/// Child: appends synced batches to 8 Regions and reports each synced index until killed.
#[test]
#[ignore = "child process of synced_log_survives_sigkill"]
fn raftlog_child() {
    let dir = std::path::PathBuf::from(std::env::var("PRKV_RAFTLOG_DIR").unwrap());
    let store = RaftLogStore::open(&dir, &config()).unwrap();
    let start = store.last_index(1).unwrap_or(0) + 1;
    println!("ready");
    let mut wb = LogWriteBatch::new();
    for i in start.. {
        for r in 1..=8 {
            wb.append(r, &[entry(i, 1, format!("{r}/{i}").repeat(20).as_bytes())])
                .unwrap();
        }
        store.write(&mut wb, true).unwrap();
        println!("synced {i}");
        if i.is_multiple_of(100) {
            wb.compact_to(1, i - 50, 1).unwrap();
            store.write(&mut wb, true).unwrap();
            store.purge().unwrap();
        }
    }
}

#[test]
fn synced_log_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..8 {
        let mut child = common::spawn_child(
            "raftlog_child",
            &[("PRKV_RAFTLOG_DIR", dir.path().display().to_string())],
            None,
        );
        let mut out = common::child_stdout(&mut child);
        common::wait_for_line(&mut out, "ready");
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in out.lines().map_while(Result::ok) {
                if let Some(at) = line.find("synced ") {
                    last = line[at + 7..].trim().parse().unwrap();
                }
            }
            last
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..300)));
        child.kill().unwrap();
        child.wait().unwrap();
        let acknowledged = reader.join().unwrap();
        let store = RaftLogStore::open(dir.path(), &config()).unwrap();
        for r in 1..=8 {
            let last = store.last_index(r).unwrap_or(0);
            assert!(
                last >= acknowledged,
                "round {round}: Region {r} lost synced entries: last {last} < {acknowledged}"
            );
            let first = store.first_index(r).unwrap();
            let all = store.entries(r, first, last + 1, None).unwrap();
            for (e, i) in all.iter().zip(first..) {
                assert_eq!(e.index, i);
                assert_eq!(
                    e.data.as_ref(),
                    format!("{r}/{i}").repeat(20).as_bytes(),
                    "round {round}: entry {i} of Region {r} damaged"
                );
            }
        }
    }
}
