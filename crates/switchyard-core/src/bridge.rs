//! The bridge to foreign language runtimes (DESIGN.md §4): the core pushes,
//! foreign runtimes pull without holding their interpreter lock.
//!
//! Each language runtime owns one [`Inbox`]. Handlers registered from that
//! language are [`InboxHandler`]s: when the dispatcher runs one, it pushes a
//! [`Job`] into the inbox and awaits its reply, so the core's timers
//! (timeouts, leases, cancellation) keep running no matter what the foreign
//! side does. Foreign threads take jobs in batches — one interpreter-lock
//! acquisition (or one JS callback) per batch — and answer each job with
//! [`Job::complete`], which never blocks.
//!
//! Waiting:
//! * threads that run in parallel (C) call [`Inbox::recv_batch`], which
//!   blocks on a condition variable for at most the given time slice, so the
//!   caller can check for signals between slices; one wake-up is in flight at
//!   a time, and a woken thread that leaves jobs queued wakes the next, so a
//!   burst of jobs wakes threads as fast as they start work rather than one
//!   futex call and context switch per job;
//! * threads that take turns under an interpreter lock (Python's GIL, Ruby's
//!   GVL) read a [`Inbox::serial`] inbox through one [`Consumer`] each: a
//!   consumer that is running handlers keeps taking the queued jobs itself,
//!   and an idle thread is woken only when none is, or when the queue has
//!   stalled for [`STALL`] because every busy thread sits in a blocking
//!   handler. Waking a thread per job made the threads fight over the lock:
//!   measured with 32 Python threads, more CPU went to handing the GIL
//!   around than to running handlers;
//! * [`Inbox::interrupt`] wakes every waiter at once (Ruby's unblock
//!   function);
//! * event loops (Node) await [`Inbox::recv_batch_async`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{oneshot, Notify};

use crate::context::Context;
use crate::handler::*;

/// Which capability a foreign handler has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Plain: one item, answered with a value.
    Step,
    /// Decision: one item, answered with a [`Decision`].
    Decision,
    /// API-shaped: one item, answered with a value or an [`ApiError`].
    Api,
    /// Batchable: many items, one answer each.
    Batch,
}

impl JobKind {
    /// The kind by its name in the bindings: `step`, `batch`, `decision`,
    /// `api`.
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "step" => Ok(Self::Step),
            "batch" => Ok(Self::Batch),
            "decision" => Ok(Self::Decision),
            "api" => Ok(Self::Api),
            other => Err(format!(
                "unknown handler kind `{other}` (expected step, batch, decision or api)"
            )),
        }
    }

    /// Its name in the bindings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::Batch => "batch",
            Self::Decision => "decision",
            Self::Api => "api",
        }
    }
}

/// A handler's options as the foreign bindings take them (durations in
/// seconds; `None` is the default), checked in one place so every language
/// accepts and refuses the same things with the same messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandlerSpec {
    /// Steps of this handler at once in the host (default: the host's).
    pub concurrency: Option<usize>,
    /// Per-attempt timeout.
    pub timeout: Option<f64>,
    /// Attempts before the step fails for good.
    pub max_attempts: Option<u32>,
    /// First retry delay.
    pub initial_backoff: Option<f64>,
    /// Largest retry delay.
    pub max_backoff: Option<f64>,
    /// Batch handlers: most steps per batch.
    pub max_batch: Option<usize>,
    /// Batch handlers: longest wait for a batch to fill.
    pub linger: Option<f64>,
    /// API handlers: sustained starts per second.
    pub rate_limit: Option<f64>,
    /// API handlers: burst of the rate limit (default 1).
    pub burst: Option<u32>,
}

