//! Region snapshots: how a replica that is too far behind (or new) gets a Region's data.
//!
//! ```text
//!   leader                                           follower
//!   raft asks Storage::snapshot ──▶ requested
//!   store: generate at the applied index
//!     tablet:  flush + checkpoint (hard links)  ─┐
//!     raft-kv: scan to SSTs (region worker)     ─┤   snap/gen/<key>/
//!   raft asks again ──▶ ready: MsgSnapshot ──────┴──▶ Transport::send_snapshot
//!                                                     (gRPC: files streamed, chunked,
//!                                                      CRC-checked, rate-limited)
//!                                                   snap/recv/<key>/  (staged, verified)
//!                                                   store steps MsgSnapshot; its Ready holds it:
//!                                                   1. Region state Applying (raft-engine, sync)
//!                                                   2. install: rename into tablets/ | ingest
//!                                                   3. Region state Normal (sync)
//! ```
//!
//! A snapshot is identified by its key `<region>_<term>_<index>`. The leader keeps one
//! generated snapshot per Region and reuses it for every follower that needs it while it is not
//! older than the log's truncated index. A receiver that crashes between steps 1 and 3 finishes
//! the install at restart from the staged files (see `Store::recover`). Interrupted transfers
//! leave verified files behind, which the retry skips; unfinished ones are removed at restart.

use std::path::{Path, PathBuf};

use prkv_proto::serverpb::{SnapshotFile, SnapshotMeta};

use crate::storage::RegionId;

pub const FORMAT_TABLET: u32 = 1;
/// A received snapshot untouched this long is abandoned (its sender moved on to a newer one).
pub const STALE_RECEIVED: std::time::Duration = std::time::Duration::from_secs(600);
pub const FORMAT_SST: u32 = 2;

/// The snapshot directories of one store: `<data-dir>/snap/{gen,recv}/<key>`.
#[derive(Clone, Debug)]
pub struct SnapDirs {
    root: PathBuf,
}

pub fn snapshot_key(region_id: RegionId, term: u64, index: u64) -> String {
    format!("{region_id}_{term}_{index}")
}

/// A key is three decimal numbers: anything else (a path, `..`) is refused before it names a
/// directory.
pub fn valid_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('_').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A file name inside a snapshot: a plain name, no separators, not `.` or `..`.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

impl SnapDirs {
    pub fn new(data_dir: &Path) -> SnapDirs {
        SnapDirs {
            root: data_dir.join("snap"),
        }
    }

    pub fn gen_dir(&self, key: &str) -> PathBuf {
        self.root.join("gen").join(key)
    }

    pub fn recv_dir(&self, key: &str) -> PathBuf {
        self.root.join("recv").join(key)
    }

    /// At start-up: removes every generated snapshot (they are regenerated on demand), and of
    /// the received ones the half-written files (`*.tmp`), keeping verified files of recent
    /// transfers so that the sender's retry skips them. Received snapshots older than
    /// [`STALE_RECEIVED`] (or named in `drop`) are removed whole.
    pub fn clean(&self, drop: &[String]) -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(self.root.join("gen"));
        let recv = self.root.join("recv");
        if let Ok(entries) = std::fs::read_dir(&recv) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age > STALE_RECEIVED);
                if stale || drop.contains(&name) || !valid_key(&name) {
                    std::fs::remove_dir_all(e.path())?;
                    continue;
                }
                for f in std::fs::read_dir(e.path())?.flatten() {
                    if f.file_name().to_string_lossy().ends_with(".tmp") {
                        std::fs::remove_file(f.path())?;
                    }
                }
            }
        }
        std::fs::create_dir_all(self.root.join("gen"))?;
        std::fs::create_dir_all(recv)
    }
}

