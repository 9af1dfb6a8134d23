//! Crash points: the named moments, at durability boundaries, where a test kills a process.
//!
//! A durability boundary is a place where two writes whose order matters meet (an engine flush
//! and a raft-engine write, a file rename and the state that names it, ...). A crash between
//! them must leave something recovery understands. Every such place is marked with
//! [`crash_point!`]`("name")`, and `tests/crash_points.rs` finds every mark in the source tree,
//! crashes a store at each in turn under a workload that reaches it, and checks what the restart
//! recovers. A new boundary therefore gets its crash test by being marked; a mark the test
//! cannot reach fails it.
//!
//! The marks are `fail` points, compiled in only with the `failpoints` feature (the test suite
//! builds with it; a release build for production does not, and a mark costs nothing there).
//! A process arms them from its environment at start-up ([`arm_from_env`]):
//!
//! * `PRKV_CRASH_AT=<name>[@<n>]`: the `n`-th time (default the first) the process passes the
//!   mark `<name>`, it prints `crash point <name> reached` to stderr and exits at once with
//!   [`CRASH_EXIT_CODE`], running no destructor and flushing nothing: as a power cut would,
//!   but for the page cache, which a process crash never loses either.
//! * `FAILPOINTS=<name>=<action>;...`: any `fail` action (`sleep(ms)`, `pause`, `panic`, ...),
//!   as the `fail` crate's `FailScenario` reads it.

/// The exit code of a process stopped at a crash point (distinct from a panic's 101 and from
/// the 128+signal codes of a kill).
pub const CRASH_EXIT_CODE: i32 = 86;

/// Marks a durability boundary (see the module doc). The name is a string literal, unique in
/// the source tree, in `snake_case`, saying which write has happened and which has not:
/// `<feature>_<after|before>_<what>`.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name)
    };
}

/// Arms the crash point and the fail points the environment names (see the module doc). Does
/// nothing without the `failpoints` feature, except to say so when asked for one.
pub fn arm_from_env() {
    let crash_at = std::env::var("PRKV_CRASH_AT").ok();
    let failpoints = std::env::var("FAILPOINTS").ok();
    if !cfg!(feature = "failpoints") {
        if crash_at.is_some() || failpoints.is_some() {
            eprintln!(
                "PRKV_CRASH_AT / FAILPOINTS ignored: this prkv was built without the \
                 `failpoints` feature"
            );
        }
        return;
    }
    if failpoints.is_some() {
        // Read again by the scenario; it lives as long as the process.
        std::mem::forget(fail::FailScenario::setup());
    }
    if let Some(spec) = crash_at {
        let (name, nth) = match spec.split_once('@') {
            Some((name, n)) => (name, n.parse::<u64>().unwrap_or(1)),
            None => (spec.as_str(), 1),
        };
        if let Err(e) = arm(name, nth) {
            eprintln!("PRKV_CRASH_AT={spec}: {e}");
        }
    }
}

/// The crash points armed in this process (to disarm them).
static ARMED: parking_lot::Mutex<Vec<String>> = parking_lot::Mutex::new(Vec::new());

/// Arms crash point `name`: the `nth` time (1 = the next) the process passes it, it ends (see
/// the module doc). Fails without the `failpoints` feature, or for a name no mark has.
pub fn arm(name: &str, nth: u64) -> Result<(), String> {
    if !cfg!(feature = "failpoints") {
        return Err("this prkv was built without the `failpoints` feature".into());
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!("{name:?} is not a crash point name (snake_case)"));
    }
    let nth = nth.max(1);
    let seen = std::sync::atomic::AtomicU64::new(0);
    let label = name.to_owned();
    fail::cfg_callback(name, move || {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n == nth {
            crash_now(&label);
        }
    })?;
    ARMED.lock().push(name.to_owned());
    tracing::warn!(point = name, nth, "crash point armed");
    Ok(())
}

/// Disarms every crash point [`arm`] armed.
pub fn disarm_all() {
    for name in ARMED.lock().drain(..) {
        fail::remove(name);
    }
}

/// Ends the process at once (see the module doc).
pub fn crash_now(name: &str) -> ! {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "crash point {name} reached");
    // SAFETY: `_exit` takes no pointers and never returns; skipping every destructor and
    // `atexit` handler is the point.
    unsafe { libc::_exit(CRASH_EXIT_CODE) }
}
