//! The process-wide tokio runtime of the bindings, fork-aware.

use std::sync::atomic::Ordering;

/// The process-wide tokio runtime of the language bindings (Python, Ruby,
/// C): created on first use and never shut down (workers and clients come
/// and go; creating and dropping a runtime per worker once made a probe
/// hang).
///
/// A forked child gets a runtime of its own on first use: the parent's
/// threads do not exist in the child, so the parent's runtime is left
/// untouched there (leaked, never dropped: dropping it would wait for
/// threads that are gone). Objects created in the parent (clients, workers,
/// stores) still belong to the parent's runtime and threads; the bindings
/// refuse them in a child with [`ForkedChild`]. Never fails today; the
/// `Result` is kept for the bindings' signatures.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime, ForkedChild> {
    let pid = std::process::id();
    let cur = RUNTIME.load(Ordering::Acquire);
    // SAFETY: a non-null pointer comes from `Box::into_raw` below and is never
    // freed.
    if let Some(owned) = unsafe { cur.as_ref() } {
        if owned.0 == pid {
            return Ok(&owned.1);
        }
    }
    // None yet, or the one of the process we were forked from. No lock: a
    // lock held by another thread of the parent at fork would stay held in
    // the child forever.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("switchyard-core")
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let mine = Box::into_raw(Box::new((pid, rt)));
    match RUNTIME.compare_exchange(cur, mine, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just leaked; the previous record (the parent's) stays
        // allocated and untouched.
        Ok(_) => Ok(unsafe { &(*mine).1 }),
        Err(winner) => {
            // Another thread of this process got there first: use its
            // runtime and stop ours (it never ran anything).
            // SAFETY: `mine` was never published; `winner` is a leaked record.
            let (_, rt) = *unsafe { Box::from_raw(mine) };
            rt.shutdown_background();
            Ok(unsafe { &(*winner).1 })
        }
    }
}

/// The process that started the [`runtime`] in use, once one was started
/// (the parent's pid in a forked child that has not called [`runtime`]).
pub fn runtime_owner() -> Option<u32> {
    // SAFETY: as in `runtime`.
    unsafe { RUNTIME.load(Ordering::Acquire).as_ref() }.map(|owned| owned.0)
}

/// The current process's runtime and its pid, leaked (see [`runtime`]).
static RUNTIME: std::sync::atomic::AtomicPtr<(u32, tokio::runtime::Runtime)> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// An object created in one process (a client, worker or store, which
/// belong to that process's [`runtime`] and threads) was used in a process
/// forked from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this switchyard object was created in process {owner} and cannot be used in a forked \
     child ({}); create workers and clients after fork (in the child)",
    std::process::id()
)]
pub struct ForkedChild {
    /// The process the object was created in.
    pub owner: u32,
}
