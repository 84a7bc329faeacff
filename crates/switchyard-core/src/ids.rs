//! UUIDv7 ids without a system call per id.
//!
//! `Uuid::now_v7` asks the OS for randomness on every call, and every spawn
//! needs two ids (task and root step): at tens of thousands of spawns a
//! second that was a measurable share of the spawning side's CPU. Here the
//! random bits come from `rand`'s thread-local generator (seeded once per
//! thread from the OS and reseeded in a forked child), and ids are monotonic
//! per generator: 48-bit milliseconds, then a 42-bit counter that starts at a
//! random point each millisecond, then 32 random bits.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::{Rng, RngCore, SeedableRng};
use uuid::Uuid;

use crate::Millis;

thread_local! {
    /// Set by [`seed_thread_rng`]: replaces the OS-seeded generator on this
    /// thread (deterministic simulation only).
    static SEEDED: RefCell<Option<rand::rngs::StdRng>> = const { RefCell::new(None) };
}

/// Deterministic-simulation seam (`crates/switchyard-sim`), not an API:
/// with `Some(seed)`, the random bits of ids ([`IdGen`], [`new_v7`]) and the
/// retry jitter drawn on this thread come from a generator seeded with
/// `seed`, so a single-threaded run replays exactly; `None` restores the
/// OS-seeded thread generator.
#[doc(hidden)]
pub fn seed_thread_rng(seed: Option<u64>) {
    SEEDED.with(|s| *s.borrow_mut() = seed.map(rand::rngs::StdRng::seed_from_u64));
}

/// Runs `f` with this thread's generator: the seeded one if
/// [`seed_thread_rng`] set one, else `rand`'s thread-local generator.
pub(crate) fn with_rng<T>(f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(r) => f(r),
        None => f(&mut rand::thread_rng()),
    })
}

/// A monotonic UUIDv7 generator for callers with their own clock (the
/// memory store uses the store's clock).
#[derive(Debug, Default)]
pub struct IdGen {
    last_ms: u64,
    counter: u64,
}

impl IdGen {
    /// A generator; its first id starts a new millisecond.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next id at `now` (milliseconds since the Unix epoch). Ids from
    /// one generator increase even if `now` goes backwards.
    pub fn next(&mut self, now: Millis) -> Uuid {
        let ms = (now.max(0) as u64).min((1 << 48) - 1);
        let r: u32 = with_rng(|rng| {
            if ms > self.last_ms {
                self.last_ms = ms;
                // 41 random bits leave at least 2^41 ids of room in this millisecond.
                self.counter = rng.gen::<u64>() >> 23;
            } else {
                self.counter += 1;
            }
            rng.gen()
        });
        let c = self.counter & ((1 << 42) - 1);
        let v = (u128::from(self.last_ms) << 80)
            | (0x7 << 76)
            | (u128::from(c >> 30) << 64)
            | (0b10 << 62)
            | (u128::from(c & 0x3fff_ffff) << 32)
            | u128::from(r);
        Uuid::from_u128(v)
    }
}

thread_local! {
    static THREAD_IDS: RefCell<IdGen> = RefCell::new(IdGen::new());
}

/// A new UUIDv7 on the system clock (monotonic per thread).
pub fn new_v7() -> Uuid {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis);
    THREAD_IDS.with(|g| g.borrow_mut().next(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_7_and_increase_within_a_millisecond_and_across() {
        let mut g = IdGen::new();
        let a = g.next(1_000);
        let b = g.next(1_000);
        let c = g.next(999); // the clock went back: still increasing
        let d = g.next(1_001);
        for id in [a, b, c, d] {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        assert_eq!(a.get_timestamp().unwrap().to_unix().0, 1);
    }

    #[test]
    fn thread_ids_are_unique_across_threads() {
        let ids: Vec<Uuid> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..10_000).map(|_| new_v7()).collect::<Vec<_>>()))
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (secs, _) = ids[0].get_timestamp().unwrap().to_unix();
        assert!(now.abs_diff(secs) < 60, "ids carry the current time");
    }
}
