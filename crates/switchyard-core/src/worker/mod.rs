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
//!
//! One concept per file: `builder` (registrations and options → `Worker`),
//! `running` (`RunningWorker`, stop, signals), `claims` (the claim loop),
//! `dispatch` (running a step or a batch under `guarded`), `outcome` (how a
//! run ended → the completion recorded, the retry policy), `completer`
//! (grouped recording, poison batches split), `leases` (heartbeat, dead
//! hosts), `cancellation` (cancels made elsewhere), `shutdown` (the bounded
//! drain). This file holds the state they share (`Shared`, `Reg`,
//! `Running`) and [`WorkerOptions`].

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
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (off when None;
    /// port 0 picks a free port, see [`RunningWorker::health_addr`]).
    pub health_listen: Option<std::net::SocketAddr>,
    /// The host's language, as the `lang` label of `switchyard_host_info`.
    pub language: &'static str,
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
            health_listen: None,
            language: "rust",
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
    m: HandlerMetrics,
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
    /// Its handler (for the counts of lost and cancelled runs).
    reg: Arc<Reg>,
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
    metrics: HostMetrics,
    /// Whether the last heartbeat reached the store (`/readyz`).
    heartbeat_ok: AtomicBool,
    /// Fired when the host has stopped: the health endpoint closes.
    serving_done: CancellationToken,
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
                r.reg.m.leases_lost.inc();
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
                r.reg.m.cancelled.inc();
                r.lost.store(true, Ordering::Release);
                r.token.cancel();
            }
        }
    }
}

mod builder;
mod cancellation;
mod claims;
mod completer;
mod dispatch;
mod health;
mod leases;
mod metrics;
mod outcome;
mod running;
mod shutdown;

pub use builder::{Worker, WorkerBuilder};
use cancellation::*;
use claims::*;
use completer::*;
use dispatch::*;
use leases::*;
use metrics::*;
use outcome::*;
use running::*;
pub use running::{wait_for_signal, RunningWorker, ShutdownSignals};
use shutdown::*;

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
