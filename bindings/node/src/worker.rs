//! `NativeWorker`: a host whose handlers are JS functions.
//!
//! The core pushes jobs into one [`Inbox`]; a feeder task awaits
//! [`Inbox::recv_batch_async`] and hands each batch to JS through one
//! thread-safe function call (the catching variant, so a throwing dispatcher
//! fails the batch's steps instead of killing the process). JS starts every
//! handler at once and answers finished jobs in batches through
//! [`NativeWorker::complete`], which never blocks. Jobs are answered as they
//! finish rather than per batch, so one slow handler does not hold the slots
//! of the fast ones handed over with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunction;
use napi_derive::napi;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::Value;
use switchyard_core::bridge::{camel_case, HandlerSpec, HostPlan, Inbox, Job, JobKind, Reply};
use switchyard_core::{ApiError, Decision, NewStep, RunningWorker, StepError, WaitFor};
use tokio_util::sync::CancellationToken;

use crate::client::open_store;
use crate::context::NativeContext;
use crate::errors::{core_err, ok};

/// Jobs handed to JS per thread-safe call, at most.
const MAX_BATCH: usize = 256;

/// One job as JS sees it: `inputs[i]` (JSON text) goes with `contexts[i]`.
#[napi(object, object_from_js = false)]
pub struct JsJob {
    /// Answer with this id.
    pub id: i64,
    /// The handler to run.
    pub handler: String,
    /// `step`, `batch`, `decision` or `api`.
    pub kind: String,
    /// Inputs as JSON text.
    pub inputs: Vec<String>,
    /// One durable context per input.
    pub contexts: Vec<NativeContext>,
}

/// The JS dispatcher: `(jobs) => void`.
type Dispatch = ThreadsafeFunction<Vec<JsJob>, (), Vec<JsJob>, Status, false>;

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
    done: Vec<CancellationToken>,
}

