//! Workers whose handlers are C callbacks, and asynchronous completion.
//!
//! The dispatcher pushes jobs into the worker's [`Inbox`]; `concurrency`
//! library-owned threads take them one at a time and call the callback at
//! the job's `handler_id`. A callback's status and output become the core's
//! [`Reply`] in one place, [`outcome`], for synchronous returns, batch items
//! and completions alike: the status names the error class.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use switchyard_core::bridge::{
    ErrorClass, HandlerSpec, Host, HostPlan, Inbox, Job, JobKind, Reply,
};
use switchyard_core::{Context, DynStore};

use crate::ctx::sy_ctx;
use crate::*;

/// A step, decision or API callback. `input` is the step's JSON input
/// (NUL-terminated, `input_len` bytes without the NUL), valid during the
/// call. Return `SY_OK` after `sy_ctx_set_output` with the JSON result (no
/// output means `null`; for a decision, the decision document), or
/// `SY_ERROR_RETRYABLE` / `SY_ERROR_PERMANENT` with the output as the error
/// message, or pass on the status of a context call that failed (e.g.
/// `SY_SUSPENDED`: the step parks; `SY_AWAIT_TIMEOUT`: it fails for good;
/// without an output the message is the call's), or `SY_PENDING` after
/// `sy_ctx_defer`. `SY_INVALID_ARGUMENT` fails the step for good too; any
/// other value is a retryable failure.
///
/// Thread affinity: runs on a thread owned by the library, possibly many at
/// once (up to the handler's concurrency) with the same `user_data`.
pub type sy_step_fn = Option<
    unsafe extern "C" fn(
        input: *const c_char,
        input_len: usize,
        ctx: *mut sy_ctx,
        user_data: *mut c_void,
    ) -> i32,
>;

/// One step of a batch: its JSON input (NUL-terminated) and its context.
#[repr(C)]
pub struct sy_item {
    /// The step's JSON input, valid during the call.
    pub input: *const c_char,
    /// Its length without the NUL.
    pub input_len: usize,
    /// The step's context: set its result with `sy_ctx_set_output` or fail
    /// it alone with `sy_ctx_fail`.
    pub ctx: *mut sy_ctx,
}

/// A batch callback: `count` steps at once (up to the handler's
/// `max_batch`). Give each item its outcome on its own context; return
/// `SY_OK`. Any other return fails every item that has no outcome of its
/// own (`sy_ctx_fail`) with that status. Batch items complete synchronously
/// (`sy_ctx_defer` is refused). Thread affinity: as `sy_step_fn`.
pub type sy_batch_fn = Option<
    unsafe extern "C" fn(items: *const sy_item, count: usize, user_data: *mut c_void) -> i32,
>;

/// Options of one handler. Start from `sy_handler_options_default()`; a
/// zero field means "the default".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sy_handler_options {
    /// Steps of this handler running at once in this host (default: the
    /// worker's concurrency).
    pub concurrency: usize,
    /// Per-attempt timeout enforced by the core, in milliseconds (default
    /// 300000).
    pub timeout_ms: u64,
    /// Attempts before the step fails for good (default 5).
    pub max_attempts: u32,
    /// Batch handlers only: most steps per call (default 64).
    pub max_batch: usize,
    /// Batch handlers only: longest wait for a batch to fill, in
    /// milliseconds (default 5).
    pub linger_ms: u64,
    /// API handlers only: sustained starts per second (default: no limit).
    pub rate_limit: f64,
    /// API handlers only: burst size of the rate limit (default 1).
    pub rate_burst: u32,
    /// First retry delay in milliseconds (default 1000); later retries
    /// double it, with jitter.
    pub initial_backoff_ms: u64,
    /// Largest retry delay in milliseconds (default 300000).
    pub max_backoff_ms: u64,
}

/// All defaults (every field zero).
#[no_mangle]
pub extern "C" fn sy_handler_options_default() -> sy_handler_options {
    sy_handler_options {
        concurrency: 0,
        timeout_ms: 0,
        max_attempts: 0,
        max_batch: 0,
        linger_ms: 0,
        rate_limit: 0.0,
        rate_burst: 0,
        initial_backoff_ms: 0,
        max_backoff_ms: 0,
    }
}

