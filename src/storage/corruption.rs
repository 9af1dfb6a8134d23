//! Who hears of a damaged tablet found while running.
//!
//! Every RocksDB error passes through `rocks::rocks_err`; a `Corruption` (a block whose
//! checksum does not match, a file shorter than its MANIFEST says) is reported here with the
//! path of the instance it came from, whichever thread met it: a client read, an apply, a
//! flush, a trim. A tablet's path is `<tablets root>/<region>_<index>`, so the report names the
//! Region and the tablet generation, and goes to the hook the owner of that root registered
//! (the store: it refuses the replica, see `raftstore/store/damage.rs`). The shared DB of
//! `raft-kv` has no per-Region path: its corruption is only returned as an error.
//!
//! One process may run several stores (the in-process test cluster), hence a map by root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

use super::{Index, RegionId};

/// Called with the Region, the tablet generation and RocksDB's message.
pub type Hook = Arc<dyn Fn(RegionId, Index, String) + Send + Sync>;

static HOOKS: LazyLock<Mutex<HashMap<PathBuf, Hook>>> = LazyLock::new(Default::default);

/// Sends corruption met in tablets under `root` to `hook` (replacing an earlier one).
pub fn watch(root: &Path, hook: Hook) {
    HOOKS.lock().insert(root.to_path_buf(), hook);
}

/// Stops reporting for `root`.
pub fn unwatch(root: &Path) {
    HOOKS.lock().remove(root);
}

/// A `Corruption` from the RocksDB instance at `path`.
pub(crate) fn report(path: &Path, detail: &str) {
    tracing::error!(path = %path.display(), detail, "RocksDB reports corruption");
    let (Some(root), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let Some((region, index)) = name
        .to_str()
        .and_then(|n| n.split_once('_'))
        .and_then(|(r, i)| Some((r.parse().ok()?, i.parse().ok()?)))
    else {
        return;
    };
    // Clone the hook out: it must not run under the map's lock.
    let hook = HOOKS.lock().get(root).cloned();
    if let Some(hook) = hook {
        hook(region, index, detail.to_string());
    }
}
