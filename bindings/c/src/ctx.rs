//! The durable context, inside a handler callback and on its thread.
//!
//! A context call that fails returns the status of what the core raised
//! (`bridge::raise`); durable control flow (`SY_SUSPENDED`,
//! `SY_LEASE_LOST`, `SY_CANCELLED`, `SY_AWAIT_TIMEOUT`) is kept by the core
//! in the context, so a callback that passes the status on (`return st;`)
//! parks or stops the step with the core's own error.

use std::collections::HashMap;
use std::ffi::c_char;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::bridge::{child_specs, raise, ErrorClass, JobKind, Reply};
use switchyard_core::{Context, StepResult, TaskId};

use crate::worker::{sy_completion, Answer, Deferred};
use crate::*;

/// The durable context of one step run; valid only during the callback.
pub struct sy_ctx {
    ctx: Context,
    kind: JobKind,
    handler: String,
    answer: Answer,
    /// Keys reserved by `sy_ctx_checkpoint_get`, by checkpoint name.
    reserved: HashMap<String, String>,
    /// Set by `sy_ctx_defer`.
    deferred: Option<Arc<Deferred>>,
    /// `sy_ctx_step_name`'s NUL-terminated copy.
    step_name: std::ffi::CString,
}

impl sy_ctx {
    pub(crate) fn new(ctx: Context, kind: JobKind, handler: &str) -> Self {
        let step_name = std::ffi::CString::new(ctx.step_name()).unwrap_or_default();
        Self {
            ctx,
            kind,
            handler: handler.to_string(),
            answer: Answer::default(),
            reserved: HashMap::new(),
            deferred: None,
            step_name,
        }
    }

    /// What the callback left behind, and its completion if it deferred.
    pub(crate) fn finish(self) -> (Answer, Option<Arc<Deferred>>) {
        (self.answer, self.deferred)
    }
}

thread_local! {
    /// The contexts of the callback running on this thread: a context is
    /// valid only there, so the check needs no lock shared between threads.
    static LIVE: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hands out a context for a callback about to run on this thread.
pub(crate) fn ctx_register(c: sy_ctx) -> *mut sy_ctx {
    let p = Box::into_raw(Box::new(c));
    LIVE.with(|l| l.borrow_mut().push(p as usize));
    p
}

/// Takes a context back after its callback returned.
pub(crate) fn ctx_unregister(p: *mut sy_ctx) -> Box<sy_ctx> {
    LIVE.with(|l| {
        let mut l = l.borrow_mut();
        let i = l
            .iter()
            .rposition(|x| *x == p as usize)
            .expect("the context is live on this thread");
        l.swap_remove(i);
    });
    // SAFETY: made by `ctx_register` and not yet taken back.
    unsafe { Box::from_raw(p) }
}

unsafe fn ctx_mut<'a>(ctx: *mut sy_ctx) -> Result<&'a mut sy_ctx, Fail> {
    if ctx.is_null() {
        return Err(Fail::arg("ctx is NULL"));
    }
    if !LIVE.with(|l| l.borrow().contains(&(ctx as usize))) {
        return Err(Fail::arg(
            "ctx is not a live handle (a context is valid only during its callback, on its thread)",
        ));
    }
    // SAFETY: live, and only this thread uses it.
    Ok(unsafe { &mut *ctx })
}

/// Copies `len` bytes from `data` (NULL only when `len` is 0).
unsafe fn bytes(data: *const c_char, len: usize) -> Result<Vec<u8>, Fail> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if data.is_null() {
        return Err(Fail::arg("data is NULL"));
    }
    // SAFETY: the caller passes `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(data as *const u8, len) }.to_vec())
}

/// Runs a context operation; what a failure raises (the core keeps durable
/// control flow) is the call's status, and its message is remembered as
/// the message of a callback that passes that status on.
fn ctx_step<T: Send + 'static>(
    c: &mut sy_ctx,
    fut: impl std::future::Future<Output = StepResult<T>> + Send + 'static,
) -> Result<T, Fail> {
    block(fut)?.map_err(|e| {
        let f = Fail::from(raise(&c.ctx, e));
        c.answer.raised = Some((f.status, f.message.clone()));
        f
    })
}

