//! Damaged replicas: a replica whose data on disk is not what it acknowledged never serves.
//!
//! At start-up, before a replica's peer is built, its data is checked against its log:
//!
//! * the tablet generation its Region state names exists (opening would otherwise create an
//!   empty one, and the replica would serve nothing as if it were everything);
//! * it opens cleanly: RocksDB checks every SST's size against the MANIFEST and the MANIFEST's
//!   own checksums, so a truncated or overwritten file is a `Corruption`;
//! * its apply state lies within the log: at or past the truncated index (GC never passes the
//!   durable apply index, so a tablet behind it lost writes) and at or before the last index
//!   (applied data always has a log).
//!
//! A replica failing a check is **refused**: its data moves aside, unopened, to
//! `<data-dir>/damaged/<region>_<peer>_<unix-secs>/` with a `REASON` file; its log goes and a
//! tombstone stays, exactly as for a removed replica. It then never votes or acknowledges again,
//! which Raft treats as a dead replica: safe, since the others hold every committed entry. The
//! store lists the Region in `damaged_regions_id` of its store heartbeats; PD removes that
//! replica and its replica checker adds a new one (a new peer id), usually on this same store,
//! which receives a snapshot from the leader: the replica is **rebuilt from the others**.
//! The other replicas are told (`wake_up`): if the refused one led a hibernated Region, they
//! would otherwise wait for it without ticking, since its store is alive and its silence
//! wakes nobody, and the Region would stay without a leader PD could hear from.
//!
//! The report lasts until a newer replica of the Region is created here, and survives a restart
//! (the `damaged/` entry plus the tombstone of the same peer). Quarantined directories stay
//! until an operator removes them: they are evidence, and their size is the replica's.
//!
//! **While running**, RocksDB's `Corruption` met anywhere in a tablet (a read meeting a block
//! whose checksum does not match, a flush, a trim) is reported by `storage::corruption` and the
//! replica is refused the same way; the read that met it fails, and the client retries on the
//! new leader. An apply that meets it (RocksDB refuses every write after a background error)
//! refuses the replica at once, in the same Ready round (`Store::apply_or_refuse`), rather than
//! stopping the store.
//!
//! Not covered: `raft-kv`'s shared DB (its corruption is returned as an error; its start-up
//! checks still apply), and a damaged raft-engine, which stops the store at open.

use std::path::PathBuf;
use std::sync::Arc;

use prkv_proto::metapb::{Peer as PeerMeta, Region};
use prkv_proto::serverpb::{PeerState, RegionLocalState};

use super::{range_of, Store};
use crate::raftstore::error::Result;
use crate::raftstore::RaftMessage;
use crate::storage::{self, RegionEngine, RegionId};

const DAMAGED_DIR: &str = "damaged";

