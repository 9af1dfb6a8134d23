//! The timestamp oracle: strictly increasing hybrid timestamps, also across restarts.
//!
//! A timestamp is `physical << 18 | logical`: wall-clock milliseconds and a counter within the
//! millisecond. PD hands out timestamps only below a persisted high-water mark (a physical time
//! [`SAVE_WINDOW_MS`] ahead of the clock, saved before it is used). After a restart, physical
//! time starts above the saved mark, so every new timestamp is above every old one even if
//! the clock went backwards or the process was killed mid-window.
//!
//! A request for `count` timestamps is answered with the **last** of them; the client derives
//! the others (`logical - count + 1 ..= logical`), as TiKV's PD does.

use std::time::{SystemTime, UNIX_EPOCH};

use super::meta::{MetaStore, Result};

pub const LOGICAL_BITS: u32 = 18;
/// Logical values per millisecond.
pub const MAX_LOGICAL: u64 = 1 << LOGICAL_BITS;
/// How far ahead of the clock the saved high-water mark runs: one sync write per 3 s of
/// timestamps at most, and a restart skips at most 3 s of time.
pub const SAVE_WINDOW_MS: u64 = 3_000;

/// The oracle's state; callers serialise access (PD holds it under a mutex).
pub struct Tso {
    physical: u64,
    logical: u64,
    /// Persisted: no timestamp at or above this physical time has been handed out.
    saved_until: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Tso {
    /// Resumes above everything handed out before the restart.
    pub fn recover(meta: &MetaStore) -> Result<Tso> {
        let saved = meta.tso_high_water()?;
        let physical = now_ms().max(saved + 1);
        let saved_until = physical + SAVE_WINDOW_MS;
        meta.set_tso_high_water(saved_until)?;
        Ok(Tso {
            physical,
            logical: 0,
            saved_until,
        })
    }

    /// Allocates `count` timestamps (1 ..= MAX_LOGICAL - 1) and returns `(physical, logical)`
    /// of the last one.
    pub fn allocate(&mut self, count: u32, meta: &MetaStore) -> Result<(u64, u64)> {
        let count = u64::from(count.max(1)).min(MAX_LOGICAL - 1);
        let now = now_ms();
        if now > self.physical {
            self.physical = now;
            self.logical = 0;
        }
        if self.logical + count >= MAX_LOGICAL {
            // This millisecond is used up: borrow the next one.
            self.physical += 1;
            self.logical = 0;
        }
        if self.physical >= self.saved_until {
            let until = self.physical + SAVE_WINDOW_MS;
            meta.set_tso_high_water(until)?;
            self.saved_until = until;
        }
        self.logical += count;
        debug_assert!(self.logical < MAX_LOGICAL);
        Ok((self.physical, self.logical))
    }
}

/// The 64-bit form clients compare: `physical << 18 | logical`.
pub fn compose(physical: u64, logical: u64) -> u64 {
    (physical << LOGICAL_BITS) | logical
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        let mut tso = Tso::recover(&meta).unwrap();
        let mut last = 0;
        for i in 0..20_000u32 {
            let (p, l) = tso.allocate(1 + i % 7, &meta).unwrap();
            let ts = compose(p, l);
            assert!(ts > last, "{ts} after {last}");
            last = ts;
        }
        let mut tso = Tso::recover(&meta).unwrap();
        let (p, l) = tso.allocate(1, &meta).unwrap();
        assert!(compose(p, l) > last);
        // Everything before the restart was below the saved mark, so the first physical
        // time after it is above the old one.
        assert!(p > last >> LOGICAL_BITS);
    }

    #[test]
    fn a_full_millisecond_moves_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        let mut tso = Tso::recover(&meta).unwrap();
        let (p1, _) = tso.allocate((MAX_LOGICAL - 1) as u32, &meta).unwrap();
        let (p2, l2) = tso.allocate((MAX_LOGICAL - 1) as u32, &meta).unwrap();
        assert!(p2 > p1);
        assert_eq!(l2, MAX_LOGICAL - 1);
    }
}
