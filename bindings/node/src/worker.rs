//! `NativeWorker`: a host whose handlers are JS functions, on the core's
//! [`Host`] (registration, start, bounded stop).
//!
//! The core pushes jobs into one [`Inbox`]; a feeder task awaits
//! [`Inbox::recv_batch_async`] and hands each batch to JS through one
//! thread-safe function call (the catching variant: the dispatcher itself
//! never throws, since the glue turns whatever a handler throws, rejects
//! with or returns into that step's outcome, so a failed call is taken for
//! the environment going away, see below). JS starts every handler at once and answers finished jobs in batches through
//! [`NativeWorker::complete`], which never blocks. Jobs are answered as they
//! finish rather than per batch, so one slow handler does not hold the slots
//! of the fast ones handed over with it.
//!
//! # The wire format between this crate and `typescript/src/index.ts`
//!
//! Both directions are one JSON text per batch, because V8 parses and
//! prints JSON far faster than N-API builds or reads objects one property
//! at a time, and the Rust side of the text is written and read on runtime
//! threads, not on the JS thread.
//!
//! * A batch of jobs (Rust → JS) is a flat array `[id, handler, input, id,
//!   handler, input, ...]`: `handler` is the handler's index in registration
//!   order; `input` is the step's input, or for batch handlers the array of
//!   the items' inputs.
//! * Cancellation notices (Rust → JS) go to the second thread-safe function,
//!   `cancel`, as a flat JSON array `[id, reason, id, reason, ...]`:
//!   the ids of jobs JS holds whose runs were all asked to stop (the
//!   core's [`Inbox::recv_cancels_async`] notices), `reason` being
//!   `"cancelled"`, `"timeout"` or `"shutdown"`. A batch item whose own run
//!   was asked to stop while others of its job still run is named by
//!   `[id, index]` in place of `id` (the core's item notices,
//!   [`Inbox::watch_item_cancels`]), so only that item's signal fires. The
//!   feeder task makes both calls and awaits each, so a notice never reaches JS before its job. A
//!   job whose runs were all cancelled before it was handed over is never
//!   started: the feeder answers it as a handler that threw the signal's
//!   `CancelledError` would have.
//! * Durable contexts are not sent: most handlers never touch theirs, and a
//!   wrapped native object per step costs more than the step. JS asks for
//!   one on first use with [`NativeWorker::context`] (`job id`, item index);
//!   it is valid while the job is unanswered.
//! * Answers (JS → Rust) are `complete(ids, text)`: `text` is a JSON array
//!   with one entry per id, the job's outcome (an array of outcomes for
//!   batch handlers). An outcome is an array whose first element says what
//!   it is (see [`decode`]).
//!
//! # When the JS environment goes away
//!
//! A process that exits, or a worker thread that is terminated, while JS
//! holds steps cannot answer them any more. [`Lifeline::hand_back`] (run by
//! the environment's cleanup hook, and by `handBack()` from the glue's
//! `process.on("exit")` listener, since Node does not run cleanup hooks on
//! `process.exit()`) stops claiming, stops dispatching, and cancels the
//! held runs without answering them: the core then records them
//! `Released` (ready again, no attempt spent), exactly as it does for runs
//! still going when a shutdown's grace period ends. It blocks until that is
//! recorded, because the runtime goes away with the environment.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunction;
use napi_derive::napi;
use parking_lot::Mutex;
use serde_json::Value;
use switchyard_core::bridge::{
    camel_case, listen_address, CancelNotices, ErrorClass, HandlerSpec, Host, HostPlan, Inbox, Job,
    JobKind, Reply,
};
use switchyard_core::Context;
use tokio_util::sync::CancellationToken;

use crate::client::open_store;
use crate::context::NativeContext;
use crate::errors::{core_err, ok};

/// Jobs handed to JS per thread-safe call, at most.
const MAX_BATCH: usize = 256;

/// How long a failed dispatch waits for the environment's cleanup hook
/// before failing its jobs (see `feed`).
const DISPATCH_ERROR_WAIT: Duration = Duration::from_secs(1);

/// The JS dispatcher, `(batch: string) => void`, and the JS side of the
/// cancellation notices, `(notices: string) => void` (see the module docs).
type Dispatch = ThreadsafeFunction<String, (), String, Status, false>;

