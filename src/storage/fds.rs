//! File descriptors: the store's budget, and running short of them as back-pressure.
//!
//! Every open tablet holds descriptors (its `LOCK`, `MANIFEST`, WAL file and directory, and up
//! to `rocksdb.max-open-files - 10` SST readers), and so do raft-engine's log files, the
//! sockets of clients and peers, and snapshots in transfer. The process may hold
//! `RLIMIT_NOFILE` of them; past it, every `open` fails with `EMFILE`, inside RocksDB (a flush
//! or compaction that cannot create its output poisons the tablet), inside raft-engine (which
//! panics if it cannot sync its directory) and in our own code. A store that hit it used to
//! exit, taking its leaders with it.
//!
//! So the budget is derived from the real limit at start ([`FdBudget::from_limit`]): a
//! reserve for everything that is not a tablet, and of the rest, room for
//! [`FdBudget::tablet_cap`] open tablets. The parker (`storage::park`) keeps the open tablets
//! under that cap, and also counts the descriptors actually open (`/proc/self/fd`) and parks
//! more when they eat into the reserve. Should `EMFILE` or `ENFILE` happen anyway (another
//! process took the system's last ones, a burst outran the parker), the operation that met
//! it waits for the parker and tries again ([`retry_while_exhausted`]): the store slows down
//! (its inbox fills, clients hear `ServerIsBusy`), it never exits for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Descriptors a tablet holds besides its SST readers: `LOCK`, `MANIFEST`, the WAL file (one
/// stays open though writes skip it), the directory, and the files a flush or compaction
/// creates while it runs.
const PER_TABLET_BESIDES_SSTS: u64 = 10;
/// Descriptors kept for what is not a tablet, besides sockets: raft-engine's files (one per
/// log file, each a `target-file-size`, up to the purge threshold, plus rotation), snapshots in
/// transfer (a file each, and checkpoints), PD's and the status port's sockets, logs.
const RESERVE_BASE: u64 = 192;
/// The fewest tablets a store keeps open whatever its limit: fewer would thrash.
const MIN_OPEN_TABLETS: usize = 8;

/// Set while some operation is waiting for descriptors: the parker parks at once, and more.
static PRESSURE: AtomicBool = AtomicBool::new(false);
/// Set by the parker while the descriptors open eat into the reserve: writes that cannot be
/// repeated after a failure (raft-engine's) keep a copy to repeat while this holds.
static NEAR_LIMIT: AtomicBool = AtomicBool::new(false);
/// Operations that met `EMFILE`/`ENFILE` and waited (`prkv_fd_exhausted_total`).
pub static EXHAUSTED: AtomicU64 = AtomicU64::new(0);

/// How the store spends `RLIMIT_NOFILE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft limit, after raising it to the hard one.
    pub limit: u64,
    /// Kept for what is not a tablet.
    pub reserve: u64,
    /// What one open tablet may hold at most.
    pub per_tablet: u64,
}

impl FdBudget {
    /// The budget for a process allowed `limit` descriptors, whose tablets may each keep
    /// `max_open_files - 10` SST readers (RocksDB's table cache: see `db_options`).
    pub fn from_limit(limit: u64, max_open_files: i32) -> FdBudget {
        // Sockets: a tenth of the limit, at least 128 (clients, peers, PD).
        let sockets = (limit / 10).max(128);
        let ssts = if max_open_files < 0 {
            // Unlimited readers: count a generous number; `max-open-files = -1` is a choice
            // for few, large tablets.
            256
        } else {
            (max_open_files as u64).saturating_sub(10)
        };
        FdBudget {
            limit,
            reserve: RESERVE_BASE + sockets,
            per_tablet: PER_TABLET_BESIDES_SSTS + ssts,
        }
    }

    /// How many tablets may be open at once: what the budget allows, or `configured`
    /// (`rocksdb.max-open-tablets`, 0 = no cap of its own) if lower.
    pub fn tablet_cap(&self, configured: usize) -> usize {
        let room = self.limit.saturating_sub(self.reserve) / self.per_tablet.max(1);
        let fits = (room as usize).max(MIN_OPEN_TABLETS);
        if configured == 0 {
            fits
        } else {
            configured.min(fits)
        }
    }

    /// Tablets to park beyond the cap because `open_fds` descriptors are open now: those past
    /// the limit less half the reserve (sockets and raft-engine must always find one).
    pub fn tablets_over(&self, open_fds: u64) -> usize {
        let high = self.limit.saturating_sub(self.reserve / 2);
        if open_fds <= high {
            0
        } else {
            (open_fds - high).div_ceil(self.per_tablet.max(1)) as usize + 1
        }
    }
}