impl HandlerSpec {
    /// The options of handler `handler` of `kind` on a host running
    /// `host_concurrency` steps at once. `field` spells an option's name the
    /// way the binding does (e.g. `maxAttempts` in TypeScript) for messages.
    /// Refuses zero counts, negative or non-finite durations, and options
    /// that do not apply to the kind.
    pub fn build(
        &self,
        handler: &str,
        kind: JobKind,
        host_concurrency: usize,
        field: impl Fn(&'static str) -> String,
    ) -> Result<HandlerOptions, String> {
        let what = |name: &'static str| format!("handler `{handler}`: {}", field(name));
        let bad = |name: &'static str, why: String| format!("{} {why}", what(name));
        let secs = |name: &'static str, v: f64| seconds(&what(name), v);
        let only = |name: &'static str, needed: JobKind| -> Result<(), String> {
            if kind == needed {
                Ok(())
            } else {
                Err(bad(
                    name,
                    format!("applies to {} handlers only", needed.name()),
                ))
            }
        };
        let mut o = HandlerOptions::default().concurrency(host_concurrency);
        if let Some(c) = self.concurrency {
            if c == 0 {
                return Err(bad("concurrency", "must be at least 1".into()));
            }
            o.concurrency = c;
        }
        if let Some(t) = self.timeout {
            o.timeout = Some(secs("timeout", t)?);
        }
        if let Some(m) = self.max_attempts {
            if m == 0 {
                return Err(bad("max_attempts", "must be at least 1".into()));
            }
            o.retry.max_attempts = m;
        }
        if let Some(b) = self.initial_backoff {
            o.retry.initial_backoff = secs("initial_backoff", b)?;
        }
        if let Some(b) = self.max_backoff {
            o.retry.max_backoff = secs("max_backoff", b)?;
        }
        if let Some(b) = self.max_batch {
            only("max_batch", JobKind::Batch)?;
            if b == 0 {
                return Err(bad("max_batch", "must be at least 1".into()));
            }
            o.max_batch = b;
        }
        if let Some(l) = self.linger {
            only("linger", JobKind::Batch)?;
            o.linger = secs("linger", l)?;
        }
        if let Some(b) = self.burst {
            only("burst", JobKind::Api)?;
            if b == 0 {
                return Err(bad("burst", "must be at least 1".into()));
            }
        }
        if let Some(r) = self.rate_limit {
            only("rate_limit", JobKind::Api)?;
            if !(r.is_finite() && r > 0.0) {
                return Err(bad(
                    "rate_limit",
                    format!("must be a positive number of starts per second, got {r}"),
                ));
            }
            o = o.rate_limit(r, self.burst.unwrap_or(1));
        }
        Ok(o)
    }
}

/// A duration given in seconds by a binding: finite, not negative and at
/// most [`crate::client::MAX_DURATION`], or an error naming `what` (the
/// message of [`crate::client::duration_from_secs`]).
pub fn seconds(what: &str, v: f64) -> Result<Duration, String> {
    crate::client::duration_from_secs(what, v).map_err(|e| match e {
        crate::Error::InvalidInput(m) => m,
        other => other.to_string(),
    })
}

/// `max_attempts` → `maxAttempts`, for bindings whose options are camelCase.
pub fn camel_case(name: &'static str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for ch in name.chars() {
        if ch == '_' {
            upper = true;
        } else if upper {
            out.extend(ch.to_uppercase());
            upper = false;
        } else {
            out.push(ch);
        }
    }
    out
}

/// One step inside a job.
pub struct JobItem {
    /// Its input.
    pub input: Value,
    /// Its durable context.
    pub ctx: Context,
}

/// A foreign handler's answer for one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A value (plain, API and batch handlers).
    Value(Value),
    /// A decision (decision handlers).
    Decision(Decision),
    /// A step error (any handler).
    Error(StepError),
    /// An HTTP-shaped failure (API handlers).
    Api(ApiError),
}

/// Work for a foreign handler: one step, or a micro-batch for batch handlers.
pub struct Job {
    /// Unique within the process.
    pub id: u64,
    /// The handler to run.
    pub handler: String,
    /// Its capability.
    pub kind: JobKind,
    /// The steps (one unless `kind` is [`JobKind::Batch`]).
    pub items: Vec<JobItem>,
    reply: oneshot::Sender<Vec<Reply>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("handler", &self.handler)
            .field("items", &self.items.len())
            .finish()
    }
}

impl Job {
    /// Answers the job: one reply per item, in order. Never blocks; may be
    /// called from any thread. If the core has already given up on the step
    /// (timeout, cancellation, shutdown), the answer is dropped.
    pub fn complete(self, replies: Vec<Reply>) {
        let _ = self.reply.send(replies);
    }