/// Host-wide settings.
#[napi(object)]
pub struct NativeWorkerOptions {
    /// Steps in flight at once for the whole host (default 64).
    pub concurrency: Option<u32>,
    /// Lease length in seconds (default 30).
    pub lease: Option<f64>,
    /// Seconds running steps get to finish on shutdown (default 10).
    pub shutdown_grace: Option<f64>,
    /// Largest input/result/checkpoint in bytes.
    pub max_payload_bytes: Option<u32>,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (off if absent).
    pub health_listen: Option<String>,
}

/// Per-handler settings (seconds for durations).
#[napi(object)]
#[derive(Default)]
pub struct NativeHandlerOptions {
    /// Steps of this handler in flight at once (default: the host's).
    pub concurrency: Option<u32>,
    /// The core fails a run that takes longer.
    pub timeout: Option<f64>,
    /// Attempts before the step fails.
    pub max_attempts: Option<u32>,
    /// First retry delay.
    pub initial_backoff: Option<f64>,
    /// Largest retry delay.
    pub max_backoff: Option<f64>,
    /// Batch handlers: steps per call.
    pub max_batch: Option<u32>,
    /// Batch handlers: how long to wait to fill a batch.
    pub linger: Option<f64>,
    /// API handlers: starts per second.
    pub rate_limit: Option<f64>,
    /// API handlers: burst for the rate limit.
    pub burst: Option<u32>,
}

struct Pending {
    job: Job,
}

impl Pending {
    fn answer(self, replies: Vec<Reply>) {
        self.job.complete(replies);
    }

    fn fail(self, class: ErrorClass, message: &str) {
        let n = self.job.items.len();
        self.answer(
            (0..n)
                .map(|_| Reply::error(class, message.to_string(), None, None))
                .collect(),
        );
    }

    /// Cancels the job's runs without answering it: the core hands them
    /// back (`Released`) once they fail to end within its cancellation
    /// grace.
    fn hold(&self) {
        for item in &self.job.items {
            item.ctx.cancellation_token().cancel();
        }
    }
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// The most [`Lifeline::hand_back`] waits for the host to record the held
/// steps: the core's cancellation grace (2 s) plus time for the store.
const HAND_BACK_LIMIT: Duration = Duration::from_secs(15);

/// What handing the held steps back needs (see the module docs); shared by
/// the worker, its feeder and the environment's cleanup hook.
struct Lifeline {
    inbox: Arc<Inbox>,
    host: Arc<Host>,
    pending: PendingMap,
    stopping: CancellationToken,
    /// Cancelled (under the `pending` lock) once JS can no longer answer:
    /// jobs are then held instead of dispatched.
    gone: CancellationToken,
}

impl Lifeline {
    /// JS can no longer answer: no more claims or dispatches, and every job
    /// JS holds, or is handed from now on, is held for release. Returns at
    /// once.
    fn abandon(&self) {
        self.stopping.cancel();
        {
            let map = self.pending.lock();
            self.gone.cancel();
            for p in map.values() {
                p.hold();
            }
        }
        self.host.shutdown();
    }

    /// [`Self::abandon`], then blocks the calling (JS) thread until the host
    /// has recorded the held steps as released, at most [`HAND_BACK_LIMIT`].
    fn hand_back(&self) {
        self.abandon();
        let host = &self.host;
        let wait = async {
            // Runs end (and are handed back) after the core's grace for
            // cancelled runs; `flush` then waits until that is stored.
            while host.inflight() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            host.flush().await;
            // Returns soon if `stop()` is already waiting for the host.
            host.stop().await;
        };
        // The runtime may already be gone (it is shut down with the last
        // environment); there is nothing left to wait for then.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            block_on(async { tokio::time::timeout(HAND_BACK_LIMIT, wait).await })
        }));
        self.inbox.close();
        let left: Vec<Pending> = self.pending.lock().drain().map(|(_, p)| p).collect();
        drop(left);
    }
}

/// A host for JS handlers.
#[napi]
pub struct NativeWorker {
    store_url: String,
    host: Arc<Host>,
    inbox: Arc<Inbox>,
    pending: PendingMap,
    feeder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    completions: Mutex<Option<Completions>>,
    stopping: CancellationToken,
    lifeline: Arc<Lifeline>,
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    switchyard_core::bridge::seconds(what, s).map_err(Error::from_reason)
}