#[derive(Clone, Copy)]
enum Callback {
    One(unsafe extern "C" fn(*const c_char, usize, *mut sy_ctx, *mut c_void) -> i32),
    Batch(unsafe extern "C" fn(*const sy_item, usize, *mut c_void) -> i32),
}

/// The callback behind a handler, at the handler's id.
#[derive(Clone, Copy)]
struct Registration {
    callback: Callback,
    user_data: usize,
}

/// The callback threads of a started worker.
struct Threads {
    handles: Vec<JoinHandle<()>>,
    /// The index of each callback thread that has left.
    exits: std::sync::mpsc::Receiver<usize>,
}

/// How long `sy_worker_stop` waits, after the grace period, for callbacks
/// still running (ones that ignore `sy_ctx_is_cancelled`) before it returns
/// and leaves them running on detached threads.
const STOP_JOIN_LIMIT: Duration = Duration::from_secs(2);

/// How long an idle callback thread waits for a job before it waits
/// again. Waking every 200 ms cost each idle host `concurrency` × 5 context
/// switches a second (about 1,300 a second with 256 threads).
const IDLE_SLICE: Duration = Duration::from_secs(3600);

/// Options of a worker (`sy_worker_new_with`). Start from
/// `sy_worker_options_default()`; a zero field means "the default".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sy_worker_options {
    /// Steps run at once, and callback threads (default 64).
    pub concurrency: usize,
    /// Lease length in milliseconds (default 30000): a host that stops
    /// heartbeating loses its steps after this.
    pub lease_ms: u64,
    /// On stop, how long running callbacks may finish before their steps
    /// are cancelled and handed back, in milliseconds (default 10000).
    pub shutdown_grace_ms: u64,
    /// Largest accepted input/result in bytes (default: the core's).
    pub max_payload_bytes: usize,
    /// Where to serve `/healthz`, `/readyz` and `/metrics`, e.g.
    /// "127.0.0.1:9464" (port 0 picks a free port, see
    /// `sy_worker_health_addr`); NULL (the default): off.
    pub health_listen: *const c_char,
}

/// All defaults (every field zero).
#[no_mangle]
pub extern "C" fn sy_worker_options_default() -> sy_worker_options {
    sy_worker_options {
        concurrency: 0,
        lease_ms: 0,
        shutdown_grace_ms: 0,
        max_payload_bytes: 0,
        health_listen: std::ptr::null(),
    }
}

/// The default of `sy_worker_options.concurrency`.
const DEFAULT_CONCURRENCY: usize = 64;

/// A host whose handlers are C callbacks.
pub struct sy_worker {
    store: DynStore,
    concurrency: usize,
    /// Registration, start and bounded stop: the core's lifecycle.
    host: Arc<Host>,
    inbox: Arc<Inbox>,
    /// The callback of each handler at its id. Registration and start both
    /// hold this lock, so no handler is registered between the snapshot a
    /// start takes and the host it starts.
    callbacks: Mutex<Vec<Registration>>,
    /// The callback threads, once started (taken by the first stop).
    threads: Mutex<Option<Threads>>,
}

thread_local! {
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Creates a worker on a store; `concurrency` (at least 1) is both the
/// number of steps run at once and the number of callback threads. The
/// other options take their defaults (see `sy_worker_new_with`).
#[no_mangle]
pub unsafe extern "C" fn sy_worker_new(
    store: *const sy_store,
    concurrency: usize,
    worker: *mut *mut sy_worker,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        if concurrency == 0 {
            return Err(Fail::arg("concurrency must be at least 1"));
        }
        let opts = sy_worker_options {
            concurrency,
            ..sy_worker_options_default()
        };
        new_worker(store, &opts, worker)
    })
}

/// Creates a worker on a store with `options` (NULL: all defaults).
#[no_mangle]
pub unsafe extern "C" fn sy_worker_new_with(
    store: *const sy_store,
    options: *const sy_worker_options,
    worker: *mut *mut sy_worker,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        // SAFETY: NULL or a readable options struct.
        let opts = unsafe { options.as_ref() }
            .copied()
            .unwrap_or_else(|| sy_worker_options_default());
        new_worker(store, &opts, worker)
    })
}

