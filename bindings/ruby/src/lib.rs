//! Magnus glue for the `switchyard` Ruby gem: conversion plus one call into
//! the core. Ruby-side ergonomics (blocks, keyword arguments, exception
//! classes, the handler threads) live in `ruby/lib/switchyard/`.
//!
//! Thread affinity: every method defined here runs on the calling Ruby
//! thread with the GVL held. Anything that waits on the core releases the
//! GVL ([`nogvl`], with an unblock function so `Thread#kill`, `Thread#raise`
//! and signals interrupt the wait). Core work runs on one tokio runtime per
//! process; its threads never touch Ruby, and no Ruby value is ever stored in
//! a Rust structure (so nothing Ruby-owned is dropped off a Ruby thread and
//! nothing needs GC marking).

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use std::sync::{Arc, Condvar, Mutex};

use magnus::{function, prelude::*, Error, Ruby};

mod client;
mod context;
mod convert;
mod errors;
mod worker;

/// The process's tokio runtime (the core's, shared by every binding in the
/// process; a forked child gets its own).
pub(crate) fn runtime(ruby: &Ruby) -> Result<&'static tokio::runtime::Runtime, Error> {
    switchyard_core::bridge::runtime().map_err(|e| errors::base_error(ruby, e.to_string()))
}

/// Refuses an object (client, started worker) created in process `owner`
/// when used in a process forked from it: its store and runtime threads
/// exist only in `owner`.
pub(crate) fn check_owner(ruby: &Ruby, owner: u32) -> Result<(), Error> {
    if owner == std::process::id() {
        Ok(())
    } else {
        Err(errors::base_error(
            ruby,
            switchyard_core::bridge::ForkedChild { owner }.to_string(),
        ))
    }
}

struct Call<F, R> {
    f: Option<F>,
    result: Option<std::thread::Result<R>>,
}