/// The reply an outcome from the TypeScript glue stands for, built with the
/// core's constructors (the core decides what each means). An outcome is
/// an array whose first element is its kind:
///
/// | outcome | reply |
/// | --- | --- |
/// | `[0, value]` | [`Reply::Value`] |
/// | `[1, class, message, trace, retryAfter]` | [`Reply::error`]; `class` is a vocabulary name ([`ErrorClass::name`]) |
/// | `[3, value]` | [`Reply::complete`] |
/// | `[4, steps, finalStep]` | [`Reply::decision_steps`] |
/// | `[5, status, retryAfter, message]` | [`Reply::http`] |
/// | `[6, message]` | [`Reply::network`] |
/// | `[7, what]` | [`Reply::unrepresentable`] |
///
/// `retryAfter` is in seconds or null. Anything else (an unknown class
/// included) fails the step with a message naming the handler.
fn decode(handler: &str, outcome: Value) -> Reply {
    let bad = |what: String| {
        let message = format!("handler `{handler}`: bad outcome from the TypeScript glue: {what}");
        Reply::error(ErrorClass::Permanent, message, None, None)
    };
    let Value::Array(mut a) = outcome else {
        return bad(format!("expected an array, got {outcome}"));
    };
    let Some(code) = a.first().and_then(Value::as_u64) else {
        return bad("the first element must be the outcome's kind".into());
    };
    let mut arg = |i: usize| a.get_mut(i).map(Value::take).unwrap_or(Value::Null);
    let text = |v: Value| match v {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let opt = |v: Value| match v {
        Value::Null => None,
        t => Some(text(t)),
    };
    match code {
        0 => Reply::Value(arg(1)),
        1 => {
            let name = text(arg(1));
            let Some(&class) = ErrorClass::ALL.iter().find(|c| c.name() == name) else {
                return bad(format!("unknown error class `{name}`"));
            };
            let (message, trace) = (text(arg(2)), opt(arg(3)));
            Reply::error(class, message, trace, arg(4).as_f64())
        }
        3 => Reply::complete(arg(1)),
        4 => {
            let final_step = opt(arg(2));
            Reply::decision_steps(handler, arg(1), final_step)
        }
        5 => {
            let status = arg(1).as_u64().and_then(|s| u16::try_from(s).ok());
            let Some(status) = status else {
                return bad("an HTTP status must be a number from 0 to 65535".into());
            };
            let retry_after = arg(2).as_f64();
            Reply::http(status, retry_after, text(arg(3)))
        }
        6 => Reply::network(text(arg(1))),
        7 => Reply::unrepresentable("JavaScript", handler, &text(arg(1))),
        other => bad(format!("unknown outcome kind {other}")),
    }
}

/// JSON text with every lone UTF-16 surrogate escape (`\ud800` without its
/// pair) replaced by `\ufffd`. `JSON.stringify` writes such escapes for
/// strings that are not well-formed Unicode; serde_json refuses them.
/// Outside strings JSON has no backslashes, so every one starts an escape.
fn replace_lone_surrogates(text: &str) -> String {
    fn unit(b: &[u8], at: usize) -> Option<u16> {
        if b.get(at) != Some(&b'\\') || b.get(at + 1) != Some(&b'u') {
            return None;
        }
        let hex = std::str::from_utf8(b.get(at + 2..at + 6)?).ok()?;
        u16::from_str_radix(hex, 16).ok()
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        match unit(b, i) {
            // A pair: both halves stay.
            Some(0xD800..=0xDBFF)
                if unit(b, i + 6).is_some_and(|l| (0xDC00..=0xDFFF).contains(&l)) =>
            {
                i += 12
            }
            Some(0xD800..=0xDFFF) => {
                out.push_str(&text[copied..i]);
                out.push_str("\\ufffd");
                i += 6;
                copied = i;
            }
            // Any other escape is two characters or `\uXXXX`; skipping two
            // is enough not to mistake an escaped backslash for a start.
            _ => i += 2,
        }
    }
    out.push_str(&text[copied.min(text.len())..]);
    out
}

/// Answers every item of the jobs with the same error.
fn fail_all(pending: &PendingMap, ids: &[u64], class: ErrorClass, message: &str) {
    let mut map = pending.lock();
    for id in ids {
        if let Some(p) = map.remove(id) {
            p.fail(class, message);
        }
    }
}

/// Answers the jobs of one `complete` call (see the module docs).
fn answer_batch(pending: &PendingMap, ids: Vec<u64>, text: String) {
    let outcomes = serde_json::from_str::<Vec<Value>>(&text)
        .or_else(|_| serde_json::from_str::<Vec<Value>>(&replace_lone_surrogates(&text)));
    let outcomes = match outcomes {
        Ok(o) if o.len() == ids.len() => o,
        Ok(o) => {
            let e = format!("{} outcomes for {} jobs", o.len(), ids.len());
            return fail_all(pending, &ids, ErrorClass::Permanent, &bad_answer(e));
        }
        Err(e) => {
            let why = bad_answer(e.to_string());
            return fail_all(pending, &ids, ErrorClass::Permanent, &why);
        }
    };
    let mut answered = Vec::with_capacity(ids.len());
    {
        let mut map = pending.lock();
        for (id, o) in ids.into_iter().zip(outcomes) {
            if let Some(p) = map.remove(&id) {
                answered.push((p, o));
            }
        }
    }
    for (p, o) in answered {
        let handler = p.job.handler.as_str();
        let replies = if p.job.kind == JobKind::Batch {
            match o {
                Value::Array(os) => os.into_iter().map(|o| decode(handler, o)).collect(),
                other => vec![decode(handler, other)],
            }
        } else {
            vec![decode(handler, o)]
        };
        p.answer(replies);
    }
}

fn bad_answer(why: String) -> String {
    format!("bad answer from the TypeScript glue: {why}")
}

type Completions = tokio::sync::mpsc::UnboundedSender<(Vec<u64>, String)>;

/// Why the core stopped wanting a run: `"shutdown"` once the worker began
/// to stop (the core then cancels runs still going after the grace period),
/// `"timeout"` once the handler's timeout has passed, else `"cancelled"`
/// (the task was cancelled, or the lease lost).
fn reason(ctx: &Context, stopping: &CancellationToken) -> &'static str {
    if stopping.is_cancelled() {
        "shutdown"
    } else if ctx
        .deadline()
        .is_some_and(|d| std::time::Instant::now() >= d)
    {
        "timeout"
    } else {
        "cancelled"
    }
}