fn new_worker(
    store: *const sy_store,
    o: &sy_worker_options,
    worker: *mut *mut sy_worker,
) -> Result<(), Fail> {
    let slot = out("worker", worker)?;
    *slot = std::ptr::null_mut();
    let s = unsafe { handle(Kind::Store, "store", store) }?;
    let ms = |name: &str, v: u64, default: u64| -> Result<Duration, Fail> {
        let v = if v == 0 { default } else { v };
        switchyard_core::bridge::seconds(&format!("options.{name}"), v as f64 / 1000.0)
            .map_err(Fail::arg)
    };
    let concurrency = if o.concurrency == 0 {
        DEFAULT_CONCURRENCY
    } else {
        o.concurrency
    };
    let mut plan = HostPlan::new(
        concurrency,
        ms("lease_ms", o.lease_ms, 30_000)?,
        ms("shutdown_grace_ms", o.shutdown_grace_ms, 10_000)?,
        (o.max_payload_bytes != 0).then_some(o.max_payload_bytes),
    );
    if !o.health_listen.is_null() {
        let a = unsafe { text("options.health_listen", o.health_listen) }?;
        plan.health_listen = Some(
            switchyard_core::bridge::listen_address("options.health_listen", a)
                .map_err(Fail::arg)?,
        );
    }
    *slot = register(Kind::Worker, worker_on(s.store.clone(), plan));
    Ok(())
}

/// A worker on `store` with `plan` (its concurrency is the number of
/// callback threads); also `sy_worker_new_from_config`'s.
pub(crate) fn worker_on(store: DynStore, plan: HostPlan) -> sy_worker {
    sy_worker {
        store,
        concurrency: plan.concurrency,
        host: Arc::new(Host::new(switchyard_core::bridge::Language::C, plan)),
        inbox: Inbox::new(),
        callbacks: Mutex::new(Vec::new()),
        threads: Mutex::new(None),
    }
}

/// The handler options as the core's spec.
fn spec(o: Option<&sy_handler_options>) -> HandlerSpec {
    let o = o.copied().unwrap_or_else(|| sy_handler_options_default());
    let nonzero = |v: u64| (v != 0).then_some(v);
    let ms = |v: u64| nonzero(v).map(|v| v as f64 / 1000.0);
    HandlerSpec {
        concurrency: (o.concurrency != 0).then_some(o.concurrency),
        timeout: ms(o.timeout_ms),
        max_attempts: (o.max_attempts != 0).then_some(o.max_attempts),
        initial_backoff: ms(o.initial_backoff_ms),
        max_backoff: ms(o.max_backoff_ms),
        max_batch: (o.max_batch != 0).then_some(o.max_batch),
        linger: ms(o.linger_ms),
        rate_limit: (o.rate_limit != 0.0).then_some(o.rate_limit),
        burst: (o.rate_burst != 0).then_some(o.rate_burst),
    }
}

/// An option's name as C users write it.
fn field(f: &'static str) -> String {
    match f {
        "timeout" => "options.timeout_ms".to_string(),
        "linger" => "options.linger_ms".to_string(),
        "burst" => "options.rate_burst".to_string(),
        "initial_backoff" => "options.initial_backoff_ms".to_string(),
        "max_backoff" => "options.max_backoff_ms".to_string(),
        other => format!("options.{other}"),
    }
}

unsafe fn add_handler(
    worker: *const sy_worker,
    name: *const c_char,
    kind: JobKind,
    opts: *const sy_handler_options,
    callback: Option<Callback>,
    user_data: *mut c_void,
) -> Result<(), Fail> {
    let w = unsafe { handle(Kind::Worker, "worker", worker) }?;
    let name = unsafe { text("name", name) }?.to_string();
    let callback = callback.ok_or_else(|| Fail::arg("callback is NULL"))?;
    switchyard_core::client::validate_name("handler name", &name)?;
    // SAFETY: NULL or a readable options struct.
    let spec = spec(unsafe { opts.as_ref() });
    let mut callbacks = w.callbacks.lock().unwrap_or_else(|p| p.into_inner());
    if w.host.host_id().is_some() || w.inbox.is_closed() {
        return Err(Fail::new(
            sy_status::SY_CONFLICT,
            "register handlers before the worker starts",
        ));
    }
    // Bad options and a name registered twice are invalid arguments (the
    // host's other refusal, a started host, was checked above under the
    // lock that start takes too).
    let id = w
        .host
        .register(name, kind, &spec, &w.inbox, field)
        .map_err(Fail::arg)?;
    debug_assert_eq!(id, callbacks.len());
    callbacks.push(Registration {
        callback,
        user_data: user_data as usize,
    });
    Ok(())
}

