//! Free disk space and `storage.reserve-space`.
//!
//! A store that runs out of disk mid-write cannot persist its Raft state and must stop; worse,
//! RocksDB may be left unable to flush or compact. So a store keeps a reserve: once the free
//! space of the file system holding its data directory falls below `storage.reserve-space`,
//! the store refuses new data writes with a typed `DiskFull` error (clients see
//! `errorpb.DiskFull`) while reads, deletes (which free space once compacted), Raft traffic and
//! admin commands go on. When space returns, writes are taken again; nothing was half-written.
//!
//! The check is one `statvfs` per second on the store thread ([`DiskMonitor::refresh`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often free space is measured: often enough that a burst of writes cannot eat a
/// reserve of a few GiB between two checks (that would take GiB/s), rarely enough to cost
/// nothing.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes available to this process on the file system holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether the store is below its reserve, measured at most once per [`CHECK_INTERVAL`].
pub struct DiskMonitor {
    dir: PathBuf,
    reserve: u64,
    available: u64,
    full: bool,
    checked: Option<Instant>,
}

impl DiskMonitor {
    /// `reserve` = 0 turns the check off.
    pub fn new(dir: &Path, reserve: u64) -> DiskMonitor {
        let mut m = DiskMonitor {
            dir: dir.to_path_buf(),
            reserve,
            available: u64::MAX,
            full: false,
            checked: None,
        };
        m.refresh();
        m
    }

    /// Measures again if the last measure is older than [`CHECK_INTERVAL`].
    pub fn refresh(&mut self) {
        if self.reserve == 0 || self.checked.is_some_and(|t| t.elapsed() < CHECK_INTERVAL) {
            return;
        }
        self.checked = Some(Instant::now());
        match available_bytes(&self.dir) {
            Ok(a) => {
                self.available = a;
                let full = a < self.reserve;
                if full != self.full {
                    if full {
                        tracing::warn!(
                            available = a,
                            reserve = self.reserve,
                            "disk below storage.reserve-space: refusing writes"
                        );
                    } else {
                        tracing::info!(
                            available = a,
                            reserve = self.reserve,
                            "disk above storage.reserve-space again: taking writes"
                        );
                    }
                }
                self.full = full;
                crate::metrics::DISK_AVAILABLE_BYTES.set(a.min(i64::MAX as u64) as i64);
                crate::metrics::DISK_FULL.set(full as i64);
            }
            // Keep the last verdict: a failing statvfs says nothing about space.
            Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs failed"),
        }
    }

    pub fn is_full(&self) -> bool {
        self.full
    }

    pub fn available(&self) -> u64 {
        self.available
    }

    pub fn reserve(&self) -> u64 {
        self.reserve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_above_free_space_is_full() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        assert!(!DiskMonitor::new(dir.path(), 0).is_full(), "0 turns it off");
        assert!(!DiskMonitor::new(dir.path(), 1).is_full());
        let m = DiskMonitor::new(dir.path(), u64::MAX);
        assert!(m.is_full());
        assert!(m.available() < m.reserve());
        assert!(available_bytes(&dir.path().join("missing")).is_err());
    }
}
