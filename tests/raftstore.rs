//! Raftstore behaviour on the in-process cluster, each scenario for both engine kinds.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{peer, region_key, Cluster};
use prkv::config::EngineKind;
use prkv::raftstore::Error;
use prkv_proto::metapb::PeerRole;
use prkv_proto::serverpb::{mutation, Mutation};
use raft::eraftpb::MessageType;

fn key(i: usize) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

/// Isolate the leader: a new leader is elected and writes continue; heal: the old leader
/// catches up; every acknowledged write is on every replica.
fn failover(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    let mut acked = Vec::new();
    for i in 0..20 {
        c.must_put(&key(i), b"v1");
        acked.push(key(i));
    }
    let old = c.must_leader(1);
    c.isolate(old);
    for i in 20..40 {
        c.must_put(&key(i), b"v1");
        acked.push(key(i));
    }
    let new = c.must_leader(1);
    assert_ne!(
        new, old,
        "the isolated store cannot stay the leader others follow"
    );
    c.heal();
    for s in 1..=3 {
        for k in &acked {
            c.must_replicate(s, k, b"v1");
        }
    }
}

/// A read from a replica that may have lost its leadership: the new value `b"new"`, or a
/// refusal (not leader, no quorum to confirm), never anything older.
fn assert_new_or_refused(read: Result<Option<Vec<u8>>, Error>, stale: &str) {
    match read {
        Ok(v) => assert_eq!(v.as_deref(), Some(&b"new"[..]), "{stale}"),
        Err(e) => assert!(
            matches!(
                e,
                Error::NotLeader { .. } | Error::ReadIndexTimeout { .. } | Error::Timeout(_)
            ),
            "unexpected error {e:?}"
        ),
    }
}

/// A read sent to an isolated old leader after the new leader committed a write returns the
/// new value or an error, never the old value.
fn no_stale_read_from_old_leader(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"old");
    let old = c.must_leader(1);
    // A fresh read on the old leader gives it a lease: the worst case for staleness.
    assert_eq!(c.get_on(old, b"k").unwrap().as_deref(), Some(&b"old"[..]));
    c.isolate(old);
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        let others: Vec<_> = [1, 2, 3].into_iter().filter(|s| *s != old).collect();
        if let Some(s) = others
            .into_iter()
            .find(|s| c.status(*s, 1).is_some_and(|st| st.leader_id == st.peer.id))
        {
            break s;
        }
        assert!(Instant::now() < deadline, "no new leader");
        std::thread::sleep(Duration::from_millis(10));
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.put_on(new, b"k", b"new").is_err() {
        assert!(Instant::now() < deadline, "new leader cannot write");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..5 {
        assert_new_or_refused(c.get_on(old, b"k"), "stale read from the old leader");
    }
    c.heal();
    assert_eq!(c.must_get(b"k").as_deref(), Some(&b"new"[..]));
}