/// Registers a plain step handler `name` served by `callback` (see
/// `sy_step_fn`); `opts` may be NULL (defaults); `user_data` is passed back
/// to every call. Before `sy_worker_start` only.
#[no_mangle]
pub unsafe extern "C" fn sy_worker_step(
    worker: *const sy_worker,
    name: *const c_char,
    opts: *const sy_handler_options,
    callback: sy_step_fn,
    user_data: *mut c_void,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || unsafe {
        add_handler(
            worker,
            name,
            JobKind::Step,
            opts,
            callback.map(Callback::One),
            user_data,
        )
    })
}

/// Registers a decision handler: its output (with `SY_OK`) is a decision
/// document, `{"steps": [{"name", "handler", "input", "depends_on"?}, ...],
/// "final_step"?: name}` (the steps are created atomically; the final step's
/// result, by default the last one's, becomes the task's result) or
/// `{"complete": value}`. Otherwise as `sy_worker_step`.
#[no_mangle]
pub unsafe extern "C" fn sy_worker_decision(
    worker: *const sy_worker,
    name: *const c_char,
    opts: *const sy_handler_options,
    callback: sy_step_fn,
    user_data: *mut c_void,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || unsafe {
        add_handler(
            worker,
            name,
            JobKind::Decision,
            opts,
            callback.map(Callback::One),
            user_data,
        )
    })
}

/// Registers an API-shaped handler: a failure recorded with
/// `sy_ctx_set_http_error` is classified by the core (429 retried after
/// `Retry-After`, other 4xx permanent, 5xx and network errors retried);
/// `opts.rate_limit` limits starts per second. Otherwise as `sy_worker_step`.
#[no_mangle]
pub unsafe extern "C" fn sy_worker_api(
    worker: *const sy_worker,
    name: *const c_char,
    opts: *const sy_handler_options,
    callback: sy_step_fn,
    user_data: *mut c_void,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || unsafe {
        add_handler(
            worker,
            name,
            JobKind::Api,
            opts,
            callback.map(Callback::One),
            user_data,
        )
    })
}

/// Registers a batch handler (see `sy_batch_fn`): the core groups up to
/// `opts.max_batch` ready steps, waiting at most `opts.linger_ms` for more.
#[no_mangle]
pub unsafe extern "C" fn sy_worker_batch(
    worker: *const sy_worker,
    name: *const c_char,
    opts: *const sy_handler_options,
    callback: sy_batch_fn,
    user_data: *mut c_void,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || unsafe {
        add_handler(
            worker,
            name,
            JobKind::Batch,
            opts,
            callback.map(Callback::Batch),
            user_data,
        )
    })
}

// ---------------------------------------------------------------------------
// Running jobs.

/// What a callback left behind for one step.
#[derive(Default)]
pub(crate) struct Answer {
    /// The bytes given to `sy_ctx_set_output`.
    pub output: Vec<u8>,
    /// Set by `sy_ctx_fail`: this outcome wins.
    pub fail: Option<Reply>,
    /// Set by `sy_ctx_set_http_error`: the outcome of an error status.
    pub http: Option<Reply>,
    /// The status and message of the last context call that failed: the
    /// message of a callback that passes that status on without an output.
    pub raised: Option<(sy_status, String)>,
}