/// What the glue's `CancelledError` says for each [`reason`].
fn reason_message(why: &str) -> &'static str {
    match why {
        "shutdown" => "the worker shut down before the step finished",
        "timeout" => "the handler's timeout passed",
        _ => "the task was cancelled",
    }
}

/// The one task that talks to JS: hands over jobs and cancellation notices
/// in the order it learns of them, awaiting each call, so a notice never
/// overtakes its job (see the module docs).
async fn feed(life: Arc<Lifeline>, dispatch: Dispatch, cancel: Dispatch) {
    let (mut jobs_open, mut notices_open) = (true, true);
    while jobs_open || notices_open {
        tokio::select! {
            biased;
            n = life.inbox.recv_cancel_notices_async(), if notices_open => match n {
                Some(n) => notify(&life, &cancel, n).await,
                None => notices_open = false,
            },
            j = life.inbox.recv_batch_async(MAX_BATCH), if jobs_open => match j {
                Some(jobs) => hand_over(&life, &dispatch, jobs).await,
                None => jobs_open = false,
            },
        }
    }
}

/// Passes on the notices for jobs JS holds; the others were answered
/// already, or never handed over (see [`hand_over`]). A batch item's own
/// notice names it as `[id, index]` in place of the job id.
async fn notify(life: &Lifeline, cancel: &Dispatch, notices: CancelNotices) {
    if life.gone.is_cancelled() {
        return;
    }
    let mut text = String::from("[");
    {
        let map = life.pending.lock();
        for (id, index) in notices.items {
            let Some(item) = map.get(&id).and_then(|p| p.job.items.get(index)) else {
                continue;
            };
            if text.len() > 1 {
                text.push(',');
            }
            let why = reason(&item.ctx, &life.stopping);
            let _ = write!(text, "[{id},{index}],\"{why}\"");
        }
        for id in notices.jobs {
            let Some(ctx) = map.get(&id).and_then(|p| p.job.items.first()) else {
                continue;
            };
            if text.len() > 1 {
                text.push(',');
            }
            let _ = write!(text, "{id},\"{}\"", reason(&ctx.ctx, &life.stopping));
        }
    }
    if text.len() == 1 {
        return;
    }
    text.push(']');
    // As for jobs: a call made as the environment goes away may never run,
    // and then there is nothing left to abort.
    tokio::select! {
        _ = cancel.call_async_catch(text) => {}
        _ = life.gone.cancelled() => {}
    }
}