impl SnapDirs {
    /// While running: removes generated snapshots that no Region holds ready any more (`live`:
    /// the keys of those that do) once they are older than `min_age`, and received ones older
    /// than `STALE_RECEIVED` (a transfer abandoned, or a snapshot Raft did not take). Without
    /// this, every rejected or superseded snapshot stayed until a restart: a full copy of a
    /// Region (`raft-kv`), or hard links pinning SSTs compactions had replaced (partitioned).
    /// Returns how many directories went.
    pub fn sweep(
        &self,
        live: &std::collections::HashSet<String>,
        min_age: std::time::Duration,
        stale_received: std::time::Duration,
    ) -> usize {
        let older = |e: &std::fs::DirEntry, age: std::time::Duration| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|a| a >= age)
        };
        let mut removed = 0;
        for (sub, keep_live, age) in [("gen", true, min_age), ("recv", false, stale_received)] {
            let Ok(entries) = std::fs::read_dir(self.root.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if (keep_live && live.contains(&name)) || !older(&e, age) {
                    continue;
                }
                if std::fs::remove_dir_all(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// The regular files of `dir`, sorted by name, with their sizes.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<SnapshotFile>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let md = e.metadata()?;
        if md.is_file() {
            files.push(SnapshotFile {
                name: e.file_name().to_string_lossy().into_owned(),
                size: md.len(),
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Makes sure every file of `meta` is in this store's receive directory for it, with the right
/// size, linking (or copying) from `meta.dir` what is missing, and points `meta.dir` there. A
/// gRPC transfer already wrote the files there; a simulated network hands over the sender's own
/// directory, which the sender may delete at any time, so the receiver takes its own links.
pub fn stage(dirs: &SnapDirs, meta: &mut SnapshotMeta) -> Result<(), String> {
    if !valid_key(&meta.key) {
        return Err(format!("bad snapshot key {:?}", meta.key));
    }
    let target = dirs.recv_dir(&meta.key);
    let from = PathBuf::from(&meta.dir);
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    for f in &meta.files {
        if !valid_file_name(&f.name) {
            return Err(format!("bad snapshot file name {:?}", f.name));
        }
        let dst = target.join(&f.name);
        let have = std::fs::metadata(&dst).map(|m| m.len()).ok();
        if have == Some(f.size) {
            continue;
        }
        if from == target {
            return Err(format!(
                "snapshot {}: file {} is missing or has the wrong size",
                meta.key, f.name
            ));
        }
        let src = from.join(&f.name);
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|e| format!("{}: {e}", src.display()))?;
        }
        let size = std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(u64::MAX);
        if size != f.size {
            return Err(format!(
                "snapshot {}: file {} has {size} bytes, expected {}",
                meta.key, f.name, f.size
            ));
        }
    }
    meta.dir = target.to_string_lossy().into_owned();
    Ok(())
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    /// Generated snapshots no Region holds go; held ones stay; received ones go once stale.
    #[test]
    fn sweep_removes_what_nobody_holds() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = SnapDirs::new(dir.path());
        for d in [
            dirs.gen_dir("1_5_10"),
            dirs.gen_dir("2_5_10"),
            dirs.recv_dir("3_5_10"),
        ] {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("CURRENT"), b"x").unwrap();
        }
        let live: std::collections::HashSet<String> = ["1_5_10".to_string()].into();
        let zero = std::time::Duration::ZERO;
        let hour = std::time::Duration::from_secs(3600);
        // Young: nothing goes.
        assert_eq!(dirs.sweep(&live, hour, hour), 0);
        assert_eq!(dirs.sweep(&live, zero, hour), 1);
        assert!(dirs.gen_dir("1_5_10").exists() && !dirs.gen_dir("2_5_10").exists());
        assert!(dirs.recv_dir("3_5_10").exists());
        assert_eq!(dirs.sweep(&live, zero, zero), 1);
        assert!(!dirs.recv_dir("3_5_10").exists());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names_cannot_escape_the_snapshot_directory() {
        assert!(valid_key(&snapshot_key(7, 6, 1200)));
        for bad in [
            "", "7_6", "../7_6_1", "7_6_1/..", "7_x_1", "7__1", "1_2_3_4",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
        assert!(valid_file_name("000012.sst"));
        assert!(valid_file_name("MANIFEST-000005"));
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(!valid_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn staging_links_files_and_checks_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = SnapDirs::new(tmp.path());
        dirs.clean(&[]).unwrap();
        let key = snapshot_key(3, 5, 40);
        let src = dirs.gen_dir(&key);
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a.sst"), b"hello").unwrap();
        let mut meta = SnapshotMeta {
            key: key.clone(),
            files: list_files(&src).unwrap(),
            dir: src.to_string_lossy().into_owned(),
            ..Default::default()
        };
        stage(&dirs, &mut meta).unwrap();
        assert_eq!(PathBuf::from(&meta.dir), dirs.recv_dir(&key));
        assert_eq!(
            std::fs::read(dirs.recv_dir(&key).join("a.sst")).unwrap(),
            b"hello"
        );
        // Staging again is a no-op; a file with the wrong size is refused.
        stage(&dirs, &mut meta).unwrap();
        meta.files[0].size = 99;
        assert!(stage(&dirs, &mut meta).is_err());
        // Cleaning keeps verified files of a recent transfer, drops half-written ones, and
        // drops whole snapshots when asked.
        std::fs::write(dirs.recv_dir(&key).join("b.sst.tmp"), b"half").unwrap();
        dirs.clean(&[]).unwrap();
        assert!(dirs.recv_dir(&key).join("a.sst").exists());
        assert!(!dirs.recv_dir(&key).join("b.sst.tmp").exists());
        dirs.clean(std::slice::from_ref(&key)).unwrap();
        assert!(!dirs.recv_dir(&key).exists());
    }
}