/// Turns a callback's status and answer into the step's outcome.
pub(crate) fn outcome(kind: JobKind, handler: &str, code: i32, a: Answer) -> Reply {
    if let Some(r) = a.fail {
        return r;
    }
    let status = sy_status::from_code(code);
    if status == Some(sy_status::SY_OK) {
        return value(kind, handler, &a.output);
    }
    if status == Some(sy_status::SY_PENDING) {
        return permanent(format!(
            "the C handler `{handler}` returned SY_PENDING but no context call asked for it \
             (call sy_ctx_defer first)"
        ));
    }
    // Any other status is an error of its class (unknown ones: retryable).
    let class = status
        .and_then(sy_status::class)
        .unwrap_or(ErrorClass::Retryable);
    if let (Some(http), false) = (a.http, class.is_control_flow()) {
        return http;
    }
    let message = match (a.output.is_empty(), a.raised) {
        (false, _) => String::from_utf8_lossy(&a.output).into_owned(),
        (true, Some((s, m))) if Some(s) == status => m,
        _ => format!(
            "the C handler `{handler}` failed with status {code} ({})",
            status_name(code).to_string_lossy()
        ),
    };
    Reply::error(class, message, None, None)
}

/// A permanent failure the binding reports itself.
fn permanent(message: impl Into<String>) -> Reply {
    Reply::error(ErrorClass::Permanent, message.into(), None, None)
}

/// The answer for `SY_OK`: the output as JSON (none: `null`), a decision
/// document for decision handlers.
fn value(kind: JobKind, handler: &str, output: &[u8]) -> Reply {
    let v: Value = if output.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(output) {
            Ok(v) => v,
            Err(e) => {
                return permanent(format!(
                    "the C handler `{handler}` set an output that is not valid JSON: {e}"
                ))
            }
        }
    };
    if kind != JobKind::Decision {
        return Reply::Value(v);
    }
    Reply::decision_json(handler, v)
}

fn input_text(input: &Value) -> Option<CString> {
    serde_json::to_string(input)
        .ok()
        .and_then(|s| CString::new(s).ok())
}

fn run_job(callbacks: &[Registration], mut job: Job) {
    if job.abandoned() {
        // The core gave up on it (timed out, cancelled, handed back) while
        // it was queued: its callback never starts.
        return;
    }
    let Some(reg) = callbacks.get(job.handler_id).copied() else {
        let msg = format!("no C callback for handler `{}`", job.handler);
        let n = job.items.len();
        job.complete((0..n).map(|_| permanent(msg.clone())).collect());
        return;
    };
    let items: Vec<(Value, Context)> = job.items.drain(..).map(|i| (i.input, i.ctx)).collect();
    let on = On {
        reg,
        kind: job.kind,
        handler: job.handler.clone(),
    };
    IN_CALLBACK.with(|c| c.set(true));
    match reg.callback {
        Callback::One(f) => {
            let mut replies = Vec::with_capacity(items.len());
            for (input, ctx) in items {
                match run_one(&on, f, input, ctx) {
                    Ran::Reply(r) => replies.push(r),
                    Ran::Deferred(d) => {
                        // One item per non-batch job: the completion answers it.
                        IN_CALLBACK.with(|c| c.set(false));
                        d.attach(job);
                        return;
                    }
                }
            }
            IN_CALLBACK.with(|c| c.set(false));
            job.complete(replies);
        }
        Callback::Batch(f) => {
            let replies = run_batch(&on, f, items);
            IN_CALLBACK.with(|c| c.set(false));
            job.complete(replies);
        }
    }
}

enum Ran {
    Reply(Reply),
    Deferred(Arc<Deferred>),
}

/// The handler a job is for.
struct On {
    reg: Registration,
    kind: JobKind,
    handler: String,
}

/// The input a step cannot pass to C.
fn bad_input() -> Reply {
    permanent("the step input cannot be passed to C (it contains a NUL character)")
}

fn new_ctx(on: &On, ctx: Context) -> *mut sy_ctx {
    crate::ctx::ctx_register(sy_ctx::new(ctx, on.kind, &on.handler))
}

fn run_one(
    on: &On,
    f: unsafe extern "C" fn(*const c_char, usize, *mut sy_ctx, *mut c_void) -> i32,
    input: Value,
    ctx: Context,
) -> Ran {
    let Some(input) = input_text(&input) else {
        return Ran::Reply(bad_input());
    };
    let c = new_ctx(on, ctx);
    // SAFETY: the callback was registered by the C caller for this signature.
    let code = unsafe {
        f(
            input.as_ptr(),
            input.as_bytes().len(),
            c,
            on.reg.user_data as *mut c_void,
        )
    };
    let c = crate::ctx::ctx_unregister(c);
    let (answer, deferred) = c.finish();
    match deferred {
        Some(d) if code == sy_status::SY_PENDING as i32 => Ran::Deferred(d),
        other => {
            if let Some(d) = other {
                d.answered_by_callback();
            }
            Ran::Reply(outcome(on.kind, &on.handler, code, answer))
        }
    }
}