/// The shape of the context calls that hand back data: empties the out
/// buffer, checks the context, lets `op` read its own arguments and return
/// the operation, runs it (recording a step error for the callback to pass
/// on) and stores what `put` makes of the value.
unsafe fn ctx_call<T, Fut>(
    err: *mut *mut sy_error,
    ctx: *mut sy_ctx,
    out: (&str, *mut sy_buf),
    op: impl FnOnce(Context) -> Result<Fut, Fail>,
    put: impl FnOnce(T) -> Result<sy_buf, Fail>,
) -> sy_status
where
    T: Send + 'static,
    Fut: std::future::Future<Output = StepResult<T>> + Send + 'static,
{
    guard(err, || {
        let slot = buf_out(out.0, out.1)?;
        let c = unsafe { ctx_mut(ctx) }?;
        let fut = op(c.ctx.clone())?;
        *slot = put(ctx_step(c, fut)?)?;
        Ok(())
    })
}

fn json_put<T: serde::Serialize>(v: T) -> Result<sy_buf, Fail> {
    json_buf(&v)
}

/// Sets the callback's output: the JSON result (with `SY_OK`) or the error
/// message (with `SY_ERROR_*`). The bytes are copied; a second call replaces.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_set_output(
    ctx: *mut sy_ctx,
    data: *const c_char,
    len: usize,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        c.answer.output = unsafe { bytes(data, len) }?;
        Ok(())
    })
}

/// Fails this step alone, whatever the callback returns (the way to fail
/// one item of a batch): `status` is `SY_ERROR_RETRYABLE` (retried after
/// the backoff, or after `retry_after_ms` when it is not negative),
/// `SY_ERROR_PERMANENT` (never retried) or `SY_INVALID_ARGUMENT` (the input
/// is invalid: never retried).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_fail(
    ctx: *mut sy_ctx,
    status: i32,
    message: *const c_char,
    retry_after_ms: i64,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        let message = unsafe { text("message", message) }?.to_string();
        let class = match sy_status::from_code(status).and_then(sy_status::class) {
            Some(
                c @ (ErrorClass::Retryable | ErrorClass::Permanent | ErrorClass::InvalidInput),
            ) => c,
            _ => {
                return Err(Fail::arg(format!(
                    "status must be SY_ERROR_RETRYABLE, SY_ERROR_PERMANENT or SY_INVALID_ARGUMENT, not {}",
                    status_name(status).to_string_lossy()
                )));
            }
        };
        let retry_after = (retry_after_ms >= 0).then(|| retry_after_ms as f64 / 1000.0);
        c.answer.fail = Some(Reply::error(class, message, None, retry_after));
        Ok(())
    })
}

/// Records an HTTP-shaped failure (API handlers; then return any error
/// status): `http_status` is the remote's status code, or 0 when the
/// request got no answer (network error); `retry_after_ms` is its
/// `Retry-After` (negative: none). The core classifies it: 429 retried
/// after `Retry-After`, other 4xx permanent, 5xx and network errors retried.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_set_http_error(
    ctx: *mut sy_ctx,
    http_status: u16,
    retry_after_ms: i64,
    message: *const c_char,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        let message = unsafe { text("message", message) }?.to_string();
        let retry_after = (retry_after_ms >= 0).then(|| retry_after_ms as f64 / 1000.0);
        c.answer.http = Some(match http_status {
            0 => Reply::network(message),
            100..=599 => Reply::http(http_status, retry_after, message),
            other => {
                return Err(Fail::arg(format!(
                    "http_status {other} is not an HTTP status"
                )))
            }
        });
        Ok(())
    })
}

