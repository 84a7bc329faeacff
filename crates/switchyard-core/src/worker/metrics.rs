//! What a host counts: one Prometheus registry per host (no global state,
//! so two hosts in one process never mix their figures), rendered in the
//! text exposition format by [`super::health`]'s `/metrics`.
//!
//! Label values are handler names (bounded: a host counts only its own
//! handlers), error kinds, store call names and wake-up sources, all from
//! fixed sets; no user payload ever becomes a label. Each handler's
//! children are looked up once at start ([`HandlerMetrics`]), so counting a
//! step is a few atomic adds.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

use super::*;

/// Run and queue-wait buckets, in seconds: 0.5 ms to about 4.5 min.
fn time_buckets() -> Vec<f64> {
    exponential_buckets(0.0005, 2.0, 20).unwrap_or_default()
}

/// Batch size buckets: 1 to 4096.
fn size_buckets() -> Vec<f64> {
    exponential_buckets(1.0, 2.0, 13).unwrap_or_default()
}

/// A store call the host makes, as the `call` label.
#[derive(Clone, Copy)]
pub(crate) enum StoreCall {
    Claim,
    Complete,
    Heartbeat,
    RecoverExpired,
    CancelledSteps,
}

impl StoreCall {
    const ALL: [StoreCall; 5] = [
        Self::Claim,
        Self::Complete,
        Self::Heartbeat,
        Self::RecoverExpired,
        Self::CancelledSteps,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Complete => "complete",
            Self::Heartbeat => "heartbeat",
            Self::RecoverExpired => "recover_expired",
            Self::CancelledSteps => "cancelled_steps",
        }
    }
}

/// Why the claim loop woke up, as the `source` label.
#[derive(Clone, Copy)]
pub(crate) enum Wake {
    /// The store signalled new work (LISTEN/NOTIFY, or a spawn in this process).
    Notify,
    /// The poll interval (or a known due time) passed.
    Poll,
    /// A slot was freed.
    Slot,
}

impl Wake {
    fn name(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Poll => "poll",
            Self::Slot => "slot",
        }
    }
}

/// The host's metric families.
pub(crate) struct HostMetrics {
    registry: Registry,
    claimed: IntCounterVec,
    started: IntCounterVec,
    completed: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    suspended: IntCounterVec,
    cancelled: IntCounterVec,
    released: IntCounterVec,
    leases_lost: IntCounterVec,
    queue_wait: HistogramVec,
    run_time: HistogramVec,
    slots_in_use: IntGaugeVec,
    slots_free: IntGaugeVec,
    host_slots_in_use: IntGauge,
    host_slots_free: IntGauge,
    pub(crate) outcomes_pending: IntGauge,
    pub(crate) claim_batch: Histogram,
    pub(crate) completion_batch: Histogram,
    store_seconds: HistogramVec,
    store_errors: IntCounterVec,
    wakeups: IntCounterVec,
}

