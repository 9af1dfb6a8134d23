//! Requests their clients abandon: the gRPC handler's future is dropped (a client deadline, a
//! closed connection) while its Raft proposal lives on and applies later. Whatever guards the
//! command's check-then-write (its latches) must live as long as the proposal, not the future.
//!
//! The scenario, on the in-process cluster with the `tikvpb.Tikv` service of the leader's store
//! called directly: the leader is cut off from its followers, so a write it proposes cannot
//! commit yet; a first command is abandoned while its entry waits; a second command on the same
//! key is sent; the network heals within the leader's lease, so the first entry commits in the
//! same term. The second command must see the first one's effect.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use prkv::config::EngineKind;
use prkv::server::kv::KvService;
use prkv::server::raw::RawConfig;
use prkv_proto::kvrpcpb::{self, Context, Op};
use prkv_proto::tikvpb::tikv_server::Tikv;
use tonic::Request;

/// How long the abandoned request waits before its client gives up: far below the time the
/// cut-off leader needs to commit, so the proposal is certainly still pending.
const GIVE_UP: Duration = Duration::from_millis(20);

struct Setup {
    c: Cluster,
    svc: KvService,
    ctx: Context,
    leader: u64,
    term: u64,
}

fn setup(kind: EngineKind) -> Setup {
    let mut c = Cluster::new(3, kind);
    c.bootstrap(1, &[1, 2, 3]);
    c.start();
    c.must_put(b"warm-up", b"1");
    let leader = c.must_leader(1);
    let st = c.status(leader, 1).expect("leader status");
    let svc = KvService::new(
        c.stores[&leader].router.clone(),
        RawConfig::new(1, false, 8192),
    );
    let ctx = Context {
        region_id: 1,
        region_epoch: Some(st.region.region_epoch.unwrap_or_default()),
        peer: Some(st.peer),
        ..Default::default()
    };
    Setup {
        c,
        svc,
        ctx,
        leader,
        term: st.term,
    }
}

impl Setup {
    /// Renews the leader's lease (a write commits), then cuts the leader off.
    fn cut_off_leader(&self) {
        self.c.must_put(b"warm-up", b"2");
        self.c.isolate(self.leader);
    }

    /// Heals the network and checks that the leader kept its term: the abandoned entry, proposed
    /// in that term by the leader that still leads it, is certainly committed and applied.
    fn heal_same_term(&self) {
        self.c.heal();
        self.c.must_put(b"warm-up", b"3");
        let st = self.c.status(self.leader, 1).expect("leader status");
        assert!(
            st.term == self.term && st.leader_id == st.peer.id,
            "leadership changed (term {} -> {}); the scenario needs the first entry to commit \
             in its own term",
            self.term,
            st.term
        );
    }
}

fn cas(s: &Setup, value: &[u8]) -> kvrpcpb::RawCasRequest {
    kvrpcpb::RawCasRequest {
        context: Some(s.ctx.clone()),
        key: b"register".to_vec(),
        value: value.to_vec(),
        previous_not_exist: true,
        ..Default::default()
    }
}

/// Two compare-and-swaps from "absent": the first is abandoned while its entry waits in Raft,
/// the second must not also succeed. Before latches went with the proposal, the second took the
/// latch the dropped handler released, read the key as absent under the leader's lease, and
/// both wrote.
fn cas_abandoned(kind: EngineKind) {
    let s = setup(kind);
    let rt = tokio::runtime::Runtime::new().unwrap();
    s.cut_off_leader();
    rt.block_on(async {
        let first = tokio::time::timeout(
            GIVE_UP,
            s.svc.raw_compare_and_swap(Request::new(cas(&s, b"a"))),
        );
        assert!(
            first.await.is_err(),
            "the cut-off leader cannot have committed yet"
        );
    });
    let svc = s.svc.clone();
    let second = rt.spawn({
        let req = cas(&s, b"b");
        async move { svc.raw_compare_and_swap(Request::new(req)).await }
    });
    std::thread::sleep(Duration::from_millis(30));
    s.heal_same_term();
    let second = rt
        .block_on(second)
        .unwrap()
        .expect("second CAS answered")
        .into_inner();
    assert!(
        second.region_error.is_none() && second.error.is_empty(),
        "{second:?}"
    );
    assert!(
        !second.succeed,
        "both compare-and-swaps from \"absent\" succeeded: the first applied, the second read \
         a snapshot without it"
    );
    assert_eq!(second.previous_value, b"a");
    assert_eq!(s.c.must_get(b"register").as_deref(), Some(&b"a"[..]));
}