/// Defers the outcome (plain, decision and API handlers): stores a
/// completion handle in `completion`; the callback then returns
/// `SY_PENDING` and frees its thread, and any thread completes the step
/// later with `sy_completion_complete`. The step keeps its lease, timeout
/// and cancellation meanwhile. `SY_CONFLICT` in batch handlers or when
/// called twice (`*completion` is then left as it was).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_defer(
    ctx: *mut sy_ctx,
    completion: *mut *mut sy_completion,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        // The slot is left alone on failure: it may hold this step's
        // completion from an earlier call.
        let slot = out("completion", completion)?;
        let c = unsafe { ctx_mut(ctx) }?;
        if c.kind == JobKind::Batch {
            return Err(Fail::new(
                sy_status::SY_CONFLICT,
                "batch items complete synchronously: sy_ctx_defer is for step, decision and API handlers",
            ));
        }
        if c.deferred.is_some() {
            return Err(Fail::new(
                sy_status::SY_CONFLICT,
                "this step was already deferred",
            ));
        }
        let d = Deferred::new(c.kind, &c.handler);
        c.deferred = Some(d.clone());
        *slot = register(
            Kind::Completion,
            sy_completion {
                deferred: d,
                ctx: c.ctx.clone(),
            },
        );
        Ok(())
    })
}

/// True if the step was cancelled or timed out (stop early); false for
/// invalid contexts.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_is_cancelled(ctx: *mut sy_ctx) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        unsafe { ctx_mut(ctx) }
            .map(|c| c.ctx.is_cancelled())
            .unwrap_or(false)
    }))
    .unwrap_or(false)
}

/// The task id of the step (release with `sy_buf_free`).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_task_id(
    ctx: *mut sy_ctx,
    task_id: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let slot = buf_out("task_id", task_id)?;
        let c = unsafe { ctx_mut(ctx) }?;
        *slot = make_buf(c.ctx.task_id().to_string().into_bytes());
        Ok(())
    })
}

/// The step's name within its task (valid during the callback); "" for
/// invalid contexts.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_step_name(ctx: *mut sy_ctx) -> *const c_char {
    catch_unwind(AssertUnwindSafe(|| match unsafe { ctx_mut(ctx) } {
        Ok(c) => c.step_name.as_ptr(),
        Err(_) => c"".as_ptr(),
    }))
    .unwrap_or(c"".as_ptr())
}

/// The attempt this run belongs to (1 until a run fails; a resume after a
/// suspension continues the same attempt); 0 for invalid contexts.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_attempt(ctx: *mut sy_ctx) -> u32 {
    catch_unwind(AssertUnwindSafe(|| {
        unsafe { ctx_mut(ctx) }
            .map(|c| c.ctx.attempt())
            .unwrap_or(0)
    }))
    .unwrap_or(0)
}

/// This run's number: grows with every claim of the step (resumes
/// included) and is never reused; 0 for invalid contexts.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_run(ctx: *mut sy_ctx) -> u64 {
    catch_unwind(AssertUnwindSafe(|| {
        unsafe { ctx_mut(ctx) }.map(|c| c.ctx.run()).unwrap_or(0)
    }))
    .unwrap_or(0)
}

/// Emits an event from inside a step (first write wins); `stored` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_emit_event(
    ctx: *mut sy_ctx,
    name: *const c_char,
    payload_json: *const c_char,
    stored: *mut bool,
    err: *mut *mut sy_error,
) -> sy_status {
    unsafe { emit_event(ctx, name, payload_json, stored, err) }
}

/// Deprecated: the old name of `sy_ctx_emit_event` (the same function).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_emit(
    ctx: *mut sy_ctx,
    name: *const c_char,
    payload_json: *const c_char,
    stored: *mut bool,
    err: *mut *mut sy_error,
) -> sy_status {
    unsafe { emit_event(ctx, name, payload_json, stored, err) }
}

unsafe fn emit_event(
    ctx: *mut sy_ctx,
    name: *const c_char,
    payload_json: *const c_char,
    stored: *mut bool,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        let name = unsafe { text("name", name) }?.to_string();
        let payload = unsafe { json("payload_json", payload_json) }?;
        let inner = c.ctx.clone();
        let s = ctx_step(c, async move { inner.emit_event(&name, payload).await })?;
        if let Some(o) = unsafe { stored.as_mut() } {
            *o = s;
        }
        Ok(())
    })
}