async fn hand_over(life: &Arc<Lifeline>, dispatch: &Dispatch, jobs: Vec<Job>) {
    let pending = &life.pending;
    let mut text = String::with_capacity(32 * jobs.len());
    text.push('[');
    let mut ids = Vec::with_capacity(jobs.len());
    {
        let mut map = pending.lock();
        for mut job in jobs {
            if job.abandoned() {
                // Timed out or cancelled while queued: nothing to run.
                continue;
            }
            if !life.gone.is_cancelled() && job.items.iter().all(|i| i.ctx.is_cancelled()) {
                // Every run was asked to stop before JS got the job (its
                // notice, if already read, named a job JS did not hold):
                // never started, answered as an aborted handler would be.
                let why = reason_message(reason(&job.items[0].ctx, &life.stopping));
                Pending { job }.fail(ErrorClass::Cancelled, why);
                continue;
            }
            // The handler's id is its index on the JS side too.
            let h = job.handler_id;
            if !ids.is_empty() {
                text.push(',');
            }
            let _ = write!(text, "{},{h},", job.id);
            let batch = job.kind == JobKind::Batch;
            if batch {
                text.push('[');
            }
            for (i, item) in job.items.iter_mut().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                // Written once, here; the context keeps the step.
                let input = item.input.take();
                let _ = write!(text, "{input}");
            }
            if batch {
                text.push(']');
            }
            ids.push(job.id);
            let p = Pending { job };
            if life.gone.is_cancelled() {
                // JS can no longer answer (see the module docs).
                p.hold();
            }
            map.insert(p.job.id, p);
        }
        if life.gone.is_cancelled() {
            return;
        }
    }
    if ids.is_empty() {
        return;
    }
    text.push(']');
    // A call made as the environment goes away may never run: stop
    // waiting for it then (its jobs are held by `abandon`).
    let called = tokio::select! {
        r = dispatch.call_async_catch(text) => r,
        _ = life.gone.cancelled() => return,
    };
    match called {
        Ok(()) => {}
        // The JS environment is going away (a worker thread was
        // terminated, or the process exits) without `close()`: hand the
        // steps back without costing an attempt.
        Err(e) if e.status == Status::Closing => life.abandon(),
        // The dispatcher never throws (the glue catches whatever a
        // handler does), so this is nearly always the environment torn
        // down under the call: a terminated worker thread shows up as a
        // pending exception, and its cleanup hook follows at once to
        // hold these jobs. Anything else fails them.
        Err(e) => {
            let life = life.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = life.gone.cancelled() => {}
                    _ = tokio::time::sleep(DISPATCH_ERROR_WAIT) => fail_all(
                        &life.pending,
                        &ids,
                        ErrorClass::Retryable,
                        &format!("the JS dispatcher failed: {e}"),
                    ),
                }
            });
        }
    }
}

impl NativeWorker {
    fn with_plan(env: Env, store_url: String, plan: HostPlan) -> Result<Self> {
        let host = Arc::new(Host::new(switchyard_core::bridge::Language::Node, plan));
        let inbox = Inbox::new();
        // Cancellation reaches JS through the inbox's notices (module docs).
        inbox.watch_cancels();
        // ...and a batch item's own, so its signal fires alone.
        inbox.watch_item_cancels();
        let stopping = CancellationToken::new();
        let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
        let lifeline = Arc::new(Lifeline {
            inbox: inbox.clone(),
            host: host.clone(),
            pending: pending.clone(),
            stopping: stopping.clone(),
            gone: CancellationToken::new(),
        });
        // When the JS environment goes away without `close()` (a worker
        // thread is terminated), hand the held steps back (module docs).
        env.add_env_cleanup_hook(lifeline.clone(), |life| life.hand_back())?;
        Ok(Self {
            store_url,
            host,
            inbox,
            pending,
            feeder: Mutex::new(None),
            completions: Mutex::new(None),
            stopping,
            lifeline,
        })
    }
}