fn run_batch(
    on: &On,
    f: unsafe extern "C" fn(*const sy_item, usize, *mut c_void) -> i32,
    items: Vec<(Value, Context)>,
) -> Vec<Reply> {
    let n = items.len();
    let mut texts = Vec::with_capacity(n);
    let mut ctxs = Vec::with_capacity(n);
    let mut bad = vec![false; n];
    for (i, (input, ctx)) in items.into_iter().enumerate() {
        let t = input_text(&input).unwrap_or_else(|| {
            bad[i] = true;
            CString::default()
        });
        texts.push(t);
        ctxs.push(new_ctx(on, ctx));
    }
    let c_items: Vec<sy_item> = texts
        .iter()
        .zip(&ctxs)
        .map(|(t, c)| sy_item {
            input: t.as_ptr(),
            input_len: t.as_bytes().len(),
            ctx: *c,
        })
        .collect();
    // SAFETY: the callback was registered for this signature; the items and
    // their strings outlive the call.
    let code = unsafe { f(c_items.as_ptr(), n, on.reg.user_data as *mut c_void) };
    ctxs.into_iter()
        .zip(bad)
        .map(|(c, bad)| {
            let c = crate::ctx::ctx_unregister(c);
            let (answer, _) = c.finish();
            if bad {
                return bad_input();
            }
            outcome(on.kind, &on.handler, code, answer)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Asynchronous completion.

enum DeferState {
    /// Handed out; the callback has not returned yet.
    Waiting,
    /// The callback returned `SY_PENDING`: the job waits for the completion.
    Attached(Job),
    /// Completed before the callback returned.
    Early(Reply),
    /// Answered (or the callback answered itself): nothing more to do.
    Done,
}

pub(crate) struct Deferred {
    kind: JobKind,
    handler: String,
    state: Mutex<DeferState>,
}

impl Deferred {
    pub(crate) fn new(kind: JobKind, handler: &str) -> Arc<Self> {
        Arc::new(Self {
            kind,
            handler: handler.to_string(),
            state: Mutex::new(DeferState::Waiting),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeferState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attach(&self, job: Job) {
        let mut s = self.lock();
        match std::mem::replace(&mut *s, DeferState::Done) {
            DeferState::Early(r) => job.complete(vec![r]),
            DeferState::Waiting => *s = DeferState::Attached(job),
            DeferState::Attached(_) | DeferState::Done => {}
        }
    }

    fn answered_by_callback(&self) {
        *self.lock() = DeferState::Done;
    }

    fn answer(&self, reply: Reply) -> Result<(), Fail> {
        let mut s = self.lock();
        match std::mem::replace(&mut *s, DeferState::Done) {
            DeferState::Waiting => {
                *s = DeferState::Early(reply);
                Ok(())
            }
            DeferState::Attached(job) => {
                if job.abandoned() {
                    return Err(Fail::new(
                        sy_status::SY_CONFLICT,
                        format!(
                            "step of `{}` is no longer waiting (cancelled, timed out or the host stopped): the outcome was dropped",
                            self.handler
                        ),
                    ));
                }
                job.complete(vec![reply]);
                Ok(())
            }
            DeferState::Early(r) => {
                *s = DeferState::Early(r);
                Err(Fail::new(sy_status::SY_CONFLICT, "already completed"))
            }
            DeferState::Done => Err(Fail::new(
                sy_status::SY_CONFLICT,
                format!(
                    "the callback of `{}` answered itself (it did not return SY_PENDING)",
                    self.handler
                ),
            )),
        }
    }
}

/// A deferred step outcome (from `sy_ctx_defer`): complete it later from any
/// thread with `sy_completion_complete`, or give it up with
/// `sy_completion_free`.
pub struct sy_completion {
    pub(crate) deferred: Arc<Deferred>,
    pub(crate) ctx: Context,
}

/// Completes a deferred step, from any thread: `status` and the bytes
/// `data`/`len` mean what a callback's return value and output mean
/// (`SY_OK` + the JSON result or decision, `SY_ERROR_RETRYABLE` /
/// `SY_ERROR_PERMANENT` + a message). The handle is released by every call
/// that gets a live handle, whatever it returns; `SY_CONFLICT` if the step
/// no longer waits (cancelled, timed out, host stopped) or the callback did
/// not return `SY_PENDING`.
#[no_mangle]
pub unsafe extern "C" fn sy_completion_complete(
    completion: *mut sy_completion,
    status: i32,
    data: *const c_char,
    len: usize,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { unregister(Kind::Completion, completion) }
            .ok_or_else(|| Fail::arg("completion is not a live handle (already completed?)"))?;
        if data.is_null() && len > 0 {
            let _ = c
                .deferred
                .answer(permanent("sy_completion_complete was given NULL data"));
            return Err(Fail::arg("data is NULL"));
        }
        let output = if len == 0 {
            Vec::new()
        } else {
            // SAFETY: the caller passes `len` readable bytes.
            unsafe { std::slice::from_raw_parts(data as *const u8, len) }.to_vec()
        };
        let answer = Answer {
            output,
            ..Answer::default()
        };
        let d = &c.deferred;
        d.answer(outcome(d.kind, &d.handler, status, answer))
    })
}

/// True if the deferred step was cancelled or timed out (its outcome will
/// be dropped); false for invalid handles.
#[no_mangle]
pub unsafe extern "C" fn sy_completion_is_cancelled(completion: *const sy_completion) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        unsafe { handle(Kind::Completion, "completion", completion) }
            .map(|c| c.ctx.is_cancelled())
            .unwrap_or(false)
    }))
    .unwrap_or(false)
}