impl Pending {
    fn answer(self, replies: Vec<Reply>) {
        for d in &self.done {
            d.cancel();
        }
        self.job.complete(replies);
    }
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// A host for JS handlers.
#[napi]
pub struct NativeWorker {
    store_url: String,
    plan: Mutex<HostPlan>,
    inbox: Arc<Inbox>,
    running: Arc<Mutex<Option<Arc<RunningWorker>>>>,
    pending: PendingMap,
    feeder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    completions: Mutex<Option<Completions>>,
    stopping: CancellationToken,
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    switchyard_core::bridge::seconds(what, s).map_err(Error::from_reason)
}

fn retry_after(s: Option<f64>) -> Option<Duration> {
    s.filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// One outcome as the TypeScript glue encodes it.
#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Outcome {
    Value {
        #[serde(default)]
        v: Value,
    },
    Error {
        kind: String,
        message: String,
        #[serde(default)]
        trace: Option<String>,
        #[serde(default)]
        retry_after: Option<f64>,
    },
    Suspend {
        wait: Value,
    },
    Complete {
        #[serde(default)]
        v: Value,
    },
    Decision {
        steps: Value,
        #[serde(default)]
        final_step: Option<String>,
    },
    Http {
        status: u16,
        #[serde(default)]
        retry_after: Option<f64>,
        #[serde(default)]
        message: String,
    },
    Network {
        message: String,
    },
}

fn reply(handler: &str, o: Outcome) -> Reply {
    match o {
        Outcome::Value { v } => Reply::Value(v),
        Outcome::Complete { v } => Reply::Decision(Decision::Complete(v)),
        Outcome::Error {
            kind,
            message,
            trace,
            retry_after: ra,
        } => Reply::Error(match kind.as_str() {
            "retryable" => StepError::Retryable {
                message,
                retry_after: retry_after(ra),
                trace,
            },
            "invalid_input" => StepError::InvalidInput(message),
            "cancelled" => StepError::Cancelled,
            "lease_lost" => StepError::LeaseLost,
            "await_timeout" => StepError::AwaitTimeout { event: message },
            _ => StepError::Permanent { message, trace },
        }),
        Outcome::Suspend { wait } => match serde_json::from_value::<WaitFor>(wait) {
            Ok(w) => Reply::Error(StepError::Suspend(w)),
            Err(e) => Reply::Error(StepError::permanent(format!(
                "handler `{handler}`: a suspension was forged or corrupted: {e}"
            ))),
        },
        Outcome::Decision { steps, final_step } => {
            match serde_json::from_value::<Vec<NewStep>>(steps) {
                Ok(steps) => Reply::Decision(Decision::Steps { steps, final_step }),
                Err(e) => Reply::Error(StepError::permanent(format!(
                    "decision of handler `{handler}`: each step needs `name`, `handler`, \
                     `input` and optional `dependsOn`: {e}"
                ))),
            }
        }
        Outcome::Http {
            status,
            retry_after: ra,
            message,
        } => Reply::Api(ApiError::Http {
            status,
            retry_after: retry_after(ra),
            message,
        }),
        Outcome::Network { message } => Reply::Api(ApiError::Network(message)),
    }
}

/// Answers every item of the jobs with the same error.
fn fail_all(pending: &PendingMap, ids: &[u64], e: StepError) {
    let mut map = pending.lock();
    for id in ids {
        if let Some(p) = map.remove(id) {
            let n = p.done.len();
            p.answer((0..n).map(|_| Reply::Error(e.clone())).collect());
        }
    }
}

/// Answers the jobs of one `complete` call.
fn answer_batch(pending: &PendingMap, batch: Vec<(u64, String)>) {
    let mut answered = Vec::with_capacity(batch.len());
    {
        let mut map = pending.lock();
        for (id, r) in batch {
            if let Some(p) = map.remove(&id) {
                answered.push((p, r));
            }
        }
    }
    for (p, r) in answered {
        let n = p.done.len();
        let handler = p.job.handler.clone();
        let replies = match serde_json::from_str::<Vec<Outcome>>(&r) {
            Ok(os) => os.into_iter().map(|o| reply(&handler, o)).collect(),
            Err(e) => {
                let e = StepError::permanent(format!(
                    "handler `{handler}`: bad outcome from the TypeScript glue: {e}"
                ));
                (0..n).map(|_| Reply::Error(e.clone())).collect()
            }
        };
        p.answer(replies);
    }
}

type Completions = tokio::sync::mpsc::UnboundedSender<Vec<(u64, String)>>;

async fn feed(
    running: Arc<RunningWorker>,
    inbox: Arc<Inbox>,
    pending: PendingMap,
    stopping: CancellationToken,
    dispatch: Dispatch,
) {
    while let Some(jobs) = inbox.recv_batch_async(MAX_BATCH).await {
        let mut out = Vec::with_capacity(jobs.len());
        let mut ids = Vec::with_capacity(jobs.len());
        {
            let mut map = pending.lock();
            for mut job in jobs {
                if job.abandoned() {
                    // Timed out or cancelled while queued: nothing to run.
                    continue;
                }
                let mut inputs = Vec::with_capacity(job.items.len());
                let mut contexts = Vec::with_capacity(job.items.len());
                let mut done = Vec::with_capacity(job.items.len());
                for item in job.items.drain(..) {
                    inputs.push(item.input.to_string());
                    let d = CancellationToken::new();
                    done.push(d.clone());
                    contexts.push(NativeContext {
                        ctx: item.ctx,
                        done: d,
                        stopping: stopping.clone(),
                    });
                }
                out.push(JsJob {
                    id: job.id as i64,
                    handler: job.handler.clone(),
                    kind: job.kind.name().to_string(),
                    inputs,
                    contexts,
                });
                ids.push(job.id);
                map.insert(job.id, Pending { job, done });
            }
        }
        if out.is_empty() {
            continue;
        }
        match dispatch.call_async_catch(out).await {
            Ok(()) => {}
            Err(e) if e.status == Status::Closing => {
                // The JS environment is going away (a worker thread was
                // terminated, or the process exits) without `close()`: stop
                // claiming and hand the steps back without costing an attempt.
                running.shutdown();
                inbox.close();
                fail_all(&pending, &ids, StepError::Cancelled);
            }
            Err(e) => fail_all(
                &pending,
                &ids,
                StepError::retryable(format!("the JS dispatcher failed: {e}")),
            ),
        }
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
        });
        let concurrency = o.concurrency.unwrap_or(64) as usize;
        if concurrency == 0 {
            return Err(Error::from_reason("concurrency must be at least 1"));
        }
        let inbox = Inbox::new();
        let running: Arc<Mutex<Option<Arc<RunningWorker>>>> = Arc::default();
        let stopping = CancellationToken::new();
        // When the JS environment goes away without `close()` (a worker
        // thread is terminated), stop claiming and refuse new jobs so their
        // steps are handed back instead of waiting for lease expiry.
        env.add_env_cleanup_hook(
            (inbox.clone(), running.clone(), stopping.clone()),
            |(inbox, running, stopping)| {
                stopping.cancel();
                if let Some(r) = running.lock().as_ref() {
                    r.shutdown();
                }
                inbox.close();
            },
        )?;
        Ok(Self {
            store_url,
            plan: Mutex::new(HostPlan::new(
                concurrency,
                seconds("lease", o.lease.unwrap_or(30.0))?,
                seconds("shutdownGrace", o.shutdown_grace.unwrap_or(10.0))?,
                o.max_payload_bytes.map(|n| n as usize),
            )),
            inbox,
            running,
            pending: Arc::new(Mutex::new(HashMap::new())),
            feeder: Mutex::new(None),
            completions: Mutex::new(None),
            stopping,
        })
    }

    /// Registers handler `name` of `kind` (step, batch, decision, api).
    #[napi]
    pub fn register(
        &self,
        name: String,
        kind: String,
        options: Option<NativeHandlerOptions>,
    ) -> Result<()> {
        if self.running.lock().is_some() || self.inbox.is_closed() {
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
        let mut plan = self.plan.lock();
        let opts = spec
            .build(&name, kind, plan.concurrency, camel_case)
            .map_err(Error::from_reason)?;
        plan.register(name, kind, opts, self.inbox.clone())
            .map_err(Error::from_reason)
    }

    /// Opens the store, starts the host and begins handing jobs to
    /// `dispatch`. Resolves to an envelope with the host id.
    ///
    /// While running, the thread-safe function keeps the event loop alive;
    /// `stop` releases it.
    #[napi(ts_args_type = "dispatch: (jobs: JsJob[]) => void")]
    pub async fn start(&self, dispatch: Dispatch) -> String {
        if self.running.lock().is_some() || self.inbox.is_closed() {
            return core_err(&switchyard_core::Error::Config(
                "the worker was already started".into(),
            ));
        }
        let store = match open_store(&self.store_url).await {
            Ok(s) => s,
            Err(e) => return core_err(&e),
        };
        let built = self.plan.lock().build(store, "JavaScript");
        let worker = match built {
            Ok(w) => w,
            Err(e) => return core_err(&e),
        };
        let running = match worker.start().await {
            Ok(r) => Arc::new(r),
            Err(e) => return core_err(&e),
        };
        let id = running.host_id().to_string();
        let raced = {
            let mut slot = self.running.lock();
            if slot.is_some() {
                true
            } else {
                *slot = Some(running.clone());
                false
            }
        };
        if raced {
            // Two concurrent start() calls: keep the first.
            running.stop().await;
            return core_err(&switchyard_core::Error::Config(
                "the worker was already started".into(),
            ));
        }
        if self.stopping.is_cancelled() {
            // stop() ran while the store was opening.
            running.stop().await;
            return core_err(&switchyard_core::Error::Shutdown);
        }
        let feeder = tokio::spawn(feed(
            running,
            self.inbox.clone(),
            self.pending.clone(),
            self.stopping.clone(),
            dispatch,
        ));
        *self.feeder.lock() = Some(feeder);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<(u64, String)>>();
        let pending = self.pending.clone();
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                answer_batch(&pending, batch);
            }
        });
        *self.completions.lock() = Some(tx);
        ok(Value::String(id))
    }

    /// The host id once started.
    #[napi(getter)]
    pub fn host_id(&self) -> Option<String> {
        self.running
            .lock()
            .as_ref()
            .map(|r| r.host_id().to_string())
    }

    /// Steps currently held by JS handlers.
    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        self.pending.lock().len() as u32
    }

    /// Answers finished jobs: `replies[i]` is the JSON array of outcomes for
    /// job `ids[i]`, one per item. Never blocks; unknown ids (the core gave
    /// up, or a second answer) are ignored.
    #[napi]
    pub fn complete(&self, ids: Vec<i64>, replies: Vec<String>) -> Result<()> {
        if ids.len() != replies.len() {
            return Err(Error::from_reason(format!(
                "complete: {} ids but {} replies",
                ids.len(),
                replies.len()
            )));
        }
        let batch: Vec<(u64, String)> = ids.into_iter().map(|i| i as u64).zip(replies).collect();
        // Parsing and waking the core's tasks happen on a runtime thread:
        // one cross-thread wake-up per batch instead of one per job, and
        // less work on the JS thread.
        let tx = self.completions.lock().clone();
        let batch = match tx {
            Some(tx) => match tx.send(batch) {
                Ok(()) => return Ok(()),
                Err(e) => e.0,
            },
            None => batch,
        };
        answer_batch(&self.pending, batch);
        Ok(())
    }

    /// Begins a graceful shutdown and returns at once.
    #[napi]
    pub fn shutdown(&self) {
        self.stopping.cancel();
        if let Some(r) = self.running.lock().as_ref() {
            r.shutdown();
        }
    }

    /// Stops the host: no more claims, running steps get the grace period
    /// (JS handlers keep running meanwhile, since this does not block the
    /// JS thread), then the inbox closes and the thread-safe function is
    /// released so nothing keeps the event loop alive.
    #[napi]
    pub async fn stop(&self) {
        self.stopping.cancel();
        let running = self.running.lock().clone();
        if let Some(r) = running {
            r.stop().await;
        }
        self.inbox.close();
        let feeder = self.feeder.lock().take();
        if let Some(f) = feeder {
            let _ = f.await;
        }
        // Answers still queued are delivered by the completer before it ends.
        self.completions.lock().take();
        // The core stopped waiting for anything still held by JS.
        let left: Vec<Pending> = self.pending.lock().drain().map(|(_, p)| p).collect();
        for p in left {
            for d in &p.done {
                d.cancel();
            }
        }
    }

    /// True while started and not stopped.
    #[napi(getter)]
    pub fn running(&self) -> bool {
        self.running.lock().is_some() && !self.inbox.is_closed()
    }
}