#[napi]
impl NativeWorker {
    /// A worker on the store at `store_url` (opened by `start`).
    #[napi(constructor)]
    pub fn new(env: Env, store_url: String, options: Option<NativeWorkerOptions>) -> Result<Self> {
        let o = options.unwrap_or(NativeWorkerOptions {
            concurrency: None,
            lease: None,
            shutdown_grace: None,
            max_payload_bytes: None,
            health_listen: None,
        });
        let concurrency = o.concurrency.unwrap_or(64) as usize;
        if concurrency == 0 {
            return Err(Error::from_reason("concurrency must be at least 1"));
        }
        let mut plan = HostPlan::new(
            concurrency,
            seconds("lease", o.lease.unwrap_or(30.0))?,
            seconds("shutdownGrace", o.shutdown_grace.unwrap_or(10.0))?,
            o.max_payload_bytes.map(|n| n as usize),
        );
        if let Some(a) = &o.health_listen {
            plan.health_listen =
                Some(listen_address("healthListen", a).map_err(Error::from_reason)?);
        }
        Self::with_plan(env, store_url, plan)
    }

    /// A worker from the configuration (`switchyard_core::config`): the
    /// file at `path`, else `SWITCHYARD_CONFIG`, else none, then the
    /// `SWITCHYARD_*` environment; its store and `[host]` settings (the
    /// addon installs no log subscriber, so `log.level` is not applied).
    #[napi(factory)]
    pub fn from_config(env: Env, path: Option<String>) -> Result<Self> {
        let config = switchyard_core::Config::load(path.as_deref().map(std::path::Path::new))
            .map_err(|e| Error::from_reason(crate::errors::message(&e)))?;
        let url = config
            .store
            .open_url()
            .map_err(|e| Error::from_reason(crate::errors::message(&e)))?;
        switchyard_store::check_url(&url)
            .map_err(|e| Error::from_reason(crate::errors::message(&e)))?;
        Self::with_plan(env, url, HostPlan::from_config(&config.host))
    }

    /// Steps run at once by the host.
    #[napi(getter)]
    pub fn concurrency(&self) -> u32 {
        self.host.concurrency() as u32
    }

    /// The store URL the worker opens (with its password, if any: never print it).
    #[napi(getter)]
    pub fn store_url(&self) -> String {
        self.store_url.clone()
    }
    /// Registers handler `name` of `kind` (step, batch, decision, api).
    #[napi]
    pub fn register(
        &self,
        name: String,
        kind: String,
        options: Option<NativeHandlerOptions>,
    ) -> Result<()> {
        if self.inbox.is_closed() {
            return Err(Error::from_reason(
                "register handlers before the worker starts",
            ));
        }
        if name.is_empty() {
            return Err(Error::from_reason("a handler name must not be empty"));
        }
        let kind = JobKind::from_name(&kind).map_err(Error::from_reason)?;
        let o = options.unwrap_or_default();
        let spec = HandlerSpec {
            concurrency: o.concurrency.map(|c| c as usize),
            timeout: o.timeout,
            max_attempts: o.max_attempts,
            initial_backoff: o.initial_backoff,
            max_backoff: o.max_backoff,
            max_batch: o.max_batch.map(|b| b as usize),
            linger: o.linger,
            rate_limit: o.rate_limit,
            burst: o.burst,
        };
        // The id is the handler's index in JS (registration order).
        self.host
            .register(name, kind, &spec, &self.inbox, camel_case)
            .map_err(Error::from_reason)?;
        Ok(())
    }

