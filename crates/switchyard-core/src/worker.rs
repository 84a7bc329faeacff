//! The host: a [`Worker`] claims ready steps for the handlers registered in
//! it, runs them, and records their outcomes (DESIGN.md §4).
//!
//! Credit-based dispatch: a claim asks for at most the free slots of each
//! handler (bounded by the host-wide free slots), so nothing is claimed that
//! cannot start now. A slot is free again as soon as its handler returns;
//! the outcome is recorded by the completer in the next batch, and the host
//! stops claiming while more than twice its concurrency (or claim batch, if
//! larger) of claimed steps lack a recorded outcome, so a store that falls
//! behind slows claims down instead of growing a backlog of unrecorded
//! outcomes whose leases every heartbeat would renew. Claims and completions
//! are batched. Rust-owned timers enforce handler timeouts and lease
//! heartbeats; a handler that panics fails only its own step.
//!
//! Recording outcomes. An outcome no store could write fails only its own
//! step: a decision's step, handler and dependency names are checked like
//! every other name before anything is written
//! ([`crate::Decision::validate_names`]); and when the store still refuses a
//! whole batch of completions with an error that is not transient (the
//! stores report refused data, such as PostgreSQL SQLSTATE classes 22, 23
//! and 54, as [`Error::InvalidInput`]), the completer writes the batch in
//! halves until the item that fails alone is found, and fails that step
//! with the store's reason (`ErrorKind::InvalidInput`). If even that
//! failure is refused it is logged and dropped; the step runs again when
//! its lease expires. Transient store errors ([`Error::Store`]: lost
//! connections, serialization failures, deadlocks) are retried with
//! backoff for as long as the host runs, because nothing acknowledged may
//! be lost.
//!
//! Stopping. [`RunningWorker::stop`] returns within
//! [`WorkerOptions::shutdown_grace`] plus [`WorkerOptions::shutdown_flush`]
//! (default [`DEFAULT_SHUTDOWN_FLUSH`], 10 s) plus about a second, even
//! when the store does not answer: running steps get the grace period, then
//! are cancelled and handed back; the outcomes they produced are recorded
//! for at most the flush time, after which the completer stops retrying and
//! logs (at error level) how many outcomes and which steps were not
//! recorded. Those steps are still `running` in the store and become ready
//! again when their leases expire. The last heartbeat and the host's
//! deregistration are best effort within the same bound.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::context::{Context, CtxEnv};
use crate::error::{Error, Result};
use crate::handler::*;
use crate::model::*;
use crate::store::DynStore;

/// Default of [`WorkerOptions::shutdown_flush`]: how long a stopping host
/// keeps retrying to record outcomes in a failing store.
pub const DEFAULT_SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// Host-wide options.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Steps running at once in this host, over all handlers.
    pub concurrency: usize,
    /// Lease length; a host that stops heartbeating loses its steps after this.
    pub lease: Duration,
    /// Heartbeat period (renews leases, reports liveness, recovers expired leases).
    pub heartbeat: Duration,
    /// On shutdown, how long running steps may finish before they are
    /// cancelled and handed back.
    pub shutdown_grace: Duration,
    /// On shutdown, after the grace period, how long the host keeps trying
    /// to record the outcomes it holds while the store fails (default
    /// [`DEFAULT_SHUTDOWN_FLUSH`]). Outcomes still unrecorded then are
    /// dropped and logged; their steps become ready again when their leases
    /// expire. See the module docs.
    pub shutdown_flush: Duration,
    /// Most steps claimed per handler per claim.
    pub claim_batch: usize,
    /// Largest accepted payload (results, checkpoints, events, spawn inputs).
    pub max_payload_bytes: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 512,
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            shutdown_flush: DEFAULT_SHUTDOWN_FLUSH,
            claim_batch: 512,
            max_payload_bytes: crate::client::DEFAULT_MAX_PAYLOAD,
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Reg {
    name: String,
    cap: Capability,
    opts: HandlerOptions,
    inflight: AtomicUsize,
    bucket: Option<Mutex<Bucket>>,
    batch_tx: Mutex<Option<mpsc::UnboundedSender<ClaimedStep>>>,
}

impl Reg {
    fn free(&self) -> usize {
        self.opts
            .concurrency
            .saturating_sub(self.inflight.load(Ordering::Acquire))
    }

    /// Whole tokens available now, and how long until the next one.
    fn tokens(&self) -> (usize, Option<Duration>) {
        let (Some(bucket), Some(limit)) = (&self.bucket, self.opts.rate_limit) else {
            return (usize::MAX, None);
        };
        let mut b = bucket.lock();
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * limit.per_second)
            .min(limit.burst as f64);
        b.last = now;
        let whole = b.tokens.floor() as usize;
        let wait = (whole == 0)
            .then(|| Duration::from_secs_f64((1.0 - b.tokens) / limit.per_second.max(1e-9)));
        (whole, wait)
    }

    fn take_tokens(&self, n: usize) {
        if let Some(b) = &self.bucket {
            b.lock().tokens -= n as f64;
        }
    }
}

struct Running {
    token: CancellationToken,
    lost: AtomicBool,
    /// When the handler started (the cancellation poll skips young runs).
    started: tokio::time::Instant,
}

pub(crate) enum CompletionMsg {
    One(Completion),
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Shared {
    pub(crate) env: Arc<CtxEnv>,
    regs: HashMap<String, Arc<Reg>>,
    order: Vec<Arc<Reg>>,
    opts: WorkerOptions,
    inflight: AtomicUsize,
    /// Outcomes handed to the completer and not yet recorded (see
    /// [`Shared::max_outstanding`]).
    pending: AtomicUsize,
    /// Runs in this host by (step, run): two runs of one step (one whose
    /// lease was lost and still winds down, and its successor) never share
    /// an entry.
    running: Mutex<HashMap<RunRef, Arc<Running>>>,
    completions: mpsc::UnboundedSender<CompletionMsg>,
    slot_freed: Notify,
    stopping: CancellationToken,
    abort: CancellationToken,
    /// Fired when a stopping host's flush budget is spent: the completer
    /// stops retrying and drops what it could not record.
    give_up: CancellationToken,
}

impl Shared {
    fn store(&self) -> &DynStore {
        &self.env.store
    }