unsafe extern "C" fn call_trampoline<F: FnOnce() -> R, R>(
    data: *mut std::ffi::c_void,
) -> *mut std::ffi::c_void {
    // SAFETY: `data` is the `Call` owned by `nogvl`'s frame, which outlives
    // this call (rb_thread_call_without_gvl returns only after it).
    let call = unsafe { &mut *(data as *mut Call<F, R>) };
    if let Some(f) = call.f.take() {
        // Unwinding into Ruby's C frames would be undefined behaviour.
        call.result = Some(catch_unwind(AssertUnwindSafe(f)));
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn ubf_trampoline<U: Fn()>(data: *mut std::ffi::c_void) {
    // SAFETY: `data` points at the unblock closure in `nogvl`'s frame; Ruby
    // calls the unblock function only while the blocking call runs.
    let u = unsafe { &*(data as *const U) };
    let _ = catch_unwind(AssertUnwindSafe(u));
}

/// Runs `f` with the GVL released; `unblock` is Ruby's unblock function:
/// Ruby calls it (from another thread) to interrupt `f` for `Thread#kill`,
/// `Thread#raise` or a signal, and `f` must then return soon. A panic in `f`
/// becomes a Ruby exception.
///
/// Thread affinity: a Ruby thread holding the GVL. `f` and `unblock` must
/// not touch Ruby.
pub(crate) fn nogvl<F, R, U>(ruby: &Ruby, f: F, unblock: U) -> Result<R, Error>
where
    F: FnOnce() -> R,
    U: Fn(),
{
    let mut call = Call {
        f: Some(f),
        result: None,
    };
    // Ruby checks for pending interrupts just before and after the blocking
    // call and may raise right there (a longjmp). `protect` stops that
    // longjmp before it crosses Rust frames and hands it back as an Error.
    let protected = magnus::rb_sys::protect(|| {
        // SAFETY: both pointers refer to locals that live until the call
        // returns; the trampolines match their types.
        unsafe {
            rb_sys::rb_thread_call_without_gvl(
                Some(call_trampoline::<F, R>),
                &mut call as *mut Call<F, R> as *mut std::ffi::c_void,
                Some(ubf_trampoline::<U>),
                &unblock as *const U as *mut std::ffi::c_void,
            );
        }
        rb_sys::Qnil as rb_sys::VALUE
    });
    match (protected, call.result) {
        (_, Some(Err(p))) => Err(errors::panic_error(ruby, p)),
        // An interrupt raised around the call wins: the thread is being
        // killed or has an exception to see (what `f` returned is dropped).
        (Err(e), _) => Err(e),
        (Ok(_), Some(Ok(r))) => Ok(r),
        // Ruby skips the call when an interrupt is already pending.
        (Ok(_), None) => {
            ruby.thread_check_ints()?;
            Err(errors::base_error(
                ruby,
                "switchyard: the blocking call was interrupted".to_string(),
            ))
        }
    }
}

/// Catches a panic in glue code running with the GVL and raises it as a
/// `Switchyard::Error` instead of Ruby's process-ending `fatal`.
pub(crate) fn guard<T>(ruby: &Ruby, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(errors::panic_error(ruby, p)),
    }
}

struct SlotState<T> {
    value: Option<T>,
    interrupted: bool,
    /// The core task ended (normally, by a panic, or aborted).
    ended: bool,
}

struct Slot<T> {
    state: Mutex<SlotState<T>>,
    cond: Condvar,
}

impl<T> Slot<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks the slot ended when the core task finishes or unwinds.
struct Ended<T>(Arc<Slot<T>>);

impl<T> Drop for Ended<T> {
    fn drop(&mut self) {
        self.0.lock().ended = true;
        self.0.cond.notify_all();
    }
}

/// Runs `fut` on the core runtime and waits for it with the GVL released.
/// The wait is interruptible: an interrupt (Ctrl-C on the main thread,
/// `Thread#kill`, `Thread#raise`) abandons the operation and raises.
pub(crate) fn block<T: Send + 'static>(
    ruby: &Ruby,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, Error> {
    let rt = runtime(ruby)?;
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState {
            value: None,
            interrupted: false,
            ended: false,
        }),
        cond: Condvar::new(),
    });
    let ended = Ended(slot.clone());
    let handle = rt.spawn(async move {
        let ended = ended;
        let v = fut.await;
        ended.0.lock().value = Some(v);
        // `ended` drops here and wakes the waiter.
    });
    loop {
        let got = nogvl(
            ruby,
            || {
                let mut st = slot.lock();
                loop {
                    if let Some(v) = st.value.take() {
                        return Some(v);
                    }
                    if st.interrupted || st.ended {
                        st.interrupted = false;
                        return None;
                    }
                    st = slot.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            },
            || {
                slot.lock().interrupted = true;
                slot.cond.notify_all();
            },
        );
        match got {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {
                if slot.lock().ended {
                    if let Some(v) = slot.lock().value.take() {
                        return Ok(v);
                    }
                    return Err(errors::base_error(
                        ruby,
                        "switchyard: the operation ended inside the core without an answer (a panic)"
                            .to_string(),
                    ));
                }
                // Woken by the unblock function: raise what is pending
                // (and abandon the operation), or keep waiting.
                if let Err(e) = ruby.thread_check_ints() {
                    handle.abort();
                    return Err(e);
                }
            }
            Err(e) => {
                handle.abort();
                return Err(e);
            }
        }
    }
}

/// Like [`block`], mapping a core error to its Ruby exception.
pub(crate) fn block_core<T: Send + 'static>(
    ruby: &Ruby,
    fut: impl Future<Output = switchyard_core::Result<T>> + Send + 'static,
) -> Result<T, Error> {
    block(ruby, fut)?.map_err(|e| errors::core_err(ruby, e))
}