/// Looks up checkpoint `name` of this task. If a previous attempt saved it,
/// `*found` is true and `value` holds its JSON (release with `sy_buf_free`);
/// otherwise compute the value and save it with `sy_ctx_checkpoint_put`.
/// Repeated names in one run are numbered in call order.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_checkpoint_get(
    ctx: *mut sy_ctx,
    name: *const c_char,
    value: *mut sy_buf,
    found: *mut bool,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let slot = buf_out("value", value)?;
        let found = out("found", found)?;
        *found = false;
        let c = unsafe { ctx_mut(ctx) }?;
        let name = unsafe { text("name", name) }?.to_string();
        let inner = c.ctx.clone();
        let n = name.clone();
        let (key, v) = ctx_step(c, async move { inner.checkpoint_lookup(&n).await })?;
        match v {
            Some(v) => {
                *slot = json_buf(&v)?;
                *found = true;
            }
            None => {
                c.reserved.insert(name, key);
            }
        }
        Ok(())
    })
}

/// Saves checkpoint `name` (after a `sy_ctx_checkpoint_get` that found
/// nothing) with `value_json`; also extends the lease.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_checkpoint_put(
    ctx: *mut sy_ctx,
    name: *const c_char,
    value_json: *const c_char,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        let name = unsafe { text("name", name) }?.to_string();
        let value = unsafe { json("value_json", value_json) }?;
        let key = c.reserved.remove(&name).ok_or_else(|| {
            Fail::new(
                sy_status::SY_CONFLICT,
                format!("checkpoint `{name}`: call sy_ctx_checkpoint_get first (it found nothing to reuse)"),
            )
        })?;
        let inner = c.ctx.clone();
        ctx_step(c, async move { inner.checkpoint_save(&key, value).await })
    })
}

/// Waits for event `name`: `SY_OK` with its payload in `payload` (release
/// with `sy_buf_free`) if it was emitted, before or after this call;
/// `SY_SUSPENDED` if not yet (return it: the step is parked and runs again
/// when the event arrives); `SY_AWAIT_TIMEOUT` once `timeout_ms` (negative:
/// no limit) has passed since the first call (carry on, or return it: the
/// step fails permanently). The deadline is checkpointed, so replays agree.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_await_event(
    ctx: *mut sy_ctx,
    name: *const c_char,
    timeout_ms: i64,
    payload: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    let name = unsafe { text("name", name) };
    let timeout = (timeout_ms >= 0).then(|| Duration::from_millis(timeout_ms as u64));
    let op = |c: Context| {
        let name = name?.to_string();
        Ok(async move { c.await_event(&name, timeout).await })
    };
    unsafe { ctx_call(err, ctx, ("payload", payload), op, json_put) }
}

/// Durable sleep: `SY_SUSPENDED` until `ms` milliseconds after the first
/// call (return it; the step runs again then, and this call returns
/// `SY_OK`). Survives restarts.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_sleep(
    ctx: *mut sy_ctx,
    ms: u64,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        let inner = c.ctx.clone();
        ctx_step(
            c,
            async move { inner.sleep(Duration::from_millis(ms)).await },
        )
    })
}

/// Spawns a child task that this step does not wait for; its id goes to
/// `task_id` (release with `sy_buf_free`). Replays return the same child.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_spawn(
    ctx: *mut sy_ctx,
    handler: *const c_char,
    input_json: *const c_char,
    task_id: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    let args = unsafe { (text("handler", handler), json("input_json", input_json)) };
    let op = |c: Context| {
        let (handler, input) = (args.0?.to_string(), args.1?);
        Ok(async move { c.spawn(&handler, input).await })
    };
    let put = |id: TaskId| Ok(make_buf(id.to_string().into_bytes()));
    unsafe { ctx_call(err, ctx, ("task_id", task_id), op, put) }
}

