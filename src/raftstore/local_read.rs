//! Lease reads served on the caller's thread, without a trip through the store loop.
//!
//! A leader holding a valid lease answers a linearizable read from its engine at once (see the
//! read section of [`super::peer`]). Sending that read through the store loop costs a channel
//! hop, a wake-up of the loop thread and a callback, and it queues behind every write and Raft
//! message of the round. TiKV's `LocalReader` skips all of that; so does this module.
//!
//! Each peer owns a [`ReadDelegate`] and *publishes* into it what a reader needs to decide alone:
//!
//! * until when it may serve reads (`until`): set only while it leads, holds a lease of its
//!   current term, has applied an entry of that term, transfers no leadership and is not
//!   frozen for a merge; it is the lease's own expiry, so a delegate that is not refreshed
//!   goes stale by itself;
//! * the Region (its epoch and range), the term, and the engine to read from.
//!
//! A reader ([`LocalReaders::read`]) takes the delegate's lock, checks the time, the epoch the
//! client sent and that the tablet is open, and takes the engine snapshot *under that lock*.
//! Anything else (no delegate, an expired lease, another epoch, a parked tablet) falls back to
//! the store loop, which gives the typed error or waits for a ReadIndex round.
//!
//! **Why this is as safe as the loop's own lease check.** The peer publishes on the store
//! thread, and every change that ends its right to read is published *before* anything that
//! lets another replica act on it leaves the store:
//!
//! * a leadership transfer: the store publishes each peer's state at the start of its Ready
//!   handling, before the messages (the `MsgTimeoutNow` among them) are sent;
//! * a split, merge or membership change: published at the end of the apply that made it,
//!   before the store creates the new Regions or answers anyone;
//! * a proposed merge: published when the PrepareMerge is proposed;
//! * a replica destroyed: its delegate is emptied and unregistered first.
//!
//! Stepping down on a higher term is the one change published late (at the end of the round):
//! as for the loop's own check, the lease is what protects those reads. A lease ends before any
//! follower that confirmed it can vote for someone else.
//!
//! The snapshot is taken under the delegate's lock, so the state checked is the state read: a
//! split or a transfer published by the store waits for a read in flight, and no read starts
//! from a state that was already withdrawn.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use prkv_proto::metapb::{Region, RegionEpoch};

use super::msg::RegionSnapshot;
use crate::storage::{RegionEngine, RegionId};

/// What a peer lets readers on other threads do: serve lease reads until `until`.
#[derive(Clone)]
pub struct Readable {
    pub until: Instant,
    pub term: u64,
    pub region: Region,
    pub engine: Arc<dyn RegionEngine>,
}

/// One peer's published read state; `None` means "ask the store loop".
#[derive(Default)]
pub struct ReadDelegate {
    state: Mutex<Option<Readable>>,
}

impl ReadDelegate {
    /// Replaces the published state (called on the store thread only).
    pub fn publish(&self, state: Option<Readable>) {
        *self.state.lock() = state;
    }
}

/// The delegates of every replica of one store, shared by the store loop and the gRPC service.
#[derive(Default)]
pub struct LocalReaders {
    delegates: RwLock<HashMap<RegionId, Arc<ReadDelegate>>>,
}

/// Why a local read fell back to the store loop (the `prkv_local_reads_total` label).
fn count(result: &str) {
    crate::metrics::LOCAL_READS
        .with_label_values(&[result])
        .inc();
}

impl LocalReaders {
    /// A new, empty delegate for a replica the store just built.
    pub fn register(&self, region_id: RegionId) -> Arc<ReadDelegate> {
        let d = Arc::new(ReadDelegate::default());
        self.delegates.write().insert(region_id, d.clone());
        d
    }

    /// Withdraws a replica the store is removing: no read starts from it after this returns.
    pub fn unregister(&self, region_id: RegionId) {
        if let Some(d) = self.delegates.write().remove(&region_id) {
            d.publish(None);
        }
    }

    /// Serves a read from the lease if the Region's leader is here and may; `None` sends the
    /// caller to the store loop.
    pub fn read(&self, region_id: RegionId, epoch: &RegionEpoch) -> Option<RegionSnapshot> {
        let Some(d) = self.delegates.read().get(&region_id).cloned() else {
            count("no_replica");
            return None;
        };
        let state = d.state.lock();
        let Some(r) = state.as_ref() else {
            count("not_readable");
            return None;
        };
        if Instant::now() >= r.until {
            count("lease_expired");
            return None;
        }
        if r.region.region_epoch.unwrap_or_default().version != epoch.version {
            count("epoch");
            return None;
        }
        // Reopening a parked tablet takes milliseconds: not under this lock, which the store
        // thread may be waiting for.
        if r.engine.is_parked() {
            count("parked");
            return None;
        }
        count("served");
        Some(RegionSnapshot {
            snap: r.engine.snapshot(),
            region: r.region.clone(),
            term: r.term,
        })
    }
}
