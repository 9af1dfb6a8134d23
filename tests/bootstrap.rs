//! The engine kind is fixed at bootstrap: opening a data dir with the other kind fails with an
//! error naming `storage.engine` and both kinds, and changes no file.

mod common;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::Path;

use prkv::config::EngineKind;
use prkv::storage::{Cf, Engines, KeyRange, WriteBatch};

/// Path, size, content and modification time of every file under `dir`.
fn checksum(dir: &Path) -> BTreeMap<String, (u64, u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
                out.insert(
                    e.path().display().to_string(),
                    (0, 0, meta.modified().unwrap()),
                );
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                out.insert(
                    e.path().display().to_string(),
                    (meta.len(), h.finish(), meta.modified().unwrap()),
                );
            }
        }
    }
    out
}

#[test]
fn engine_kind_mismatch_is_refused_without_touching_files() {
    for (written, other) in [
        (EngineKind::PartitionedRaftKv, EngineKind::RaftKv),
        (EngineKind::RaftKv, EngineKind::PartitionedRaftKv),
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let engines = Engines::open(&common::test_config(dir.path(), written)).unwrap();
            let r = engines.kv.open_region(1, KeyRange::all(), 0).unwrap();
            let mut wb = WriteBatch::new();
            wb.put(Cf::Default, b"k", b"v");
            r.write(&wb).unwrap();
        }
        let before = checksum(dir.path());
        let err = match Engines::open(&common::test_config(dir.path(), other)) {
            Ok(_) => panic!("opening a {written} data dir as {other} succeeded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("storage.engine"), "{err}");
        assert!(
            err.contains(written.as_str()) && err.contains(other.as_str()),
            "{err}"
        );
        assert_eq!(
            before,
            checksum(dir.path()),
            "the refused open changed the data dir"
        );
        // The right kind still opens and sees the data.
        let engines = Engines::open(&common::test_config(dir.path(), written)).unwrap();
        let r = engines.kv.open_region(1, KeyRange::all(), 0).unwrap();
        assert_eq!(
            r.get(Cf::Default, b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
}

#[test]
fn data_dir_without_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tablets/1_0")).unwrap();
    let err = Engines::open(&common::test_config(
        dir.path(),
        EngineKind::PartitionedRaftKv,
    ))
    .err()
    .unwrap();
    assert!(err.to_string().contains("store.toml"), "{err}");
    assert!(!dir.path().join("store.toml").exists());
}