/// `sy_ctx_spawn` whose child emits its outcome as event `response_event`
/// when it finishes (payload `{"task_id", "state", "result", "error"}`), so
/// a step can `sy_ctx_await_event` it. `response_event` NULL is
/// `sy_ctx_spawn`.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_spawn_with_response_event(
    ctx: *mut sy_ctx,
    handler: *const c_char,
    input_json: *const c_char,
    response_event: *const c_char,
    task_id: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    let args = unsafe {
        (
            text("handler", handler),
            json("input_json", input_json),
            if response_event.is_null() {
                Ok(None)
            } else {
                text("response_event", response_event).map(Some)
            },
        )
    };
    let op = |c: Context| {
        let (handler, input) = (args.0?.to_string(), args.1?);
        let mut opts = switchyard_core::SpawnOptions::default();
        opts.response_event = args.2?.map(str::to_string);
        Ok(async move { c.spawn_with(&handler, input, opts).await })
    };
    let put = |id: TaskId| Ok(make_buf(id.to_string().into_bytes()));
    unsafe { ctx_call(err, ctx, ("task_id", task_id), op, put) }
}

/// Delegates to a child task and waits for it: `SY_OK` with its JSON result
/// in `result` (release with `sy_buf_free`), `SY_SUSPENDED` while it runs
/// (return it), `SY_ERROR_PERMANENT` if it failed or was cancelled (the
/// error's message says which; return it to fail this step with it).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_delegate(
    ctx: *mut sy_ctx,
    handler: *const c_char,
    input_json: *const c_char,
    result: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    let args = unsafe { (text("handler", handler), json("input_json", input_json)) };
    let op = |c: Context| {
        let (handler, input) = (args.0?.to_string(), args.1?);
        Ok(async move { c.delegate(&handler, input).await })
    };
    unsafe { ctx_call(err, ctx, ("result", result), op, json_put) }
}

/// Delegates to child tasks run in parallel and waits for all of them.
/// `children_json` is a list of `{"handler", "input"}` objects or
/// `[handler, input]` pairs (`SY_INVALID_ARGUMENT` names a bad child, e.g.
/// "child #1 needs a string `handler`"). `SY_OK` when all
/// have finished, with `outcomes` (release with `sy_buf_free`) a JSON list
/// of `{"task_id", "state", "result", "error"}` in order (a failed child
/// does not fail this step); `SY_SUSPENDED` while any runs (return it).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_delegate_parallel(
    ctx: *mut sy_ctx,
    children_json: *const c_char,
    outcomes: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    let children = unsafe { json("children_json", children_json) };
    let op = |c: Context| {
        let specs = child_specs(children?)?;
        Ok(async move { c.delegate_parallel(specs).await })
    };
    unsafe { ctx_call(err, ctx, ("outcomes", outcomes), op, json_put) }
}

/// The results of the steps this step depends on, as a JSON object by step
/// name (release with `sy_buf_free`).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_dependency_results(
    ctx: *mut sy_ctx,
    results: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    let op = |c: Context| Ok(async move { c.dependency_results().await });
    unsafe { ctx_call(err, ctx, ("results", results), op, json_put) }
}

/// Ends this run with `status` when the callback completes with a value:
/// the steps the decision routed from that status are created (the
/// `routes` of a decision's step) and the status is recorded with the step.
/// Without a call the status is `ok`; the last call wins. A status the step
/// has no route for fails the step; a status that is not a name is
/// `SY_INVALID_ARGUMENT`.
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_set_status(
    ctx: *mut sy_ctx,
    status: *const c_char,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        let status = unsafe { text("status", status) }?.to_string();
        let inner = c.ctx.clone();
        ctx_step(c, async move { inner.set_status(&status) })
    })
}

/// Extends the lease during long work; `SY_CANCELLED` if the task was
/// cancelled, `SY_LEASE_LOST` if the step was taken over (stop and return
/// the status).
#[no_mangle]
pub unsafe extern "C" fn sy_ctx_heartbeat(ctx: *mut sy_ctx, err: *mut *mut sy_error) -> sy_status {
    guard(err, || {
        let c = unsafe { ctx_mut(ctx) }?;
        let inner = c.ctx.clone();
        ctx_step(c, async move { inner.heartbeat().await })
    })
}
