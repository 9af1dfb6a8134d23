//! How stores reach each other.
//!
//! [`Transport`] is all the Raftstore knows: "deliver this message to that store, if you can".
//! Delivery is best effort, as on a real network: Raft tolerates loss, duplication and reordering.
//! Production uses batched gRPC streams (with the server work); tests use [`SimNetwork`], an
//! in-process network whose [`Filter`]s drop, delay, duplicate or reorder messages, partition
//! stores, isolate one, or target one Region or message type.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rand::Rng;

use super::msg::{RaftMessage, StoreId, StoreMsg};
use super::store::StoreRouter;

/// Told whether a snapshot reached its receiver (`true`) or the transfer failed.
pub type SnapshotDone = Box<dyn FnOnce(bool) + Send>;

pub trait Transport: Send + Sync {
    fn send(&self, msg: RaftMessage);

    /// Sends a `MsgSnapshot` whose files are on this store in the directory its
    /// `SnapshotMeta` names. The default hands the message over as is: the receiving store
    /// links the files from that directory itself (stores sharing one machine, as in tests).
    fn send_snapshot(&self, msg: RaftMessage, done: SnapshotDone) {
        self.send(msg);
        done(true);
    }
}

/// What a filter decides for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    Drop,
    Duplicate,
    Delay(Duration),
}

/// A rule applied to every message; the first non-`Deliver` verdict wins.
pub type Filter = Arc<dyn Fn(&RaftMessage) -> Verdict + Send + Sync>;

/// An in-process network between stores of one test.
#[derive(Clone, Default)]
pub struct SimNetwork {
    inner: Arc<RwLock<SimInner>>,
}

#[derive(Default)]
struct SimInner {
    routers: HashMap<StoreId, StoreRouter>,
    filters: Vec<(String, Filter)>,
}

impl SimNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects (or reconnects, after a restart) a store.
    pub fn register(&self, store: StoreId, router: StoreRouter) {
        self.inner.write().routers.insert(store, router);
    }

    pub fn unregister(&self, store: StoreId) {
        self.inner.write().routers.remove(&store);
    }

    /// Adds a named filter.
    pub fn add_filter(&self, name: &str, f: Filter) {
        self.inner.write().filters.push((name.to_string(), f));
    }

    pub fn remove_filter(&self, name: &str) {
        self.inner.write().filters.retain(|(n, _)| n != name);
    }

    pub fn clear_filters(&self) {
        self.inner.write().filters.clear();
    }

    /// Cuts every link between the two groups of stores (both directions).
    pub fn partition(&self, a: &[StoreId], b: &[StoreId]) {
        let (a, b) = (a.to_vec(), b.to_vec());
        self.add_filter(
            "partition",
            Arc::new(move |m| {
                let cross = (a.contains(&m.from_store) && b.contains(&m.to_store))
                    || (b.contains(&m.from_store) && a.contains(&m.to_store));
                if cross {
                    Verdict::Drop
                } else {
                    Verdict::Deliver
                }
            }),
        );
    }

    /// Cuts one store off from all others.
    pub fn isolate(&self, store: StoreId) {
        self.add_filter(
            &format!("isolate-{store}"),
            Arc::new(move |m| {
                if m.from_store == store || m.to_store == store {
                    Verdict::Drop
                } else {
                    Verdict::Deliver
                }
            }),
        );
    }

    /// Drops messages of one Region.
    pub fn drop_region(&self, region_id: u64) {
        self.add_filter(
            &format!("drop-region-{region_id}"),
            Arc::new(move |m| {
                if m.region_id == region_id {
                    Verdict::Drop
                } else {
                    Verdict::Deliver
                }
            }),
        );
    }

    /// Drops messages of one Raft message type.
    pub fn drop_type(&self, msg_type: raft::eraftpb::MessageType) {
        self.add_filter(
            &format!("drop-type-{msg_type:?}"),
            Arc::new(move |m| {
                if !m.is_store_heartbeat() && m.message.get_msg_type() == msg_type {
                    Verdict::Drop
                } else {
                    Verdict::Deliver
                }
            }),
        );
    }

    /// Loses, duplicates and delays (hence reorders) messages at random.
    pub fn chaos(&self, drop_ratio: f64, dup_ratio: f64, max_delay: Duration) {
        self.add_filter(
            "chaos",
            Arc::new(move |_| {
                let mut rng = rand::thread_rng();
                let x: f64 = rng.gen();
                if x < drop_ratio {
                    Verdict::Drop
                } else if x < drop_ratio + dup_ratio {
                    Verdict::Duplicate
                } else if !max_delay.is_zero() && rng.gen_bool(0.5) {
                    Verdict::Delay(Duration::from_micros(
                        rng.gen_range(0..max_delay.as_micros() as u64),
                    ))
                } else {
                    Verdict::Deliver
                }
            }),
        );
    }

    fn deliver(&self, msg: RaftMessage) {
        let router = self.inner.read().routers.get(&msg.to_store).cloned();
        if let Some(r) = router {
            // A full inbox drops the message, like a congested link.
            let _ = r.try_send(StoreMsg::Raft(Box::new(msg)));
        }
    }
}

impl Transport for SimNetwork {
    fn send(&self, msg: RaftMessage) {
        let verdict = {
            let inner = self.inner.read();
            inner
                .filters
                .iter()
                .map(|(_, f)| f(&msg))
                .find(|v| *v != Verdict::Deliver)
                .unwrap_or(Verdict::Deliver)
        };
        match verdict {
            Verdict::Deliver => self.deliver(msg),
            Verdict::Drop => {}
            Verdict::Duplicate => {
                self.deliver(msg.clone());
                self.deliver(msg);
            }
            Verdict::Delay(d) => {
                let net = self.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    net.deliver(msg);
                });
            }
        }
    }
}