/// The process's soft `RLIMIT_NOFILE`, raised to the hard limit first: thousands of tablets
/// need thousands of descriptors, and the soft default (often 1024) is an accident of history,
/// not a budget.
pub fn raise_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            } else {
                tracing::warn!("could not raise RLIMIT_NOFILE");
            }
        }
    }
    lim.rlim_cur
}

/// Descriptors this process holds now (entries of `/proc/self/fd`), if that can be read.
pub fn open_fds() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    // The directory being read holds one itself.
    Some((dir.count() as u64).saturating_sub(1))
}

/// Whether an I/O error is running out of descriptors (the process's or the system's).
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The same, for an error known only by its message (RocksDB's, raft-engine's).
pub fn message_is_exhaustion(msg: &str) -> bool {
    msg.contains("Too many open files")
}

/// Whether some operation waits for descriptors now (the parker then parks harder).
pub fn under_pressure() -> bool {
    PRESSURE.load(Ordering::Relaxed)
}

/// Whether the descriptors open now eat into the reserve (see [`NEAR_LIMIT`]).
pub fn near_limit() -> bool {
    NEAR_LIMIT.load(Ordering::Relaxed) || under_pressure()
}

/// Recorded by the parker each round.
pub fn set_near_limit(near: bool) {
    NEAR_LIMIT.store(near, Ordering::Relaxed);
}

/// Runs `op` until it succeeds or fails for another reason than running out of descriptors.
/// Meanwhile the parker is told (`wake`), and each retry waits a little longer (up to 1 s):
/// the caller's thread is held, which is the back-pressure. `is_exhaustion` classifies `op`'s
/// error.
pub fn retry_while_exhausted<T, E: std::fmt::Display>(
    what: &str,
    wake: &dyn Fn(),
    is_exhaustion: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(10);
    let mut last_warned: Option<Instant> = None;
    loop {
        match op() {
            Err(e) if is_exhaustion(&e) => {
                PRESSURE.store(true, Ordering::Relaxed);
                EXHAUSTED.fetch_add(1, Ordering::Relaxed);
                if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        what,
                        error = %e,
                        waited = ?started.elapsed(),
                        open_fds = open_fds(),
                        "out of file descriptors: parking tablets and trying again"
                    );
                    last_warned = Some(Instant::now());
                }
                wake();
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            other => {
                if last_warned.is_some() {
                    PRESSURE.store(false, Ordering::Relaxed);
                    tracing::info!(what, waited = ?started.elapsed(), "file descriptors found again");
                }
                return other;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_from_the_limit() {
        // The limit of the incident: 20,000 descriptors, 20 per tablet's readers.
        let b = FdBudget::from_limit(20_000, 20);
        assert_eq!(b.per_tablet, 20);
        assert_eq!(b.reserve, 192 + 2_000);
        assert_eq!(b.tablet_cap(1000), 890);
        assert_eq!(b.tablet_cap(0), 890);
        assert_eq!(b.tablet_cap(100), 100);
        // A low `ulimit -n`: few tablets, never fewer than the floor.
        let small = FdBudget::from_limit(1024, 20);
        assert_eq!(small.tablet_cap(1000), (1024 - 320) / 20);
        assert_eq!(
            FdBudget::from_limit(256, 20).tablet_cap(1000),
            MIN_OPEN_TABLETS
        );
        // Parking for descriptors starts past the limit less half the reserve.
        assert_eq!(small.tablets_over(800), 0);
        assert_eq!(small.tablets_over(864), 0);
        assert_eq!(small.tablets_over(865), 2);
        assert_eq!(small.tablets_over(1024), 9);
    }

    #[test]
    fn exhaustion_is_recognised_and_waited_out() {
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ENOENT
        )));
        assert!(message_is_exhaustion(
            "IO error: While open a file for random read: /x/000012.sst: Too many open files"
        ));
        let mut failures = 3;
        let woken = std::sync::atomic::AtomicUsize::new(0);
        let r: Result<u32, std::io::Error> = retry_while_exhausted(
            "test",
            &|| {
                woken.fetch_add(1, Ordering::Relaxed);
            },
            is_exhaustion,
            || {
                if failures > 0 {
                    failures -= 1;
                    Err(std::io::Error::from_raw_os_error(libc::EMFILE))
                } else {
                    Ok(7)
                }
            },
        );
        assert_eq!(r.unwrap(), 7);
        assert_eq!(woken.load(Ordering::Relaxed), 3);
        // Another error is returned at once.
        let r: Result<u32, std::io::Error> =
            retry_while_exhausted("test", &|| {}, is_exhaustion, || {
                Err(std::io::Error::from_raw_os_error(libc::ENOENT))
            });
        assert!(r.is_err());
    }
}
