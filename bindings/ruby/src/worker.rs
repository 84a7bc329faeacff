//! `Switchyard::Native::Worker` and `Switchyard::Native::Job`: a host whose
//! handlers are Ruby blocks. The core pushes jobs into one serial inbox;
//! each Ruby handler thread reads it through its own
//! `Switchyard::Native::Consumer` (a thread running blocks keeps taking the
//! queued jobs with the GVL held; idle threads wait without the GVL and are
//! woken only when needed) and answers each job once, without blocking.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use magnus::{function, method, prelude::*, Error, RArray, RHash, RModule, Ruby, Value};
use parking_lot::Mutex;
use serde_json::Value as Json;
use switchyard_core::bridge::{
    Closed, Consumer, ErrorClass, HandlerSpec, Host, HostPlan, Inbox, Job, JobKind, Reply,
};
use tokio_util::sync::CancellationToken;

use crate::client::open_store;
use crate::context::RbContext;
use crate::convert::{to_json, to_ruby};
use crate::errors::{base_error, core_err, error, reply_for};
use crate::{block, guard, nogvl};

/// A host for Ruby handlers.
#[magnus::wrap(class = "Switchyard::Native::Worker", free_immediately, size)]
pub struct RbWorker {
    store_url: String,
    /// Registration, start and bounded stop: the core's lifecycle.
    host: Arc<Host>,
    inbox: Arc<Inbox>,
    /// The process that started it, 0 before (see [`crate::check_owner`]).
    /// A worker made but not started before `fork` may start in the child.
    started_in: AtomicU32,
}

impl Drop for RbWorker {
    fn drop(&mut self) {
        let pid = self.started_in.load(Ordering::Relaxed);
        if pid != 0 && pid != std::process::id() {
            // Freed in a forked child: the host's tasks, store and queued
            // jobs belong to the parent's threads, which do not exist here;
            // dropping them could wait for those threads forever. Leak them.
            std::mem::forget(self.host.clone());
            std::mem::forget(self.inbox.clone());
        }
    }
}

/// One handler thread's handle on the worker's inbox.
#[magnus::wrap(class = "Switchyard::Native::Consumer", free_immediately, size)]
pub struct RbConsumer {
    inner: Mutex<Consumer>,
}

fn arg_error(ruby: &Ruby, msg: String) -> Error {
    Error::new(ruby.exception_arg_error(), msg)
}

/// Seconds as a Duration, rejecting negative and non-finite values.
pub(crate) fn secs(ruby: &Ruby, what: &str, s: f64) -> Result<Duration, Error> {
    switchyard_core::bridge::seconds(what, s).map_err(|e| arg_error(ruby, e))
}

fn opt<T: magnus::TryConvert>(
    ruby: &Ruby,
    h: RHash,
    key: &str,
    handler: &str,
) -> Result<Option<T>, Error> {
    match h.get(ruby.to_symbol(key)) {
        None => Ok(None),
        Some(v) if v.is_nil() => Ok(None),
        Some(v) => T::try_convert(v).map(Some).map_err(|e| {
            Error::new(
                ruby.exception_type_error(),
                format!("handler `{handler}`: option {key}: {e}"),
            )
        }),
    }
}

impl RbWorker {
    fn new(
        ruby: &Ruby,
        store: String,
        concurrency: usize,
        lease: f64,
        shutdown_grace: f64,
        max_payload: Option<usize>,
        health_listen: Option<String>,
    ) -> Result<Self, Error> {
        if concurrency == 0 {
            return Err(arg_error(ruby, "concurrency must be at least 1".into()));
        }
        let mut plan = HostPlan::new(
            concurrency,
            secs(ruby, "lease", lease)?,
            secs(ruby, "shutdown_grace", shutdown_grace)?,
            max_payload,
        );
        if let Some(a) = health_listen {
            plan.health_listen = Some(
                switchyard_core::bridge::listen_address("health_listen", &a)
                    .map_err(|m| arg_error(ruby, m))?,
            );
        }
        switchyard_store::check_url(&store).map_err(|e| core_err(ruby, e))?;
        Ok(Self::with_plan(store, plan))
    }

    fn with_plan(store_url: String, plan: HostPlan) -> Self {
        let inbox = Inbox::serial();
        // Push cancellation comes through the inbox (`next_cancels`).
        inbox.watch_cancels();
        Self {
            store_url,
            host: Arc::new(Host::new(switchyard_core::bridge::Language::Ruby, plan)),
            inbox,
            started_in: AtomicU32::new(0),
        }
    }

