//! The store clock of a simulated run: tokio's (paused) clock, relative to a
//! fixed epoch, plus the clock jumps the fault injector makes.

use std::sync::atomic::{AtomicI64, Ordering};

use switchyard_core::{Clock, Millis};

/// 2023-11-14T22:13:20Z: every run starts at the same store time.
pub const EPOCH_MS: Millis = 1_700_000_000_000;

/// Reads `tokio::time::Instant` (paused, auto-advancing) as milliseconds
/// since [`EPOCH_MS`]; [`SimClock::jump`] moves it forward for good.
#[derive(Debug)]
pub struct SimClock {
    base: tokio::time::Instant,
    offset: AtomicI64,
}

impl SimClock {
    /// A clock reading [`EPOCH_MS`] now. Call inside the run's runtime.
    pub fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
            offset: AtomicI64::new(0),
        }
    }
    /// Jumps the store clock by `ms` (an NTP step, a VM resumed).
    pub fn jump(&self, ms: Millis) {
        self.offset.fetch_add(ms, Ordering::SeqCst);
    }
    /// Virtual milliseconds since the run started (without jumps), for traces.
    pub fn elapsed_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }
}

impl Default for SimClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SimClock {
    fn now(&self) -> Millis {
        EPOCH_MS + self.base.elapsed().as_millis() as Millis + self.offset.load(Ordering::SeqCst)
    }
}