    fn release_slot(&self, reg: &Reg, n: usize) {
        reg.inflight.fetch_sub(n, Ordering::AcqRel);
        self.inflight.fetch_sub(n, Ordering::AcqRel);
        self.slot_freed.notify_waiters();
    }

    /// Hands an outcome to the completer.
    fn send_completion(&self, c: Completion) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.completions.send(CompletionMsg::One(c)) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(error = %e, "completion channel closed");
        }
    }

    /// Most claimed steps whose outcome is not yet recorded (running, or
    /// finished and waiting for the completer): twice the larger of the
    /// concurrency and the claim batch, so one batch of outcomes can be
    /// recorded while the next runs. A slot is freed when its handler
    /// returns, before the outcome is recorded; without this bound a store
    /// that records outcomes slower than handlers produce them let the
    /// backlog grow without end, and every heartbeat renewed the lease of
    /// every step in it.
    fn max_outstanding(&self) -> usize {
        2 * self.opts.concurrency.max(self.opts.claim_batch)
    }

    /// Stops runs whose lease is gone.
    fn mark_lost(&self, runs: &[RunRef]) {
        let running = self.running.lock();
        for run in runs {
            if let Some(r) = running.get(run) {
                r.lost.store(true, Ordering::Release);
                r.token.cancel();
            }
        }
    }

    /// Stops every run of steps that were cancelled.
    fn mark_cancelled(&self, steps: &[StepId]) {
        let running = self.running.lock();
        for (run, r) in running.iter() {
            if steps.contains(&run.step_id) {
                r.lost.store(true, Ordering::Release);
                r.token.cancel();
            }
        }
    }
}

/// Builds a [`Worker`]: the store, host options and handler registrations.
pub struct WorkerBuilder {
    store: DynStore,
    opts: WorkerOptions,
    regs: Vec<(String, Capability, HandlerOptions)>,
}

impl WorkerBuilder {
    /// Host-wide concurrency.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.opts.concurrency = n.max(1);
        self
    }
    /// Lease length (heartbeat defaults to a third of it, at most 5 s).
    pub fn lease(mut self, d: Duration) -> Self {
        self.opts.lease = d;
        self.opts.heartbeat = (d / 3)
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(10));
        self
    }
    /// Heartbeat period.
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.opts.heartbeat = d.max(Duration::from_millis(10));
        self
    }
    /// Graceful-shutdown deadline.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.opts.shutdown_grace = d;
        self
    }
    /// How long a stopping host keeps retrying to record its outcomes
    /// while the store fails ([`WorkerOptions::shutdown_flush`]).
    pub fn shutdown_flush(mut self, d: Duration) -> Self {
        self.opts.shutdown_flush = d;
        self
    }
    /// Most steps per claim per handler.
    pub fn claim_batch(mut self, n: usize) -> Self {
        self.opts.claim_batch = n.max(1);
        self
    }
    /// Payload size limit.
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.opts.max_payload_bytes = n;
        self
    }
    /// All options at once.
    pub fn options(mut self, o: WorkerOptions) -> Self {
        self.opts = o;
        self
    }

    /// Registers a handler with any capability.
    pub fn handler(
        mut self,
        name: impl Into<String>,
        cap: Capability,
        opts: HandlerOptions,
    ) -> Self {
        self.regs.push((name.into(), cap, opts));
        self
    }
    /// Registers a plain async closure `|input, ctx| async move { ... }`.
    pub fn step<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = StepResult> + Send + 'static,
    {
        self.handler(name, Capability::Plain(Arc::new(FnHandler(f))), opts)
    }
    /// Registers a batch closure `|items| async move { ... }`.
    pub fn batch<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Vec<BatchItem>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<StepResult>> + Send + 'static,
    {
        self.handler(name, Capability::Batch(Arc::new(FnBatch(f))), opts)
    }
    /// Registers a decision closure.
    pub fn decision<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = StepResult<Decision>> + Send + 'static,
    {
        self.handler(name, Capability::Decision(Arc::new(FnDecision(f))), opts)
    }
    /// Registers an API-shaped closure.
    pub fn api<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, ApiError>> + Send + 'static,
    {
        self.handler(name, Capability::Api(Arc::new(FnApi(f))), opts)
    }

    /// Validates the registrations and builds the worker.
    pub fn build(self) -> Result<Worker> {
        if self.regs.is_empty() {
            return Err(Error::Config("a worker needs at least one handler".into()));
        }
        let mut seen = HashMap::new();
        for (name, cap, opts) in &self.regs {
            crate::client::validate_name("handler name", name)?;
            if seen.insert(name.clone(), ()).is_some() {
                return Err(Error::Config(format!(
                    "handler `{name}` is registered twice"
                )));
            }
            if let Some(r) = opts.rate_limit {
                if !(r.per_second > 0.0 && r.per_second.is_finite()) {
                    return Err(Error::Config(format!(
                        "handler `{name}`: rate_limit.per_second must be a positive number"
                    )));
                }
            }
            if opts.concurrency == 0 {
                return Err(Error::Config(format!(
                    "handler `{name}`: concurrency must be at least 1"
                )));
            }
            let _ = cap;
        }
        if self.opts.lease < Duration::from_millis(50) {
            return Err(Error::Config("lease must be at least 50 ms".into()));
        }
        // Durations past the core's maximum would overflow millisecond
        // arithmetic (a lease of `Duration::MAX` wrapped to a negative one).
        let o = &self.opts;
        let too_long = |what: &str, d: Duration| {
            crate::client::check_duration(what, d)
                .map(|_| ())
                .map_err(|e| Error::Config(e.to_string()))
        };
        too_long("lease", o.lease)?;
        too_long("heartbeat", o.heartbeat)?;
        too_long("shutdown_grace", o.shutdown_grace)?;
        too_long("shutdown_flush", o.shutdown_flush)?;
        if o.concurrency == 0 || o.claim_batch == 0 {
            return Err(Error::Config(
                "concurrency and claim_batch must be at least 1".into(),
            ));
        }
        for (name, _, h) in &self.regs {
            if let Some(t) = h.timeout {
                too_long(&format!("handler `{name}`: timeout"), t)?;
            }
            too_long(&format!("handler `{name}`: linger"), h.linger)?;
            too_long(
                &format!("handler `{name}`: initial_backoff"),
                h.retry.initial_backoff,
            )?;
            too_long(
                &format!("handler `{name}`: max_backoff"),
                h.retry.max_backoff,
            )?;
        }
        Ok(Worker {
            store: self.store,
            opts: self.opts,
            regs: self.regs,
        })
    }
}