/// One handler's children, looked up once.
pub(crate) struct HandlerMetrics {
    name: String,
    pub(crate) claimed: IntCounter,
    pub(crate) started: IntCounter,
    pub(crate) completed: IntCounter,
    pub(crate) suspended: IntCounter,
    pub(crate) cancelled: IntCounter,
    pub(crate) released: IntCounter,
    pub(crate) leases_lost: IntCounter,
    pub(crate) queue_wait: Histogram,
    pub(crate) run_time: Histogram,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: Vec<f64>) -> HistogramVec {
    let h =
        HistogramVec::new(HistogramOpts::new(name, help).buckets(b), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauges(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl HostMetrics {
    /// The families of host `host_id` (language `lang`). The names and
    /// help texts are constants, so building them cannot fail.
    pub(crate) fn new(host_id: &str, lang: &str) -> Self {
        let r = Registry::new();
        let h = &["handler"];
        let info = IntGaugeVec::new(
            Opts::new(
                "switchyard_host_info",
                "This host: its id and language (always 1).",
            ),
            &["host_id", "lang"],
        )
        .expect("valid metric");
        r.register(Box::new(info.clone())).expect("unique metric");
        info.with_label_values(&[host_id, lang]).set(1);
        Self {
            claimed: counter(
                &r,
                "switchyard_steps_claimed_total",
                "Steps claimed by this host.",
                h,
            ),
            started: counter(
                &r,
                "switchyard_steps_started_total",
                "Steps whose handler was started.",
                h,
            ),
            completed: counter(
                &r,
                "switchyard_steps_completed_total",
                "Steps that completed (a value or a decision).",
                h,
            ),
            failed: counter(
                &r,
                "switchyard_steps_failed_total",
                "Steps that failed for good, by error kind.",
                &["handler", "kind"],
            ),
            retried: counter(
                &r,
                "switchyard_steps_retried_total",
                "Failed runs that will be retried, by error kind.",
                &["handler", "kind"],
            ),
            suspended: counter(
                &r,
                "switchyard_steps_suspended_total",
                "Runs that suspended (await, sleep, delegate).",
                h,
            ),
            cancelled: counter(
                &r,
                "switchyard_steps_cancelled_total",
                "Runs stopped because their task was cancelled.",
                h,
            ),
            released: counter(
                &r,
                "switchyard_steps_released_total",
                "Steps handed back without costing an attempt (shutdown).",
                h,
            ),
            leases_lost: counter(
                &r,
                "switchyard_leases_lost_total",
                "Runs whose lease this host lost.",
                h,
            ),
            queue_wait: histogram(
                &r,
                "switchyard_step_queue_wait_seconds",
                "From when a step was ready to when this host claimed it.",
                h,
                time_buckets(),
            ),
            run_time: histogram(
                &r,
                "switchyard_step_run_seconds",
                "How long a run's handler took.",
                h,
                time_buckets(),
            ),
            slots_in_use: gauges(
                &r,
                "switchyard_slots_in_use",
                "Steps of the handler running now.",
                h,
            ),
            slots_free: gauges(
                &r,
                "switchyard_slots_free",
                "More steps of the handler that could run now.",
                h,
            ),
            host_slots_in_use: gauge(
                &r,
                "switchyard_host_slots_in_use",
                "Steps running in this host now.",
            ),
            host_slots_free: gauge(&r, "switchyard_host_slots_free", "Free slots of this host."),
            outcomes_pending: gauge(
                &r,
                "switchyard_outcomes_pending",
                "Outcomes handed to the completer and not yet recorded.",
            ),
            claim_batch: histogram(
                &r,
                "switchyard_claim_batch_size",
                "Steps per claim that got any.",
                &[],
                size_buckets(),
            )
            .with_label_values(&[] as &[&str]),
            completion_batch: histogram(
                &r,
                "switchyard_completion_batch_size",
                "Outcomes recorded per store call.",
                &[],
                size_buckets(),
            )
            .with_label_values(&[] as &[&str]),
            store_seconds: histogram(
                &r,
                "switchyard_store_call_seconds",
                "Latency of the host's store calls.",
                &["call"],
                time_buckets(),
            ),
            store_errors: counter(
                &r,
                "switchyard_store_errors_total",
                "Failed store calls of this host.",
                &["call"],
            ),
            wakeups: counter(
                &r,
                "switchyard_claim_wakeups_total",
                "Why the claim loop woke up.",
                &["source"],
            ),
            registry: r,
        }
        .with_zeroes()
    }

    /// Every fixed label combination exists from the start, so a scrape
    /// shows zeroes rather than missing series.
    fn with_zeroes(self) -> Self {
        for c in StoreCall::ALL {
            self.store_errors.with_label_values(&[c.name()]);
            self.store_seconds.with_label_values(&[c.name()]);
        }
        for w in [Wake::Notify, Wake::Poll, Wake::Slot] {
            self.wakeups.with_label_values(&[w.name()]);
        }
        self
    }

    /// The children of handler `name`.
    pub(crate) fn handler(&self, name: &str) -> HandlerMetrics {
        let l = &[name];
        HandlerMetrics {
            name: name.to_string(),
            claimed: self.claimed.with_label_values(l),
            started: self.started.with_label_values(l),
            completed: self.completed.with_label_values(l),
            suspended: self.suspended.with_label_values(l),
            cancelled: self.cancelled.with_label_values(l),
            released: self.released.with_label_values(l),
            leases_lost: self.leases_lost.with_label_values(l),
            queue_wait: self.queue_wait.with_label_values(l),
            run_time: self.run_time.with_label_values(l),
        }
    }

    /// Counts a resolution about to be recorded for a step of `h`.
    pub(crate) fn resolved(&self, h: &HandlerMetrics, r: &Resolution) {
        match r {
            Resolution::Completed(_) | Resolution::Decided { .. } => h.completed.inc(),
            Resolution::Retry { error, .. } => self
                .retried
                .with_label_values(&[h.name.as_str(), error.kind.as_str()])
                .inc(),
            Resolution::Failed(error) => self
                .failed
                .with_label_values(&[h.name.as_str(), error.kind.as_str()])
                .inc(),
            Resolution::Suspended(_) => h.suspended.inc(),
            Resolution::Released => h.released.inc(),
        }
    }

    pub(crate) fn woke(&self, w: Wake) {
        self.wakeups.with_label_values(&[w.name()]).inc();
    }

    /// Times `fut`, a store call, and counts its failure.
    pub(crate) async fn store_call<T>(
        &self,
        call: StoreCall,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let t = Instant::now();
        let r = fut.await;
        self.store_seconds
            .with_label_values(&[call.name()])
            .observe(t.elapsed().as_secs_f64());
        if r.is_err() {
            self.store_errors.with_label_values(&[call.name()]).inc();
        }
        r
    }

    /// The exposition text, with the slot gauges read from `shared` now.
    pub(crate) fn render(&self, shared: &Shared) -> String {
        for reg in &shared.order {
            let used = reg.inflight.load(Ordering::Acquire);
            self.slots_in_use
                .with_label_values(&[reg.name.as_str()])
                .set(used as i64);
            self.slots_free
                .with_label_values(&[reg.name.as_str()])
                .set(reg.free() as i64);
        }
        let used = shared.inflight.load(Ordering::Acquire);
        self.host_slots_in_use.set(used as i64);
        self.host_slots_free
            .set(shared.opts.concurrency.saturating_sub(used) as i64);
        self.outcomes_pending
            .set(shared.pending.load(Ordering::Acquire) as i64);
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(error = %e, "could not render the metrics");
        }
        out
    }
}