impl Store {
    /// Opens a replica's engine and checks it against its log. `Ok(Err(reason))`: the data is
    /// damaged; `Err`: the store cannot check it (an I/O error), and does not start.
    pub(super) fn open_checked(
        &self,
        region: &Region,
        state: &RegionLocalState,
    ) -> Result<std::result::Result<Arc<dyn RegionEngine>, String>> {
        let id = region.id;
        // Index 0 is a replica created empty to receive a snapshot: nothing to lose.
        if state.tablet_index > 0 && !self.engines.kv.has_region_data(id, state.tablet_index) {
            return Ok(Err(format!(
                "tablet generation {} is missing",
                state.tablet_index
            )));
        }
        let engine = match self
            .engines
            .kv
            .open_region(id, range_of(region), state.tablet_index)
        {
            Ok(e) => e,
            Err(e @ storage::Error::Corruption { .. }) => return Ok(Err(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let applied = match engine.apply_state() {
            Ok(a) => a,
            Err(e @ storage::Error::Corruption { .. }) => return Ok(Err(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let truncated = self
            .engines
            .raft
            .truncated_state(id)?
            .map_or(0, |t| t.index);
        let last = self.engines.raft.last_index(id).unwrap_or(truncated);
        let reason = match applied {
            None if truncated > 0 => Some(format!(
                "no apply state, but the log was truncated through {truncated}"
            )),
            Some(a) if a.applied_index < truncated => Some(format!(
                "applied through {} but the log was truncated through {truncated}: \
                 writes in between are lost",
                a.applied_index
            )),
            Some(a) if a.applied_index > last.max(truncated) => Some(format!(
                "applied through {} but the log ends at {}",
                a.applied_index,
                last.max(truncated)
            )),
            _ => None,
        };
        Ok(match reason {
            Some(r) => Err(r), // `engine` drops here: closed before its directory moves
            None => Ok(engine),
        })
    }

    /// Refuses a damaged replica: data aside, log gone, tombstone kept, PD told.
    pub(super) fn quarantine(
        &mut self,
        region: Region,
        meta: PeerMeta,
        reason: &str,
    ) -> Result<()> {
        let id = region.id;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dest = self.damaged_root().join(format!("{id}_{}_{secs}", meta.id));
        tracing::error!(
            store_id = self.id,
            region_id = id,
            peer_id = meta.id,
            reason,
            moved_to = %dest.display(),
            "replica data damaged: refusing this replica; PD will rebuild it from the others"
        );
        self.engines.kv.quarantine_region(id, &dest)?;
        std::fs::create_dir_all(&dest)
            .and_then(|_| std::fs::write(dest.join("REASON"), format!("{reason}\n")))
            .map_err(|e| storage::Error::io(&dest, e))?;
        let epoch = region.region_epoch.unwrap_or_default();
        let others: Vec<_> = region
            .peers
            .iter()
            .filter(|p| p.id != meta.id)
            .copied()
            .collect();
        self.write_tombstone(id, region, meta.id)?;
        self.report_damaged(id, true);
        // If this replica led a hibernated Region, its followers wait for it without ticking,
        // and this store stays alive, so its silence does not wake them: tell them.
        for to in others {
            let mut wake = RaftMessage::signal(id, meta, to, epoch, self.id);
            wake.wake_up = true;
            self.trans.send(wake);
        }
        Ok(())
    }

    /// A replica's tablet turned out damaged while running: the peer goes (its pending
    /// commands fail) and the replica is refused as at start-up. A report about an older
    /// generation than the replica's open one (a tablet being retired) changes nothing.
    pub(super) fn on_replica_damaged(
        &mut self,
        region_id: RegionId,
        tablet_index: u64,
        reason: &str,
    ) -> Result<()> {
        let Some(p) = self.peers.get(&region_id) else {
            return Ok(()); // already refused (one damaged block is usually met many times)
        };
        if p.engine.tablet_index() != tablet_index {
            return Ok(());
        }
        let Some((region, meta)) = self.take_peer(region_id) else {
            return Ok(());
        };
        self.quarantine(region, meta, reason)
    }

    /// Re-reads, at start-up, which refused replicas still wait for PD: those whose Region is
    /// still a tombstone of exactly the refused peer.
    pub(super) fn reload_damaged(&mut self) -> Result<()> {
        let root = self.damaged_root();
        let Ok(dir) = std::fs::read_dir(&root) else {
            return Ok(()); // none ever
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('_').map(|p| p.parse::<u64>().ok());
            let (Some(Some(region_id)), Some(Some(peer_id))) = (parts.next(), parts.next()) else {
                continue;
            };
            let still = self.engines.raft.region_state(region_id)?.is_some_and(|s| {
                s.state == PeerState::Tombstone as i32 && s.destroyed_peer_id == peer_id
            });
            if still {
                self.report_damaged(region_id, true);
            }
        }
        Ok(())
    }

    /// Adds or drops a Region in the list the store heartbeat reports to PD.
    pub(super) fn report_damaged(&self, region_id: RegionId, damaged: bool) {
        let mut list = self.stats.damaged.lock();
        list.retain(|r| *r != region_id);
        if damaged {
            list.push(region_id);
        }
        crate::metrics::DAMAGED_REPLICAS.set(list.len() as i64);
    }

    fn damaged_root(&self) -> PathBuf {
        self.cfg.storage.data_dir.join(DAMAGED_DIR)
    }
}