    /// True if the core no longer waits for this job (timed out or cancelled).
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// What a language binding collects before its host starts: the host's
/// settings and the handlers registered so far, each served through an
/// inbox. One place for the checks and the worker set-up that the Python,
/// Ruby and Node glue each did on their own.
pub struct HostPlan {
    /// Steps run at once by the host (and the default per handler).
    pub concurrency: usize,
    /// Lease length.
    pub lease: Duration,
    /// How long running steps may finish during a graceful shutdown.
    pub shutdown_grace: Duration,
    /// Largest accepted input/result, if limited.
    pub max_payload: Option<usize>,
    regs: Vec<(String, JobKind, HandlerOptions, Arc<Inbox>)>,
}

impl HostPlan {
    /// A plan with no handlers yet.
    pub fn new(
        concurrency: usize,
        lease: Duration,
        shutdown_grace: Duration,
        max_payload: Option<usize>,
    ) -> Self {
        Self {
            concurrency,
            lease,
            shutdown_grace,
            max_payload,
            regs: Vec::new(),
        }
    }

    /// Adds handler `name`, served through `inbox`; a name registered
    /// before is refused at once (rather than when the host starts).
    pub fn register(
        &mut self,
        name: String,
        kind: JobKind,
        opts: HandlerOptions,
        inbox: Arc<Inbox>,
    ) -> Result<(), String> {
        if self.regs.iter().any(|(n, ..)| *n == name) {
            return Err(format!("handler `{name}` is registered twice"));
        }
        self.regs.push((name, kind, opts, inbox));
        Ok(())
    }

    /// The host on `store` with every registered handler; `lang` names the
    /// language in the handlers' error messages.
    pub fn build(
        &self,
        store: crate::DynStore,
        lang: &'static str,
    ) -> crate::Result<crate::Worker> {
        let mut b = crate::Worker::builder(store)
            .concurrency(self.concurrency)
            .lease(self.lease)
            .shutdown_grace(self.shutdown_grace);
        if let Some(m) = self.max_payload {
            b = b.max_payload_bytes(m);
        }
        for (name, kind, opts, inbox) in &self.regs {
            b = b.handler(
                name.clone(),
                InboxHandler::capability(inbox.clone(), name, *kind, lang),
                opts.clone(),
            );
        }
        b.build()
    }
}

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

/// How long queued jobs may sit untaken, while consumers are busy, before
/// an idle consumer of a [`Inbox::serial`] inbox takes them: the busy ones
/// are then taken to be blocked in their handlers (I/O, sleeping).
pub const STALL: Duration = Duration::from_millis(2);

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    closed: bool,
    interrupts: u64,
    /// Consumers holding jobs (they take queued jobs before waiting again).
    busy: usize,
    /// Threads waiting on the condition variable ([`Consumer::next`],
    /// [`Inbox::recv_batch`]).
    waiting: usize,
    /// A waiter was woken and has not looked at the queue yet.
    wake_pending: bool,
    /// A waiter watches a queue that busy consumers are draining.
    sentinel: bool,
    /// When a consumer last took a job.
    last_take: Option<Instant>,
}

impl State {
    /// Drops the queued jobs the core has given up on (see [`Inbox::take`]);
    /// true if any job is left.
    fn live(s: &mut Self) -> bool {
        s.queue.retain(|j| !j.abandoned());
        !s.queue.is_empty()
    }
}

/// The queue between the dispatcher and one foreign runtime.
pub struct Inbox {
    state: Mutex<State>,
    cond: Condvar,
    notify: Notify,
    next_id: AtomicU64,
    /// Read through [`Consumer`]s, which wake each other (see the module docs).
    serial: bool,
    /// See [`STALL`].
    stall: Duration,
}

/// The inbox was closed: the host is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the inbox is closed: the host is shutting down")]
pub struct Closed;

impl Inbox {
    /// An empty inbox for parallel threads ([`Self::recv_batch`]) or an
    /// event loop ([`Self::recv_batch_async`]).
    pub fn new() -> Arc<Self> {
        Self::with_mode(false, STALL)
    }

    /// An empty inbox for threads that take turns under an interpreter lock,
    /// read through one [`Consumer`] per thread.
    pub fn serial() -> Arc<Self> {
        Self::with_mode(true, STALL)
    }

