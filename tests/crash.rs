//! Crash consistency of the engines: a child process writes apply batches to 50 Regions and is
//! killed with SIGKILL at a random moment, 20 times per engine kind. After each kill, every
//! Region must hold exactly the batches `1..=applied_index` of the apply state it holds: never
//! a partial batch, never an index ahead of (or behind) its data.
//!
//! Batch contents are a pure function of `(region, index)`, so the expected state is recomputed
//! by replaying `1..=applied_index`.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

use prkv::config::EngineKind;
use prkv::storage::{Cf, Engines, KeyRange, RegionEngine, ScanDir, WriteBatch};
use prkv_proto::serverpb::RaftApplyState;
use rand::{Rng, SeedableRng};

const REGIONS: u64 = 50;
const ROUNDS: usize = 20;

/// Each Region owns the keys prefixed by its id.
fn range(region: u64) -> KeyRange {
    KeyRange::new(
        region.to_be_bytes().to_vec(),
        (region + 1).to_be_bytes().to_vec(),
    )
}

fn key(region: u64, suffix: &str) -> Vec<u8> {
    let mut k = region.to_be_bytes().to_vec();
    k.extend_from_slice(suffix.as_bytes());
    k
}

/// The batch that applies log entry `index` of `region`: several column families, overwrites,
/// deletes, and a value large enough that batches span memtable boundaries.
fn batch(region: u64, index: u64) -> WriteBatch {
    let mut wb = WriteBatch::new();
    let value = format!("{region}-{index}-").repeat(1 + (index % 7) as usize * 40);
    wb.put(
        Cf::Default,
        &key(region, &format!("k{}", index % 37)),
        value.as_bytes(),
    );
    if index.is_multiple_of(5) {
        wb.delete(Cf::Default, &key(region, &format!("k{}", (index * 7) % 37)));
    }
    wb.put(
        Cf::Write,
        &key(region, &format!("w{index:08}")),
        &index.to_be_bytes(),
    );
    wb.put(Cf::Lock, &key(region, "lock"), &index.to_be_bytes());
    wb.set_apply_state(RaftApplyState {
        applied_index: index,
        ..Default::default()
    });
    wb
}

type State = BTreeMap<(&'static str, Vec<u8>), Vec<u8>>;

fn expected(region: u64, applied: u64) -> State {
    let mut s = State::new();
    for index in 1..=applied {
        let value = format!("{region}-{index}-").repeat(1 + (index % 7) as usize * 40);
        s.insert(
            ("default", key(region, &format!("k{}", index % 37))),
            value.into_bytes(),
        );
        if index.is_multiple_of(5) {
            s.remove(&("default", key(region, &format!("k{}", (index * 7) % 37))));
        }
        s.insert(
            ("write", key(region, &format!("w{index:08}"))),
            index.to_be_bytes().to_vec(),
        );
        s.insert(("lock", key(region, "lock")), index.to_be_bytes().to_vec());
    }
    s
}

fn actual(r: &dyn RegionEngine) -> State {
    let mut s = State::new();
    for cf in Cf::ALL {
        r.scan(cf, b"", b"", ScanDir::Forward, &mut |k, v| {
            s.insert((cf.name(), k.to_vec()), v.to_vec());
            true
        })
        .unwrap();
    }
    s
}

fn kind_from_env() -> EngineKind {
    std::env::var("PRKV_CRASH_KIND").unwrap().parse().unwrap()
}

/// With `park`, at most 8 of the 50 tablets stay open and any unused for 1 ms parks: the
/// writer keeps parking and reopening tablets (each park a flush, a close and a `PARKED`
/// record) when the kill comes.
fn config(dir: &std::path::Path, kind: EngineKind, park: bool) -> prkv::config::Config {
    let mut c = common::test_config(dir, kind);
    if park {
        c.rocksdb.max_open_tablets = 8;
        c.rocksdb.tablet_idle_timeout = prkv::config::ReadableDuration::millis(1);
    }
    c
}

/// The child: continues every Region from its recovered apply index until killed.
#[test]
#[ignore = "child process of crash_*; run by the parent test"]
fn crash_child_process() {
    let dir = std::path::PathBuf::from(std::env::var("PRKV_CRASH_DIR").unwrap());
    let seed: u64 = std::env::var("PRKV_CRASH_SEED").unwrap().parse().unwrap();
    let park = std::env::var("PRKV_CRASH_PARK").is_ok_and(|v| v == "1");
    let engines = Engines::open(&config(&dir, kind_from_env(), park)).unwrap();
    let regions: Vec<_> = (1..=REGIONS)
        .map(|r| engines.kv.open_region(r, range(r), 0).unwrap())
        .collect();
    let mut next: Vec<u64> = regions
        .iter()
        .map(|r| r.apply_state().unwrap().map_or(0, |s| s.applied_index) + 1)
        .collect();
    println!("ready");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        let i = rng.gen_range(0..regions.len());
        let region = regions[i].region_id();
        regions[i].write(&batch(region, next[i])).unwrap();
        next[i] += 1;
        // Flush now and then, so that each Region's durable point differs.
        if rng.gen_ratio(1, 40) {
            regions[rng.gen_range(0..regions.len())]
                .flush(rng.gen_bool(0.5))
                .unwrap();
        }
    }
}