/// Gives up a deferred step without an outcome: it fails with a retryable
/// error. `SY_INVALID_ARGUMENT` for NULL, unknown or already used handles.
#[no_mangle]
pub unsafe extern "C" fn sy_completion_free(completion: *mut sy_completion) -> sy_status {
    guard(std::ptr::null_mut(), || {
        let c = unsafe { unregister(Kind::Completion, completion) }
            .ok_or_else(|| Fail::arg("completion is not a live handle"))?;
        let _ = c.deferred.answer(Reply::error(
            ErrorClass::Retryable,
            format!(
                "the C handler `{}` released its completion without completing it",
                c.deferred.handler
            ),
            None,
            None,
        ));
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Start and stop.

/// Starts the host: claims steps and runs the callbacks on `concurrency`
/// library-owned threads. Returns once the host is running.
/// Where `/healthz`, `/readyz` and `/metrics` are served, once started
/// with `options.health_listen`: `addr` gets the address as text, e.g.
/// "127.0.0.1:41234" (release with `sy_buf_free`). `SY_NOT_FOUND` if the
/// endpoint is off or the worker has not started.
#[no_mangle]
pub unsafe extern "C" fn sy_worker_health_addr(
    worker: *const sy_worker,
    addr: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let slot = buf_out("addr", addr)?;
        let w = unsafe { handle(Kind::Worker, "worker", worker) }?;
        let a = w.host.health_addr().ok_or_else(|| {
            Fail::new(
                sy_status::SY_NOT_FOUND,
                "no health endpoint: set options.health_listen and start the worker",
            )
        })?;
        *slot = make_buf(a.to_string().into_bytes());
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn sy_worker_start(
    worker: *const sy_worker,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let w = unsafe { handle(Kind::Worker, "worker", worker) }?;
        let registered = w.callbacks.lock().unwrap_or_else(|p| p.into_inner());
        if w.host.host_id().is_some() || w.inbox.is_closed() {
            return Err(Fail::new(
                sy_status::SY_CONFLICT,
                "the worker was already started (a worker starts once)",
            ));
        }
        if registered.is_empty() {
            return Err(Fail::new(
                sy_status::SY_CONFLICT,
                "no handler is registered",
            ));
        }
        let callbacks: Arc<[Registration]> = registered.clone().into();
        let (host, store) = (w.host.clone(), w.store.clone());
        block(async move { host.start(store).await })??;
        drop(registered);
        let mut handles = Vec::with_capacity(w.concurrency);
        let (exited, exits) = std::sync::mpsc::channel::<usize>();
        for i in 0..w.concurrency {
            let inbox = w.inbox.clone();
            let callbacks = callbacks.clone();
            let exited = exited.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("switchyard-c-{i}"))
                .spawn(move || {
                    // Closing the inbox wakes every waiter: an idle thread
                    // has no reason to wake up before that.
                    while let Ok(jobs) = inbox.recv_batch(1, IDLE_SLICE) {
                        for job in jobs {
                            run_job(&callbacks, job);
                        }
                    }
                    let _ = exited.send(i);
                });
            match spawned {
                Ok(t) => handles.push(t),
                Err(e) => {
                    // Keep the threads that did start, so a stop joins them.
                    *w.threads.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Threads { handles, exits });
                    return Err(Fail::new(
                        sy_status::SY_INTERNAL,
                        format!("spawning a thread: {e}"),
                    ));
                }
            }
        }
        *w.threads.lock().unwrap_or_else(|p| p.into_inner()) = Some(Threads { handles, exits });
        Ok(())
    })
}