    fn with_mode(serial: bool, stall: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            cond: Condvar::new(),
            notify: Notify::new(),
            next_id: AtomicU64::new(1),
            serial,
            stall,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every critical section is a single push/drain), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(
        &self,
        handler: &str,
        kind: JobKind,
        items: Vec<JobItem>,
    ) -> Result<oneshot::Receiver<Vec<Reply>>, Closed> {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            handler: handler.to_string(),
            kind,
            items,
            reply: tx,
        };
        let wake = {
            let mut s = self.lock();
            if s.closed {
                return Err(Closed);
            }
            s.queue.push_back(job);
            // A serial inbox wakes one waiter when nobody is taking jobs, or
            // to watch for a stall while busy consumers drain the queue.
            // Only threads need the condition variable (a notify is a
            // system call even with nobody waiting; Node waits on `notify`).
            // One wake-up in flight at a time: the woken thread wakes the
            // next if it leaves jobs behind (see `recv_batch`), so a burst
            // of jobs does not wake a thread per job.
            let wake =
                s.waiting > 0 && !s.wake_pending && (!self.serial || s.busy == 0 || !s.sentinel);
            if wake {
                s.wake_pending = true;
            }
            wake
        };
        if wake {
            self.cond.notify_one();
        }
        self.notify.notify_one();
        Ok(rx)
    }

    /// Up to `max` jobs from the front of the queue, leaving out (and
    /// dropping) the ones the core has given up on while they were queued
    /// (timed out, cancelled, handed back at shutdown): no binding ever
    /// starts those. A binding that holds taken jobs a while before running
    /// them (a batch) checks [`Job::abandoned`] again just before each.
    fn take(s: &mut State, max: usize) -> Vec<Job> {
        let max = max.max(1);
        let mut jobs = Vec::with_capacity(max.min(s.queue.len()));
        while jobs.len() < max {
            match s.queue.pop_front() {
                Some(job) if job.abandoned() => drop(job),
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        jobs
    }

    /// Blocks the calling thread until jobs are available (returns up to
    /// `max`), `slice` has passed (returns none), [`Self::interrupt`] was
    /// called (returns none), or the inbox is closed (`Err(Closed)` once the
    /// queue is empty). Not for [`Self::serial`] inboxes (use a
    /// [`Consumer`]): their jobs do not wake every waiter.
    ///
    /// Thread affinity: any thread that is not a tokio runtime worker. Call
    /// it with the interpreter lock released.
    pub fn recv_batch(&self, max: usize, slice: Duration) -> Result<Vec<Job>, Closed> {
        let deadline = Instant::now() + slice;
        let mut s = self.lock();
        let seen = s.interrupts;
        loop {
            if State::live(&mut s) {
                let jobs = Self::take(&mut s, max);
                if !s.queue.is_empty() && s.waiting > 0 && !s.wake_pending {
                    // More work than this thread took: wake the next one.
                    s.wake_pending = true;
                    self.cond.notify_one();
                }
                return Ok(jobs);
            }
            if s.closed {
                return Err(Closed);
            }
            if s.interrupts != seen {
                return Ok(Vec::new());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            s.waiting += 1;
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            s.waiting -= 1;
            s.wake_pending = false;
        }
    }

    /// Non-blocking: up to `max` jobs now.
    pub fn try_recv_batch(&self, max: usize) -> Result<Vec<Job>, Closed> {
        let mut s = self.lock();
        if !State::live(&mut s) && s.closed {
            return Err(Closed);
        }
        Ok(Self::take(&mut s, max))
    }

    /// Waits for up to `max` jobs; `None` once closed and drained.
    ///
    /// # Cancel safety
    /// Cancel safe: no job is taken unless the future completes.
    pub async fn recv_batch_async(&self, max: usize) -> Option<Vec<Job>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if State::live(&mut s) {
                    return Some(Self::take(&mut s, max));
                }
                if s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Wakes every thread blocked in [`Self::recv_batch`] (they return no
    /// jobs). This is the unblock function for Ruby's
    /// `rb_thread_call_without_gvl`; safe from any thread and from signal
    /// handling contexts that may take a mutex.
    pub fn interrupt(&self) {
        self.lock().interrupts += 1;
        self.cond.notify_all();
        self.notify.notify_waiters();
    }

    /// Closes the inbox: waiters return `Closed` once the queue is drained,
    /// and new jobs are refused (their steps are handed back).
    pub fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
        self.notify.notify_waiters();
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// True if no job is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One thread's handle on a [`Inbox::serial`] inbox (see the module docs).
/// Dropping it (the thread stopped serving) gives up its busy mark.
pub struct Consumer {
    inbox: Arc<Inbox>,
    busy: bool,
}

impl Consumer {
    /// A consumer of `inbox` (a [`Inbox::serial`] one), not yet busy.
    pub fn new(inbox: Arc<Inbox>) -> Self {
        Self { inbox, busy: false }
    }

    fn take(&mut self, s: &mut State, max: usize) -> Vec<Job> {
        s.last_take = Some(Instant::now());
        if !self.busy {
            self.busy = true;
            s.busy += 1;
        }
        let jobs = Inbox::take(s, max);
        if s.closed && s.queue.is_empty() {
            // The last job of a closed inbox: the waiters can leave now.
            self.inbox.cond.notify_all();
        }
        jobs
    }

    /// Up to `max` jobs already queued, without waiting (call it while
    /// holding the interpreter lock: it never blocks). Empty when none are.
    pub fn try_next(&mut self, max: usize) -> Result<Vec<Job>, Closed> {
        let inbox = self.inbox.clone();
        let mut s = inbox.lock();
        if !State::live(&mut s) {
            return if s.closed {
                Err(Closed)
            } else {
                Ok(Vec::new())
            };
        }
        Ok(self.take(&mut s, max))
    }

    /// Waits until this thread should take jobs (returns up to `max`),
    /// `slice` has passed or [`Inbox::interrupt`] was called (returns none),
    /// or the inbox is closed and drained (`Err(Closed)`). Call it with the
    /// interpreter lock released; it first gives up the busy mark.
    pub fn next(&mut self, max: usize, slice: Duration) -> Result<Vec<Job>, Closed> {
        let inbox = self.inbox.clone();
        let deadline = Instant::now() + slice;
        let mut s = inbox.lock();
        if self.busy {
            self.busy = false;
            s.busy -= 1;
        }
        let seen = s.interrupts;
        s.waiting += 1;
        let mut sentinel = false;
        let outcome = loop {
            let now = Instant::now();
            if State::live(&mut s) {
                let stalled = s.last_take.is_none_or(|t| now >= t + inbox.stall);
                if s.busy == 0 || stalled {
                    break Ok(self.take(&mut s, max));
                }
            }
            if s.closed && s.queue.is_empty() {
                break Err(Closed);
            }
            if s.interrupts != seen || now >= deadline {
                break Ok(Vec::new());
            }
            // Busy consumers are draining the queue: one waiter watches the
            // clock for a stall, the others sleep until woken.
            let mut until = deadline;
            if !s.queue.is_empty() && (sentinel || !s.sentinel) {
                sentinel = true;
                s.sentinel = true;
                if let Some(t) = s.last_take {
                    until = until.min(t + inbox.stall);
                }
            } else if sentinel {
                sentinel = false;
                s.sentinel = false;
            }
            s = inbox
                .cond
                .wait_timeout(s, until.saturating_duration_since(now))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            s.wake_pending = false;
        };
        s.waiting -= 1;
        if sentinel {
            s.sentinel = false;
            // Hand the watch on if there is still something to watch.
            if !s.queue.is_empty() && s.waiting > 0 && !s.wake_pending {
                s.wake_pending = true;
                inbox.cond.notify_one();
            }
        }
        outcome
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.busy {
            let mut s = self.inbox.lock();
            s.busy -= 1;
            // It may have left jobs for others to take.
            if !s.queue.is_empty() && s.waiting > 0 {
                s.wake_pending = true;
                self.inbox.cond.notify_one();
            }
        }
    }
}

/// A handler implemented in a foreign language: runs by pushing jobs into
/// its runtime's inbox.
pub struct InboxHandler {
    inbox: Arc<Inbox>,
    name: String,
    lang: &'static str,
}

impl InboxHandler {
    /// The capability for handler `name` of kind `kind`, served by `inbox`;
    /// `lang` names the language in error messages.
    pub fn capability(
        inbox: Arc<Inbox>,
        name: &str,
        kind: JobKind,
        lang: &'static str,
    ) -> Capability {
        let h = Arc::new(Self {
            inbox,
            name: name.to_string(),
            lang,
        });
        match kind {
            JobKind::Step => Capability::Plain(h),
            JobKind::Decision => Capability::Decision(h),
            JobKind::Api => Capability::Api(h),
            JobKind::Batch => Capability::Batch(h),
        }
    }

    async fn roundtrip(&self, kind: JobKind, items: Vec<JobItem>) -> Result<Vec<Reply>, StepError> {
        let n = items.len();
        let rx = self
            .inbox
            .push(&self.name, kind, items)
            .map_err(|_| StepError::Cancelled)?;
        let replies = rx.await.map_err(|_| {
            StepError::retryable(format!(
                "the {} handler `{}` dropped the step without answering",
                self.lang, self.name
            ))
        })?;
        if replies.len() != n {
            return Err(StepError::permanent(format!(
                "the {} handler `{}` answered {} outcomes for {n} steps",
                self.lang,
                self.name,
                replies.len()
            )));
        }
        Ok(replies)
    }

    async fn one(&self, kind: JobKind, input: Value, ctx: Context) -> Result<Reply, StepError> {
        let mut r = self.roundtrip(kind, vec![JobItem { input, ctx }]).await?;
        Ok(r.pop().expect("roundtrip checked the count"))
    }

    fn wrong(&self, what: &str) -> StepError {
        StepError::permanent(format!(
            "the {} handler `{}` returned {what}",
            self.lang, self.name
        ))
    }
}

#[async_trait]
impl Handler for InboxHandler {
    async fn run(&self, input: Value, ctx: Context) -> StepResult {
        match self.one(JobKind::Step, input, ctx).await? {
            Reply::Value(v) => Ok(v),
            Reply::Error(e) => Err(e),
            Reply::Api(e) => Err(e.classify()),
            Reply::Decision(_) => {
                Err(self.wrong("a decision, but it is registered as a plain step"))
            }
        }
    }
}

#[async_trait]
impl DecisionCapable for InboxHandler {
    async fn decide(&self, input: Value, ctx: Context) -> StepResult<Decision> {
        match self.one(JobKind::Decision, input, ctx).await? {
            Reply::Decision(d) => Ok(d),
            Reply::Error(e) => Err(e),
            Reply::Api(e) => Err(e.classify()),
            Reply::Value(_) => {
                Err(self.wrong("a plain value, but a decision handler must return a decision"))
            }
        }
    }
}

#[async_trait]
impl APICapable for InboxHandler {
    async fn call(&self, input: Value, ctx: Context) -> Result<Value, ApiError> {
        match self.one(JobKind::Api, input, ctx).await? {
            Reply::Value(v) => Ok(v),
            Reply::Api(e) => Err(e),
            Reply::Error(e) => Err(ApiError::Step(e)),
            Reply::Decision(_) => Err(ApiError::Step(self.wrong("a decision from an API handler"))),
        }
    }
}

#[async_trait]
impl BatchableCapable for InboxHandler {
    async fn run_batch(&self, items: Vec<BatchItem>) -> Vec<StepResult> {
        let n = items.len();
        let items = items
            .into_iter()
            .map(|i| JobItem {
                input: i.input,
                ctx: i.ctx,
            })
            .collect();
        match self.roundtrip(JobKind::Batch, items).await {
            Ok(replies) => replies
                .into_iter()
                .map(|r| match r {
                    Reply::Value(v) => Ok(v),
                    Reply::Error(e) => Err(e),
                    Reply::Api(e) => Err(e.classify()),
                    Reply::Decision(_) => Err(self.wrong("a decision from a batch handler")),
                })
                .collect(),
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(inbox: &Inbox) -> oneshot::Receiver<Vec<Reply>> {
        inbox
            .push("h", JobKind::Step, Vec::new())
            .expect("open inbox")
    }

    /// Runs `next` on another thread; its result arrives on the channel.
    fn wait_on_thread(
        inbox: &Arc<Inbox>,
        slice: Duration,
    ) -> std::sync::mpsc::Receiver<(Result<usize, Closed>, Duration)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let inbox = inbox.clone();
        std::thread::spawn(move || {
            let mut c = Consumer::new(inbox);
            let t = Instant::now();
            let r = c.next(4, slice).map(|j| j.len());
            let _ = tx.send((r, t.elapsed()));
        });
        rx
    }

    /// Until `n` threads wait on `inbox` (a test fails rather than hangs).
    fn until_waiting(inbox: &Inbox, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while inbox.lock().waiting < n {
            assert!(Instant::now() < deadline, "{n} waiters never showed up");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn an_idle_consumer_takes_a_job_at_once_when_nobody_is_busy() {
        let inbox = Inbox::serial();
        let got = wait_on_thread(&inbox, Duration::from_secs(10));
        until_waiting(&inbox, 1);
        let _r = job(&inbox);
        let (n, waited) = got.recv_timeout(Duration::from_secs(20)).expect("woken");
        assert_eq!(n, Ok(1));
        assert!(waited < Duration::from_secs(5));
    }

    #[test]
    fn a_busy_consumer_keeps_the_jobs_and_an_idle_one_takes_over_after_a_stall() {
        let inbox = Inbox::serial();
        let mut busy = Consumer::new(inbox.clone());
        let (_a, _b) = (job(&inbox), job(&inbox));
        assert_eq!(
            busy.try_next(1).unwrap().len(),
            1,
            "queued jobs are taken without waiting"
        );
        let took = Instant::now();

        // `busy` is inside a handler now. The job left in the queue waits for
        // it at first; once the queue has stalled for STALL, an idle thread
        // takes it.
        let idle = wait_on_thread(&inbox, Duration::from_secs(10));
        let (n, _) = idle
            .recv_timeout(Duration::from_secs(20))
            .expect("taken over");
        assert_eq!(n, Ok(1));
        assert!(
            took.elapsed() >= STALL,
            "the idle thread waited for a stall first"
        );

        // While a busy consumer keeps taking jobs, an idle one stays asleep
        // (a long stall time, so that a slow test machine cannot fake one).
        let patient = Inbox::with_mode(true, Duration::from_secs(60));
        let mut worker = Consumer::new(patient.clone());
        let _c = job(&patient);
        assert_eq!(worker.try_next(1).unwrap().len(), 1);
        let idle = wait_on_thread(&patient, Duration::from_secs(2));
        until_waiting(&patient, 1);
        for _ in 0..100 {
            let _r = job(&patient);
            assert_eq!(worker.try_next(4).unwrap().len(), 1);
        }
        let (n, _) = idle
            .recv_timeout(Duration::from_secs(20))
            .expect("slice ends");
        assert_eq!(n, Ok(0), "the idle thread was not needed");

        // A consumer that stops serving while busy lets the others take over at once.
        let idle = wait_on_thread(&inbox, Duration::from_secs(10));
        until_waiting(&inbox, 1);
        let _c = job(&inbox);
        drop(busy);
        let (n, waited) = idle.recv_timeout(Duration::from_secs(20)).expect("woken");
        assert_eq!(n, Ok(1));
        assert!(waited < Duration::from_secs(5));
    }

    #[test]
    fn consumers_leave_on_interrupt_and_on_close_once_the_queue_is_drained() {
        let inbox = Inbox::serial();
        let waiters: Vec<_> = (0..3)
            .map(|_| wait_on_thread(&inbox, Duration::from_secs(30)))
            .collect();
        until_waiting(&inbox, 3);
        inbox.interrupt();
        for w in &waiters {
            let (n, waited) = w
                .recv_timeout(Duration::from_secs(20))
                .expect("interrupted");
            assert_eq!(n, Ok(0));
            assert!(waited < Duration::from_secs(5));
        }

        // Closed while a job is still queued behind a busy consumer: it is
        // still handed out, then every waiter leaves. (A long stall time, so
        // that no waiter takes the job over on a slow machine first.)
        let patient = Inbox::with_mode(true, Duration::from_secs(60));
        let mut busy = Consumer::new(patient.clone());
        let (_a, _b) = (job(&patient), job(&patient));
        assert_eq!(busy.try_next(1).unwrap().len(), 1);
        let waiters: Vec<_> = (0..2)
            .map(|_| wait_on_thread(&patient, Duration::from_secs(30)))
            .collect();
        until_waiting(&patient, 2);
        patient.close();
        assert!(job_refused(&patient), "a closed inbox takes no new jobs");
        assert_eq!(busy.try_next(1).map(|j| j.len()), Ok(1));
        for w in &waiters {
            let (n, waited) = w.recv_timeout(Duration::from_secs(20)).expect("left");
            assert_eq!(n, Err(Closed));
            assert!(waited < Duration::from_secs(20));
        }
        assert_eq!(busy.try_next(1).map(|j| j.len()), Err(Closed));
    }

    /// A job the core gave up on while it was queued (its reply receiver
    /// is gone: timeout, cancellation, shutdown) is never handed to a
    /// binding, whichever way the binding takes jobs.
    #[test]
    fn abandoned_jobs_are_never_handed_out() {
        fn ids(jobs: Vec<Job>) -> Vec<u64> {
            jobs.into_iter().map(|j| j.id).collect()
        }
        let inbox = Inbox::serial();
        let (a, b, c) = (job(&inbox), job(&inbox), job(&inbox));
        drop(a);
        drop(c);
        let mut consumer = Consumer::new(inbox.clone());
        assert_eq!(ids(consumer.try_next(8).unwrap()), vec![2]);
        drop(b);

        let dropped = job(&inbox);
        drop(dropped);
        let got = wait_on_thread(&inbox, Duration::from_millis(300));
        let (n, _) = got
            .recv_timeout(Duration::from_secs(20))
            .expect("slice ends");
        assert_eq!(
            n,
            Ok(0),
            "a consumer waiting on an abandoned job gets nothing"
        );

        let inbox = Inbox::new();
        let (d, _e) = (job(&inbox), job(&inbox));
        drop(d);
        assert_eq!(
            ids(inbox.recv_batch(8, Duration::from_secs(5)).unwrap()),
            vec![2]
        );
        let f = job(&inbox);
        drop(f);
        assert!(inbox.try_recv_batch(8).unwrap().is_empty());
        let (g, _h) = (job(&inbox), job(&inbox));
        drop(g);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = rt.block_on(inbox.recv_batch_async(8)).unwrap();
        assert_eq!(ids(got), vec![5]);
        inbox.close();
        assert!(rt.block_on(inbox.recv_batch_async(8)).is_none());
    }

    fn job_refused(inbox: &Inbox) -> bool {
        inbox.push("h", JobKind::Step, Vec::new()).is_err()
    }

    #[test]
    fn handler_specs_are_checked_in_one_place() {
        let spec = HandlerSpec {
            concurrency: Some(3),
            timeout: Some(1.5),
            max_attempts: Some(2),
            max_batch: Some(8),
            linger: Some(0.01),
            ..HandlerSpec::default()
        };
        let o = spec
            .build("h", JobKind::Batch, 64, |f| f.to_string())
            .unwrap();
        assert_eq!(o.concurrency, 3);
        assert_eq!(o.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(o.retry.max_attempts, 2);
        assert_eq!((o.max_batch, o.linger), (8, Duration::from_millis(10)));
        let d = HandlerSpec::default()
            .build("h", JobKind::Step, 64, |f| f.to_string())
            .unwrap();
        assert_eq!(d.concurrency, 64);

        let err = |spec: HandlerSpec, kind| spec.build("h", kind, 8, camel_case).unwrap_err();
        let e = err(
            HandlerSpec {
                max_batch: Some(8),
                ..Default::default()
            },
            JobKind::Step,
        );
        assert_eq!(e, "handler `h`: maxBatch applies to batch handlers only");
        let e = err(
            HandlerSpec {
                rate_limit: Some(5.0),
                ..Default::default()
            },
            JobKind::Step,
        );
        assert!(e.contains("rateLimit applies to api handlers only"), "{e}");
        let e = err(
            HandlerSpec {
                timeout: Some(-1.0),
                ..Default::default()
            },
            JobKind::Step,
        );
        assert!(
            e.contains("timeout must be a non-negative number of seconds, got -1"),
            "{e}"
        );
        let e = err(
            HandlerSpec {
                max_attempts: Some(0),
                ..Default::default()
            },
            JobKind::Api,
        );
        assert!(e.contains("maxAttempts must be at least 1"), "{e}");
        let e = err(
            HandlerSpec {
                rate_limit: Some(f64::NAN),
                ..Default::default()
            },
            JobKind::Api,
        );
        assert!(e.contains("rateLimit must be a positive number"), "{e}");
        assert_eq!(JobKind::from_name("api"), Ok(JobKind::Api));
        assert!(JobKind::from_name("cron")
            .unwrap_err()
            .contains("unknown handler kind `cron`"));
        assert_eq!(JobKind::Decision.name(), "decision");
    }

    #[test]
    fn recv_batch_times_out_and_interrupts() {
        let inbox = Inbox::new();
        assert!(inbox
            .recv_batch(8, Duration::from_millis(5))
            .unwrap()
            .is_empty());
        let i2 = inbox.clone();
        let t = std::thread::spawn(move || i2.recv_batch(8, Duration::from_secs(30)));
        // Interrupt until the blocked thread has observed it (it may not be
        // waiting yet when the first interrupt fires).
        while !t.is_finished() {
            inbox.interrupt();
            std::thread::yield_now();
        }
        assert!(t.join().unwrap().unwrap().is_empty());
        inbox.close();
        assert_eq!(
            inbox.recv_batch(8, Duration::from_secs(30)).unwrap_err(),
            Closed
        );
    }
}