fn crash_rounds(kind: EngineKind, park: bool) {
    let dir = tempfile::tempdir().unwrap();
    let base_seed: u64 = std::env::var("PRKV_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test {kind}: seed {base_seed} (set PRKV_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(base_seed);
    let mut total_applied = 0;
    let mut found_parked = 0;
    for round in 0..ROUNDS {
        let envs = [
            ("PRKV_CRASH_DIR", dir.path().display().to_string()),
            ("PRKV_CRASH_KIND", kind.to_string()),
            ("PRKV_CRASH_SEED", (base_seed + round as u64).to_string()),
            ("PRKV_CRASH_PARK", u8::from(park).to_string()),
        ];
        let mut child = common::spawn_child("crash_child_process", &envs, None);
        let mut out = common::child_stdout(&mut child);
        common::wait_for_line(&mut out, "ready");
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        drop(out.lines());

        let engines = Engines::open(&config(dir.path(), kind, park)).unwrap();
        total_applied = 0;
        for region in 1..=REGIONS {
            let r = engines.kv.open_region(region, range(region), 0).unwrap();
            let parked = r.is_parked();
            found_parked += usize::from(parked);
            // A parked tablet's apply state comes from its PARKED record: it must be the one
            // the files hold once opened.
            let recorded = r.apply_state().unwrap();
            let got = actual(r.as_ref());
            // Read from the files: opened by the scan (it may have parked again since, with a
            // record written from the open files).
            let on_disk = r.apply_state().unwrap();
            assert_eq!(
                recorded, on_disk,
                "round {round} (seed {base_seed}): Region {region} (parked: {parked}): its \
                 record disagrees with its files"
            );
            let applied = on_disk.map_or(0, |s| s.applied_index);
            total_applied += applied;
            let want = expected(region, applied);
            assert!(
                got == want,
                "{kind} round {round} (seed {base_seed}): Region {region} at apply index {applied} \
                 holds {} entries, expected {}: data and apply state disagree",
                got.len(),
                want.len()
            );
        }
    }
    assert!(
        total_applied > 0,
        "the children never made anything durable"
    );
    println!("{found_parked} Regions found parked after a kill");
    if park {
        assert!(
            found_parked > 0,
            "no tablet was ever parked at a kill: the test tests nothing"
        );
    }
}

#[test]
fn crash_partitioned_raft_kv() {
    crash_rounds(EngineKind::PartitionedRaftKv, false);
}

/// Kills while tablets park and reopen: a `PARKED` record must never outlive the state it
/// describes.
#[test]
fn crash_partitioned_raft_kv_parking() {
    crash_rounds(EngineKind::PartitionedRaftKv, true);
}

#[test]
fn crash_raft_kv() {
    crash_rounds(EngineKind::RaftKv, false);
}