fn txn_key() -> Vec<u8> {
    b"account".to_vec()
}

/// A commit is abandoned while its entry waits; a rollback of the same transaction (what a
/// reader resolving its lock would send) must then find it committed. Before, the rollback read
/// the lock still there, and the transaction ended both committed and rolled back.
fn commit_abandoned_then_rollback(kind: EngineKind) {
    let s = setup(kind);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (start_ts, commit_ts) = (100, 110);
    rt.block_on(async {
        let pw = s
            .svc
            .kv_prewrite(Request::new(kvrpcpb::PrewriteRequest {
                context: Some(s.ctx.clone()),
                mutations: vec![kvrpcpb::Mutation {
                    op: Op::Put as i32,
                    key: txn_key(),
                    value: b"100".to_vec(),
                    ..Default::default()
                }],
                primary_lock: txn_key(),
                start_version: start_ts,
                lock_ttl: 3000,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(pw.region_error.is_none() && pw.errors.is_empty(), "{pw:?}");
    });
    s.cut_off_leader();
    rt.block_on(async {
        let commit = s.svc.kv_commit(Request::new(kvrpcpb::CommitRequest {
            context: Some(s.ctx.clone()),
            start_version: start_ts,
            keys: vec![txn_key()],
            commit_version: commit_ts,
            ..Default::default()
        }));
        assert!(
            tokio::time::timeout(GIVE_UP, commit).await.is_err(),
            "the cut-off leader cannot have committed yet"
        );
    });
    let svc = s.svc.clone();
    let ctx = s.ctx.clone();
    let rollback = rt.spawn(async move {
        svc.kv_batch_rollback(Request::new(kvrpcpb::BatchRollbackRequest {
            context: Some(ctx),
            start_version: start_ts,
            keys: vec![txn_key()],
            ..Default::default()
        }))
        .await
    });
    std::thread::sleep(Duration::from_millis(30));
    s.heal_same_term();
    let rollback = rt.block_on(rollback).unwrap().unwrap().into_inner();
    assert!(rollback.region_error.is_none(), "{rollback:?}");
    let read = rt.block_on(async {
        s.svc
            .kv_get(Request::new(kvrpcpb::GetRequest {
                context: Some(s.ctx.clone()),
                key: txn_key(),
                version: commit_ts + 10,
            }))
            .await
            .unwrap()
            .into_inner()
    });
    assert!(
        read.region_error.is_none() && read.error.is_none(),
        "{read:?}"
    );
    assert_eq!(read.value, b"100", "the commit applied");
    assert!(
        rollback.error.is_some(),
        "the transaction was committed and its rollback succeeded too"
    );
}

mod partitioned {
    use super::*;
    #[test]
    fn cas_abandoned_mid_proposal() {
        cas_abandoned(EngineKind::PartitionedRaftKv);
    }
    #[test]
    fn commit_abandoned_mid_proposal_then_rollback() {
        commit_abandoned_then_rollback(EngineKind::PartitionedRaftKv);
    }
}

mod raft_kv {
    use super::*;
    #[test]
    fn cas_abandoned_mid_proposal() {
        cas_abandoned(EngineKind::RaftKv);
    }
    #[test]
    fn commit_abandoned_mid_proposal_then_rollback() {
        commit_abandoned_then_rollback(EngineKind::RaftKv);
    }
}