    /// Opens the store, starts the host and begins handing jobs to
    /// `dispatch` and cancellation notices to `cancel`. Resolves to an
    /// envelope with the host id.
    ///
    /// While running, the thread-safe functions keep the event loop alive;
    /// `stop` releases them.
    /// `dispatch` receives each batch of jobs as JSON text, `cancel` the
    /// notices (see the module docs); handler indexes follow the order of
    /// `register` calls.
    #[napi(ts_args_type = "dispatch: (batch: string) => void, cancel: (notices: string) => void")]
    pub async fn start(&self, dispatch: Dispatch, cancel: Dispatch) -> String {
        if self.inbox.is_closed() {
            return core_err(&switchyard_core::Error::Conflict(
                "the worker was stopped: create a new one".into(),
            ));
        }
        let store = match open_store(&self.store_url).await {
            Ok(s) => s,
            Err(e) => return core_err(&e),
        };
        let id = match self.host.start(store).await {
            Ok(id) => id,
            Err(e) => return core_err(&e),
        };
        if self.stopping.is_cancelled() {
            // stop() ran while the store was opening.
            self.host.stop().await;
            return core_err(&switchyard_core::Error::Shutdown);
        }
        let feeder = tokio::spawn(feed(self.lifeline.clone(), dispatch, cancel));
        *self.feeder.lock() = Some(feeder);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u64>, String)>();
        let pending = self.pending.clone();
        tokio::spawn(async move {
            while let Some((ids, text)) = rx.recv().await {
                answer_batch(&pending, ids, text);
            }
        });
        *self.completions.lock() = Some(tx);
        ok(Value::String(id))
    }

    /// The host id once started.
    #[napi(getter)]
    pub fn host_id(&self) -> Option<String> {
        self.host.host_id()
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served, once started
    /// with `healthListen`.
    #[napi(getter)]
    pub fn health_addr(&self) -> Option<String> {
        self.host.health_addr().map(|a| a.to_string())
    }

    /// Steps running in this host now.
    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        self.host.inflight() as u32
    }

    /// The durable context of item `index` of job `job`, made on first use
    /// (see the module docs). Fails once the job was answered.
    #[napi]
    pub fn context(&self, job: i64, index: u32) -> Result<NativeContext> {
        let map = self.pending.lock();
        let ended = || {
            Error::from_reason(
                "this step's run has ended: a ctx can be used only while its handler runs",
            )
        };
        let p = map.get(&(job as u64)).ok_or_else(ended)?;
        let item = p.job.items.get(index as usize).ok_or_else(ended)?;
        Ok(NativeContext {
            ctx: item.ctx.clone(),
        })
    }

    /// Answers finished jobs: `outcomes` is a JSON array with one entry per
    /// id (see the module docs). Never blocks; unknown ids (the core gave
    /// up, or a second answer) are ignored.
    #[napi]
    pub fn complete(&self, ids: Vec<i64>, outcomes: String) -> Result<()> {
        let ids: Vec<u64> = ids.into_iter().map(|i| i as u64).collect();
        // Parsing and waking the core's tasks happen on a runtime thread:
        // one cross-thread wake-up per batch instead of one per job, and
        // less work on the JS thread.
        let tx = self.completions.lock().clone();
        let (ids, outcomes) = match tx {
            Some(tx) => match tx.send((ids, outcomes)) {
                Ok(()) => return Ok(()),
                Err(e) => e.0,
            },
            None => (ids, outcomes),
        };
        answer_batch(&self.pending, ids, outcomes);
        Ok(())
    }

    /// For when the JS environment is going away (`process.on("exit")`):
    /// stops at once without the grace period, hands the steps JS holds
    /// back without costing an attempt, and blocks until that is recorded
    /// (see the module docs). JS answers that arrive later are ignored.
    #[napi]
    pub fn hand_back(&self) {
        self.lifeline.hand_back();
    }

    /// Begins a graceful shutdown and returns at once.
    #[napi]
    pub fn shutdown(&self) {
        self.stopping.cancel();
        self.host.shutdown();
    }

    /// Stops the host (bounded, see [`Host::stop`]): no more claims,
    /// running steps get the grace period (JS handlers keep running
    /// meanwhile, since this does not block the JS thread; the runs still
    /// going after it get their cancellation notices), then the inbox
    /// closes and the thread-safe functions are released so nothing keeps
    /// the event loop alive.
    #[napi]
    pub async fn stop(&self) {
        self.stopping.cancel();
        self.host.stop().await;
        // Before a start the host has no inbox to close.
        self.inbox.close();
        let feeder = self.feeder.lock().take();
        if let Some(f) = feeder {
            let _ = f.await;
        }
        // Answers still queued are delivered by the completer before it ends.
        self.completions.lock().take();
        // The core stopped waiting for anything still held by JS.
        self.pending.lock().clear();
    }

    /// True while started and not stopped.
    #[napi(getter)]
    pub fn running(&self) -> bool {
        self.host.is_running()
    }
}