/// A leader that hands its leadership over stops serving reads from its lease at once: the new
/// leader is elected without waiting out anyone's lease (a transfer campaign is not refused by
/// followers that heard from the old leader), so it can commit a write while the old lease
/// still runs. Messages to the old leader are dropped, so it never hears of the new term.
fn no_stale_read_after_leader_transfer(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    // A long lease (and election timeout) so that the whole scenario runs inside the lease.
    c.cfg.raftstore.raft_election_timeout_ticks = 250;
    c.cfg.raftstore.raft_store_max_leader_lease = prkv::config::ReadableDuration::secs(4);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"old");
    let old = c.must_leader(1);
    let new = [1, 2, 3].into_iter().find(|s| *s != old).expect("3 stores");
    c.must_replicate(new, b"k", b"old");
    assert_eq!(c.get_on(old, b"k").unwrap().as_deref(), Some(&b"old"[..]));
    assert!(
        c.stores[&old].router.local_read(1, &c.epoch(1)).is_some(),
        "the leader holding a lease serves reads locally"
    );
    c.net.add_filter(
        "to-old-leader",
        std::sync::Arc::new(move |m| {
            if m.to_store == old {
                prkv::raftstore::Verdict::Drop
            } else {
                prkv::raftstore::Verdict::Deliver
            }
        }),
    );
    // The moment the old leader sends MsgTimeoutNow (filters run on the sender's store thread,
    // as it sends), its local readers must already be refused.
    let probed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (router, epoch, seen) = (c.stores[&old].router.clone(), c.epoch(1), probed.clone());
    c.net.add_filter(
        "probe-timeout-now",
        std::sync::Arc::new(move |m| {
            if m.from_store == old && m.message.msg_type == MessageType::MsgTimeoutNow {
                let served = router.local_read(1, &epoch).is_some();
                seen.lock().unwrap().push(served);
            }
            prkv::raftstore::Verdict::Deliver
        }),
    );
    let to = c.status(new, 1).expect("replica on the target").peer;
    c.stores[&old]
        .router
        .try_send(prkv::raftstore::StoreMsg::TransferLeader { region_id: 1, to })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while c.put_on(new, b"k", b"new").is_err() {
        assert!(
            Instant::now() < deadline,
            "the new leader never took a write"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Both ways a read reaches a leader: a local read (falling back to the loop), and the
    // loop alone.
    for local in [true, false] {
        let read = if local {
            c.get_on(old, b"k")
        } else {
            c.get_on_loop(old, b"k")
        };
        assert_new_or_refused(
            read,
            &format!("stale read (local: {local}) from the leader that transferred its leadership"),
        );
    }
    let probed = probed.lock().unwrap().clone();
    assert!(!probed.is_empty(), "no MsgTimeoutNow was sent");
    assert!(
        probed.iter().all(|served| !served),
        "a local read was served while MsgTimeoutNow left the old leader"
    );
    c.heal();
    assert_eq!(c.must_get(b"k").as_deref(), Some(&b"new"[..]));
}

/// A lagging follower applies a new leader's no-op and a membership change in one batch. The
/// apply state it records before the change (at the no-op's index) must carry the no-op's
/// term, not the term of the entry it had applied before the batch: a snapshot made from that
/// state would name the wrong term, and a follower installing it would refuse every append
/// after it. Before the fix it carried the older term.
fn apply_state_before_an_admin_entry_has_its_own_term(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"v");
    c.must_transfer_leader(1, 1);
    c.must_replicate(3, b"k", b"v");
    let old_term = c.status(3, 1).expect("replica on 3").term;
    c.isolate(3);
    c.must_transfer_leader(1, 2);
    // A membership change right behind the new leader's no-op (a learner on a store that
    // does not exist: it only has to commit).
    c.add_learner(1, peer(104, 4, PeerRole::Learner));
    c.heal();
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = c.status(3, 1).expect("replica on 3");
        if st.region.peers.iter().any(|p| p.id == 104) {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "store 3 never applied the change"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.term > old_term, "a new term began");
    let state = c.kv[&3]
        .region(1)
        .expect("engine on 3")
        .apply_state()
        .unwrap()
        .expect("an apply state");
    assert_eq!(
        state.applied_term, st.term,
        "the apply state at {} names term {}, but that entry is the new leader's",
        state.applied_index, state.applied_term
    );
}

/// A follower restarts and at once grants its vote to a candidate that had been timing out all
/// along (cut off from the leader, its pre-votes refused while the follower heard from the
/// leader). Elected with it, the candidate takes a write while the old leader's lease still
/// runs: the old leader must not serve the old value. Before a restarted store refused votes
/// for an election timeout, it did (tikv#15035).
fn no_stale_read_after_a_follower_restarts_and_votes(kind: EngineKind) {
    use prkv::raftstore::{Transport, Verdict};
    use std::sync::{Arc, Mutex};
    let mut c = Cluster::new(3, kind);
    // A 1 s election timeout and a 900 ms lease: the whole scenario fits in the lease.
    c.cfg.raftstore.raft_election_timeout_ticks = 50;
    c.cfg.raftstore.raft_store_max_leader_lease = prkv::config::ReadableDuration::millis(900);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"old");
    let leader = c.must_leader(1);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|s| *s != leader).collect();
    let (voter, candidate) = (others[0], others[1]);
    c.must_replicate(candidate, b"k", b"old");
    // The candidate loses the leader and pre-campaigns; its pre-votes are kept, not delivered.
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    c.net.add_filter(
        "hold-pre-votes",
        Arc::new(move |m| {
            if m.from_store == candidate
                && m.to_store == voter
                && m.message.msg_type == MessageType::MsgRequestPreVote
            {
                keep.lock().unwrap().push(m.clone());
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }),
    );
    c.partition(&[leader], &[candidate]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the candidate never pre-campaigned"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The leader confirms its leadership with the voter: a fresh lease.
    assert_eq!(
        c.get_on_loop(leader, b"k").unwrap().as_deref(),
        Some(&b"old"[..])
    );
    assert!(
        c.stores[&leader]
            .router
            .local_read(1, &c.epoch(1))
            .is_some(),
        "the leader holds a lease"
    );
    // The voter loses the leader too, restarts, and hears the candidate's pre-vote first.
    c.partition(&[leader], &[voter]);
    c.restart_store(voter);
    c.net.remove_filter("hold-pre-votes");
    let late = held.lock().unwrap().last().cloned().expect("held");
    c.net.send(late);
    // The candidate wins (with the voter) and takes a write; or, once the voter grants votes
    // again, whichever of the two campaigns first.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.put_on(candidate, b"k", b"new").is_err() && c.put_on(voter, b"k", b"new").is_err() {
        assert!(Instant::now() < deadline, "no new leader took a write");
        std::thread::sleep(Duration::from_millis(5));
    }
    for local in [true, false] {
        let read = if local {
            c.get_on(leader, b"k")
        } else {
            c.get_on_loop(leader, b"k")
        };
        assert_new_or_refused(
            read,
            &format!(
                "stale read (local: {local}) from the old leader after a restarted follower voted"
            ),
        );
    }
    c.heal();
    assert_eq!(c.must_get(b"k").as_deref(), Some(&b"new"[..]));
}

