//! Clocks: the system clock, and a fake clock tests can advance.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::Millis;

/// The time source of a store. Every durable time (run_at, leases, sleeps,
/// await timeouts) is read from it, never from the host.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
    /// True for the machine's wall clock: a shared-database store then uses
    /// the database server's clock instead, so hosts on different machines
    /// agree. Test clocks return false and are used as they are.
    fn is_wall_clock(&self) -> bool {
        false
    }
}

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
    fn is_wall_clock(&self) -> bool {
        true
    }
}

/// A clock that only moves when told to: tests advance it past a sleep
/// instead of sleeping. After moving it, call
/// [`crate::Signals::notify_ready`] on the store so idle hosts re-check.
#[derive(Debug)]
pub struct FakeClock(AtomicI64);

impl FakeClock {
    /// A fake clock starting at the current wall-clock time.
    pub fn new() -> Self {
        Self(AtomicI64::new(SystemClock.now()))
    }
    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    /// Sets the clock.
    pub fn set(&self, at: Millis) {
        self.0.store(at, Ordering::SeqCst);
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}