    /// A worker from the configuration (`switchyard_core::config`): the
    /// file at `path`, else `SWITCHYARD_CONFIG`, else none, then the
    /// `SWITCHYARD_*` environment; its store and `[host]` settings, and its
    /// `log.level` for the core's log records (unless `SWITCHYARD_LOG` is set).
    fn from_config(ruby: &Ruby, path: Option<String>) -> Result<Self, Error> {
        let config = switchyard_core::Config::load(path.as_deref().map(std::path::Path::new))
            .map_err(|e| core_err(ruby, e))?;
        let url = config.store.open_url().map_err(|e| core_err(ruby, e))?;
        crate::apply_log_level(&config.log);
        switchyard_store::check_url(&url).map_err(|e| core_err(ruby, e))?;
        Ok(Self::with_plan(url, HostPlan::from_config(&config.host)))
    }

    /// The store URL the worker opens (with its password, if any).
    fn store_url(&self) -> String {
        self.store_url.clone()
    }

    /// Steps run at once by the host.
    fn concurrency(&self) -> usize {
        self.host.concurrency()
    }

    /// Seconds running steps may finish during a graceful shutdown.
    fn shutdown_grace(&self) -> f64 {
        self.host.shutdown_grace().as_secs_f64()
    }

    /// Registers handler `name` of `kind` with options (a Hash with symbol
    /// keys: concurrency, timeout, max_attempts, initial_backoff,
    /// max_backoff, max_batch, linger, rate_limit, burst) and returns its id
    /// (0, 1, 2… in order), which its jobs carry.
    fn register(
        ruby: &Ruby,
        rb_self: &Self,
        name: String,
        kind: String,
        o: RHash,
    ) -> Result<usize, Error> {
        guard(ruby, || {
            if rb_self.host.host_id().is_some() {
                return Err(error(
                    ruby,
                    ErrorClass::Config,
                    "register handlers before the worker starts".into(),
                ));
            }
            switchyard_core::client::validate_name("handler name", &name)
                .map_err(|e| core_err(ruby, e))?;
            let kind = JobKind::from_name(&kind).map_err(|e| arg_error(ruby, e))?;
            let spec = HandlerSpec {
                concurrency: opt::<usize>(ruby, o, "concurrency", &name)?,
                timeout: opt::<f64>(ruby, o, "timeout", &name)?,
                max_attempts: opt::<u32>(ruby, o, "max_attempts", &name)?,
                initial_backoff: opt::<f64>(ruby, o, "initial_backoff", &name)?,
                max_backoff: opt::<f64>(ruby, o, "max_backoff", &name)?,
                max_batch: opt::<usize>(ruby, o, "max_batch", &name)?,
                linger: opt::<f64>(ruby, o, "linger", &name)?,
                rate_limit: opt::<f64>(ruby, o, "rate_limit", &name)?,
                burst: opt::<u32>(ruby, o, "burst", &name)?,
            };
            // A bad option is an ArgumentError; a name registered twice a
            // ConfigError (the host's only other refusal here).
            spec.build(&name, kind, 1, str::to_string)
                .map_err(|e| arg_error(ruby, e))?;
            rb_self
                .host
                .register(name, kind, &spec, &rb_self.inbox, str::to_string)
                .map_err(|e| error(ruby, ErrorClass::Config, e))
        })
    }

    /// Opens the store and starts the host; returns its id.
    fn start(ruby: &Ruby, rb_self: &Self) -> Result<String, Error> {
        guard(ruby, || {
            rb_self.check_owner(ruby)?;
            if rb_self.host.host_id().is_some() {
                return Err(error(
                    ruby,
                    ErrorClass::Config,
                    "the worker was already started".into(),
                ));
            }
            let store = open_store(ruby, &rb_self.store_url)?;
            let host = rb_self.host.clone();
            let id = crate::block_core(ruby, async move { host.start(store).await })?;
            rb_self
                .started_in
                .store(std::process::id(), Ordering::Relaxed);
            Ok(id)
        })
    }

    /// Refuses a worker started in a process this one was forked from.
    fn check_owner(&self, ruby: &Ruby) -> Result<(), Error> {
        match self.started_in.load(Ordering::Relaxed) {
            0 => Ok(()),
            pid => crate::check_owner(ruby, pid),
        }
    }