/// A transfer is aborted after its `MsgTimeoutNow` left (transfer to self), the old leader
/// renews its lease in the same term, and only then does the delayed `MsgTimeoutNow` reach the
/// target: it campaigns at once, is elected (a transfer's votes ignore leases) and takes a
/// write. The old leader must not serve the old value meanwhile, locally or from its loop.
/// Before leases were refused for the rest of a term that saw a transfer, it did.
fn no_stale_read_after_an_aborted_transfer(kind: EngineKind) {
    use prkv::raftstore::{StoreMsg, Transport, Verdict};
    use std::sync::{Arc, Mutex};
    let mut c = Cluster::new(3, kind);
    // A long lease (and election timeout) so that the whole scenario runs inside the lease.
    c.cfg.raftstore.raft_election_timeout_ticks = 250;
    c.cfg.raftstore.raft_store_max_leader_lease = prkv::config::ReadableDuration::secs(4);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"old");
    let old = c.must_leader(1);
    let target = [1, 2, 3].into_iter().find(|s| *s != old).expect("3 stores");
    c.must_replicate(target, b"k", b"old");
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    c.net.add_filter(
        "hold-timeout-now",
        Arc::new(move |m| {
            if m.from_store == old && m.message.msg_type == MessageType::MsgTimeoutNow {
                keep.lock().unwrap().push(m.clone());
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }),
    );
    let to = c.status(target, 1).expect("replica on the target").peer;
    c.stores[&old]
        .router
        .try_send(StoreMsg::TransferLeader { region_id: 1, to })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while held.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no MsgTimeoutNow was sent");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Abort: a transfer to the leader itself.
    let me = c.status(old, 1).expect("the old leader").peer;
    c.stores[&old]
        .router
        .try_send(StoreMsg::TransferLeader {
            region_id: 1,
            to: me,
        })
        .unwrap();
    // The old leader confirms its leadership again (a ReadIndex round through its loop),
    // which before the fix renewed its lease in the same term.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match c.get_on_loop(old, b"k") {
            Ok(v) if c.status(old, 1).is_some_and(|s| s.leader_id == s.peer.id) => {
                assert_eq!(v.as_deref(), Some(&b"old"[..]));
                break;
            }
            _ => assert!(Instant::now() < deadline, "the old leader stopped leading"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old leader hears nothing more; the held MsgTimeoutNow arrives, late.
    c.net.remove_filter("hold-timeout-now");
    c.net.add_filter(
        "to-old-leader",
        Arc::new(move |m| {
            if m.to_store == old {
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }),
    );
    let late = held.lock().unwrap()[0].clone();
    c.net.send(late);
    let deadline = Instant::now() + Duration::from_secs(3);
    while c.put_on(target, b"k", b"new").is_err() {
        assert!(
            Instant::now() < deadline,
            "the target never took a write after the late MsgTimeoutNow"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for local in [true, false] {
        let read = if local {
            c.get_on(old, b"k")
        } else {
            c.get_on_loop(old, b"k")
        };
        assert_new_or_refused(
            read,
            &format!("stale read (local: {local}) from a leader whose aborted transfer's MsgTimeoutNow arrived late"),
        );
    }
    c.heal();
    assert_eq!(c.must_get(b"k").as_deref(), Some(&b"new"[..]));
}

/// While a leader hands its leadership over, raft-rs drops every proposal. A write then gets
/// `NotLeader` naming no leader, which clients back off on and ask PD about, not `NotLeader`
/// naming the same leader, which they retry at once and give up on before a slow transfer ends.
fn writes_during_a_transfer_name_no_leader(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    // The transfer stays pending until an election timeout passes: long enough to look.
    c.cfg.raftstore.raft_election_timeout_ticks = 250;
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"v");
    let old = c.must_leader(1);
    let target = [1, 2, 3].into_iter().find(|s| *s != old).expect("3 stores");
    c.must_replicate(target, b"k", b"v");
    // The target never hears MsgTimeoutNow, so it never campaigns.
    c.net.add_filter(
        "to-target",
        std::sync::Arc::new(move |m| {
            if m.to_store == target {
                prkv::raftstore::Verdict::Drop
            } else {
                prkv::raftstore::Verdict::Deliver
            }
        }),
    );
    let to = c.status(target, 1).expect("replica on the target").peer;
    c.stores[&old]
        .router
        .try_send(prkv::raftstore::StoreMsg::TransferLeader { region_id: 1, to })
        .unwrap();
    // The old leader and the third store still commit writes until the transfer starts.
    let deadline = Instant::now() + Duration::from_secs(3);
    let refused = loop {
        match c.put_on(old, b"k", b"during") {
            Ok(()) => assert!(Instant::now() < deadline, "the transfer never started"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(refused, Error::NotLeader { leader: None, .. }),
        "a write during a transfer got {refused:?}"
    );
    c.heal();
    c.must_put(b"k", b"after");
}

/// Plain writes that reach a leader in one round of its store loop become one Raft entry, yet
/// each is answered on its own, and a bad one (a stale epoch here) fails alone.
fn plain_writes_of_a_round_share_an_entry(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"v");
    let leader = c.must_leader(1);
    let before = c.status(leader, 1).expect("leader's replica").applied_index;
    let router = c.stores[&leader].router.clone();
    // Hold the store loop inside a read's callback while the writes queue up behind it.
    let (open_gate, gate) = std::sync::mpsc::channel::<()>();
    router
        .try_send(prkv::raftstore::StoreMsg::Read {
            region_id: 1,
            epoch: c.epoch(1),
            cb: Box::new(move |_| {
                let _ = gate.recv_timeout(Duration::from_secs(10));
            }),
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let put = |i: u32| Mutation {
        op: mutation::Op::Put as i32,
        cf: "default".into(),
        key: format!("round-{i:03}").into_bytes(),
        value: i.to_be_bytes().to_vec(),
    };
    let mut answers: Vec<_> = (0..199)
        .map(|i| c.async_write(leader, 1, vec![put(i)]).unwrap())
        .collect();
    let mut stale = c.epoch(1);
    stale.version += 1;
    let (tx, stale_answer) = std::sync::mpsc::channel();
    router
        .try_send(prkv::raftstore::StoreMsg::Write {
            region_id: 1,
            epoch: stale,
            mutations: vec![put(199)],
            term_fence: 0,
            cb: Box::new(move |r| drop(tx.send(r))),
        })
        .unwrap();
    answers.extend((200..210).map(|i| c.async_write(leader, 1, vec![put(i)]).unwrap()));
    open_gate.send(()).unwrap();
    for (i, rx) in answers.into_iter().enumerate() {
        let r = rx.recv_timeout(Duration::from_secs(10)).expect("answered");
        assert!(r.is_ok(), "write {i}: {r:?}");
    }
    let r = stale_answer.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        matches!(r, Err(Error::EpochNotMatch { .. })),
        "the stale write got {r:?}"
    );
    let after = c.status(leader, 1).expect("leader's replica").applied_index;
    assert!(
        after - before < 10,
        "209 writes of one round took {} entries",
        after - before
    );
    for i in (0..199u32).chain(200..210) {
        let key = format!("round-{i:03}");
        assert_eq!(
            c.must_get(key.as_bytes()).as_deref(),
            Some(&i.to_be_bytes()[..])
        );
    }
    assert_eq!(c.must_get(b"round-199"), None);
}

/// 10,000 acknowledged writes across 100 Regions survive stopping every store without a flush.
fn restart_all_keeps_acknowledged_writes(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(100, &[1, 2, 3]);
    c.start();
    for r in 1..=100 {
        c.must_leader(r);
    }
    let mut acked = Vec::new();
    let mut pending = Vec::new();
    for i in 0..10_000u64 {
        let region = 1 + i % 100;
        let mut k = region_key(region);
        k.extend_from_slice(format!("-{i}").as_bytes());
        let leader = c.must_leader(region);
        let m = Mutation {
            op: mutation::Op::Put as i32,
            cf: "default".into(),
            key: k.clone(),
            value: i.to_be_bytes().to_vec(),
        };
        if let Ok(rx) = c.async_write(leader, region, vec![m]) {
            pending.push((k, i, rx));
        }
        if pending.len() == 500 || i == 9_999 {
            for (k, i, rx) in pending.drain(..) {
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(Ok(())) => acked.push((k, i)),
                    _ => {
                        c.must_put(&k, &i.to_be_bytes());
                        acked.push((k, i));
                    }
                }
            }
        }
    }
    assert_eq!(acked.len(), 10_000);
    for s in 1..=3 {
        c.stop_store(s);
    }
    c.start();
    for (k, i) in &acked {
        assert_eq!(
            c.must_get(k).as_deref(),
            Some(&i.to_be_bytes()[..]),
            "acknowledged write {k:?} lost"
        );
    }
}

/// Grow from 1 to 3 replicas, remove one, add a learner and promote it, move the leader.
fn conf_change(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1]);
    c.start();
    c.must_put(b"a", b"1");
    c.add_peer(1, peer(102, 2, PeerRole::Voter));
    c.must_replicate(2, b"a", b"1");
    c.add_peer(1, peer(103, 3, PeerRole::Voter));
    c.must_replicate(3, b"a", b"1");
    c.must_put(b"b", b"2");
    for s in 1..=3 {
        c.must_replicate(s, b"b", b"2");
    }
    // Remove store 2's replica: its data goes.
    c.remove_peer(1, peer(102, 2, PeerRole::Voter));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.status(2, 1).is_some() {
        assert!(Instant::now() < deadline, "removed replica still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    if kind == EngineKind::PartitionedRaftKv {
        let tablets = std::fs::read_dir(c.data_dir(2).join("tablets"))
            .unwrap()
            .count();
        assert_eq!(tablets, 0, "the removed replica's tablet directory is gone");
    }
    c.must_put(b"c", b"3");
    // A learner on store 2 (a new peer id), then promoted to voter.
    c.add_learner(1, peer(202, 2, PeerRole::Learner));
    c.must_replicate(2, b"c", b"3");
    assert_eq!(c.status(2, 1).unwrap().peer.role, PeerRole::Learner as i32);
    c.add_peer(1, peer(202, 2, PeerRole::Voter));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.status(2, 1).unwrap().peer.role != PeerRole::Voter as i32 {
        assert!(Instant::now() < deadline, "learner never promoted");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.must_transfer_leader(1, 2);
    c.must_put(b"d", b"4");
    for s in 1..=3 {
        c.must_replicate(s, b"d", b"4");
    }
    // Every replica, including those created mid-history, agrees on the Region.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let views: Vec<_> = (1..=3)
            .map(|s| {
                c.status(s, 1)
                    .map(|st| (st.region.region_epoch, st.region.peers))
            })
            .collect();
        if views.iter().all(|v| v.is_some() && *v == views[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas disagree on the Region: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A flood of proposals to one Region that cannot commit gets `ServerIsBusy`, not unbounded
/// memory.
fn bounded_proposals(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"k", b"v");
    let leader = c.must_leader(1);
    // Appends are never acknowledged, heartbeats are: the leader stays leader but commits nothing.
    c.net
        .drop_type(raft::eraftpb::MessageType::MsgAppendResponse);
    let mut busy = 0;
    let mut receivers = Vec::new();
    for i in 0..6000u64 {
        let m = Mutation {
            op: mutation::Op::Put as i32,
            cf: "default".into(),
            key: format!("f{i}").into_bytes(),
            value: vec![1],
        };
        match c.async_write(leader, 1, vec![m]) {
            Ok(rx) => receivers.push(rx),
            Err(Error::ServerIsBusy { .. }) => busy += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // Busy answers come at once; accepted proposals stay pending (nothing commits).
    std::thread::sleep(Duration::from_millis(500));
    let mut answered_busy = 0;
    for rx in &receivers {
        if let Ok(Err(Error::ServerIsBusy { .. })) = rx.try_recv() {
            answered_busy += 1;
        }
    }
    assert!(
        busy + answered_busy >= 6000 - prkv::raftstore::peer::MAX_PENDING_PROPOSALS,
        "busy={busy} answered_busy={answered_busy}"
    );
    c.heal();
    c.must_put(b"after", b"flood");
}

/// Raft-log GC compacts the logs, yet never past what the engines hold durably: stopping every
/// store without a flush right after loses nothing.
fn log_gc_respects_durable_apply_index(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    for i in 0..300 {
        c.must_put(&key(i), format!("v{i}").as_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let truncated: Vec<u64> = (1..=3)
            .map(|s| c.status(s, 1).map_or(0, |st| st.truncated_index))
            .collect();
        if truncated.iter().all(|t| *t > 100) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logs were never compacted: truncated {truncated:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // More writes after the compaction, then a crash of everything.
    for i in 300..350 {
        c.must_put(&key(i), format!("v{i}").as_bytes());
    }
    for s in 1..=3 {
        c.stop_store(s);
    }
    c.start();
    for i in 0..350 {
        assert_eq!(
            c.must_get(&key(i)),
            Some(format!("v{i}").into_bytes()),
            "write {i} lost after GC + crash"
        );
    }
    c.must_put(b"after", b"restart");
}

/// Below `raft-log-gc-count-limit` and `raft-log-gc-size-limit`, log GC does not flush a
/// tablet: the log waits above the durable apply index (and is all a restart needs to
/// replay), instead of every busy tablet's memtable being cut into a small SST each GC round.
#[test]
fn log_gc_waits_for_flush_below_limits() {
    let mut c = Cluster::new(3, EngineKind::PartitionedRaftKv);
    c.cfg.raftstore.raft_log_gc_count_limit = 73728; // the default
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    for i in 0..300 {
        c.must_put(&key(i), format!("v{i}").as_bytes());
    }
    // Many GC rounds (one per 100 ms here) with 300 entries past the threshold (20).
    std::thread::sleep(Duration::from_secs(2));
    for s in 1..=3 {
        let t = c.status(s, 1).unwrap().truncated_index;
        assert!(
            t < 20,
            "store {s}: log compacted to {t}: its tablet was flushed for GC"
        );
    }
    // Everything lives in the memtables and the log: a stop without a flush keeps it all.
    for s in 1..=3 {
        c.stop_store(s);
    }
    c.start();
    for i in 0..300 {
        assert_eq!(c.must_get(&key(i)), Some(format!("v{i}").into_bytes()));
    }
}

/// Every way a command can be wrong gets its typed error, and changes nothing.
fn typed_errors(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(2, &[1, 2, 3]);
    c.start();
    c.must_put(b"a", b"1");
    let leader = c.must_leader(1);
    let follower = [1, 2, 3].into_iter().find(|s| *s != leader).unwrap();
    // NotLeader, with the leader as hint.
    match c.put_on(follower, b"a", b"2") {
        Err(Error::NotLeader {
            region_id: 1,
            leader: Some(l),
        }) => assert_eq!(l.store_id, leader),
        other => panic!("expected NotLeader with a hint, got {other:?}"),
    }
    // RegionNotFound.
    let m = |k: &[u8], v: Vec<u8>| Mutation {
        op: mutation::Op::Put as i32,
        cf: "default".into(),
        key: k.to_vec(),
        value: v,
    };
    assert!(matches!(
        c.write_on(leader, 99, vec![m(b"a", vec![1])]),
        Err(Error::RegionNotFound(99))
    ));
    // KeyNotInRegion: Region 1 is [, r000002).
    match c.write_on(leader, 1, vec![m(&region_key(2), vec![1])]) {
        Err(Error::KeyNotInRegion { region, .. }) => assert_eq!(region.id, 1),
        other => panic!("expected KeyNotInRegion, got {other:?}"),
    }
    // RaftEntryTooLarge (raftstore.raft-entry-max-size is 8MiB).
    assert!(matches!(
        c.write_on(leader, 1, vec![m(b"big", vec![0; 9 << 20])]),
        Err(Error::RaftEntryTooLarge { region_id: 1, .. })
    ));
    // EpochNotMatch: a request from a client with a newer (or older) Region version.
    let (tx, rx) = std::sync::mpsc::channel();
    c.stores[&leader]
        .router
        .try_send(prkv::raftstore::StoreMsg::Write {
            region_id: 1,
            epoch: prkv_proto::metapb::RegionEpoch {
                conf_ver: 1,
                version: 7,
            },
            mutations: vec![m(b"a", vec![3])],
            term_fence: 0,
            cb: Box::new(move |r| drop(tx.send(r))),
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
        Err(Error::EpochNotMatch { current_regions }) => assert_eq!(current_regions[0].id, 1),
        other => panic!("expected EpochNotMatch, got {other:?}"),
    }
    assert_eq!(
        c.must_get(b"a").as_deref(),
        Some(&b"1"[..]),
        "refused commands changed nothing"
    );
    assert_eq!(c.must_get(b"big"), None);
}

/// Two changes at once go through joint consensus (enter, then automatic leave): replace the
/// replica on store 2 by one on store 3 in a single step.
fn joint_consensus_replace(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2]);
    c.start();
    c.must_put(b"x", b"1");
    c.must_transfer_leader(1, 1);
    c.change_peers(
        1,
        vec![
            prkv::raftstore::ChangePeer::AddVoter(peer(103, 3, PeerRole::Voter)),
            prkv::raftstore::ChangePeer::Remove(peer(102, 2, PeerRole::Voter)),
        ],
    );
    c.must_replicate(3, b"x", b"1");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = c.status(1, 1).unwrap();
        let roles: Vec<_> = st.region.peers.iter().map(|p| (p.id, p.role)).collect();
        let left_joint =
            roles == vec![(101, PeerRole::Voter as i32), (103, PeerRole::Voter as i32)];
        if left_joint && c.status(2, 1).is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "joint change never completed: {roles:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.must_put(b"y", b"2");
    c.must_replicate(3, b"y", b"2");
}

/// Lossy, duplicating, reordering network: every acknowledged write is on every replica once the
/// network heals.
fn chaos_network(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(4, &[1, 2, 3]);
    c.start();
    c.net.chaos(0.1, 0.05, Duration::from_millis(5));
    let keys: Vec<Vec<u8>> = (1..=4u64)
        .flat_map(|r| {
            (0..25).map(move |i| {
                let mut k = region_key(r);
                k.extend_from_slice(format!("-{i}").as_bytes());
                k
            })
        })
        .collect();
    for k in &keys {
        c.must_put(k, b"chaos");
    }
    c.heal();
    for s in 1..=3 {
        for k in &keys {
            c.must_replicate(s, k, b"chaos");
        }
    }
}

/// A split soon after a store restarted: the new Regions still elect their leaders at once.
/// The restarted store refuses votes for an election timeout in the Regions it recovered (a
/// promise to their leaders it no longer remembers), but a Region a split created after the
/// restart made no such promise. Here the split's children need the restarted store's vote
/// (the third store is cut off); before only recovered Regions refused, they waited out the
/// restarted store's whole 10 s window.
fn split_soon_after_a_restart_elects_at_once(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(&key(1), b"v");
    let leader = c.must_leader(1);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|s| *s != leader).collect();
    let (restarted, cut) = (others[0], others[1]);
    // The restarted store's election timeout, and so its vote refusal, is 10 s.
    let normal = c.cfg.clone();
    c.cfg.raftstore.raft_election_timeout_ticks = 500;
    c.restart_store(restarted);
    c.cfg = normal;
    c.must_replicate(restarted, &key(1), b"v");
    c.isolate(cut);
    assert_eq!(c.must_leader(1), leader, "the leader keeps its quorum");
    let split_at = Instant::now();
    let regions = c.must_split(1, &[&key(10), &key(20)]);
    for r in &regions {
        let deadline = split_at + Duration::from_secs(3);
        while c.leader_store(r.id).is_none() {
            assert!(
                Instant::now() < deadline,
                "Region {} has no leader 3 s after the split (waited {:?})",
                r.id,
                split_at.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    c.heal();
    for r in &regions {
        c.must_leader(r.id);
    }
}

/// A newly elected leader reports to PD at once, not at the next heartbeat tick (here a
/// minute away): PD routes clients by it. Before, a leader elected in a later Raft round than
/// its term began (every contested or transferred election) waited for the tick.
fn a_new_leader_reports_to_pd_at_once(kind: EngineKind) {
    let mut c = Cluster::new(3, kind);
    c.cfg.raftstore.pd_heartbeat_tick_interval = prkv::config::ReadableDuration::secs(60);
    c.bootstrap(1, &[1, 2, 3]);
    let started = Instant::now();
    c.start();
    let leader = c.must_leader(1);
    let first = c.status(leader, 1).unwrap().peer.id;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.pd.reported_leader(1, first, started) {
        assert!(Instant::now() < deadline, "the first leader never reported");
        std::thread::sleep(Duration::from_millis(20));
    }
    let to = [1, 2, 3].into_iter().find(|s| *s != leader).unwrap();
    let since = Instant::now();
    c.must_transfer_leader(1, to);
    let new = c.status(to, 1).unwrap().peer.id;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.pd.reported_leader(1, new, since) {
        assert!(
            Instant::now() < deadline,
            "the new leader did not report to PD within 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

macro_rules! both_kinds {
    ($($name:ident),*) => {
        mod partitioned {
            $(#[test] fn $name() { super::$name(prkv::config::EngineKind::PartitionedRaftKv) })*
        }
        mod raft_kv {
            $(#[test] fn $name() { super::$name(prkv::config::EngineKind::RaftKv) })*
        }
    };
}

both_kinds!(
    failover,
    no_stale_read_from_old_leader,
    no_stale_read_after_leader_transfer,
    no_stale_read_after_an_aborted_transfer,
    no_stale_read_after_a_follower_restarts_and_votes,
    apply_state_before_an_admin_entry_has_its_own_term,
    writes_during_a_transfer_name_no_leader,
    plain_writes_of_a_round_share_an_entry,
    restart_all_keeps_acknowledged_writes,
    conf_change,
    bounded_proposals,
    log_gc_respects_durable_apply_index,
    typed_errors,
    joint_consensus_replace,
    chaos_network,
    split_soon_after_a_restart_elects_at_once,
    a_new_leader_reports_to_pd_at_once
);

/// 1,000 Regions x 3 replicas in one process. Once idle they hibernate: the store loops stop
/// ticking them (counted), yet a write still wakes a Region and a hibernated Region still
/// fails over when its leader's store goes away.
fn many_regions_hibernate(kind: EngineKind) {
    const REGIONS: u64 = 1000;
    let mut c = Cluster::new(3, kind);
    c.bootstrap(REGIONS, &[1, 2, 3]);
    c.start();
    for r in 1..=REGIONS {
        c.must_leader(r);
    }
    let ticks = |c: &Cluster| -> u64 {
        c.stores
            .values()
            .map(|h| {
                h.stats
                    .peer_ticks
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    };
    // Idle: every Region should hibernate within a few election timeouts.
    let deadline = Instant::now() + Duration::from_secs(60);
    let quiet = loop {
        let before = ticks(&c);
        std::thread::sleep(Duration::from_millis(500));
        let delta = ticks(&c) - before;
        if delta == 0 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(quiet, "peers kept ticking: hibernation never settled");
    // Over a full second of idleness, no peer is ticked at all. (Looked at up to five times:
    // under the load of the other tests of this binary a store loop can stall past an
    // election timeout, and its neighbours then wake the followers it leads, rightly.)
    let mut ticked = Vec::new();
    for _ in 0..5 {
        let before = ticks(&c);
        std::thread::sleep(Duration::from_secs(1));
        ticked.push(ticks(&c) - before);
        if ticked.last() == Some(&0) {
            break;
        }
    }
    assert_eq!(
        ticked.last(),
        Some(&0),
        "hibernated Regions cost ticks in every second looked at: {ticked:?}"
    );
    // A write wakes its Region.
    c.must_put(&region_key(500), b"awake");
    assert_eq!(c.must_get(&region_key(500)).as_deref(), Some(&b"awake"[..]));
    // A hibernated Region whose leader's store is cut off elects a new leader elsewhere.
    let mut target = None;
    for r in 1..=REGIONS {
        if r != 500 && c.leader_store(r) == Some(1) {
            target = Some(r);
            break;
        }
    }
    if let Some(r) = target {
        c.isolate(1);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let led_elsewhere = [2, 3]
                .into_iter()
                .any(|s| c.status(s, r).is_some_and(|st| st.leader_id == st.peer.id));
            if led_elsewhere {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "hibernated Region {r} never failed over"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c.heal();
    }
}

mod scale {
    #[test]
    fn many_regions_hibernate_partitioned() {
        super::many_regions_hibernate(prkv::config::EngineKind::PartitionedRaftKv)
    }
    #[test]
    fn many_regions_hibernate_raft_kv() {
        super::many_regions_hibernate(prkv::config::EngineKind::RaftKv)
    }
}