fn stop(w: &sy_worker) -> Result<(), Fail> {
    if IN_CALLBACK.with(|c| c.get()) {
        return Err(Fail::new(
            sy_status::SY_CONFLICT,
            "a worker cannot be stopped from inside a handler callback",
        ));
    }
    // No more claims, running steps get the grace period, the rest are
    // handed back; then the inbox is closed. Callback threads keep serving
    // meanwhile. Before a start this only closes the inbox.
    let host = w.host.clone();
    block(async move { host.stop().await })?;
    let Some(t) = w.threads.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Ok(());
    };
    // Callback threads leave once the inbox is drained and their callback
    // returns; one that ignores cancellation past the grace period is left
    // running, detached, rather than hanging the caller.
    let deadline = std::time::Instant::now() + STOP_JOIN_LIMIT;
    let mut exited = std::collections::HashSet::new();
    while exited.len() < t.handles.len() {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        match t.exits.recv_timeout(wait) {
            Ok(i) => {
                exited.insert(i);
            }
            Err(_) => break,
        }
    }
    // A thread that has sent its exit is returning: join it. Only the
    // threads that did not send one in time are left (`is_finished` would
    // also count a thread between its send and its return as stuck).
    let (done, stuck): (Vec<_>, Vec<_>) = t
        .handles
        .into_iter()
        .enumerate()
        .partition(|(i, _)| exited.contains(i));
    for (_, t) in done {
        let _ = t.join();
    }
    if !stuck.is_empty() {
        // The C library has no logger: stderr is where C programs look.
        eprintln!(
            "switchyard: sy_worker_stop: {} callback(s) still running {:?} after the grace period; left running on detached threads",
            stuck.len(),
            STOP_JOIN_LIMIT
        );
    }
    Ok(())
}

/// Stops the host gracefully (no more claims; running steps get the grace
/// period, then are handed back to be run again) and joins the callback
/// threads. A callback still running 2 s after the grace period (one that
/// ignores `sy_ctx_is_cancelled`) does not hold the call up: it is left
/// running on a detached thread, so it must not rely on anything its
/// caller frees after `sy_worker_stop`/`sy_worker_free` returns. Stopping a
/// stopped or never started worker is `SY_OK`. Not from inside a callback
/// (`SY_CONFLICT`).
#[no_mangle]
pub unsafe extern "C" fn sy_worker_stop(
    worker: *const sy_worker,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        stop(unsafe { handle(Kind::Worker, "worker", worker) }?)
    })
}

/// Stops (as `sy_worker_stop`) and releases a worker. `SY_INVALID_ARGUMENT`
/// for NULL, unknown or freed handles; `SY_CONFLICT` from inside a callback.
#[no_mangle]
pub unsafe extern "C" fn sy_worker_free(worker: *mut sy_worker) -> sy_status {
    guard(std::ptr::null_mut(), || {
        stop(unsafe { handle(Kind::Worker, "worker", worker) }?)?;
        unsafe { unregister(Kind::Worker, worker) }
            .map(drop)
            .ok_or_else(|| Fail::arg("worker is not a live handle"))
    })
}