    fn host_id(&self) -> Option<String> {
        self.host.host_id()
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served, once started
    /// with `health_listen`.
    fn health_addr(&self) -> Option<String> {
        self.host.health_addr().map(|a| a.to_string())
    }

    /// Up to `max` jobs for the thread holding `consumer`: those already
    /// queued at once (with the GVL), otherwise after a wait without it.
    fn take(
        &self,
        ruby: &Ruby,
        consumer: &RbConsumer,
        max: usize,
        slice: Duration,
    ) -> Result<Result<Vec<Job>, Closed>, Error> {
        let mut consumer = consumer.inner.lock();
        match consumer.try_next(max) {
            Ok(jobs) if jobs.is_empty() => {
                let c = &mut *consumer;
                nogvl(ruby, || c.next(max, slice), || self.inbox.interrupt())
            }
            other => Ok(other),
        }
    }

    /// A handle on the inbox for one handler thread.
    fn consumer(&self) -> RbConsumer {
        RbConsumer {
            inner: Mutex::new(Consumer::new(self.inbox.clone())),
        }
    }

    /// Takes up to `max` jobs for the thread holding `consumer`, waiting at
    /// most `timeout` seconds without the GVL. Each job is `[job,
    /// handler_id, input, ctx]` (batch jobs: `[job, handler_id, [[input,
    /// ctx], ...], nil]`). Returns nil once the
    /// worker has stopped. An interrupt (`Thread#kill`, `Thread#raise`)
    /// ends the wait at once.
    fn next_jobs(
        ruby: &Ruby,
        rb_self: &Self,
        consumer: &RbConsumer,
        max: usize,
        timeout: f64,
    ) -> Result<Option<RArray>, Error> {
        guard(ruby, || {
            rb_self.check_owner(ruby)?;
            let slice = secs(ruby, "timeout", timeout)?;
            crate::runtime(ruby)?;
            let jobs = match rb_self.take(ruby, consumer, max, slice)? {
                Ok(j) => j,
                Err(Closed) => return Ok(None),
            };
            if jobs.is_empty() {
                // Woken by the unblock function: raise what is pending.
                ruby.thread_check_ints()?;
            }
            let out = ruby.ary_new_capa(jobs.len());
            for mut job in jobs {
                let tokens = job
                    .items
                    .iter()
                    .map(|i| i.ctx.cancellation_token())
                    .collect();
                let entry = ruby.ary_new_capa(4);
                let items = std::mem::take(&mut job.items);
                let batch = job.kind == JobKind::Batch;
                let handler = job.handler_id;
                let rjob = RbJob {
                    id: job.id,
                    items: items.len(),
                    handler: job.handler.clone(),
                    job: Mutex::new(Some(job)),
                    tokens,
                };
                entry.push(rjob)?;
                entry.push(handler)?;
                if batch {
                    let list = ruby.ary_new_capa(items.len());
                    for it in items {
                        let pair = ruby.ary_new_capa(2);
                        pair.push(to_ruby(ruby, &it.input)?)?;
                        pair.push(RbContext::new(it.ctx))?;
                        list.push(pair)?;
                    }
                    entry.push(list)?;
                    entry.push(ruby.qnil())?;
                } else {
                    for it in items {
                        entry.push(to_ruby(ruby, &it.input)?)?;
                        entry.push(RbContext::new(it.ctx))?;
                    }
                }
                out.push(entry)?;
            }
            Ok(Some(out))
        })
    }

    /// Ids of jobs that should stop (the core's cancellation notices, see
    /// [`Inbox::recv_cancels`]), waiting at most `timeout` seconds without
    /// the GVL; nil once stopped. The watcher thread raises `Interrupted`
    /// into the thread running each.
    fn next_cancels(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<Option<Vec<u64>>, Error> {
        guard(ruby, || {
            let slice = secs(ruby, "timeout", timeout)?;
            let inbox = rb_self.inbox.clone();
            let got = nogvl(
                ruby,
                || inbox.recv_cancels(slice).ok(),
                || rb_self.inbox.interrupt(),
            )?;
            if got.as_ref().is_some_and(|v| v.is_empty()) {
                ruby.thread_check_ints()?;
            }
            Ok(got)
        })
    }

    /// Wakes threads blocked in `next_jobs` (they return an empty list).
    fn interrupt(&self) {
        self.inbox.interrupt();
    }

    /// Begins a graceful shutdown and returns at once.
    fn shutdown(&self) {
        self.host.shutdown();
    }

    /// Stops the host: no more claims, running steps get the grace period,
    /// then the inbox closes so handler threads see nil and exit. Waits
    /// without the GVL: the handler threads keep serving meanwhile.
    fn stop(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        guard(ruby, || {
            rb_self.check_owner(ruby)?;
            let host = rb_self.host.clone();
            block(ruby, async move { host.stop().await })?;
            // The inbox closes with the host; also when nothing was registered.
            rb_self.inbox.close();
            Ok(())
        })
    }

    fn is_running(&self) -> bool {
        self.host.is_running()
    }

    fn inflight(&self) -> usize {
        self.host.inflight()
    }
}

/// One unit of work for a Ruby handler: one step, or a batch. Holds the
/// reply channel; the items went to Ruby.
#[magnus::wrap(class = "Switchyard::Native::Job", free_immediately, size)]
pub struct RbJob {
    id: u64,
    /// How many steps the job carries (its items went to Ruby).
    items: usize,
    handler: String,
    job: Mutex<Option<Job>>,
    /// The cancellation tokens of its steps' runs (for [`RbJob::hand_back`]).
    tokens: Vec<CancellationToken>,
}

/// A value a handler returned; one with no JSON form fails the step
/// permanently, saying what it was.
fn value_reply(ruby: &Ruby, handler: &str, v: Value) -> Result<Json, Reply> {
    to_json(ruby, v, "a result")
        .map_err(|e| Reply::unrepresentable("Ruby", handler, &e.to_string()))
}

impl RbJob {
    fn take(&self, ruby: &Ruby) -> Result<Job, Error> {
        self.job
            .lock()
            .take()
            .ok_or_else(|| base_error(ruby, "this job was already finished".into()))
    }

    /// Answers a one-item job with the value its block returned. Never
    /// blocks.
    fn ok(ruby: &Ruby, rb_self: &Self, v: Value) -> Result<(), Error> {
        guard(ruby, || {
            let job = rb_self.take(ruby)?;
            let r = value_reply(ruby, &rb_self.handler, v).map_or_else(|r| r, Reply::Value);
            job.complete(vec![r]);
            Ok(())
        })
    }

    /// Answers every step of the job with exception `e` that its block
    /// raised (`message` and `trace` as the Ruby side rendered them).
    fn fail(
        ruby: &Ruby,
        rb_self: &Self,
        e: Value,
        message: String,
        trace: Option<String>,
    ) -> Result<(), Error> {
        guard(ruby, || {
            let job = rb_self.take(ruby)?;
            let r = reply_for(ruby, e, message, trace);
            job.complete(vec![r; rb_self.items]);
            Ok(())
        })
    }

    /// Answers a decision job with "complete the task with `v`".
    fn complete(ruby: &Ruby, rb_self: &Self, v: Value) -> Result<(), Error> {
        guard(ruby, || {
            let job = rb_self.take(ruby)?;
            let r = value_reply(ruby, &rb_self.handler, v).map_or_else(|r| r, Reply::complete);
            job.complete(vec![r]);
            Ok(())
        })
    }

    /// Answers a decision job with the steps it plans (Hashes with `name`,
    /// `handler`, `input`, `depends_on`), finishing with `final_step`.
    fn decide(
        ruby: &Ruby,
        rb_self: &Self,
        steps: Value,
        final_step: Option<String>,
    ) -> Result<(), Error> {
        guard(ruby, || {
            let job = rb_self.take(ruby)?;
            let handler = &rb_self.handler;
            let r = match to_json(ruby, steps, &format!("decision of handler `{handler}`")) {
                Ok(steps) => Reply::decision_steps(handler, steps, final_step),
                Err(e) => Reply::error(ErrorClass::Permanent, e.to_string(), None, None),
            };
            job.complete(vec![r]);
            Ok(())
        })
    }

    /// Answers a batch job: `results` has one value or Exception per step;
    /// `rendered[i]` is `[message, trace]` for an Exception, as the Ruby
    /// side rendered it.
    fn finish(ruby: &Ruby, rb_self: &Self, results: RArray, rendered: RArray) -> Result<(), Error> {
        guard(ruby, || {
            let job = rb_self.take(ruby)?;
            let exception = ruby.exception_exception();
            let mut replies = Vec::with_capacity(results.len());
            for i in 0..results.len() {
                let v: Value = results.entry(i as isize)?;
                replies.push(if v.is_kind_of(exception) {
                    let (message, trace): (String, Option<String>) = rendered.entry(i as isize)?;
                    reply_for(ruby, v, message, trace)
                } else {
                    value_reply(ruby, &rb_self.handler, v).map_or_else(|r| r, Reply::Value)
                });
            }
            job.complete(replies);
            Ok(())
        })
    }

    /// Answers a job that was never answered (its thread was killed, or the
    /// glue failed) with a retryable error, so the step is retried now
    /// instead of when the handler times out. No-op once answered.
    fn release(&self, why: String) {
        if let Some(job) = self.job.lock().take() {
            let replies = (0..self.items)
                .map(|_| Reply::error(ErrorClass::Retryable, why.clone(), None, None))
                .collect();
            job.complete(replies);
        }
    }

    /// Hands the job's steps back without an outcome, the way shutdown
    /// does (no attempt is counted): their runs are cancelled and the job
    /// stays unanswered until the core gives up on it (a cancelled run
    /// within the core's cancel grace, a batch when shutdown's grace ends),
    /// then the core releases the steps. For a handler that raised
    /// `Interrupt`, `SignalException` or `SystemExit`: the Ruby side then
    /// stops the worker. No-op once answered.
    fn hand_back(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        guard(ruby, || {
            let Some(job) = rb_self.job.lock().take() else {
                return Ok(());
            };
            for t in &rb_self.tokens {
                t.cancel();
            }
            crate::runtime(ruby)?.spawn(async move {
                // Answering (or dropping) the job would record an outcome.
                while !job.abandoned() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            Ok(())
        })
    }

    /// True if the core stopped waiting (timeout, cancellation, shutdown).
    fn abandoned(&self) -> bool {
        self.job
            .lock()
            .as_ref()
            .map(|j| j.abandoned())
            .unwrap_or(true)
    }

    fn handler(&self) -> String {
        self.handler.clone()
    }

    fn id(&self) -> u64 {
        self.id
    }
}

pub fn define(ruby: &Ruby, _switchyard: RModule, native: RModule) -> Result<(), Error> {
    let w = native.define_class("Worker", ruby.class_object())?;
    w.define_singleton_method("new", function!(RbWorker::new, 6))?;
    w.define_singleton_method("from_config", function!(RbWorker::from_config, 1))?;
    w.define_method("store_url", method!(RbWorker::store_url, 0))?;
    w.define_method("concurrency", method!(RbWorker::concurrency, 0))?;
    w.define_method("shutdown_grace", method!(RbWorker::shutdown_grace, 0))?;
    w.define_method("register", method!(RbWorker::register, 3))?;
    w.define_method("start", method!(RbWorker::start, 0))?;
    w.define_method("host_id", method!(RbWorker::host_id, 0))?;
    w.define_method("health_addr", method!(RbWorker::health_addr, 0))?;
    w.define_method("consumer", method!(RbWorker::consumer, 0))?;
    w.define_method("next_jobs", method!(RbWorker::next_jobs, 3))?;
    native.define_class("Consumer", ruby.class_object())?;
    w.define_method("interrupt", method!(RbWorker::interrupt, 0))?;
    w.define_method("next_cancels", method!(RbWorker::next_cancels, 1))?;
    w.define_method("shutdown", method!(RbWorker::shutdown, 0))?;
    w.define_method("stop", method!(RbWorker::stop, 0))?;
    w.define_method("running?", method!(RbWorker::is_running, 0))?;
    w.define_method("inflight", method!(RbWorker::inflight, 0))?;
    let j = native.define_class("Job", ruby.class_object())?;
    j.define_method("ok", method!(RbJob::ok, 1))?;
    j.define_method("fail", method!(RbJob::fail, 3))?;
    j.define_method("complete", method!(RbJob::complete, 1))?;
    j.define_method("decide", method!(RbJob::decide, 2))?;
    j.define_method("finish", method!(RbJob::finish, 2))?;
    j.define_method("abandoned?", method!(RbJob::abandoned, 0))?;
    j.define_method("handler", method!(RbJob::handler, 0))?;
    j.define_method("id", method!(RbJob::id, 0))?;
    j.define_method("release", method!(RbJob::release, 1))?;
    j.define_method("hand_back", method!(RbJob::hand_back, 0))?;
    Ok(())
}