/// Like [`block`] for a call of context `ctx`: a step error raises what the
/// core says ([`errors::step_err`]; durable control flow stays in `ctx`).
pub(crate) fn block_step<T: Send + 'static>(
    ruby: &Ruby,
    ctx: &switchyard_core::Context,
    fut: impl Future<Output = switchyard_core::StepResult<T>> + Send + 'static,
) -> Result<T, Error> {
    block(ruby, fut)?.map_err(|e| errors::step_err(ruby, ctx, e))
}

/// The core's fan-out plan ([`switchyard_core::bridge::fan_out`]): a Hash
/// with `steps` and `final_step` (or `complete` when there is nothing to
/// plan).
fn fan_out(
    ruby: &Ruby,
    handler: String,
    total: i64,
    batch_size: i64,
    input: magnus::Value,
    converge: String,
) -> Result<magnus::Value, Error> {
    guard(ruby, || {
        let input = convert::to_json(ruby, input, "fan_out input")?;
        let plan = switchyard_core::bridge::fan_out(&handler, total, batch_size, input, &converge)
            .map_err(|e| errors::core_err(ruby, e))?;
        convert::to_ruby(ruby, &plan)
    })
}

/// Raises a panic on purpose (tests check that a Rust panic becomes a Ruby
/// exception instead of ending the process).
fn panic_for_test(ruby: &Ruby, msg: String) -> Result<(), Error> {
    guard(ruby, || panic!("{msg}"))
}

/// Core log records (`tracing`) go to stderr, filtered by `SWITCHYARD_LOG`
/// (`warn` by default; e.g. `SWITCHYARD_LOG=switchyard_core=debug`), else,
/// once `Worker.from_config` ran, by the configured `log.level`. They
/// are written by the core's threads and never touch Ruby. Does nothing if
/// the process already has a global subscriber.
fn install_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = RELOAD_LOG.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
    }
}

/// Replaces the stderr log filter (see [`apply_log_level`]); set once this
/// library's subscriber is the process's.
type ReloadLog = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;
static RELOAD_LOG: std::sync::OnceLock<ReloadLog> = std::sync::OnceLock::new();

/// Applies the configured `log.level` (`Worker.from_config`) unless
/// `SWITCHYARD_LOG` is set (it wins); the process has one subscriber, so
/// the last configuration loaded wins. Does nothing if another subscriber
/// was installed before this library's.
pub(crate) fn apply_log_level(log: &switchyard_core::config::LogConfig) {
    let Some(reload) = RELOAD_LOG.get() else {
        return;
    };
    if let Ok(f) = tracing_subscriber::EnvFilter::try_new(log.effective_filter(&["SWITCHYARD_LOG"]))
    {
        let _ = reload(f);
    }
}

#[magnus::init(name = "switchyard_native")]
fn init(ruby: &Ruby) -> Result<(), Error> {
    install_logging();
    let m = ruby.define_module("Switchyard")?;
    errors::init(ruby, m)?;
    let native = m.define_module("Native")?;
    native.define_module_function("fan_out", function!(fan_out, 5))?;
    native.define_module_function("panic_for_test", function!(panic_for_test, 1))?;
    native.const_set("VERSION", env!("CARGO_PKG_VERSION"))?;
    worker::define(ruby, m, native)?;
    context::define(ruby, m)?;
    client::define(ruby, native)?;
    // `#[magnus::wrap]` looks its Ruby class up lazily, in a OnceLock whose
    // initialiser calls into Ruby. If that call switches Ruby threads (an
    // interrupt, a GC under GC.stress) and another thread wraps a value of
    // the same type, that thread blocks on the OnceLock while holding the
    // GVL: a deadlock (seen under GC.stress). Resolve every class now, while
    // `require` runs on one thread.
    use magnus::TypedData;
    let _ = worker::RbWorker::class(ruby);
    let _ = worker::RbJob::class(ruby);
    let _ = worker::RbConsumer::class(ruby);
    let _ = context::RbContext::class(ruby);
    let _ = client::RbClient::class(ruby);
    Ok(())
}
