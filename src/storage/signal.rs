//! A wake-up for a background thread that otherwise works in rounds.
//!
//! The thread waits up to its round's length; a caller that has work for it sooner calls
//! [`Signal::wake`]. A wake-up that comes while the thread is busy is remembered (not lost), and
//! many wake-ups before the next wait count as one.

use std::time::Duration;

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
pub(crate) struct Signal {
    pending: Mutex<bool>,
    wake: Condvar,
}

impl Signal {
    /// Ends the waiter's current wait, or its next one.
    pub(crate) fn wake(&self) {
        let mut p = self.pending.lock();
        if !*p {
            *p = true;
            self.wake.notify_all();
        }
    }

    /// Waits for a wake-up or `timeout`, whichever comes first, and consumes the wake-up.
    pub(crate) fn wait(&self, timeout: Duration) {
        let mut p = self.pending.lock();
        if !*p {
            self.wake.wait_for(&mut p, timeout);
        }
        *p = false;
    }
}