/// A host: registered handlers plus the loops that feed them.
pub struct Worker {
    store: DynStore,
    opts: WorkerOptions,
    regs: Vec<(String, Capability, HandlerOptions)>,
}

impl Worker {
    /// Starts building a worker on `store`.
    pub fn builder(store: DynStore) -> WorkerBuilder {
        WorkerBuilder {
            store,
            opts: WorkerOptions::default(),
            regs: Vec::new(),
        }
    }

    /// Starts the host on the current tokio runtime and returns a handle.
    pub async fn start(self) -> Result<RunningWorker> {
        let now = self.store.now().await?;
        let host = HostInfo {
            id: uuid::Uuid::now_v7().to_string(),
            pid: std::process::id(),
            hostname: hostname(),
            handlers: self.regs.iter().map(|r| r.0.clone()).collect(),
            started_at: now,
            last_heartbeat: now,
        };
        let lease_ms = self.opts.lease.as_millis() as i64;
        // Register before claiming so `switchyard workers` and unknown-handler
        // diagnostics see this host as soon as it runs anything.
        self.store.heartbeat(&host, &[], lease_ms).await?;
        let env = Arc::new(CtxEnv {
            store: self.store.clone(),
            host,
            lease_ms,
            max_payload: self.opts.max_payload_bytes,
        });
        let (ctx_tx, ctx_rx) = mpsc::unbounded_channel();
        let regs: Vec<Arc<Reg>> = self
            .regs
            .into_iter()
            .map(|(name, cap, opts)| {
                let bucket = opts.rate_limit.map(|r| {
                    Mutex::new(Bucket {
                        tokens: r.burst as f64,
                        last: Instant::now(),
                    })
                });
                Arc::new(Reg {
                    name,
                    cap,
                    opts,
                    inflight: AtomicUsize::new(0),
                    bucket,
                    batch_tx: Mutex::new(None),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            env,
            regs: regs.iter().map(|r| (r.name.clone(), r.clone())).collect(),
            order: regs,
            opts: self.opts,
            inflight: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            running: Mutex::new(HashMap::new()),
            completions: ctx_tx,
            slot_freed: Notify::new(),
            stopping: CancellationToken::new(),
            abort: CancellationToken::new(),
            give_up: CancellationToken::new(),
        });
        for reg in &shared.order {
            if let Capability::Batch(_) = reg.cap {
                let (tx, rx) = mpsc::unbounded_channel();
                *reg.batch_tx.lock() = Some(tx);
                tokio::spawn(batcher(shared.clone(), reg.clone(), rx));
            }
        }
        let completer = tokio::spawn(completer(shared.clone(), ctx_rx));
        let beat_stop = CancellationToken::new();
        let heart = tokio::spawn(heartbeat_loop(shared.clone(), beat_stop.clone()));
        let cancels = tokio::spawn(cancel_listener(shared.clone()));
        let reaper = tokio::spawn(reap_dead_hosts(shared.clone()));
        let claimer = tokio::spawn(claim_loop(shared.clone()));
        tracing::info!(host = %shared.env.host.id, handlers = ?shared.env.host.handlers, "host started");
        let s = shared.clone();
        let main = tokio::spawn(async move {
            s.stopping.cancelled().await;
            let grace_end = tokio::time::Instant::now() + s.opts.shutdown_grace;
            // The claimer returns as soon as it sees `stopping`, unless it
            // is inside a claim that a failing store does not answer.
            let mut claimer = claimer;
            if tokio::time::timeout_at(grace_end, &mut claimer)
                .await
                .is_err()
            {
                tracing::warn!("a claim did not return within the shutdown grace period; abandoning it (its steps return when their leases expire)");
                claimer.abort();
            }
            drain(&s, grace_end).await;
            // Record what the handlers produced, for at most `shutdown_flush`
            // (the completer retries a failing store until then).
            let flush_end = tokio::time::Instant::now() + s.opts.shutdown_flush;
            let (tx, rx) = oneshot::channel();
            let _ = s.completions.send(CompletionMsg::Flush(tx));
            if tokio::time::timeout_at(flush_end, rx).await.is_err() {
                s.give_up.cancel();
            }
            beat_stop.cancel();
            // The last heartbeat and the deregistration are best effort: a
            // store that does not answer gets until the flush deadline (at
            // least a second) before the host stops without them.
            let best_effort_end =
                flush_end.max(tokio::time::Instant::now() + Duration::from_secs(1));
            let mut heart = heart;
            if tokio::time::timeout_at(best_effort_end, &mut heart)
                .await
                .is_err()
            {
                heart.abort();
            }
            cancels.abort();
            reaper.abort();
            for reg in &s.order {
                reg.batch_tx.lock().take();
            }
            match tokio::time::timeout_at(
                best_effort_end,
                s.store().deregister_host(&s.env.host.id),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not deregister host"),
                Err(_) => tracing::warn!("could not deregister host: the store did not answer"),
            }
            s.give_up.cancel();
            completer.abort();
            tracing::info!(host = %s.env.host.id, "host stopped");
        });
        Ok(RunningWorker {
            shared,
            main: Mutex::new(Some(main)),
        })
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully. The signal
    /// handlers are installed before the host starts, so a signal that
    /// arrives while it starts still shuts it down gracefully.
    pub async fn run(self) -> Result<()> {
        let mut signals = ShutdownSignals::listen();
        let running = self.start().await?;
        signals.recv().await;
        tracing::info!("signal received, shutting down");
        running.stop().await;
        Ok(())
    }
}

/// SIGINT and SIGTERM, caught from the moment [`ShutdownSignals::listen`]
/// returns (their default action, ending the process, no longer applies).
/// Listen before starting a host: a signal that arrives between the start
/// and a later listen would end the process without a graceful shutdown.
pub struct ShutdownSignals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                _ => None,
            };
            Self { streams }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        match &mut self.streams {
            Some((int, term)) => {
                tokio::select! {
                    biased;
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for SIGINT or SIGTERM (handlers installed at the first poll; see
/// [`ShutdownSignals`] to install them earlier).
pub async fn wait_for_signal() {
    ShutdownSignals::listen().recv().await
}

/// A started host.
pub struct RunningWorker {
    shared: Arc<Shared>,
    main: Mutex<Option<JoinHandle<()>>>,
}

impl RunningWorker {
    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.shared.env.host.id
    }
    /// Steps running now.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Acquire)
    }
    /// Waits until every outcome that finished steps handed to the host so
    /// far is recorded in the store (or the host has stopped).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self
            .shared
            .completions
            .send(CompletionMsg::Flush(tx))
            .is_ok()
        {
            let _ = rx.await;
        }
    }
    /// Asks the host to stop (returns at once): no more claims; running steps
    /// get the grace period, then are cancelled and handed back.
    pub fn shutdown(&self) {
        self.shared.stopping.cancel();
    }
    /// Stops and waits until the host has drained and deregistered.
    pub async fn stop(&self) {
        self.shutdown();
        self.wait().await;
    }
    /// Waits until the host has stopped (after [`Self::shutdown`]).
    pub async fn wait(&self) {
        let handle = self.main.lock().take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shared.stopping.cancel();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

async fn claim_loop(shared: Arc<Shared>) {
    let store = shared.store().clone();
    let signals = store.signals().clone();
    let poll = store.poll_interval();
    let lease_ms = shared.env.lease_ms;
    let mut rotate = 0usize;
    let mut backoff = Duration::from_millis(10);
    let mut deferred = false;
    // Handlers offered slots since the last wait (see `left_out` below).
    let mut offered = 0usize;
    loop {
        if shared.stopping.is_cancelled() {
            return;
        }
        let ready = signals.ready.notified();
        let freed = shared.slot_freed.notified();
        tokio::pin!(ready, freed);
        ready.as_mut().enable();
        freed.as_mut().enable();

        let inflight = shared.inflight.load(Ordering::Acquire);
        let pending = shared.pending.load(Ordering::Acquire);
        let mut host_free = shared
            .opts
            .concurrency
            .saturating_sub(inflight)
            .min(shared.max_outstanding().saturating_sub(pending + inflight));
        // Under load every finished step frees a slot; claiming for each one
        // would defeat batching. While steps are running (so more slots will
        // free soon), wait until a worthwhile share of the host is free.
        // The deferral is short and happens once: a nearly full host still
        // claims for its last free slots within a millisecond.
        let low_water = (shared.opts.concurrency.min(shared.opts.claim_batch) / 8).max(1);
        let defer = inflight > 0 && host_free > 0 && host_free < low_water && !deferred;
        deferred = defer;
        if defer {
            host_free = 0;
        }
        let mut token_wait: Option<Duration> = None;
        let n = shared.order.len();
        // What each handler could take, in rotation order.
        let mut caps: Vec<(&str, usize)> = Vec::with_capacity(n);
        let mut positions: Vec<usize> = Vec::with_capacity(n);
        for i in 0..n {
            let reg = &shared.order[(rotate + i) % n];
            let (tokens, wait) = reg.tokens();
            if let Some(w) = wait {
                token_wait = Some(token_wait.map_or(w, |t: Duration| t.min(w)));
            }
            let cap = reg.free().min(tokens).min(shared.opts.claim_batch);
            if cap > 0 {
                caps.push((reg.name.as_str(), cap));
                positions.push(i);
            }
        }
        let wants = split_slots(&caps, host_free);
        // More handlers than free slots: some were offered nothing this
        // round. The next round starts with them.
        let left_out = caps.len() - wants.len();
        rotate = if left_out > 0 && !wants.is_empty() {
            rotate.wrapping_add(positions[wants.len() - 1] + 1)
        } else {
            rotate.wrapping_add(1)
        };

        let mut next_due = None;
        if !wants.is_empty() {
            match store.claim(&shared.env.host.id, &wants, lease_ms).await {
                Ok(batch) => {
                    tracing::trace!(?wants, got = batch.steps.len(), next_due = ?batch.next_due, "claimed");
                    backoff = Duration::from_millis(10);
                    next_due = batch.next_due;
                    let mut got: HashMap<&str, usize> = HashMap::new();
                    for step in &batch.steps {
                        *got.entry(step.handler.as_str()).or_default() += 1;
                    }
                    // A handler that got all it asked for may have more waiting.
                    let more = wants
                        .iter()
                        .any(|(h, w)| got.get(h.as_str()).copied().unwrap_or(0) >= *w);
                    let got_total = batch.steps.len();
                    for step in batch.steps {
                        dispatch(&shared, step);
                    }
                    if more {
                        continue;
                    }
                    // Slots stayed free while handlers were left out: offer
                    // them to those now, not at the next wake-up (which may
                    // be a poll interval away), until every handler has had
                    // an offer since the last wait.
                    offered += wants.len();
                    if left_out > 0 && got_total < host_free && offered < caps.len() {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; retrying");
                    tokio::select! {
                        biased;
                        _ = shared.stopping.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {},
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let mut wait = poll;
        if let Some(due) = next_due {
            if let Ok(now) = store.now().await {
                wait = wait.min(Duration::from_millis(due.saturating_sub(now).max(0) as u64));
            }
        }
        if let Some(t) = token_wait {
            wait = wait.min(t);
        }
        if deferred {
            wait = wait.min(Duration::from_millis(1));
        }
        offered = 0;
        tokio::select! {
            biased;
            _ = shared.stopping.cancelled() => return,
            _ = &mut ready => {},
            _ = &mut freed => {},
            _ = tokio::time::sleep(wait) => {},
        }
    }
}

/// Shares `host_free` slots among handlers (each with its own cap, in
/// rotation order): first an equal share each, so a busy handler never takes
/// every slot from one whose step just became ready, then what is left in
/// rotation order.
fn split_slots(caps: &[(&str, usize)], mut host_free: usize) -> Vec<(String, usize)> {
    let mut given = vec![0usize; caps.len()];
    if !caps.is_empty() {
        let share = (host_free / caps.len()).max(1);
        for (i, (_, cap)) in caps.iter().enumerate() {
            let g = share.min(*cap).min(host_free);
            given[i] = g;
            host_free -= g;
        }
        for (i, (_, cap)) in caps.iter().enumerate() {
            let g = (cap - given[i]).min(host_free);
            given[i] += g;
            host_free -= g;
        }
    }
    caps.iter()
        .zip(given)
        .filter(|(_, g)| *g > 0)
        .map(|((name, _), g)| (name.to_string(), g))
        .collect()
}

fn dispatch(shared: &Arc<Shared>, step: ClaimedStep) {
    let Some(reg) = shared.regs.get(&step.handler).cloned() else {
        // The store returned a handler we did not ask for: hand it back.
        tracing::error!(handler = %step.handler, "claimed a step for an unregistered handler; releasing it");
        let lease = lease_of(shared, &step);
        shared.send_completion(Completion {
            lease,
            resolution: Resolution::Released,
        });
        return;
    };
    reg.inflight.fetch_add(1, Ordering::AcqRel);
    shared.inflight.fetch_add(1, Ordering::AcqRel);
    reg.take_tokens(1);
    if step.attempt > reg.opts.retry.max_attempts {
        // Only a lost lease uses an attempt without a recorded outcome: the
        // last attempt's host stopped renewing its lease.
        let max = reg.opts.retry.max_attempts;
        let mut error = ErrorInfo::new(
            ErrorKind::LeaseExpired,
            format!(
                "attempt {max} of {max} failed: the lease expired without a heartbeat from its host, and no attempts are left"
            ),
        );
        error.attempt = step.attempt;
        let lease = lease_of(shared, &step);
        shared.send_completion(Completion {
            lease,
            resolution: Resolution::Failed(error),
        });
        shared.release_slot(&reg, 1);
        return;
    }
    if let Capability::Batch(_) = reg.cap {
        let tx = reg.batch_tx.lock().clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::error::SendError(step)) = tx.send(step) {
                    release_unstarted(shared, &reg, step);
                }
            }
            None => release_unstarted(shared, &reg, step),
        }
        return;
    }
    tokio::spawn(run_one(shared.clone(), reg, step));
}

fn release_unstarted(shared: &Arc<Shared>, reg: &Reg, step: ClaimedStep) {
    let lease = lease_of(shared, &step);
    shared.send_completion(Completion {
        lease,
        resolution: Resolution::Released,
    });
    shared.release_slot(reg, 1);
}

fn run_ref(step: &ClaimedStep) -> RunRef {
    RunRef {
        step_id: step.step_id,
        run: step.run,
    }
}

fn lease_run(lease: &Lease) -> RunRef {
    RunRef {
        step_id: lease.step_id,
        run: lease.run,
    }
}

fn lease_of(shared: &Shared, step: &ClaimedStep) -> Lease {
    Lease {
        step_id: step.step_id,
        task_id: step.task_id,
        attempt: step.attempt,
        run: step.run,
        host_id: shared.env.host.id.clone(),
    }
}

enum Output {
    Value(Value),
    Decision(Decision),
}

enum RunEnd {
    Finished(StepResult<Output>),
    Panicked(String),
    TimedOut(Duration),
    Cancelled,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// How long a cancelled run may take to notice (`ctx.cancelled()`,
/// `ctx.is_cancelled()`) and return before its future is dropped.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Runs `fut` under the handler's timeout and the step's cancellation token,
/// catching panics. When `token` fires the run gets [`CANCEL_GRACE`] to end
/// cooperatively; when `hard` fires (shutdown gave up waiting) it is dropped.
async fn guarded<T>(
    fut: impl std::future::Future<Output = T>,
    timeout: Option<Duration>,
    token: &CancellationToken,
    hard: &CancellationToken,
) -> std::result::Result<T, RunEnd> {
    let fut = AssertUnwindSafe(fut).catch_unwind();
    let timed = async {
        match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| RunEnd::TimedOut(t)),
            None => Ok(fut.await),
        }
    };
    tokio::pin!(timed);
    let settle = |r: std::result::Result<std::thread::Result<T>, RunEnd>| match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(p)) => Err(RunEnd::Panicked(panic_message(p))),
        Err(e) => Err(e),
    };
    tokio::select! {
        biased;
        _ = hard.cancelled() => return Err(RunEnd::Cancelled),
        r = &mut timed => return settle(r),
        _ = token.cancelled() => {},
    }
    tokio::select! {
        biased;
        _ = hard.cancelled() => Err(RunEnd::Cancelled),
        r = &mut timed => settle(r),
        _ = tokio::time::sleep(CANCEL_GRACE) => Err(RunEnd::Cancelled),
    }
}

fn begin(shared: &Arc<Shared>, reg: &Reg, step: &ClaimedStep) -> (Context, Arc<Running>) {
    let token = CancellationToken::new();
    let running = Arc::new(Running {
        token: token.clone(),
        lost: AtomicBool::new(false),
        started: tokio::time::Instant::now(),
    });
    shared.running.lock().insert(run_ref(step), running.clone());
    let deadline = reg.opts.timeout.map(|t| Instant::now() + t);
    let ctx = Context::new(
        shared.env.clone(),
        step.clone(),
        lease_of(shared, step),
        token,
        deadline,
    );
    (ctx, running)
}

async fn run_one(shared: Arc<Shared>, reg: Arc<Reg>, step: ClaimedStep) {
    let (ctx, running) = begin(&shared, &reg, &step);
    let input = step.input.clone();
    let token = running.token.clone();
    let end: std::result::Result<StepResult<Output>, RunEnd> = match &reg.cap {
        Capability::Plain(h) => guarded(h.run(input, ctx), reg.opts.timeout, &token, &shared.abort)
            .await
            .map(|r| r.map(Output::Value)),
        Capability::Decision(h) => guarded(
            h.decide(input, ctx),
            reg.opts.timeout,
            &token,
            &shared.abort,
        )
        .await
        .map(|r| r.map(Output::Decision)),
        Capability::Api(h) => guarded(h.call(input, ctx), reg.opts.timeout, &token, &shared.abort)
            .await
            .map(|r| r.map(Output::Value).map_err(ApiError::classify)),
        Capability::Batch(_) => unreachable!("batch steps go through the batcher"),
    };
    let end = end.map_or_else(|e| e, RunEnd::Finished);
    // A run that ended after its step was cancelled or taken over has nothing to record.
    let end = if running.lost.load(Ordering::Acquire) {
        RunEnd::Cancelled
    } else {
        end
    };
    finish(&shared, &reg, &step, &running, end).await;
    shared.release_slot(&reg, 1);
}

async fn batcher(shared: Arc<Shared>, reg: Arc<Reg>, mut rx: mpsc::UnboundedReceiver<ClaimedStep>) {
    let max = reg.opts.max_batch.max(1);
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < max {
            match rx.try_recv() {
                Ok(s) => items.push(s),
                Err(_) => break,
            }
        }
        if items.len() < max && !reg.opts.linger.is_zero() {
            let deadline = tokio::time::Instant::now() + reg.opts.linger;
            while items.len() < max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => items.push(s),
                    _ => break,
                }
            }
        }
        tokio::spawn(run_batch(shared.clone(), reg.clone(), items));
    }
}

async fn run_batch(shared: Arc<Shared>, reg: Arc<Reg>, steps: Vec<ClaimedStep>) {
    let Capability::Batch(h) = &reg.cap else {
        unreachable!("batcher only runs batch handlers")
    };
    let mut items = Vec::with_capacity(steps.len());
    let mut runs = Vec::with_capacity(steps.len());
    for step in &steps {
        let (ctx, running) = begin(&shared, &reg, step);
        items.push(BatchItem {
            input: step.input.clone(),
            ctx,
        });
        runs.push(running);
    }
    // The batch as a whole is cancelled only by shutdown; a cancelled item's
    // outcome is dropped (its lease is gone).
    let batch_token = shared.abort.child_token();
    let n = steps.len();
    let result = guarded(
        h.run_batch(items),
        reg.opts.timeout,
        &batch_token,
        &shared.abort,
    )
    .await;
    let ends: Vec<RunEnd> = match result {
        Ok(outcomes) if outcomes.len() == n => outcomes
            .into_iter()
            .map(|r| RunEnd::Finished(r.map(Output::Value)))
            .collect(),
        Ok(outcomes) => {
            let msg = format!(
                "batch handler `{}` returned {} outcomes for {n} steps",
                reg.name,
                outcomes.len()
            );
            (0..n)
                .map(|_| RunEnd::Finished(Err(StepError::permanent(&msg))))
                .collect()
        }
        Err(RunEnd::Panicked(m)) => (0..n).map(|_| RunEnd::Panicked(m.clone())).collect(),
        Err(RunEnd::TimedOut(t)) => (0..n).map(|_| RunEnd::TimedOut(t)).collect(),
        Err(_) => (0..n).map(|_| RunEnd::Cancelled).collect(),
    };
    for ((step, running), end) in steps.iter().zip(&runs).zip(ends) {
        let end = if running.lost.load(Ordering::Acquire) {
            RunEnd::Cancelled
        } else {
            end
        };
        finish(&shared, &reg, step, running, end).await;
    }
    shared.release_slot(&reg, n);
}

/// Turns how a run ended into the resolution the store records.
async fn finish(
    shared: &Arc<Shared>,
    reg: &Reg,
    step: &ClaimedStep,
    running: &Running,
    end: RunEnd,
) {
    let lease = lease_of(shared, step);
    let resolution = match end {
        RunEnd::Cancelled => {
            if running.lost.load(Ordering::Acquire) {
                // Cancelled or taken over: the store already moved on.
                shared.running.lock().remove(&run_ref(step));
                return;
            }
            Some(Resolution::Released)
        }
        RunEnd::Finished(Ok(Output::Value(v))) => Some(match check_payload(shared, "result", &v) {
            Ok(()) => Resolution::Completed(v),
            Err(e) => Resolution::Failed(error_info(
                ErrorKind::Permanent,
                e.to_string(),
                None,
                step.attempt,
            )),
        }),
        RunEnd::Finished(Ok(Output::Decision(Decision::Complete(v)))) => {
            Some(Resolution::Decided {
                steps: vec![],
                final_step: None,
                result: v,
            })
        }
        RunEnd::Finished(Ok(Output::Decision(d @ Decision::Steps { .. }))) => {
            // A name no store can key on fails this step alone, before it
            // reaches a write batch shared with other steps' outcomes.
            if let Err(e) = d.validate_names() {
                Some(Resolution::Failed(error_info(
                    ErrorKind::InvalidInput,
                    e.to_string(),
                    None,
                    step.attempt,
                )))
            } else {
                let Decision::Steps { steps, final_step } = d else {
                    unreachable!("matched above")
                };
                let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
                let result = json!({ "created": names });
                Some(Resolution::Decided {
                    steps,
                    final_step,
                    result,
                })
            }
        }
        RunEnd::Finished(Err(StepError::Suspend(wait))) => Some(Resolution::Suspended(wait)),
        RunEnd::Finished(Err(StepError::LeaseLost)) => None,
        RunEnd::Finished(Err(StepError::Retryable {
            message,
            retry_after,
            trace,
        })) => Some(
            retry_or_fail(
                shared,
                reg,
                step,
                ErrorKind::Retryable,
                message,
                trace,
                retry_after,
            )
            .await,
        ),
        RunEnd::Finished(Err(e)) => {
            let trace = match &e {
                StepError::Permanent { trace, .. } => trace.clone(),
                _ => None,
            };
            let message = match &e {
                StepError::Permanent { message, .. } => message.clone(),
                other => other.to_string(),
            };
            Some(Resolution::Failed(error_info(
                e.kind(),
                message,
                trace,
                step.attempt,
            )))
        }
        RunEnd::Panicked(msg) => Some(
            retry_or_fail(
                shared,
                reg,
                step,
                ErrorKind::Panic,
                format!("handler panicked: {msg}"),
                None,
                None,
            )
            .await,
        ),
        RunEnd::TimedOut(t) => Some({
            // Tell cooperative (and foreign) code still running that the core gave up.
            running.token.cancel();
            retry_or_fail(
                shared,
                reg,
                step,
                ErrorKind::Timeout,
                format!(
                    "handler `{}` timed out after {} ms",
                    reg.name,
                    t.as_millis()
                ),
                None,
                None,
            )
            .await
        }),
    };
    match resolution {
        Some(resolution) => shared.send_completion(Completion { lease, resolution }),
        None => {
            shared.running.lock().remove(&run_ref(step));
        }
    }
}

fn error_info(kind: ErrorKind, message: String, trace: Option<String>, attempt: u32) -> ErrorInfo {
    ErrorInfo {
        kind,
        message,
        trace,
        attempt,
    }
}

async fn retry_or_fail(
    shared: &Shared,
    reg: &Reg,
    step: &ClaimedStep,
    kind: ErrorKind,
    message: String,
    trace: Option<String>,
    retry_after: Option<Duration>,
) -> Resolution {
    let policy = &reg.opts.retry;
    if step.attempt >= policy.max_attempts {
        let message = format!(
            "attempt {} of {} failed: {message}",
            step.attempt, policy.max_attempts
        );
        return Resolution::Failed(error_info(kind, message, trace, step.attempt));
    }
    let delay = policy
        .backoff(step.attempt)
        .max(retry_after.unwrap_or_default());
    let now = match shared.store().now().await {
        Ok(n) => n,
        Err(_) => crate::clock::Clock::now(&crate::clock::SystemClock),
    };
    // A `retry_after` of `Duration::MAX` from Rust code must not wrap.
    let delay = delay.min(crate::client::MAX_DURATION).as_millis() as i64;
    Resolution::Retry {
        error: error_info(kind, message, trace, step.attempt),
        run_at: now.saturating_add(delay),
    }
}

pub(crate) fn check_payload(shared: &Shared, what: &str, v: &Value) -> Result<()> {
    crate::client::check_size(what, v, shared.env.max_payload)
}

async fn completer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<CompletionMsg>) {
    const MAX: usize = 2048;
    let mut buf = Vec::with_capacity(MAX);
    let mut flushes = Vec::new();
    loop {
        let Some(first) = rx.recv().await else { return };
        let push = |m: CompletionMsg,
                    buf: &mut Vec<Completion>,
                    flushes: &mut Vec<oneshot::Sender<()>>| match m {
            CompletionMsg::One(c) => buf.push(c),
            CompletionMsg::Flush(tx) => flushes.push(tx),
        };
        push(first, &mut buf, &mut flushes);
        while buf.len() < MAX {
            match rx.try_recv() {
                Ok(m) => push(m, &mut buf, &mut flushes),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            let taken = buf.len();
            let runs: Vec<RunRef> = buf.iter().map(|c| lease_run(&c.lease)).collect();
            record(&shared, std::mem::take(&mut buf)).await;
            {
                let mut running = shared.running.lock();
                for run in &runs {
                    running.remove(run);
                }
            }
            shared.pending.fetch_sub(taken, Ordering::AcqRel);
            // The claimer may be holding back for this (Shared::max_outstanding).
            shared.slot_freed.notify_waiters();
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

/// Whether a failed `complete` is worth retrying with the same batch: the
/// store could not be reached or the transaction lost a race (deadlock,
/// serialization failure, lock timeout), reported as [`Error::Store`].
/// Anything else (the stores report refused data as
/// [`Error::InvalidInput`]) means some item of the batch cannot be written.
fn transient(e: &Error) -> bool {
    matches!(e, Error::Store(_) | Error::Timeout(_) | Error::Shutdown)
}

/// Records one batch of outcomes.
///
/// * A transient failure retries the same batch with backoff, for as long
///   as it takes, until a stopping host's flush budget is spent
///   ([`Shared::give_up`]); then what is left is dropped and logged.
/// * A batch the store refuses outright is split in halves, each written
///   alone, so that only the outcome the store cannot take fails: alone, it
///   becomes a `Failed` resolution of its step with the store's reason.
/// * An item refused by the store (per-item error) with invalid input fails
///   its step the same way.
/// * A `Failed` resolution that is refused too is dropped and logged; the
///   step's lease expires and it runs again.
async fn record(shared: &Shared, batch: Vec<Completion>) {
    // Parts still to write, the next one last (so the batch's order holds).
    let mut todo: Vec<Vec<Completion>> = vec![batch];
    let mut delay = Duration::from_millis(20);
    while let Some(part) = todo.pop() {
        let outcome = tokio::select! {
            biased;
            r = shared.store().complete(part.clone()) => Some(r),
            _ = shared.give_up.cancelled() => None,
        };
        let result = match outcome {
            Some(r) => r,
            None => {
                todo.push(part);
                log_dropped(&todo);
                return;
            }
        };
        match result {
            Ok(results) => {
                delay = Duration::from_millis(20);
                let mut refused = Vec::new();
                for (c, r) in part.iter().zip(results) {
                    match r {
                        // The outcome itself is invalid (a decision naming an
                        // unknown dependency, a result over the size limit):
                        // the step fails at once with the reason.
                        Err(e @ (Error::InvalidInput(_) | Error::PayloadTooLarge { .. }))
                            if !matches!(c.resolution, Resolution::Failed(_)) =>
                        {
                            tracing::warn!(step = %c.lease.step_id, error = %e, "outcome refused; failing the step");
                            refused.push(refused_outcome(c, &e));
                        }
                        Err(e) => {
                            tracing::warn!(step = %c.lease.step_id, error = %e, "completion rejected")
                        }
                        Ok(_) => {}
                    }
                }
                if !refused.is_empty() {
                    todo.push(refused);
                }
            }
            Err(e) if transient(&e) => {
                // Nothing acknowledged may be lost: keep the batch and retry
                // (until a stopping host's flush budget is spent).
                tracing::warn!(error = %e, n = part.len(), "recording completions failed; retrying");
                todo.push(part);
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.give_up.cancelled() => {
                        log_dropped(&todo);
                        return;
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) if part.len() > 1 => {
                // Some item poisons the whole write: write the halves alone.
                tracing::warn!(error = %e, n = part.len(), "the store refused a batch of completions; recording its items in smaller batches");
                let mut first = part;
                let second = first.split_off(first.len() / 2);
                todo.push(second);
                todo.push(first);
            }
            Err(e) => {
                let c = &part[0];
                if matches!(c.resolution, Resolution::Failed(_)) {
                    tracing::error!(step = %c.lease.step_id, error = %e, "the store refused to record a step's failure; dropping it (the step runs again when its lease expires)");
                } else {
                    tracing::warn!(step = %c.lease.step_id, error = %e, "outcome refused; failing the step");
                    todo.push(vec![refused_outcome(c, &e)]);
                }
            }
        }
    }
}

/// The `Failed` resolution recorded instead of an outcome the store refused.
fn refused_outcome(c: &Completion, e: &Error) -> Completion {
    Completion {
        lease: c.lease.clone(),
        resolution: Resolution::Failed(error_info(
            ErrorKind::InvalidInput,
            e.to_string(),
            None,
            c.lease.attempt,
        )),
    }
}

/// Logs the outcomes a stopping host drops once its flush budget is spent.
fn log_dropped(left: &[Vec<Completion>]) {
    let steps: Vec<String> = left
        .iter()
        .flatten()
        .map(|c| c.lease.step_id.to_string())
        .collect();
    if !steps.is_empty() {
        tracing::error!(
            outcomes = steps.len(),
            steps = %steps.join(", "),
            "shutdown flush time spent and the store still fails; these outcomes were not recorded (their steps become ready again when their leases expire)"
        );
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {},
        }
        let ids: Vec<RunRef> = shared.running.lock().keys().copied().collect();
        let mut host = shared.env.host.clone();
        host.last_heartbeat = shared.store().now().await.unwrap_or(host.last_heartbeat);
        match shared
            .store()
            .heartbeat(&host, &ids, shared.env.lease_ms)
            .await
        {
            Ok(reply) => shared.mark_lost(&reply.lost),
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        match shared.store().recover_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(steps = n, "recovered steps whose lease expired"),
            Err(e) => tracing::warn!(error = %e, "lease recovery failed"),
        }
    }
}

/// How often a host looks for dead hosts on its own machine.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// True if process `pid` of this machine has certainly ended: Linux has no
/// `/proc` entry for it, or it is a zombie. Anything uncertain (no `/proc`,
/// an unreadable entry, this very process) counts as alive.
fn process_gone(pid: u32) -> bool {
    let proc = std::path::Path::new("/proc");
    if pid == 0 || pid == std::process::id() || !proc.join("self").exists() {
        return false;
    }
    match std::fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Recovers the steps of hosts known to be dead, without waiting for their
/// leases to expire: every [`REAP_INTERVAL`] a host lists the registered
/// hosts, and a host on the same machine (same hostname) whose process is
/// gone ([`process_gone`]) has its leases expired and recovered at once. A
/// host that is merely slow, or on another machine, is never judged this
/// way: its steps wait for their leases as before.
async fn reap_dead_hosts(shared: Arc<Shared>) {
    let me = &shared.env.host;
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(hosts) = shared.store().list_hosts().await else {
            continue;
        };
        let mut expired = 0;
        for h in hosts {
            if h.id == me.id || h.hostname != me.hostname || !process_gone(h.pid) {
                continue;
            }
            match shared.store().expire_host(&h.id).await {
                Ok(n) => {
                    tracing::info!(host = %h.id, pid = h.pid, steps = n, "host process is gone; recovering its steps");
                    expired += n;
                }
                Err(e) => {
                    tracing::warn!(host = %h.id, error = %e, "expiring a dead host's leases failed")
                }
            }
        }
        if expired > 0 {
            if let Err(e) = shared.store().recover_expired().await {
                tracing::warn!(error = %e, "lease recovery failed");
            }
        }
    }
}

/// Longest time a cancel made in another process takes to reach a running
/// handler (at most the store's poll interval, if shorter), once the
/// handler has run for [`CANCEL_POLL_AFTER`].
pub const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Runs younger than this are left out of the cancellation poll: most steps
/// end sooner, and asking the store about every one of thousands of short
/// runs ten times a second cost ~15% of a busy host's throughput.
pub const CANCEL_POLL_AFTER: Duration = Duration::from_millis(50);

/// Stops the runs of cancelled steps: at once for cancels made through this
/// process's store handle ([`Signals::cancelled`]), and within
/// [`CANCEL_POLL`] for cancels made elsewhere (another process, another
/// machine), by asking the store which running steps were cancelled. (The
/// heartbeat reports them too, but only once per heartbeat interval.)
async fn cancel_listener(shared: Arc<Shared>) {
    let mut rx = shared.store().signals().cancelled.subscribe();
    // Nothing outside this process changes a memory store: no polling.
    let poll = match shared.store().kind() {
        "memory" => Duration::from_secs(24 * 3600),
        _ => shared.store().poll_interval().min(CANCEL_POLL),
    };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            m = rx.recv() => match m {
                Ok(ids) => shared.mark_cancelled(&ids),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let mut steps: Vec<StepId> = shared
                    .running
                    .lock()
                    .iter()
                    .filter(|(_, r)| now.duration_since(r.started) >= CANCEL_POLL_AFTER)
                    .map(|(k, _)| k.step_id)
                    .collect();
                if steps.is_empty() {
                    continue;
                }
                steps.sort_unstable();
                steps.dedup();
                match shared.store().cancelled_steps(&steps).await {
                    Ok(ids) => shared.mark_cancelled(&ids),
                    Err(e) => tracing::debug!(error = %e, "checking for cancelled steps failed"),
                }
            }
        }
    }
}

/// Waits for running steps up to the grace period, then cancels the rest
/// (they are handed back with `Released`).
async fn drain(shared: &Arc<Shared>, deadline: tokio::time::Instant) {
    loop {
        let freed = shared.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if shared.inflight.load(Ordering::Acquire) == 0 {
            return;
        }
        tokio::select! {
            biased;
            _ = &mut freed => {},
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let left = shared.inflight.load(Ordering::Acquire);
    tracing::warn!(
        steps = left,
        "shutdown grace period over; cancelling running steps and handing them back"
    );
    shared.abort.cancel();
    for r in shared.running.lock().values() {
        r.token.cancel();
    }
    loop {
        let freed = shared.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if shared.inflight.load(Ordering::Acquire) == 0 {
            return;
        }
        freed.await;
    }
}

#[cfg(test)]
mod tests {
    use super::split_slots;

    fn split(caps: &[(&str, usize)], free: usize) -> Vec<(String, usize)> {
        split_slots(caps, free)
    }

    #[test]
    fn a_busy_handler_leaves_a_share_for_the_others() {
        // 512 free slots, two handlers that could each take 256: both get 256.
        assert_eq!(
            split(&[("busy", 256), ("idle", 256)], 512),
            vec![("busy".into(), 256), ("idle".into(), 256)]
        );
        // Fewer free slots than wanted: equal shares, not all to the first.
        assert_eq!(
            split(&[("busy", 256), ("idle", 256)], 100),
            vec![("busy".into(), 50), ("idle".into(), 50)]
        );
        // A handler that wants less leaves the rest to the others.
        assert_eq!(
            split(&[("a", 3), ("b", 256)], 100),
            vec![("a".into(), 3), ("b".into(), 97)]
        );
        // One slot: the first in rotation order gets it (rotation moves every round).
        assert_eq!(split(&[("a", 5), ("b", 5)], 1), vec![("a".into(), 1)]);
        assert!(split(&[("a", 5)], 0).is_empty());
        assert!(split(&[], 10).is_empty());
    }
}
